"""Outlier ejection: a backend that keeps failing is taken out of routing for a while.

A failure is a connect error, a connection dropped before the reply, a 5xx answer, a
timeout (before the first byte or mid-stream) or a failed health probe. After
`after_failures` in a row the backend is *ejected*: no new requests for a backoff that
doubles with each ejection in a row (`base_s`, `2 * base_s`, ... up to `max_s`). When the
backoff expires it is *half-open*: routable again, but the first request it takes is a
trial and it takes no other until the trial ends. A live request that succeeds (any answer
from the backend, a 4xx included) returns it to *active* and resets the backoff; a failure
(the trial's, or a probe's) ejects it again, for longer.

Failures are of two kinds. A backend that is *down* (refused or dropped connections,
timeouts, failed probes) is back when it answers again: a passing health probe ends its
ejection early (half-open at once). A backend that answers with *errors* (5xx) may well
pass its probes while failing every request, so only a live request returns it. A backend
nobody sends anything to stays half-open, which costs nothing.

This module is the state machine only, with no clock: the pool schedules the expiry of a
backoff and asks `may_eject` (ejection never leaves a model without a backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Fault(StrEnum):
    NONE = ""
    DOWN = "down"  # unreachable, hung or gone: a passing health probe clears it
    ERROR = "error"  # answered with a server error: only a live request clears it


class Ejection(StrEnum):
    ACTIVE = "active"
    EJECTED = "ejected"  # out of routing until its backoff expires
    HALF_OPEN = "half_open"  # routable for one trial request at a time


@dataclass(frozen=True, slots=True)
class EjectionRule:
    after_failures: int = 3  # failures in a row that eject; 0 never ejects
    base_s: float = 5.0
    max_s: float = 300.0

    def backoff_s(self, ejections: int) -> float:
        """How long the `ejections`-th ejection in a row lasts."""
        return min(self.max_s, self.base_s * 2.0 ** max(0, ejections - 1))


class Outlier:
    __slots__ = ("ejections", "ejections_total", "failures", "last_fault", "state", "trial",
                 "until")

    def __init__(self) -> None:
        self.state = Ejection.ACTIVE
        self.failures = 0  # in a row, since the last success
        self.ejections = 0  # in a row, since the backend was last active: sets the backoff
        self.ejections_total = 0  # ever, for the metric
        self.trial = False  # half-open: its one trial request is in flight
        self.until: float | None = None  # loop time the backoff ends (for the admin view)
        self.last_fault = Fault.NONE

    @property
    def blocked(self) -> bool:
        """Takes no new request now."""
        return self.state is Ejection.EJECTED or (self.state is Ejection.HALF_OPEN and self.trial)

    def failed(self, rule: EjectionRule, may_eject: bool, fault: Fault) -> float | None:
        """Count a failure. Returns the backoff in seconds when this ejects the backend."""
        self.failures += 1
        if self.state is Ejection.EJECTED:
            return None  # out already; requests sent before the ejection still end
        self.last_fault = fault
        if self.state is Ejection.HALF_OPEN:
            self.trial = False
            return self._eject(rule) if may_eject else None
        if rule.after_failures and self.failures >= rule.after_failures and may_eject:
            return self._eject(rule)
        return None

    def succeeded(self) -> bool:
        """Count a live request the backend answered. True when that returns it (half-open)
        to routing; while still ejected it only resets the count of failures."""
        self.failures = 0
        if self.state is not Ejection.HALF_OPEN:
            return False
        self.state, self.ejections, self.trial, self.until = Ejection.ACTIVE, 0, False, None
        return True

    def probe_passed(self) -> bool:
        """A health probe passed: a backend ejected for being down is half-open at once.
        True when that changed its state."""
        if self.state is Ejection.EJECTED and self.last_fault is Fault.DOWN:
            self.expire()
            return True
        return False

    def ended_neutral(self) -> None:
        """A request ended telling nothing (the client left): a trial may go again."""
        if self.state is Ejection.HALF_OPEN:
            self.trial = False

    def take(self) -> bool:
        """A request was routed here; True when it is the half-open trial."""
        if self.state is Ejection.HALF_OPEN and not self.trial:
            self.trial = True
            return True
        return False

    def expire(self) -> None:
        """The backoff has passed: half-open."""
        if self.state is Ejection.EJECTED:
            self.state, self.trial = Ejection.HALF_OPEN, False

    def reset(self) -> None:
        """Back to active at once (an operator's undrain, a reconfigured server)."""
        self.state, self.failures, self.ejections = Ejection.ACTIVE, 0, 0
        self.trial, self.until, self.last_fault = False, None, Fault.NONE

    def _eject(self, rule: EjectionRule) -> float:
        self.state = Ejection.EJECTED
        self.ejections += 1
        self.ejections_total += 1
        return rule.backoff_s(self.ejections)
