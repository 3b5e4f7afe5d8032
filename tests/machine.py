"""What the heavy test fixtures share: the per-machine cache, a lock per cached thing,
Debian packages installed on demand, and commands whose output is kept for a failure."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path


def cache_root() -> Path:
    """`$SLUICEWAY_CACHE_DIR`, else ~/.cache/sluiceway."""
    configured = os.environ.get("SLUICEWAY_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "sluiceway"


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[Path]:
    """Hold `directory/.lock` exclusively: one builder per machine, even across runs."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield directory


def log(tag: str, message: str) -> None:
    print(f"[{tag}] {message}", file=sys.stderr, flush=True)


def run_logged(cmd: list[str], log_path: Path, cwd: Path | None = None,
               env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> None:
    """Run `cmd` with its output appended to `log_path`; on failure raise with its tail."""
    with log_path.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                env=None if env is None else {**os.environ, **env},
                                timeout=timeout_s)
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def ensure_debian_packages(tools: Mapping[str, str], tag: str) -> None:
    """Install (apt-get, as root) the package of each tool that is not on PATH; tools are
    program names or absolute paths."""
    missing = sorted({pkg for tool, pkg in tools.items() if not _present(tool)})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"missing {missing} and no apt-get to install them")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise RuntimeError(f"missing {missing}; install them as root")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(tag, f"installing {missing} with apt-get")
    with locked(cache_root() / "apt"):
        subprocess.run([*prefix, "apt-get", "update", "-q"], check=True, env=env)
        subprocess.run([*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends",
                        *missing], check=True, env=env)


def _present(tool: str) -> bool:
    return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None
