"""Benchmarks of the ensemble pipeline, each measured side by side with its baseline in one run.

    python benchmarks/run.py            # sized for 2 CPU cores: 3 members, 300 images, 2 epochs, resnet18 @ 32 px
    python benchmarks/run.py --quick    # every section shrunk (smoke test; ~100 s on an idle 2-core box)
    python benchmarks/run.py --members 3 --images 300 --epochs 2 --image-size 32 --arch resnet18 --json out.json

Sections (BENCHMARKS.md has results and how to read them):
1. training: (a) ensemble.driver.run vs (b) a plain one-process loop (DataLoader over ImageFolder,
   same bootstrap rows, transforms, batch, threads, epochs) vs (c) torchensemble's BaggingClassifier.
   Member-images/s = members x bootstrap rows x epochs / wall time from start to end of training.
   (a) and (b) run twice, interleaved (b, c, a, vote, a, b), and the faster run of each counts.
2. soft vote: the Ray Data stage vs its compute bound (forward passes on decoded tensors) vs
   voting member by member (each member decodes the data again).
3. fixed cost: driver process start -> first member fit; last member finished -> predictions.csv.
4. scale: driver peak RSS and run time on a data set 10x larger, same members and epochs.
5. GPU (CUDA only): fp32 vs bf16 autocast + channels_last; two members sharing one GPU vs one alone.

The machine these run on may be shared and noisy: read the ratios, not the absolute times.
Every Ray cluster used here is started by this script or its driver subprocesses (address
"local") and stopped by them; nothing joins or stops a cluster someone else started.
Progress goes to stderr; results to stdout, and every number to --json FILE.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

OUR_FOLDERS = ("data", "vote", "pipeline", "plain", "driver-base", "data-scale-base", "data-scale-10x",
               "driver-scale-base", "driver-scale-10x")
SCALE = 10  # section 4: the larger data set is this many times the base one

FULL = {"members": 3, "images": 300, "epochs": 2, "image_size": 32, "arch": "resnet18", "batch_size": 32,
        "vote_images": 2000}
QUICK = {"members": 2, "images": 24, "epochs": 1, "image_size": 16, "arch": "resnet18", "batch_size": 16,
         "vote_images": 64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="every section at its smallest (the smoke test; ~100 s on an idle 2-core box)")
    p.add_argument("--members", type=int, help=f"ensemble size (default {FULL['members']}, quick {QUICK['members']})")
    p.add_argument("--images", type=int, help=f"training images; val and test get a third as many each "
                                              f"(default {FULL['images']}, quick {QUICK['images']})")
    p.add_argument("--epochs", type=int, help=f"default {FULL['epochs']}, quick {QUICK['epochs']}")
    p.add_argument("--image-size", type=int, help=f"training crop S (default {FULL['image_size']}, "
                                                  f"quick {QUICK['image_size']})")
    p.add_argument("--arch", help=f"torchvision name (default {FULL['arch']})")
    p.add_argument("--batch-size", type=int, help=f"default {FULL['batch_size']}, quick {QUICK['batch_size']}")
    p.add_argument("--vote-images", type=int, help=f"test files for section 2 (default {FULL['vote_images']}, "
                                                   f"quick {QUICK['vote_images']})")
    p.add_argument("--cpus-per-member", type=float, default=1.0,
                   help="pipeline CPUs per member = torch threads per member in every path (default 1: on 2 "
                        "cores the pipeline then runs one member at a time, like the plain loop)")
    p.add_argument("--loader-workers", type=int, default=1,
                   help="DataLoader workers in (b) and (c) (default 1: the one CPU the pipeline keeps for decoding)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale-images", type=int,
                   help=f"section 4's base training set; the large one is {SCALE}x (default 100, quick: --images, "
                        f"which reuses section 3's run as the base)")
    p.add_argument("--no-scale", action="store_true", help="skip section 4")
    p.add_argument("--photos", action="store_true",
                   help="sections 1-3 on camera-size JPEGs (500x375, quality 90, cut from scikit-learn's sample "
                        "photographs; 2 classes) with the seed recipe (AutoAugment + crop + flip) instead of digit "
                        "PNGs with the light one")
    p.add_argument("--join", action=argparse.BooleanOptionalAction, default=None,
                   help="sections 3-4: the driver subprocesses join this script's Ray cluster instead of "
                        "starting their own, so ray.init and shutdown are not in their times "
                        "(default: off; on with --quick, where it saves two cluster start-ups)")
    p.add_argument("--workdir", help="where data and outputs go (default: a temporary folder, removed at the end)")
    p.add_argument("--json", help="also write every number to this file")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.join is None:
        args.join = args.quick
    if args.scale_images is None:
        args.scale_images = args.images if args.quick else 100
    return args


# ---------------------------------------------------------------- printing

def say(text: str = "") -> None:
    print(text, flush=True)


def progress(text: str) -> None:
    """What is running now (stderr, so stdout holds only the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def section(title: str) -> None:
    say()
    say(f"== {title}")


def ratio(key: str, value: float, target: str, met: bool) -> dict:
    """One machine-readable line: ``ratio KEY VALUE  target ...: met|MISSED``."""
    say(f"ratio {key:<22} {value:8.3f}   target {target}: {'met' if met else 'MISSED'}")
    return {"value": value, "target": target, "met": met}


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _accs(values) -> str:
    return " ".join(f"{v:.3f}" for v in values)


# ---------------------------------------------------------------- measuring

def measure(args, values: dict, workdir: str, vote_paths: list[str]) -> dict:
    """Everything of sections 1-3, in an order that spreads the machine's drift over the paths:
    (b) plain, (c) torchensemble, (a) pipeline in process, soft vote, (a) again as section 3's CLI
    run, (b) again. (a) and (b) report the best of their two runs (noise only adds time)."""
    import ray

    from benchmarks.driver_runs import run_driver
    from benchmarks.training import run_pipeline, run_plain, run_torchensemble
    from benchmarks.voting import load_states, run_voting
    from ensemble.config import build_config
    from ensemble.cluster import cluster_capacity
    from ensemble.cluster import member_window

    m = {"load": {}}
    plain_dir = os.path.join(workdir, "plain")
    progress("(b) plain loop, run 1")
    m["load"]["b1"] = load_average()
    m["b1"] = run_plain(values, loader_workers=args.loader_workers, out_dir=plain_dir)
    progress("(c) torchensemble")
    m["load"]["c"] = load_average()
    m["c"] = run_torchensemble(values, loader_workers=args.loader_workers)

    progress("(a) pipeline in this process (ray.init first)")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    cfg = build_config(flag_values=values)
    m["window"] = member_window(cfg, cluster_capacity(), cfg.gpus_per_member or 0.0)
    m["cluster_cpus"] = ray.cluster_resources().get("CPU", 0)
    m["load"]["a1"] = load_average()
    m["a1"] = run_pipeline(values)

    progress("soft vote: stage, compute bound, naive")
    m["load"]["vote"] = load_average()
    states = load_states(m["a1"]["output"], cfg.members)
    m["num_classes"] = len(os.listdir(os.path.join(values["data"], "train")))
    m["vote"] = run_voting(cfg, states, vote_paths, m["num_classes"])
    m["address"] = ray.get_runtime_context().gcs_address if args.join else None
    if not args.join:
        ray.shutdown()  # the driver subprocesses start their own clusters; nothing of ours idles beside them

    progress("section 3: python -m ensemble.driver (also (a), run 2)")
    m["load"]["a2"] = load_average()
    m["cli"] = run_driver({**values, "output": os.path.join(workdir, "driver-base")},
                          log_path=os.path.join(workdir, "driver-base.log"), address=m["address"])
    progress("(b) plain loop, run 2")
    m["load"]["b2"] = load_average()
    m["b2"] = run_plain(values, loader_workers=args.loader_workers, out_dir=plain_dir)
    return m


# ---------------------------------------------------------------- reporting

def report_training(args, values: dict, m: dict, results: dict) -> None:
    a1, a2, b1, b2, c = m["a1"], m["cli"], m["b1"], m["b2"], m["c"]
    threads = max(1, int(args.cpus_per_member))
    images = a1["images"]
    section(f"1. training: {values['members']} members x {images // values['members'] // values['epochs']} "
            f"bootstrap rows x {values['epochs']} epochs = {images} member-images "
            f"({values['arch']}, {values['image_size']} px, batch {values['batch_size']}, {threads} torch "
            f"thread(s) per member)")
    say(f"    the pipeline runs {m['window']} member(s) at once on {m['cluster_cpus']:g} CPUs; (b) and (c) are "
        f"one process with {args.loader_workers} DataLoader worker(s)")
    say("    training time: start of training -> end of training (two runs where given; the best counts)")
    rate = {"a": images / min(a1["train_s"], a2["train_s"]), "b": images / min(b1["train_s"], b2["train_s"])}
    say(f"{'(a) pipeline: ensemble.driver.run':<42} {a1['train_s']:6.1f} s, {a2['train_s']:6.1f} s   "
        f"{rate['a']:7.1f} member-images/s   [run 2 = section 3's CLI run]")
    say(f"{'(b) plain loop: DataLoader + ImageFolder':<42} {b1['train_s']:6.1f} s, {b2['train_s']:6.1f} s   "
        f"{rate['b']:7.1f} member-images/s")
    if "skipped" in c:
        say(f"{'(c) torchensemble BaggingClassifier':<42} skipped: {c['skipped']}")
    else:
        rate["c"] = c["images"] / c["train_s"]
        say(f"{'(c) torchensemble BaggingClassifier':<42} {c['train_s']:6.1f} s           "
            f"{rate['c']:7.1f} member-images/s")
    say(f"    (a) whole run {a1['wall_s']:.1f} s: training {a1['train_s']:.1f} s, soft vote {a1['vote_s']:.1f} s, "
        f"the rest (scan, image check, report) {a1['wall_s'] - a1['train_s'] - a1['vote_s']:.1f} s")
    say(f"    (a) of its training time: {a1['in_fit_s']:.1f} s inside MemberTrainer.fit (summed over members), "
        f"{a1['in_train_loop_s']:.1f} s inside train_one_epoch; (b) spent all of its time in its loop")
    say("    load average (1/5/15 min) at each start: " + ", ".join(f"{k} {v}" for k, v in m["load"].items()))
    say(f"    best val accuracy per member: (a) {_accs(a1['member_val_acc'])}  (b) {_accs(b1['member_val_acc'])}")
    out = {"a1": a1, "a2_train_s": a2["train_s"], "b1": b1, "b2": b2, "c": c, "window": m["window"],
           "threads": threads, "member_images_per_s": rate, "load": m["load"]}
    out["a/b"] = ratio("a/b", rate["a"] / rate["b"], ">= 0.95", rate["a"] / rate["b"] >= 0.95)
    if "c" in rate:
        out["a/c"] = ratio("a/c", rate["a"] / rate["c"], "> 1", rate["a"] / rate["c"] > 1)
    else:
        say(f"ratio {'a/c':<22} skipped: {c['skipped']}")
    results["training"] = out


def report_voting(values: dict, m: dict, results: dict) -> None:
    v = m["vote"]
    section(f"2. soft vote: {v['members']} members on {v['images']} test files (1 actor x 1 CPU, batch "
            f"{values['infer_batch_size']}, {values['image_size']} px)")
    say(f"{'stage: soft_vote_stage (decode once, N members)':<50} {v['stage_s']:6.1f} s  "
        f"{v['stage_images_per_s']:7.1f} images/s   [first batch after {v['stage_first_batch_s']:.1f} s]")
    say(f"{'    the same once the pool is up (median batch gap)':<50} {'':8}  "
        f"{v['stage_steady_images_per_s']:7.1f} images/s   [{v['stage_batches']} batches]")
    say(f"{'compute bound: forward passes, decoded tensors':<50} {sum(v['bound_per_member_s']):6.1f} s  "
        f"{v['bound_images_per_s']:7.1f} images/s   [per member "
        f"{' '.join(f'{t:.2f}' for t in v['bound_per_member_s'])} s]")
    say(f"{'naive: one pass (one decode) per member':<50} {v['naive_s']:6.1f} s  "
        f"{v['naive_images_per_s']:7.1f} images/s   [max |naive - stage| "
        f"{v['naive_vs_stage_max_abs_diff']:.1e}]")
    r_bound = v["stage_images_per_s"] / v["bound_images_per_s"]
    r_steady = v["stage_steady_images_per_s"] / v["bound_images_per_s"]
    r_naive = v["stage_images_per_s"] / v["naive_images_per_s"]
    v["stage/bound"] = ratio("vote-stage/bound", r_bound, ">= 0.9", r_bound >= 0.9)
    if math.isfinite(r_steady):
        v["steady/bound"] = ratio("vote-steady/bound", r_steady, ">= 0.9 (pool start-up excluded)", r_steady >= 0.9)
    else:
        say(f"ratio {'vote-steady/bound':<22} n/a (fewer than 3 batches)")
    v["stage/naive"] = ratio("vote-stage/naive", r_naive, "> 1", r_naive > 1)
    results["voting"] = v


def report_fixed_cost(m: dict, results: dict) -> None:
    base, address = m["cli"], m["address"]
    cluster = f"joins this script's Ray cluster at {address}" if address else "starts its own Ray cluster"
    section(f"3. fixed cost: python -m ensemble.driver as a subprocess (same config as (a)); it {cluster}")
    say(f"process start -> first member fit() start {base['start_to_first_fit_s']:6.1f} s   "
        f"[imports + args {base['start_to_run_s']:.1f}, scan + {'connect' if address else 'ray.init'} + image "
        f"check + output {base['run_to_train_s']:.1f}, first member actor start + val decode "
        f"{base['train_to_first_fit_s']:.1f}]")
    say(f"last member finished -> predictions.csv   {base['last_finish_to_predictions_s']:6.1f} s   "
        f"[soft-vote stage {base['vote_s']:.1f}, metrics + figures + report {base['report_s']:.1f}]")
    say(f"predictions.csv -> process exit           {base['predictions_to_exit_s']:6.1f} s")
    gaps = base["train_s"] - sum(base["member_fit_s"])
    say(f"whole run {base['wall_s']:.1f} s; training {base['train_s']:.1f} s = member fits "
        f"{sum(base['member_fit_s']):.1f} s (of which train_one_epoch {base['in_train_loop_s']:.1f} s) + "
        f"{gaps:.1f} s between fits (first actor start, val decode, gathering)"
        f"{' [members overlap]' if gaps < 0 else ''}")
    results["fixed_cost"] = base


def scale_section(args, values: dict, workdir: str, m: dict, results: dict) -> None:
    from benchmarks.driver_runs import run_driver
    from benchmarks.images import write_digits_images

    def tree(name: str, n: int) -> str:
        return write_digits_images(os.path.join(workdir, name), n_train=n, n_val=max(10, n // 3),
                                   n_test=max(10, n // 3), size=16, seed=args.seed + 2)

    if args.scale_images == args.images:
        base = m["cli"]  # section 3's run is the base
    else:
        progress(f"section 4: base run, {args.scale_images} images")
        base = run_driver({**values, "data": tree("data-scale-base", args.scale_images),
                           "output": os.path.join(workdir, "driver-scale-base")},
                          log_path=os.path.join(workdir, "driver-scale-base.log"), address=m["address"])
    progress(f"section 4: {SCALE}x run, {args.scale_images * SCALE} images")
    big = run_driver({**values, "data": tree("data-scale-10x", args.scale_images * SCALE),
                      "output": os.path.join(workdir, "driver-scale-10x")},
                     log_path=os.path.join(workdir, "driver-scale-10x.log"), address=m["address"])
    section(f"4. scale: {base['data']['train']} -> {big['data']['train']} training images (val "
            f"{base['data']['val']} -> {big['data']['val']}, test {base['data']['test']} -> {big['data']['test']}), "
            f"same members and epochs; python -m ensemble.driver")
    say(f"{'':<34}{'base':>10}{f'{SCALE}x':>10}")
    say(f"{'driver peak RSS (MiB, VmHWM)':<34}{base['peak_rss_mib']:>10.0f}{big['peak_rss_mib']:>10.0f}")
    say(f"{'whole run (s)':<34}{base['wall_s']:>10.1f}{big['wall_s']:>10.1f}")
    say(f"{'training phase (s)':<34}{base['train_s']:>10.1f}{big['train_s']:>10.1f}")
    say(f"{'  of which train_one_epoch (s)':<34}{base['in_train_loop_s']:>10.1f}{big['in_train_loop_s']:>10.1f}")
    say(f"{'process start -> first fit (s)':<34}{base['start_to_first_fit_s']:>10.1f}"
        f"{big['start_to_first_fit_s']:>10.1f}")
    say(f"{'last fit -> predictions.csv (s)':<34}{base['last_finish_to_predictions_s']:>10.1f}"
        f"{big['last_finish_to_predictions_s']:>10.1f}")
    extra_images = big["train_images"] - base["train_images"]
    marginal = extra_images / max(big["train_s"] - base["train_s"], 1e-9)
    plain = results.get("training", {}).get("member_images_per_s", {}).get("b")
    say(f"    marginal training rate, base -> {SCALE}x: {marginal:.1f} member-images/s"
        + (f" ({marginal / plain:.2f} x the plain loop's overall {plain:.1f} in section 1)" if plain else ""))
    linear = f"<= {SCALE * 1.1:g} (no worse than linear)"
    out = {"base": base, "big": big, "marginal_member_images_per_s": marginal}
    r_mem = big["peak_rss_mib"] / base["peak_rss_mib"]
    out["rss"] = ratio(f"rss-{SCALE}x/base", r_mem, "<= 1.2 (flat)", r_mem <= 1.2)
    r_time = big["wall_s"] / base["wall_s"]
    out["time"] = ratio(f"time-{SCALE}x/base", r_time, linear, r_time <= SCALE * 1.1)
    r_train = big["train_s"] / base["train_s"]
    out["train"] = ratio(f"train-{SCALE}x/base", r_train, linear, r_train <= SCALE * 1.1)
    results["scale"] = out


def gpu_section(args, results: dict) -> None:
    from benchmarks.gpu import run_gpu

    section("5. GPU")
    g = run_gpu(steps=5 if args.quick else 20)
    if g is None:
        say("no CUDA device here; GPU benchmark skipped")
        return
    say(f"device {g['device']}; resnext101_64x4d (layer1 frozen), 224 px, batch 64, train_one_epoch on "
        f"batches already on the GPU; model via prepare_for_device (channels_last)")
    def memory(m: dict) -> str:  # torch's peak, what its allocator held, and gpu_memory's estimate (+ 1 GiB, 10%)
        return (f"peak {m['peak_gib']:.1f} GiB allocated, {m['reserved_gib']:.1f} reserved; "
                f"estimate {m['estimate_gib']:.1f} GiB")

    say(f"{'fp32 (--precision fp32)':<44}{g['fp32']['images_per_s']:8.1f} images/s  {memory(g['fp32'])}")
    if g["bf16"]:
        say(f"{'bf16 autocast (--precision auto)':<44}{g['bf16']['images_per_s']:8.1f} images/s  {memory(g['bf16'])}")
        r_prec = g["bf16"]["images_per_s"] / g["fp32"]["images_per_s"]
        g["bf16/fp32"] = ratio("gpu-bf16/fp32", r_prec, "> 1", r_prec > 1)
    else:
        say("bf16 not supported on this GPU; precision comparison skipped")
    mode = g["shared_mode"]
    say(f"{f'one member alone ({mode})':<44}{g['alone']['aggregate_images_per_s']:8.1f} images/s  "
        f"peak {g['alone']['peak_gib'][0]:.1f} GiB")
    say(f"{f'two members sharing the GPU ({mode})':<44}{g['two']['aggregate_images_per_s']:8.1f} images/s in all "
        f"({' + '.join(f'{x:.1f}' for x in g['two']['per_member_images_per_s'])}), peak "
        f"{' + '.join(f'{x:.1f}' for x in g['two']['peak_gib'])} GiB allocated, "
        f"{' + '.join(f'{x:.1f}' for x in g['two']['reserved_gib'])} reserved; estimate "
        f"{g['two']['estimate_gib']:.1f} each")
    r_share = g["two"]["aggregate_images_per_s"] / g["alone"]["aggregate_images_per_s"]
    g["two/one"] = ratio("gpu-two-shared/one", r_share, ">= 1 (sharing costs nothing)", r_share >= 1)
    fed = g["fed"]
    for name, label in (("one", "one member"), ("two", "two members at 0.5 GPU")):
        f = fed[name]
        say(f"{f'{label}: pipeline from photo JPEGs':<44}{f['pipeline']:8.1f} images/s vs synthetic "
            f"{f['synthetic']:.1f} ({f['threads_per_member']} input threads per member, {fed['cores']} cores)")
        g[f"fed-{name}"] = ratio(f"gpu-pipeline/synthetic-{name}", f["ratio"], ">= 0.95", f["ratio"] >= 0.95)
    results["gpu"] = g


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.images import write_digits_images, write_flat_images, write_photo_images
    from ensemble.run_folder import versions

    torch.set_num_threads(max(1, int(args.cpus_per_member)))  # (b), (c) and the vote's compute bound
    started = time.time()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ensemble-bench-")
    os.makedirs(workdir, exist_ok=True)
    for name in OUR_FOLDERS:  # a reused --workdir starts clean (only what this script writes)
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    n_side = max(10, args.images // 3)
    if args.photos:
        data = write_photo_images(os.path.join(workdir, "data"), n_train=args.images, n_val=n_side, n_test=n_side,
                                  seed=args.seed)
    else:
        data = write_digits_images(os.path.join(workdir, "data"), n_train=args.images, n_val=n_side, n_test=n_side,
                                   size=16, seed=args.seed)
    vote_paths = write_flat_images(os.path.join(workdir, "vote"), n=args.vote_images, seed=args.seed + 1)
    # Every path gets the same recipe (the CPU preset's); resources from the flags.
    values = {"data": data, "output": os.path.join(workdir, "pipeline"), "members": args.members,
              "seed": args.seed, "arch": args.arch, "weights": "none", "freeze": "none",
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": 2e-3, "image_size": args.image_size,
              "augment": "seed" if args.photos else "light", "cpus_per_member": args.cpus_per_member,
              "gpus_per_member": 0, "gpus_per_infer_actor": 0, "infer_actors": 1, "infer_batch_size": 128,
              "cpus_per_infer_actor": 1}

    v = versions()
    say(f"ensemble benchmarks{' --quick' if args.quick else ''}: {os.cpu_count()} CPU core(s), CUDA "
        f"{'yes' if torch.cuda.is_available() else 'no'}; " + ", ".join(f"{k} {v[k]}" for k in v if v[k]))
    kind = "photo JPEGs (500x375), augment seed" if args.photos else "digit PNGs (16x16), augment light"
    say(f"data: {args.images} train / {n_side} val / {n_side} test {kind} under {workdir}; "
        f"load average at start {load_average()}")
    results = {"args": vars(args), "versions": v, "cpus": os.cpu_count()}
    try:
        m = measure(args, values, workdir, vote_paths)
        report_training(args, values, m, results)
        report_voting(values, m, results)
        report_fixed_cost(m, results)
        if not args.no_scale:
            scale_section(args, values, workdir, m, results)
        gpu_section(args, results)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    results["seconds"] = time.time() - started
    say()
    say(f"benchmarks done in {results['seconds']:.0f} s (load average now {load_average()})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=_jsonable)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
