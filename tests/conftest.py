"""Fixtures and collection hooks; the helpers they use live in tests/helpers.py."""

from __future__ import annotations

import pytest

from tests.helpers import write_digits_tree


def pytest_collection_modifyitems(config, items):
    """Pure tests first, then those that start Ray (-x stops on a cheap failure before the slow
    part), then those that only read the session's finished tiny run (``reuses_tiny_run``: by then
    a module before them has made it, so they start no cluster of their own); GPU-only tests skip
    cleanly where torch sees no CUDA device (CI, laptops)."""
    import torch

    # stable: file order kept within each group
    items.sort(key=lambda item: 2 if "reuses_tiny_run" in item.keywords else int("ray" in item.keywords))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process as the package's commands end theirs (``errors.exit_process``): Ray
    disconnected, output flushed, then ``os._exit`` with pytest's own status, after its report. The
    interpreter's teardown of the native libraries one process has loaded by then (Ray's core
    worker, torch, ONNX Runtime, SQLAlchemy) is skipped: once, in CI, it crashed (SIGSEGV, exit
    139) after every test had passed, which would have failed a green run."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:  # ended before the session ran (a usage error): pytest's own exit
        return
    from ensemble.errors import exit_process

    exit_process(status)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> str:
    return write_digits_tree(tmp_path_factory.mktemp("tiny_digits"), per_class_train=12,
                             per_class_val=5, n_test=25, classes=4)


@pytest.fixture(scope="session")
def tiny_run_cache() -> dict:
    return {}


@pytest.fixture
def short_tmp():
    # Ray's socket paths must stay under 108 bytes: a short folder, not pytest's deep tmp_path.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ens-", dir="/tmp") as path:
        yield path


@pytest.fixture
def signal_handlers():
    """A command's main() installs its own SIGINT/SIGTERM handlers; put pytest's back."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
