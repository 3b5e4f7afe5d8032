"""nginx (Debian's `nginx-light`: make debian-tools) as the tests and benchmarks run it:
in the foreground, as the current user, everything under one work directory."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from tests.processes import Server


def binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def config(work: Path, http: str, connections: int = 64, log_level: str = "warn") -> Path:
    """Write work/nginx.conf: the common preamble and temp paths, then `http` (the
    `server`/`upstream` blocks) inside the http block. Returns the file."""
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    temp = " ".join(f"{kind}_temp_path {work}/tmp;" for kind in (
        "client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = work / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log {log_level};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    {temp}
{http}
}}
""")
    return conf


def start(work: Path, port: int, http: str, servers: list[Server],
          timeout_s: float = 10) -> Server:
    """Start nginx with `http` (its server block listening on `port`), add it to
    `servers` (so it is stopped with them) and wait until it answers."""
    conf = config(work, http)
    server = Server(["-c", str(conf), "-p", str(work)], port, work / "nginx.log",
                    program=binary())
    servers.append(server)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(server.url + "/", timeout=1)
            return server
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen:\n{server.output()}")
