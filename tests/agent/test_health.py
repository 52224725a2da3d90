"""Device health as a cycle table: offline only after failing a while, back-off with jitter,
adaptive timeouts."""

from __future__ import annotations

import itertools
import random

import pytest

from lmt.agent.health import DeviceHealth, HealthPolicy

POLICY = HealthPolicy(timeout_s=1.0, min_timeout_s=0.2, max_timeout_s=5.0, offline_after_s=3.0,
                      retry_interval_s=1.0, backoff_max_s=20.0)


def test_offline_only_after_failing_for_offline_after_s() -> None:
    h = DeviceHealth(POLICY, rng=random.Random(1))
    # (time, outcome) -> expected online afterwards, went offline now, next attempt not before
    table = [
        (0.0, "fail", True, False, 1.0),
        (1.0, "fail", True, False, 2.0),
        (2.0, "fail", True, False, 3.0),
        (3.0, "fail", False, True, 3.0 + 2 * 0.8),   # 3 s failing: offline, back-off starts
    ]
    for t, outcome, online, went, earliest in table:
        assert outcome == "fail"
        assert h.failure(t, "no answer") is went, t
        assert h.online is online, t
        assert h.next_attempt >= earliest, t
    # back-off doubles (±20 % jitter) up to the ceiling
    waits = []
    t = h.next_attempt
    for _ in range(8):
        h.failure(t, "no answer")
        waits.append(h.next_attempt - t)
        t = h.next_attempt
    assert all(w2 >= w1 * 0.66 for w1, w2 in itertools.pairwise(waits))
    assert max(waits) <= 20.0 * 1.2 and waits[-1] >= 20.0 * 0.8
    # an answer brings it back at once
    assert h.success(t, 0.05) is True
    assert h.online and h.failures == 0 and h.due(t)


def test_a_single_error_does_not_mark_offline() -> None:
    h = DeviceHealth(POLICY)
    assert h.failure(0.0, "crc error") is False
    assert h.success(1.0, 0.05) is False
    assert h.failure(2.0, "crc error") is False and h.failing_since == 2.0


def test_urgent_retries_every_cycle_while_offline() -> None:
    h = DeviceHealth(HealthPolicy(offline_after_s=0.0, retry_interval_s=1.0, backoff_max_s=60))
    assert h.failure(0.0, "x") is True
    for t in (1.0, 2.0, 3.0):
        h.failure(t, "x", urgent=True)
        assert h.next_attempt == pytest.approx(t + 1.0)


def test_timeout_adapts_to_latency() -> None:
    h = DeviceHealth(POLICY)
    assert h.timeout_s == 1.0  # nothing observed yet
    h.success(0, 0.01)
    assert h.timeout_s == 0.2  # floor
    for _ in range(30):
        h.success(0, 0.5)
    assert h.timeout_s == pytest.approx(2.0, rel=0.01)  # 4 x latency
    for _ in range(30):
        h.success(0, 3.0)
    assert h.timeout_s == 5.0  # ceiling
