"""A finished run in one process, answering images (plain torch and numpy, no Ray Serve): the
server's options, the request checks (upload size, ``k``) and the JSON answer. ``ensemble.serve``
wraps ``ServedRun`` in a Ray Serve deployment; tests and the load benchmark use it directly."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator, Optional, Sequence

import numpy as np

from ensemble import config, storage
from ensemble.config import ConfigError, check_choice, check_int, check_number
from ensemble.run_folder import MEMBER_CHOICES, FinishedRun, load_run

log = logging.getLogger("ensemble.serve")

MAX_K = 1000  # ceiling on the k query parameter (k is also capped at the number of classes)
UNHEALTHY_AFTER = 3  # failed batches in a row after which the replica's health check fails (Serve replaces it)
BATCH_HUNG_S = 120.0  # a batch still running after this long is hung: the health check fails too


@dataclass(frozen=True)
class ServeOptions:
    """What one served run needs; ``serve run ensemble.serve:app KEY=VALUE`` sets the same fields."""

    run: str                              # the --output folder of a finished ensemble.driver run
    members: str = "all"                  # all | selected (the report's Caruana selection, weighted)
    max_upload_mb: float = 20.0           # request bodies over this (MiB) get 413 before they are read
    max_megapixels: float = 40.0          # images that would decode to more pixels get 400 before decoding
    max_batch_size: int = 16              # requests the members run together at most
    batch_wait_s: float = 0.025           # how long a batch waits to fill; 0.01 left batches of ~1 on 2 cores
                                          # (a request's HTTP path takes longer than that; BENCHMARKS.md)
    max_queued_requests: int = 64         # requests waiting at Ray's proxy while the replica is full; more get 503
    body_timeout_s: float = 30.0          # a request body not in within this (s) gets 408 (20 MiB needs ~5.6 Mbit/s)
    request_timeout_s: float = 120.0      # a request the replica has not answered within this (s), body included,
                                          # gets 408, whatever Serve's proxy is set to (serve run sets none)
    max_uploads_per_client: int = 8       # bodies one client address may be sending at once; more get 429 at once
                                          # (slow senders from one address cannot hold every place in the replica)
    gpus: Optional[float] = None          # GPUs for the deployment; None: 0.5 where the cluster has GPUs, else 0
    cpus: Optional[float] = None          # CPUs (= torch threads); None: the run's cpus_per_infer_actor

    def __post_init__(self) -> None:
        check_choice(self, "members", MEMBER_CHOICES)
        for name, (low, high) in INT_RANGES.items():
            check_int(self, name, low=low, high=high)
        for name, (zero_ok, high) in NUMBER_RANGES.items():
            if getattr(self, name) is not None or name not in OPTIONAL:
                check_number(self, name, positive=not zero_ok, high=high)
        if self.gpus is not None:
            check_number(self, "gpus", positive=False)
            if self.gpus > 1:
                raise ConfigError(f"--gpus {self.gpus:g}: the deployment runs its members on one device; use 1 or less")

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    @classmethod
    def from_args(cls, args: dict) -> "ServeOptions":
        """From ``serve run``'s KEY=VALUE strings (or a dict of typed values)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        if "run" not in args:
            raise ConfigError("run=OUTPUT is required: the --output folder of a finished ensemble.driver run")
        values = {}
        for name, value in args.items():
            kind = {"max_batch_size": int, "max_queued_requests": int, "max_uploads_per_client": int, "run": str,
                    "members": str}.get(name, float)
            try:
                values[name] = None if value in (None, "", "auto") else kind(value)
            except ValueError:
                raise ConfigError(f"{name}={value}: expected {kind.__name__}") from None
        return cls(**values)


# Each numeric option's range, refused in one line naming the option and the bound (as the run's
# config refuses its own, config.INT_RANGES). Whole numbers: (low, high).
INT_RANGES = {
    "max_batch_size": (1, 1024),          # the replica takes 4 x this many requests at once
    "max_queued_requests": (1, 10_000),   # each may hold a body at Ray's proxy (README, "Limits")
    "max_uploads_per_client": (1, 4096),  # at most the replica's 4 x max_batch_size matter
}
# Numbers: (0 allowed, high); otherwise above 0.
NUMBER_RANGES = {
    "max_upload_mb": (False, 1024.0),
    "max_megapixels": (False, 178.0),     # PIL itself refuses images past ~179 megapixels
    "batch_wait_s": (True, 60.0),
    "body_timeout_s": (False, 3600.0),
    "request_timeout_s": (False, 3600.0),
    "cpus": (False, config.NUMBER_RANGES["cpus_per_infer_actor"][1]),  # as the run's voters
}
OPTIONAL = {f.name for f in fields(ServeOptions) if f.default is None}  # None = decided from the cluster
# python -m ensemble.serve --request-timeout-s: the app's request_timeout_s, and also the Serve
# instance's own (its proxy's, end to end: waiting in the queue too) where it starts Serve.
REQUEST_TIMEOUT_S = ServeOptions.request_timeout_s


def answers(member_probs, classes: Sequence[str], *, rule: str, temperature: float, weights=None,
            ks: Sequence[int]) -> list[dict]:
    """One JSON-ready answer per image from the members' probabilities (members, B, classes):
    the same vote, temperature, entropy and disagreement as predict's files (``scores.vote.vote_outputs``).
    ``ks`` (B,): how many top classes each request asked for."""
    from ensemble.scores.vote import vote_outputs

    member_probs = np.asarray(member_probs, dtype=np.float64)
    out = vote_outputs(member_probs, rule, temperature, weights)
    result = []
    for row, k in enumerate(ks):
        probs = out["probs"][row]
        top = np.argsort(-probs, kind="stable")[:min(k, len(classes))]  # ties: lower class index first
        result.append({"label": classes[int(out["label"][row])],
                       "top_k": [{"class": classes[int(c)], "probability": float(probs[c])} for c in top],
                       "probabilities": {c: float(p) for c, p in zip(classes, probs)},
                       "entropy": float(out["entropy"][row]),
                       "disagreement": float(out["disagreement"][row]),
                       "members": int(member_probs.shape[0])})
    return result


def parse_k(value: Optional[str]) -> int:
    """The ``k`` query parameter: an integer in 1..MAX_K (default 5); ValueError with one line."""
    if value is None:
        return 5
    try:
        k = int(value)
    except ValueError:
        raise ValueError(f"k={value}: expected an integer from 1 to {MAX_K}") from None
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={value}: expected an integer from 1 to {MAX_K}")
    return k


class UploadTooLarge(ValueError):
    """A request body over the upload limit (413)."""


class UploadTimedOut(ValueError):
    """A request body that did not arrive in full within the body timeout (408)."""


async def read_upload(request, max_bytes: int, timeout_s: Optional[float] = None) -> bytes:
    """The request body, refused (UploadTooLarge) once it passes ``max_bytes``: by its
    Content-Length before anything is read, else while it streams in (chunked uploads), so a
    request never holds more than ``max_bytes`` (plus one chunk) here. A body not in within
    ``timeout_s`` seconds in all (a client sending a byte now and then holds a place in the
    replica) raises UploadTimedOut."""
    declared = request.headers.get("content-length")
    limit = f"the limit is {max_bytes / 2**20:g} MiB (--max-upload-mb)"
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise UploadTooLarge(f"upload of {int(declared)} bytes; {limit}")

    async def body() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise UploadTooLarge(f"upload of more than {max_bytes} bytes; {limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(body(), timeout_s)
    except asyncio.TimeoutError:
        raise UploadTimedOut(f"the request body did not arrive within {timeout_s:g} s (--body-timeout-s)") from None


class UploadsPerClient:
    """Request bodies being received now, per client address: ``slot`` is a context that holds
    one, or raises TooManyUploads when the address already holds ``limit`` (a client sending a
    byte now and then holds a place in the replica until --body-timeout-s; this bounds how many
    places one address can hold, so other clients keep being answered)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.receiving: Counter = Counter()

    @contextmanager
    def slot(self, client: str) -> Iterator[None]:
        if self.receiving[client] >= self.limit:
            raise TooManyUploads(f"{client} is already sending {self.receiving[client]} request bodies "
                                 f"(--max-uploads-per-client {self.limit}); send fewer at once")
        self.receiving[client] += 1
        try:
            yield
        finally:
            self.receiving[client] -= 1
            if not self.receiving[client]:
                del self.receiving[client]


class TooManyUploads(ValueError):
    """A client address that already sends --max-uploads-per-client bodies (HTTP 429)."""


def bad_image_reason(exc: BaseException) -> str:
    """Why PIL could not read an upload, in a few words (its own message names a BytesIO object)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: not a format PIL knows (JPEG, PNG, WebP, BMP, TIFF, ...)"
    return f"{exc.__class__.__name__}: {one_line(exc)}"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text[:300]


def server_error(exc: BaseException) -> str:
    """The 500 answer's line for a failure of the server's own (logged in full here): the kind of
    error only, since its message may name files and paths of the machine serving."""
    log.error("a request failed on the server's side", exc_info=exc)
    return f"the server failed to answer ({exc.__class__.__name__}); its log has the details"


def run_name(run: str) -> str:
    """What public answers call the run: its folder's name, never its path or bucket."""
    path = run.split("://", 1)[1] if storage.is_uri(run) else os.path.abspath(run)
    parts = [p for p in path.split("/") if p][1 if storage.is_uri(run) else 0:]  # a bucket is not a name
    return parts[-1] if parts else "run"


class BatchHealth:
    """Batches the members failed in a row, and the batches running now; ``check`` (the replica's
    health check) fails once ``UNHEALTHY_AFTER`` have failed, or one has run for ``BATCH_HUNG_S``
    (a batch that never returns fails nothing, while every request behind it times out), so Serve
    replaces the replica (a new one loads the members again)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.failed_in_a_row = 0
        self.last_error = ""
        self.clock = clock
        self.running: dict = {}  # batch token -> when it started

    def begin(self) -> object:
        token = object()
        self.running[token] = self.clock()
        return token

    def end(self, token: object) -> None:
        self.running.pop(token, None)

    def record(self, error: Optional[BaseException]) -> None:
        if error is None:
            self.failed_in_a_row = 0
        else:
            self.failed_in_a_row += 1
            self.last_error = f"{error.__class__.__name__}: {one_line(error)}"

    def check(self) -> None:
        if self.running:
            oldest = self.clock() - min(self.running.values())
            if oldest > BATCH_HUNG_S:
                raise RuntimeError(f"a batch of the members has run for {oldest:.0f} s (over {BATCH_HUNG_S:g} s): "
                                   f"they hang")
        if self.failed_in_a_row >= UNHEALTHY_AFTER:
            raise RuntimeError(f"the members failed the last {self.failed_in_a_row} batches in a row "
                               f"(last: {self.last_error})")


class ServedRun:
    """A finished run's members in this process, ready to answer (plain torch; the deployment
    below is its thin Ray Serve wrapper, and a test can use it without Ray)."""

    def __init__(self, options: ServeOptions, *, device=None, threads: float = 1, gpus: float = 0):
        import torch

        from ensemble.engine import eval_models, resolve_precision, set_threads
        from ensemble.gpu_memory import inference_batch

        set_threads(threads)
        self.options = options
        self.finished: FinishedRun = load_run(options.run, options.members)  # sha256 checked, weights_only
        cfg = self.finished.config
        self.device = device or torch.device("cpu")
        self.amp = resolve_precision(cfg.precision, self.device)
        # on a GPU (``gpus``: the replica's share): --max-batch-size in passes that fit it, before any weight moves
        self.max_batch = inference_batch(self.device, self.finished.archs, len(self.finished.classes), cfg.image_size,
                                         cfg.tta, self.amp is torch.bfloat16, who="the server",
                                         batch=options.max_batch_size, batch_flag="--max-batch-size", share=gpus,
                                         share_flag="--gpus", log=logging.getLogger("ensemble.serve").warning)
        self.models = eval_models(self.finished.archs, len(self.finished.classes), self.finished.states, self.device)
        self.finished = dataclasses.replace(self.finished, states=[])  # the models hold the weights now

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> uint8 (S, S, 3): the run's eval transform, as predict decodes a file.
        ImageTooLarge past the pixel limit (before decoding); PIL's errors for anything unreadable."""
        from ensemble.data import decode_image
        from ensemble.config import cache_side

        cfg = self.finished.config
        if not data:
            raise ValueError("empty body; POST the image file's bytes")
        return decode_image(data, image_size=cfg.image_size, resize=cfg.eval_resize, side=cache_side(cfg),
                            max_pixels=self.options.max_pixels)

    def member_probs(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> the members' probabilities (members, B, classes), TTA as the run's."""
        import torch

        from ensemble.engine import vote_member_probabilities

        return vote_member_probabilities(self.models, torch.from_numpy(images), self.amp, self.finished.config.tta,
                                         device=self.device, max_batch=self.max_batch).cpu().numpy()

    def answer(self, images: np.ndarray, ks: Sequence[int]) -> list[dict]:
        return answers(self.member_probs(images), self.finished.classes, rule=self.finished.config.vote,
                       temperature=self.finished.temperature, weights=self.finished.weights, ks=ks)

    def info(self) -> dict:
        cfg, o = self.finished.config, self.options
        return {"run": run_name(o.run), "classes": self.finished.classes, "members": self.finished.members,
                "member_choice": o.members,
                "weights": self.finished.weights or [1 / len(self.finished.members)] * len(self.finished.members),
                "vote": cfg.vote if self.finished.weights is None else "weighted soft",
                "temperature": self.finished.temperature, "arch": cfg.arch, "member_archs": self.finished.archs,
                "image_size": cfg.image_size,
                "eval_resize": cfg.eval_resize, "tta": cfg.tta, "device": str(self.device),
                "limits": {"max_upload_mb": o.max_upload_mb, "max_megapixels": o.max_megapixels,
                           "max_batch_size": o.max_batch_size, "batch_wait_s": o.batch_wait_s,
                           "max_queued_requests": o.max_queued_requests, "body_timeout_s": o.body_timeout_s,
                           "request_timeout_s": o.request_timeout_s,
                           "max_uploads_per_client": o.max_uploads_per_client}}
