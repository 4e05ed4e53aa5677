"""Benchmarks of the ensemble pipeline against the plain ways of doing the same work.

Entry point: ``python benchmarks/run.py [--quick]``; results and how to read them: BENCHMARKS.md.
"""
