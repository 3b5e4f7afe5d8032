"""Build a pinned llama.cpp ``llama-server`` from source, once per machine.

The source is the llama.cpp tree that the ``llama-cpp-python`` sdist on PyPI
vendors (``vendor/llama.cpp``): PyPI is reachable where GitHub is not. The sdist
is fetched with ``pip download --no-binary``, checked against a pinned sha256,
and only the ``llama-server`` target is built (CPU, Release, no curl, no
OpenSSL). The binary and the vocabulary GGUF the tests need are kept under a
cache directory keyed by the version, so later runs reuse them.

    python -m tests.realllama.build          # build or reuse; prints the binary's path

Cache root: ``$SLUICEWAY_CACHE_DIR`` or ``~/.cache/sluiceway``. A failed build
raises (and exits non-zero), so ``make test`` fails with it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.machine import cache_root, ensure_debian_packages, locked, log, run_logged

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_NAME = "ggml-vocab-llama-spm.gguf"

# Debian packages that provide the tools the build runs.
_BUILD_TOOLS = {"cmake": "cmake", "c++": "g++", "make": "make"}

_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
]


@dataclass(frozen=True)
class Artifacts:
    server: Path  # the llama-server executable
    vocab: Path  # the llama SentencePiece vocabulary GGUF from the same tree
    version: str


def version_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / "llama.cpp" / f"llama-cpp-python-{version}"


def _log(message: str) -> None:
    log("llama-server build", message)


def _run(cmd: list[str], log_path: Path | None = None) -> None:
    _log("$ " + " ".join(cmd))
    if log_path is None:
        subprocess.run(cmd, check=True)
    else:
        run_logged(cmd, log_path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_source(version: str, work: Path) -> Path:
    """Download and unpack the pinned sdist; return its vendored llama.cpp tree."""
    download = work / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", ":all:", "--dest", str(download),
            f"llama-cpp-python=={version}",
        ]
    )
    archives = sorted(download.glob("llama_cpp_python-*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(f"expected one sdist in {download}, found {archives}")
    archive = archives[0]
    if version == LLAMA_CPP_PYTHON_VERSION and _sha256(archive) != SDIST_SHA256:
        raise RuntimeError(f"{archive.name}: sha256 does not match the pinned {SDIST_SHA256}")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse unsafe members
            tar.extractall(work / "src", filter="data")
        else:
            tar.extractall(work / "src")  # a pinned, hash-checked archive
    tree = work / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (tree / "tools" / "server").is_dir():
        raise RuntimeError(f"{tree}: no tools/server in the vendored llama.cpp")
    return tree


def build(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int | None = None) -> Artifacts:
    """Build llama-server unless the cache already holds it; return the artifacts."""
    target = version_dir(version)
    artifacts = Artifacts(target / "bin" / "llama-server", target / VOCAB_NAME, version)
    with locked(target):  # one build per machine, even with parallel runs
        if artifacts.server.is_file() and artifacts.vocab.is_file():
            return artifacts
        ensure_debian_packages(_BUILD_TOOLS, "llama-server build")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
            work = Path(tmp)
            tree = fetch_source(version, work)
            build_log = target / "build.log"
            build_log.write_text("")
            build_dir = work / "build"
            _run(["cmake", "-S", str(tree), "-B", str(build_dir), *_CMAKE_FLAGS],
                 log_path=build_log)
            _run(
                [
                    "cmake", "--build", str(build_dir), "--target", "llama-server",
                    "-j", str(jobs or os.cpu_count() or 1),
                ],
                log_path=build_log,
            )
            built = build_dir / "bin" / "llama-server"
            if not built.is_file():
                raise RuntimeError(f"the build finished without {built}")
            artifacts.server.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree / "models" / VOCAB_NAME, artifacts.vocab)
            # Copy then rename, so an interrupted copy never looks like a binary.
            partial = artifacts.server.with_suffix(".partial")
            shutil.copy2(built, partial)
            partial.rename(artifacts.server)
        _log(f"built {artifacts.server} in {time.monotonic() - started:.0f} s")
        return artifacts


def main() -> int:
    try:
        artifacts = build()
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"llama-server build failed: {exc}", file=sys.stderr)
        return 1
    print(artifacts.server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
