"""The real coding-agent CLIs, pinned, installed once per machine from npm.

    python -m tests.agents.install      # install or reuse; prints the bin directory

Codex CLI, Claude Code and opencode each ship a native binary in an npm package; they are
installed with `npm install --prefix` into `$SLUICEWAY_CACHE_DIR/agents/<pins>/` under a
lock. Node and npm come from Debian when missing. See ../shared/reference/agents.md.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

from tests.machine import cache_root, ensure_debian_packages, locked, log, run_logged

PINS = {
    "@openai/codex": "0.171.0",
    "@anthropic-ai/claude-code": "2.1.332",
    "opencode-ai": "1.18.33",
}
BINARIES = ("codex", "claude", "opencode")


def install() -> Path:
    """The `node_modules/.bin` holding the three clients."""
    key = hashlib.sha256(repr(sorted(PINS.items())).encode()).hexdigest()[:12]
    prefix = cache_root() / "agents" / key
    bin_dir = prefix / "node_modules" / ".bin"
    with locked(prefix):
        if all((bin_dir / b).exists() for b in BINARIES) and (prefix / ".done").exists():
            return bin_dir
        ensure_debian_packages({"node": "nodejs", "npm": "npm"}, "agents")
        started = time.monotonic()
        log("agents", f"npm install {' '.join(f'{p}@{v}' for p, v in PINS.items())}")
        npm = shutil.which("npm")
        assert npm is not None
        run_logged([npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix",
                    str(prefix), *(f"{p}@{v}" for p, v in PINS.items())],
                   prefix / "npm.log", timeout_s=1200)
        for binary in BINARIES:
            result = subprocess.run([str(bin_dir / binary), "--version"],
                                    capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise RuntimeError(f"{binary} --version failed: {result.stderr[-2000:]}")
        (prefix / ".done").write_text("ok\n")
        log("agents", f"installed in {time.monotonic() - started:.0f} s")
    return bin_dir


if __name__ == "__main__":
    print(install())
