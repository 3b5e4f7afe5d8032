"""What the real-server tests need: the built binary, the made model, a command line."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.realllama.build import Artifacts, build
from tests.realllama.model import Shape, write_model

MODEL_ALIAS = "tiny-llama"


@dataclass(frozen=True)
class RealLlama:
    server: Path
    model: Path
    version: str


def prepare(shape: Shape | None = None) -> RealLlama:
    """Build (or reuse) llama-server and write (or reuse) the test model beside it."""
    shape = shape or Shape()
    artifacts: Artifacts = build()
    key = hashlib.sha256(repr(sorted(asdict(shape).items())).encode()).hexdigest()[:12]
    model = artifacts.server.parent.parent / f"random-llama-{key}.gguf"
    if not model.is_file():
        write_model(artifacts.vocab, model, shape)
    return RealLlama(artifacts.server, model, artifacts.version)


def server_args(model: Path, port: int, slots: int, ctx_per_slot: int = 2048,
                threads: int = 1, metrics: bool = True,
                extra: tuple[str, ...] = ()) -> list[str]:
    """The flags that matter to sluiceway, spelled out (see docs/llamacpp.md)."""
    return [
        "--model", str(model),
        "--alias", MODEL_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--parallel", str(slots),
        "--ctx-size", str(ctx_per_slot * slots),
        "--threads", str(threads),
        "--threads-batch", str(threads),
        *(["--metrics"] if metrics else []),
        "--slots",
        "--no-webui",
        *extra,
    ]
