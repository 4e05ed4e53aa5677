"""Section 2: the soft-vote stage against its compute bound and against voting member by member.

- stage: ``ensemble.vote_stage.soft_vote_stage`` (Ray Data actor pool; each batch decoded once and
  run through all N members), end to end, pool start-up included.
- compute bound: the same N members' forward passes on already-decoded tensors in this process,
  with the stage's thread count: n_images / sum of per-member times.
- naive: each member makes its own pass over the data (the same stage with one member, N times),
  decoding every image N times.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch


def vote_table(paths: list[str]):
    import pyarrow as pa

    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return pa.table({"id": pa.array(np.arange(len(paths), dtype=np.int64)), "path": pa.array(paths, pa.string()),
                     "image_name": pa.array(names, pa.string()),
                     "label": pa.array(np.full(len(paths), -1, dtype=np.int64))})


def load_states(output: str, members: int) -> list[dict]:
    """The members' best weights as the pipeline saved them (OUTPUT/members/member-i/model.pt)."""
    return [torch.load(os.path.join(output, "members", f"member-{i}", "model.pt"), map_location="cpu",
                       weights_only=True) for i in range(members)]


def _models(cfg, states: list[dict], num_classes: int):
    from ensemble.models import make_member_model

    models = []
    for state in states:
        model = make_member_model(cfg.arch, num_classes, None, "none")
        model.load_state_dict(state)
        models.append(model.eval())
    return models


def compute_bound(cfg, states: list[dict], paths: list[str], num_classes: int) -> dict:
    """Forward passes only, on tensors decoded beforehand: n / sum over members of their time."""
    from ensemble.data import decode_batch
    from ensemble.pixels import model_input

    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.cpus_per_infer_actor)))  # as SoftVoter
    try:
        step = cfg.infer_batch_size
        batches = []
        for lo in range(0, len(paths), step):
            chunk = np.array(paths[lo:lo + step], dtype=object)
            decoded = decode_batch({"id": np.arange(len(chunk)), "label": np.zeros(len(chunk), np.int64),
                                    "path": chunk}, image_size=cfg.image_size)
            batches.append(model_input(torch.from_numpy(decoded["image"]), torch.device("cpu")))
        per_member = []
        with torch.no_grad():
            for model in _models(cfg, states, num_classes):
                model(batches[0][:2])  # first call allocates; not part of steady state
                start = time.perf_counter()
                for images in batches:
                    torch.softmax(model(images).float(), dim=1)
                per_member.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads_before)
    return {"per_member_s": per_member, "images_per_s": len(paths) / sum(per_member)}


def _vote_probs(voted) -> np.ndarray:
    """(n, classes) soft vote from soft_vote_stage's result: its dict, or the (ids, names, labels, probs)
    tuple an older checkout of the package returns, so the benchmark also runs against one."""
    return voted["probs"] if isinstance(voted, dict) else voted[3]


class BatchClock:
    """Records when each batch of a Ray Dataset reaches this process (patches Dataset.iter_batches
    here, for the duration of a ``with`` block): the stage's steady rate, without its start-up."""

    def __enter__(self):
        from ray.data import Dataset

        self.times, self._original = [], Dataset.iter_batches
        original, times = self._original, self.times

        def timed(ds, *args, **kwargs):
            for batch in original(ds, *args, **kwargs):
                times.append((time.perf_counter(), len(next(iter(batch.values())))))
                yield batch

        Dataset.iter_batches = timed
        return self

    def __exit__(self, *exc):
        from ray.data import Dataset

        Dataset.iter_batches = self._original
        return False

    def steady_images_per_s(self) -> float:
        """Batch size / median time between arrivals, after the first batch: the rate once the pool
        is up. (The median, since Ray Data hands over the last batches together.) nan if < 3 batches."""
        if len(self.times) < 3:
            return float("nan")
        stamps = np.array([t for t, _ in self.times])
        sizes = np.array([n for _, n in self.times[1:]])
        return float(np.median(sizes) / max(np.median(np.diff(stamps)), 1e-9))


def run_voting(cfg, states: list[dict], paths: list[str], num_classes: int) -> dict:
    """Stage, naive and compute bound on the same files. Ray must be initialised."""
    import ray

    from ensemble.vote_stage import soft_vote_stage

    refs = [ray.put(s) for s in states]
    table = vote_table(paths)
    n = len(paths)
    result = {"images": n, "members": len(states)}

    start = time.perf_counter()
    with BatchClock() as clock:
        probs = _vote_probs(soft_vote_stage(cfg, table, weight_refs=refs, num_classes=num_classes, gpus=0.0))
    result["stage_s"] = time.perf_counter() - start
    result["stage_images_per_s"] = n / result["stage_s"]
    result["stage_first_batch_s"] = clock.times[0][0] - start if clock.times else float("nan")
    result["stage_batches"] = len(clock.times)
    result["stage_steady_images_per_s"] = clock.steady_images_per_s()

    bound = compute_bound(cfg, states, paths, num_classes)
    result["bound_per_member_s"] = bound["per_member_s"]
    result["bound_images_per_s"] = bound["images_per_s"]

    start = time.perf_counter()
    naive = [_vote_probs(soft_vote_stage(cfg, table, weight_refs=[ref], num_classes=num_classes, gpus=0.0))
             for ref in refs]
    result["naive_s"] = time.perf_counter() - start
    result["naive_images_per_s"] = n / result["naive_s"]
    # Same members, same images: the averaged single-member passes must equal the stage's vote.
    result["naive_vs_stage_max_abs_diff"] = float(np.abs(np.mean(naive, axis=0) - probs).max())
    return result
