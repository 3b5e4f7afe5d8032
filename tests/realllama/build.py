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

import fcntl
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


def cache_root() -> Path:
    configured = os.environ.get("SLUICEWAY_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "sluiceway"


def version_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / "llama.cpp" / f"llama-cpp-python-{version}"


def _log(message: str) -> None:
    print(f"[llama-server build] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path | None = None, log: Path | None = None) -> None:
    _log("$ " + " ".join(cmd))
    if log is None:
        subprocess.run(cmd, cwd=cwd, check=True)
        return
    with log.open("ab") as out:
        result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n" + "\n".join(tail)
        )


def ensure_build_tools() -> None:
    """Install the Debian packages for any missing build tool (apt-get, as root)."""
    missing = sorted({pkg for tool, pkg in _BUILD_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"missing build tools {missing} and no apt-get to install them")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise RuntimeError(f"missing build tools {missing}; install them as root")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _log(f"installing {missing} with apt-get")
    subprocess.run([*prefix, "apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
    )


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
    target.mkdir(parents=True, exist_ok=True)
    with (target / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per machine, even with parallel runs
        if artifacts.server.is_file() and artifacts.vocab.is_file():
            return artifacts
        ensure_build_tools()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
            work = Path(tmp)
            tree = fetch_source(version, work)
            log = target / "build.log"
            log.write_text("")
            build_dir = work / "build"
            _run(["cmake", "-S", str(tree), "-B", str(build_dir), *_CMAKE_FLAGS], log=log)
            _run(
                [
                    "cmake", "--build", str(build_dir), "--target", "llama-server",
                    "-j", str(jobs or os.cpu_count() or 1),
                ],
                log=log,
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
