"""adaptive (the default): the backend where one more request costs least, in seconds.

For each eligible backend b with n requests in flight, from its learned throughput curve
T_b (aggregate output tok/s at a concurrency; see policies/model.py):

    cost_b = TTFT_b(n + 1, prompt)                    wait for the first token
           + O / max(T_b(n + 1) - T_b(n),            decode time at the throughput this
                     T_b(n + 1) / (n + 1) / 2)       request adds to the backend

TTFT_b(n + 1, prompt) is the learned TTFT curve corrected for this request's prompt: the
part b would have to prefill (all of it, or on the session's own backend only what was
added since its last turn there) against the typical prompt behind the curve, at b's
learned prefill speed, plus b's prefill backlog (what requests sent there and not yet at
their first bytes bring beyond the typical prompt; model.request_ttft_s). A long agent
opening thus goes where it prefills fastest counting what is queued there, and a
conversation's next turn is charged only its new part where its prefix is cached. The
route says what it expects b to prefill (`Route.prefill_chars`): that is what the
request adds to b's backlog.

O is the request's max_tokens, else the backend's mean reply length. The first term of the
max is the marginal throughput: what the backend's total output rate gains by taking one
more stream. Under steady load the new stream takes that much of the backend's output (the
others slow down to make room for it), so O / marginal counts its decode time in the whole
backend's work: its own decode time plus the delay it imposes on every stream beside it.
Minimising it sends each request where it adds the most aggregate throughput, which in a
closed loop (Little's law) maximises the pool's. On a backend still scaling linearly it is
close to O / r (r = T / n, the per-stream rate); on llama.cpp, whose second stream nearly
halves the first one's speed for little gain, it is several times that.

The second term caps the charge at twice the request's own decode time, O / r(n + 1). That
is what it costs in time-in-system on a backend that does not scale at all (flat T): every
token it gets is taken from the n streams beside it, which together lose O tokens, or
n O / T seconds of their time, against its own (n + 1) O / T: less than its own time
again. A backend whose curve has gone flat is thus ranked by how slow its streams are
rather than ruled out, and a session's own busy llama.cpp can still beat repeating a long
prefill elsewhere (see affinity below).

A first-order version, O / r(n+1) + n * O * (1/r(n+1) - 1/r(n)), underestimates a bend as
steep as llama.cpp's first one and put a second stream on llama.cpp at 32 concurrent,
where one is best (measured: llama.cpp held 2 of 32 streams most of the time, 1.02x the
best single backend; see docs/benchmarks.md).

Pick: lowest cost; ties by in_flight / capacity, then config order. Exploration: the
gateway measures every backend with one short request before it takes traffic
(proxy/calibrate.py), so a fresh proxy starts from this deployment's single-stream rate,
TTFT and prefill speed. Where that did not happen (calibration off or failed), an idle
backend with no completed request yet is chosen first (config order), so every backend is
measured before the model judges it (except for a returning session whose backend has
room: its cached prefix is worth more than the probe); and a measured backend is not
loaded past what its curve can be trusted to predict (model.explore_limit: as far as its
kind's shape keeps each stream at half the speed measured at its highest load) while
another *measured* backend is within its own limit, so one optimistic extrapolation
cannot flood a slow backend before answers from there come back. A backend not measured
at all is judged by its engine kind's shape (policies/priors.py) alone: it has no limit,
and it is never where the rule sends traffic (a limit of one request there pushed a cold
proxy's first burst onto whichever backend had been measured; with no limit but counted
as "within", it drew everything a measured backend could not take).

Shared devices: backends configured with the same `device` are one accelerator; a
member slower than the device's lead takes only an overflow big enough to pay for the
sharing, otherwise the request waits for the lead (policies/devices.py).

Session affinity (bounded preference): a request with an affinity key (x-session-id or
session_id header, prompt_cache_key or user field, else a hash of its first messages)
goes back to the backend that served its session, as long as that backend is eligible (so
never past its capacity) and its cost (charged only the prompt's new part) is at most
AFFINITY_SLACK times the best backend's cost on its typical prompt, plus the prefill a move
would repeat (the request's body size over the best backend's learned prefill speed, in
body bytes per second of TTFT from requests that prefilled >= 64 tokens not served from
cache). The slack stands for what one request's cost cannot see: the turns to come, which
find their prefix cached only where the session stays. That keeps llama.cpp's per-slot
prompt cache and vLLM's prefix cache warm for agent sessions, the more so the longer the
conversation.
The session table (policies/sessions.py) keeps the most recent MAX_SESSIONS keys; several
replicas share it through Redis.
"""

from __future__ import annotations

from backends.snapshot import BackendSnapshot, PoolSnapshot
from policies import devices, model
from policies.base import Decision, PolicyConfig, Route, RouteRequest, Wait, eligible
from policies.sessions import Sessions

AFFINITY_SLACK = 3.0  # 2 with the first-order cost; this one charges a busy backend more


class Adaptive:
    name = "adaptive"

    def __init__(self, config: PolicyConfig) -> None:
        # affinity key -> (backend, body size of the session's last request there)
        self.sessions: Sessions | None = Sessions() if config.affinity else None

    def choose(self, request: RouteRequest, snapshot: PoolSnapshot) -> Decision:
        found = eligible(request, snapshot)
        if not isinstance(found, tuple):
            return found
        prior_rate = model.prior_stream_tok_s(snapshot.backends)
        held = devices.held_back(request, snapshot, found, prior_rate)
        if held:
            found = tuple(b for b in found if b.name not in held)
            if not found:
                return Wait(f"{', '.join(sorted(held))} share a device with a faster backend "
                            "that is full: waiting for its next free slot", hold=True)
        seen = (self.sessions.get(request.affinity_key)
                if self.sessions is not None and request.affinity_key is not None else None)
        previous, previous_chars = seen if seen is not None else (None, 0)
        returning = previous is not None and any(b.name == previous for b in found)
        idle_unmeasured = [b for b in found if not b.throughput_curve and not b.in_flight]
        if idle_unmeasured and not returning:  # measure every backend before judging it,
            # one probe at a time; a returning session's cache is worth more than a probe
            return self._route(request, min(idle_unmeasured, key=lambda b: b.index))
        # keep each measured backend within what its curve can be trusted to predict, while
        # another measured backend can take the request (capacity is never exceeded)
        within = tuple(b for b in found if b.in_flight < model.explore_limit(b))
        if any(b.throughput_curve for b in within):
            found = within
        prior_ttft = model.prior_ttft_s(snapshot.backends)

        def uncached(name: str) -> int:
            """The session's own backend holds its last prompt; elsewhere all of it is
            prefilled."""
            return (max(0, request.prompt_chars - previous_chars) if name == previous
                    else request.prompt_chars)

        costs = {b.name: cost(b, request, prior_rate, prior_ttft, uncached(b.name))
                 for b in found}
        best = min(found, key=lambda b: (costs[b.name], b.load, b.index))
        pick = best.name
        if previous in costs and previous != pick:
            typical = best.mean_uncached_chars or 0.0  # best's cost as its curve has it
            bound = affinity_bound(cost(best, request, prior_rate, prior_ttft, typical),
                                   best, request)
            if costs[previous] <= bound:
                pick = previous
        return self._route(request, pick, uncached(pick))

    def _route(self, request: RouteRequest, backend: BackendSnapshot | str,
               prefill_chars: int | None = None) -> Route:
        name = backend if isinstance(backend, str) else backend.name
        if self.sessions is not None and request.affinity_key is not None:
            self.sessions.put(request.affinity_key, name, request.prompt_chars)
        return Route(name, prefill_chars)


def affinity_bound(best_cost: float, best: BackendSnapshot, request: RouteRequest) -> float:
    """The most a session's own backend may cost and still be preferred to `best`:
    AFFINITY_SLACK x best's cost, plus the prefill that moving would repeat on `best` (the
    whole prompt, at best's learned prefill speed; nothing while that is unknown)."""
    saved = 0.0
    if best.prefill_chars_per_s:
        saved = request.prompt_chars / best.prefill_chars_per_s
    return AFFINITY_SLACK * best_cost + saved


def cost(b: BackendSnapshot, request: RouteRequest, prior_rate: float,
         prior_ttft: float, uncached_chars: float) -> float:
    n = b.in_flight
    tokens = model.output_tokens(b, request.max_tokens)
    after = model.aggregate_tok_s(b, n + 1, prior_rate)
    margin = after - model.aggregate_tok_s(b, n, prior_rate)
    margin = max(margin, after / (n + 1) / 2, 1e-6)
    return model.request_ttft_s(b, n + 1, uncached_chars, prior_ttft) + tokens / margin
