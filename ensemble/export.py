"""A finished run's ensemble as one ONNX file: pixels in, the vote's probabilities out.

    python -m ensemble.export --run runs/exp1 --output exp1.onnx
    python -m ensemble.export --run runs/exp1 --output exp1-selected.onnx --members selected

The graph takes what the run's eval geometry makes of images, uint8 (N, S, S, 3) with N free
(``pixels.load_eval_pixels`` makes one image's), and does the rest as ``predict`` does: the cast
and ImageNet normalisation (``pixels.model_input``), every member, the run's TTA, the vote (the
mean of the members' softmaxes, or the selection's weights with ``--members selected``) and the
temperature of that vote (softmax(log(max(p, PROB_FLOOR)) / T), ``calibration.scale_probs``).
Outputs: ``probabilities`` (N, classes) float32, what probabilities.parquet holds, and ``label``
(N,) int64, what predictions.csv says: the vote's top class, or under ``--vote hard`` the
members' majority (ties to the larger summed probability, ``vote.hard_vote``), whose
probabilities are the soft vote's, as the run reports them. The file's metadata records the
classes, the eval geometry and the vote.

Exported with torch's TorchScript-based exporter (``dynamo=False``): on a 3-member resnet18 it
takes ~1-3 s where the torch.export-based one took ~10-14 s, and needs neither onnxscript nor
onnx_ir; the two files agreed to 1e-7. Written in a temporary folder beside ``--output``, checked
with ONNX Runtime against the members run in torch on a few of the run's val images, then renamed:
a failure leaves nothing behind. Weights past EXTERNAL_DATA_OVER bytes (protobuf's 2 GiB limit on
one file; the study's 9 ResNeXt-101 hold ~3 GB) go to ``OUTPUT.data`` beside it, which ONNX
Runtime reads from the same folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ensemble import storage
from ensemble.config import ConfigError, cache_side
from ensemble.errors import (CommandParser, EnsembleError, StorageError, UserError, parse_command, run_cli,
                             stop_on_sigterm)
from ensemble.run_folder import MEMBER_CHOICES, FinishedRun, load_run

log = logging.getLogger("ensemble.export")

INPUT = "pixels"                        # uint8 (N, S, S, 3)
OUTPUTS = ("probabilities", "label")    # float32 (N, classes), int64 (N,)
OPSET = 18                              # ONNX Runtime 1.14 and later run it
# Weights (bytes) past which they go to an external data file: protobuf refuses a message over
# 2 GiB, and the graph itself needs room (~1 MB for 9 ResNeXt-101).
EXTERNAL_DATA_OVER = 2**31 - 2**27
PARITY_IMAGES = 4                       # of the run's val images, checked after writing
PARITY_TOLERANCE = 1e-4                 # max |ONNX Runtime - torch| allowed on any probability
INSTALL = "pip install 'ensemble[onnx]'"


class ParityError(EnsembleError):
    """The written file's probabilities differ from the members run in torch (exit 1; nothing kept)."""


class EnsembleGraph(nn.Module):
    """The exported computation: uint8 pixels (N, S, S, 3) -> (probabilities (N, C), label (N,)).

    The same operations as ``pixels.model_input`` -> ``engine.vote_member_probabilities`` ->
    ``scores.vote.vote_outputs`` in float32 (numpy's vote runs in float64: ~1e-7 apart)."""

    def __init__(self, models: Sequence[nn.Module], *, rule: str, tta: str, temperature: float,
                 weights: Optional[Sequence[float]] = None):
        from ensemble.transforms import IMAGENET_MEAN, IMAGENET_STD

        super().__init__()
        self.members = nn.ModuleList(models)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.weighted = weights is not None
        if self.weighted:  # normalised in float64, as selection.weighted_vote divides by their sum
            w = np.asarray(weights, dtype=np.float64)
            self.register_buffer("weights", torch.tensor(w / w.sum(), dtype=torch.float32).view(-1, 1, 1))
        self.hard = rule == "hard" and not self.weighted  # a selection is labelled by its argmax
        self.hflip = tta == "hflip"
        self.temperature = float(temperature)

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(x), dim=1) for m in self.members])  # (members, N, C)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ensemble.scores.metrics import PROB_FLOOR

        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * (1.0 / 255)  # model_input's order of operations
        x = (x - self.mean) / self.std
        if self.hflip:  # each member once on the images and their mirrors: one copy of its weights in the file
            both = self.member_probs(torch.cat([x, torch.flip(x, dims=[3])]))  # (members, 2N, C)
            probs = both.unflatten(1, (2, -1)).mean(1)  # (image + mirror) / 2
        else:
            probs = self.member_probs(x)
        vote = (probs * self.weights).sum(0) if self.weighted else probs.mean(0)  # (N, C)
        scaled = torch.softmax(torch.log(vote.clamp_min(PROB_FLOOR)) / self.temperature, dim=1)
        if self.hard:  # vote.hard_vote: most top-1 votes, ties to the larger summed probability
            classes = torch.arange(probs.shape[2])
            votes = (probs.argmax(2).unsqueeze(2) == classes).to(torch.int64).sum(0)  # (N, C)
            tied = votes == votes.max(dim=1, keepdim=True).values
            label = probs.sum(0).masked_fill(~tied, -float("inf")).argmax(1)  # a scalar fill: no traced shape
        else:
            label = vote.argmax(1)
        return scaled, label


def check_onnx_output(run: str, output: str) -> str:
    """The --output path, refused in one line (ConfigError) before anything is loaded: not ``.onnx``,
    an object-store URI, inside the run's folder, a folder, or in a place that cannot be written."""
    from ensemble.run_folder import check_outside, check_writable_place

    if not output.endswith(".onnx"):
        raise ConfigError(f"--output {output}: name the file *.onnx (ONNX Runtime and others look for it)")
    if storage.is_uri(output):
        raise ConfigError(f"--output {output}: write it to a local path, then copy it where it goes")
    check_outside(run, output)
    if os.path.isdir(output):
        raise ConfigError(f"--output {output}: is a folder; name a file *.onnx")
    check_writable_place(output, folder=False)
    return output


def require_onnx() -> None:
    """UserError (one line, exit 2) when the onnx package is not installed."""
    if importlib.util.find_spec("onnx") is None:
        raise UserError(f"ensemble.export needs the onnx package, which is not installed: {INSTALL}")


def has_onnxruntime() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


#: How long the parity check looks for readable images of the run (data moved, a bucket that
#: does not answer), and how many it tries, before it checks on random pixels instead.
PARITY_SEARCH_S = 30.0
PARITY_TRIES = 16


def parity_pixels(run: str, finished: FinishedRun, n: int = PARITY_IMAGES) -> tuple[np.ndarray, str]:
    """(uint8 (n, S, S, 3), what they are): the first ``n`` readable val images the run recorded
    (inputs.parquet; train images if it has no val rows), decoded as predict decodes them; seeded
    random pixels where none can be read (a run whose data moved). At most ``PARITY_TRIES`` files
    and ``PARITY_SEARCH_S`` seconds are spent looking; a local path that is not a regular file (a
    FIFO, a device) is never opened."""
    import pyarrow.parquet as pq

    from ensemble.pixels import load_eval_pixels
    from ensemble.run_folder import INPUTS_FILE

    cfg = finished.config
    pixels, split = [], "val"
    try:
        inputs = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(run, INPUTS_FILE)))).to_pydict()
        rows = [p for s, p in zip(inputs["split"], inputs["path"]) if s == "val"]
        if not rows:
            rows, split = list(inputs["path"]), "train"
    except (OSError, ValueError, KeyError):  # a run from before inputs.parquet, or a damaged one
        rows = []
    deadline = time.monotonic() + PARITY_SEARCH_S
    for path in rows[:PARITY_TRIES]:
        if time.monotonic() > deadline:
            break
        try:
            if storage.is_local(path) and not stat.S_ISREG(os.stat(path).st_mode):
                continue
            pixels.append(load_eval_pixels(path, image_size=cfg.image_size, resize=cfg.eval_resize,
                                           side=cache_side(cfg)))
        except (OSError, ValueError):  # moved, unreadable, too large
            continue
        if len(pixels) == n:
            break
    if pixels:
        return np.stack(pixels), f"{len(pixels)} {split} image(s)"
    shape = (n, cfg.image_size, cfg.image_size, 3)
    return np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8), \
        f"{n} random images (the run's images are not readable here)"


def torch_vote(finished: FinishedRun, models: Sequence[nn.Module], pixels: np.ndarray) -> dict:
    """What predict says about ``pixels`` (uint8 (n, S, S, 3)): the members in torch
    (``vote_member_probabilities``, the run's TTA), voted by ``vote_outputs`` ("probs", "label")."""
    from ensemble.engine import vote_member_probabilities
    from ensemble.scores.vote import vote_outputs

    cfg = finished.config
    member_probs = vote_member_probabilities(list(models), torch.from_numpy(pixels), None, cfg.tta,
                                             device=torch.device("cpu")).numpy()
    return vote_outputs(member_probs, cfg.vote, finished.temperature, finished.weights)


def metadata(finished: FinishedRun, run: str) -> dict:
    """The file's metadata_props (strings): what a client needs to feed it and read it."""
    cfg = finished.config
    weights = finished.weights or [1 / len(finished.members)] * len(finished.members)
    return {"run": os.path.basename(os.path.normpath(run.split("://", 1)[-1])), "arch": cfg.arch,
            "classes": json.dumps(finished.classes), "image_size": str(cfg.image_size),
            "eval_resize": cfg.eval_resize, "decode_side": str(cache_side(cfg)), "tta": cfg.tta,
            "vote": cfg.vote if finished.weights is None else "weighted soft",
            "members": json.dumps(finished.members), "weights": json.dumps(weights),
            "temperature": repr(finished.temperature), "input": f"{INPUT}: uint8 (N, {cfg.image_size}, "
            f"{cfg.image_size}, 3), ensemble.pixels.load_eval_pixels of each image"}


def export_run(run: str, output: str, *, members: str = "all", external_data_over: int = EXTERNAL_DATA_OVER,
               parity_images: int = PARITY_IMAGES) -> dict:
    """Write the run's ensemble (``members``: all, or the report's selection, weighted) to ``output``
    as one ONNX file (+ ``output.data`` past ``external_data_over`` bytes of weights), check it with
    ONNX Runtime where installed, and return what was written and checked."""
    from ensemble.run_lock import RunLock

    if members not in MEMBER_CHOICES:
        raise ConfigError(f"--members {members}: choose {' or '.join(MEMBER_CHOICES)}")
    check_onnx_output(run, output)
    require_onnx()
    # one export writes this file at a time (two would pair one's graph with the other's weights)
    with RunLock(os.path.dirname(os.path.abspath(output)), name=f".{os.path.basename(output)}.lock"):
        return _export_run(run, output, members=members, external_data_over=external_data_over,
                           parity_images=parity_images)


def _export_run(run: str, output: str, *, members: str, external_data_over: int, parity_images: int) -> dict:
    from ensemble.engine import eval_models

    started = time.time()
    finished = load_run(run, members)  # unfinished or altered: one line (RunError, ConfigError)
    cfg = finished.config
    weight_bytes = sum(t.numel() * t.element_size() for state in finished.states for t in state.values()
                       if torch.is_floating_point(t))
    external = weight_bytes > external_data_over
    models = eval_models(finished.archs, len(finished.classes), finished.states, torch.device("cpu"))
    finished = dataclasses.replace(finished, states=[])  # the models hold the weights now
    graph = EnsembleGraph(models, rule=cfg.vote, tta=cfg.tta, temperature=finished.temperature,
                          weights=finished.weights).eval()
    pixels, what = parity_pixels(run, finished, parity_images)
    with torch.no_grad():
        expected = torch_vote(finished, models, pixels)  # before the file exists: its own path, not the graph

    name = os.path.basename(output)
    parent = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(parent, exist_ok=True)
        work = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
    except OSError as exc:
        raise StorageError(f"--output {output}: cannot write beside it ({exc.__class__.__name__}: "
                           f"{exc.strerror or exc})") from None
    try:
        staged = os.path.join(work, name)
        try:
            traced = _trace(graph, pixels, os.path.join(work, "traced"))
            del graph, models  # the weights live in the traced file now: not twice in memory
            _save(traced, staged, metadata(finished, run), external_data=name + ".data" if external else None)
        except OSError as exc:
            raise StorageError(f"--output {output}: writing it failed ({exc.__class__.__name__}: {exc}); "
                               f"nothing was kept") from None
        diff = None
        if has_onnxruntime():
            try:
                got = run_onnx(staged, pixels)[0]
            except Exception as exc:  # onnxruntime's own errors share no base class of their own
                raise ParityError(f"ONNX Runtime could not run the exported graph on {what} ("
                                  f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}); nothing was "
                                  f"written") from None
            diff = float(np.abs(got - expected["probs"]).max())
            if not diff <= PARITY_TOLERANCE:
                raise ParityError(f"the exported graph's probabilities differ from the members run in torch by up to "
                                  f"{diff:.2e} on {what} (allowed {PARITY_TOLERANCE:g}); nothing was written")
        # An earlier graph goes first, the new .onnx last: a crash in between leaves no .onnx (export
        # again), never an earlier graph beside the new weights (same layout: wrong weights, silently).
        if external and os.path.lexists(output):
            os.unlink(output)
            storage.fsync_local(parent)
        files = [(staged + ".data", output + ".data")] if external else []
        for src, dst in files + [(staged, output)]:
            storage.fsync_local(src)
            os.replace(src, dst)
        storage.fsync_local(parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sizes = {path: os.path.getsize(path) for path in [output] + ([output + ".data"] if external else [])}
    return {"output": output, "bytes": sizes, "external_data": output + ".data" if external else None,
            "members": finished.members, "member_choice": members, "n_members": cfg.members,
            "weights": finished.weights, "temperature": finished.temperature, "vote": cfg.vote, "tta": cfg.tta,
            "parity_max_abs_diff": diff, "parity_on": what, "seconds": time.time() - started}


def _trace(graph: nn.Module, example: np.ndarray, folder: str) -> str:
    """``graph`` traced on (two of) ``example``'s images with the batch dimension free, as
    ``folder``/graph.onnx (torch writes weights past 2 GiB as files beside it); its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "graph.onnx")
    example = torch.from_numpy(np.resize(example, (2, *example.shape[1:])))  # a batch of 1 could freeze it
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is the legacy one, and tracing warns about
        # Python values it freezes (the member count, the class range): both expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), path, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={INPUT: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}})
    return path


def _save(traced: str, path: str, props: dict, external_data: Optional[str]) -> None:
    """The traced file with ``props`` as its metadata, saved as ``path``: one file, or with every
    weight in ``external_data`` (a name beside ``path``). The traced file's folder is removed."""
    import onnx

    model = onnx.load(traced)  # with any weights torch wrote beside it
    shutil.rmtree(os.path.dirname(traced), ignore_errors=True)
    onnx.helper.set_model_props(model, props)
    if external_data:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data, size_threshold=1024)
    else:
        onnx.save_model(model, path)


def run_onnx(path: str, pixels: np.ndarray, threads: Optional[int] = None) -> list:
    """The file's outputs for uint8 ``pixels`` (N, S, S, 3), on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(pixels, dtype=np.uint8)})


def _megabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def summary_line(result: dict) -> str:
    """The one line ``python -m ensemble.export`` prints after writing."""
    used = f"{len(result['members'])} member{'s' * (len(result['members']) != 1)}"
    if result["weights"] is not None:
        used = f"{len(result['members'])} of {result['n_members']} members (the report's selection, weighted)"
    files = " + ".join(f"{path} ({_megabytes(size)})" for path, size in result["bytes"].items())
    vote = "weighted soft" if result["weights"] is not None else result["vote"]
    tta = ", hflip TTA" if result["tta"] == "hflip" else ""
    if result["parity_max_abs_diff"] is None:
        parity = f"parity not checked: onnxruntime is not installed ({INSTALL})"
    else:
        parity = (f"ONNX Runtime vs the members in torch on {result['parity_on']}: max abs diff "
                  f"{result['parity_max_abs_diff']:.1e} (allowed {PARITY_TOLERANCE:g})")
    return f"wrote {files}: {used}, {vote} vote{tta}, T = {result['temperature']:.4g}; {parity}"


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m ensemble.export",
                      description="Write a finished run's ensemble as one ONNX file (uint8 pixels in, "
                                  "the vote's probabilities and label out).", examples=(
                          "python -m ensemble.export --run runs/exp1 --output exp1.onnx",
                          "python -m ensemble.export --run runs/exp1 --output exp1-selected.onnx --members selected"))
    p.add_argument("--run", required=True, help="the --output folder of a finished ensemble.driver run")
    p.add_argument("--output", required=True, help="the file to write, *.onnx (outside the run's folder)")
    p.add_argument("--members", default="all",
                   help="all (default), or selected: the Caruana selection the run's report recorded, as a "
                        "weighted soft vote (members of weight 0 are left out)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stop_on_sigterm()  # as Ctrl-C: the lock released, temporary files removed, then one line
    args = parse_command(_parser(), argv)
    if isinstance(args, int):  # a bad flag: its one line is printed
        return args

    def export() -> int:
        print(summary_line(export_run(args.run, args.output, members=args.members)))
        return 0

    return run_cli(export, interrupted="interrupted: nothing was written (the file appears only when complete)")


if __name__ == "__main__":
    from ensemble.errors import exit_process

    exit_process(main())
