"""The distilled student against its ensemble, and against the same student trained without a teacher.

    .venv/bin/python benchmarks/distill.py --run /tmp/demo                   # a finished demo run as teacher
    .venv/bin/python benchmarks/distill.py --set handwriting --student-epochs 6   # trains the teacher too

Three commands, as a user runs them, one after another: the teacher (``ensemble.driver``, unless
``--run`` names a finished one), the student (``ensemble.distill``), and the control: the
student's own resolved config (its ``config.yaml``) given back to the driver, so the same one
member, data, recipe and seed train without a teacher. The share of the ensemble's val-accuracy
gain over its mean member that each keeps says how much of the student's comes from the teacher
rather than from training one model longer. ``handwriting`` is ``whole_job.py``'s 100-class set
(two-digit numbers from scikit-learn's digit scans, 3,000 train images at 32 px).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _run(args: list, log: str) -> float:
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} exited {proc.returncode}; see {log}")
    return time.time() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a finished run to distil (default: train one of --set)")
    p.add_argument("--set", default="handwriting", choices=("handwriting",), help="the teacher's data without --run")
    p.add_argument("--members", type=int, default=9)
    p.add_argument("--epochs", type=int, default=2, help="the teacher's epochs per member")
    p.add_argument("--student-epochs", type=int, default=6)
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--work", help="folder for the runs (default: a new temporary one)")
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="distill-bench-")
    os.makedirs(work, exist_ok=True)
    teacher, seconds = args.run, {}
    if teacher is None:
        from benchmarks.whole_job import SETS, write_set

        spec = SETS[args.set]
        data = write_set(args.set, os.path.join(work, args.set), spec, 0)
        teacher = os.path.join(work, "teacher")
        seconds["teacher"] = _run(["ensemble.driver", "--data", data, "--output", teacher,
                                   "--members", str(args.members),
                                   "--epochs", str(args.epochs), "--arch", "resnet18", "--weights", "none",
                                   "--freeze", "none", "--lr", "1e-3", "--image-size", str(spec["image_size"]),
                                   "--augment", spec["augment"], "--cpus-per-member", "1"],
                                  os.path.join(work, "teacher.log"))
    student, control = os.path.join(work, "student"), os.path.join(work, "control")
    seconds["student"] = _run(["ensemble.distill", "--run", teacher, "--output", student, "--epochs",
                               str(args.student_epochs), "--kd-temperature", str(args.kd_temperature),
                               "--kd-alpha", str(args.kd_alpha), "--speed-images", "64"],
                              os.path.join(work, "student.log"))
    seconds["control"] = _run(["ensemble.driver", "--config", os.path.join(student, "config.yaml"),
                               "--output", control],
                              os.path.join(work, "control.log"))

    summary = json.load(open(os.path.join(student, "distill.json")))
    ctl = json.load(open(os.path.join(control, "report.json")))["members"][0]["metrics"]
    val = summary["val"]
    mean, ens = val["mean_member"]["accuracy"], val["ensemble"]["accuracy"]

    def kept(acc: float) -> str:
        return f"{(acc - mean) / (ens - mean):.0%}" if ens > mean else "n/a"

    print(f"teacher {teacher}: {summary['members']} x {summary['teacher_arch']}; student and control "
          f"{summary['arch']}, {args.student_epochs} epochs, T {args.kd_temperature:g}, alpha {args.kd_alpha:g}")
    print(f"{'':34s} {'val acc':>8s} {'NLL':>7s} {'ECE':>7s} {'gain kept':>10s}")
    rows = [("ensemble (soft vote)", val["ensemble"]), ("mean member", val["mean_member"]),
            (f"best member ({val['best_member']['member']})", val["best_member"]),
            ("student (distilled)", val["student"]), ("control (same recipe, no teacher)", ctl)]
    for name, s in rows:
        gain = kept(s["accuracy"]) if name.startswith(("student", "control")) else ""
        print(f"{name:34s} {s['accuracy']:8.4f} {s['nll']:7.4f} {s['ece']:7.4f} {gain:>10s}")
    speed, params, flops = summary["inference"], summary["params"], summary["gflops_per_image"]
    print(f"inference on {speed['batch']} val images ({speed['device']}, {speed['threads']} threads): student "
          f"{speed['student']:.1f} images/s, ensemble {speed['ensemble']:.1f}: {speed['ratio']:.2f}x")
    print(f"parameters {params['student']:,} vs {params['ensemble']:,}; GFLOPs per image {flops['student']:.3f} vs "
          f"{flops['ensemble']:.3f} ({flops['student'] / flops['ensemble']:.3f})")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f"; runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
