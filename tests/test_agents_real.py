"""The real coding-agent CLIs (Codex CLI, Claude Code, opencode; pinned npm releases:
tests/agents) working through sluiceway, offline, over (a) two real llama-servers and
(b) a real vLLM, and over an emulated backend that speaks only Chat (translation).

The models are random ones with a 64k context, small enough to prefill the agents' 4-15k
token prompts in about a second, whose replies end by themselves as a real model's do
(Claude Code treats a reply cut at max_tokens as an error): the llama-servers run with a
grammar that makes every reply "Hello from the tiny model.", the vLLM model's embeddings
make it stop after a full stop (tests/realvllm/model.py --agent). Each client runs two
turns of one session: both must be answered (exit 0, the text), be logged by sluiceway as
served with TTFT and counted tokens, be keyed by the session id the client itself sends,
and land on the same backend. Claude Code asks vLLM (32k context) for 128000 output
tokens, which vLLM refuses with a 400; sluiceway fits it to the context."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents.clients import CLIENTS
from tests.agents.install import install
from tests.conftest import Launcher, backend
from tests.probes import access_records, gauges
from tests.processes import Server
from tests.realllama.model import Shape
from tests.realllama.server import MODEL_ALIAS, prepare

ANSWER = "Hello from the tiny model."
AGENT_SHAPE = Shape(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256,
                    n_ctx_train=65536)
# what each client sends: the API it speaks and the session header sluiceway keys on
EXPECTED = {
    "codex": ("responses", "session-id"),
    "claude": ("messages", "x-claude-code-session-id"),
    "opencode": ("chat", "x-session-affinity"),
}


@pytest.fixture(scope="module")
def agents_bin() -> Path:
    return install()


@pytest.fixture(scope="module", params=["llama-server", "vllm"])
def pool(request: pytest.FixtureRequest, module_launch: Launcher) -> Iterator[Server]:
    if request.param == "llama-server":
        real = prepare(AGENT_SHAPE)
        grammar = f'root ::= "{ANSWER}"'
        servers = [module_launch.llama_server(real, slots=2, ctx_per_slot=32768,
                                              extra=("--jinja", "--grammar", grammar))
                   for _ in range(2)]
        backends = [backend(f"llama{i}", s, kind="llamacpp") for i, s in enumerate(servers)]
    else:
        vllm = module_launch.vllm(request.getfixturevalue("real_vllm"), max_num_seqs=2,
                                  agent=True)
        backends = [backend("vllm", vllm, kind="vllm")]
    proxy = module_launch.proxy(
        backends, routing={"calibrate_tokens": 8}, timeouts={"first_byte_s": 120},
        models={"aliases": {"claude-*": MODEL_ALIAS}})
    yield proxy
    for server in module_launch.servers[-(len(backends) + 1):]:
        server.stop()  # the next pool's engines get the cores


def answered(stdout: str, pool: Server) -> bool:
    """The llama-servers' fixed sentence; the vLLM model's noise ending in a full stop."""
    served_by_llama = any(r["backend"].startswith("llama") for r in access_records(pool))
    return ANSWER in stdout if served_by_llama else stdout.strip().endswith(".")


@pytest.mark.parametrize("client", sorted(EXPECTED))
def test_a_real_agent_works_through_sluiceway_and_keeps_its_backend(
        client: str, agents_bin: Path, pool: Server, tmp_path: Path) -> None:
    endpoint, session_header = EXPECTED[client]
    agent = CLIENTS[client](agents_bin, tmp_path / client, pool.url, MODEL_ALIAS)
    turns = []
    for resume in (False, True):
        seen = len(access_records(pool))
        turn = agent.turn("Say hello." if not resume else "Again, please.", resume=resume)
        assert turn.returncode == 0, turn.stdout[-2000:] + turn.stderr[-3000:]
        assert answered(turn.stdout, pool)
        mine = [r for r in access_records(pool)[seen:] if r["endpoint"] == endpoint]
        assert mine, f"no {endpoint} request reached sluiceway"
        for record in mine:
            assert record["status"] == 200 and record["outcome"] == "ok", record
            assert record["ttft_ms"] is not None and record["output_tokens"] > 0, record
            assert not record.get("output_tokens_estimated"), record
        main = max(mine, key=lambda r: r["prompt_tokens"])  # the turn, not a title request
        assert main["prompt_tokens"] > 1000  # an agent's system prompt and tools
        assert main["session"].startswith(session_header + ":"), main
        turns.append(main)
    first, second = turns
    assert second["session"] == first["session"]  # the client's own session id, kept
    assert second["backend"] == first["backend"]
    assert second["prompt_tokens"] > first["prompt_tokens"]  # the history came along


def test_claude_code_with_its_own_model_names_through_an_alias(
        agents_bin: Path, pool: Server, tmp_path: Path) -> None:
    """No model settings at all: Claude Code sends its vendor names (claude-...), with
    max_tokens sized for them, and `claude-*` maps them to the pool's model."""
    agent = CLIENTS["claude"](agents_bin, tmp_path / "claude", pool.url, model="")
    seen = len(access_records(pool))
    turn = agent.turn("Say hello.")
    assert turn.returncode == 0, turn.stdout[-2000:] + turn.stderr[-3000:]
    assert answered(turn.stdout, pool)
    mine = [r for r in access_records(pool)[seen:] if r["endpoint"] == "messages"]
    assert mine and all(r["status"] == 200 and r["model"] == MODEL_ALIAS for r in mine)
    assert all(r["alias"].startswith("claude-") for r in mine), mine
    if any(r["backend"] == "vllm" for r in mine):  # 128000 asked, 32768 there: fitted
        assert gauges(pool)["sluiceway_max_tokens_clamped_total"] >= len(mine)


@pytest.mark.parametrize(("client", "endpoint"), [("claude", "messages"),
                                                  ("codex", "responses")])
def test_an_agent_through_translation_to_a_chat_only_backend(
        client: str, endpoint: str, agents_bin: Path, launch: Launcher,
        tmp_path: Path) -> None:
    """The emulated vLLM speaks Chat and Completions only: Claude Code's Messages and
    Codex's Responses requests are translated to Chat and the replies back
    (proxy/translate)."""
    emulator = launch.emulator("vllm", "vllm-fp8-aiter", speed=8, model="m")
    proxy = launch.proxy([backend("emu", emulator, kind="vllm", apis=["chat", "completions"])],
                         models={"aliases": {"claude-*": "m"}})
    agent = CLIENTS[client](agents_bin, tmp_path / client, proxy.url,
                            model="m" if client == "codex" else "")
    turn = agent.turn("Say hello.")
    assert turn.returncode == 0, turn.stdout[-2000:] + turn.stderr[-3000:]
    assert turn.stdout.strip()  # the emulator's words, whatever they are
    mine = [r for r in access_records(proxy) if r["endpoint"] == endpoint]
    assert mine and all(r["status"] == 200 and r["outcome"] == "ok" for r in mine), mine
    assert all(r["ttft_ms"] is not None and r["output_tokens"] > 0 for r in mine)
    assert not any(r.get("output_tokens_estimated") for r in mine)
    assert gauges(proxy)["sluiceway_translated_requests_total"] == len(mine)
