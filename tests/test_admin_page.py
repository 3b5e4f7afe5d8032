"""The admin plane's live page in a real headless Chromium: it loads without a console
error or an uncaught exception, shows every backend with its state and its learned
curves, follows a drain on its next refresh, and its screenshot is kept as an artifact
(`$SLUICEWAY_ARTIFACTS_DIR`, else out/ in the checkout)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loadgen.local import free_port
from tests.browser import Chromium
from tests.conftest import Launcher, backend
from tests.processes import ROOT


def artifacts_dir() -> Path:
    configured = os.environ.get("SLUICEWAY_ARTIFACTS_DIR")
    return Path(configured) if configured else ROOT / "out"


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    browser = Chromium(tmp_path / "profile")
    try:
        yield browser
    finally:
        browser.stop()


def test_the_live_page_shows_every_backend_and_its_curves(
        launch: Launcher, chromium: Chromium) -> None:
    llama = launch.emulator("llamacpp", "llamacpp-q4km", speed=8, model="m")
    vllm = launch.emulator("vllm", "vllm-fp8-aiter", speed=8, model="m")
    admin_port = free_port()
    proxy = launch.proxy([backend("llama", llama, kind="llamacpp"),
                          backend("vllm", vllm, kind="vllm")],
                         admin={"port": admin_port, "api_keys": ["adm"]},
                         routing={"calibrate_tokens": 16})
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(6) as pool:  # some load, so the curves have several points
        statuses = list(pool.map(lambda _: httpx.post(
            proxy.url + "/v1/chat/completions", json=body, timeout=30).status_code, range(24)))
    assert statuses == [200] * 24
    admin = f"http://127.0.0.1:{admin_port}"
    assert httpx.post(admin + "/admin/backends/llama/drain", headers={"x-api-key": "adm"},
                      timeout=10).status_code == 200
    shot = artifacts_dir() / "admin-page.png"
    results = asyncio.run(chromium.visit(admin + "/#key=adm", settle_s=4, checks={
        "cards": "Array.from(document.querySelectorAll('.card')).map(c => c.dataset.backend)",
        "status": "document.getElementById('status').textContent",
        "curves": "document.querySelectorAll('.card svg polyline').length",
        "points": "document.querySelectorAll('.card svg circle').length",
        "drained": "document.querySelector('[data-backend=llama] .badge.draining') !== null",
        "vllm_drained": "document.querySelector('[data-backend=vllm] .badge.draining') "
                        "!== null",
        "healthy": "document.querySelectorAll('.badge.healthy').length",
    }, screenshot=shot))
    assert chromium.errors == []
    assert results["cards"] == ["llama", "vllm"]
    assert results["status"].startswith("policy adaptive")
    assert results["curves"] == 4  # throughput and TTFT, per backend
    assert results["points"] >= 4
    assert results["drained"] is True and results["vllm_drained"] is False
    assert results["healthy"] == 2
    assert shot.stat().st_size > 10_000  # a real picture, not an empty canvas
