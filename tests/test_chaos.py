"""The chaos benchmark's short version (benchmarks/chaos.py, 8 s windows, 12 clients): two
real llama-servers and an emulated vLLM behind sluiceway, while one backend is killed and
restarted, one hangs (SIGSTOP), one answers 500s and then drops its streams, clients
disconnect and read slowly. Nothing may be lost, and each fault must really have hit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_fault_schedule_loses_no_request(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--clients",
                           "12", "--window-s", "8", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "chaos.json").read_text())
    rows = {r["window"]: r for r in report["windows"]}
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert all(r["lost"] == 0 for r in rows.values()), rows
    assert all(r["sent"] > 20 for r in rows.values())
    # nothing reached a client as an error status: every failure before the first byte was
    # retried on another backend
    assert all(not r["failed"] for r in rows.values()), rows
    # the faults hit: the backend answering 500s and the one killed were ejected within a
    # second, the killed one took traffic again after its restart, the streams cut by the
    # kill and by the mid-stream deaths ended with an error event, the storm's clients left
    assert rows["500s"]["ejected_after_s"] < 2
    assert rows["kill + restart"]["ejected_after_s"] < 2
    assert rows["kill + restart"]["traffic_again_after_s"] is not None
    assert rows["mid-stream death"]["in_band_errors"] > 0
    assert rows["disconnects"]["left"] > 0 and rows["disconnects"]["slots_freed"]["freed"]
    # the proxy's resources came back down when the load stopped
    tasks = report["resources"]["tasks"]
    assert tasks[-1] <= tasks[0] + 4
    assert (tmp_path / "chaos.png").stat().st_size > 10_000
