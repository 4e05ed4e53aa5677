"""watch.py without a cluster: ``watched`` over plain generators (order, errors, a stall and the
stage it gives up on), and the advice and line a stalled stage stops with, on given free resources."""

from __future__ import annotations

import threading
import time

import pytest

from ensemble.watch import fit_advice, stall_error, watched


def _stalled(waited: float) -> Exception:
    return TimeoutError(f"stalled after {waited:.1f} s")


def test_watched_returns_every_item_in_order():
    def produce():
        yield from ["a", "b", "c"]

    assert watched(produce, stall_timeout=10, stalled=_stalled) == ["a", "b", "c"]
    assert watched(lambda: [], stall_timeout=10, stalled=_stalled) == []


def test_watched_raises_the_producers_error_as_it_is():
    def produce():
        yield 1
        raise KeyError("block 3")

    with pytest.raises(KeyError, match="block 3"):
        watched(produce, stall_timeout=10, stalled=_stalled)


def test_watched_stops_with_the_stalled_error_and_drops_the_stage():
    """A producer that blocks (a stage waiting for a CPU): ``stalled`` is raised after the stall
    timeout, and the helper closes the stage at its next result instead of pulling on."""
    release, closed = threading.Event(), threading.Event()

    def produce():
        try:
            yield "first"
            release.wait(30)
            yield "late"
            yield "never pulled"
        finally:
            closed.set()

    started = time.time()
    with pytest.raises(TimeoutError, match=r"^stalled after \d+\.\d s$"):
        watched(produce, stall_timeout=0.2, stalled=_stalled)
    assert time.time() - started < 5  # watch waits in 1 s steps
    assert not closed.is_set()
    release.set()
    assert closed.wait(5)


@pytest.mark.parametrize("free, requests, advice", [
    ({"CPU": 0.5}, [("cpus-per-member", "CPU", 2.0), ("gpus-per-member", "GPU", 0.0)],
     ", or use --cpus-per-member 0.5, which fits what is free now"),
    ({"CPU": 3.0}, [("cpus-per-member", "CPU", 2.0), ("gpus-per-member", "GPU", 1.0)],
     ", or use --gpus-per-member 0 (on CPU), which fits what is free now"),
    ({"CPU": 1.0, "GPU": 0.25}, [("cpus-per-infer-actor", "CPU", 2.0), ("gpus-per-infer-actor", "GPU", 0.5)],
     ", or use --cpus-per-infer-actor 1 --gpus-per-infer-actor 0.25, which fits what is free now"),
    ({"CPU": 0.3333333}, [("cpus-per-member", "CPU", 1.0)],
     ", or use --cpus-per-member 0.33, which fits what is free now"),
    ({"GPU": 1.0}, [("cpus-per-member", "CPU", 1.0), ("gpus-per-member", "GPU", 1.0)],
     "; no CPU is free, so a lower --cpus-per-member would not start either"),
    ({"CPU": 0.004}, [("cpus-per-member", "CPU", 1.0)],
     "; no CPU is free, so a lower --cpus-per-member would not start either"),
    # enough free in all, but not on any one node: nothing to compute, only the flags to lower
    ({"CPU": 4.0, "GPU": 1.0}, [("cpus-per-member", "CPU", 2.0), ("gpus-per-member", "GPU", 1.0)],
     ", or lower --cpus-per-member/--gpus-per-member"),
])
def test_fit_advice_names_values_that_fit_what_is_free(monkeypatch, free, requests, advice):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: dict(free))
    assert fit_advice(requests) == advice


def test_stall_error_names_what_a_task_needs_what_is_free_and_the_fix(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    assert str(stall_error("image decoding made no progress in 600 s", "its tasks need {need} each", 1)) == (
        "image decoding made no progress in 600 s: its tasks need 1 CPU each, the cluster has 0 of 2 CPU free "
        "(other work holds the rest); free CPUs or add a node, then rerun the same command")
    line = str(stall_error("the soft vote made no progress in 600 s", "each voter needs {need}", 1.0, 0.5,
                           flags=[("cpus-per-infer-actor", "CPU", 1.0), ("gpus-per-infer-actor", "GPU", 0.5)],
                           then="then rerun the same command (finished members are kept and not trained again)"))
    assert line == ("the soft vote made no progress in 600 s: each voter needs 1 CPU and 0.5 GPU, the cluster has "
                    "0 of 2 CPU, 0 of 1 GPU free (other work holds the rest); free them; no CPU is free, so a lower "
                    "--cpus-per-infer-actor would not start either, then rerun the same command (finished members "
                    "are kept and not trained again)")
