"""A closed-loop sweep against each emulated profile reproduces the profile's tokens/s
within 10% at every measured concurrency (512 in / 128 out, as measured).

Each profile runs under --speed so the sweep stays quick; measured rates are divided by
the speed before they are compared. Speeds keep the emulator near 7-11k events/s, which a
single core sustains (see docs/emulator.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emulator.profile import get_profile, load_profiles
from tests.closed_loop import measure
from tests.conftest import Launcher
from tests.processes import Server

SPEED = {"llamacpp": 40.0, "vllm": 2.0}
CASES = [(name, c) for name, p in sorted(load_profiles().items()) for c in p.concurrency]


@pytest.fixture(scope="module")
def emulators(module_launch: Launcher) -> Iterator[dict[str, Server]]:
    running: dict[str, Server] = {}
    yield running
    for server in running.values():
        server.stop()


@pytest.mark.parametrize(("profile_name", "concurrency"), CASES)
def test_sweep_reproduces_profile(emulators: dict[str, Server], module_launch: Launcher,
                                  profile_name: str, concurrency: int) -> None:
    profile = get_profile(profile_name)
    speed = SPEED[profile.engine]
    if profile_name not in emulators:
        for other in list(emulators):  # one emulator at a time: they share two cores
            emulators.pop(other).stop()
        emulators[profile_name] = module_launch.emulator(profile.engine, profile_name,
                                                         speed=speed, model="m")
    expected = profile.aggregate_tok_s(concurrency)
    cycle_s = concurrency * profile.output_tokens / expected / speed
    measured = measure(emulators[profile_name].url, "m", concurrency,
                       warmup_s=max(1.0, 2.5 * cycle_s), window_s=max(2.0, 3 * cycle_s)) / speed
    assert measured == pytest.approx(expected, rel=0.10), (
        f"{profile_name} at {concurrency}: measured {measured:.0f} tok/s, "
        f"profile {expected:.0f} tok/s"
    )
