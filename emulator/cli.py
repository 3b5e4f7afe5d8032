"""`sluiceway emulate`: an emulated llama.cpp or vLLM server on a measured profile."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import uvicorn

from emulator.llamacpp import LlamaCppServer
from emulator.profile import ProfileError, get_profile, load_profiles
from emulator.server import EmulatedServer, Options
from emulator.vllm import VllmServer

DEFAULT_PORTS = {"llamacpp": 8080, "vllm": 8001}
DEFAULT_MAX_NUM_SEQS = 1024  # vLLM's default on a 160 GB+ card such as the MI300X
DEFAULT_MAX_NUM_BATCHED_TOKENS = 16384  # vLLM's API-server default on such a card
DEFAULT_BATCH_SIZE = 2048  # llama-server's -b/--batch-size (n_batch)


def step_tokens(engine: str, batch_size: int | None = None,
                max_num_batched_tokens: int | None = None) -> int:
    """The most tokens one engine step holds (decodes plus prompt chunks)."""
    if engine == "llamacpp":
        return batch_size or DEFAULT_BATCH_SIZE
    return max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS


def at_least_one(text: str) -> int:
    """argparse type of a count flag: an integer >= 1 (argparse reports the flag)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(sorted(load_profiles()))
    parser.add_argument("--engine", required=True, choices=["llamacpp", "vllm"],
                        help="which server's API and behaviour to emulate")
    parser.add_argument("--profile", required=True, metavar="NAME",
                        help=f"performance profile: {names}")
    parser.add_argument("--profile-file", type=Path, metavar="PATH",
                        help="extra TOML file with [engines.NAME] profiles")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: 8080 (llamacpp), 8001 (vllm)")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="run X times faster than the profile (every duration / X)")
    parser.add_argument("--slots", type=at_least_one, metavar="N",
                        help="llama.cpp slots (-np); default: the profile's default_slots")
    parser.add_argument("--max-num-seqs", type=at_least_one, metavar="N",
                        help=f"vLLM running sequences (default {DEFAULT_MAX_NUM_SEQS})")
    parser.add_argument("--max-num-batched-tokens", type=at_least_one, metavar="N",
                        help="vLLM: tokens per engine step, decodes and prompt chunks "
                             f"(chunked prefill; default {DEFAULT_MAX_NUM_BATCHED_TOKENS})")
    parser.add_argument("--batch-size", type=at_least_one, metavar="N",
                        help="llama.cpp: tokens per engine step, decodes and prompt chunks "
                             f"(-b, n_batch; default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--model", default="qwen3.6-35b-a3b",
                        help="model name served (vLLM refuses other names with 404)")
    parser.add_argument("--ctx", type=int, default=32768,
                        help="context size: prompt + reply tokens per request")
    faults = parser.add_argument_group("fault injection")
    faults.add_argument("--fail-rate", type=float, default=0.0, metavar="P",
                        help="answer this fraction of requests with HTTP 500")
    faults.add_argument("--die-after-tokens", type=int, metavar="N",
                        help="drop the connection after streaming N tokens")
    faults.add_argument("--hang-after-tokens", type=int, metavar="N",
                        help="stop sending (connection open) after N tokens")
    faults.add_argument("--startup-delay", type=float, default=0.0, metavar="S",
                        help="llama.cpp: answer 503 Loading model for S s; "
                             "vLLM: refuse connections for S s")
    faults.add_argument("--seed", type=int, default=0, help="seed for --fail-rate")
    faults.add_argument("--fault-control", action="store_true",
                        help="accept POST /_faults {fail_rate, die_after_tokens, "
                             "hang_after_tokens} to change the faults while running")


def build(args: argparse.Namespace) -> EmulatedServer:
    profile = get_profile(args.profile, args.profile_file)
    if profile.engine != args.engine:
        raise ProfileError(f"profile {profile.name} measures {profile.engine}, "
                           f"not {args.engine}")
    if args.speed <= 0:
        raise ProfileError("--speed must be positive")
    if args.engine == "llamacpp":
        running = args.slots or profile.default_slots or 4
    else:
        running = args.max_num_seqs or DEFAULT_MAX_NUM_SEQS
    options = Options(
        profile=profile, model=args.model, max_running=running, speed=args.speed,
        step_tokens=step_tokens(args.engine, args.batch_size, args.max_num_batched_tokens),
        ctx=args.ctx, fail_rate=args.fail_rate, die_after_tokens=args.die_after_tokens,
        hang_after_tokens=args.hang_after_tokens, startup_delay_s=args.startup_delay,
        seed=args.seed, fault_control=args.fault_control,
    )
    return LlamaCppServer(options) if args.engine == "llamacpp" else VllmServer(options)


def run(args: argparse.Namespace) -> int:
    try:
        app = build(args)
    except ProfileError as exc:
        print(f"sluiceway emulate: {exc}", file=sys.stderr)
        return 2
    port = args.port or DEFAULT_PORTS[args.engine]
    if args.engine == "vllm" and args.startup_delay > 0:
        time.sleep(args.startup_delay)  # vLLM is not listening while its engine starts
    uvicorn.run(
        app, host=args.host, port=port, log_level="warning", access_log=False,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on", backlog=4096, timeout_keep_alive=600,
    )
    return 0
