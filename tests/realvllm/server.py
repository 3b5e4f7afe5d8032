"""Starting the real vLLM (see tests/realvllm/build.py) the way that makes it start fast
on a 2-core machine without a GPU (reference facts: docs/vllm.md)."""

from __future__ import annotations

from pathlib import Path

from tests.realvllm.build import MODEL_NAME, Artifacts

# Required or helpful on these machines: without a KV-cache size the start fails (the VM's
# NUMA node reports less memory than vLLM's default share); one OpenMP thread, unbound;
# the engine in the server's process; nothing fetched or reported over the network.
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
START_TIMEOUT_S = 300  # ~40 s usually; 3 min the very first time on a cold page cache


# For the coding agents: Claude Code's requests set tool_choice "auto", which vLLM refuses
# without a tool-call parser (docs/agents.md)
AGENT_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")


def server_args(model: Path, port: int, max_num_seqs: int = 4, max_model_len: int = 2048,
                extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "serve", str(model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--served-model-name", MODEL_NAME,
        "--dtype", "float32",
        "--max-model-len", str(max_model_len),
        "--max-num-seqs", str(max_num_seqs),
        "--enforce-eager",  # no graph capture: starts in ~40 s instead of 100-160 s
        "--distributed-executor-backend", "uni",
        *extra,
    ]


__all__ = ["AGENT_FLAGS", "ENV", "MODEL_NAME", "START_TIMEOUT_S", "Artifacts", "server_args"]
