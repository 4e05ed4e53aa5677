"""Sections 3 and 4: the driver as a user runs it (``python -m ensemble.driver``), as a subprocess.

Fixed cost comes from the run's own timestamps: process start (taken here, just before the
spawn), the members' ``started`` / ``finished`` (report.json, member.json) and the file times
of the outputs. Peak RSS is the driver process's own high-water mark (``VmHWM`` in
/proc/PID/status, polled while it runs; it only grows), so Ray's workers are not counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def driver_argv(values: dict) -> list[str]:
    """``python -m ensemble.driver`` with every value as a flag, so no preset applies."""
    argv = [sys.executable, "-m", "ensemble.driver", "--fresh"]
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run_driver(values: dict, *, log_path: str, address: str | None = None, timeout_s: float = 900) -> dict:
    """Run the driver to completion; timings, peak RSS, report.

    Without ``address`` it starts its own local Ray cluster (as a user's first run does; never
    another cluster on this machine); with one, it joins that cluster (``--address``).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if address:
        values = {**values, "address": address}
        env.update(RAY_AUTH_MODE="token")  # an explicit address needs the local token (RAY_NOTES)
        env.pop("RAY_ADDRESS", None)
    else:
        env["RAY_ADDRESS"] = "local"
    with open(log_path, "w") as log:
        t0 = time.time()
        proc = subprocess.Popen(driver_argv(values), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak_kib = 0
        while proc.poll() is None:
            peak_kib = max(peak_kib, _vm_hwm_kib(proc.pid))
            if time.time() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"driver ran past {timeout_s:.0f} s; log: {log_path}")
            time.sleep(0.1)
        t_end = time.time()
    if proc.returncode != 0:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"driver exited {proc.returncode}; log {log_path}:\n{tail}")

    output = values["output"]
    with open(os.path.join(output, "report.json")) as fh:
        report = json.load(fh)
    members = []
    for i in range(values["members"]):
        with open(os.path.join(output, "members", f"member-{i}", "member.json")) as fh:
            members.append(json.load(fh))
    seconds = report["seconds"]
    t_predictions = os.stat(os.path.join(output, "predictions.csv")).st_mtime
    # report.json's seconds.total is taken just before the outputs are written: run() began then.
    t_run = t_predictions - seconds["total"]
    t_train = t_run + seconds["total"] - seconds.get("report", 0.0) - seconds["vote"] - seconds["train"]
    first_fit = min(m["started"] for m in members)
    last_done = max(m["finished"] for m in members)
    rows = values.get("bootstrap_size") or report["data"]["train"]
    return {
        "wall_s": t_end - t0,
        "peak_rss_mib": peak_kib / 1024,
        "train_s": seconds["train"],
        "train_images": values["members"] * rows * values["epochs"],
        "start_to_first_fit_s": first_fit - t0,
        "start_to_run_s": t_run - t0,                  # interpreter, imports, argument parsing
        "run_to_train_s": t_train - t_run,             # scan, ray.init, image check, output folder
        "train_to_first_fit_s": first_fit - t_train,   # actor start-up (overlaps the val decode)
        "last_finish_to_predictions_s": t_predictions - last_done,
        "vote_s": seconds["vote"],                     # the soft-vote stage (val, test, train for OOB)
        "report_s": seconds.get("report", 0.0),        # metrics, figures, report.md
        "predictions_to_exit_s": t_end - t_predictions,
        "member_fit_s": [m["seconds"] for m in members],
        "in_train_loop_s": sum(h["seconds"] for m in members for h in m["history"]),
        "data": report["data"],
    }
