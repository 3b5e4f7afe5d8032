"""vLLM's OpenAI-compatible server.

- Refuses connections while the engine starts (not a 503); `/health` is 200 when ready and
  503 once the engine is dead, so 503 means down here, not loading.
- `/v1/models` carries `max_model_len`.
- `/metrics` always on: `vllm:num_requests_running` and `vllm:num_requests_waiting`, one
  series per engine (summed), and the KV cache's fill (`vllm:kv_cache_usage_perc`, named
  `vllm:gpu_cache_usage_perc` before the V1 engine), shown in /admin/backends and as
  `sluiceway_backend_kv_cache_usage`. Capacity (`--max-num-seqs`) is not published: set
  `max_concurrency` to cap it.
"""

from backends.adapter import Adapter
from backends.config import EngineKind

ADAPTER = Adapter(
    kind=EngineKind.VLLM,
    health_path="/health",
    metrics_path="/metrics",
    load_gauges={
        "vllm:num_requests_running": "running",
        "vllm:num_requests_waiting": "waiting",
        "vllm:kv_cache_usage_perc": "kv_cache",  # since V1; 0-1 despite its name
        "vllm:gpu_cache_usage_perc": "kv_cache",  # the same gauge in older releases
    },
)
