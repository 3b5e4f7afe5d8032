"""Backends that share one accelerator: the slower member takes only an overflow it can use.

Two engines on one GPU are not two resources. Measured on an H200 (docs/benchmarks.md,
"Real engines on one GPU"): llama-server alone at 8 concurrent made 1,431 tok/s with 4
streams in its slots and 4 waiting; the same 4 streams beside 4 on `transformers serve`
made 322 tok/s (+ 283 from transformers), because every batch of one engine waits for the
other's kernels. So the per-request cost that ranks independent backends (adaptive) is
wrong here: it sends llama-server's overflow to the batching engine, whose first few
streams cost the device far more than they add (the pool at 0.38x llama-server alone at 8
concurrent, 0.79x at 16). Only a big batch pays for the sharing: with 28 streams on
transformers beside llama-server's 4 the device made 1,645 tok/s, above either engine
alone (1,230-1,380 and 1,263).

The rule, for backends configured with the same `device`:
- the lead is the member fastest at one stream (its learned curve; the kind's shape
  before that), among those that could serve the request at all;
- another member takes a request only when, given everything waiting for the device
  besides what the lead holds (its own streams, every request queued in admission and this
  one), its curve reaches BAR of what the lead makes at its capacity. Until then the
  request waits for the lead's next free slot (`Wait(hold=True)`), in arrival order.
  Why BAR = 0.7: sharing the H200, llama-server kept 43-49% of its rate beside a batch of
  16-60 streams and transformers 70-83% of its own, so the device makes more shared than
  the lead alone (L) once 0.45 L + 0.8 T > L, i.e. T > 0.7 L. With the measured curves
  that holds at 28 and 60 streams of overflow (32 and 64 clients) and not at 4 or 12
  (8 and 16 clients), which is where sharing won and lost in the measurements.
- Once a member runs streams, the cost of sharing is being paid already, and its curve is
  learned beside the lead (lower than alone): it keeps taking requests while its curve
  reaches KEEP x BAR of the lead's figure, so it does not flip back and forth.
A lead that is down, draining, ejected or not serving the model holds nothing back.

Only `adaptive` applies it: round_robin and least_loaded are baselines that ignore load
shape by design.
"""

from __future__ import annotations

from collections.abc import Sequence

from backends.snapshot import BackendSnapshot, PoolSnapshot
from policies import model
from policies.base import RouteRequest

BAR = 0.7  # of the lead's rate at its capacity, for the overflow to be worth sharing
KEEP = 0.75  # of BAR, for a member already sharing the device


def lead_of(members: Sequence[BackendSnapshot], prior_rate: float) -> BackendSnapshot:
    return max(members, key=lambda b: (model.aggregate_tok_s(b, 1, prior_rate), -b.index))


def held_back(request: RouteRequest, snapshot: PoolSnapshot,
              candidates: Sequence[BackendSnapshot], prior_rate: float) -> frozenset[str]:
    """Names of candidates that share a device with a faster lead and should not take
    this request (they would cost the device more than they add)."""
    if not any(c.device for c in candidates):  # the common case: nothing declared
        return frozenset()
    held: set[str] = set()
    groups: dict[str, list[BackendSnapshot]] = {}
    for b in snapshot.backends:
        if b.device and b.routable and b.serves(request.model) and b.name not in request.exclude:
            groups.setdefault(b.device, []).append(b)
    for c in candidates:
        members = groups.get(c.device or "")
        if not members or len(members) < 2:
            continue
        lead = lead_of(members, prior_rate)
        if c.name == lead.name:
            continue
        if lead.capacity is not None:
            lead_rate = model.aggregate_tok_s(lead, lead.capacity, prior_rate)
            excess = c.in_flight + request.waiting + 1
        else:  # a lead that never fills would take everything itself
            lead_rate = model.aggregate_tok_s(lead, lead.in_flight + request.waiting + 1,
                                              prior_rate)
            excess = c.in_flight + 1
        bar = lead_rate * BAR * (KEEP if c.in_flight else 1.0)
        if model.aggregate_tok_s(c, excess, prior_rate) < bar:
            held.add(c.name)
    return frozenset(held)
