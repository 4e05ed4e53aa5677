"""Bagged ensembles of torchvision ResNet/ResNeXt classifiers, trained and soft-voted on Ray.

The Python API (``ensemble/api.py``): ``ensemble.train(data=..., output=..., **flags)`` trains and
returns a finished run; ``ensemble.load(path)`` opens one. ``import ensemble`` stays light: torch
and Ray are imported when a function needs them.
"""

__version__ = "0.1.0"

__all__ = ["train", "load", "Run"]


def __getattr__(name: str):
    if name in __all__:
        from ensemble import api

        return getattr(api, name)
    raise AttributeError(f"module 'ensemble' has no attribute {name!r}")
