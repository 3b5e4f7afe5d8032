"""Cross-check `sluiceway bench` against independent load testers on the same servers.

    python benchmarks/crosscheck.py [--levels 1,8,32] [--servers all] [--tools all]
                                    [--json PATH]          (make crosscheck)

The same workload (chat, prompts of 128 words, 64 output tokens with ignore_eos,
temperature 0, closed loop at each level, max(32, 4 x level) requests after one uncounted
warm-up) is measured by:

- `sluiceway bench` (this project);
- `vllm bench serve` from the real vLLM the test suite installs (tests/realvllm/build.py):
  the reference whose definitions `sluiceway bench` claims;
- AIPerf (`aiperf profile`, NVIDIA's successor to genai-perf), installed from PyPI in its
  own venv under the cache directory, with `--use-server-token-count` so that it counts
  tokens as the server reports them, as the other two do;
- GuideLLM (`guidellm run`, vLLM's project's load tester), likewise in its own venv; it
  runs offline here given the local tokenizer directory.

on three servers: an emulated vLLM (`sluiceway emulate`), the real llama-server of the test
suite, and a server that writes its JSON spaced as Python's `json.dumps` does
(tests/upstream_server.py, style "python"). Every tool sends prompts from a file written
for its run (`--prompts`, vLLM's custom dataset, AIPerf's single_turn input file): made
the same way, so of the same length on every server's tokenizer, and each beginning with
a word unique to the run, so no tool's prompts hit a prefix cache that an earlier run
filled (a tool's own random prompts with a fixed seed repeat from run to run, and
llama-server and vLLM then serve them from cache). The external tools read the random
test model's tokenizer (made locally by tests/realvllm/model.py); nothing is downloaded
at run time.

Servers run on the first CPU and the tools on the others (`--no-pin` shares them): on a
small machine a tool that needs more CPU than it has then shows as its own ceiling rather
than by slowing the server every tool measures.

One table: output tok/s, requests/s, TTFT mean and p99, TPOT mean, ITL mean per server,
level and tool, and sluiceway's ratio to each other tool on every figure.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadgen.local import free_port, pin, spawn, wait_http  # noqa: E402
from loadgen.workload import Workload  # noqa: E402
from tests.realllama.build import cache_root  # noqa: E402
from tests.realllama.server import prepare, server_args  # noqa: E402
from tests.realvllm import server as vllm_server  # noqa: E402
from tests.realvllm.build import install as install_vllm  # noqa: E402

AIPERF_VERSION = "0.13.0"
GUIDELLM_VERSION = "0.8.1"
MODEL = vllm_server.MODEL_NAME  # every server answers to this name
INPUT_LEN, OUTPUT_LEN = 128, 64
FIGURES = ("out_tok_s", "req_s", "ttft_mean_ms", "ttft_p99_ms", "tpot_mean_ms", "itl_mean_ms")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "AIPERF_NO_TELEMETRY": "1"}


def requests_for(level: int) -> int:
    return max(32, 4 * level)


def install_tool(package: str, version: str, exe_name: str) -> Path:
    """An independent tool in its own venv, once per machine (under a lock); returns its
    executable."""
    root = cache_root() / "crosscheck" / f"{package}-{version}"
    exe = root / "venv" / "bin" / exe_name
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".installed").is_file():
            log = root / "install.log"
            with log.open("wb") as out:
                for cmd in ([sys.executable, "-m", "venv", "--clear", str(root / "venv")],
                            [str(root / "venv" / "bin" / "python"), "-m", "pip", "install",
                             "--progress-bar", "off", f"{package}=={version}"]):
                    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
                    if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode:
                        tail = log.read_text(errors="replace").splitlines()[-30:]
                        raise RuntimeError(f"{package} install failed:\n" + "\n".join(tail))
            (root / ".installed").write_text(version + "\n")
    return exe


def install_aiperf() -> Path:
    return install_tool("aiperf", AIPERF_VERSION, "aiperf")


def install_guidellm() -> Path:
    return install_tool("guidellm", GUIDELLM_VERSION, "guidellm")


class Servers:
    """The servers under test, each started on a free port (on `cpus`) and always
    stopped."""

    def __init__(self, workdir: Path, cpus: set[int]) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: Callable[[int], list[str]],
              timeout_s: float = 120) -> str:
        port = free_port()
        cmd = command(port)
        proc = spawn(cmd, self.workdir / f"{name}-{port}.log", ROOT, self.cpus,
                     new_session=True)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc, timeout_s=timeout_s)
        return url

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def emulated_vllm(servers: Servers) -> str:
    return servers.start("emulated-vllm", lambda port: [
        sys.executable, "-m", "proxy.cli", "emulate", "--engine", "vllm", "--profile",
        "vllm-fp8-aiter", "--speed", "2", "--model", MODEL, "--port", str(port)])


def real_llama(servers: Servers) -> str:
    real = prepare()
    return servers.start("llama-server",
                         lambda port: [str(real.server), *server_args(real.model, port, 4)])


def spaced_json(servers: Servers) -> str:
    url = servers.start("spaced-json", lambda port: [
        sys.executable, "-m", "tests.upstream_server", "--port", str(port), "--model", MODEL,
        "--token-delay-ms", "4", "--first-delay-ms", "20"])
    import httpx

    httpx.post(url + "/_control", json={"style": "python"}, timeout=5)
    return url


SERVERS: dict[str, Callable[[Servers], str]] = {
    "emulated vLLM": emulated_vllm,
    "llama-server": real_llama,
    "spaced JSON": spaced_json,
}


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None,
        timeout_s: float = 900) -> None:
    with log.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **OFFLINE, **(env or {})}, timeout=timeout_s)
    if done.returncode:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}):\n" + "\n".join(tail))


def prompts_file(path: Path, count: int, key: str = "prompt") -> Path:
    """`count` prompts of INPUT_LEN words (as `sluiceway bench` makes them: a first word
    unique to this process and request, then common words), as JSON lines."""
    rng = random.Random(0)
    made = Workload("chat", MODEL, INPUT_LEN, OUTPUT_LEN)
    path.write_text("".join(json.dumps({key: made.prompt(rng)}) + "\n" for _ in range(count)))
    return path


def sluiceway(url: str, level: int, work: Path, tokenizer: Path) -> dict[str, float]:
    out = work / f"sluiceway-{level}.json"
    prompts = prompts_file(work / f"sluiceway-{level}.jsonl", requests_for(level) + 1)
    run([sys.executable, "-m", "proxy.cli", "bench", "--url", url, "--model", MODEL,
         "--concurrency", str(level), "--requests", str(requests_for(level)),
         "--prompts", str(prompts), "--output-len", str(OUTPUT_LEN), "--warmup", "1",
         "--json", str(out), "--no-progress"], work / "sluiceway.log")
    r = json.loads(out.read_text())["results"][0]
    return _vllm_keys(r)


def vllm_bench_ready() -> Path:
    """The vLLM the tests install, plus pandas, which `vllm bench serve` needs for a custom
    dataset (added once, under the install's lock)."""
    real = install_vllm()
    root = real.python.parent.parent.parent
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run([str(real.python), "-c", "import pandas"],
                          capture_output=True).returncode:
            subprocess.run([str(real.python), "-m", "pip", "install", "--quiet", "pandas"],
                           check=True)
    return real.vllm


def vllm_bench(url: str, level: int, work: Path, tokenizer: Path) -> dict[str, float]:
    vllm = vllm_bench_ready()
    name = f"vllm-{level}.json"
    run([str(vllm), "bench", "serve", "--backend", "openai-chat", "--base-url", url,
         "--endpoint", "/v1/chat/completions", "--model", MODEL, "--tokenizer",
         str(tokenizer), "--dataset-name", "custom", "--dataset-path",
         str(prompts_file(work / f"vllm-{level}.jsonl", requests_for(level) + 1)),
         "--custom-output-len", str(OUTPUT_LEN), "--skip-chat-template",
         "--num-prompts", str(requests_for(level)),
         "--max-concurrency", str(level), "--request-rate", "inf", "--ignore-eos",
         "--temperature", "0", "--num-warmups", "1", "--percentile-metrics",
         "ttft,tpot,itl,e2el", "--metric-percentiles", "99", "--save-result",
         "--result-dir", str(work), "--result-filename", name],
        work / "vllm-bench.log", env=vllm_server.ENV)
    return _vllm_keys(json.loads((work / name).read_text()))


def aiperf(url: str, level: int, work: Path, tokenizer: Path) -> dict[str, float]:
    exe = install_aiperf()
    out = work / f"aiperf-{level}"
    run([str(exe), "profile", "--model", MODEL, "--url", url, "--endpoint-type", "chat",
         "--streaming", "--concurrency", str(level), "--request-count",
         str(requests_for(level)), "--warmup-request-count", "1",
         "--input-file", str(prompts_file(work / f"aiperf-{level}.jsonl",
                                          requests_for(level) + 1, key="text")),
         "--custom-dataset-type", "single_turn", "--dataset-sampling-strategy", "sequential",
         "--prompt-output-tokens-mean", str(OUTPUT_LEN), "--prompt-output-tokens-stddev",
         "0", "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
         "--use-server-token-count", "--tokenizer", str(tokenizer), "--artifact-dir",
         str(out), "--ui-type", "none", "--random-seed", "0"], work / "aiperf.log",
        # AIPerf 0.13 resolves every tokenizer name as a Hub repo when HF_HUB_OFFLINE is
        # set, so a local directory fails; unset, it loads the directory (and its alias
        # lookup fails fast here: no DNS)
        env={"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": ""})
    found = sorted(out.rglob("profile_export_aiperf.json"))
    if not found:
        raise RuntimeError(f"aiperf wrote no profile_export_aiperf.json under {out}")
    return _aiperf_keys(json.loads(found[-1].read_text()))


def guidellm(url: str, level: int, work: Path, tokenizer: Path) -> dict[str, float]:
    exe = install_guidellm()
    out = work / f"guidellm-{level}.json"
    prompts = prompts_file(work / f"guidellm-{level}.jsonl", requests_for(level))
    # each line also says how many tokens to ask for: GuideLLM then sends max_tokens and
    # ignore_eos, as the other tools are told to
    prompts.write_text("".join(
        json.dumps({**json.loads(line), "output_tokens_count": OUTPUT_LEN}) + "\n"
        for line in prompts.read_text().splitlines()))
    run([str(exe), "run", "--backend", f"kind=openai_http,target={url},model={MODEL}",
         "--profile", f"kind=concurrent,streams={level}",
         "--constraint", f"kind=max_requests,count={requests_for(level)}",
         "--data", f"kind=json_file,path={prompts}",
         "--tokenizer", f"kind=hf_auto,model={tokenizer}",
         "--output", f"kind=json,path={out}", "--disable-progress"],
        work / "guidellm.log")
    return _guidellm_keys(json.loads(out.read_text()))


TOOLS: dict[str, Callable[[str, int, Path, Path], dict[str, float]]] = {
    "sluiceway bench": sluiceway,
    "vllm bench serve": vllm_bench,
    "aiperf": aiperf,
    "guidellm": guidellm,
}


def _vllm_keys(r: dict[str, Any]) -> dict[str, float]:
    return {"out_tok_s": r["output_throughput"], "req_s": r["request_throughput"],
            "ttft_mean_ms": r["mean_ttft_ms"], "ttft_p99_ms": r["p99_ttft_ms"],
            "tpot_mean_ms": r["mean_tpot_ms"], "itl_mean_ms": r["mean_itl_ms"],
            "completed": r["completed"], "failed": r.get("failed", 0)}


def _aiperf_keys(r: dict[str, Any]) -> dict[str, float]:
    def stat(name: str, key: str = "avg") -> float:
        value = r.get(name, {})
        return float(value.get(key, 0.0)) if isinstance(value, dict) else 0.0

    return {"out_tok_s": stat("output_token_throughput"),
            "req_s": stat("request_throughput"),
            "ttft_mean_ms": stat("time_to_first_token"),
            "ttft_p99_ms": stat("time_to_first_token", "p99"),
            "tpot_mean_ms": stat("inter_token_latency"),
            "itl_mean_ms": stat("inter_chunk_latency"),
            "completed": stat("request_count"), "failed": stat("error_request_count")}


def _guidellm_keys(report: dict[str, Any]) -> dict[str, float]:
    """GuideLLM's figures under vLLM's names. Its output tokens/s and requests/s "mean" are
    time-weighted over the run, so the whole-run rate (total / duration, as vLLM's). Its
    `time_per_output_token_ms` divides the whole latency, TTFT included, by the tokens;
    its `inter_token_latency_ms`, (latency - TTFT) / (tokens - 1), is what vLLM calls
    TPOT, so that goes in both the TPOT and the ITL columns."""
    m = report["benchmarks"][-1]["metrics"]

    def ok(name: str) -> dict[str, Any]:
        value: dict[str, Any] = m[name]["successful"]
        return value

    totals = m["request_totals"]
    return {"out_tok_s": ok("output_tokens_per_second")["mean"],
            "req_s": ok("requests_per_second")["mean"],
            "ttft_mean_ms": ok("time_to_first_token_ms")["mean"],
            "ttft_p99_ms": ok("time_to_first_token_ms")["percentiles"]["p99"],
            "tpot_mean_ms": ok("inter_token_latency_ms")["mean"],
            "itl_mean_ms": ok("inter_token_latency_ms")["mean"],
            "completed": float(totals["successful"]),
            "failed": float(totals["errored"] + totals["incomplete"])}


def table(results: dict[str, dict[int, dict[str, dict[str, float]]]]) -> str:
    header = (f"{'server':<14} {'conc':>4} {'tool':<17} {'out tok/s':>10} {'req/s':>7} "
              f"{'TTFT mean':>10} {'TTFT p99':>9} {'TPOT mean':>10} {'ITL mean':>9}  "
              f"sluiceway / tool")
    lines = [header, "-" * (len(header) + 30)]
    for server, levels in results.items():
        for level, tools in levels.items():
            ours = tools.get("sluiceway bench")
            for tool, m in tools.items():
                ratio = ""
                if ours and tool != "sluiceway bench":
                    ratio = " ".join(f"{_ratio(ours[f], m[f])}" for f in FIGURES)
                lines.append(
                    f"{server:<14} {level:>4} {tool:<17} {m['out_tok_s']:>10,.1f} "
                    f"{m['req_s']:>7.2f} {m['ttft_mean_ms']:>8.1f}ms {m['ttft_p99_ms']:>7.1f}ms"
                    f" {m['tpot_mean_ms']:>8.2f}ms {m['itl_mean_ms']:>7.2f}ms  {ratio}")
    lines.append("ratios in the order: out tok/s, req/s, TTFT mean, TTFT p99, TPOT, ITL")
    return "\n".join(lines)


def _children_cpu_s() -> float:
    """User + system CPU of every finished child process (and theirs), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.3f}" if theirs else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--servers", default="all", help=", ".join(SERVERS))
    parser.add_argument("--tools", default="all", help=", ".join(TOOLS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-pin", action="store_true",
                        help="let servers and tools share every CPU (see pin())")
    args = parser.parse_args()
    server_cpus = pin(not args.no_pin)
    levels = [int(x) for x in args.levels.split(",")]
    servers = SERVERS if args.servers == "all" else {
        k: SERVERS[k] for k in args.servers.split(",")}
    tools = TOOLS if args.tools == "all" else {k: TOOLS[k] for k in args.tools.split(",")}
    tokenizer = install_vllm().model  # the random test model's tokenizer, made locally
    if "aiperf" in tools:
        install_aiperf()
    if "guidellm" in tools:
        install_guidellm()
    work = Path(tempfile.mkdtemp(prefix="sluiceway-crosscheck-"))
    print(f"logs and raw results: {work}", file=sys.stderr)
    results: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    for server, start in servers.items():
        fleet = Servers(work, server_cpus)
        try:
            url = start(fleet)
            place = work / server.replace(" ", "-")
            place.mkdir()
            results[server] = {}
            for level in levels:
                results[server][level] = {}
                for tool, measure in tools.items():
                    started = time.monotonic()
                    before = _children_cpu_s()
                    m = measure(url, level, place, tokenizer)
                    # the tool's CPU over its whole run (start-up included): on a 2-core
                    # machine a heavier client takes CPU from the server under test
                    m["tool_cpu_s"] = _children_cpu_s() - before
                    results[server][level][tool] = m
                    print(f"  {server} c={level} {tool}: {m['out_tok_s']:,.1f} tok/s, "
                          f"{m['completed']:.0f} ok, {m['failed']:.0f} failed, "
                          f"{m['tool_cpu_s']:.1f} CPU-s ({time.monotonic() - started:.0f} s)",
                          file=sys.stderr, flush=True)
        finally:
            fleet.stop_all()
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
