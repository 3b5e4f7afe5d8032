"""Table-driven tests of each policy: exact picks over hand-built snapshots."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from backends.snapshot import BackendSnapshot, Health, PoolSnapshot
from policies import POLICIES, NoBackend, PolicyConfig, Route, RouteRequest, Wait
from policies.base import Decision


def b(name: str, index: int, in_flight: int = 0, capacity: int | None = 4,
      health: Health = Health.HEALTHY, models: tuple[str, ...] = ("m",)) -> BackendSnapshot:
    return BackendSnapshot(
        name=name, index=index, kind="openai", health=health, capacity=capacity,
        in_flight=in_flight, models=frozenset(models), ttft_s=None, decode_tok_s=None,
        upstream_running=None, upstream_waiting=None,
    )


def pool(*backends: BackendSnapshot) -> PoolSnapshot:
    return PoolSnapshot(tuple(backends))


REQ = RouteRequest(endpoint="chat", model="m")

# (policy, snapshot, request, expected decision type, expected backend or None)
CASES: list[tuple[str, PoolSnapshot, RouteRequest, type, str | None]] = [
    # least_loaded: ratio in_flight / capacity decides, not the raw count
    ("least_loaded", pool(b("a", 0, 3, 4), b("b", 1, 4, 16)), REQ, Route, "b"),
    ("least_loaded", pool(b("a", 0, 1, 4), b("b", 1, 1, 4)), REQ, Route, "a"),  # tie: order
    ("least_loaded", pool(b("a", 0, 2, 4), b("b", 1, 1, 2)), REQ, Route, "b"),  # tie: fewer
    ("least_loaded", pool(b("a", 0, 4, 4), b("b", 1, 9, 10)), REQ, Route, "b"),  # a is full
    ("least_loaded", pool(b("a", 0, 0, None), b("b", 1, 1, 4)), REQ, Route, "a"),
    ("least_loaded", pool(b("a", 0, 4, 4), b("b", 1, 2, 2)), REQ, Wait, None),
    ("least_loaded", pool(b("a", 0, 0, 4, Health.DOWN), b("b", 1, 3, 4)), REQ, Route, "b"),
    ("least_loaded", pool(b("a", 0, 0, 4, Health.LOADING)), REQ, NoBackend, None),
    ("least_loaded", pool(b("a", 0, models=("x",))), REQ, NoBackend, None),
    ("least_loaded", pool(b("a", 0), b("b", 1, 3)),
     RouteRequest(endpoint="chat", model="m", exclude=frozenset({"a"})), Route, "b"),
    ("least_loaded", pool(b("a", 0)),
     RouteRequest(endpoint="chat", model="m", exclude=frozenset({"a"})), NoBackend, None),
    # unknown health (not probed yet) is routable
    ("least_loaded", pool(b("a", 0, 0, 4, Health.UNKNOWN)), REQ, Route, "a"),
    # spillover: first in config order with room
    ("spillover", pool(b("a", 0, 3, 4), b("b", 1, 0, 4)), REQ, Route, "a"),
    ("spillover", pool(b("a", 0, 4, 4), b("b", 1, 0, 4)), REQ, Route, "b"),
    ("spillover", pool(b("a", 0, 0, 4, Health.DOWN), b("b", 1, 3, 4)), REQ, Route, "b"),
    ("spillover", pool(b("a", 0, 4, 4), b("b", 1, 4, 4)), REQ, Wait, None),
    ("spillover", pool(b("a", 0, 100, None), b("b", 1, 0, 4)), REQ, Route, "a"),
    # round_robin from a fresh cursor starts at the first eligible backend
    ("round_robin", pool(b("a", 0), b("b", 1)), REQ, Route, "a"),
    ("round_robin", pool(b("a", 0, 4, 4), b("b", 1)), REQ, Route, "b"),
    ("round_robin", pool(b("a", 0, 4, 4), b("b", 1, 4, 4)), REQ, Wait, None),
]


@pytest.mark.parametrize(("policy", "snapshot", "request_", "kind", "expected"), CASES)
def test_pick(policy: str, snapshot: PoolSnapshot, request_: RouteRequest, kind: type,
              expected: str | None) -> None:
    decision: Any = POLICIES[policy](PolicyConfig(random.Random(0))).choose(request_, snapshot)
    assert isinstance(decision, kind)
    if expected is not None:
        assert decision.backend == expected


def test_round_robin_cycles_in_order_and_skips_full() -> None:
    policy = POLICIES["round_robin"](PolicyConfig(random.Random(0)))
    snap = pool(b("a", 0), b("b", 1), b("c", 2))
    picks = [policy.choose(REQ, snap) for _ in range(5)]
    assert [p.backend for p in picks if isinstance(p, Route)] == ["a", "b", "c", "a", "b"]
    full_b = pool(b("a", 0), b("b", 1, 4, 4), b("c", 2))
    picks = [policy.choose(REQ, full_b) for _ in range(3)]
    assert [p.backend for p in picks if isinstance(p, Route)] == ["c", "a", "c"]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_no_policy_exceeds_capacity(policy: str) -> None:
    """Fill a pool by following each policy's picks: no backend goes over capacity."""
    chooser = POLICIES[policy](PolicyConfig(random.Random(1)))
    caps = {"a": 1, "b": 3, "c": 2}
    load = dict.fromkeys(caps, 0)
    for _ in range(20):
        snap = pool(*(b(n, i, load[n], caps[n]) for i, n in enumerate(caps)))
        decision = chooser.choose(REQ, snap)
        if not isinstance(decision, Route):
            assert isinstance(decision, Wait)
            break
        load[decision.backend] += 1
        assert load[decision.backend] <= caps[decision.backend]
    assert load == caps


# ---- adaptive and latency: learned curves in the snapshot ---------------------------------

def learned(name: str, index: int, in_flight: int, curve: dict[int, float],
            ttft: dict[int, float] | None = None, capacity: int | None = None,
            kind: str = "openai") -> BackendSnapshot:
    """A backend whose learned throughput curve is {concurrency: aggregate tok/s}."""
    return BackendSnapshot(
        name=name, index=index, kind=kind, health=Health.HEALTHY, capacity=capacity,
        in_flight=in_flight, models=frozenset({"m"}), ttft_s=None, decode_tok_s=None,
        upstream_running=None, upstream_waiting=None,
        throughput_curve=tuple(sorted(curve.items())),
        ttft_curve=tuple(sorted((ttft or {1: 0.05}).items())), mean_output_tokens=128.0,
    )


# The measured shapes: llama.cpp is flat past 8 streams, vLLM (FP8+AITER) keeps scaling.
LLAMA = {1: 114, 8: 244, 32: 270, 64: 255, 128: 277}
AITER = {1: 121, 8: 666, 32: 1932, 64: 2917, 128: 3637}
FP8 = {1: 104, 8: 515, 32: 1493, 64: 2135, 128: 2792}
R128 = RouteRequest(endpoint="chat", model="m", max_tokens=128)
TTFT = {1: 0.02}

ADAPTIVE_CASES = [
    # a lone request: the faster single stream wins (vLLM+AITER 121 > llama 114)
    (pool(learned("llama", 0, 0, LLAMA, TTFT), learned("vllm", 1, 0, AITER, TTFT)), "vllm"),
    # ...but stock FP8 vLLM (104) loses a lone request to llama.cpp (114)
    (pool(learned("llama", 0, 0, LLAMA, TTFT), learned("vllm", 1, 0, FP8, TTFT)), "llama"),
    # at 7 in flight on vLLM, an 8th stream there is slower than llama.cpp's first
    (pool(learned("llama", 0, 0, LLAMA, TTFT), learned("vllm", 1, 7, AITER, TTFT)), "llama"),
    # llama.cpp's second stream would halve its first one's speed: back to vLLM
    (pool(learned("llama", 0, 1, LLAMA, TTFT), learned("vllm", 1, 30, AITER, TTFT)), "vllm"),
    # deep in llama's flat region nothing is gained there, even with 120 on vLLM
    (pool(learned("llama", 0, 16, LLAMA, TTFT), learned("vllm", 1, 120, AITER, TTFT)), "vllm"),
    # capacity beats the model: llama is full, so vLLM it is
    (pool(learned("llama", 0, 1, LLAMA, TTFT, capacity=1),
          learned("vllm", 1, 7, AITER, TTFT)), "vllm"),
    # a backend never observed is assumed as fast per stream as the best seen: it is tried
    (pool(learned("llama", 0, 4, LLAMA, TTFT), learned("new", 1, 0, {}, {})), "new"),
    # TTFT counts: same curves, but one backend is predicted 2 s slower to first token
    (pool(learned("a", 0, 0, AITER, {1: 2.0}), learned("b", 1, 0, AITER, {1: 0.02})), "b"),
    # curves as learned from the emulators at 32 concurrent (decode-only rates): llama.cpp's
    # second stream adds 14 tok/s, vLLM's 31st about 60: vLLM
    (pool(learned("llama", 0, 1, {1: 130, 2: 144, 4: 193, 8: 286}, {1: 0.1, 2: 0.12}),
          learned("vllm", 1, 30, {8: 706, 24: 1887, 32: 2367}, {8: 0.08, 32: 0.3})), "vllm"),
    # vLLM FP8 measured only up to 24, still scaling (49 tok/s per added stream), with 26 in
    # flight, against a sixth llama.cpp stream: the slope carries on past 24, so vLLM (a
    # plain sqrt extrapolation made it look flat there and gave the stream to llama.cpp)
    (pool(learned("llama", 0, 5, {1: 125, 2: 144, 3: 171, 6: 259, 12: 267},
                  {1: 0.1, 6: 0.49, 12: 1.05}),
          learned("vllm", 1, 26, {1: 104, 3: 223, 6: 410, 24: 1300}, {6: 0.04, 24: 0.27})),
     "vllm"),
]


@pytest.mark.parametrize(("snapshot", "expected"), ADAPTIVE_CASES)
def test_adaptive_picks(snapshot: PoolSnapshot, expected: str) -> None:
    decision = POLICIES["adaptive"](PolicyConfig(random.Random(0))).choose(R128, snapshot)
    assert decision == Route(expected)


def test_adaptive_fills_a_pool_like_the_marginal_gains_say() -> None:
    """Filling 32 slots one by one puts exactly one request on llama.cpp (31 + 1 beats
    30 + 2 for total tok/s), and 128 puts a handful there, never more than 8 (past 8 its
    curve is flat)."""
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    load = {"llama": 0, "vllm": 0}
    for total in range(1, 129):
        snap = pool(learned("llama", 0, load["llama"], LLAMA, TTFT, capacity=102),
                    learned("vllm", 1, load["vllm"], AITER, TTFT, capacity=1024))
        decision = policy.choose(R128, snap)
        assert isinstance(decision, Route)
        load[decision.backend] += 1
        if total == 32:
            assert load == {"llama": 1, "vllm": 31}
    assert 1 <= load["llama"] <= 8


def fill(policy: Any, backends: dict[str, tuple[str, dict[int, float], int]],
         total: int) -> dict[str, int]:
    """Route `total` requests one after another, none finishing; {name: kind, curve,
    capacity} describe the pool. Returns how many went where."""
    load = dict.fromkeys(backends, 0)
    for _ in range(total):
        snap = pool(*(learned(name, i, load[name], curve, TTFT if curve else {}, cap, kind)
                      for i, (name, (kind, curve, cap)) in enumerate(backends.items())))
        decision = policy.choose(R128, snap)
        assert isinstance(decision, Route)
        load[decision.backend] += 1
    return load


@pytest.mark.parametrize(("total", "on_llama"), [(8, 1), (32, 1)])
def test_adaptive_cold_burst_follows_the_engine_kinds(total: int, on_llama: int) -> None:
    """A fresh proxy whose one finished request (a warm-up) went to llama.cpp, then a burst:
    vLLM, never measured, is expected to scale as its kind does, llama.cpp to flatten as
    its kind does. Before the kind shapes, the unmeasured vLLM was held at one stream
    (an exploration limit) and llama.cpp got 3 of 8."""
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    load = fill(policy, {"llama": ("llamacpp", {1: 124}, 102), "vllm": ("vllm", {}, 1024)},
                total)
    assert load == {"llama": on_llama, "vllm": total - on_llama}


@pytest.mark.parametrize(("total", "on_llama"), [(8, 1), (32, 3)])
def test_adaptive_step_up_from_one_stream(total: int, on_llama: int) -> None:
    """Both backends measured at one stream only (a sweep that starts at c=1), then a step
    to 8: vLLM is explored along its kind's shape (16 streams from one measured), not held
    at twice what it was seen at (that gave llama.cpp 3 of 8 streams: 0.85x vLLM alone in
    the demo). A step straight to 32 is past what one sample can vouch for: llama.cpp
    takes 3 streams until vLLM's answers from 16 come back."""
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    load = fill(policy, {"vllm": ("vllm", {1: 122}, 1024),
                         "llama": ("llamacpp", {1: 124}, 102)}, total)
    assert load == {"llama": on_llama, "vllm": total - on_llama}


@pytest.mark.parametrize("warm", ["vllm", "llama"])
def test_adaptive_cold_burst_whichever_backend_the_warm_up_measured(warm: str) -> None:
    """A fresh proxy whose one finished request went to either backend, then a burst of
    32: one stream on llama.cpp. (With vLLM measured and llama.cpp not, counting the
    unmeasured llama.cpp as within its limit once sent it every stream past vLLM's 16.)"""
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    load = fill(policy, {"vllm": ("vllm", {1: 122} if warm == "vllm" else {}, 1024),
                         "llama": ("llamacpp", {1: 124} if warm == "llama" else {}, 102)},
                32)
    assert load == {"llama": 1, "vllm": 31}


def test_exploration_is_trusted_as_far_as_the_shape_keeps_half_the_speed() -> None:
    from policies import priors

    assert priors.trusted_up_to(priors.BATCHING, 1) == 16
    assert priors.trusted_up_to(priors.LLAMACPP, 1) == 3
    assert priors.trusted_up_to(priors.LLAMACPP, 32) == 64  # flat: half speed at 2x
    for shape in priors.SHAPES.values():
        for highest in (1, 3, 8, 100, 1000):
            assert priors.trusted_up_to(shape, highest) >= highest + 2


def test_adaptive_cold_pool_of_one_kind_is_balanced() -> None:
    """Two llama.cpp never measured: the same shape, so neither is preferred past the
    other's load (the probe goes first, in config order)."""
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    load = fill(policy, {"a": ("llamacpp", {}, 8), "b": ("llamacpp", {}, 8)}, 12)
    assert load == {"a": 6, "b": 6}


def test_kind_shapes() -> None:
    from policies import priors

    assert priors.relative(priors.LLAMACPP, 1) == 1.0
    assert priors.relative(priors.LLAMACPP, 0.5) == 0.5
    assert priors.relative(priors.LLAMACPP, 1000) == priors.LLAMACPP[-1][1]  # flat past
    assert priors.relative(priors.BATCHING, 20) == pytest.approx(9.5)  # between 8 and 32
    assert priors.shape_of("vllm") is priors.BATCHING
    assert priors.shape_of("llamacpp") is priors.LLAMACPP
    assert priors.shape_of("something-new") is priors.BATCHING
    for shape in priors.SHAPES.values():  # non-decreasing: more streams never lose
        values = [g for _, g in shape]
        assert values == sorted(values)


def test_affinity_is_a_bounded_preference() -> None:
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    session = RouteRequest(endpoint="chat", model="m", max_tokens=128, affinity_key="s1")
    idle = pool(learned("llama", 0, 0, FP8, TTFT), learned("vllm", 1, 0, FP8, TTFT))
    assert policy.choose(session, idle) == Route("llama")  # tie: config order
    # vLLM is now a little better, but the session stays where its cache is
    busier = pool(learned("llama", 0, 1, FP8, TTFT), learned("vllm", 1, 0, FP8, TTFT))
    assert policy.choose(session, busier) == Route("llama")
    # far worse (over AFFINITY_SLACK x the best cost): the session moves
    swamped = pool(learned("llama", 0, 30, LLAMA, TTFT), learned("vllm", 1, 0, FP8, TTFT))
    assert policy.choose(session, swamped) == Route("vllm")
    # affinity never overrides capacity
    full = pool(learned("llama", 0, 1, FP8, TTFT), learned("vllm", 1, 1, FP8, TTFT,
                                                           capacity=1))
    assert policy.choose(session, full) == Route("llama")
    # and can be turned off
    off = POLICIES["adaptive"](PolicyConfig(random.Random(0), affinity=False))
    off.choose(session, idle)
    assert off.choose(session, busier) == Route("vllm")


def test_returning_session_beats_the_probe_of_an_unmeasured_backend() -> None:
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    session = RouteRequest(endpoint="chat", model="m", max_tokens=128, affinity_key="s1")
    other = RouteRequest(endpoint="chat", model="m", max_tokens=128, affinity_key="s2")
    unmeasured_b = pool(learned("a", 0, 0, FP8, TTFT), b("b", 1))
    # the session's first turn was served by a, before b joined the pool
    assert policy.choose(session, pool(learned("a", 0, 0, FP8, TTFT))) == Route("a")
    assert policy.choose(session, unmeasured_b) == Route("a")
    # a new session is the probe
    assert policy.choose(other, unmeasured_b) == Route("b")
    # with a full, the returning session may take the probe too
    full_a = pool(learned("a", 0, 1, FP8, TTFT, capacity=1), b("b", 1))
    assert policy.choose(session, full_a) == Route("b")


LATENCY_CASES = [
    (pool(learned("a", 0, 0, AITER, {1: 0.5}), learned("b", 1, 0, AITER, {1: 0.1})), "b"),
    # b's TTFT grows with load: at 8 in flight it is predicted slower than a
    (pool(learned("a", 0, 0, AITER, {1: 0.3}),
          learned("b", 1, 7, AITER, {1: 0.1, 8: 0.6})), "a"),
    # unknown TTFT: predicted at the best seen, ties go by load then order
    (pool(learned("a", 0, 1, AITER, {1: 0.2}, capacity=4), learned("b", 1, 0, AITER, {})), "b"),
]


@pytest.mark.parametrize(("snapshot", "expected"), LATENCY_CASES)
def test_latency_picks(snapshot: PoolSnapshot, expected: str) -> None:
    decision = POLICIES["latency"](PolicyConfig(random.Random(0))).choose(R128, snapshot)
    assert decision == Route(expected)


def test_affinity_bound_grows_with_the_prefill_a_move_would_repeat() -> None:
    # two CPU-bound llama.cpp instances: a second stream halves each one's speed
    flat = {1: 45.0, 2: 45.0}
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))

    def turn(prompt_chars: int, prefill: float | None) -> Decision:
        request = RouteRequest(endpoint="chat", model="m", max_tokens=16,
                               prompt_chars=prompt_chars, affinity_key="s1")
        # the session lives on a, which has one other stream; b is idle
        snap = pool(replace(learned("a", 0, 1, flat), prefill_chars_per_s=prefill),
                    replace(learned("b", 1, 0, flat), prefill_chars_per_s=prefill))
        return policy.choose(request, snap)

    assert policy.choose(RouteRequest(endpoint="chat", model="m", max_tokens=16,
                                      affinity_key="s1"), pool(learned("a", 0, 0, flat))
                         ) == Route("a")
    # a costs ~1.47 s (twice its own 0.71 s), b ~0.41 s: over 3x, and nothing known about
    # prefill: the session moves
    assert turn(6000, None) == Route("b")
    assert policy.choose(RouteRequest(endpoint="chat", model="m", max_tokens=16,
                                      affinity_key="s1"), pool(learned("a", 0, 0, flat))
                         ) == Route("a")
    # a long conversation (6,000 bytes at 3,000 bytes/s = 2 s of prefill to repeat) stays
    assert turn(6000, 3000.0) == Route("a")
    # a short one (0.1 s to repeat) still moves
    assert turn(300, 3000.0) == Route("b")


def test_a_long_prompt_goes_where_it_prefills_fastest() -> None:
    """Alone, a stock-FP8 vLLM streams slower than llama.cpp (104 against 114 tok/s), so a
    short request goes to llama.cpp. A 20k-token agent opening (about 100 kB) would wait
    4 s for llama.cpp's prefill (25 kB/s) and 0.5 s for vLLM's (200 kB/s): it goes to
    vLLM, although the TTFT curves, learned on 3 kB prompts, are the same."""
    def backends(vllm_in_flight: int = 0) -> PoolSnapshot:
        return pool(
            replace(learned("llama", 0, 0, LLAMA, TTFT, kind="llamacpp"),
                    prefill_chars_per_s=25_000.0, mean_uncached_chars=3_000.0),
            replace(learned("vllm", 1, vllm_in_flight, FP8, TTFT, kind="vllm"),
                    prefill_chars_per_s=200_000.0, mean_uncached_chars=3_000.0))

    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0), affinity=False))
    short = RouteRequest(endpoint="chat", model="m", max_tokens=128, prompt_chars=3_000)
    opening = replace(short, prompt_chars=100_000)
    assert policy.choose(short, backends()) == Route("llama")
    assert policy.choose(opening, backends()) == Route("vllm")
    # with the prefill unknown (nothing learned), the curves alone decide: llama.cpp
    blind = pool(learned("llama", 0, 0, LLAMA, TTFT, kind="llamacpp"),
                 learned("vllm", 1, 0, FP8, TTFT, kind="vllm"))
    assert policy.choose(opening, blind) == Route("llama")


def test_openings_already_prefilling_count_against_the_next_one() -> None:
    """A burst of 100 kB openings: vLLM prefills 200 kB/s, llama.cpp 25 kB/s (4 s for one).
    With 7 openings ahead of it on vLLM (each 97 kB beyond the typical 3 kB prompt: 3.4 s
    of prefill queued), the eighth waits less on the idle llama.cpp; with those 7 already
    at their first token (no backlog), vLLM again. The route says what the backend will
    prefill: all of the body, or on a session's own backend only the new part."""
    def backends(backlog: float) -> PoolSnapshot:
        return pool(
            replace(learned("llama", 0, 0, LLAMA, TTFT, kind="llamacpp"),
                    prefill_chars_per_s=25_000.0, mean_uncached_chars=3_000.0),
            replace(learned("vllm", 1, 7, AITER, TTFT, kind="vllm"),
                    prefill_chars_per_s=200_000.0, mean_uncached_chars=3_000.0,
                    prefill_backlog_chars=backlog))

    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    opening = RouteRequest(endpoint="chat", model="m", max_tokens=128, prompt_chars=100_000,
                           affinity_key="s")
    assert policy.choose(replace(opening, affinity_key="t"), backends(0.0)) == Route("vllm")
    route = policy.choose(opening, backends(7 * 97_000.0))
    assert route == Route("llama") and isinstance(route, Route)
    assert route.prefill_chars == 100_000  # nothing of it cached there yet
    turn = policy.choose(replace(opening, prompt_chars=104_000), backends(7 * 97_000.0))
    assert turn == Route("llama") and isinstance(turn, Route) and turn.prefill_chars == 4_000


def test_a_session_backend_is_charged_only_the_new_part_of_its_prompt() -> None:
    """Turn 2 of a conversation that opened on llama.cpp: 103 kB, of which 100 kB are the
    first turn, cached there. Elsewhere all of it would be prefilled: it stays, although
    vLLM prefills 8x faster and would take a fresh request of that size."""
    policy = POLICIES["adaptive"](PolicyConfig(random.Random(0)))
    llama = replace(learned("llama", 0, 0, LLAMA, TTFT, kind="llamacpp"),
                    prefill_chars_per_s=25_000.0, mean_uncached_chars=3_000.0)
    vllm = replace(learned("vllm", 1, 0, FP8, TTFT, kind="vllm"),
                   prefill_chars_per_s=200_000.0, mean_uncached_chars=3_000.0)
    first = RouteRequest(endpoint="chat", model="m", max_tokens=128, prompt_chars=100_000,
                         affinity_key="s")
    assert policy.choose(first, pool(llama, replace(vllm, in_flight=0, capacity=0))) \
        == Route("llama")  # vLLM full: the opening goes to llama.cpp
    second = replace(first, prompt_chars=103_000)
    assert policy.choose(second, pool(llama, vllm)) == Route("llama")
    fresh = replace(second, affinity_key="other")
    assert policy.choose(fresh, pool(llama, vllm)) == Route("vllm")
