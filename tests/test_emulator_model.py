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

import pytest

from emulator.cli import DEFAULT_MAX_NUM_SEQS
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


async def closed_loop_rate(profile: Profile, concurrency: int, slots: int) -> float:
    """Output tokens per virtual second over a window after a warm-up of 2.5 cycles."""
    clock = VirtualClock()
    engine = Engine(profile, max_running=slots, clock=clock)
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
