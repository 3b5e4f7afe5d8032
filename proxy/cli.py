"""The `sluiceway` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from proxy.app import serve
from proxy.settings import ConfigError, Settings, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sluiceway",
        description="OpenAI-compatible routing proxy for llama.cpp and vLLM backends.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the routing proxy")
    serve.add_argument("--config", required=True, metavar="PATH", help="TOML config file")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=_serve)
    health = commands.add_parser(
        "health", help="exit 0 when the proxy of this config answers /health (a container "
        "HEALTHCHECK that needs no curl)")
    health.add_argument("--config", required=True, metavar="PATH", help="TOML config file")
    health.add_argument("--timeout-s", type=float, default=3.0)
    health.set_defaults(run=_health)

    from emulator import cli as emulate_cli
    from loadgen import cli as bench_cli
    from loadgen import demo

    for name, module, summary, description in (
        ("emulate", emulate_cli,
         "run an emulated llama.cpp or vLLM server on a measured profile",
         "Serve the llama.cpp or vLLM API with timing that follows a measured performance "
         "profile (continuous batching on a virtual clock)."),
        ("bench", bench_cli,
         "load test OpenAI-compatible servers (closed loop, open loop, agents)",
         "Closed-loop concurrency sweeps, open-loop Poisson rates and agent sessions against "
         "one or more targets; metrics defined as in vllm bench serve."),
        ("demo", demo, "emulated llama.cpp + vLLM + sluiceway, swept side by side",
         (demo.__doc__ or "").split("\n\n")[0]),
    ):
        sub = commands.add_parser(name, help=summary, description=description)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


def _serve(args: argparse.Namespace) -> int:
    def read() -> Settings:
        """The config file with the command line's overrides (again on every reload)."""
        settings = load_settings(args.config)
        if args.host is None and args.port is None:
            return settings
        server = settings.server.model_copy(update={
            k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None
        })
        return settings.model_copy(update={"server": server})

    try:
        settings = read()
    except ConfigError as exc:
        print(f"sluiceway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(settings, reread=read))
    return 0


def _health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    try:
        server = load_settings(args.config).server
    except ConfigError as exc:
        print(f"sluiceway: {exc}", file=sys.stderr)
        return 2
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host,
                                                                     server.host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{server.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout_s) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"sluiceway: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this is for odd platforms
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    raise SystemExit(main())
