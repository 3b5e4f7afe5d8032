"""`sluiceway bench`: closed-loop sweeps, open-loop rates and agent sessions against one
or more OpenAI-compatible targets, reported like `vllm bench serve`."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loadgen import report
from loadgen.record import RequestRecord
from loadgen.runner import (
    LevelResult,
    Target,
    agent_sessions,
    closed_loop,
    discover_model,
    open_loop,
)
from loadgen.summary import Goodput
from loadgen.workload import Span, Workload, read_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("targets")
    target.add_argument("--url", action="append", default=[], metavar="[NAME=]URL",
                        help="base URL of a target (repeat to compare several side by side)")
    target.add_argument("--targets", type=Path, metavar="FILE",
                        help="TOML file with [[targets]] tables: name, url, model")
    target.add_argument("--model", help="model to ask for (default: the target's first)")
    load = parser.add_argument_group("load")
    load.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    load.add_argument("--concurrency", default="1,8,32,64,128",
                      help="closed-loop levels, comma-separated (default 1,8,32,64,128)")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--input-len", type=int, default=512)
    load.add_argument("--output-len", type=int, default=128)
    load.add_argument("--requests", type=int,
                      help="requests per level (default: 10 x concurrency, at least 20)")
    load.add_argument("--duration-s", type=float, help="seconds per level instead")
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="ask for ignore_eos so every reply is --output-len tokens (vLLM, "
                           "llama.cpp); --no-ignore-eos for servers that refuse unknown "
                           "fields, such as transformers serve (default: ask)")
    load.add_argument("--warmup", type=int, default=1, help="uncounted requests per level")
    load.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    load.add_argument("--workers", type=int, default=1,
                      help="client processes to spread each level over")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--prompts", metavar="FILE",
                      help='JSON lines of {"prompt": "..."} to send in order instead of '
                           "made-up prompts of --input-len words")
    load.add_argument("--tokenizer", metavar="PATH",
                      help="tokenizer.json that counts the output of streams without usage "
                           "(default: one token per content event; either way marked)")
    agent = parser.add_argument_group("agent workload")
    agent.add_argument("--workload", choices=["fixed", "agent"], default="fixed")
    agent.add_argument("--conversations", type=int, default=8)
    agent.add_argument("--turns", type=int, default=6)
    agent.add_argument("--prefix-tokens", type=int, default=2000,
                       help="stable shared prefix (system prompt) of every conversation")
    agent.add_argument("--opening-tokens", type=_span, metavar="N|A-B",
                       help="the first turn's context (files, the task), e.g. 20000-30000")
    agent.add_argument("--turn-tokens", type=_span, metavar="N|A-B",
                       help="what each later turn adds (tool results), e.g. 1000-3000 "
                            "(default: --input-len / --turns)")
    agent.add_argument("--reply-tokens", type=_span, metavar="N|A-B",
                       help="max_tokens per turn, e.g. 50-500 (default: --output-len)")
    agent.add_argument("--tool-time-s", type=float, default=0.0, metavar="S",
                       help="each agent waits 0..S s (uniform) between turns")
    agent.add_argument("--no-session-header", action="store_true",
                       help="do not send x-session-id (to compare without affinity)")
    out = parser.add_argument_group("output")
    out.add_argument("--percentiles", default="99", help="e.g. 50,90,99")
    out.add_argument("--goodput", metavar="SLOS", help="e.g. ttft:500,tpot:50")
    out.add_argument("--json", type=Path, metavar="PATH")
    out.add_argument("--csv", type=Path, metavar="PATH")
    out.add_argument("--plot", type=Path, metavar="PATH", help="PNG of tok/s and TTFT")
    out.add_argument("--html", type=Path, metavar="PATH")
    out.add_argument("--no-progress", action="store_true")


def _span(text: str) -> Span:
    try:
        return Span.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_targets(urls: list[str], file: Path | None, model: str | None) -> list[Target]:
    targets = []
    for spec in urls:
        name, sep, url = spec.partition("=")
        if not sep:
            url, name = spec, urlparse(spec).netloc or spec
        targets.append(Target(name, url.rstrip("/"), model))
    if file is not None:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
        for entry in data.get("targets", []):
            targets.append(Target(entry["name"], entry["url"].rstrip("/"),
                                  entry.get("model", model)))
    if not targets:
        raise ValueError("give at least one --url or a --targets file")
    return targets


def _levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise ValueError("--concurrency needs positive integers")
    return levels


def _worker(kwargs: dict[str, Any]) -> tuple[list[RequestRecord], float, float]:
    level = asyncio.run(closed_loop(**kwargs))
    return level.records, level.started, level.started + level.duration


def _spread(kwargs: dict[str, Any], workers: int) -> LevelResult:
    """One closed-loop level over several processes (timestamps share one clock)."""
    c, n = kwargs["concurrency"], kwargs["requests"]
    shares = [c // workers + (1 if i < c % workers else 0) for i in range(workers)]
    jobs = []
    for i, share in enumerate(s for s in shares if s):
        job = dict(kwargs, concurrency=share, seed=kwargs["seed"] + 1000 * i,
                   show_progress=False)
        if n is not None:
            job["requests"] = n * share // c + (1 if i < n * share % c else 0)
        jobs.append(job)
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        parts = pool.map(_worker, jobs)
    records = [r for part, _, _ in parts for r in part]
    start, end = min(p[1] for p in parts), max(p[2] for p in parts)
    return LevelResult(kwargs["target"], kwargs["workload"], c, None, records, end - start,
                       start)


async def _resolve_model(target: Target) -> str:
    return target.model or await discover_model(target.url)


def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    targets = parse_targets(args.url, args.targets, args.model)
    percentiles = [float(p) for p in args.percentiles.split(",") if p]
    goodput = Goodput.parse(args.goodput) if args.goodput else None
    results = []
    for target in targets:
        model = asyncio.run(_resolve_model(target))
        workload = Workload(args.endpoint, model, args.input_len, args.output_len,
                            tokenizer=args.tokenizer, ignore_eos=args.ignore_eos,
                            prompts=read_prompts(args.prompts) if args.prompts else ())
        common: dict[str, Any] = dict(warmup=args.warmup, timeout_s=args.timeout_s,
                                      seed=args.seed, show_progress=not args.no_progress)
        levels: list[LevelResult] = []
        if args.workload == "agent":
            levels.append(asyncio.run(agent_sessions(
                target, workload, args.conversations, args.turns,
                prefix_tokens=args.prefix_tokens, timeout_s=args.timeout_s, seed=args.seed,
                show_progress=not args.no_progress,
                session_header=not args.no_session_header,
                first_turn_tokens=args.opening_tokens, turn_tokens=args.turn_tokens,
                reply_tokens=args.reply_tokens, think_s=args.tool_time_s)))
        elif args.rate:
            levels.append(asyncio.run(open_loop(
                target, workload, args.rate, requests=args.requests or 200,
                duration_s=args.duration_s, **common)))
        else:
            for c in _levels(args.concurrency):
                requests = None if args.duration_s else (args.requests or max(20, 10 * c))
                kwargs = dict(common, target=target, workload=workload, concurrency=c,
                              requests=requests, duration_s=args.duration_s)
                if args.workers > 1 and c >= args.workers:
                    levels.append(_spread(kwargs, args.workers))
                else:
                    levels.append(asyncio.run(closed_loop(**kwargs)))
        results += [report.result_json(level, percentiles, goodput) for level in levels]
    return results


def write_outputs(args: argparse.Namespace, results: list[dict[str, Any]],
                  scale: float = 1.0, title: str = "sluiceway bench") -> None:
    if args.json:
        report.write_json(args.json, results, {"sluiceway_bench": 1, "speed_scale": scale})
    if args.csv:
        report.write_csv(args.csv, results)
    png = report.plot_png(results, scale) \
        if (args.plot or args.html) and report.can_plot() else b""
    if args.plot:
        args.plot.write_bytes(png)
    if args.html:
        tables = [report.console(results, scale)]
        if len({r["label"] for r in results}) > 1:
            tables.insert(0, report.side_by_side(results, scale))
        report.write_html(args.html, title, png, tables)


def run(args: argparse.Namespace) -> int:
    if args.plot and not report.can_plot():  # before the run, not after it
        print(f"sluiceway bench: --plot: {report.PLOT_MISSING}", file=sys.stderr)
        return 2
    try:
        results = run_bench(args)
    except (ValueError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"sluiceway bench: {exc}", file=sys.stderr)
        return 2
    print(report.console(results))
    if len({r["label"] for r in results}) > 1:
        print()
        print(report.side_by_side(results))
    write_outputs(args, results)
    return 0
