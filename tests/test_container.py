"""The project's Dockerfile, built by podman over a local Debian base (no registry is
reachable here: tests/container/base.py) and run: it serves a streamed chat completion,
/ready, /metrics and the admin plane through published ports, passes its own
HEALTHCHECK, runs as a non-root user, and on `podman stop` lets a stream in flight finish
and exits 0. The container reaches an emulator on the host's loopback through
slirp4netns (10.0.2.2 inside is 127.0.0.1 outside)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadgen.local import free_port
from tests.conftest import Launcher
from tests.container.base import base_image, podman
from tests.machine import log
from tests.probes import sdk, wait_for
from tests.processes import ROOT, write_config

IMAGE = "localhost/sluiceway:test"
HOST_LOOPBACK = "10.0.2.2"  # the host's 127.0.0.1, as slirp4netns shows it inside


@pytest.fixture(scope="module")
def image() -> str:
    base = base_image()
    started = time.monotonic()
    result = podman("build", "--format", "docker", "--build-arg", f"BASE_IMAGE={base}",
                    "-t", IMAGE, str(ROOT), check=False, timeout_s=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    size = podman("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip()
    log("container", f"built {IMAGE} in {time.monotonic() - started:.0f} s, "
        f"{int(size) / 1e6:.0f} MB")
    return IMAGE


def test_the_dockerfile_is_hadolint_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def container(image: str, launch: Launcher, tmp_path: Path) -> Iterator[dict[str, object]]:
    emulator = launch.emulator("vllm", "vllm-fp8-aiter", speed=4, model="m")
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path / "config.toml", {
        "server": {"host": "0.0.0.0", "port": 8000, "shutdown_grace_s": 30},
        "health": {"interval_s": 1, "timeout_s": 1},
        "admin": {"host": "0.0.0.0", "port": 9000},
    }, [{"name": "vllm", "kind": "vllm", "url": f"http://{HOST_LOOPBACK}:{emulator.port}"}])
    config.chmod(0o644)
    name = f"sluiceway-test-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "--read-only",  # as deploy/k8s runs it
           "--network", "slirp4netns:allow_host_loopback=true",
           "-p", f"127.0.0.1:{port}:8000", "-p", f"127.0.0.1:{admin_port}:9000",
           "-v", f"{config}:/etc/sluiceway/config.toml:ro",
           "-e", "SLUICEWAY_ROUTING__CALIBRATE_TOKENS=0",  # env overrides reach the file
           image)
    try:
        yield {"name": name, "url": f"http://127.0.0.1:{port}",
               "admin": f"http://127.0.0.1:{admin_port}"}
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_the_image_serves_and_drains_a_stream_on_stop(container: dict[str, object]) -> None:
    name, url, admin = str(container["name"]), str(container["url"]), str(container["admin"])
    wait_for(lambda: _ready(url), timeout_s=60)
    assert podman("inspect", name, "--format", "{{.Config.User}}").stdout.strip() \
        == "10001:10001"
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    chunks = list(sdk(url).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert 'sluiceway_requests_total{backend="vllm",endpoint="chat",outcome="ok"} 1.0' \
        in metrics
    pool = httpx.get(admin + "/admin/backends", timeout=5).json()
    assert pool["backends"][0]["completed"] == 1
    # the env override reached the config: no calibration request was sent
    assert pool["backends"][0]["throughput_curve"] != []  # learned from the one request

    # podman stop (SIGTERM) while a stream is in flight: it finishes, the exit is clean
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        body = {"model": "m", "stream": True, "max_tokens": 300, "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                          timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(30)
    stopped = time.monotonic()
    podman("stop", "-t", "60", name)
    took = time.monotonic() - stopped
    reader.join(60)
    assert lines[-1] == "data: [DONE]"  # every token, then the end:
    assert '"completion_tokens":300' in lines[-2].replace(" ", "")
    assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
    logs = podman("logs", name).stderr + podman("logs", name).stdout
    assert "shutting down: finishing requests in progress" in logs
    assert any('"status":200,"outcome":"ok"' in line and '"output_tokens":300' in line
               for line in logs.splitlines())
    log("container", f"podman stop waited {took:.1f} s for the stream")


def test_the_image_leaves_plots_out_and_says_how_to_get_them(image: str) -> None:
    result = podman("run", "--rm", "--read-only", image, "bench", "--url",
                    "http://127.0.0.1:9", "--plot", "/tmp/x.png", check=False)
    assert result.returncode == 2
    assert "pip install 'sluiceway[plot]'" in result.stderr
    assert podman("run", "--rm", image, "--help", check=False).returncode == 0
