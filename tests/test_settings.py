from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.settings import ConfigError, load_settings
from tests.processes import ROOT

GOOD = """
[routing]
policy = "spillover"
queue_size = 5
[[backends]]
name = "llama"
kind = "llamacpp"
url = "http://127.0.0.1:8080"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_file_values(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD))
    assert s.routing.policy == "spillover" and s.routing.queue_size == 5
    assert s.routing.max_attempts == 3 and s.server.port == 8000
    assert s.timeouts.first_byte_s >= 600  # long prefill must not time out by default
    assert s.backends[0].kind == "llamacpp" and s.backends[0].max_concurrency == 0


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEWAY_ROUTING__POLICY", "round_robin")
    monkeypatch.setenv("SLUICEWAY_SERVER__PORT", "9123")
    s = load_settings(write(tmp_path, GOOD))
    assert s.routing.policy == "round_robin" and s.server.port == 9123
    assert s.routing.queue_size == 5  # the rest of the section still comes from the file


@pytest.mark.parametrize(("text", "named"), [
    (GOOD.replace('policy = "spillover"', 'policy = "fastest"'), "routing.policy"),
    (GOOD.replace("queue_size = 5", "queue_sise = 5"), "routing.queue_sise: unknown key"),
    (GOOD.replace('kind = "llamacpp"', 'kind = "tgi"'), "backends.0.kind"),
    (GOOD.replace("8080", "8080/v1"), "backends.0.url"),
    (GOOD + '[[backends]]\nname = "llama"\nurl = "http://127.0.0.1:1"\n', "repeated: llama"),
    ("[server]\nport = 1\n", "backends"),
    (GOOD + "[server]\nport = 70000\n", "server.port"),
    (GOOD.replace("queue_size = 5", "queue_size = -1"), "routing.queue_size"),
    ("[server\n", "not valid TOML"),
    (GOOD + "[health]\nejection_s = 60\nmax_ejection_s = 30\n", "health: Value error, "
     "max_ejection_s must be at least ejection_s"),
    (GOOD + "[health]\neject_after_failures = -1\n", "health.eject_after_failures"),
    (GOOD + "[server]\nmax_connections = 0\n", "server.max_connections"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert named in str(err.value)


def test_serve_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("queue_size = 5", "queue_size = 'many'"))
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "routing.queue_size" in proc.stderr


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path / "nope.toml")


def test_the_documented_error_is_what_serve_prints(tmp_path: Path) -> None:
    """docs/configuration.md shows the message for a bad file; it must stay the real one
    (a list whose only item is bad used to add a third line: "too short")."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    shown = doc.split("naming the key:\n\n```\n", 1)[1].split("```", 1)[0]
    write(tmp_path, '[routing]\npolicy = "fastest"\n[[backends]]\nname = "a"\n'
                    'url = "http://127.0.0.1:8080/v1"\n')
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", "c.toml"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert out.stderr == shown


def test_the_example_config_loads_as_documented() -> None:
    settings = load_settings(ROOT / "config.example.toml")
    assert [b.name for b in settings.backends] == ["llamacpp-q4", "vllm-fp8"]
    assert settings.models.aliases == {"claude-*": "qwen3.6-35b-a3b"}
    assert settings.admin is not None and settings.admin.port == 9000
