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
        (0.0, "fail", True, False, 0.0),  # still online: due again at once (the next cycle)
        (1.0, "fail", True, False, 1.0),
        (2.0, "fail", True, False, 2.0),
        (3.0, "fail", False, True, 3.0 + 2 * 0.8),   # 3 s failing: offline, back-off starts
    ]
    for t, outcome, online, went, earliest in table:
        assert outcome == "fail"
        assert h.failure(t, "no answer") is went, t
        assert h.online is online, t
        assert h.next_attempt >= earliest, t
        if online:
            assert h.next_attempt == t, t
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
    for t in (1.3, 2.3, 3.3):  # each failure noticed 0.3 s into the cycle (a timeout)
        h.failure(t, "x", urgent=True)
        assert h.due(t - 0.3 + 1.0), t  # the next cycle retries it


def test_a_failing_device_is_retried_on_the_very_next_cycle() -> None:
    """Cycles start every second; a read fails 0.4 s into a cycle (its timeout). Until the
    device is declared offline, every cycle retries it: none is skipped."""
    h = DeviceHealth(POLICY, rng=random.Random(2))
    attempts = []
    for cycle in range(8):
        start = float(cycle)
        if h.due(start):
            attempts.append(cycle)
            h.failure(start + 0.4, "no answer within 0.40 s")
    # failing since 0.4 s, offline at the read of 3.4 s (3 s later): every cycle until then
    assert attempts[:4] == [0, 1, 2, 3]
    assert not h.online
    # then the back-off: the next attempt at least 2 × 0.8 s after that failure
    assert 4 not in attempts


def test_read_deadline_is_per_transaction_plus_wire_time() -> None:
    h = DeviceHealth(POLICY)
    # 16 requests of a DL/T 645 meter at 2400 bit/s: 1 s each before its latency is known,
    # plus 2.5 s on the wire
    assert h.deadline_s(16, 2.5) == pytest.approx(16 * 1.0 + 2.5)
    assert h.deadline_s(1) == pytest.approx(1.0)  # one block over TCP: the timeout itself
    assert h.deadline_s(0) == pytest.approx(1.0)  # never less than one request
    # learned per transaction: 0.05 s each -> 0.2 s (the floor) per request
    h.success(0, 0.05)
    assert h.deadline_s(16, 2.5) == pytest.approx(16 * 0.2 + 2.5)
    # a slow line (timeout_s 3 s) keeps its own timeout until it answers
    slow = DeviceHealth(HealthPolicy(timeout_s=3.0, max_timeout_s=5.0))
    assert slow.deadline_s(4, 0.4) == pytest.approx(4 * 3.0 + 0.4)


def test_failing_points_are_reported_when_the_set_changes() -> None:
    h = DeviceHealth(POLICY)
    asked = ["power_w", "frequency_hz", "power_factor"]
    block = (("frequency_hz", "power_factor"), "exception 2")
    newly, back = h.points_read(asked, {"power_w": 1.0}, [block])
    assert newly == [(["frequency_hz", "power_factor"], "exception 2")] and back == []
    for _ in range(3):  # still failing: nothing new
        assert h.points_read(asked, {"power_w": 1.0}, [block]) == ([], [])
    # points not asked this cycle (not due) are neither failed nor recovered
    assert h.points_read(["power_w"], {"power_w": 1.0}, []) == ([], [])
    newly, back = h.points_read(asked, {"power_w": 1.0, "power_factor": 0.9},
                                [(("frequency_hz",), "exception 2")])
    assert newly == [] and back == ["power_factor"]
    newly, back = h.points_read(asked, dict.fromkeys(asked, 1.0), [])
    assert newly == [] and back == ["frequency_hz"] and h.failing_points == {}


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


def test_timeouts_grow_while_requests_go_unanswered_and_settle_on_an_answer() -> None:
    """A device slower than the configured timeout is still found: each unanswered request
    makes the next timeout 1.5 times longer, up to the ceiling; an answer resets the boost
    and the timeout then follows the observed latency."""
    h = DeviceHealth(HealthPolicy(timeout_s=1.0, min_timeout_s=0.2, max_timeout_s=5.0,
                                  offline_after_s=100.0))
    seen = [h.timeout_s]
    for t in range(6):
        h.failure(float(t), "no answer within 1 s", timed_out=True)
        seen.append(h.timeout_s)
    assert seen == pytest.approx([1.0, 1.5, 2.25, 3.375, 5.0, 5.0, 5.0])
    h.failure(7.0, "exception 2 (illegal data address)")  # an answer, even if an error
    assert h.timeout_s == 5.0
    h.success(8.0, latency_s=1.6)
    assert h.timeout_s == 5.0  # 4 x 1.6 s, capped
    h.success(9.0, latency_s=0.1)  # smoothed: 0.8 x 1.6 + 0.2 x 0.1 = 1.3 s
    assert h.timeout_s == pytest.approx(5.0)
    for t in range(20):
        h.success(10.0 + t, latency_s=0.1)
    assert h.timeout_s < 1.0
