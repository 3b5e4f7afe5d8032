"""Any OpenAI-compatible server: health is a successful `GET /v1/models`; no load data."""

from backends.adapter import Adapter
from backends.config import EngineKind

ADAPTER = Adapter(kind=EngineKind.OPENAI, health_path="/v1/models")
