"""The Grafana dashboard (deploy/grafana/sluiceway.json) and the /metrics exposition,
against a live proxy: promtool's linter is clean on a real scrape, every metric the
dashboard names is one the proxy exports, and every one of its queries runs on a real
Prometheus (Debian's) that scraped the proxy while it served, the main ones with data."""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadgen.local import free_port
from tests.conftest import Launcher, backend
from tests.probes import wait_for
from tests.processes import ROOT, Server

DASHBOARD = ROOT / "deploy" / "grafana" / "sluiceway.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                             "_created"), "gauge": ("",)}
# panels whose series exist only after events this test does not cause
MAY_BE_EMPTY = ("retries", "outcome!=", "estimated", "kv_cache", "clamped")


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def exported(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in SUFFIXES.get(family.type, ("",))}
    return names


def serve_traffic(launch: Launcher) -> Server:
    """A proxy over two upstreams that has served, failed over, refused and drained."""
    good = launch.upstream("good", slots=4)
    flaky = launch.upstream("flaky")
    admin_port = free_port()
    proxy = launch.proxy([backend("good", good, kind="llamacpp", models=["m"]),
                          backend("flaky", flaky, models=["m"])],
                         admin={"port": admin_port}, routing={"policy": "round_robin"})
    flaky.post("/_control", {"fail_status": 500, "fail_count": 2})
    body = {"model": "m", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: httpx.post(proxy.url + "/v1/chat/completions", json=body,
                                           timeout=30).status_code, range(16)))
    httpx.post(proxy.url + "/v1/chat/completions", json={"model": "nope"}, timeout=5)
    httpx.post(f"http://127.0.0.1:{admin_port}/admin/backends/flaky/drain", timeout=5)
    return proxy


def test_promtool_finds_nothing_to_lint_in_a_live_scrape(launch: Launcher) -> None:
    proxy = serve_traffic(launch)
    scrape = httpx.get(proxy.url + "/metrics", timeout=5).text
    assert 'sluiceway_retries_total{backend="flaky"} 2.0' in scrape
    assert 'sluiceway_admin_actions_total{action="drain",result="ok"} 1.0' in scrape
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() \
        and not result.stderr.strip(), result.stdout + result.stderr


def test_every_dashboard_query_runs_on_a_real_prometheus(launch: Launcher,
                                                         tmp_path: Path) -> None:
    proxy = serve_traffic(launch)
    names = exported(httpx.get(proxy.url + "/metrics", timeout=5).text)
    named = {n for q in queries() for n in re.findall(r"\bsluiceway_[a-z_]+", q)}
    assert named and named <= names, named - names

    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: sluiceway\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{proxy.port}']\n")
    prometheus = Server([f"--config.file={tmp_path / 'prometheus.yml'}",
                         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{port}"],
                        port, tmp_path / "prometheus.log", program="prometheus")
    launch.servers.append(prometheus)
    prometheus.wait_listening(30)

    def query(expr: str) -> Any:
        resp = httpx.get(prometheus.url + "/api/v1/query", params={"query": expr}, timeout=10)
        assert resp.status_code == 200, f"{expr}: {resp.text}"
        return resp.json()["data"]["result"]

    wait_for(lambda: query("up") and query("up")[0]["value"][1] == "1", timeout_s=30)
    # more traffic once it scrapes, so rates over the last seconds have something
    body = {"model": "m", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert httpx.post(proxy.url + "/v1/chat/completions", json=body,
                          timeout=30).status_code == 200
        time.sleep(0.05)
    empty = []
    for expr in queries():
        concrete = (expr.replace("$backend", ".*").replace("$__rate_interval", "5s")
                    .replace("$__range", "1m"))
        if not query(concrete) and not any(m in expr for m in MAY_BE_EMPTY):
            empty.append(expr)
    assert not empty, empty
