"""deploy/k8s agrees with the image and the config it ships: the ConfigMap's config
loads as `sluiceway serve` would load it, the Deployment's ports, user, probes and grace
period match what the Dockerfile and that config say."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
