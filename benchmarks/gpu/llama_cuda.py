"""Build the pinned llama-server (and llama-quantize) with CUDA, once per cache directory.

The source is the slim tarball `make gpu-carry` writes (`.carry/llama-src.tar.xz`), or
the pinned sdist fetched from PyPI where the machine can reach it. Flags as measured on
the lent H100 (shared/reference/gpu.md): CUDA for the machine's own architecture (90 on
Hopper; `native` elsewhere), Release, static ggml, no curl/OpenSSL/web UI download, Ninja
where it exists. About 4.5 minutes at -j16. (Dry runs on a CPU use the test suite's own
llama-server build instead: tests/realllama.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.realllama.build import LLAMA_CPP_PYTHON_VERSION, VOCAB_NAME, fetch_source

_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
]


@dataclass(frozen=True)
class LlamaBinaries:
    server: Path
    quantize: Path
    vocab: Path


def _nvcc() -> str:
    found = shutil.which("nvcc") or next(
        (str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.is_file()), None)
    if found is None:
        raise RuntimeError("no nvcc on PATH or in /usr/local/cuda/bin: CUDA's compiler is "
                           "needed to build llama-server for the GPU")
    return found


def _cuda_arch() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
        return out.split()[0].replace(".", "")
    except (OSError, subprocess.SubprocessError, IndexError):
        return "native"


def _unpack(source: Path | None, work: Path) -> Path:
    if source is None:
        return fetch_source(LLAMA_CPP_PYTHON_VERSION, work)
    if source.is_dir():
        return source
    with tarfile.open(source) as tar:
        tar.extractall(work, filter="data")
    return work / "llama.cpp"


def build(cache: Path, source: Path | None,
          log: Callable[[str], None] = print) -> LlamaBinaries:
    target = cache / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-cuda"
    binaries = LlamaBinaries(target / "llama-server", target / "llama-quantize",
                             target / VOCAB_NAME)
    if all(p.is_file() for p in (binaries.server, binaries.quantize, binaries.vocab)):
        return binaries
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-cuda-") as tmp:
        tree = _unpack(source, Path(tmp))
        flags = [*_FLAGS, "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={_nvcc()}",
                 f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_arch()}"]
        if shutil.which("ninja"):
            flags += ["-G", "Ninja"]
        build_dir = Path(tmp) / "build"
        subprocess.run(["cmake", "-S", str(tree), "-B", str(build_dir), *flags], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server",
                        "llama-quantize", "-j", str(os.cpu_count() or 1)], check=True,
                       stdout=subprocess.DEVNULL)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / "models" / VOCAB_NAME, binaries.vocab)
        for name in ("llama-quantize", "llama-server"):  # the server last: it marks done
            shutil.copy2(build_dir / "bin" / name, target / f"{name}.partial")
            (target / f"{name}.partial").rename(target / name)
    log(f"built llama-server (CUDA) in {time.monotonic() - started:.0f} s")
    return binaries
