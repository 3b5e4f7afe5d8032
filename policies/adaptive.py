"""adaptive (the default): the backend where one more request costs least, in seconds.

For each eligible backend b with n requests in flight, from its learned throughput curve
T_b (aggregate output tok/s at a concurrency; see policies/model.py), r_b(k) = T_b(k) / k
is the per-stream rate at k streams, and

    cost_b = TTFT_b(n + 1)                                 wait for the first token
           + O / r_b(n + 1)                                 its own decode time
           + n * O * (1 / r_b(n + 1) - 1 / r_b(n))          delay it adds to the n streams
                                                            that run beside it

O is the request's max_tokens, else the backend's mean reply length. The last term makes
this the marginal cost in total time-in-system: for as long as the new request runs
(O tokens), the n streams beside it each run at r_b(n + 1) instead of r_b(n); a stream
that finishes meanwhile is, under steady load, replaced by another that is slowed the same
way, so the slowdown lasts the new request's whole life, not only the others' remaining
half. To first order this cost is O / (T_b(n + 1) - T_b(n)): the request goes where it adds
the most aggregate throughput, which in a closed loop (by Little's law) maximises the
pool's, not only where it would itself finish first. A lone request goes to the backend with the fastest single
stream; under load, to the one whose curve is still climbing; a backend whose curve is flat
(llama.cpp past a few streams) makes every added stream slow down all the others, so it
stops receiving work long before its slot count.

Pick: lowest cost; ties by in_flight / capacity, then config order. Exploration: an idle
backend with no completed request yet is chosen first (config order), so every backend is
measured before the model judges it (except for a returning session whose backend has
room: its cached prefix is worth more than the probe); and a backend is not
loaded past twice the concurrency it has been measured at (model.explore_limit) while
another backend is within its own limit, so one optimistic guess cannot flood a slow
backend before its first answers come back.

Session affinity (bounded preference): a request with an affinity key (x-session-id or
session_id header, prompt_cache_key or user field, else a hash of its first messages)
goes back to the backend that served its session, as long as that backend is eligible (so
never past its capacity) and its cost is at most AFFINITY_SLACK times the best cost plus
the prefill a move would repeat (the request's body size over the best backend's learned
prefill speed, in body bytes per second of TTFT from requests that prefilled >= 64 tokens
not served from cache). That keeps llama.cpp's per-slot prompt cache and vLLM's prefix
cache warm for agent sessions, the more so the longer the conversation.
The session table keeps the most recent MAX_SESSIONS keys.
"""

from __future__ import annotations

from collections import OrderedDict

from backends.snapshot import BackendSnapshot, PoolSnapshot
from policies import model
from policies.base import Decision, PolicyConfig, Route, RouteRequest, eligible

AFFINITY_SLACK = 2.0
MAX_SESSIONS = 65536


class Adaptive:
    name = "adaptive"

    def __init__(self, config: PolicyConfig) -> None:
        self._affinity = config.affinity
        self._sessions: OrderedDict[str, str] = OrderedDict()

    def choose(self, request: RouteRequest, snapshot: PoolSnapshot) -> Decision:
        found = eligible(request, snapshot)
        if not isinstance(found, tuple):
            return found
        key = request.affinity_key if self._affinity else None
        previous = self._sessions.get(key) if key is not None else None
        returning = previous is not None and any(b.name == previous for b in found)
        idle_unmeasured = [b for b in found if not b.throughput_curve and not b.in_flight]
        if idle_unmeasured and not returning:  # measure every backend before judging it,
            # one probe at a time; a returning session's cache is worth more than a probe
            return self._route(request, min(idle_unmeasured, key=lambda b: b.index))
        # keep each backend within twice the load it has been measured at, while another
        # backend can take the request (capacity is never exceeded either way)
        within = tuple(b for b in found if b.in_flight < model.explore_limit(b))
        found = within or found
        prior_rate = model.prior_stream_tok_s(snapshot.backends)
        prior_ttft = model.prior_ttft_s(snapshot.backends)
        costs = {b.name: cost(b, request, prior_rate, prior_ttft) for b in found}
        best = min(found, key=lambda b: (costs[b.name], b.load, b.index))
        pick = best.name
        if previous in costs and costs[previous] <= affinity_bound(costs[best.name], best,
                                                                   request):
            pick = previous
        return self._route(request, pick)

    def _route(self, request: RouteRequest, backend: BackendSnapshot | str) -> Route:
        name = backend if isinstance(backend, str) else backend.name
        if self._affinity and request.affinity_key is not None:
            self._remember(request.affinity_key, name)
        return Route(name)

    def _remember(self, key: str, backend: str) -> None:
        self._sessions[key] = backend
        self._sessions.move_to_end(key)
        if len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)


def affinity_bound(best_cost: float, best: BackendSnapshot, request: RouteRequest) -> float:
    """The most a session's own backend may cost and still be preferred to `best`:
    AFFINITY_SLACK x best's cost, plus the prefill that moving would repeat on `best` (the
    whole prompt, at best's learned prefill speed; nothing while that is unknown)."""
    saved = 0.0
    if best.prefill_chars_per_s:
        saved = request.prompt_chars / best.prefill_chars_per_s
    return AFFINITY_SLACK * best_cost + saved


def cost(b: BackendSnapshot, request: RouteRequest, prior_rate: float,
         prior_ttft: float) -> float:
    n = b.in_flight
    tokens = model.output_tokens(b, request.max_tokens)
    after = model.aggregate_tok_s(b, n + 1, prior_rate) / (n + 1)  # per stream, with it
    own = tokens / max(after, 1e-6)
    others = 0.0
    if n:
        before = model.aggregate_tok_s(b, n, prior_rate) / n
        others = n * tokens * max(0.0, 1 / max(after, 1e-6) - 1 / max(before, 1e-6))
    return model.ttft_s(b, n + 1, prior_ttft) + own + others
