"""ONNX Runtime on CPU against the package's torch path, on one finished run, measured side by side.

    .venv/bin/python benchmarks/export.py --run runs/exp1
    .venv/bin/python benchmarks/export.py --run runs/exp1 --members selected --batches 1,64 --threads 2

- onnx: the run exported by ``ensemble.export.export_run`` (to a temporary folder, or ``--onnx``
  an existing file of that run), one ONNX Runtime CPU session with ``--threads`` intra-op threads:
  pixels in, the vote's probabilities and label out.
- torch: what predict and serve run per batch, ``engine.vote_member_probabilities`` on the same
  members (the run's TTA) with torch at ``--threads`` threads, then ``scores.vote.vote_outputs``
  (the vote and the temperature, numpy): the same work as the graph.
- Both get the same uint8 batch: the run's val images through the eval geometry (repeated to fill
  the batch), or seeded random pixels where they cannot be read. Per batch size, after 2 warm-up
  calls each, the two alternate in 4 blocks of ``--repeats`` / 4 calls (blocks, not single calls:
  each runtime's idle threads spin for a while after a call, which would slow the other's next
  call); images/s = batch / median time of a call. ratio = onnx / torch. Decoding is outside both.
  On a machine that other work keeps busy, torch's threads wait on each other at every layer:
  run it on a quiet machine (load average below 1) or it measures the machine, not the runtimes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROUNDS = 4  # blocks of each, alternating
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run's --output folder")
    p.add_argument("--members", default="all", help="all (default) or selected, as ensemble.export")
    p.add_argument("--onnx", help="an existing export of this run (default: export it to a temporary folder)")
    p.add_argument("--batches", default="1,64", help="batch sizes, comma-separated (default 1,64)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each per batch size (default 20)")
    p.add_argument("--json", help="also write every number to this file")
    return p.parse_args(argv)


def _timed(fn, times: list) -> None:
    """Call ``fn`` once; append its seconds to ``times``."""
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)


def main(argv=None) -> int:
    import onnxruntime as ort
    import torch

    from ensemble import export
    from ensemble.engine import eval_models, vote_member_probabilities
    from ensemble.run_folder import load_run
    from ensemble.scores.vote import vote_outputs

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    finished = load_run(args.run, args.members)
    cfg = finished.config
    result = {"run": args.run, "members": finished.members, "arch": cfg.arch, "image_size": cfg.image_size,
              "tta": cfg.tta, "threads": args.threads, "repeats": args.repeats, "batches": {},
              "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__}}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as work:
        path = args.onnx
        if path is None:
            path = os.path.join(work, "run.onnx")
            start = time.perf_counter()
            written = export.export_run(args.run, path, members=args.members)
            result["export_s"] = time.perf_counter() - start
            result["onnx_bytes"] = sum(written["bytes"].values())
            print(f"exported in {result['export_s']:.1f} s: {export.summary_line(written)}")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        models = eval_models(finished.archs, len(finished.classes), finished.states, torch.device("cpu"))

        def torch_path(pixels):
            with torch.no_grad():
                member_probs = vote_member_probabilities(models, torch.from_numpy(pixels), None, cfg.tta).numpy()
            return vote_outputs(member_probs, cfg.vote, finished.temperature, finished.weights)["probs"]

        def onnx_path(pixels):
            return session.run(None, {export.INPUT: pixels})[0]

        for batch in [int(b) for b in args.batches.split(",")]:
            images, what = export.parity_pixels(args.run, finished, batch)
            pixels = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))  # repeated to fill
            diff = float(np.abs(onnx_path(pixels) - torch_path(pixels)).max())
            for _ in range(2):
                onnx_path(pixels), torch_path(pixels)
            times = {"torch": [], "onnx": []}
            for _ in range(ROUNDS):  # in blocks: each runtime's threads may spin a while after a call
                for _ in range(max(1, args.repeats // ROUNDS)):
                    _timed(lambda: torch_path(pixels), times["torch"])
                for _ in range(max(1, args.repeats // ROUNDS)):
                    _timed(lambda: onnx_path(pixels), times["onnx"])
            rates = {k: batch / float(np.median(v)) for k, v in times.items()}
            result["batches"][batch] = {"images": what, "torch_images_per_s": rates["torch"],
                                        "onnx_images_per_s": rates["onnx"], "ratio": rates["onnx"] / rates["torch"],
                                        "max_abs_diff": diff}
            print(f"batch {batch:4d} ({what}): torch {rates['torch']:9.1f} img/s   onnxruntime "
                  f"{rates['onnx']:9.1f} img/s   max abs diff {diff:.1e}")
            print(f"ratio onnx/torch (batch {batch}) {rates['onnx'] / rates['torch']:.2f}")
    result["load_average_1min"] = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {result['load_average_1min']:.2f} on {os.cpu_count()} cores")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
