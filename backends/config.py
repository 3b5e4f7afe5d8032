"""Static configuration of one backend, as written in the `[[backends]]` table."""

from __future__ import annotations

import ssl
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator


class EngineKind(StrEnum):
    """Engines sluiceway knows how to probe and scrape."""

    LLAMACPP = "llamacpp"
    VLLM = "vllm"
    OPENAI = "openai"


API_NAMES = ("chat", "completions", "embeddings", "responses", "messages", "count_tokens")
# What each engine serves natively when `apis` is not given: llama.cpp's server and vLLM
# (0.11.1+) have all of them; a generic OpenAI-compatible server is assumed to have the
# classic three, so Responses and Messages requests to it are translated to Chat.
DEFAULT_APIS = {
    EngineKind.LLAMACPP: API_NAMES,
    EngineKind.VLLM: API_NAMES,
    EngineKind.OPENAI: ("chat", "completions", "embeddings"),
}


class BackendConfig(BaseModel):
    """One upstream server. Unknown keys are rejected so typos fail at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")]
    kind: EngineKind = EngineKind.OPENAI
    url: HttpUrl
    models: tuple[str, ...] = ()
    served_model: str = ""
    max_concurrency: Annotated[int, Field(ge=0)] = 0
    api_key_env: str = ""
    tls_ca_file: str = ""  # PEM bundle that signs an https backend's certificate
    tls_verify: bool = True
    # backends on one accelerator name the same device (policies/devices.py); "" = its own
    device: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:/-]*$")] = ""
    # the APIs it serves natively (see API_NAMES); empty: the engine kind's default
    apis: tuple[Literal["chat", "completions", "embeddings", "responses", "messages",
                        "count_tokens"], ...] = ()

    @field_validator("url")
    @classmethod
    def _no_path(cls, url: HttpUrl) -> HttpUrl:
        if url.path not in (None, "", "/"):
            raise ValueError("give the server's base URL without a path (sluiceway adds /v1/...)")
        return url

    @field_validator("tls_ca_file")
    @classmethod
    def _readable_ca(cls, path: str) -> str:
        if path:
            try:
                ssl.create_default_context(cafile=path)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load CA certificates from {path!r}: {exc}") from None
        return path

    def serves(self, api: str) -> bool:
        """Whether the backend answers this API itself (else it is translated to Chat)."""
        return api in (self.apis or DEFAULT_APIS[self.kind])

    @property
    def base_url(self) -> str:
        """The URL without a trailing slash, ready to have a path appended."""
        return str(self.url).rstrip("/")
