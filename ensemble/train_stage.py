"""The training stage: start the member slots, hand each its members, wait, gather.

Map, then reduce: every member's ``fit`` is queued on its slot's actor at once, the driver
waits with ``ray.wait`` and keeps each member's best weights in the object store for the vote.
"""

from __future__ import annotations

import logging
import uuid


from ensemble.cluster import slot_members, slot_name
from ensemble.errors import EnsembleError, StorageError, worker_error
from ensemble.member_files import reusable_member
from ensemble.watch import stall_error

log = logging.getLogger("ensemble.driver")

MEMBER_RESTARTS = 3  # a member's process may die this often (preemption, OOM) before the run fails
WATCH_S = 5.0        # how often the driver looks at a run whose members are all still waiting to start


class MemberFailed(EnsembleError, RuntimeError):
    """A member died more often than Ray may restart it, or raised an error (a failure: exit 1)."""


def train_members(plan, *, seeds: list[int], train_table, val_table, gpus: float, window: int, resuming: bool,
                  vote_table=None):
    """Train every unfinished member on at most ``window`` trainer actors; wait with ray.wait; gather.

    ``plan``: the run's ``actors.MemberPlan`` (with the image cache, if any). ``train_table`` /
    ``val_table``: the splits' rows. Each actor (a slot) trains its members one after another, so
    a process starts once per slot, not once per member.
    Members an earlier run finished are loaded (hashes checked), not retrained; a damaged one is
    logged and trained again. A slot whose process dies is restarted by Ray; its member resumes
    from its last epoch checkpoint, and its later members follow. A member whose files cannot be
    written (StorageError) stops the run at once with that one line: the members still training
    are stopped too (their storage is the same; a full disk would fail their next checkpoint),
    and every finished member and committed epoch stays for the rerun to resume.
    ``vote_table``: rows every member scores with its best weights before its slot moves on (its
    share of the soft vote, while its model is loaded), or None.
    Returns ([member_files.MemberSummary] sorted by member, weight ObjectRefs in member order,
    ObjectRefs of the members' outputs on ``vote_table`` in member order: those an earlier run
    finished are voted by the slots too, after their own members; None for every member when
    there is no ``vote_table``, and for the loaded ones when no member is left to train).
    """
    import ray

    from ensemble.actors import MemberTrainer

    cfg, output = plan.config, plan.output
    summaries, weights, votes = {}, {}, {}
    queue, loaded = [], []
    for i in range(cfg.members):
        finished = reusable_member(output, i, plan.fingerprint) if resuming else None
        if finished is None:
            queue.append(i)
        else:
            loaded.append(i)
            summaries[i], weights[i], votes[i] = finished[0], ray.put(finished[1]), None
            log.info("member %d: finished earlier (val acc %.4f), loaded from %s", i, finished[0].val_acc, output)
    plan_ref, train_ref, val_ref = ray.put(plan), ray.put(train_table), ray.put(val_table)
    vote_ref = ray.put(vote_table) if vote_table is not None else None
    running: dict = {}   # summary ref -> (member, slot, weights ref, votes ref)
    actors, left, up = [], [], []  # per slot: the actor, its unfinished members and votes, its started() ref
    # Ray frees an actor's name only once it has processed the actor's death, which can lag a
    # ray.kill by seconds on a loaded cluster: a second run in the same process (a test, a
    # notebook) could find "ensemble-member-3" still taken. Each run names its trainers in a
    # namespace of its own.
    namespace = f"ensemble-run-{uuid.uuid4().hex[:12]}"
    try:
        slots = slot_members(queue, window)
        for members in slots:
            # Named after its members, so the dashboard's Actors view reads like the ensemble.
            actors.append(MemberTrainer.options(
                name=slot_name(members), namespace=namespace, num_cpus=cfg.cpus_per_member, num_gpus=gpus,
                max_restarts=MEMBER_RESTARTS, max_task_retries=MEMBER_RESTARTS,
            ).remote(cfg.cpus_per_member))
            left.append(len(members))
            up.append(actors[-1].started.remote())  # before its fits: done as soon as the actor runs
        for slot, members in enumerate(slots):
            for i in members:  # queued on the actor; it runs them in this order
                summary_ref, weights_ref, votes_ref = actors[slot].fit.options(
                    name=f"ensemble-member-{i}.fit").remote(i, seeds[i], plan_ref, train_ref, val_ref, vote_ref)
                running[summary_ref] = (i, slot, weights_ref, votes_ref if vote_ref is not None else None)
        voting: dict = {}  # votes ref -> (member, slot): members an earlier run finished, voted by the slots
        if vote_ref is not None and actors:
            for k, i in enumerate(loaded):
                slot = k % len(actors)  # after the slot's own members
                votes[i] = actors[slot].vote.options(name=f"ensemble-member-{i}.vote").remote(i, plan_ref, weights[i],
                                                                                               vote_ref)
                voting[votes[i]] = (i, slot)
                left[slot] += 1
        watch = StallWatch(cfg, gpus)
        while running or voting:
            done, _ = ray.wait([*running, *voting], num_returns=1, timeout=WATCH_S)
            if not done:
                watch.check([ref for slot, ref in enumerate(up) if left[slot]])
            for ref in done:
                if ref in voting:
                    i, slot = voting.pop(ref)
                    _gather(ref, i, output)  # a failed vote is one line too
                else:
                    i, slot, weights_ref, votes_ref = running.pop(ref)
                    summaries[i], weights[i], votes[i] = _gather(ref, i, output), weights_ref, votes_ref
                    log.info("member %d done: best val acc %.4f at epoch %d (%.0f s) [%d/%d]", i,
                             summaries[i].val_acc, summaries[i].best_epoch, summaries[i].seconds, len(summaries),
                             cfg.members)
                left[slot] -= 1
                if left[slot] == 0:
                    ray.kill(actors[slot])  # frees its resources; returned weights and votes stay in the object store
    finally:
        for slot, actor in enumerate(actors):  # on Ctrl-C or a failure: stop the others now
            if left[slot]:
                ray.kill(actor)
    order = sorted(summaries)
    return [summaries[i] for i in order], [weights[i] for i in order], [votes[i] for i in order]


class StallWatch:
    """Never a silent wait: when none of the run's unfinished slots has been able to start for
    ``cfg.stall_timeout`` seconds (the CPUs/GPUs they need are held by other work, or a node type
    an autoscaler was to add never came), stop with one line naming what they need and what is
    free. A slot that started counts as progress, so a slow but training run is never stopped."""

    def __init__(self, cfg, gpus: float):
        import time

        self.cfg, self.gpus, self.since = cfg, gpus, time.time()

    def check(self, started_refs: list) -> None:
        import time

        import ray

        ready, _ = ray.wait(started_refs, num_returns=len(started_refs), timeout=0)
        if ready or not started_refs:
            self.since = time.time()
            return
        waited = time.time() - self.since
        if waited < self.cfg.stall_timeout:
            if int(waited) % 60 < WATCH_S:
                log.info("waiting %.0f s for CPUs/GPUs to start any member (stops after --stall-timeout %g s)",
                         waited, self.cfg.stall_timeout)
            return
        raise stall_error(f"no member could start in {waited:.0f} s", "each needs {need}", self.cfg.cpus_per_member,
                          self.gpus, flags=[("cpus-per-member", "CPU", self.cfg.cpus_per_member),
                                            ("gpus-per-member", "GPU", self.gpus)],
                          then="then rerun the same command to resume")


def _gather(ref, member: int, output: str) -> dict:
    """A finished member's summary, or one line: a write that failed (StorageError: what, where,
    why), what the user can fix as it was raised, a dead member or any other error as MemberFailed."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        cause = worker_error(exc)  # an EnsembleError raised in the member keeps its class across ray.get
        if isinstance(cause, StorageError):
            raise StorageError(f"member {member}: {cause}; finished members and committed epochs are kept in "
                               f"{output}: once it can be written, rerun the same command to resume") from None
        if isinstance(cause, EnsembleError):
            raise cause from None
        if isinstance(exc, ray.exceptions.RayTaskError):  # the member raised: no restart happened
            what = exc.cause if isinstance(exc.cause, BaseException) else exc
            detail = str(what).strip().splitlines()
            raise MemberFailed(f"member {member} failed: {what.__class__.__name__}"
                               f"{': ' + detail[0][:200] if detail else ''}; finished members are saved in "
                               f"{output}: rerun the same command to resume") from exc
        raise MemberFailed(f"member {member} failed after {MEMBER_RESTARTS} restarts "
                           f"({exc.__class__.__name__}); finished members are saved in {output}: "
                           f"rerun the same command to resume") from exc
