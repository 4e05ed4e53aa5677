"""Loopback load on ``ensemble.serve`` against its members' compute bound, measured in one run.

    .venv/bin/python benchmarks/serve_load.py                     # trains a small run first (below)
    .venv/bin/python benchmarks/serve_load.py --run runs/exp1 --clients 8 --requests 1000

- served: ``--clients`` threads, each with its own keep-alive HTTP connection to the app on
  127.0.0.1, POST the run's test images (round robin) until ``--requests`` have been answered
  (after ``--warmup`` requests that are not counted). requests/s = requests / wall time;
  p50/p99 of each request's latency; the batch sizes the deployment formed (its ``GET /``).
- members' compute bound: after the app is shut down (so nothing competes), the deployment's
  core (``ServedRun``) in this process with the deployment's thread count runs all members on
  an already-decoded batch: img/s = batch / median time of 20, at ``--max-batch-size`` (the
  most the server could batch) and at the server's mean batch size. The same with decoding
  included (each image's bytes decoded, then the members) is printed too.
- ratio = served requests/s / members' bound at ``--max-batch-size``: the share of the members'
  best forward-pass rate the HTTP path (proxy, replica, JSON, decoding, batching) delivers; the
  ratio at the mean batch size separates the HTTP path's cost from batches that stayed small.

Without ``--run`` it first trains one with the driver: 9 members (the package default) of
resnet18 at 16 px, 1 epoch, on scikit-learn digits written as PNGs (300 train, 60 val, 200
test), one CPU per member. The accuracy of that run is beside the point; its compute is real.
The clients run in this process, on the same cores as the server: on a 2-core machine they
take part of the CPU the server would have.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a finished run's --output folder (default: train a small one in --workdir)")
    p.add_argument("--workdir", default="/tmp/serve-load", help="where the small run and its images go")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--requests", type=int, default=1000, help="requests measured (default 1000)")
    p.add_argument("--warmup", type=int, default=50, help="requests before measuring (default 50)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=0.025, help="as ensemble.serve (default 0.025)")
    p.add_argument("--cpus", type=float, help="CPUs for the deployment (default: the run's cpus_per_infer_actor)")
    p.add_argument("--json", help="also write every number to this file")
    return p.parse_args(argv)


def train_small_run(workdir: str) -> str:
    from benchmarks.images import write_digits_images

    output = os.path.join(workdir, "run")
    if os.path.isfile(os.path.join(output, "report.json")):
        return output
    data = write_digits_images(os.path.join(workdir, "digits"), n_train=300, n_val=60, n_test=200)
    cmd = [sys.executable, "-m", "ensemble.driver", "--address", "local", "--data", data, "--output", output,
           "--arch", "resnet18", "--weights", "none", "--freeze", "none", "--augment", "light", "--lr", "3e-3",
           "--image-size", "16", "--batch-size", "64", "--members", "9", "--epochs", "1",
           "--cpus-per-member", "1", "--infer-actors", "1"]
    print("training the small run:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "CI": "true"}, stdout=subprocess.DEVNULL)
    return output


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(port: int, bodies: list[bytes], *, clients: int, total: int) -> dict:
    """``clients`` threads with keep-alive connections POST until ``total`` answers came back."""
    lock, counter = threading.Lock(), iter(range(total))
    latencies, errors = [], []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                conn.request("POST", "/?k=1", body=bodies[i % len(bodies)])
                resp = conn.getresponse()
                body = resp.read()
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if resp.status != 200:
                        errors.append(f"{resp.status} {body[:200]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "seconds": wall, "requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def get_info(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def members_bound(options, bodies: list[bytes], batch: int, threads: float, repeats: int = 20) -> dict:
    """img/s of all members on a decoded batch (and with decoding) in this process: batch / median time."""
    import torch

    from ensemble.served_run import ServedRun

    served = ServedRun(options, device=torch.device("cpu"), threads=threads)
    chunk = [bodies[i % len(bodies)] for i in range(batch)]
    images = np.stack([served.decode(b) for b in chunk])
    served.member_probs(images)  # warm-up
    forward, end_to_end = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoded = np.stack([served.decode(b) for b in chunk])
        t1 = time.perf_counter()
        served.member_probs(decoded)
        t2 = time.perf_counter()
        forward.append(t2 - t1)
        end_to_end.append(t2 - t0)
    return {"batch": batch, "threads": threads, "members": len(served.models),
            "img_per_s": batch / float(np.median(forward)),
            "with_decode_img_per_s": batch / float(np.median(end_to_end))}


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from ensemble.run_folder import load_run
    from ensemble.serve import APP_NAME, ServeOptions, build_app

    run = args.run or train_small_run(args.workdir)
    finished = load_run(run)
    cfg = finished.config
    test_dir = os.path.join(cfg.data, "test")
    bodies = [open(os.path.join(test_dir, f), "rb").read() for f in sorted(os.listdir(test_dir))]
    options = ServeOptions(run=run, max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_s, cpus=args.cpus)

    ray.init(address="local", include_dashboard=False, logging_level="WARNING")  # a cluster of its own
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(build_app(options), name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
    try:
        load(port, bodies, clients=args.clients, total=args.warmup)
        before = get_info(port)["batches"]
        served = load(port, bodies, clients=args.clients, total=args.requests)
        info = get_info(port)
    finally:
        serve.shutdown()
        ray.shutdown()
    batches = {int(k): v - before.get(k, 0) for k, v in info["batches"].items() if v - before.get(k, 0)}
    mean_batch = sum(k * v for k, v in batches.items()) / max(1, sum(batches.values()))
    threads = options.cpus or cfg.cpus_per_infer_actor
    bound = members_bound(options, bodies, args.max_batch_size, threads)
    at_mean = members_bound(options, bodies, max(1, round(mean_batch)), threads)
    ratio = served["requests_per_s"] / bound["img_per_s"]

    print(f"serve load: {bound['members']} members {cfg.arch} @ {cfg.image_size} px, {args.clients} clients, "
          f"{args.requests} requests (+{args.warmup} warm-up), batches up to {args.max_batch_size} "
          f"(wait {args.batch_wait_s:g} s), {threads:g} CPU for the deployment, {os.cpu_count()} cores here")
    print(f"served           {served['requests_per_s']:8.1f} requests/s   latency p50 {served['p50_ms']:.1f} ms, "
          f"p99 {served['p99_ms']:.1f} ms; {served['errors']} error(s)")
    print(f"batches          {dict(sorted(batches.items()))}; mean {mean_batch:.2f} requests per batch")
    for b in (bound, at_mean):
        print(f"members' bound   {b['img_per_s']:8.1f} img/s   all members' forward passes on a decoded batch of "
              f"{b['batch']}, in process, {threads:g} thread(s) (median of 20); with decoding "
              f"{b['with_decode_img_per_s']:.1f} img/s")
    print(f"ratio served/members' bound {ratio:.3f} (at batch {bound['batch']}); "
          f"{served['requests_per_s'] / at_mean['img_per_s']:.3f} at the mean batch {at_mean['batch']}")
    if served["errors"]:
        print(f"first error: {served['first_error']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"served": served, "batches": batches, "mean_batch": mean_batch, "bound": bound,
                       "bound_at_mean_batch": at_mean, "ratio": ratio, "run": run, "clients": args.clients},
                      fh, indent=2)
    return 1 if served["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
