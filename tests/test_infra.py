"""Deployment files: they parse, have the fields KubeRay and the cluster launcher need,
agree on one Ray version, keep the job API inside the cluster and hold no secret values."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from rstar_batch.config import RerankConfig
from tests.infra_files import (DOCKERFILE, INFRA, LAUNCHER, NIGHTLY_CONFIG, REPO, YAML_FILES,
                               load_yaml, rayjob, walk)

# RayJob fields of KubeRay v1.5.1+ (ray.io/v1 API reference), to catch misspelt keys.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
               "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
               "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
               "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
               "shutdownAfterJobFinishes", "suspend"}
CLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                "rayVersion", "workerGroupSpecs", "authOptions"}
HEAD_SPEC = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_SPEC = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas",
               "idleTimeoutSeconds", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(group: dict) -> int:
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in _containers(group))


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _ray_version() -> str:
    return _pyproject()["tool"]["rstar-batch"]["ray-image-version"]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path):
    parsed = load_yaml(path)
    assert parsed and all(isinstance(d, dict) for d in parsed)


def test_the_rayjob_has_what_kuberay_needs_and_no_unknown_fields():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 0
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_SPEC and set(cluster["headGroupSpec"]) <= HEAD_SPEC
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert _gpus(cluster["headGroupSpec"]) == 0
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpus(g) > 0]
    assert gpu_groups
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_SPEC
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_the_cluster_launcher_config_is_valid_for_ray():
    import jsonschema
    import ray.autoscaler

    (config,) = load_yaml(LAUNCHER)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "max_workers", "docker"):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values())
    for node in types.values():
        assert "resources" in node and "node_config" in node
    schema = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    jsonschema.validate(config, json.loads(schema.read_text()))


def test_the_nightly_config_asks_for_no_more_replicas_than_the_clusters_have_gpus():
    config = RerankConfig.from_yaml(str(NIGHTLY_CONFIG))
    wanted = config.max_replicas * config.gpus_per_replica
    groups = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert wanted <= sum(g["maxReplicas"] * _gpus(g) for g in groups)
    (launcher,) = load_yaml(LAUNCHER)
    assert wanted <= sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0)
                         for t in launcher["available_node_types"].values())


def test_the_head_pod_drains_the_driver_within_its_grace_period():
    config = RerankConfig.from_yaml(str(NIGHTLY_CONFIG))
    head = rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    hook = container["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["python", "/app/jobs/stop_drivers.py"]
    assert (REPO / "jobs" / "stop_drivers.py").is_file()
    wait = float(hook[hook.index("--wait") + 1])
    # the drain, then Ray's shutdown under the driver, within the hook's wait; the hook's
    # wait within the pod's grace period
    assert config.drain_seconds + 10 <= wait < head["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= config.drain_seconds + 10


# -- one Ray version everywhere ----------------------------------------------------------

def _images() -> list[str]:
    return [node["image"] for path in YAML_FILES for doc in load_yaml(path)
            for node in walk(doc) if isinstance(node.get("image"), str)]


def test_ray_version_is_the_same_in_pyproject_images_and_manifests():
    version = _ray_version()
    pins = [Requirement(d) for d in _pyproject()["project"]["dependencies"]
            if d.startswith("ray")]
    assert pins and all(version in pin.specifier for pin in pins)
    dockerfile = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    assert base.startswith(f"rayproject/ray:{version}-")
    assert f'"ray[data]=={version}"' in dockerfile
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == version
    ours = f"rstar-batch:{_pyproject()['project']['version']}-ray{version}"
    checked = 0
    for image in _images() + re.findall(r"-t\s+(\S+)", dockerfile):
        if "rstar-batch:" in image:
            assert image.endswith(ours), image
        elif image.startswith("rayproject/ray:"):
            assert image.startswith(f"rayproject/ray:{version}-"), image
        else:
            continue
        checked += 1
    assert checked >= 4  # head, worker, launcher, the Dockerfile's build tag


# -- security --------------------------------------------------------------------------------

SECRET_LITERALS = [
    r"AKIA[0-9A-Z]{16}",                                   # an AWS access key id
    r"\bhf_[A-Za-z0-9]{20,}",                              # a Hugging Face token
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|HF_TOKEN|HUGGING_FACE_HUB_TOKEN|"
    r"RAY_AUTH_TOKEN|PASSWORD)\s*[=:]\s*['\"]?[A-Za-z0-9/+_\-]{6,}",
    r"(?i)\b(token|secret|password|api_key|access_key)\s*:\s*['\"]?[A-Za-z0-9/+_\-]{12,}",
]
SENSITIVE_NAME = re.compile(r"(?i)(^|_)(token|secret|password|key)(_|$)")


def _deployment_files() -> list[Path]:
    return [p for p in sorted(INFRA.rglob("*")) + sorted((REPO / "jobs").rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts]


def test_no_secret_values_in_infra_or_job_files():
    for path in _deployment_files():
        text = path.read_text()
        for pattern in SECRET_LITERALS:
            match = re.search(pattern, text)
            assert match is None, f"{path.relative_to(REPO)}: {match.group(0)!r}"
    for name in re.findall(r"^\s*(?:ENV|ARG)\s+(\w+)", DOCKERFILE.read_text(), re.M):
        assert not SENSITIVE_NAME.search(name), name


def test_credentials_reach_pods_only_through_secret_refs():
    envs = [env for path in YAML_FILES for doc in load_yaml(path) for node in walk(doc)
            for env in node.get("env", []) if isinstance(env, dict) and "name" in env]
    sensitive = [env for env in envs if SENSITIVE_NAME.search(env["name"])]
    assert {"AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} <= {env["name"] for env in sensitive}
    for env in sensitive:
        assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_the_dashboard_and_job_api_stay_inside_the_cluster():
    for path in YAML_FILES:
        for doc in load_yaml(path):
            assert doc.get("kind") != "Ingress", path
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
    cluster = rayjob()["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not cluster["headGroupSpec"].get("enableIngress", False)
    assert cluster["authOptions"]["mode"] == "token"
    (launcher,) = load_yaml(LAUNCHER)
    (head,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    for command in launcher["worker_start_ray_commands"]:
        assert "ray start" not in command or "RAY_AUTH_MODE=token" in command
