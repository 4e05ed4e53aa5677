"""Serve a finished run over HTTP (Ray Serve): one deployment holds every member; requests are
batched (``@serve.batch``), each image decoded once with the run's eval transform, run through
all members (TTA as the run's), voted and scaled by the temperature its report fitted.

    python -m ensemble.serve --run runs/exp1                       # http://127.0.0.1:8000/
    python -m ensemble.serve --run runs/exp1 --members selected --port 8001
    serve run ensemble.serve:app run=runs/exp1 members=selected    # Ray Serve's own CLI

    curl --data-binary @digit.png 'http://127.0.0.1:8000/?k=3'

``POST /`` with the raw image bytes as the body answers JSON: ``label`` (class name), ``top_k``
(``k`` classes with probabilities; query ``k``, default 5), ``probabilities`` (every class),
``entropy`` (nats), ``disagreement`` (share of members whose top class differs from ``label``),
``members`` and ``batch_size`` (how many requests the members ran together). ``GET /``: the run's
name, the limits, a histogram of batch sizes, counts of the answers by status and how many
request bodies are being received now. A body over
``--max-upload-mb`` gets 413 before it is read in full, one not in within ``--body-timeout-s``
408; an image whose header claims more than ``--max-megapixels`` gets 400 before a pixel is
decoded (decompression bombs); anything else PIL cannot read gets 400; a failure of the server's
own 500. One line in ``{"error": ...}`` each; the server keeps serving. Ray's proxy answers 503
when ``--max-queued-requests`` wait for the full replica, 408 past ``--request-timeout-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import ray
from ray import serve

from ensemble.config import ConfigError
from ensemble.errors import CommandParser, parse_command, run_cli
from ensemble.run_folder import MEMBER_CHOICES, FinishedRun, load_run
from ensemble.served_run import (REQUEST_TIMEOUT_S, BatchHealth, ServedRun, ServeOptions, TooManyUploads,
                                 UploadsPerClient, UploadTimedOut, UploadTooLarge, bad_image_reason, one_line, parse_k,
                                 read_upload, server_error)

log = logging.getLogger("ensemble.serve")

APP_NAME = "ensemble"  # the Serve application's name (serve status, the dashboard's Serve view)
ROUTE = "/"            # its route prefix: POST / and GET /


# ---------------------------------------------------------------- the deployment (Ray Serve)

@serve.deployment
class EnsembleServer:
    """The HTTP ingress: decode each request (in a thread), batch, vote; JSON out."""

    def __init__(self, options: ServeOptions, threads: float, gpus: float = 0):
        from ensemble.engine import pick_device

        self.run = ServedRun(options, device=pick_device(ray.get_gpu_ids()), threads=threads, gpus=gpus)
        self.options = options
        self.vote.set_max_batch_size(options.max_batch_size)
        self.vote.set_batch_wait_timeout_s(options.batch_wait_s)
        self.batch_sizes: Counter = Counter()  # batch size -> how many batches of that size ran
        self.status_counts: Counter = Counter()  # HTTP status -> how many answers
        self.health = BatchHealth()
        self.uploads = UploadsPerClient(options.max_uploads_per_client)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        try:
            # the app's own limit, end to end in the replica (the proxy's, where Serve has one, counts the queue too)
            status, body = await asyncio.wait_for(self._handle(request), self.options.request_timeout_s)
            response = JSONResponse(body, status_code=status)
        except asyncio.TimeoutError:
            status = 408
            response = JSONResponse({"error": f"not answered within {self.options.request_timeout_s:g} s "
                                              f"(--request-timeout-s)"}, status_code=status)
        except Exception as exc:  # the server's own failure (a batch the members could not run): JSON as well
            status = 500
            response = JSONResponse({"error": server_error(exc)}, status_code=status)
        self.status_counts[status] += 1
        return response

    def check_health(self) -> None:
        """Serve's periodic health check of the replica: fails once the members have failed
        several batches in a row, so that Serve replaces the replica (which loads them again)."""
        self.health.check()

    async def _handle(self, request) -> tuple[int, dict]:
        from ensemble.data import ImageTooLarge

        if request.url.path != "/":
            return 404, {"error": f"no such path {request.url.path}; POST an image to / or GET / for the run"}
        if request.method == "GET":
            return 200, {**self.run.info(), "batches": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                         "requests": {str(k): v for k, v in sorted(self.status_counts.items())},
                         "receiving": sum(self.uploads.receiving.values())}
        if request.method != "POST":
            return 405, {"error": f"{request.method} not allowed; POST an image's bytes, or GET"}
        try:
            k = parse_k(request.query_params.get("k"))
            with self.uploads.slot(request.client.host if request.client else "unknown"):
                data = await read_upload(request, self.options.max_bytes, self.options.body_timeout_s)
        except UploadTooLarge as exc:
            return 413, {"error": one_line(exc)}
        except UploadTimedOut as exc:
            return 408, {"error": one_line(exc)}
        except TooManyUploads as exc:
            return 429, {"error": one_line(exc)}
        except ValueError as exc:
            return 400, {"error": one_line(exc)}
        try:
            image = await asyncio.to_thread(self.run.decode, data)
        except ImageTooLarge as exc:
            return 400, {"error": f"image too large: {one_line(exc)}"}
        except Exception as exc:  # PIL raises many types for bad files; each is the client's, answered in one line
            return 400, {"error": f"not a readable image ({bad_image_reason(exc)})"}
        return 200, await self.vote((image, k))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.025)  # both set from the options in __init__
    async def vote(self, requests: list) -> list[dict]:
        return await self.run_batch(requests)

    async def run_batch(self, requests: list) -> list[dict]:
        """A batch of (decoded image, uint8 (S, S, 3), k): every member once on the stacked batch.
        An error reaches every request of the batch (each answers 500, ``__call__``) and counts
        against the replica's health."""
        images = np.stack([image for image, _ in requests])
        running = self.health.begin()
        try:
            result = await asyncio.to_thread(self.run.answer, images, [k for _, k in requests])
        except Exception as exc:
            self.health.record(exc)
            raise
        finally:
            self.health.end(running)
        self.health.record(None)
        self.batch_sizes[len(requests)] += 1
        for row in result:
            row["batch_size"] = len(requests)
        return result


def resources(options: ServeOptions, finished: FinishedRun) -> tuple[float, float]:
    """(GPUs, CPUs) of the deployment. GPUs: ``--gpus``, else 0.5 where the cluster has a GPU
    (a fraction, as members ask, so the server can share a GPU), else 0. CPUs (also torch's
    threads): ``--cpus``, else the run's ``cpus_per_infer_actor``, capped at the largest node.
    Without a Ray connection yet (``serve run`` calls the builder before it starts Ray) the
    cluster is taken to be this machine."""
    from ensemble.cluster import cluster_capacity, fit_cpus, resolve_gpus

    if ray.is_initialized():
        capacity = cluster_capacity()
        has_gpu, largest_cpu = capacity.largest("GPU") > 0, capacity.largest("CPU")
    else:
        import torch

        capacity, has_gpu, largest_cpu = None, torch.cuda.is_available(), float(os.cpu_count() or 1)
    if capacity is not None:
        gpus = resolve_gpus(options.gpus, capacity, "gpus", auto=0.5 if has_gpu else 0.0)
        cpus = fit_cpus(options.cpus, capacity, "cpus", default=finished.config.cpus_per_infer_actor)
    else:
        gpus = options.gpus if options.gpus is not None else (0.5 if has_gpu else 0.0)
        cpus = options.cpus if options.cpus is not None else min(finished.config.cpus_per_infer_actor, largest_cpu)
    return gpus, cpus


def build_app(options: ServeOptions):
    """The Serve application of ``options``. The run is loaded here once first (every member's
    sha256 checked), so a run that is unfinished or altered fails in one line before Serve starts
    anything; the replica then loads it again."""
    finished = load_run(options.run, options.members)
    gpus, cpus = resources(options, finished)
    log.info("serving %s: %d member(s) on %g GPU, %g CPU; batches of up to %d", options.run,
             len(finished.members), gpus, cpus, options.max_batch_size)
    return EnsembleServer.options(
        # enough requests in the replica for a full batch while the previous one computes
        max_ongoing_requests=4 * options.max_batch_size,
        # beyond those, this many wait at Ray's proxy; more get 503 (Serve's default: no limit)
        max_queued_requests=options.max_queued_requests,
        ray_actor_options={"num_gpus": gpus, "num_cpus": cpus},
    ).bind(options, cpus, gpus)


def app(args: dict):
    """Ray Serve application builder: ``serve run ensemble.serve:app run=OUTPUT [members=selected]
    [max_upload_mb=20] [max_megapixels=40] [max_batch_size=16] [batch_wait_s=0.025]
    [max_queued_requests=64] [body_timeout_s=30] [request_timeout_s=120] [max_uploads_per_client=8]
    [gpus=..] [cpus=..]``. (``request_timeout_s`` holds in the replica; Serve's proxy has its own,
    its config file's ``http_options.request_timeout_s``, none unless set, which counts the queue.)

    Under the ``serve`` command line (which calls builders in its own process, before it starts
    anything), a run or argument we cannot use is one ``error:`` line and exit code 2, as in
    ``python -m ensemble.serve``, not the CLI's traceback. Elsewhere (``serve deploy`` builds in
    Serve's controller) the error is raised as it is."""
    def build():
        return build_app(ServeOptions.from_args(args))

    return run_cli(build, system_exit=True) if os.path.basename(sys.argv[0]) == "serve" else build()


# ---------------------------------------------------------------- python -m ensemble.serve

def _parser() -> argparse.ArgumentParser:
    d = ServeOptions
    p = CommandParser(prog="python -m ensemble.serve",
                      description="Serve a finished run's members over HTTP (Ray Serve).", examples=(
                          "python -m ensemble.serve --run runs/exp1                 # http://127.0.0.1:8000/",
                          "curl --data-binary @cat.jpg http://127.0.0.1:8000/       # one image in, the vote out",
                          "python -m ensemble.serve --run runs/exp1 --host 10.0.0.5 --port 8080   # on that interface"))
    p.add_argument("--run", required=True, help="the --output folder of a finished ensemble.driver run")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only; an address of another interface exposes the "
                                                       "server to that network)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--members", choices=MEMBER_CHOICES, default=d.members,
                   help="all (default), or selected: the Caruana selection the run's report recorded, weighted")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                   help=f"larger request bodies get 413 (default {d.max_upload_mb:g} MiB)")
    p.add_argument("--max-megapixels", type=float, default=d.max_megapixels,
                   help=f"images that would decode to more pixels get 400 (default {d.max_megapixels:g})")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help=f"requests run through the members together at most (default {d.max_batch_size})")
    p.add_argument("--batch-wait-s", type=float, default=d.batch_wait_s,
                   help=f"how long a batch waits to fill (default {d.batch_wait_s:g} s)")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help=f"requests that may wait while the server is full; more get 503 "
                        f"(default {d.max_queued_requests})")
    p.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                   help=f"a request body not in within this gets 408 (default {d.body_timeout_s:g} s)")
    p.add_argument("--request-timeout-s", type=float, default=REQUEST_TIMEOUT_S,
                   help=f"a request not answered within this, waiting included, gets 408 "
                        f"(default {REQUEST_TIMEOUT_S:g} s)")
    p.add_argument("--max-uploads-per-client", type=int, default=d.max_uploads_per_client,
                   help=f"request bodies one client address may send at once; more get 429 "
                        f"(default {d.max_uploads_per_client})")
    p.add_argument("--gpus", type=float, help="GPUs for the server (default 0.5 where the cluster has GPUs, else 0)")
    p.add_argument("--cpus", type=float, help="CPUs and torch threads (default: the run's --cpus-per-infer-actor)")
    p.add_argument("--address", help="Ray cluster address, as for ensemble.driver (default: start a local one)")
    return p


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                              f"pass another --port") from None


@dataclass(frozen=True)
class ServeAddress:
    """Where Serve's proxy really listens, and its request timeout (None: none). Serve's HTTP
    options are set once, when Serve starts on a cluster; a later serve.start keeps them."""

    host: str
    port: int
    request_timeout_s: Optional[float]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def serve_address() -> ServeAddress:
    """What the running Serve instance uses (its controller's HTTP options; Serve 2.60 has no
    public call that returns them, ``serve.status`` leaves them out)."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    return ServeAddress(http.host, http.port, http.request_timeout_s)


def apps_in_the_way() -> list[str]:
    """The Serve applications this one would replace: one named APP_NAME, or one at ROUTE."""
    from ray.serve.context import _get_global_client

    apps = _get_global_client().get_serve_details().get("applications", {})
    return [f"'{name}' (route {app.get('route_prefix')})" for name, app in sorted(apps.items())
            if name == APP_NAME or app.get("route_prefix") == ROUTE]


@ray.remote(num_cpus=0)
class AppClaim:
    """The app's name, held by one server process: a named actor (APP_NAME in CLAIM_NAMESPACE),
    which Ray creates once per cluster, so of two servers started together one holds it and the
    other is refused (both would pass the "app exists" check, and either's stop would delete the
    other's app). Not detached: it ends with the process that made it, a killed one included."""

    def __init__(self, holder: str):
        self.holder = holder

    def who(self) -> str:
        return self.holder


CLAIM_NAMESPACE = "ensemble-serve"


def claim_app(url: str):
    """This process's claim on APP_NAME (keep the handle: without one Ray ends the actor), or
    ConfigError naming the server that holds it."""
    import socket

    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    try:
        return AppClaim.options(name=APP_NAME, namespace=CLAIM_NAMESPACE).remote(holder)
    except ValueError:  # the name is taken
        try:
            other = ray.get(ray.get_actor(APP_NAME, namespace=CLAIM_NAMESPACE).who.remote(), timeout=10)
        except Exception:  # it ended meanwhile, or does not answer: the line still holds
            other = "another process"
        raise ConfigError(f"another ensemble.serve ({other}) is starting or serving the application "
                          f"'{APP_NAME}' at {url}; this server replaces no other: stop that one first, "
                          f"or serve on another Ray cluster") from None


def deploy(options: ServeOptions, *, host: str, port: int, request_timeout_s: Optional[float],
           claimed: Callable[[object], None] = lambda claim: None) -> ServeAddress:
    """Start Serve on the connected cluster (or find it running), claim the app's name (one server
    at a time, ``claim_app``), refuse to replace an application that is there (ConfigError: this
    server never takes over, nor on stopping deletes, an app it did not start), then deploy the
    run's app and return the address Serve really uses. ``claimed`` gets the claim once the app's
    name is this process's to deploy (and delete); it holds it until the app is deleted."""
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    address = serve_address()
    claim = claim_app(address.url)
    in_the_way = apps_in_the_way()
    if in_the_way:
        ray.kill(claim)
        raise ConfigError(f"Serve at {address.url} already runs the application {', '.join(in_the_way)}; "
                          f"this server replaces no other: stop that one first (serve delete NAME), "
                          f"or serve on another Ray cluster")
    claimed(claim)
    serve.run(build_app(options), name=APP_NAME, route_prefix=ROUTE, blocking=False)
    return address


def serving_lines(run: str, address: ServeAddress, *, host: str, port: int,
                  request_timeout_s: Optional[float]) -> list[str]:
    """What ``main`` prints once the app is up: the address Serve really listens on; and, when a
    Serve instance already running kept settings of its own, which requested ones did not apply."""
    lines = [f"serving {run} at {address.url} (POST an image; GET / for the run); Ctrl-C or SIGTERM stops it"]
    ignored = []
    if (address.host, address.port) != (host, port):
        ignored.append(f"--host {host} --port {port}")
    if request_timeout_s is not None and address.request_timeout_s != request_timeout_s:
        ignored.append(f"--request-timeout-s {request_timeout_s:g}")
    if ignored:
        its_timeout = "none" if address.request_timeout_s is None else f"{address.request_timeout_s:g} s"
        lines.append(f"note: Serve was already running on this cluster and keeps its own settings (its proxy's "
                     f"request timeout: {its_timeout}); not applied there: {', '.join(ignored)}"
                     + (f" (the app itself still answers 408 past {request_timeout_s:g} s)"
                        if request_timeout_s is not None else ""))
    return lines


def _start(args: argparse.Namespace, started: dict) -> int:
    """Check the run, the options and the port, join or start Ray, deploy the app (returns 0 once
    it is up). ``started``: "app" once the app name is ours, "address" once it serves."""
    from ensemble.cluster import connect

    options = ServeOptions(run=args.run, members=args.members, max_upload_mb=args.max_upload_mb,
                           max_megapixels=args.max_megapixels, max_batch_size=args.max_batch_size,
                           batch_wait_s=args.batch_wait_s, max_queued_requests=args.max_queued_requests,
                           body_timeout_s=args.body_timeout_s, request_timeout_s=args.request_timeout_s,
                           max_uploads_per_client=args.max_uploads_per_client, gpus=args.gpus, cpus=args.cpus)
    load_run(options.run, options.members)  # one line now, before a cluster starts, if it is not a finished run
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: choose 1-65535")
    if args.address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
        _check_port_free(args.host, args.port)  # a cluster on this machine: its proxy binds here
    connect(args.address)
    started["address"] = deploy(options, host=args.host, port=args.port, request_timeout_s=args.request_timeout_s,
                                claimed=lambda claim: started.update(app=True, claim=claim))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Start the app and block until Ctrl-C or SIGTERM; then take it down and exit 0.

    Stopping is the normal end of a server, so it exits 0 (not the driver's 130) after printing
    one line. Errors a user can make: one line, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_command(_parser(), argv)
    if isinstance(args, int):  # a bad flag: its one line is printed
        return args
    started: dict = {}
    code = run_cli(lambda: _start(args, started), interrupted="interrupted before the server was up")
    if code == 130:
        _stop(started)  # what had started before Ctrl-C
    if code:
        return code
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init and serve.run, so these are the ones that hold
        signal.signal(sig, lambda signum, frame: stop.set())
    for line in serving_lines(args.run, started["address"], host=args.host, port=args.port,
                              request_timeout_s=args.request_timeout_s):
        print(line, flush=True)
    while not stop.wait(1.0):
        pass
    _stop(started)
    print("stopped: the server is shut down", flush=True)
    return 0


def _stop(started: dict) -> None:
    """Take down what this process started: its app (never another's; on a shared cluster other
    Serve apps keep running), then the connection; a cluster this process started ends with it,
    Serve included."""
    if not ray.is_initialized():
        return
    try:
        if started.get("app"):
            serve.delete(APP_NAME)
            ray.kill(started["claim"])  # the name is free for the next server
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
