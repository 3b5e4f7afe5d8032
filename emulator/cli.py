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
    parser.add_argument("--slots", type=int, metavar="N",
                        help="llama.cpp slots (-np); default: the profile's default_slots")
    parser.add_argument("--max-num-seqs", type=int, metavar="N",
                        help=f"vLLM running sequences (default {DEFAULT_MAX_NUM_SEQS})")
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
