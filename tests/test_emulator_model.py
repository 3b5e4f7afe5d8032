"""The emulator's engine reproduces every profile point on a virtual clock.

The same `Engine` that serves HTTP runs here with c closed-loop clients submitting
sequences directly, on a clock that jumps to each step's end. What is measured is then
the timing model alone, exactly, for every profile and every measured concurrency; the
tests cannot be disturbed by a busy machine. (Whether the HTTP server keeps up with
the model in real time is a property of the machine: `benchmarks/emulator_speed.py`
measures it, and the demo prints each emulator's rate against its profile.)
"""

from __future__ import annotations

import asyncio
import math

import pytest

from emulator.cli import DEFAULT_MAX_NUM_SEQS, step_tokens
from emulator.engine import Engine, Sequence
from emulator.profile import Profile, get_profile, load_profiles

CASES = [(name, c) for name, p in sorted(load_profiles().items()) for c in p.concurrency]


class VirtualClock:
    """Time stands still until the engine sleeps; then it jumps to the step's end."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, at: float) -> None:
        self.t = max(self.t, at)
        await asyncio.sleep(0)  # clients woken by the last step run at this instant


def served_engine(profile: Profile, slots: int, clock: VirtualClock) -> Engine:
    """The engine as `sluiceway emulate` builds it: chunked prefill at the CLI's default
    step size, vLLM admitting only within the step's budget."""
    return Engine(profile, max_running=slots, clock=clock,
                  step_tokens=step_tokens(profile.engine),
                  admit_within_budget=profile.engine == "vllm")


async def closed_loop_rate(profile: Profile, concurrency: int, slots: int) -> float:
    """Output tokens per virtual second over a window after a warm-up of 2.5 cycles."""
    clock = VirtualClock()
    engine = served_engine(profile, slots, clock)
    engine.start()

    async def client() -> None:
        while True:
            seq = Sequence(["w"] * profile.input_tokens, profile.output_tokens)
            engine.submit(seq)
            while not seq.done:
                await seq.changed.wait()
                seq.changed.clear()

    clients = [asyncio.create_task(client()) for _ in range(concurrency)]

    async def until(t: float) -> tuple[float, int]:
        for _ in range(10_000_000):  # bounded: each pass lets the engine take one step
            if clock.t >= t:
                return clock.t, engine.tokens
            await asyncio.sleep(0)
        raise AssertionError("virtual time stopped advancing")

    cycle = concurrency * profile.output_tokens / profile.aggregate_tok_s(concurrency)
    try:
        t0, n0 = await until(2.5 * cycle)
        t1, n1 = await until(2.5 * cycle + 10 * cycle)
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await engine.stop()
    return (n1 - n0) / (t1 - t0)


@pytest.mark.parametrize(("profile_name", "concurrency"), CASES)
def test_engine_reproduces_profile(profile_name: str, concurrency: int) -> None:
    profile = get_profile(profile_name)
    slots = (profile.default_slots or 4) if profile.engine == "llamacpp" \
        else DEFAULT_MAX_NUM_SEQS
    rate = asyncio.run(closed_loop_rate(profile, concurrency, slots))
    # the model: the batch is the clients, or the slots when there are fewer
    model = profile.aggregate_tok_s(min(concurrency, slots))
    print(f"{profile_name} c={concurrency}: {rate:.2f} model {model:.2f}")
    assert rate == pytest.approx(model, rel=0.02)
    # the measurement: within 4% (llama.cpp's 102 slots, solved from the measured TTFT
    # at 128, put its batch at 102 there: T(102) is 3.3% under T(128))
    measured = profile.aggregate_tok_s(concurrency)
    assert rate == pytest.approx(measured, rel=0.04), (
        f"{profile_name} at {concurrency}: {rate:.1f} tok/s, profile {measured:.1f}")


def test_slots_bound_the_batch() -> None:
    """Past its slots a llama.cpp engine's clients queue: at 4x the slots the aggregate
    is the profile's at the slot count, not at the client count."""
    profile = get_profile("llamacpp-q4km")
    rate = asyncio.run(closed_loop_rate(profile, 32, slots=8))
    assert rate == pytest.approx(profile.aggregate_tok_s(8), rel=0.03)
    assert rate < 0.95 * profile.aggregate_tok_s(32)


def _measured() -> list[tuple[str, int, float]]:
    """Each (profile, level, tok/s) a profile file keeps from the sweep it was made from."""
    import tomllib
    from importlib import resources

    cases = []
    for path in sorted(resources.files("emulator").joinpath("profiles").iterdir(),
                       key=str):
        if not path.name.endswith(".toml"):
            continue
        for name, entry in tomllib.loads(path.read_text()).get("engines", {}).items():
            for c, tok_s in zip(entry.get("measured_concurrency", ()),
                                entry.get("measured_output_tok_s", ()), strict=True):
                cases.append((name, c, float(tok_s)))
    return cases


# llama-server alone on the H200 at 8 clients: 1,112 tok/s, where 4 slots make the model
# flat at T(4) = 1,234 (+11%); its other levels past 4 slots read 1,258-1,298 (+/-5%). A
# flat curve cannot follow that dip; it is held to 12% and named here, not hidden.
OUTSIDE_10_PERCENT = {("h200-llamacpp-q4km", 8): 0.12}


@pytest.mark.parametrize(("profile_name", "concurrency", "measured"), _measured())
def test_emulator_reproduces_the_measured_sweep(profile_name: str, concurrency: int,
                                                measured: float) -> None:
    """The GPU profiles: the emulator within 10% of the real engine at every level swept
    (including llama-server's levels past its slots, where its clients queue)."""
    profile = get_profile(profile_name)
    slots = (profile.default_slots or 4) if profile.engine == "llamacpp" \
        else DEFAULT_MAX_NUM_SEQS
    rate = asyncio.run(closed_loop_rate(profile, concurrency, slots))
    tolerance = OUTSIDE_10_PERCENT.get((profile_name, concurrency), 0.10)
    assert rate == pytest.approx(measured, rel=tolerance), (
        f"{profile_name} at {concurrency}: emulated {rate:.0f} tok/s, measured {measured:.0f}")


async def first_tokens(engine: Engine, clock: VirtualClock, prompts: list[int],
                       max_tokens: int = 2) -> list[float]:
    """Submit one sequence per prompt length at the same instant; each one's virtual time
    of first token, in submission order."""
    seqs = [Sequence(["w"] * n, max_tokens) for n in prompts]
    engine.start()
    try:
        for seq in seqs:
            engine.submit(seq)
        for _ in range(1_000_000):  # bounded: each pass lets the engine take one step
            if all(s.done for s in seqs):
                break
            await asyncio.sleep(0)
        else:
            raise AssertionError("the sequences did not finish")
    finally:
        await engine.stop()
    return [s.first_token_at or -1.0 for s in seqs]


def test_prompts_that_arrive_together_are_prefilled_first_come_first_served() -> None:
    """vLLM's scheduler fills each step's token budget with running requests in order,
    then waiting ones: eight 20,000-token openings sent at once get their first tokens in
    turn, the k-th at the end of the step that holds its last prompt token (k prefills,
    rounded up to 16,384-token steps), not all together after eight prefills."""
    profile = get_profile("vllm-fp8")
    budget = step_tokens("vllm")
    clock = VirtualClock()
    firsts = asyncio.run(first_tokens(served_engine(profile, DEFAULT_MAX_NUM_SEQS, clock),
                                      clock, [20_000] * 8))
    # the prompt tokens computed by the end of the k-th's last step, at the prefill rate
    expected = [min(math.ceil(k * 20_000 / budget) * budget, 8 * 20_000)
                / profile.prefill_tok_s for k in range(1, 9)]
    for k, (at, due) in enumerate(zip(firsts, expected, strict=True), start=1):
        # each step also decodes the openings already prefilled: a few ms a step
        assert due <= at <= due * 1.05, (k, at, firsts)
    # side by side (every prompt whole in one step, the engine's old model) all eight
    # would wait for all eight: 4.0 s each, where in turn the mean is 2.5 s
    assert sum(firsts) / 8 < 0.65 * 8 * 20_000 / profile.prefill_tok_s


async def admitted_in_first_step(engine: Engine, clock: VirtualClock,
                                 prompts: int) -> tuple[int, int]:
    """(running, waiting) once the engine has planned its first step over `prompts`
    20,000-token prompts submitted together."""
    engine.start()
    try:
        for _ in range(prompts):
            engine.submit(Sequence(["w"] * 20_000, 2))
        for _ in range(1000):  # bounded: the first step is planned within a few passes
            await asyncio.sleep(0)
            if clock.t > 0:
                break
        return len(engine.running), len(engine.waiting)
    finally:
        await engine.stop()


@pytest.mark.parametrize(("profile_name", "running"), [("vllm-fp8", 1),
                                                       ("llamacpp-q4km", 3)])
def test_vllm_admits_a_waiting_request_only_with_tokens_to_spare(profile_name: str,
                                                                 running: int) -> None:
    """While the step budget is spent on prompts, later requests stay waiting (as in
    `vllm:num_requests_waiting`); llama-server gives each a free slot at once."""
    clock = VirtualClock()
    engine = served_engine(get_profile(profile_name), 8, clock)
    assert asyncio.run(admitted_in_first_step(engine, clock, 3)) == (running, 3 - running)


def test_a_long_prompt_does_not_stall_the_other_slots() -> None:
    """llama-server adds one token per generating slot to every batch, then prompt chunks
    up to n_batch: a stream keeps decoding while another slot takes a 20,000-token prompt
    (about nine 2,048-token chunks), where a prompt taken whole would stop it for 3.6 s."""
    profile = get_profile("llamacpp-q4km")
    clock = VirtualClock()
    engine = served_engine(profile, 2, clock)

    async def run() -> tuple[int, float]:
        engine.start()
        try:
            streaming = Sequence(["w"] * 100, 1000)
            engine.submit(streaming)
            for _ in range(100_000):
                await asyncio.sleep(0)
                if streaming.produced >= 5:
                    break
            long = Sequence(["w"] * 20_000, 1)
            engine.submit(long)
            before, since = streaming.produced, clock.t
            for _ in range(100_000):
                await asyncio.sleep(0)
                if long.done:
                    break
            assert long.first_token_at is not None
            return streaming.produced - before, long.first_token_at - since
        finally:
            await engine.stop()

    decoded, ttft = asyncio.run(run())
    assert ttft >= 20_000 / profile.prefill_tok_s
    assert decoded >= 9, decoded


def test_the_cli_sets_each_engines_step_budget(capsys: pytest.CaptureFixture[str]) -> None:
    """`sluiceway emulate` builds vLLM with max_num_batched_tokens (16,384, its default on
    a 160 GB card) and llama.cpp with n_batch (2,048); both flags override; they and the
    slot counts refuse 0 with argparse's own error (exit 2)."""
    import argparse

    from emulator.cli import add_arguments, build

    def engine(*argv: str) -> Engine:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return build(parser.parse_args(list(argv))).engine

    vllm = engine("--engine", "vllm", "--profile", "vllm-fp8")
    assert (vllm.step_tokens, vllm.admit_within_budget) == (16384, True)
    llama = engine("--engine", "llamacpp", "--profile", "llamacpp-q4km")
    assert (llama.step_tokens, llama.admit_within_budget) == (2048, False)
    assert engine("--engine", "vllm", "--profile", "vllm-fp8",
                  "--max-num-batched-tokens", "8192").step_tokens == 8192
    assert engine("--engine", "llamacpp", "--profile", "llamacpp-q4km",
                  "--batch-size", "512").step_tokens == 512
    for flag in ("--max-num-batched-tokens", "--batch-size", "--max-num-seqs", "--slots"):
        with pytest.raises(SystemExit) as refused:
            engine("--engine", "vllm", "--profile", "vllm-fp8", flag, "0")
        assert refused.value.code == 2
        assert f"argument {flag}: must be at least 1" in capsys.readouterr().err
