"""Where a member's time goes: py-spy on every MemberTrainer process of one driver run.

    python benchmarks/profile_member.py                      # run.py's full-size config
    python benchmarks/profile_member.py --images 300 --members 3 --epochs 2 --top 25

Starts ``python -m ensemble.driver`` (its own local Ray cluster), attaches ``py-spy record
--idle --threads`` to each ``ray::MemberTrainer`` process among the driver's descendants as it
appears, and prints, for the main thread of the member processes (the one running ``fit``):
wall-clock share per phase of ``MemberTrainer.fit`` and the functions with the most samples.
Idle samples are kept, so waiting for the next Ray Data batch shows up as time.
Needs ptrace rights over the member processes (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

FIT_FRAME = "MemberTrainer.fit (ensemble/actors.py"
COMPUTE = ("(torch/nn/", "(torch/autograd/", "(torch/optim/", "Tensor.backward (torch", "(torch/_tensor.py")


def phase(frames: list[str]) -> str:
    """Which part of MemberTrainer.fit a main-thread stack (fit frame first) is in."""
    s = ";".join(frames)
    in_eval = "evaluate (ensemble/engine.py" in s
    if "_find_and_load" in s:
        return "imports during fit (first use of a module)"
    if any(k in s for k in COMPUTE):
        return "evaluate: model forward" if in_eval else "train: model forward/backward/step"
    if "batches (ensemble/batches.py" in s:
        return ("evaluate: waiting for batches (input threads)" if in_eval
                else "train: waiting for batches (input threads)")
    if "save_checkpoint" in s or "save_final" in s:
        return "checkpoint / final save"
    if "build_trainee" in s:
        return "model build"
    if "train_one_epoch" in s:
        return "train: other (loss sync, accuracy)"
    if in_eval:
        return "evaluate: other"
    return "fit: other (logging, gauges)"


def descendants(root: int) -> list[int]:
    children = collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children[ppid].append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def summarise(raw_files: list[str], top: int) -> None:
    phases = collections.Counter()
    inclusive, leaf = collections.Counter(), collections.Counter()
    total = 0
    for path in raw_files:
        with open(path) as fh:
            for line in fh:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or FIT_FRAME not in stack:
                    continue  # other threads, and the main thread outside fit
                n = int(count)
                total += n
                frames = stack.split(";")
                inner = frames[next(k for k, f in enumerate(frames) if f.startswith(FIT_FRAME)):]
                phases[phase(inner)] += n
                for func in {f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
                             for f in inner if " (" in f}:
                    inclusive[func] += n
                leaf[frames[-1].split(":")[0] + ")" if " (" in frames[-1] else frames[-1]] += n
    if not total:
        print("no samples inside MemberTrainer.fit; was py-spy allowed to attach?")
        return
    print(f"\n{total} samples inside MemberTrainer.fit (main thread, idle included)")
    print("\nphase of fit                                   share")
    for name, n in phases.most_common():
        print(f"  {name:<44} {100 * n / total:5.1f}%")
    print(f"\ntop {top} functions by inclusive samples")
    for func, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {func}")
    print(f"\ntop {top // 2} leaf frames (self time)")
    for func, n in leaf.most_common(top // 2):
        print(f"  {100 * n / total:5.1f}%  {func}")


def main(argv=None) -> int:
    from benchmarks.driver_runs import driver_argv
    from benchmarks.images import write_digits_images

    p = argparse.ArgumentParser(description="py-spy profile of the member processes of one driver run")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus-per-member", type=float, default=1.0)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--keep", help="copy py-spy's raw (collapsed) stacks into this folder")
    args = p.parse_args(argv)

    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    work = tempfile.mkdtemp(prefix="ensemble-profile-")
    side = max(10, args.images // 3)
    data = write_digits_images(os.path.join(work, "data"), n_train=args.images, n_val=side, n_test=side)
    values = {"data": data, "output": os.path.join(work, "out"), "members": args.members, "seed": 0,
              "arch": args.arch, "weights": "none", "freeze": "none", "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": 2e-3, "image_size": args.image_size, "augment": "light",
              "cpus_per_member": args.cpus_per_member, "gpus_per_member": 0, "gpus_per_infer_actor": 0,
              "infer_actors": 1, "infer_batch_size": 128, "cpus_per_infer_actor": 1}
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(work, "driver.log"), "w")
    driver = subprocess.Popen(driver_argv(values), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    spies, raw_files, seen = [], [], set()
    while driver.poll() is None:
        for pid in descendants(driver.pid):
            if pid not in seen and cmdline(pid).startswith("ray::MemberTrainer"):
                seen.add(pid)
                out = os.path.join(work, f"member-pid{pid}.txt")
                raw_files.append(out)
                spies.append(subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--idle", "--threads",
                     "--format", "raw", "--output", out, "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                print(f"py-spy attached to MemberTrainer pid {pid}", flush=True)
        time.sleep(0.2)
    for spy in spies:
        spy.wait(timeout=60)
    log.close()
    print(f"driver exited {driver.returncode}; {len(seen)} member process(es) profiled")
    summarise([f for f in raw_files if os.path.exists(f)], args.top)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        for f in raw_files + [os.path.join(work, "driver.log")]:
            if os.path.exists(f):
                shutil.copy(f, args.keep)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if driver.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
