"""Running the real agent CLIs non-interactively and offline against a base URL, each in
a fresh home of its own (the settings are those of ../shared/reference/agents.md)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ANSWER_TIMEOUT_S = 180


@dataclass(frozen=True)
class Turn:
    returncode: int
    stdout: str
    stderr: str


class Agent:
    """One client with its own HOME (sessions, config) under `home`."""

    name: str

    def __init__(self, bin_dir: Path, home: Path, base_url: str, model: str) -> None:
        self.bin_dir = bin_dir
        self.home = home
        self.base_url = base_url
        self.model = model
        self.workdir = home / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.configure()

    def configure(self) -> None:
        """Write the client's config files."""

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TZ")}
        return {**keep, "HOME": str(self.home), "NO_COLOR": "1", "TERM": "dumb"}

    def command(self, prompt: str, resume: bool) -> list[str]:
        raise NotImplementedError

    def turn(self, prompt: str, resume: bool = False) -> Turn:
        result = subprocess.run(self.command(prompt, resume), cwd=self.workdir,
                                env=self.env(), stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=ANSWER_TIMEOUT_S)
        return Turn(result.returncode, result.stdout, result.stderr)


class Codex(Agent):
    """Codex CLI: Responses API only (`wire_api = "responses"`)."""

    name = "codex"

    def configure(self) -> None:
        codex_home = self.home / ".codex"
        codex_home.mkdir(parents=True, exist_ok=True)
        (codex_home / "config.toml").write_text(
            f'model = "{self.model}"\nmodel_provider = "sluiceway"\n'
            "model_context_window = 32768\n\n"
            "[model_providers.sluiceway]\n"
            'name = "sluiceway"\n'
            f'base_url = "{self.base_url}/v1"\n'
            'env_key = "SLUICEWAY_API_KEY"\n'
            'wire_api = "responses"\n'
            "stream_max_retries = 0\nrequest_max_retries = 0\n")

    def env(self) -> dict[str, str]:
        return {**super().env(), "CODEX_HOME": str(self.home / ".codex"),
                "SLUICEWAY_API_KEY": "unused"}

    def command(self, prompt: str, resume: bool) -> list[str]:
        codex = [str(self.bin_dir / "codex"), "exec", "--skip-git-repo-check",
                 "-s", "read-only", "--disable", "plugins", "-c", "analytics.enabled=false"]
        return [*codex, "resume", "--last", prompt] if resume else [*codex, prompt]


class ClaudeCode(Agent):
    """Claude Code: Anthropic Messages API; the model names sent are set by env."""

    name = "claude"

    def env(self) -> dict[str, str]:
        # an empty model: the client's own vendor names (claude-...), for the gateway's
        # aliases to map
        models = {} if not self.model else {k: self.model for k in (
            "ANTHROPIC_MODEL", "ANTHROPIC_SMALL_FAST_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL",
            "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL",
            "CLAUDE_CODE_SUBAGENT_MODEL")}
        return {**super().env(), **models, "ANTHROPIC_BASE_URL": self.base_url,
                "ANTHROPIC_API_KEY": "unused", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}

    def command(self, prompt: str, resume: bool) -> list[str]:
        return [str(self.bin_dir / "claude"), *(["--continue"] if resume else []),
                "-p", prompt]


class OpenCode(Agent):
    """opencode over Chat Completions (`@ai-sdk/openai-compatible`)."""

    name = "opencode"

    def configure(self) -> None:
        config = self.home / ".config" / "opencode"
        config.mkdir(parents=True, exist_ok=True)
        (config / "opencode.json").write_text(json.dumps({
            "$schema": "https://opencode.ai/config.json",
            "model": f"sluiceway/{self.model}",
            "provider": {"sluiceway": {
                "npm": "@ai-sdk/openai-compatible", "name": "sluiceway",
                "options": {"baseURL": f"{self.base_url}/v1", "apiKey": "unused"},
                "models": {self.model: {"name": self.model,
                                        "limit": {"context": 32768, "output": 256}}},
            }},
        }))

    def env(self) -> dict[str, str]:
        xdg = {f"XDG_{d.upper()}_HOME": str(self.home / f".{d}")
               for d in ("config", "data", "cache", "state")}
        xdg["XDG_CONFIG_HOME"] = str(self.home / ".config")
        return {**super().env(), **xdg, "OPENCODE_DISABLE_AUTOUPDATE": "1",
                "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
                "OPENCODE_DISABLE_SHARE": "1"}

    def command(self, prompt: str, resume: bool) -> list[str]:
        return [str(self.bin_dir / "opencode"), "run", *(["--continue"] if resume else []),
                prompt]


CLIENTS: dict[str, type[Agent]] = {c.name: c for c in (Codex, ClaudeCode, OpenCode)}
