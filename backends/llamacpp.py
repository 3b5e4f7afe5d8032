"""llama.cpp `llama-server`.

- `/health` answers 503 `Loading model` until the model is loaded, then 200.
- `/props` carries `total_slots` (the `-np` setting): that is its capacity; and
  `default_generation_settings.n_ctx`, one slot's context (`--ctx-size` / slots). Requests beyond
  the slots are deferred without limit inside the server, so the proxy must not send more.
- `/metrics` (only with `--metrics`) has `llamacpp:requests_processing` and
  `llamacpp:requests_deferred`; without it the server answers 501 and `/slots` is read.
"""

from backends.adapter import Adapter
from backends.config import EngineKind

ADAPTER = Adapter(
    kind=EngineKind.LLAMACPP,
    health_path="/health",
    loading_statuses=frozenset({503}),
    capacity_path="/props",
    capacity_field="total_slots",
    context_field=("default_generation_settings", "n_ctx"),  # per slot
    metrics_path="/metrics",
    load_gauges={
        "llamacpp:requests_processing": "running",
        "llamacpp:requests_deferred": "waiting",
    },
    slots_path="/slots",
)
