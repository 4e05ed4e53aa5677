"""Never a silent wait: pull a Ray stage's results on a helper thread and stop, with one line,
when nothing arrives for a while."""

from __future__ import annotations

import math
import queue
import threading
import time
from typing import Callable, Iterable

from ensemble.errors import StallError, worker_error


def watched(produce: Callable[[], Iterable], *, stall_timeout: float, stalled: Callable[[float], Exception],
            name: str = "ensemble-stage") -> list:
    """Everything ``produce()`` yields, in order. ``produce`` runs on a helper thread (building a
    Ray Dataset may itself wait for a CPU); when nothing arrives for ``stall_timeout`` seconds,
    ``stalled(seconds waited)`` is raised here. This thread waits in short steps, so Ctrl-C and
    SIGTERM still stop the run; errors of ``produce`` are raised here as they are, a UserError
    raised in a Ray Data worker as that error (``errors.worker_error``). A stage given
    up on (stalled, interrupted) is dropped by the helper at its next result; a helper blocked in
    Ray until then stays a daemon thread (the driver exits right after such an error)."""
    arrived: queue.Queue = queue.Queue()
    abandoned = threading.Event()  # set when this thread stops waiting: the helper drops the stage

    def pull() -> None:
        try:
            items = iter(produce())
            for item in items:
                if abandoned.is_set():
                    getattr(items, "close", lambda: None)()  # ends a Ray Data iteration and its executor
                    return
                arrived.put(("item", item))
            arrived.put(("done", None))
        except BaseException as exc:  # handed to the waiting thread, raised there
            arrived.put(("error", worker_error(exc)))

    threading.Thread(target=pull, name=name, daemon=True).start()
    items, last = [], time.time()
    try:
        while True:
            try:
                kind, value = arrived.get(timeout=1.0)
            except queue.Empty:
                if time.time() - last > stall_timeout:
                    raise stalled(time.time() - last) from None
                continue
            last = time.time()
            if kind == "item":
                items.append(value)
            elif kind == "error":
                raise value
            else:
                return items
    finally:
        abandoned.set()


def free_line(need_cpu: float, need_gpu: float = 0.0) -> tuple[str, str]:
    """("1 CPU and 0.5 GPU", "0 of 2 CPU, 0 of 1 GPU"): what one actor or task needs, what is free."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    need = f"{need_cpu:g} CPU" + (f" and {need_gpu:g} GPU" if need_gpu else "")
    have = f"{free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPU" + (
        f", {free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPU" if need_gpu else "")
    return need, have


def stall_error(head: str, needs: str, need_cpu: float, need_gpu: float = 0.0, *, flags=(),
                then: str = "then rerun the same command"):
    """The one line a stage that made no progress stops with, as a StallError: ``head`` (what
    made no progress, for how long), ``needs`` with ``{need}`` for what one task or actor needs,
    what is free, and the fix: with ``flags`` ((flag, resource, amount) as ``fit_advice`` takes
    them) "free them" and the values that fit, without "free CPUs or add a node"; then ``then``."""
    need, have = free_line(need_cpu, need_gpu)
    fix = f"free them{fit_advice(list(flags))}" if flags else "free CPUs or add a node"
    return StallError(f"{head}: {needs.format(need=need)}, the cluster has {have} free (other work holds the rest); "
                      f"{fix}, {then}")


def fit_advice(requests: list[tuple[str, str, float]]) -> str:
    """What to change so a stage that cannot start would start on what is free now, as the end of
    a sentence. ``requests``: (flag, resource, amount each), e.g. ("cpus-per-member", "CPU", 2).

    ", or use --cpus-per-member 0.5, which fits what is free now" when some lower values fit (a
    GPU flag with no GPU free fits at 0: on CPU); "; no CPU is free, so a lower --cpus-per-member
    would not start either" when a needed CPU amount has nothing free; ", or lower
    --cpus-per-member" when enough is free in total but not on one node."""
    import ray

    free = ray.available_resources()
    fits, none_free = [], []
    for flag, resource, need in requests:
        have = free.get(resource, 0.0)
        if need <= 0 or have >= need:
            continue
        value = math.floor(have * 100) / 100  # Ray resources are fractional; keep a readable value below
        if value > 0:
            fits.append(f"--{flag} {value:g}")
        elif resource == "GPU":
            fits.append(f"--{flag} 0 (on CPU)")
        else:
            none_free.append((flag, resource))
    if none_free:
        flag, resource = none_free[0]
        return f"; no {resource} is free, so a lower --{flag} would not start either"
    if fits:
        return f", or use {' '.join(fits)}, which fits what is free now"
    return ", or lower " + "/".join(f"--{flag}" for flag, _, need in requests if need > 0)
