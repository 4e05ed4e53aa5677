"""The Kubernetes manifests (k8s/*.yaml) against KubeRay v1.7.0's RayJob schema, unknown keys refused,
and what the README says of k8s/rayjob.yaml: the driver on S3 with flags the CLI takes, GPU workers,
the cluster deleted after the job, credentials only from a Secret. (The node types an autoscaler
an autoscaler reports to the GCS: test_pipeline_ray.py.)"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
# KubeRay's openAPIV3Schema of the RayJob CRD, unchanged (tests/data/kuberay/README.md says from where)
SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayjob-v1-kuberay-1.7.0.schema.json"
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))


def _strict(schema):
    """The schema with unknown keys refused: Kubernetes prunes them silently, so a misspelt key
    (``entryPoint``) would pass the CRD's own schema and do nothing."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    if not SCHEMA.is_file():
        pytest.skip(f"no {SCHEMA.relative_to(ROOT)}")
    schema = _strict(json.loads(SCHEMA.read_text()))
    # apiVersion, kind and metadata are in the CRD's schema; the object's top level takes nothing else
    return jsonschema.Draft7Validator(schema)


def _errors(validator, manifest) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def test_there_is_a_rayjob_manifest():
    assert ROOT / "k8s" / "rayjob.yaml" in MANIFESTS


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_passes_the_schema_with_unknown_keys_refused(validator, path):
    for manifest in yaml.safe_load_all(path.read_text()):
        assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob"), path
        assert _errors(validator, manifest) == []


def test_a_misspelt_key_or_a_wrong_type_fails(validator):
    """The strict schema catches what the CRD's would let through (and types it already checks)."""
    manifest = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    misspelt = copy.deepcopy(manifest)
    misspelt["spec"]["entryPoint"] = misspelt["spec"].pop("entrypoint")
    assert any("'entryPoint' was unexpected" in e for e in _errors(validator, misspelt))
    deep = copy.deepcopy(manifest)
    deep["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 9
    assert any("'maxReplica' was unexpected" in e for e in _errors(validator, deep))
    wrong = copy.deepcopy(manifest)
    wrong["spec"]["ttlSecondsAfterFinished"] = "ten minutes"
    assert any("is not of type 'integer'" in e for e in _errors(validator, wrong))


def test_the_job_is_the_driver_on_s3_with_flags_the_cli_takes():
    from ensemble.cli import config_from_argv

    spec = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["python", "-m", "ensemble.driver"], words
    cfg, dry_run, fresh = config_from_argv(words[3:])  # a flag the driver lacks: SystemExit here
    # each flag spelt in full (argparse would take a prefix such as --out, which a new flag can break)
    from ensemble.cli import _parser

    options = {o for action in _parser()._actions for o in action.option_strings}
    assert [w for w in words[3:] if w.startswith("--") and w not in options] == [], words
    assert cfg.data.startswith("s3://") and cfg.output.startswith("s3://") and not (dry_run or fresh)
    # the cluster lives for the job only, within bounds a user can read off
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600 and 0 < spec["activeDeadlineSeconds"] <= 7 * 86400
    assert 0 < spec["backoffLimit"] <= 5 and 0 < spec["submitterConfig"]["backoffLimit"] <= 5


def test_gpu_workers_a_cpu_head_and_credentials_only_from_a_secret():
    text = (ROOT / "k8s" / "rayjob.yaml").read_text()
    cluster = yaml.safe_load(text)["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head trains nothing
    (gpu,) = cluster["workerGroupSpecs"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["replicas"] * 1 >= 9  # the study's nine members at one GPU each
    # the commented node selector and toleration a user uncomments for tainted GPU nodes
    assert re.search(r"^\s*# nodeSelector:", text, re.M) and re.search(r"^\s*# tolerations:", text, re.M)
    for group in (cluster["headGroupSpec"], gpu):
        for container in group["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                if var["name"].startswith("AWS_") and "KEY" in var["name"]:
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], var


def test_the_image_matches_the_packages_ray_and_python():
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base and base.group(1) == ray_pin, dockerfile
    assert re.search(r"^RUN pip install --no-cache-dir /tmp/wheels/ensemble-\*\.whl", dockerfile, re.M)
