"""deploy/k8s agrees with the image and the config it ships: the ConfigMap's config
loads as `sluiceway serve` would load it, the Deployment's ports, user, probes and grace
period match what the Dockerfile and that config say."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings import load_settings
from tests.processes import ROOT


def manifests() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "sluiceway.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_the_kubernetes_manifests_match_the_image_and_the_config(tmp_path: Path) -> None:
    k8s = manifests()
    assert set(k8s) == {"ConfigMap", "Deployment", "Service"}
    config = tmp_path / "config.toml"
    config.write_text(k8s["ConfigMap"]["data"]["config.toml"])
    settings = load_settings(config)
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert settings.server.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [settings.server.port]
    assert settings.admin is not None and settings.admin.host == "127.0.0.1"  # private
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["volumeMounts"][0]["mountPath"] == "/etc/sluiceway"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > settings.server.shutdown_grace_s + pre_stop
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user is not None
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) \
        == (int(user.group(1)), int(user.group(2)))
    service = k8s["Service"]["spec"]
    assert service["selector"] == k8s["Deployment"]["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["ports"]] == [container["ports"][0]["name"]]


def test_the_redis_manifest_is_what_the_replicas_point_at(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """deploy/k8s/redis.yaml's Service is the host the commented-out REDIS_URL names, and
    the Deployment's cluster env vars are keys the settings know."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "redis.yaml").read_text()))
    redis = {d["kind"]: d for d in docs}
    service = redis["Service"]
    assert service["spec"]["selector"] == redis["Deployment"]["spec"]["selector"]["matchLabels"]
    port = service["spec"]["ports"][0]["port"]
    text = (ROOT / "deploy" / "k8s" / "sluiceway.yaml").read_text()
    url = re.search(r"SLUICEWAY_CLUSTER__REDIS_URL, value: \"([^\"]+)\"", text)
    assert url is not None and url.group(1) == (
        f"redis://{service['metadata']['name']}:{port}/0")
    config = tmp_path / "config.toml"
    config.write_text(manifests()["ConfigMap"]["data"]["config.toml"])
    monkeypatch.setenv("SLUICEWAY_CLUSTER__REDIS_URL", url.group(1))
    monkeypatch.setenv("SLUICEWAY_CLUSTER__MIN_REPLICAS", "2")
    monkeypatch.setenv("SLUICEWAY_CLUSTER__REPLICA_ID", "sluiceway-7d9f-abcde")
    cluster = load_settings(config).cluster
    assert (cluster.enabled, cluster.min_replicas, cluster.replica_id) == (
        True, 2, "sluiceway-7d9f-abcde")
    env = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    replica_id = next(e for e in env if e["name"] == "SLUICEWAY_CLUSTER__REPLICA_ID")
    assert replica_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
