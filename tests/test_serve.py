"""Serving a finished run over HTTP (ensemble.serve), and ``--members selected`` (serve and predict).

Pure tests first: the answer's numbers for hand-made member probabilities, the selection read
from a report, the upload and decompression-bomb limits. Then one tiny finished run (the driver,
as tests/test_pipeline_ray.py makes one) and ONE Serve app on loopback for every HTTP test.

Batching is asserted without timing: the test app's batches wait up to 60 s to fill and hold 5
requests, and every request that reaches the members is sent in a group of exactly 5 concurrent
requests (the next group only after the last one answered), so each group is one batch of 5.
"""

from __future__ import annotations

import asyncio
import glob
import http.client
import json
import os
import shutil
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ensemble.config import ConfigError

pytest.importorskip("ray.serve")

GROUP = 5  # the test app's max_batch_size; requests that reach the members go in groups of this many


# ---------------------------------------------------------------- helpers

def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, followed by a few bytes of pixel data: a tiny
    file that would decode to a huge image (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class FakeRequest:
    """What ``read_upload`` reads of a Starlette request: headers and the body's chunks."""

    def __init__(self, chunks: list[bytes], content_length=None):
        self.headers = {} if content_length is None else {"content-length": str(content_length)}
        self.chunks, self.consumed = chunks, 0

    async def stream(self):
        for c in self.chunks:
            self.consumed += 1
            yield c


def _member_probs_in_process(output: str, image_paths: list[str], cfg, num_classes: int) -> np.ndarray:
    """Every saved member on the images, one after another in this process: (members, n, classes)."""
    import torch

    from ensemble.data import decode_batch
    from ensemble.engine import eval_models
    from ensemble.config import cache_side
    from ensemble.pixels import model_input

    batch = {"id": np.arange(len(image_paths)), "label": np.full(len(image_paths), -1),
             "path": np.array(image_paths, dtype=object)}
    images = model_input(torch.from_numpy(decode_batch(batch, image_size=cfg.image_size, resize=cfg.eval_resize,
                                                       side=cache_side(cfg))["image"]), torch.device("cpu"))
    states = [torch.load(os.path.join(output, "members", f"member-{i}", "model.pt"), weights_only=True)
              for i in range(cfg.members)]
    models = eval_models([cfg.arch_of(i) for i in range(cfg.members)], num_classes, states, torch.device("cpu"))
    with torch.no_grad():
        return np.stack([torch.softmax(m(images), dim=1).numpy() for m in models])


# ---------------------------------------------------------------- pure: the answer's numbers

# two members, two images, classes a, b, c
MEMBER_PROBS = np.array([[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]],
                         [[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]])


def _entropy(p):
    p = np.asarray(p, dtype=np.float64)
    return float(-(p * np.log(p)).sum())


def test_answers_soft_vote_exact():
    from ensemble.served_run import answers

    got = answers(MEMBER_PROBS, ["a", "b", "c"], rule="soft", temperature=1.0, ks=[2, 10])
    # soft vote: row 0 (0.4, 0.5, 0.1) -> b; row 1 (0.15, 0.15, 0.7) -> c
    assert got[0]["label"] == "b" and got[1]["label"] == "c"
    assert [t["class"] for t in got[0]["top_k"]] == ["b", "a"]
    np.testing.assert_allclose([t["probability"] for t in got[0]["top_k"]], [0.5, 0.4], atol=1e-12)
    assert [t["class"] for t in got[1]["top_k"]] == ["c", "a", "b"]  # k capped at 3 classes; tie a/b: lower index first
    np.testing.assert_allclose(list(got[0]["probabilities"].values()), [0.4, 0.5, 0.1], atol=1e-12)
    assert list(got[0]["probabilities"]) == ["a", "b", "c"]
    assert got[0]["entropy"] == pytest.approx(_entropy([0.4, 0.5, 0.1]), abs=1e-12)
    assert got[0]["disagreement"] == 0.5 and got[1]["disagreement"] == 0.0  # member 0 says a on row 0
    assert got[0]["members"] == 2


def test_answers_weighted_and_temperature_exact():
    from ensemble.served_run import answers

    # weights (0.75, 0.25): row 0 = (0.5, 0.4, 0.1) -> a; member 1 (top b) now disagrees
    got = answers(MEMBER_PROBS, ["a", "b", "c"], rule="soft", temperature=1.0, weights=[0.75, 0.25], ks=[3, 3])
    np.testing.assert_allclose(list(got[0]["probabilities"].values()), [0.5, 0.4, 0.1], atol=1e-12)
    assert got[0]["label"] == "a" and got[0]["disagreement"] == 0.5
    # T = 2 on the soft vote: p ** (1/2), renormalised
    got = answers(MEMBER_PROBS, ["a", "b", "c"], rule="soft", temperature=2.0, ks=[3, 3])
    expected = np.sqrt([0.4, 0.5, 0.1]) / np.sqrt([0.4, 0.5, 0.1]).sum()
    np.testing.assert_allclose(list(got[0]["probabilities"].values()), expected, atol=1e-12)
    assert got[0]["entropy"] == pytest.approx(_entropy(expected), abs=1e-12)
    assert got[0]["label"] == "b"  # scaling never moves the top class


def test_weighted_predictions_files_exact(tmp_path):
    """write_predictions with a selection's weights: the weighted vote's probabilities and argmax."""
    import pyarrow.parquet as pq

    from ensemble.report import write_predictions

    voted = {"image_name": np.array(["x", "y"]), "member_probs": MEMBER_PROBS}
    write_predictions(str(tmp_path), voted, ["a", "b", "c"], "soft", 1.0, [0.75, 0.25])
    assert (tmp_path / "predictions.csv").read_text() == "image_name,pred_label\nx,a\ny,c\n"
    table = pq.read_table(tmp_path / "probabilities.parquet")
    np.testing.assert_allclose([table.column(c)[0].as_py() for c in "abc"], [0.5, 0.4, 0.1], atol=1e-7)
    np.testing.assert_allclose(table.column("member_disagreement").to_numpy(), [0.5, 0.0])


def test_selected_members_from_report():
    from ensemble.run_folder import selected_members

    report = {"ensemble": {"selection": {"weights": [0.5, 0.0, 0.25, 0.25]}}}
    assert selected_members(report, 4, "R") == ([0, 2, 3], [0.5, 0.25, 0.25])
    with pytest.raises(ConfigError, match=r"^--members selected: R/report.json records no member selection"):
        selected_members({"ensemble": {}}, 4, "R")
    with pytest.raises(ConfigError, match="records no member selection"):
        selected_members(None, 4, "R")
    with pytest.raises(ConfigError, match="do not fit the run's 3 members"):
        selected_members(report, 3, "R")


def test_options_from_serve_run_strings():
    from ensemble.served_run import ServeOptions, parse_k

    o = ServeOptions.from_args({"run": "r", "members": "selected", "max_upload_mb": "2.5", "max_batch_size": "8"})
    assert (o.run, o.members, o.max_bytes, o.max_batch_size, o.gpus) == ("r", "selected", int(2.5 * 2**20), 8, None)
    with pytest.raises(ConfigError, match="unknown argument.*port"):
        ServeOptions.from_args({"run": "r", "port": "1"})
    with pytest.raises(ConfigError, match="--members 'some': choose one of all, selected"):
        ServeOptions.from_args({"run": "r", "members": "some"})
    with pytest.raises(ConfigError, match="--max-upload-mb -1.0: must be > 0"):
        ServeOptions(run="r", max_upload_mb=-1.0)
    assert parse_k(None) == 5 and parse_k("3") == 3
    for bad in ("0", "x", "1001"):
        with pytest.raises(ValueError, match=f"k={bad}: expected an integer from 1 to 1000"):
            parse_k(bad)


def test_upload_limit_before_reading_and_while_streaming():
    from ensemble.served_run import UploadTooLarge, read_upload

    declared = FakeRequest([b"x" * 10] * 20, content_length=200)
    with pytest.raises(UploadTooLarge, match="upload of 200 bytes"):
        asyncio.run(read_upload(declared, 100))
    assert declared.consumed == 0  # refused by its Content-Length: nothing read
    chunked = FakeRequest([b"x" * 40] * 20)  # no Content-Length (chunked)
    with pytest.raises(UploadTooLarge, match="more than 100 bytes"):
        asyncio.run(read_upload(chunked, 100))
    assert chunked.consumed == 3  # stopped at the chunk that passed the limit
    assert asyncio.run(read_upload(FakeRequest([b"ab", b"c"], content_length=3), 3)) == b"abc"


def test_decompression_bombs_refused_before_decoding(monkeypatch, tiny_digits):
    from PIL import ImageFile

    from ensemble.data import ImageTooLarge, decode_batch, decode_image, open_image

    def no_decoding(self):
        raise AssertionError("load() called: pixels were decoded")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decoding)
        # 2.5e9 pixels: past PIL's own bomb limit as well, refused while opening
        with pytest.raises(ImageTooLarge, match="pixels"):
            open_image(png_claiming(50000, 50000), max_pixels=40_000_000)
        # 49 MP: under PIL's limit (89 MP), over ours
        with pytest.raises(ImageTooLarge, match=r"^image is 7000 x 7000 pixels \(49.0 megapixels\); the limit is 40"):
            open_image(png_claiming(7000, 7000), max_pixels=40_000_000)
    # A real image decodes to exactly what predict's batch decoding gives the same file.
    path = os.path.join(tiny_digits, "test", sorted(os.listdir(os.path.join(tiny_digits, "test")))[0])
    batch = decode_batch({"id": np.array([0]), "label": np.array([-1]), "path": np.array([path], dtype=object)},
                         image_size=16, resize="squash")
    with open(path, "rb") as fh:
        np.testing.assert_array_equal(decode_image(fh.read(), image_size=16, resize="squash",
                                                   max_pixels=40_000_000), batch["image"][0])


def test_serve_cli_builder_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """`serve run ensemble.serve:app run=DIR` calls the builder in the CLI's process: a folder that
    is not a finished run is one line and exit 2 there; called elsewhere, the builder raises."""
    from ensemble import serve
    from ensemble.config import ConfigError

    with pytest.raises(ConfigError, match="no readable run.json"):
        serve.app({"run": str(tmp_path)})
    monkeypatch.setattr("sys.argv", ["/venv/bin/serve", "run", "ensemble.serve:app", f"run={tmp_path}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        serve.app({"run": str(tmp_path)})
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no readable run.json" in err[0], err


def test_server_options_bounded_above_in_one_line(tmp_path, capsys):
    from ensemble import serve
    from ensemble.served_run import ServeOptions

    cases = {"max_batch_size": (1025, "must be <= 1024"), "max_queued_requests": (10_001, "must be <= 10000"),
             "max_upload_mb": (2048.0, "must be <= 1024"), "max_megapixels": (500.0, "must be <= 178"),
             "batch_wait_s": (61.0, "must be <= 60"), "body_timeout_s": (4000.0, "must be <= 3600"),
             "cpus": (2000.0, "must be <= 1024")}
    for name, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=f"^--{name.replace('_', '-')} {value:g}: {message}$"):
            ServeOptions(run="r", **{name: value})
    for name, value in (("max_queued_requests", 0), ("body_timeout_s", 0.0)):
        with pytest.raises(ConfigError, match=f"^--{name.replace('_', '-')} 0(.0)?: must be "):
            ServeOptions(run="r", **{name: value})
    assert ServeOptions.from_args({"run": "r", "max_queued_requests": "8",
                                   "body_timeout_s": "2.5"}).max_queued_requests == 8
    # --request-timeout-s is Serve's own (not the app's): checked by the command, before the run is read
    for value, line in (("0", "--request-timeout-s 0.0: must be > 0"),
                        ("3601", "--request-timeout-s 3601: must be <= 3600")):
        capsys.readouterr()
        assert serve.main(["--run", str(tmp_path), "--request-timeout-s", value]) == 2
        assert capsys.readouterr().err.strip() == f"error: {line}"


class StalledRequest(FakeRequest):
    """A client that declared a body and then sends nothing more."""

    async def stream(self):
        yield b"x"
        await asyncio.sleep(30)


def test_a_stalled_body_times_out():
    from ensemble.served_run import UploadTimedOut, read_upload

    with pytest.raises(UploadTimedOut, match=r"^the request body did not arrive within 0.2 s \(--body-timeout-s\)$"):
        asyncio.run(read_upload(StalledRequest([], content_length=100), 1000, timeout_s=0.2))
    assert asyncio.run(read_upload(FakeRequest([b"ab"], content_length=2), 3, timeout_s=0.2)) == b"ab"


class FailingRun:
    """The deployment's ServedRun where the members fail every batch (a GPU lost, say)."""

    def decode(self, data: bytes) -> np.ndarray:
        return np.zeros((8, 8, 3), np.uint8)

    def answer(self, images, ks):
        raise RuntimeError("CUDA error: device lost while reading /secret/runs/exp1/members")

    def info(self) -> dict:
        return {"run": "exp1"}


def _bare_server(run, options):
    """The deployment's object without Serve (its __init__ loads a run: set what it would) and a
    function that sends it one request: (method, body) -> (status, JSON body)."""
    from collections import Counter

    from starlette.requests import Request

    from ensemble.serve import EnsembleServer
    from ensemble.served_run import BatchHealth, UploadsPerClient

    server = object.__new__(EnsembleServer.func_or_class)
    server.run, server.options, server.health = run, options, BatchHealth()
    server.batch_sizes, server.status_counts = Counter(), Counter()
    server.uploads = UploadsPerClient(options.max_uploads_per_client)

    async def one_request_batches(item):  # @serve.batch needs a replica; a batch of one calls the same code
        return (await server.run_batch([item]))[0]

    server.vote = one_request_batches

    def http(method: str, body: bytes = b""):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": method, "path": "/", "query_string": b"", "root_path": "",
                 "headers": [(b"content-length", str(len(body)).encode())], "client": ("10.0.0.7", 5000)}
        response = asyncio.run(server(Request(scope, receive)))
        return response.status_code, json.loads(response.body)

    return server, http


class HangingRun(FailingRun):
    """Members that take 3 times the request timeout of the test (a wedged GPU, say)."""

    def answer(self, images, ks):
        import time

        time.sleep(1.5)
        return [{"label": "0"}]


def test_the_app_answers_408_past_its_request_timeout_whatever_serve_is_set_to():
    """``serve run ensemble.serve:app`` starts Serve with no request timeout: the replica keeps its
    own (request_timeout_s), so a request the members never answer gets 408 in one line of JSON,
    counted, and the replica answers the next request."""
    from ensemble.served_run import ServeOptions

    server, http = _bare_server(HangingRun(), ServeOptions(run="r", request_timeout_s=0.5))
    assert http("POST", b"an image") == (408, {"error": "not answered within 0.5 s (--request-timeout-s)"})
    status, info = http("GET")
    assert status == 200 and info["requests"] == {"408": 1}


def test_one_client_address_holds_at_most_its_upload_places():
    """UploadsPerClient: the (limit + 1)th body of one address is refused at once, in one line;
    another address is not; a place is free again once its body is in (or failed)."""
    from ensemble.served_run import TooManyUploads, UploadsPerClient

    uploads = UploadsPerClient(2)
    with uploads.slot("10.0.0.7"), uploads.slot("10.0.0.7"):
        with pytest.raises(TooManyUploads, match=r"^10\.0\.0\.7 is already sending 2 request bodies "
                                                 r"\(--max-uploads-per-client 2\); send fewer at once$"):
            with uploads.slot("10.0.0.7"):
                pass
        with uploads.slot("10.0.0.8"):
            assert uploads.receiving == {"10.0.0.7": 2, "10.0.0.8": 1}
    with pytest.raises(RuntimeError):
        with uploads.slot("10.0.0.7"):
            raise RuntimeError("the body failed")
    assert not uploads.receiving


def test_a_failed_batch_answers_json_500_counted_and_fails_the_health_check():
    """The deployment's own code without Serve: each request of a batch the members failed gets
    a JSON 500 (not Ray's plain "Internal Server Error"), GET / counts them, and after
    UNHEALTHY_AFTER failed batches in a row check_health fails, so Serve replaces the replica."""
    from ensemble.served_run import UNHEALTHY_AFTER, ServeOptions

    server, http = _bare_server(FailingRun(), ServeOptions(run="r"))
    for i in range(UNHEALTHY_AFTER):
        server.check_health()  # healthy until UNHEALTHY_AFTER batches in a row have failed
        status, body = http("POST", b"an image")
        assert (status, body) == (500, {"error": "the server failed to answer (RuntimeError); its log has the details"})
    with pytest.raises(RuntimeError, match=f"the members failed the last {UNHEALTHY_AFTER} batches in a row "
                                           f"\\(last: RuntimeError: CUDA error"):
        server.check_health()
    status, info = http("GET")
    assert status == 200 and info["requests"] == {"500": UNHEALTHY_AFTER} and info["run"] == "exp1"
    server.health.record(None)  # a batch that succeeds makes it healthy again
    server.check_health()


def _fake_run_folder(folder, report) -> str:
    """run.json of a 2-member run and ``report`` as its report.json; no member files."""
    from ensemble.config import EnsembleConfig

    os.makedirs(folder, exist_ok=True)
    cfg = EnsembleConfig(members=2, arch="resnet18", weights="none").to_dict()
    with open(os.path.join(folder, "run.json"), "w") as fh:
        json.dump({"config": cfg, "fingerprint": {"classes": ["a", "b"]}}, fh)
    with open(os.path.join(folder, "report.json"), "w") as fh:
        json.dump(report, fh)
    return str(folder)


def test_load_run_refuses_a_report_it_cannot_use_before_loading_members(tmp_path):
    """What load_run takes from report.json (not hash-checked before) is checked first: a
    temperature the driver cannot have written, and, where the run recorded report.json's sha256,
    any change. Past those checks the next line is about member 0 (no member files here)."""
    from ensemble.errors import RunError
    from ensemble.run_folder import load_run, write_report_sha256

    def report(temperature):
        return {"ensemble": {"calibration": {"temperature": temperature},
                             "selection": {"weights": [0.5, 0.5], "temperature": 0.5}}}

    not_finished = "member 0 has not finished"
    for bad in (0, -1.0, None, "x", 1e9):
        run = _fake_run_folder(tmp_path / f"t{bad}", report(bad))
        with pytest.raises(RunError,
                           match=f"^--run {run}: report.json's ensemble.calibration.temperature is "
                                 f"{bad!r}, not a temperature the driver fits \\(a number from 0.05 to 20\\); "
                                 f"restore the file, or rerun the driver with --output {run} to write it again$"):
            load_run(run)
        with pytest.raises(RunError, match=not_finished):  # the selection's own temperature is fine
            load_run(run, "selected")
    run = _fake_run_folder(tmp_path / "hashed", report(0.5))
    write_report_sha256(run)
    with open(os.path.join(run, "report.json.sha256")) as fh:
        assert fh.read().endswith("  report.json\n")  # sha256sum's format
    with pytest.raises(RunError, match=not_finished):
        load_run(run)
    with open(os.path.join(run, "report.json"), "w") as fh:  # a valid report, yet not the one the run wrote
        json.dump(report(0.75), fh)
    with pytest.raises(RunError, match=f"^--run {run}: report.json changed after the run wrote it \\(its sha256 "
                                       f"differs\\); report.json.sha256 records the one the run wrote: restore it"):
        load_run(run)
    os.remove(os.path.join(run, "report.json"))
    with pytest.raises(RunError, match="report.json is missing"):
        load_run(run)
    os.remove(os.path.join(run, "report.json.sha256"))  # a run from before reports were hashed, no report
    with pytest.raises(RunError, match=not_finished):
        load_run(run)


def test_serving_line_names_the_address_serve_really_uses():
    from ensemble.serve import ServeAddress, serving_lines

    mine = ServeAddress("127.0.0.1", 8001, 60.0)
    assert serving_lines("runs/a", mine, host="127.0.0.1", port=8001, request_timeout_s=60.0) == [
        "serving runs/a at http://127.0.0.1:8001/ (POST an image; GET / for the run); Ctrl-C or SIGTERM stops it"]
    theirs = ServeAddress("0.0.0.0", 8000, None)  # a Serve instance that was running keeps its settings
    lines = serving_lines("runs/a", theirs, host="127.0.0.1", port=8001, request_timeout_s=60.0)
    assert lines[0].startswith("serving runs/a at http://0.0.0.0:8000/ ")
    assert lines[1] == ("note: Serve was already running on this cluster and keeps its own settings (its proxy's "
                        "request timeout: none); not applied there: --host 127.0.0.1 --port 8001, --request-timeout-s "
                        "60 (the app itself still answers 408 past 60 s)")


def test_public_answers_name_the_run_not_its_path():
    from ensemble.served_run import run_name

    assert [run_name(r) for r in ("runs/exp1", "/data/runs/exp1/", "s3://bucket/runs/exp1", "s3://bucket")] == \
        ["exp1", "exp1", "exp1", "run"]


# ---------------------------------------------------------------- one finished run, one Serve app

@pytest.fixture(scope="module")
def cluster():
    import ray

    # never a `ray start` cluster here
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def run(cluster, tiny_digits, tiny_run_cache, tmp_path_factory):
    """(report, output) of the session's finished 3-member run (helpers.finished_tiny_run)."""
    from tests.helpers import finished_tiny_run

    _, report, output = finished_tiny_run(tiny_run_cache, tiny_digits, tmp_path_factory)
    return report, output


BODY_TIMEOUT_S = 3.0  # the test app's --body-timeout-s
REQUEST_TIMEOUT_S = 60.0  # its Serve instance's request timeout


@pytest.fixture(scope="module")
def served(run):
    """The one Serve app of this file, started as python -m ensemble.serve starts it (deploy): the
    run's members, batches of GROUP that wait 60 s to fill, a 50 KiB upload limit, 3 s for a body,
    GROUP requests queued at most; on a free loopback port. Yields (host, port)."""
    from ensemble.serve import ServeAddress, ServeOptions, deploy
    from tests.helpers import free_port

    port = free_port()
    options = ServeOptions(run=run[1], max_upload_mb=50 / 1024, max_batch_size=GROUP, batch_wait_s=60.0, cpus=1.0,
                           max_queued_requests=GROUP, body_timeout_s=BODY_TIMEOUT_S, max_uploads_per_client=2 * GROUP)
    address = deploy(options, host="127.0.0.1", port=port, request_timeout_s=REQUEST_TIMEOUT_S, claimed=CLAIMS.append)
    assert address == ServeAddress("127.0.0.1", port, REQUEST_TIMEOUT_S)  # what Serve reports back
    yield "127.0.0.1", port


CLAIMS: list = []  # the test app's claim on its name (serve.claim_app), held as python -m ensemble.serve holds it


def request(address, method: str, path: str = "/", body=None, *, chunked: bool = False) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*address, timeout=180)
    try:
        if chunked:
            conn.request(method, path, body=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                         encode_chunked=True)
        else:
            conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def post_group(address, bodies: list[bytes], path: str = "/") -> list[tuple[int, dict]]:
    """Exactly len(bodies) concurrent POSTs; returns when all have answered."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: request(address, "POST", path, b), bodies))


@pytest.fixture(scope="module")
def in_process(run, tiny_digits):
    """(image names, paths, every member's probabilities on the run's test images computed in this
    process without Ray (members, n, classes), classes, temperature)."""
    from ensemble.run_folder import load_run

    _, output = run
    finished = load_run(output)
    test_dir = os.path.join(tiny_digits, "test")
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(test_dir))
    paths = [os.path.join(test_dir, f"{n}.png") for n in names]
    member_probs = _member_probs_in_process(output, paths, finished.config, len(finished.classes))
    return names, paths, member_probs, finished.classes, finished.temperature


@pytest.mark.ray
def test_http_answers_equal_predict_in_batches(served, run, in_process):
    """Over HTTP == predict's probabilities (the run's probabilities.parquet: the vote stage and
    write_predictions that predict runs, and reproduces to 1e-5 in test_pipeline_ray) == the saved
    members run one after another in this process, soft-voted and scaled by the run's temperature."""
    import pyarrow.parquet as pq

    from ensemble.scores.calibration import scale_probs
    from ensemble.scores.vote import soft_vote

    _, output = run
    names, paths, member_probs, classes, temperature = in_process
    table = pq.read_table(os.path.join(output, "probabilities.parquet"))
    order = [table.column("image_name").to_pylist().index(n) for n in names]
    expected = np.stack([table.column(c).to_numpy() for c in classes], axis=1)[order]  # (n, classes)
    assert temperature != 1.0  # the report fitted one, and it is applied
    np.testing.assert_allclose(expected, scale_probs(soft_vote(member_probs), temperature), atol=1e-5)
    labels = dict(line.split(",") for line in open(os.path.join(output, "predictions.csv")).read().splitlines()[1:])
    assert len(names) == 25 and len(names) % GROUP == 0

    before = request(served, "GET")[1]["batches"]
    got = []
    for lo in range(0, len(names), GROUP):
        bodies = [open(p, "rb").read() for p in paths[lo:lo + GROUP]]
        got += post_group(served, bodies, "/?k=2")
    assert [status for status, _ in got] == [200] * len(names)
    answers = [a for _, a in got]
    np.testing.assert_allclose([[a["probabilities"][c] for c in classes] for a in answers], expected, atol=1e-5)
    assert [a["label"] for a in answers] == [labels[n] for n in names]
    np.testing.assert_allclose([a["entropy"] for a in answers],
                               table.column("predictive_entropy").to_numpy()[order], atol=1e-5)
    np.testing.assert_allclose([a["disagreement"] for a in answers],
                               table.column("member_disagreement").to_numpy()[order], atol=1e-6)
    for a, p in zip(answers, expected):
        assert [t["class"] for t in a["top_k"]] == [classes[i] for i in np.argsort(-p, kind="stable")[:2]]
        assert a["members"] == 3
    # Batching: each group of GROUP concurrent requests ran through the members as one batch.
    assert [a["batch_size"] for a in answers] == [GROUP] * len(names)
    after = request(served, "GET")[1]["batches"]
    assert after.get(str(GROUP), 0) - before.get(str(GROUP), 0) == len(names) // GROUP
    assert {k: v for k, v in after.items() if k != str(GROUP)} == {k: v for k, v in before.items() if k != str(GROUP)}


@pytest.mark.ray
def test_bad_requests_get_one_line_and_the_server_keeps_serving(served, run, tiny_digits):
    _, output = run
    test_dir = os.path.join(tiny_digits, "test")
    image = open(os.path.join(test_dir, sorted(os.listdir(test_dir))[0]), "rb").read()
    cases = [  # (status, response, what the one line says)
        (request(served, "POST", "/", b"not an image at all"), 400, "not a readable image (UnidentifiedImageError"),
        (request(served, "POST", "/", image[: len(image) // 2]), 400, "not a readable image"),   # truncated
        (request(served, "POST", "/", b""), 400, "empty body"),
        (request(served, "POST", "/?k=zero", image), 400, "k=zero: expected an integer"),
        (request(served, "POST", "/", png_claiming(50000, 50000)), 400, "image too large"),   # 2.5e9 pixels claimed
        (request(served, "POST", "/", png_claiming(8000, 8000)), 400,
         "image too large: image is 8000 x 8000 pixels (64.0 megapixels); the limit is 40 megapixels"),
        (request(served, "POST", "/", b"\0" * 60_000), 413, "upload of 60000 bytes; the limit is 0.0488281 MiB"),
        (request(served, "POST", "/", b"\0" * 60_000, chunked=True), 413, "upload of more than 51200 bytes"),
        (request(served, "PUT", "/", image), 405, "PUT not allowed"),
        (request(served, "POST", "/elsewhere", image), 404, "no such path /elsewhere"),
    ]
    for (status, body), want_status, message in cases:
        assert status == want_status, (status, body, message)
        assert list(body) == ["error"] and message in body["error"] and "\n" not in body["error"], (body, message)
    # ... and the next requests are answered (a full group, so they form one batch)
    after = post_group(served, [image] * GROUP)
    assert [s for s, _ in after] == [200] * GROUP and all(a["batch_size"] == GROUP for _, a in after)
    info = request(served, "GET")[1]
    assert info["requests"]["400"] >= 6 and info["requests"]["413"] >= 2
    report = json.load(open(os.path.join(output, "report.json")))
    assert info["members"] == [0, 1, 2] and info["weights"] == pytest.approx([1 / 3] * 3)
    assert info["temperature"] == report["ensemble"]["calibration"]["temperature"]
    assert info["classes"] == report["data"]["class_names"] and info["limits"]["max_batch_size"] == GROUP


def slow_client(address, declared: int, source: str = "127.0.0.1") -> "socket.socket":
    """A POST from ``source`` (any 127.x address is this machine) that declares ``declared``
    bytes of body, sends one, and stalls."""
    sock = socket.create_connection(address, timeout=30, source_address=(source, 0))
    sock.sendall(f"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: {declared}\r\n\r\nx".encode())
    return sock


def answer_of(sock) -> tuple[int, bytes]:
    """(status, body) of the HTTP answer on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body


def raw_request(address, method: str, body=None) -> tuple[int, bytes, float]:
    """(status, body, when it came (time.monotonic())), for answers that may be Ray's plain text."""
    import time

    conn = http.client.HTTPConnection(*address, timeout=60)
    try:
        conn.request(method, "/", body=body)
        resp = conn.getresponse()
        return resp.status, resp.read(), time.monotonic()
    finally:
        conn.close()


def until_counts(address, what: str, reached, timeout_s: float = 30) -> dict:
    """GET / until ``reached(answer)``: the server's own counts, not a sleep; fails naming ``what``."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status, answer, _ = raw_request(address, "GET")
        if status == 200 and reached(json.loads(answer)):
            return json.loads(answer)
        assert time.monotonic() < deadline, (f"not seen in {timeout_s:g} s: {what} "
                                             f"(last GET /: {status} {answer[:300]!r})")
        time.sleep(0.02)


def replica_holds(requests: int, timeout_s: float = 30) -> None:
    """Until the app's one replica holds ``requests`` requests, by Serve's own count (the one its
    router reads to stop at max_ongoing_requests). GET / cannot show a full replica: it needs a
    place in it itself."""
    import time

    import ray

    from ray.serve._private.constants import SERVE_NAMESPACE

    from ensemble import serve

    prefix = f"SERVE_REPLICA::{serve.APP_NAME}#{serve.EnsembleServer.name}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix)]
    assert len(names) == 1, names
    replica = ray.get_actor(names[0], namespace=SERVE_NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while (held := ray.get(replica.get_num_ongoing_requests.remote(), timeout=10)) != requests:
        assert time.monotonic() < deadline, f"the replica holds {held} requests after {timeout_s:g} s, not {requests}"
        time.sleep(0.02)


@pytest.mark.ray
def test_slow_clients_time_out_a_full_queue_gets_503_and_others_are_answered(served, tiny_digits):
    """The README's "Limits": 4 x GROUP clients that declare a body and stall fill every place in
    the replica (from 4 addresses, GROUP each: under --max-uploads-per-client); then 2 x GROUP + 1
    normal requests come together: GROUP wait in the queue (GROUP long) and the GROUP + 1 others
    get Ray's 503 at once, while every stalled body still holds its place. After --body-timeout-s
    every stalled client gets 408 in one line of JSON, its place free again, and the waiting GROUP
    are answered, as one batch. Ordered by the counts of the server (GET /) and of Serve (what the
    replica holds), not by sleeps."""
    import select
    from concurrent.futures import as_completed

    test_dir = os.path.join(tiny_digits, "test")
    image = open(os.path.join(test_dir, sorted(os.listdir(test_dir))[0]), "rb").read()
    counts = request(served, "GET")[1]["requests"]
    before = {code: counts.get(code, 0) for code in ("408", "429")}
    places, stalled = 4 * GROUP, []
    pool = ThreadPoolExecutor(2 * GROUP + 1)
    try:
        # One at a time, each in the replica before the next (Ray counts a request as queued until the
        # replica has taken it: more than GROUP sent together would see some refused while it has room).
        # Under the 50 KiB limit, from 127.0.0.2-5: none is the normal clients' 127.0.0.1.
        for k in range(places):
            stalled.append(slow_client(served, 40_000, f"127.0.0.{2 + k % 4}"))
            if k < places - 1:
                until_counts(served, f"stalled body {k} being received", lambda info: info["receiving"] == k + 1)
        replica_holds(places)  # the last place taken too: the replica is full (GET / would wait for a place now)
        burst = [pool.submit(raw_request, served, "POST", image) for _ in range(2 * GROUP + 1)]
        done = as_completed(burst, timeout=BODY_TIMEOUT_S + 60)
        refused = [next(done).result() for _ in range(GROUP + 1)]  # the first GROUP + 1 answers
        early = select.select(stalled, [], [], 0)[0]  # stalled clients with an answer (or a closed socket) by then
        answered = [f.result() for f in done]
        stalled_answers = [answer_of(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
        pool.shutdown(wait=False, cancel_futures=True)
    backpressure = f"Request dropped due to backpressure (num_queued_requests={GROUP}, max_queued_requests={GROUP})."
    assert [(status, body.decode()) for status, body, _ in refused] == [(503, backpressure)] * (GROUP + 1), refused
    assert not early, f"{len(early)} stalled client(s) answered before the 503s: not refused at once"
    assert [status for status, _, _ in answered] == [200] * GROUP, answered
    assert [json.loads(body)["batch_size"] for _, body, _ in answered] == [GROUP] * GROUP
    timed_out = {"error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s (--body-timeout-s)"}
    assert [(status, json.loads(body)) for status, body in stalled_answers] == [(408, timed_out)] * places, \
        stalled_answers
    counts = request(served, "GET")[1]["requests"]
    assert {code: counts.get(code, 0) - before[code] for code in before} == {"408": places, "429": 0}


@pytest.mark.ray
def test_one_address_s_slow_senders_hold_only_its_own_places_and_others_are_answered(served, tiny_digits):
    """2 x GROUP + 2 stalled bodies from 127.0.0.2: the 2 past --max-uploads-per-client get 429 at
    once; GROUP requests from 127.0.0.1 are then answered, as one batch, while the stalled ones
    still hold their places (none has timed out yet); then each of those gets 408."""
    test_dir = os.path.join(tiny_digits, "test")
    image = open(os.path.join(test_dir, sorted(os.listdir(test_dir))[0]), "rb").read()
    counts = request(served, "GET")[1]["requests"]
    before = {code: counts.get(code, 0) for code in ("408", "429")}
    stalled = []
    try:
        for k in range(2 * GROUP + 2):  # one at a time, each in the replica before the next
            stalled.append(slow_client(served, 40_000, "127.0.0.2"))
            until_counts(served, f"body {k} received or refused",
                         lambda info: info["receiving"] == min(k + 1, 2 * GROUP) and
                         info["requests"].get("429", 0) - before["429"] == max(0, k + 1 - 2 * GROUP))
        answered = post_group(served, [image] * GROUP)
        counts = request(served, "GET")[1]["requests"]
        stalled_answers = [answer_of(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    assert [s for s, _ in answered] == [200] * GROUP and all(a["batch_size"] == GROUP for _, a in answered)
    assert counts.get("408", 0) == before["408"]  # answered while every stalled body still held its place
    statuses = sorted(status for status, _ in stalled_answers)
    assert statuses == [408] * (2 * GROUP) + [429] * 2, statuses
    refused = [json.loads(body) for status, body in stalled_answers if status == 429]
    assert refused == [{"error": f"127.0.0.2 is already sending {2 * GROUP} request bodies (--max-uploads-per-client "
                                 f"{2 * GROUP}); send fewer at once"}] * 2


@pytest.mark.ray
def test_a_second_server_refuses_to_replace_the_app_and_names_the_address_serve_uses(served, run, capsys):
    """python -m ensemble.serve on a cluster where this file's server (on port P) holds the app's
    name: one line naming it and Serve's real address (P, not the --port asked for), exit 2. With
    that claim gone (its server killed: its app stays), the app it would replace is named, exit 2.
    The app keeps serving. GET / names the run, never its path."""
    import socket
    import time

    import ray

    from ensemble import serve
    from tests.helpers import free_port

    _, output = run
    other = free_port()

    def second_server() -> list:
        capsys.readouterr()
        assert serve.main(["--run", output, "--port", str(other)]) == 2
        return [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not Ray's lines

    err = second_server()
    assert err == [f"error: another ensemble.serve (pid {os.getpid()} on {socket.gethostname()}) is starting or "
                   f"serving the application 'ensemble' at http://127.0.0.1:{served[1]}/; this server replaces no "
                   f"other: stop that one first, or serve on another Ray cluster"], err
    ray.kill(CLAIMS.pop())
    deadline = time.monotonic() + 30
    while True:  # until Ray has freed the name
        try:
            ray.get_actor(serve.APP_NAME, namespace=serve.CLAIM_NAMESPACE)
        except ValueError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    err = second_server()
    assert err == [f"error: Serve at http://127.0.0.1:{served[1]}/ already runs the application 'ensemble' "
                   f"(route /); this server replaces no other: stop that one first (serve delete NAME), "
                   f"or serve on another Ray cluster"], err
    with pytest.raises(ValueError):  # the refused server let its claim go
        ray.get_actor(serve.APP_NAME, namespace=serve.CLAIM_NAMESPACE)
    status, info = request(served, "GET")
    assert status == 200 and info["run"] == os.path.basename(output)
    assert output not in json.dumps(info) and os.path.dirname(output) not in json.dumps(info)


def _serve_env(ray_tmp: str, **extra) -> dict:
    """This environment for ``python -m ensemble.serve``, with Ray's temp dir (RAY_TMPDIR) its own:
    a cluster it starts is a new one, never one that another `ray start` on this machine left."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": ray_tmp, **extra}


@pytest.mark.ray
def test_the_command_stops_on_sigterm_deletes_its_app_and_exits_0(run, short_tmp, tmp_path):
    """The real ``python -m ensemble.serve`` (a local cluster of its own: this file's cluster holds
    the app's name already) serving the run: once it answers and has printed its line, SIGTERM
    makes it delete its app (Serve's controller logs that delete, which a cluster torn down
    without it does not), print its stop line and exit 0, and nothing of it is left (its port
    closed, no process it started alive)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import free_port, processes_marked

    _, output = run
    port = free_port()
    serving = (f"serving {output} at http://127.0.0.1:{port}/ (POST an image; GET / for the run); "
               f"Ctrl-C or SIGTERM stops it")
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ensemble.serve", "--run", output, "--port", str(port)],
                                stdout=out, stderr=err, env=_serve_env(short_tmp, ENSEMBLE_TEST_SERVER=short_tmp),
                                start_new_session=True)

    def log() -> str:
        return f"stdout:\n{out_path.read_text()}\nstderr (end):\n{err_path.read_text()[-3000:]}"

    def until(what: str, reached, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not reached():
            assert proc.poll() is None, f"exited {proc.returncode} before {what}\n{log()}"
            assert time.monotonic() < deadline, f"not seen in {timeout_s:g} s: {what}\n{log()}"
            time.sleep(0.2)

    def answers() -> bool:
        try:
            status, body, _ = raw_request(("127.0.0.1", port), "GET")
        except (OSError, http.client.HTTPException):  # nothing listens yet
            return False
        return status == 200 and json.loads(body)["run"] == os.path.basename(output)  # before: Serve's 404

    try:
        until("GET / answered with the run's name", answers)
        until("its serving line", lambda: serving in out_path.read_text())  # printed once SIGTERM is its own
        os.kill(proc.pid, signal.SIGTERM)  # the process, as `kill PID` does; not its group
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after SIGTERM\n{log()}")
        assert code == 0, log()
        assert out_path.read_text().splitlines() == [serving, "stopped: the server is shut down"], log()
        controller = "".join(open(p).read() for p in glob.glob(os.path.join(
            short_tmp, "ray", "session_latest", "logs", "serve", "controller_*.log")))  # its one session
        assert [line.split(" -- ", 1)[1] for line in controller.splitlines() if " -- Deleting app " in line] == \
            ["Deleting app 'ensemble'."], controller[-3000:]
        with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        deadline = time.monotonic() + 30
        while processes_marked("ENSEMBLE_TEST_SERVER", short_tmp):
            assert time.monotonic() < deadline, f"left running: {processes_marked('ENSEMBLE_TEST_SERVER', short_tmp)}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for pid in processes_marked("ENSEMBLE_TEST_SERVER", short_tmp):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.ray
def test_a_busy_port_is_one_line_and_exit_2_before_any_cluster_starts(run, short_tmp):
    """``python -m ensemble.serve --port P`` where something already listens on P: one line naming
    the host, the port and the fix, exit 2, and no Ray cluster started (none under its own Ray
    temp dir, where a cluster it started would keep its session)."""
    import signal
    import subprocess
    import sys

    _, output = run
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "ensemble.serve", "--run", output, "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_serve_env(short_tmp),
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    sessions = glob.glob(os.path.join(short_tmp, "ray", "session_*"))
    assert not sessions, f"a Ray cluster was started: {sessions}\n{err[-3000:]}"
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert err.splitlines() == [f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in "
                                f"use); pass another --port"] and out == "", (out, err)


@pytest.mark.ray
def test_the_driver_records_the_reports_sha256(run):
    import hashlib

    _, output = run
    with open(os.path.join(output, "report.json"), "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    with open(os.path.join(output, "report.json.sha256")) as fh:
        assert fh.read() == f"{digest}  report.json\n"


# ---------------------------------------------------------------- --members selected

SELECTED_T = 0.625  # the selection's own temperature in selected_copy's report


@pytest.fixture(scope="module")
def selected_copy(run, tmp_path_factory):
    """The run with a known selection in its report (weights 0.75, 0, 0.25, its own temperature
    0.625) and member 1's weights file altered: loading member 1 would fail its sha256 check, so a
    success shows it was not loaded."""
    from ensemble.run_folder import write_report_sha256

    _, output = run
    copy = tmp_path_factory.mktemp("selected") / "run"
    shutil.copytree(output, copy)
    report = json.load(open(copy / "report.json"))
    assert report["ensemble"]["calibration"]["temperature"] != SELECTED_T
    report["ensemble"]["selection"]["weights"] = [0.75, 0.0, 0.25]
    report["ensemble"]["selection"]["temperature"] = SELECTED_T
    (copy / "report.json").write_text(json.dumps(report))
    write_report_sha256(str(copy))  # as if the run had written this report
    with open(copy / "members" / "member-1" / "model.pt", "ab") as fh:
        fh.write(b"\0")
    return str(copy), report


@pytest.mark.ray
def test_predict_and_serve_with_selected_members(selected_copy, in_process, tiny_digits, tmp_path):
    import pyarrow.parquet as pq

    from ensemble.scores.calibration import scale_probs
    from ensemble.predict import predict
    from ensemble.scores.selection import weighted_vote
    from ensemble.served_run import ServedRun, ServeOptions

    copy, _ = selected_copy
    names, paths, member_probs, classes, _ = in_process  # all three members, of the original run
    summary = predict(copy, os.path.join(tiny_digits, "test"), str(tmp_path / "pred"), infer_actors=1,
                      members="selected")
    assert summary["members_used"] == [0, 2] and summary["member_weights"] == [0.75, 0.25]
    assert summary["member_choice"] == "selected" and summary["vote"] == "weighted soft"
    assert summary["temperature"] == SELECTED_T  # the selection's own, not the full vote's
    expected = scale_probs(weighted_vote(member_probs, [0.75, 0.0, 0.25]), SELECTED_T)
    table = pq.read_table(tmp_path / "pred" / "probabilities.parquet")
    order = [table.column("image_name").to_pylist().index(n) for n in names]
    got = np.stack([table.column(c).to_numpy() for c in classes], axis=1)[order]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    labels = dict(line.split(",") for line in (tmp_path / "pred" / "predictions.csv").read_text().splitlines()[1:])
    assert [labels[n] for n in names] == [classes[i] for i in expected.argmax(axis=1)]

    # The server's core with --members selected (what the deployment runs): same numbers, in-process.
    served = ServedRun(ServeOptions(run=copy, members="selected"))
    assert served.finished.members == [0, 2] and len(served.models) == 2
    images = np.stack([served.decode(open(p, "rb").read()) for p in paths])
    answers = served.answer(images, ks=[1] * len(paths))
    np.testing.assert_allclose([[a["probabilities"][c] for c in classes] for a in answers], expected, atol=1e-5)
    assert [a["label"] for a in answers] == [labels[n] for n in names] and all(a["members"] == 2 for a in answers)


@pytest.mark.ray
def test_a_server_whose_members_do_not_fit_its_gpu_share_is_one_line_before_weights_move(run, monkeypatch):
    """ServedRun on a (fake) GPU whose half cannot hold the members with one image: the line names
    --gpus 1 (the whole GPU holds them); no weight reaches the device (there is none here)."""
    import torch

    from ensemble import gpu_memory
    from ensemble.run_folder import load_run
    from ensemble.served_run import ServedRun, ServeOptions

    _, output = run
    finished = load_run(output)
    memory = gpu_memory.inference_memory(tuple(finished.archs), len(finished.classes), finished.config.image_size,
                                         finished.config.tta, False)
    monkeypatch.setattr(gpu_memory, "gpu_total_bytes", lambda device: int(1.5 * memory.need(1)))
    with pytest.raises(gpu_memory.GpuMemoryError, match=r"^the server: the members' weights need about .* more than "
                                                        r"its share, .* \(0\.5 of a .* GPU\); use --gpus 1, or fewer"):
        ServedRun(ServeOptions(run=output, max_batch_size=8), device=torch.device("cuda"), gpus=0.5)


def test_one_line_errors_for_missing_selection_and_tampered_runs(run, selected_copy, tiny_digits, tmp_path, capsys):
    from ensemble import predict, serve
    from ensemble.run_folder import write_report_sha256

    _, output = run
    no_selection = tmp_path / "no-selection"
    shutil.copytree(output, no_selection)
    report = json.load(open(no_selection / "report.json"))
    del report["ensemble"]["selection"]
    (no_selection / "report.json").write_text(json.dumps(report))
    write_report_sha256(str(no_selection))  # as if the run had written this report
    cold, changed = tmp_path / "zero-temperature", tmp_path / "changed-report"
    for copy, temperature in ((cold, 0), (changed, 0.5)):
        shutil.copytree(output, copy)
        report = json.load(open(copy / "report.json"))
        report["ensemble"]["calibration"]["temperature"] = temperature
        (copy / "report.json").write_text(json.dumps(report))
    write_report_sha256(str(cold))  # a temperature of 0 that the hash does not catch
    test_dir = os.path.join(tiny_digits, "test")
    cases = [
        (predict.main, ["--run", str(cold), "--images", test_dir, "--output", str(tmp_path / "o")],
         "report.json's ensemble.calibration.temperature is 0, not a temperature the driver fits"),
        (serve.main, ["--run", str(cold)], "temperature is 0, not a temperature the driver fits"),
        (serve.main, ["--run", str(changed)], "report.json changed after the run wrote it"),
        (predict.main, ["--run", str(no_selection), "--images", test_dir, "--output", str(tmp_path / "o"),
                        "--members", "selected"], "records no member selection (ensemble.selection.weights)"),
        (serve.main, ["--run", str(no_selection), "--members", "selected"], "records no member selection"),
        (serve.main, ["--run", selected_copy[0]], "sha256 differs"),   # member 1 altered, and --members all loads it
        (serve.main, ["--run", str(tmp_path)], "no readable run.json"),
    ]
    for main, argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_batch_that_never_returns_fails_the_health_check():
    """A batch that hangs fails nothing, so failed-batch counting alone kept the replica healthy
    while every request behind it timed out: the health check fails once a batch has run for
    BATCH_HUNG_S (a clock the test moves), and is healthy again when no batch is that old."""
    from ensemble.served_run import BATCH_HUNG_S, BatchHealth

    now = [1000.0]
    health = BatchHealth(clock=lambda: now[0])
    hung = health.begin()
    now[0] += BATCH_HUNG_S - 1
    quick = health.begin()
    health.end(quick)
    health.check()  # one batch, running for less than the bound
    now[0] += 2
    with pytest.raises(RuntimeError, match=rf"a batch of the members has run for {BATCH_HUNG_S + 1:.0f} s "
                                           rf"\(over {BATCH_HUNG_S:g} s\): they hang"):
        health.check()
    health.end(hung)
    health.check()


def test_the_server_counts_a_batch_as_running_until_the_members_return():
    """EnsembleServer.run_batch registers its batch with the health for as long as the members run
    (here: until the test lets them), so check_health sees one that hangs."""
    import threading
    from collections import Counter

    from ensemble.serve import EnsembleServer
    from ensemble.served_run import BATCH_HUNG_S, BatchHealth, ServeOptions

    release, now = threading.Event(), [0.0]

    class HangingRun:
        def answer(self, images, ks):
            release.wait(30)
            return [{"label": "x"} for _ in ks]

    server = object.__new__(EnsembleServer.func_or_class)
    server.run, server.options, server.health = HangingRun(), ServeOptions(run="r"), BatchHealth(clock=lambda: now[0])
    server.batch_sizes, server.status_counts = Counter(), Counter()

    async def scenario():
        batch = asyncio.ensure_future(server.run_batch([(np.zeros((4, 4, 3), np.uint8), 1)]))
        while not server.health.running:
            await asyncio.sleep(0.01)
        now[0] += BATCH_HUNG_S + 1
        with pytest.raises(RuntimeError, match="they hang"):
            server.check_health()
        release.set()
        return await batch

    assert asyncio.run(scenario())[0]["batch_size"] == 1
    server.check_health()
    assert not server.health.running
