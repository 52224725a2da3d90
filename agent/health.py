"""Device health: adaptive timeouts, offline after a while, exponential back-off with jitter.

A device is declared offline only after failing for ``offline_after_s`` (not on the first
error); while it fails it is retried on the very next cycle until then (and every cycle while
it is urgent: the main meter during a command), then with exponential back-off up to
``backoff_max_s`` (with ±20 % jitter, so many devices do not retry in step).

Timeouts are per transaction (one request and its answer), not per device read: a read of
``n`` requests may take ``n × timeout_s`` plus the time its frames take on the wire
(:meth:`DeviceHealth.deadline_s`), so a DL/T 645 meter read one data identifier at a time at
2400 bit/s gets the time it needs. The per-transaction timeout adapts to the device:
``max(min_timeout_s, 4 × observed latency)``, capped at ``max_timeout_s``, where the latency
is learned per transaction (a read's time beyond its wire time, divided by its requests);
before any answer it is ``timeout_s``.

Points that fail while the rest of the device answers (a block answered with an exception) are
tracked per point (:meth:`DeviceHealth.points_read`), so the agent reports when the set of
failing points changes, not on every cycle.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class HealthPolicy:
    timeout_s: float = 1.0  # per transaction, until the latency is known
    min_timeout_s: float = 0.2
    max_timeout_s: float = 5.0
    offline_after_s: float = 10.0
    retry_interval_s: float = 1.0  # the base of the back-off once offline
    backoff_max_s: float = 60.0


@dataclass
class DeviceHealth:
    policy: HealthPolicy
    online: bool = True
    failures: int = 0
    backoff_step: int = 0  # failures since declared offline
    failing_since: float | None = None
    next_attempt: float = 0.0
    last_error: str = ""
    latency_s: float | None = None  # smoothed observed latency per transaction
    boost: float = 1.0  # grows while requests time out, so a slow device gets a longer one
    failing_points: dict[str, str] = field(default_factory=dict)  # point -> error
    rng: random.Random = field(default_factory=random.Random)

    @property
    def timeout_s(self) -> float:
        """The response timeout of one transaction."""
        p = self.policy
        base = p.timeout_s if self.latency_s is None else max(p.min_timeout_s, 4.0 * self.latency_s)
        return min(p.max_timeout_s, base * self.boost)

    def deadline_s(self, transactions: int, wire_time_s: float = 0.0) -> float:
        """How long a read of ``transactions`` requests may take: the response timeout for
        each, plus ``wire_time_s``, the time all their frames take on the line (serial)."""
        return max(1, transactions) * self.timeout_s + max(0.0, wire_time_s)

    def due(self, now: float) -> bool:
        return now >= self.next_attempt

    def success(self, now: float, latency_s: float) -> bool:
        """Record an answer (``latency_s``: per transaction); True when this brings the device
        back online."""
        self.latency_s = latency_s if self.latency_s is None else \
            0.8 * self.latency_s + 0.2 * latency_s
        back = not self.online
        self.boost = 1.0
        self.online, self.failures, self.failing_since, self.backoff_step = True, 0, None, 0
        self.next_attempt = now
        return back

    def failure(self, now: float, error: str, *, urgent: bool = False,
                timed_out: bool = False) -> bool:
        """Record a failure; True when the device has now been failing long enough to be
        declared offline. ``timed_out``: no answer in time; the next request waits 1.5 times
        longer (up to ``max_timeout_s``), so a device slower than the configured timeout is
        found and its latency learned.

        Until then it is due again at once (the next cycle retries it: a failure at the end
        of a cycle must not skip the following one); once offline it backs off, unless
        ``urgent`` (the main meter while a command is active), which retries every cycle."""
        self.failures += 1
        self.last_error = error
        if timed_out:
            self.boost = min(self.boost * 1.5, 1e3)
        if self.failing_since is None:
            self.failing_since = now
        went_offline = self.online and now - self.failing_since >= self.policy.offline_after_s
        if went_offline:
            self.online = False
        if self.online or urgent:
            self.next_attempt = now
            return went_offline
        self.backoff_step += 1
        base = self.policy.retry_interval_s * 2.0 ** min(self.backoff_step, 16)
        self.next_attempt = now + min(self.policy.backoff_max_s, base) * self.rng.uniform(0.8, 1.2)
        return went_offline

    def points_read(self, asked: Iterable[str], got: Mapping[str, object],
                    failed: Iterable[tuple[Iterable[str], str]]
                    ) -> tuple[list[tuple[list[str], str]], list[str]]:
        """Record which of the ``asked`` points a read got and which ``failed`` (groups of
        points, each with its error: a block or a data identifier).

        Returns what changed: the groups of points that newly fail, each with its error, and
        the points that failed before and read again now. A point that keeps failing is not
        reported again.
        """
        newly: list[tuple[list[str], str]] = []
        for points, error in failed:
            new = sorted(p for p in points if p not in self.failing_points)
            for p in points:
                self.failing_points[p] = error
            if new:
                newly.append((new, error))
        recovered = sorted(p for p in asked if p in got and p in self.failing_points)
        for p in recovered:
            del self.failing_points[p]
        return newly, recovered
