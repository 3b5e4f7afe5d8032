"""Settings: a TOML file, overridden key by key by `SLUICEWAY_<SECTION>__<KEY>` env vars.

Every problem is reported as `ConfigError` naming the offending key, before anything starts.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from backends.config import BackendConfig
from backends.outlier import EjectionRule
from policies import POLICIES

PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    api_keys: tuple[str, ...] = ()
    max_body_mb: PositiveFloat = 32
    access_log: bool = True  # one JSON line per request on stderr
    shutdown_grace_s: PositiveFloat = 30  # on SIGTERM: time left to requests in progress
    # commit a silent stream after this many seconds and send keep-alives until the first
    # upstream byte (proxy/keepalive.py); 0: hold it until then (retries stay possible)
    stream_keepalive_s: Annotated[float, Field(ge=0)] = 0
    # a request's head must arrive within this (slowloris); its body within 75 s
    head_timeout_s: PositiveFloat = 10
    # open client connections; past it an idle keep-alive one is closed, else 503 + close
    max_connections: Annotated[int, Field(ge=1)] = 4096


class RoutingSettings(_Section):
    policy: str = "adaptive"
    max_attempts: Annotated[int, Field(ge=1, le=16)] = 3
    queue_size: Annotated[int, Field(ge=0)] = 1024
    queue_timeout_s: PositiveFloat = 30
    affinity: bool = True  # adaptive: send a session back to the backend that served it
    # one measured request of this many output tokens to each backend before it takes
    # traffic (proxy/calibrate.py); 0 turns it off
    calibrate_tokens: Annotated[int, Field(ge=0, le=4096)] = 32
    # lower max_tokens to what the chosen backend's context leaves (proxy/clamp.py)
    clamp_max_tokens: bool = True

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
        return name


class HealthSettings(_Section):
    interval_s: PositiveFloat = 5
    timeout_s: PositiveFloat = 2
    # a backend that is failing (down, ejected, failures in a row) is probed this often
    failing_interval_s: PositiveFloat = 1
    # outlier ejection (backends/outlier.py): failures in a row (live requests and probes)
    # that take a backend out of routing, 0 never; for a backoff that doubles per ejection
    eject_after_failures: Annotated[int, Field(ge=0)] = 3
    ejection_s: PositiveFloat = 5
    max_ejection_s: PositiveFloat = 300

    @model_validator(mode="after")
    def _backoff_order(self) -> HealthSettings:
        if self.max_ejection_s < self.ejection_s:
            raise ValueError("max_ejection_s must be at least ejection_s")
        return self

    @property
    def ejection(self) -> EjectionRule:
        return EjectionRule(self.eject_after_failures, self.ejection_s, self.max_ejection_s)


class TimeoutSettings(_Section):
    """Upstream timeouts. Prefill of a long prompt can take minutes, hence first_byte_s."""

    connect_s: PositiveFloat = 5
    first_byte_s: PositiveFloat = 600
    idle_s: PositiveFloat = 120
    # a streamed request's response head; 0 = off. llama.cpp and vLLM send it before the
    # prefill, so a few seconds tell a hung backend from a long prompt (docs/operations.md)
    head_s: Annotated[float, Field(ge=0)] = 0


class ModelSettings(_Section):
    # client-visible name or glob -> a model the pool serves (proxy/aliases.py)
    aliases: dict[str, Annotated[str, Field(min_length=1)]] = {}

    @field_validator("aliases")
    @classmethod
    def _no_chains(cls, aliases: dict[str, str]) -> dict[str, str]:
        chained = sorted(k for k, v in aliases.items() if v in aliases)
        if chained:
            raise ValueError(f"an alias must name a served model, not another alias: "
                             f"{', '.join(chained)}")
        return aliases


class AdminSettings(_Section):
    """The admin plane (proxy/admin/): on when the `[admin]` section is present."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9000
    api_keys: tuple[str, ...] = ()  # its own keys, apart from the data plane's


class ClusterSettings(_Section):
    """Several replicas sharing capacity, learning and sessions through Redis (cluster/);
    off while `redis_url` is empty."""

    redis_url: str = ""
    replica_id: str = ""  # default: host:pid
    lease_ttl_s: Annotated[float, Field(ge=0.5, le=300)] = 3
    session_ttl_s: PositiveFloat = 3600  # a shared session entry outlives its last turn
    # Redis unreachable: the capacity is split over at least this many replicas (a replica
    # that starts while Redis is down knows no others); set it to the replica count
    min_replicas: Annotated[int, Field(ge=1)] = 1
    prefix: Annotated[str, Field(min_length=1)] = "sluiceway"  # Redis key prefix

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SLUICEWAY_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    routing: RoutingSettings = RoutingSettings()
    health: HealthSettings = HealthSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    models: ModelSettings = ModelSettings()
    admin: AdminSettings | None = None  # off unless configured
    cluster: ClusterSettings = ClusterSettings()
    backends: Annotated[tuple[BackendConfig, ...], Field(min_length=1)]

    @field_validator("backends")
    @classmethod
    def _unique_names(cls, backends: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        names = [b.name for b in backends]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"backend names must be unique; repeated: {', '.join(duplicates)}")
        return backends

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # env beats the file


def load_settings(path: str | Path) -> Settings:
    """Read and validate a config file; raise ConfigError with a readable message."""
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid configuration\n{explain(exc)}") from exc


def explain(exc: ValidationError) -> str:
    """Validation errors as lines of `  key.path: problem`."""
    lines = []
    errors = exc.errors()
    for error in errors:
        loc = error["loc"]
        if error["type"] == "too_short" and any(
                len(other["loc"]) > len(loc) and other["loc"][:len(loc)] == loc
                for other in errors):
            continue  # a list whose bad items were dropped is then too short: said once
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)
