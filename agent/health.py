"""Device health: adaptive timeouts, offline after a while, exponential back-off with jitter.

A device is declared offline only after failing for ``offline_after_s`` (not on the first
error); while it fails it is retried every cycle until then, then with exponential back-off up
to ``backoff_max_s`` (with ±20 % jitter, so many devices do not retry in step). The response
timeout adapts to the device: ``max(min_timeout_s, 4 × observed latency)``, capped at
``max_timeout_s``; before any answer it is ``timeout_s``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class HealthPolicy:
    timeout_s: float = 1.0
    min_timeout_s: float = 0.2
    max_timeout_s: float = 5.0
    offline_after_s: float = 10.0
    retry_interval_s: float = 1.0
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
    latency_s: float | None = None  # smoothed observed latency
    rng: random.Random = field(default_factory=random.Random)

    @property
    def timeout_s(self) -> float:
        p = self.policy
        if self.latency_s is None:
            return min(p.timeout_s, p.max_timeout_s)
        return min(p.max_timeout_s, max(p.min_timeout_s, 4.0 * self.latency_s))

    def due(self, now: float) -> bool:
        return now >= self.next_attempt

    def success(self, now: float, latency_s: float) -> bool:
        """Record an answer; True when this brings the device back online."""
        self.latency_s = latency_s if self.latency_s is None else \
            0.8 * self.latency_s + 0.2 * latency_s
        back = not self.online
        self.online, self.failures, self.failing_since, self.backoff_step = True, 0, None, 0
        self.next_attempt = now
        return back

    def failure(self, now: float, error: str, *, urgent: bool = False) -> bool:
        """Record a failure; True when the device has now been failing long enough to be
        declared offline. ``urgent``: retry every cycle regardless (the main meter while a
        command is active)."""
        self.failures += 1
        self.last_error = error
        if self.failing_since is None:
            self.failing_since = now
        went_offline = self.online and now - self.failing_since >= self.policy.offline_after_s
        if went_offline:
            self.online = False
        if self.online or urgent:
            delay = self.policy.retry_interval_s
        else:
            self.backoff_step += 1
            base = self.policy.retry_interval_s * 2.0 ** min(self.backoff_step, 16)
            delay = min(self.policy.backoff_max_s, base) * self.rng.uniform(0.8, 1.2)
        self.next_attempt = now + delay
        return went_offline
