from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Server, free_port, write_config

StartUpstream = Callable[..., Server]
StartProxy = Callable[..., Server]


@pytest.fixture
def start_upstream(tmp_path: Path) -> Iterator[StartUpstream]:
    """Start `tests.upstream_server` processes; all are stopped after the test."""
    servers: list[Server] = []

    def start(name: str = "up", wait: bool = True, **options: Any) -> Server:
        port = free_port()
        args = ["-m", "tests.upstream_server", "--port", str(port), "--name", name]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        server = Server(args, port, tmp_path / f"upstream-{name}-{port}.log")
        servers.append(server)
        return server.wait_listening() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """Start `sluiceway serve` with a config built from the arguments."""
    servers: list[Server] = []

    def start(backends: list[dict[str, Any]], **sections: dict[str, Any]) -> Server:
        port = free_port()
        sections.setdefault("health", {"interval_s": 0.5, "timeout_s": 1})
        config = write_config(tmp_path / f"proxy-{port}.toml", sections, backends)
        server = Server(["-m", "proxy.cli", "serve", "--config", str(config), "--port",
                         str(port)], port, tmp_path / f"proxy-{port}.log")
        servers.append(server)
        return server.wait_listening()

    yield start
    for server in servers:
        server.stop()


def backend(name: str, server: Server | str, **extra: Any) -> dict[str, Any]:
    url = server if isinstance(server, str) else server.url
    return {"name": name, "url": url, **extra}
