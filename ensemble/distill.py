"""Distil a finished run's ensemble into one student model.

    python -m ensemble.distill --run runs/exp1 --output runs/exp1-student
    python -m ensemble.distill --run runs/exp1 --output runs/exp1-r18 --arch resnet18 --epochs 30

The student trains on the whole train set (no bootstrap sample) through the same pipeline as a
member: the driver's image check and cache, ``MemberTrainer``, the epoch loop, GPU sharing,
checkpoints and resume. Its loss is Hinton et al.'s (2015): T^2 x KL between the teacher's and
the student's distributions softened at temperature T, plus alpha x cross-entropy on the labels
(``engine.distillation_loss``).

The teacher is the run's soft vote (all members, unweighted) on every training image, computed
once, on the eval view, by the voter pool over the run's image cache, and kept in the output
folder (``teacher.npz``): one forward pass of each member per image, where scoring every augmented
batch would cost nine forward passes per student step (the literature's way; not built).

The output folder is an ordinary one-member run (``--members 1 --bagging full``: report.json,
its sha256, member hashes, a temperature fitted on val) that ``ensemble.predict``,
``ensemble.serve`` and ``ensemble.export`` take; ``distill.json`` and ``distill.md`` beside it
compare the student with the ensemble. Rerunning the same command resumes it. This is an entry
point above the driver: it runs the driver's pipeline with a teacher.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ensemble import storage
from ensemble.config import AUGMENTS, ARCHS, CACHE_TIERS, FREEZE_STAGES, ConfigError, EnsembleConfig, build_config
from ensemble.errors import CommandParser, RunError, exit_process, parse_command, run_cli, stop_on_sigterm
from ensemble.run_folder import STUDENT_FILES

log = logging.getLogger("ensemble.distill")

# Hinton et al. report T from 2 to 20; below 1 the teacher is sharpened, not softened.
KD_RANGES = {"kd_temperature": (1.0, 20.0), "kd_alpha": (0.0, 10.0)}
KD_DEFAULTS = {"kd_temperature": 4.0, "kd_alpha": 0.5}
# The run's settings a student may change: the rest (data, image size, eval geometry, TTA, cache
# side) is the teacher's, so the teacher's targets and the student's pixels are the same images.
STUDENT_FLAGS = ("arch", "weights", "freeze", "freeze_stem", "epochs", "batch_size", "lr", "augment", "precision",
                 "seed", "gpus_per_member", "cpus_per_member", "infer_actors", "infer_batch_size",
                 "gpus_per_infer_actor", "cpus_per_infer_actor", "cache_share", "cache_tier", "stall_timeout",
                 "address", "strict")


@dataclass(frozen=True)
class Distillation:
    """The teacher of a student run: the finished run, and the loss's temperature and label weight."""

    run: str
    temperature: float
    alpha: float
    report_sha256: str          # of the teacher's report.json: what makes a saved student this teacher's

    def identity(self) -> dict:
        """What the student's fingerprint adds: another teacher or loss trains another student."""
        return {"report_sha256": self.report_sha256, "kd_temperature": self.temperature, "kd_alpha": self.alpha}

    def teacher(self, cfg: EnsembleConfig, index, cache, output: str):
        """An ``actors.Teacher``: the run's soft vote on every row of ``index.train`` (the eval view,
        from ``cache`` when there is one), in the object store. Computed once and kept in
        ``output/teacher.npz``; a resumed student reads it back."""
        import ray

        from ensemble.actors import Teacher

        path = storage.join(output, STUDENT_FILES[0])
        ids = np.sort(index.train.column("id").to_numpy())
        identity = json.dumps(self.identity(), sort_keys=True)
        targets = _read_targets(path, ids, identity)
        if targets is None:
            targets = self._vote_train_rows(cfg, index, cache)
            buf = io.BytesIO()
            np.savez(buf, ids=targets.ids, probs=targets.probs, identity=np.array(identity))
            storage.write_bytes(path, buf.getvalue())
        else:
            log.info("teacher: its soft vote on the %d training rows read back from %s", len(targets.ids), path)
        return Teacher(targets=ray.put(targets), temperature=self.temperature, alpha=self.alpha)

    def _vote_train_rows(self, cfg: EnsembleConfig, index, cache):
        import ray

        from ensemble.epochs import Targets
        from ensemble.run_folder import load_run
        from ensemble.vote_stage import vote_splits

        finished = load_run(self.run)  # sha256-checked again: the run may have changed since main()
        teacher_cfg = finished.config.replace(
            infer_actors=cfg.infer_actors, infer_batch_size=cfg.infer_batch_size, stall_timeout=cfg.stall_timeout,
            cpus_per_infer_actor=cfg.cpus_per_infer_actor, gpus_per_infer_actor=cfg.gpus_per_infer_actor)
        log.info("teacher: %d members of %s vote on the %d training rows (eval view), once", len(finished.states),
                 self.run, index.train.num_rows)
        voted = vote_splits(teacher_cfg, {"train": index.train}, weight_refs=[ray.put(s) for s in finished.states],
                            num_classes=len(index.classes), gpus=cfg.gpus_per_infer_actor, cache=cache)["train"]
        return Targets(ids=np.asarray(voted["id"]), probs=np.ascontiguousarray(voted["probs"], dtype=np.float32))


def _read_targets(path: str, ids: np.ndarray, identity: str):
    """The targets an earlier process of this student saved, or None (none yet, unreadable, or
    from another teacher or other rows, as after ``--fresh``: computed again)."""
    from ensemble.epochs import Targets

    try:
        with np.load(io.BytesIO(storage.read_bytes(path))) as saved:
            targets = Targets(ids=saved["ids"], probs=saved["probs"])
            same = str(saved["identity"]) == identity
    except (OSError, ValueError, KeyError):
        return None
    if not same or not np.array_equal(targets.ids, ids) or len(targets.probs) != len(ids):
        return None
    return targets


# ---------------------------------------------------------------- the student's config


def student_config(teacher: EnsembleConfig, flags: dict, output: str) -> EnsembleConfig:
    """The teacher run's config with the student's flags: one member on the whole train set, the
    teacher's data and eval geometry. Flag values are checked as the driver checks its own."""
    # the teacher's first member's architecture and recipe (or the named architecture's, when the
    # run has it), flattened: the student's own flags then override them
    arch = flags.get("arch", teacher.archs[0])
    values = teacher.member_config(teacher.archs.index(arch) if arch in teacher.archs else 0).to_dict()
    values.update(flags)
    values.update(output=output, members=1, bagging="full", bootstrap_size=None, calibrate_on="val", vote="soft",
                  val_seed=teacher.split_seed if teacher.val_fraction is not None else None)  # the teacher's val rows
    return build_config(flag_values=values)


def check_kd(name: str, value: float) -> float:
    low, high = KD_RANGES[name]
    flag = "--" + name.replace("_", "-")
    if not (np.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{flag} {value:g}: must be from {low:g} to {high:g}")
    return float(value)


# ---------------------------------------------------------------- the comparison


def distill_summary(teacher_report: dict, student_report: dict, *, teacher_params: int, student_params: int,
                    teacher_gflops: float, student_gflops: float, speed: Optional[dict] = None) -> dict:
    """distill.json: the student against the ensemble, its mean and its best member on val
    (accuracy, NLL, ECE), the parameters and GFLOPs per image of each (the ensemble's: all its
    members' together), and the share of the ensemble's accuracy gain over the mean member the
    student keeps: (student - mean) / (ensemble - mean)."""
    members = teacher_report["members"]

    def scores(metrics: dict) -> dict:
        return {k: float(metrics[k]) for k in ("accuracy", "nll", "ece")}

    mean = {k: float(np.mean([m["metrics"][k] for m in members])) for k in ("accuracy", "nll", "ece")}
    best = max(members, key=lambda m: m["val_acc"])
    ensemble = scores(teacher_report["ensemble"]["metrics"])
    student = scores(student_report["members"][0]["metrics"])
    gain = ensemble["accuracy"] - mean["accuracy"]
    kept = (student["accuracy"] - mean["accuracy"]) / gain if gain > 0 else None
    calibrated = {
        "ensemble": _after(teacher_report), "student": _after(student_report)}
    return {
        "val": {"student": student, "ensemble": ensemble, "mean_member": mean,
                "best_member": {"member": int(best["member"]), **scores(best["metrics"])}},
        "val_after_temperature": calibrated,
        "gain_kept": kept,
        "members": len(members),
        "params": {"student": int(student_params), "ensemble": int(teacher_params)},
        "gflops_per_image": {"student": student_gflops, "ensemble": teacher_gflops},
        "inference": speed,
    }


def _after(report: dict) -> Optional[dict]:
    try:
        cal = report["ensemble"]["calibration"]
        return {"temperature": float(cal["temperature"]),
                **{k: float(cal["val_after"][k]) for k in ("accuracy", "nll", "ece")}}
    except (KeyError, TypeError):
        return None


def summary_markdown(summary: dict, *, run: str, output: str, arch: str, teacher_arch: str) -> str:
    """distill.md: the summary as a page."""
    v = summary["val"]
    rows = [[f"student ({arch})", *_cells(v["student"])],
            [f"ensemble ({summary['members']} x {teacher_arch}, soft vote)" if "," not in teacher_arch else
             f"ensemble ({summary['members']} members: {teacher_arch}, soft vote)", *_cells(v["ensemble"])],
            ["mean member", *_cells(v["mean_member"])],
            [f"best member ({v['best_member']['member']})", *_cells(v["best_member"])]]
    kept = summary["gain_kept"]
    lines = [f"# Distilled student of {run}", "",
             f"Validation scores (before temperature scaling) of the student in {output} and of its teacher.", "",
             table(["", "val acc", "NLL", "ECE"], rows), ""]
    if kept is None:
        lines.append("The ensemble does not beat its mean member on val: there is no gain to keep.")
    else:
        lines.append(f"The student keeps {kept:.0%} of the ensemble's accuracy gain over the mean member "
                     f"({v['ensemble']['accuracy'] - v['mean_member']['accuracy']:+.4f}).")
    after = summary["val_after_temperature"]
    if after["student"] and after["ensemble"]:
        lines.append(f"Scaled by their own temperatures (student T = {after['student']['temperature']:.2f}, "
                     f"ensemble T = {after['ensemble']['temperature']:.2f}; cross-fitted on val): NLL "
                     f"{after['student']['nll']:.4f} vs {after['ensemble']['nll']:.4f}, ECE "
                     f"{after['student']['ece']:.4f} vs {after['ensemble']['ece']:.4f}.")
    p, g = summary["params"], summary["gflops_per_image"]
    lines += ["", table(["", "parameters", "GFLOPs / image", "images/s"], [
        ["student", f"{p['student']:,}", f"{g['student']:.3f}", _speed(summary, "student")],
        ["ensemble", f"{p['ensemble']:,}", f"{g['ensemble']:.3f}", _speed(summary, "ensemble")]])]
    speed = summary["inference"]
    if speed:
        lines.append(f"\nimages/s: {speed['batch']} val images a batch, {speed['device']}, {speed['threads']} "
                     f"thread(s), both measured in the same process, one after the other.")
    return "\n".join(lines) + "\n"


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _cells(s: dict) -> list:
    return [f"{s['accuracy']:.4f}", f"{s['nll']:.4f}", f"{s['ece']:.4f}"]


def _speed(summary: dict, who: str) -> str:
    speed = summary["inference"]
    return f"{speed[who]:.1f}" if speed else "-"


def total_params(report: dict, archs: Sequence[str]) -> int:
    """The parameters of members of ``archs`` (one entry per member), from their run's report.json,
    which counted them when it trained (``params``: its one architecture's, or ``by_arch``)."""
    params = report["params"]
    by_arch = params.get("by_arch") or {archs[0]: params}
    return sum(int(by_arch[a]["total"]) for a in archs)


def gflops_per_image(arch: str, num_classes: int, image_size: int) -> float:
    """One forward pass of ``arch`` on one S x S image, in GFLOPs (a multiply-add is 2), counted
    by torch on the meta device: no weights allocated, nothing computed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ensemble.models import make_member_model

    with torch.device("meta"):
        model = make_member_model(arch, num_classes, None, "none").eval()
        x = torch.empty(1, 3, image_size, image_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    return counter.get_total_flops() / 1e9


def inference_speed(teacher: "object", student: "object", pixels: np.ndarray, *, repeats: int = 3) -> dict:
    """Images/s of the ensemble (every member, soft-voted) and of the student on the same batch
    of eval pixels (uint8 (B, S, S, 3)), in this process, on CUDA if it has one, else CPU. The best
    of ``repeats`` timed passes after one untimed pass (which allocates and warms caches)."""
    import torch

    from ensemble.engine import eval_models, vote_member_probabilities

    from ensemble.engine import resolve_precision
    from ensemble.gpu_memory import inference_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for who, finished in (("ensemble", teacher), ("student", student)):  # on a GPU: a batch both fit (fewer images)
        bf16 = resolve_precision(finished.config.precision, device) is torch.bfloat16
        fits = inference_batch(device, finished.archs, len(finished.classes), finished.config.image_size,
                               finished.config.tta, bf16, who=f"the timing pass ({who})", batch=len(pixels),
                               batch_flag="its batch of", share=1.0, share_flag="", log=log.info)
        pixels = pixels[:fits] if fits is not None else pixels
    images = torch.from_numpy(pixels)
    out = {"batch": int(len(pixels)), "device": str(device), "threads": torch.get_num_threads()}
    for who, finished in (("ensemble", teacher), ("student", student)):
        models = eval_models(finished.archs, len(finished.classes), finished.states, device)
        seconds = []
        for k in range(repeats + 1):
            start = time.perf_counter()
            vote_member_probabilities(models, images, tta=finished.config.tta, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k:
                seconds.append(time.perf_counter() - start)
        out[who] = len(pixels) / min(seconds)
        del models
    out["ratio"] = out["student"] / out["ensemble"]
    return out


def val_pixels(index, cfg: EnsembleConfig, n: int) -> np.ndarray:
    """The first ``n`` readable val images' eval pixels (uint8 (k, S, S, 3), k <= n), as predict
    decodes them. ``index`` is the unchecked one: a file the run skipped (unreadable, too large) is
    skipped here too, and at most 4 x ``n`` files are tried."""
    from ensemble.config import cache_side
    from ensemble.pixels import load_eval_pixels

    pixels, side = [], cache_side(cfg)
    for path in index.val.column("path").to_pylist()[:4 * n]:
        try:
            pixels.append(load_eval_pixels(path, image_size=cfg.image_size, resize=cfg.eval_resize, side=side))
        except Exception:  # noqa: BLE001 - PIL raises many types for bad files; the run skipped it too
            continue
        if len(pixels) == n:
            break
    return np.stack(pixels) if pixels else np.zeros((0, cfg.image_size, cfg.image_size, 3), np.uint8)


# ---------------------------------------------------------------- the command


def distill(run: str, output: str, flags: dict, *, temperature: float, alpha: float, fresh: bool = False,
            speed_images: int = 16) -> dict:
    """Train the student of ``run`` into ``output``; write distill.json and distill.md; return the summary."""
    from ensemble.driver import data_index, run as run_pipeline
    from ensemble.run_folder import REPORT_SHA256, _read_report, check_output, check_outside, load_run
    from ensemble.report import write_json
    from ensemble.run_lock import RunLock

    temperature, alpha = check_kd("kd_temperature", temperature), check_kd("kd_alpha", alpha)
    teacher = load_run(run)  # an unfinished or altered run is one line here
    teacher_report = _read_report(run)
    try:
        sha = storage.read_bytes(storage.join(run, REPORT_SHA256)).decode().split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        sha = None
    if teacher_report is None or sha is None:
        raise RunError(f"--run {run}: no report.json with its sha256; rerun the driver with --output {run} "
                       f"to finish the run first")
    checked = check_output(output)
    check_outside(run, output)
    cfg = student_config(teacher.config, flags, output)
    index = data_index(cfg)  # the teacher's split, whatever the student's --seed
    if list(index.classes) != teacher.classes:
        raise ConfigError(f"--run {run}: its data {cfg.data} now has classes {list(index.classes)[:5]}..., not the "
                          f"{len(teacher.classes)} the run trained on; restore the data the run used")

    # the student's folder is locked from its run's first write to distill.json (run_lock.py)
    with RunLock(checked) as lock:
        spec = Distillation(run=run, temperature=temperature, alpha=alpha, report_sha256=sha)
        report = run_pipeline(cfg, fresh=fresh, distillation=spec, lock=lock)

        student = load_run(output)
        # per architecture, once: the ensemble's members share a few (the study's: one, nine times)
        gflops = {a: gflops_per_image(a, len(teacher.classes), cfg.image_size) for a in {*teacher.archs, cfg.arch}}
        speed = None
        if speed_images:
            log.info("timing inference: the ensemble's %d members, then the student, on %d val images",
                     len(teacher.states), min(speed_images, index.val.num_rows))
            pixels = val_pixels(index, cfg, speed_images)
            from ensemble.gpu_memory import GpuMemoryError

            try:
                speed = inference_speed(teacher, student, pixels) if len(pixels) else None
            except GpuMemoryError as exc:  # the student is trained and kept: the timing is left out, said in a line
                log.warning("no inference timing: %s", exc)
        summary = distill_summary(teacher_report, report, teacher_params=total_params(teacher_report, teacher.archs),
                                  student_params=total_params(report, [cfg.arch]),
                                  teacher_gflops=sum(gflops[a] for a in teacher.archs), student_gflops=gflops[cfg.arch],
                                  speed=speed)
        summary = {"run": run, "output": output, "arch": cfg.arch, "teacher_arch": teacher.config.arch,
                   "kd_temperature": temperature, "kd_alpha": alpha, "teacher_targets": "soft vote, eval view, once",
                   **summary}
        write_json(storage.join(output, STUDENT_FILES[1]), summary)
        storage.write_text(storage.join(output, STUDENT_FILES[2]),
                           summary_markdown(summary, run=run, output=output, arch=cfg.arch,
                                            teacher_arch=teacher.config.arch))
    v = summary["val"]
    kept = "n/a" if summary["gain_kept"] is None else f"{summary['gain_kept']:.0%}"
    print(f"student val acc {v['student']['accuracy']:.4f} vs ensemble {v['ensemble']['accuracy']:.4f}, mean member "
          f"{v['mean_member']['accuracy']:.4f}: keeps {kept} of the ensemble's gain at "
          f"{summary['gflops_per_image']['student'] / summary['gflops_per_image']['ensemble']:.3f} of its FLOPs; "
          f"{output}/distill.md")
    return summary


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="python -m ensemble.distill", argument_default=argparse.SUPPRESS,
        description="Train one student on a finished run's soft vote (knowledge distillation). Flags default "
                    "to the run's settings; the output is a one-member run predict, serve and export take.",
        examples=("python -m ensemble.distill --run runs/exp1 --output runs/exp1-student",
                  "python -m ensemble.distill --run runs/exp1 --output runs/exp1-r18 --arch resnet18 --epochs 10"))
    p.add_argument("--run", required=True, help="the --output folder of a finished ensemble.driver run (local or s3://)")
    p.add_argument("--output", required=True, help="the student's run folder (outside the run's)")
    p.add_argument("--kd-temperature", type=float, default=KD_DEFAULTS["kd_temperature"],
                   help="T: the teacher's and the student's distributions are softened at T; the soft loss is "
                        "scaled by T^2 (from 1 to 20)")
    p.add_argument("--kd-alpha", type=float, default=KD_DEFAULTS["kd_alpha"],
                   help="weight of the cross-entropy on the labels, added to the soft loss (0: the teacher only; "
                        "up to 10)")
    p.add_argument("--arch", help=f"the student's architecture, one of {', '.join(ARCHS)} (default: the run's)")
    p.add_argument("--weights", help="none, a torchvision weights name or a state-dict file (default: the run's)")
    p.add_argument("--freeze", help=f"one of {', '.join(FREEZE_STAGES)} (default: the run's)")
    p.add_argument("--freeze-stem", action="store_true", help="also freeze the stem")
    p.add_argument("--epochs", type=int, help="epochs (default: the run's)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the run's)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: the run's)")
    p.add_argument("--augment", help=f"{' | '.join(AUGMENTS)} (default: the run's)")
    p.add_argument("--precision", help="auto | bf16 | fp32 (default: the run's)")
    p.add_argument("--seed", type=int, help="the student's seed (default: the run's)")
    p.add_argument("--gpus-per-member", type=float, help="the student's GPU share, as for the driver")
    p.add_argument("--cpus-per-member", type=float, help="the student's CPUs, as for the driver")
    p.add_argument("--infer-actors", type=int, help="voter pool size (the teacher's vote, the student's)")
    p.add_argument("--infer-batch-size", type=int, help="images per vote batch")
    p.add_argument("--gpus-per-infer-actor", type=float, help="as for the driver")
    p.add_argument("--cpus-per-infer-actor", type=float, help="as for the driver")
    p.add_argument("--cache-share", type=float, help="as for the driver")
    p.add_argument("--cache-tier", help=f"{' | '.join(CACHE_TIERS)}, as for the driver")
    p.add_argument("--stall-timeout", type=float, help="as for the driver")
    p.add_argument("--address", help="Ray cluster address, as for the driver")
    p.add_argument("--strict", action="store_true", help="stop on any unreadable image")
    p.add_argument("--fresh", action="store_true", help="discard an earlier student in --output")
    p.add_argument("--speed-images", type=int, default=16,
                   help="val images to time the student's and the ensemble's inference on (0: skip; up to 1024)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stop_on_sigterm()  # as Ctrl-C: the lock released, temporary files removed, then one line
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = parse_command(_parser(), argv)
    if isinstance(parsed, int):  # a bad flag: its one line is printed
        return parsed
    args = vars(parsed)
    run, output = args.pop("run"), args.pop("output")
    temperature, alpha = args.pop("kd_temperature"), args.pop("kd_alpha")
    fresh, speed_images = args.pop("fresh", False), args.pop("speed_images")
    again = " ".join(["python -m ensemble.distill", *[a for a in argv if a != "--fresh"]])

    def go() -> int:
        if not 0 <= speed_images <= 1024:
            raise ConfigError(f"--speed-images {speed_images}: must be from 0 to 1024")
        distill(run, output, args, temperature=temperature, alpha=alpha, fresh=fresh, speed_images=speed_images)
        return 0

    return run_cli(go, interrupted=f"interrupted: the student's finished epochs are kept. To resume, run the same "
                                   f"command: {again}")


if __name__ == "__main__":
    exit_process(main())
