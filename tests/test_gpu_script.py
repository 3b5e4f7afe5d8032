"""benchmarks/gpu/run.py, the GPU benchmark's entry script, dry-run on this CPU machine.

The GPU run itself needs the lent device (docs/benchmarks.md has its results); what can rot
unseen between device sessions is everything around the engines: starting them and the
proxies, the sweeps through `sluiceway bench`, merging, the table and the plot. The dry
run does all of it with the test suite's CPU llama-server and sluiceway's emulated vLLM
in place of `transformers serve`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.machine import cache_root
from tests.processes import ROOT


def test_the_entry_script_sweeps_engines_and_a_cold_pool(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cache = cache_root() / "gpu-dry-run"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu.run", "--dry-run", "--batching", "emulator",
         "--targets", "llama-server,transformers,adaptive,shared", "--levels", "1,2",
         "--shared-levels", "1", "--duration-s", "2", "--cache", str(cache),
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "gpu.json").read_text())["results"]
    labels = {(r["label"], r["max_concurrency"]) for r in results}
    assert labels == {(name, c) for name in ("llama-server", "transformers",
                                             "sluiceway (adaptive)") for c in (1, 2)} | {
        ("beside the other: llama-server", 1), ("beside the other: transformers", 1)}
    assert all(r["completed"] > 0 and r["failed"] == 0 for r in results), results
    table = (out / "gpu.md").read_text()
    pool = [line for line in table.splitlines() if line.startswith("| sluiceway (adaptive)")]
    assert len(pool) == 2 and all(line.rstrip(" |").endswith("x") for line in pool)
    assert (out / "gpu.png").read_bytes()[:4] == b"\x89PNG"
    assert "===== llama-server.log" in (out / "logs.txt").read_text()
    leftovers = subprocess.run(["pgrep", "-f", str(cache)], capture_output=True)
    assert leftovers.stdout == b""  # the engines it started are gone


def test_the_carried_wheels_cover_every_runtime_dependency() -> None:
    """A dependency added to pyproject and not to the carried wheels breaks the GPU run
    only on the GPU machine (it did once: `redis`); caught here instead."""
    import tomllib

    from benchmarks.gpu.carry import DEVICE_WHEELS, IMAGE_HAS

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {re.split(r"[<>=\[;! ]", dep, maxsplit=1)[0].lower()
              for dep in project["dependencies"]}
    carried = {wheel.split("==")[0].lower() for wheel in DEVICE_WHEELS} | set(IMAGE_HAS)
    assert needed - carried == set()
