"""Default resource flags on the smallest cluster (1 CPU): the run finishes or is refused in one
line, never waits for a CPU its own members hold (members decode their own input on their own
CPUs; the image check and the val decode run before any member starts). The 2-CPU case with
default resource flags: every run of test_bad_input.py."""

from __future__ import annotations

import json
import re

import pytest

ray = pytest.importorskip("ray")

from ensemble.driver import main  # noqa: E402
from tests.helpers import RECIPE_FLAGS  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]  # a deadlock fails here instead of hanging CI

# The recipe's model-free flags (offline, small), and NO resource flags: --cpus-per-member,
# --infer-actors and --cpus-per-infer-actor keep their defaults (2, 2, 1).
SMALL = [*RECIPE_FLAGS, "--image-size", "16", "--epochs", "1", "--members", "2", "--batch-size", "16"]


def test_default_resources_finish_on_one_cpu(tiny_digits, tmp_path, caplog):
    """Also: a --cache-share of the store too small for the raw pixels but not for the compressed
    tier's caches them compressed (the tiers' pixels themselves: test_image_cache.py)."""
    import logging

    from ensemble.cli import config_from_argv
    from ensemble.data import scan_layout
    from ensemble.image_cache import estimate_bytes

    cpus = 1
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    try:
        store = min(n["Resources"]["object_store_memory"] for n in ray.nodes())
        index, cfg = scan_layout(tiny_digits), config_from_argv(["--data", tiny_digits, *SMALL])[0]
        share = (estimate_bytes(index, cfg, "raw") + estimate_bytes(index, cfg, "compressed")) / 2 / store
        with caplog.at_level(logging.INFO, logger="ensemble.data"):
            assert main(["--data", tiny_digits, *SMALL, "--cache-share", f"{share:.9f}",
                         "--output", str(tmp_path / "out")]) == 0
    finally:
        ray.shutdown()
    assert "image cache: compressed tier (raw pixels about" in caplog.text
    config = json.loads((tmp_path / "out" / "run.json").read_text())["config"]
    assert config["cpus_per_member"] == min(2.0, cpus)   # shrunk to the node, not waited for
    assert config["infer_actors"] == min(2, cpus)
    assert (tmp_path / "out" / "predictions.csv").read_text().count("\n") == 1 + 25


def test_explicit_cpus_no_node_has_are_refused(tiny_digits, tmp_path, capsys):
    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        code = main(["--data", tiny_digits, *SMALL, "--cpus-per-member", "2", "--output", str(tmp_path / "out")])
    finally:
        ray.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: --cpus-per-member 2 but the largest node has 1 CPU(s); use --cpus-per-member 1 or less"]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_members_that_cannot_start_are_reported_not_waited_on(tiny_digits, tmp_path, capsys):
    """Other work holds the cluster's only GPU: the GPU members cannot start. The run stops after
    --stall-timeout with one line saying what they need and what is free, instead of waiting."""
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        @ray.remote(num_cpus=0, num_gpus=1)
        class OtherWork:
            def ping(self):
                return True

        other = OtherWork.remote()
        assert ray.get(other.ping.remote())  # it holds the GPU now
        code = main(["--data", tiny_digits, *SMALL, "--cpus-per-member", "1", "--gpus-per-member", "1",
                     "--gpus-per-infer-actor", "0", "--stall-timeout", "5", "--output", str(tmp_path / "out")])
    finally:
        ray.shutdown()
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(err) == 1 and re.fullmatch(
        r"error: no member could start in \d+ s: each needs 1 CPU and 1 GPU, the cluster has 2 of 2 CPU, 0 of 1 GPU "
        r"free \(other work holds the rest\); free them, or use --gpus-per-member 0 \(on CPU\), which fits what is "
        r"free now, then rerun the same command to resume", err[0]), err
    assert (tmp_path / "out" / "run.json").exists()  # the run is there to resume
