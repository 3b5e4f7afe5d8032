"""The fault matrix under load: a mixed closed-loop load through sluiceway while a schedule
injects faults, reported per fault window.

    python benchmarks/chaos.py [--clients 32] [--window-s 20] [--out out/chaos]

The pool: two real llama-server instances (the pinned build and the test model, 4 slots
each) and an emulated vLLM (`sluiceway emulate --fault-control`, capped at 3/4 of the
clients), behind one `sluiceway serve` with its production defaults (health every 5 s
within 2 s, ejection after 3 failures) except the policy: `least_loaded` by default, so
that every backend carries traffic when its fault hits (`adaptive` sends nearly all of it
to the emulated vLLM, which is faster here than the real engine on one CPU thread, and a
fault on an idle backend tests nothing; `--policy adaptive` runs it anyway). Windows, each
`--window-s` long, in order:

  baseline          no fault
  500s              the vLLM emulator answers every request with 500
  kill + restart    SIGKILL llama-a; started again half-way through the window
  hang              SIGSTOP llama-b for the window, then SIGCONT
  mid-stream death  the vLLM emulator drops every stream after 5 tokens
  disconnects       30% of streams are abandoned by their client after 3 events
  slow readers      4 clients read their streams with a pause between reads
  recovery          no fault

(The two faults of the emulated vLLM are two windows apart: an ejection's backoff doubles
while its trials fail, so it may stay out for a while after its fault ends.) Per window,
for the requests that ended in it: sent, ok, failed by status, in-band errors, left (by
the client), **lost** (no status and no in-band error; must be 0), and from the proxy's
/metrics sampled every 0.5 s: time from the fault to the first retry, to the ejection, and
from the end of the fault to the backend's next routed request. After the disconnect storm:
whether every llama.cpp slot was freed (its /slots against the proxy's in-flight count).
Throughout: the proxy's RSS, open fds and event-loop tasks, plotted to chaos.png.
Exit status 1 when any request was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from benchmarks.mixed_load import Behaviour, Load, Result  # noqa: E402
from loadgen.local import free_port, wait_http  # noqa: E402
from tests.realllama.server import MODEL_ALIAS, prepare, server_args  # noqa: E402

MODEL = MODEL_ALIAS


class ChaosPool:
    """The servers, each on a free port, started and stopped by PID."""

    def __init__(self, workdir: Path, slots: int = 4) -> None:
        self.workdir = workdir
        self.slots = slots
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, list[str]] = {}
        self.urls: dict[str, str] = {}
        self.llama = prepare()

    def start_all(self, policy: str, vllm_capacity: int) -> str:
        for name in ("llama-a", "llama-b"):
            self._start(name, lambda port: [str(self.llama.server), *server_args(
                self.llama.model, port, self.slots)])
        self._start("vllm-emu", lambda port: [
            sys.executable, "-m", "proxy.cli", "emulate", "--engine", "vllm", "--profile",
            "vllm-fp8-aiter", "--speed", "1", "--model", MODEL, "--port", str(port),
            "--fault-control"])
        config = self.workdir / "sluiceway.toml"
        config.write_text(_toml(self.urls, {"routing": {"policy": policy}}, vllm_capacity))
        return self._start("proxy", lambda port: [
            sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port",
            str(port)], timeout_s=120)

    def _start(self, name: str, command: Callable[[int], list[str]],
               port: int | None = None, timeout_s: float = 60) -> str:
        port = port or free_port()
        cmd = self.commands[name] = command(port)
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        url = self.urls[name] = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc, timeout_s=timeout_s)
        return url

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.killpg(self.procs[name].pid, sig)
        if sig is signal.SIGKILL:
            self.procs[name].wait(10)

    def restart(self, name: str) -> None:
        port = int(self.urls[name].rsplit(":", 1)[1])
        cmd = self.commands[name]
        self._start(name, lambda _port: cmd, port=port)

    def faults(self, **changes: object) -> None:
        post(self.urls["vllm-emu"] + "/_faults", changes)

    def busy_slots(self) -> int:
        busy = 0
        for name in ("llama-a", "llama-b"):
            slots = get_json(self.urls[name] + "/slots")
            busy += sum(1 for s in slots if s.get("is_processing"))
        return busy

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _toml(urls: dict[str, str], extra: dict[str, Any], vllm_capacity: int) -> str:
    lines = []
    for section, values in extra.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    for name in ("llama-a", "llama-b", "vllm-emu"):
        kind = "vllm" if name == "vllm-emu" else "llamacpp"
        lines += ["[[backends]]", f'name = "{name}"', f'kind = "{kind}"',
                  f'url = "{urls[name]}"', f'models = ["{MODEL}"]']
        if name == "vllm-emu":
            lines.append(f"max_concurrency = {vllm_capacity}")
    return "\n".join(lines) + "\n"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def post(url: str, data: object) -> Any:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


# --- sampling the proxy --------------------------------------------------------------

WATCHED = ("sluiceway_retries_total", "sluiceway_routing_decisions_total",
           "sluiceway_backend_ejected", "sluiceway_backend_in_flight",
           "process_resident_memory_bytes", "process_open_fds", "sluiceway_event_loop_tasks",
           "sluiceway_client_connections")


TASKS = "sluiceway_event_loop_tasks"


@dataclass
class Sample:
    t: float  # monotonic
    values: dict[str, float]  # "name{backend}" -> value (summed over other labels)


@dataclass
class Sampler:
    url: str
    every_s: float = 0.5
    samples: list[Sample] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                text = await asyncio.to_thread(_fetch, self.url + "/metrics")
                self.samples.append(Sample(time.monotonic(), _parse(text)))
            except OSError:
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)

    def first(self, after: float, key: str, condition: Callable[[float, float], bool]
              ) -> float | None:
        """Seconds from `after` to the first sample where condition(value, value at
        `after`) holds."""
        base = next((s.values.get(key, 0.0) for s in reversed(self.samples) if s.t <= after),
                    0.0)
        for s in self.samples:
            if s.t > after and condition(s.values.get(key, 0.0), base):
                return s.t - after
        return None


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def _parse(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in WATCHED:
                continue
            backend = sample.labels.get("backend")
            key = f"{sample.name}{{{backend}}}" if backend else sample.name
            out[key] = out.get(key, 0.0) + sample.value
    return out


# --- the schedule ----------------------------------------------------------------------

@dataclass
class Window:
    name: str
    begin: Callable[[], None] = lambda: None
    middle: Callable[[], None] | None = None  # half-way through
    end: Callable[[], None] = lambda: None
    behaviour: Behaviour = field(default_factory=Behaviour)
    started: float = 0.0
    ended: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def schedule(pool: ChaosPool) -> list[Window]:
    return [
        Window("baseline"),
        Window("500s", begin=lambda: pool.faults(fail_rate=1.0),
               end=lambda: pool.faults(fail_rate=0.0)),
        Window("kill + restart", begin=lambda: pool.signal("llama-a", signal.SIGKILL),
               middle=lambda: pool.restart("llama-a")),
        Window("hang (SIGSTOP)", begin=lambda: pool.signal("llama-b", signal.SIGSTOP),
               end=lambda: pool.signal("llama-b", signal.SIGCONT)),
        Window("mid-stream death", begin=lambda: pool.faults(die_after_tokens=5),
               end=lambda: pool.faults(die_after_tokens=None)),
        Window("disconnects", behaviour=Behaviour(disconnect_share=0.3)),
        Window("slow readers", behaviour=Behaviour(slow_readers=4)),
        Window("recovery"),
    ]


async def run(pool: ChaosPool, proxy: str, clients: int, window_s: float,
              windows: list[Window]) -> tuple[list[Result], Sampler]:
    load = Load(proxy, MODEL, clients, seed=1)
    sampler = Sampler(proxy)
    async with loaded(load, sampler):
        for w in windows:
            print(f"[{time.strftime('%H:%M:%S')}] {w.name}", file=sys.stderr, flush=True)
            await play(w, load, window_s)
            if w.name == "disconnects":
                w.notes["slots_freed"] = await slots_freed(pool, sampler)
    return load.results, sampler


@contextlib.asynccontextmanager
async def loaded(load: Load, sampler: Sampler) -> AsyncIterator[None]:
    """The load and the sampler run inside; at the end the clients finish their requests
    and the proxy is given time to settle (sampled)."""
    stop_sampling = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop_sampling))
    running = asyncio.create_task(load.run())
    try:
        yield
    finally:
        load.stop()
        await running
        await settled(sampler)
        stop_sampling.set()
        await sampling


async def play(w: Window, load: Load, span_s: float) -> None:
    """One fault window: its fault begins, (half-way) changes, and ends after `span_s`."""
    load.window, load.behaviour = w.name, w.behaviour
    w.started = time.monotonic()
    await asyncio.to_thread(w.begin)
    if w.middle is not None:
        await asyncio.sleep(span_s / 2)
        await asyncio.to_thread(w.middle)
        w.notes["middle_at"] = time.monotonic()
        await asyncio.sleep(span_s / 2)
    else:
        await asyncio.sleep(span_s)
    await asyncio.to_thread(w.end)
    w.ended = time.monotonic()


async def settled(sampler: Sampler, within_s: float = 10) -> None:
    """After the load: give the proxy up to `within_s` to finish what it still has in
    flight (tasks back to their count before the load), sampling on."""
    deadline = time.monotonic() + within_s
    first = sampler.samples[0].values.get(TASKS, 0.0) if sampler.samples else 0.0
    while time.monotonic() < deadline:
        if sampler.samples and sampler.samples[-1].values.get(TASKS, 0.0) <= first + 1:
            return
        await asyncio.sleep(0.2)


async def slots_freed(pool: ChaosPool, sampler: Sampler) -> dict[str, Any]:
    """Right after the storm: every busy llama.cpp slot is one the proxy still has in
    flight (none is held for a client that left), checked for up to 3 s."""
    deadline = time.monotonic() + 3
    while True:
        busy = await asyncio.to_thread(pool.busy_slots)
        text = await asyncio.to_thread(_fetch, pool.urls["proxy"] + "/metrics")
        values = _parse(text)
        in_flight = sum(values.get(f"sluiceway_backend_in_flight{{{n}}}", 0)
                        for n in ("llama-a", "llama-b"))
        if busy <= in_flight or time.monotonic() > deadline:
            return {"busy_slots": busy, "proxy_in_flight": in_flight,
                    "freed": busy <= in_flight}
        await asyncio.sleep(0.2)


# --- the report ------------------------------------------------------------------------

def summarize(windows: list[Window], results: list[Result], sampler: Sampler
              ) -> list[dict[str, Any]]:
    rows = []
    for w in windows:
        mine = [r for r in results if r.window == w.name]
        failed: dict[str, int] = {}
        for r in mine:
            if r.outcome == "failed":
                failed[str(r.status)] = failed.get(str(r.status), 0) + 1
        row: dict[str, Any] = {
            "window": w.name, "sent": len(mine),
            "ok": sum(r.outcome == "ok" for r in mine), "failed": failed,
            "in_band_errors": sum(r.outcome == "in_band_error" for r in mine),
            "left": sum(r.outcome == "left" for r in mine),
            "lost": sum(r.outcome == "lost" for r in mine),
            "lost_details": [r.detail for r in mine if r.outcome == "lost"][:5],
            **{k: v for k, v in w.notes.items() if k != "middle_at"},
        }
        fault_backend = {"kill + restart": "llama-a", "hang (SIGSTOP)": "llama-b",
                         "500s": "vllm-emu", "mid-stream death": "vllm-emu"}.get(w.name)
        if fault_backend:
            more = lambda v, base: v > base  # noqa: E731
            row["first_retry_s"] = sampler.first(
                w.started, f"sluiceway_retries_total{{{fault_backend}}}", more)
            row["ejected_after_s"] = sampler.first(
                w.started, f"sluiceway_backend_ejected{{{fault_backend}}}", lambda v, _: v > 0)
            back_from = w.notes.get("middle_at", w.ended)
            row["traffic_again_after_s"] = sampler.first(
                back_from, f"sluiceway_routing_decisions_total{{{fault_backend}}}", more)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = ["| window | sent | ok | failed (status: n) | in-band errors | left | **lost** | "
             "first retry s | ejected after s | traffic again after s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(r["failed"].items())) or "-"
        lines.append(f"| {r['window']} | {r['sent']} | {r['ok']} | {failed} | "
                     f"{r['in_band_errors']} | {r['left']} | **{r['lost']}** | "
                     f"{s(r.get('first_retry_s'))} | {s(r.get('ejected_after_s'))} | "
                     f"{s(r.get('traffic_again_after_s'))} |")
    return "\n".join(lines)


def resources(sampler: Sampler) -> dict[str, list[float]]:
    t0 = sampler.samples[0].t if sampler.samples else 0.0
    series: dict[str, list[float]] = {"t_s": [], "rss_mb": [], "open_fds": [], "tasks": []}
    for s in sampler.samples:
        series["t_s"].append(round(s.t - t0, 2))
        series["rss_mb"].append(s.values.get("process_resident_memory_bytes", 0) / 2**20)
        series["open_fds"].append(s.values.get("process_open_fds", 0))
        series["tasks"].append(s.values.get("sluiceway_event_loop_tasks", 0))
    return series


def plot(series: dict[str, list[float]], windows: list[Window], t0: float, path: Path,
         title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    for ax, key, label in zip(axes, ("rss_mb", "open_fds", "tasks"),
                              ("RSS (MB)", "open fds", "event-loop tasks"), strict=True):
        ax.plot(series["t_s"], series[key], lw=1)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(series[key] or [1]) * 1.2)
        for w in windows:
            ax.axvline(w.started - t0, color="grey", lw=0.5, ls=":")
    for w in windows:
        axes[0].annotate(w.name, (w.started - t0, 0), rotation=90, fontsize=7,
                         va="bottom", xytext=(2, 2), textcoords="offset points")
    axes[-1].set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--window-s", type=float, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "chaos")
    parser.add_argument("--policy", default="least_loaded")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pool = ChaosPool(args.out)
    try:
        proxy = pool.start_all(args.policy, max(1, args.clients * 3 // 4))
        windows = schedule(pool)
        results, sampler = asyncio.run(run(pool, proxy, args.clients, args.window_s, windows))
    finally:
        pool.stop_all()
    rows = summarize(windows, results, sampler)
    series = resources(sampler)
    t0 = sampler.samples[0].t if sampler.samples else 0.0
    plot(series, windows, t0, args.out / "chaos.png",
         f"sluiceway under the fault schedule: {args.clients} clients, "
         f"{args.window_s:g} s windows, {args.policy}")
    (args.out / "chaos.json").write_text(json.dumps({
        "clients": args.clients, "window_s": args.window_s, "policy": args.policy,
        "windows": rows,
        "resources": series, "results": [asdict(r) for r in results]}, indent=1))
    text = table(rows)
    (args.out / "chaos.md").write_text(text + "\n")
    print(text)
    lost = sum(r["lost"] for r in rows)
    print(f"\n{len(results)} requests, {lost} lost; RSS {min(series['rss_mb'] or [0]):.0f}-"
          f"{max(series['rss_mb'] or [0]):.0f} MB, fds {min(series['open_fds'] or [0]):.0f}-"
          f"{max(series['open_fds'] or [0]):.0f}, tasks {min(series['tasks'] or [0]):.0f}-"
          f"{max(series['tasks'] or [0]):.0f}; {args.out}/chaos.png")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
