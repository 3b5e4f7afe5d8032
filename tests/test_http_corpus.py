"""sluiceway's own HTTP/1.1 server against a corpus of malformed and ambiguous requests
(tests/http_corpus.py), side by side with uvicorn's h11 server and nginx on the same bytes.

For sluiceway each request must be refused (4xx and the connection closed, nothing sent
upstream) or handled exactly once with the body meant, as its case allows; the upstream's
own count says how many requests reached it. The other two servers are measured, not
judged, except that where both of them refuse a request, sluiceway must refuse it too.
The table of all three is written to out/http-corpus.md (docs/operations.md has it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from loadgen.local import free_port
from tests import debian_tools, nginx
from tests.conftest import Launcher, backend
from tests.http_corpus import CASES, ONCE, REFUSE, TWICE, Case, Outcome, exchange
from tests.processes import Server

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"

NGINX_SERVER = """    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{upstream}; }}
    }}"""


def _listening(server: Server, path: str = "/") -> Server:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(server.url + path, timeout=1)
            return server
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening:\n{server.output()}")


@pytest.fixture(scope="module")
def others(module_launch: Launcher) -> dict[str, Server]:
    """uvicorn with its h11 server, and nginx proxying to it."""
    debian_tools.ensure()
    port = free_port()
    h11 = Server(["-m", "uvicorn", "tests.echo_asgi:app", "--http", "h11", "--lifespan",
                  "off", "--no-access-log", "--port", str(port)], port,
                 module_launch.workdir / "uvicorn-h11.log")
    module_launch.servers.append(h11)
    _listening(h11)
    port = free_port()
    proxy = nginx.start(module_launch.workdir / "nginx-corpus", port,
                        NGINX_SERVER.format(port=port, upstream=h11.port),
                        module_launch.servers)
    return {"uvicorn+h11": h11, "nginx": proxy}


@pytest.fixture(scope="module")
def sluiceway(module_launch: Launcher) -> tuple[Server, Server]:
    up = module_launch.upstream("corpus-up")
    return module_launch.proxy([backend("up", up, models=["m"])]), up


def _handled(up: Server) -> int:
    return int(up.get("/_stats")["requests"])


@pytest.fixture(scope="module")
def table() -> dict[str, dict[str, Outcome]]:
    rows: dict[str, dict[str, Outcome]] = {}
    yield rows
    OUT.mkdir(exist_ok=True)
    lines = ["| request | allowed | sluiceway | uvicorn + h11 | nginx |", "|---|---|---|---|---|"]
    for c in CASES:
        row = rows.get(c.name, {})
        lines.append(f"| {c.name} | {' or '.join(sorted(c.allowed))} | "
                     + " | ".join(f"{row[k].verdict} ({row[k]})" if k in row else "-"
                                  for k in ("sluiceway", "uvicorn+h11", "nginx")) + " |")
    (OUT / "http-corpus.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), file=sys.stderr)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_corpus(c: Case, sluiceway: tuple[Server, Server], others: dict[str, Server],
                table: dict[str, dict[str, Outcome]]) -> None:
    proxy, up = sluiceway
    before = _handled(up)
    mine = exchange(proxy.port, c.raw, c.split)
    reached = _handled(up) - before
    row = table.setdefault(c.name, {"sluiceway": mine})
    for name, server in others.items():
        row[name] = exchange(server.port, c.raw, c.split)
    assert mine.verdict in c.allowed, f"{c.name}: sluiceway answered {mine}"
    assert reached == {REFUSE: 0, ONCE: 1, TWICE: 2}[mine.verdict]
    if all(row[name].verdict == REFUSE for name in others):
        assert mine.verdict == REFUSE
