"""The container and Kubernetes files must not drift from the code: every environment
variable they set is a real setting, every command they run exists, the files they
copy exist."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import settings as cfg

ROOT = Path(__file__).resolve().parent.parent
K8S = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
SETTINGS = {f.metadata["env"] for section in cfg.SECTIONS for f in dataclasses.fields(section)}


def documents():
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def containers(doc):
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod = spec.get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def test_manifests_parse_and_have_kinds():
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "CronJob"} <= kinds


@pytest.mark.parametrize("name, doc", [d for d in documents() if d[1]["kind"] == "ConfigMap"])
def test_configmap_keys_are_settings(name, doc):
    assert set(doc["data"]) <= SETTINGS, set(doc["data"]) - SETTINGS


def test_container_env_and_commands_are_real():
    seen = set()
    for _, doc in documents():
        for c in containers(doc):
            for env in c.get("env", []):
                assert env["name"] in SETTINGS, env["name"]
            command = c["args"][0]
            seen.add(command)
            r = subprocess.run([sys.executable, "-m", "pipeline.cli", command, "--help"], cwd=ROOT,
                               capture_output=True, timeout=60)
            assert r.returncode == 0, command
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["path"] in ("/healthz", "/readyz")
    assert {"collector", "worker", "migrate", "maintenance"} <= seen


def test_dockerfile_copies_what_exists_and_sets_real_settings():
    text = (ROOT / "deploy" / "container" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(\S+)", text, re.M):
        assert (ROOT / src).exists(), src
    env_block = re.search(r"^ENV (.+?)(?:\n\S|\Z)", text, re.S | re.M).group(1)
    for name in re.findall(r"([A-Z_]+)=", env_block):
        assert name in SETTINGS | {"PYTHONUNBUFFERED"}, name
