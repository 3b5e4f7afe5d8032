"""The engine kind -> adapter table."""

from collections.abc import Mapping

from backends import llamacpp, openai, vllm
from backends.adapter import Adapter
from backends.config import EngineKind

ADAPTERS: Mapping[EngineKind, Adapter] = {
    EngineKind.LLAMACPP: llamacpp.ADAPTER,
    EngineKind.VLLM: vllm.ADAPTER,
    EngineKind.OPENAI: openai.ADAPTER,
}
