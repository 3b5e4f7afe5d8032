"""Fetch what the GPU benchmark needs and a bare GPU machine lacks: `make gpu-carry`.

Writes, under `.carry/` (ignored by git, small enough to travel with the checkout):

- `wheels/`: the Python packages that `sluiceway` and `transformers serve` need and a
  CUDA image with PyTorch and transformers does not have (fastapi, uvicorn, pydantic, the
  openai 1.x client `transformers serve` imports, gguf to write the model, ...), as
  manylinux x86-64 wheels for the target's Python (default 3.12), without their
  dependencies: each one is named in `DEVICE_WHEELS`.
- `llama-src.tar.xz`: the llama.cpp tree of the pinned `llama-cpp-python` sdist (the
  same pin as the test suite's CPU build), slimmed from 76 MB to about 5 MB: no docs,
  no other GPU backends, no sample models but the vocabulary the GGUF model is made from.

On the GPU machine: `pip install --no-index --no-deps --target DIR .carry/wheels/*.whl`
and `PYTHONPATH=DIR`; `benchmarks/gpu/run.py` finds the source tarball by itself.

    python -m benchmarks.gpu.carry [--python-version 3.12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests.realllama.build import LLAMA_CPP_PYTHON_VERSION, VOCAB_NAME, fetch_source

CARRY = Path(".carry")
SOURCE_TARBALL = CARRY / "llama-src.tar.xz"

# name==version: what the image lacks, pinned where it matters. openai stays below 2:
# transformers 5.x's serving code imports names that openai 2 moved. fastapi 0.165 imports
# opentelemetry-api at start, which the H200 image of 2026-12-03 lacked (transformers
# serve failed to start there).
DEVICE_WHEELS = [
    "opentelemetry-api==1.45.2",
    "fastapi==0.165.0", "starlette==1.10.0", "annotated-doc==0.0.7", "uvicorn==0.55.0",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "pydantic-settings==2.16.3",
    "python-dotenv==1.2.4", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "typing-extensions==4.16.0", "orjson==3.13.0", "httptools==0.9.0",
    "openai==1.109.1", "distro==1.9.0", "jiter==0.19.0", "sniffio==1.3.1",
    "gguf==0.19.0", "redis==8.1.0", "hiredis==3.5.0",
]

# sluiceway's own dependencies that the device image already has (seen on the lent H200
# image, 2026-12-02): with DEVICE_WHEELS they cover pyproject's list (tests/test_gpu_script.py)
IMAGE_HAS = ("aiohttp", "yarl", "uvloop", "prometheus-client")

# Parts of the vendored tree a CUDA build of llama-server and llama-quantize never reads.
_SKIP = ("docs", "media", "benches", "examples", ".github", "gguf-py", "conversion",
         "tests", "tools/ui/src", "tools/ui/static", "tools/ui/tests",
         *(f"ggml/src/ggml-{b}" for b in ("vulkan", "sycl", "opencl", "metal", "hexagon",
                                          "webgpu", "et", "cann", "musa", "zdnn")))


def wheels(dest: Path, python_version: str) -> None:
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", "--dest", str(dest)]
    for platform in [*platforms, "manylinux2014_x86_64", "manylinux1_x86_64"]:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *DEVICE_WHEELS], check=True)


def _keep(tree: Path, member: tarfile.TarInfo) -> bool:
    rel = Path(member.name).relative_to(tree.name).as_posix()
    if rel.startswith("models/"):
        return rel == f"models/{VOCAB_NAME}"
    return not any(rel == s or rel.startswith(s + "/") for s in _SKIP)


def source(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="llama-src-") as tmp:
        tree = fetch_source(LLAMA_CPP_PYTHON_VERSION, Path(tmp))
        partial = out.with_suffix(".partial")
        with tarfile.open(partial, "w:xz") as tar:
            tar.add(tree, arcname=tree.name,
                    filter=lambda m: m if _keep(tree, m) else None)
        partial.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args(argv)
    (CARRY / "wheels").mkdir(parents=True, exist_ok=True)
    wheels(CARRY / "wheels", args.python_version)
    if not SOURCE_TARBALL.is_file():
        source(SOURCE_TARBALL)
    size = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file())
    print(f"{CARRY}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
