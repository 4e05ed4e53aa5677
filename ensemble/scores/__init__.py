"""The scores: how members are combined and how a run is scored, in numpy alone.

``vote`` (the one place that decides how members combine), ``metrics``, ``calibration``,
``selection`` and ``scoring`` (a run's scores as data) import neither torch nor Ray, so the
report, predict's outputs and the server's answers can be computed and tested anywhere
(``tests/test_scores_pure.py`` imports this package and checks that torch and ray stay unloaded).
"""
