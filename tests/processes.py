"""Starting and stopping real servers on 127.0.0.1 for the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """A child process serving HTTP on 127.0.0.1:port; always stopped by `stop()`.

    `args` follow `program`, which defaults to this Python interpreter.
    """

    def __init__(self, args: Sequence[str], port: int, log: Path,
                 program: str = sys.executable, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config: Path | None = None  # its config file, where it has one
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [program, *args], cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

    def wait_listening(self, timeout_s: float = 20, ready: bool = False) -> Server:
        """Until /health answers at all or, with `ready`, answers 200: llama-server listens
        before its model is loaded and answers 503 "Loading model" until it is."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200 or not ready:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        state = "was not ready" if ready else "did not listen"
        raise RuntimeError(f"server {state} within {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """Die abruptly, as a crashed backend does."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # reaped meanwhile: see stop
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self, grace_s: float = 5) -> None:
        """SIGTERM to the whole process group, SIGKILL after `grace_s`; then what the
        process left in /dev/shm (Intel OpenMP registers each process there: vLLM)."""
        if self.proc.poll() is None:
            # poll() also answers None while another thread's wait() holds the process;
            # that wait may reap it before this signal, which then finds no group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # any child the group still holds
        for leftover in Path("/dev/shm").glob(f"__KMP_REGISTERED_LIB_{self.proc.pid}_*"):
            leftover.unlink(missing_ok=True)
        self._log_file.close()

    def get(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=5).json()

    def post(self, path: str, data: Any) -> Any:
        return httpx.post(self.url + path, json=data, timeout=5).json()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; keys quoted (they may hold globs)
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]],
                 backends: list[dict[str, Any]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for backend in backends:
        lines.append("[[backends]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in backend.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
