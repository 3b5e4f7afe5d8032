"""The emulator's HTTP server delivers its timing model in real time, end to end.

The model itself is checked exactly, for every profile point, on a virtual clock
(tests/test_emulator_model.py). Here a real closed loop over HTTP checks that the served
rate follows it at a few points: never faster than the model (a speed bug would show as
too many tokens), and not far slower. The lower bound is wide on purpose: on a shared
2-core machine the client, the server and whatever else runs compete, and a client that
resubmits late leaves the batch short (two busy loops beside the suite cost 7% at
llama.cpp's 128). How fast it keeps up on a quiet machine is a benchmark
(`benchmarks/emulator_speed.py`, docs/emulator.md).

Each profile runs under --speed so the check stays quick; measured rates are divided by
the speed before they are compared.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emulator.profile import get_profile
from tests.closed_loop import measure
from tests.conftest import Launcher
from tests.processes import Server

SPEED = {"llamacpp": 40.0, "vllm": 2.0}
CASES = [("llamacpp-q4km", 1), ("llamacpp-q4km", 128), ("vllm-fp8-aiter", 1),
         ("vllm-fp8-aiter", 32)]


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
    slots = (profile.default_slots or 4) if profile.engine == "llamacpp" else concurrency
    expected = profile.aggregate_tok_s(min(concurrency, slots))  # the model's rate
    cycle_s = concurrency * profile.output_tokens / expected / speed
    measured = measure(emulators[profile_name].url, "m", concurrency,
                       warmup_s=max(1.0, 2.5 * cycle_s), window_s=max(2.0, 3 * cycle_s)) / speed
    report = f"{profile_name} at {concurrency}: {measured:.0f} tok/s, model {expected:.0f}"
    assert measured <= 1.05 * expected, report
    assert measured >= 0.75 * expected, report
