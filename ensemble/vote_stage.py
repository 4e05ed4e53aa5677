"""The soft-vote stage: a Ray Data actor pool runs every member on each batch, decoded once."""

from __future__ import annotations

import itertools
import warnings
from typing import Optional

import numpy as np

from ensemble.config import EnsembleConfig
from ensemble.scores.vote import soft_vote

_VOTERS = itertools.count()


def voter_names():
    """Ray Data calls this for each pool actor it starts: ensemble-voter-0, -1, ... in the dashboard.
    Numbered per driver process, so a second run in it cannot meet a name still in use."""
    return lambda: {"name": f"ensemble-voter-{next(_VOTERS)}"}


def soft_vote_stage(cfg: EnsembleConfig, table, *, weight_refs: list, num_classes: int, gpus: float,
                    cache=None, archs: Optional[list] = None) -> dict:
    """Ray Data inference: an actor pool of SoftVoters over file rows (their pixels read from the
    run's image ``cache`` when the rows carry block/row, else decoded by the voters). ``archs``:
    each weight ref's architecture (default: the run's members', in order).

    Returns arrays sorted by row id: id, image_name, label, probs (n, classes) = soft vote,
    member_probs (n, members, classes).
    """
    import ray.data

    from ensemble.actors import SoftVoter, show_progress
    from ensemble.data import to_dataset
    from ensemble.config import cache_side
    from ensemble.watch import watched

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress()  # the vote's own bar (a dataset keeps the context it was made in)
    pool = max(1, min(cfg.infer_actors, -(-table.num_rows // cfg.infer_batch_size)))  # no more voters than batches
    archs = list(archs) if archs is not None else [cfg.arch_of(i) for i in range(len(weight_refs))]

    def batches():
        with warnings.catch_warnings():  # deprecated from Ray 2.60 (removal planned for 2.64); names the pool's actors
            warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
            ds = to_dataset(table, rows_per_block=cfg.infer_batch_size).map_batches(
                SoftVoter, batch_size=cfg.infer_batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=pool),  # each voter starts a process, loads every member
                num_cpus=cfg.cpus_per_infer_actor, num_gpus=gpus, ray_remote_args_fn=voter_names(),
                fn_constructor_kwargs={"arch": archs, "num_classes": num_classes, "weight_refs": weight_refs,
                                       "image_size": cfg.image_size, "threads": cfg.cpus_per_infer_actor,
                                       "tta": cfg.tta, "precision": cfg.precision, "resize": cfg.eval_resize,
                                       "side": cache_side(cfg), "cache": cache,
                                       "batch": cfg.infer_batch_size, "gpus": gpus})
        return ds.iter_batches(batch_size=None, batch_format="numpy")

    try:
        # Building the dataset runs Ray tasks too (block metadata): all of it is watched.
        parts = watched(batches, stall_timeout=cfg.stall_timeout, stalled=_stalled(cfg, gpus), name="ensemble-vote")
    finally:
        context.enable_progress_bars = False
    keys = ("id", "image_name", "label", "probs", "member_probs")
    out = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    order = np.argsort(out["id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def _stalled(cfg: EnsembleConfig, gpus: float):
    from ensemble.watch import stall_error

    def error(waited: float) -> Exception:
        return stall_error(f"the soft vote made no progress in {waited:.0f} s", "each voter needs {need}",
                           cfg.cpus_per_infer_actor, gpus,
                           flags=[("cpus-per-infer-actor", "CPU", cfg.cpus_per_infer_actor),
                                  ("gpus-per-infer-actor", "GPU", gpus)],
                           then="then rerun the same command (finished members are kept and not trained again)")
    return error


def stack_splits(tables: dict):
    """One table of several splits with ids offset so they stay unique; returns (table, id ranges)."""
    import pyarrow as pa

    parts, ranges, offset = [], {}, 0
    for name, table in tables.items():
        ids = table.column("id").to_numpy() + offset
        parts.append(table.set_column(0, "id", pa.array(ids)))
        ranges[name] = (offset, offset + table.num_rows)
        offset += table.num_rows
    return pa.concat_tables(parts), ranges




def vote_splits(cfg: EnsembleConfig, splits: dict, *, weight_refs: list, num_classes: int, gpus: float,
                cache=None, member_votes: Optional[list] = None, archs: Optional[list] = None) -> dict:
    """Every split through one pass of the voter pool: {name: arrays of that split}, each with
    id, image_name, label, probs (n, classes) and member_probs (members, n, classes).

    ``member_votes``: per member, an ObjectRef of its outputs on ``stack_splits(splits)``'s rows,
    computed by a trainer (``train_members``' third list). When every member has them, they are
    the vote and no process starts; otherwise the pool runs every member.
    """
    table, ranges = stack_splits(splits)
    if member_votes and all(ref is not None for ref in member_votes):
        voted = _members_votes(table, member_votes, num_classes)
    else:
        voted = soft_vote_stage(cfg, table, weight_refs=weight_refs, num_classes=num_classes, gpus=gpus, cache=cache,
                                archs=archs)
    out = {}
    for name, (lo, hi) in ranges.items():
        part = {k: v[lo:hi] for k, v in voted.items()}
        part["member_probs"] = np.ascontiguousarray(part["member_probs"].transpose(1, 0, 2))
        part["id"] = part["id"] - lo
        out[name] = part
    return out


def _members_votes(table, votes: list, num_classes: int) -> dict:
    """``soft_vote_stage``'s arrays (sorted by row id) from the members' own outputs on ``table``'s rows."""
    import ray

    order = np.argsort(table.column("id").to_numpy(), kind="stable")
    member_probs = np.empty((table.num_rows, len(votes), num_classes), np.float32)
    for i, probs in enumerate(ray.get(list(votes))):
        member_probs[:, i] = probs[order]
    return {"id": table.column("id").to_numpy()[order],
            "image_name": np.asarray(table.column("image_name").to_pylist(), dtype=object)[order],
            "label": table.column("label").to_numpy()[order],
            "probs": soft_vote(member_probs.transpose(1, 0, 2)).astype(np.float32), "member_probs": member_probs}
