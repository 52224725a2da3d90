"""The agent's MQTT link against a real mosquitto: persistent sessions (MQTT 3.1.1 and 5),
jittered exponential reconnect back-off, the numbered birth and last will."""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import statistics
import time

import pytest

from lmt.agent.broker import Broker
from lmt.agent.mqtt import backoff_delay
from tests.agent.link_harness import LinkHarness, Relay, platform_client, received
from tests.conftest import wait_until


def test_backoff_is_exponential_with_full_jitter() -> None:
    rng = random.Random(1234)
    assert backoff_delay(0, 1.0, 60.0, rng) == 0.0
    means = []
    for failures in range(1, 9):
        ceiling = min(60.0, 2.0 ** failures)
        got = [backoff_delay(failures, 1.0, 60.0, rng) for _ in range(2000)]
        assert all(1.0 <= d <= ceiling for d in got), failures
        assert max(got) > 0.95 * ceiling and min(got) < 1.0 + 0.05 * ceiling  # spread over all of it
        assert len(set(got)) == len(got)  # jittered: no two terminals pick the same instant
        means.append(statistics.fmean(got))
    # the mean roughly doubles per failure until the ceiling reaches reconnect_max_s ...
    for a, b in itertools.pairwise(means[:6]):
        assert 1.6 < b / a < 2.4
    # ... then stays at the middle of [min, max]
    assert abs(means[-1] - 30.5) < 1.5
    # a huge failure count does not overflow
    assert 1.0 <= backoff_delay(10_000, 1.0, 60.0, rng) <= 60.0
    # the same seed gives the same sequence (the tests below rely on it)
    a, b = random.Random(5), random.Random(5)
    assert [backoff_delay(3, 0.5, 4, a) for _ in range(5)] == \
        [backoff_delay(3, 0.5, 4, b) for _ in range(5)]


def _failures(caplog: pytest.LogCaptureFixture) -> list[tuple[float, float]]:
    """(time logged, delay announced) of each failed connection the link logged."""
    out = []
    for r in list(caplog.records):
        m = re.search(r"next attempt in ([0-9.]+) s", r.getMessage())
        if r.name == "lmt.mqtt" and m:
            out.append((r.created, float(m.group(1))))
    return out


def test_reconnect_backs_off_with_jitter_and_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmt.mqtt")
    broker = Broker().start()
    h = LinkHarness(port=broker.port, reconnect_min_s=0.2, reconnect_max_s=1.0,
                    rng=random.Random(42)).start()
    try:
        h.wait_connected()
        assert h.link.generation == 1
        broker.stop()
        wait_until(lambda: len(_failures(caplog)) >= 6, 30, "six failed reconnects")
        assert not h.link.connected
        fails = _failures(caplog)[:6]
        delays = [d for _, d in fails]
        for k, d in enumerate(delays, start=1):
            assert 0.2 <= d <= min(1.0, 0.2 * 2 ** k) + 0.05, (k, delays)
        assert len(set(delays)) >= 5, delays  # jittered
        assert max(delays[3:]) > 0.4, delays  # the ceiling grew past 2 × reconnect_min_s
        # each attempt came no sooner than the delay announced after the previous failure
        for (t0, d), (t1, _) in itertools.pairwise(fails):
            assert t1 - t0 >= d - 0.02, (t1 - t0, d)
        assert "Connection refused" in caplog.text
        assert h.link.failures >= 6

        broker.start()  # the same port
        wait_until(lambda: h.link.connected and h.link.generation == 2, 15, "the link to reconnect")
        sub = platform_client(broker.port, [h.topics.status])
        try:
            status = json.loads(sub.messages.get(timeout=10).payload)
            assert status["online"] is True and status["connection"] == h.link.connection >= 7
        finally:
            sub.close()
    finally:
        h.stop()
        broker.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_commands_sent_while_disconnected_arrive_after_reconnect(broker: Broker,
                                                                 protocol: str) -> None:
    """The broker keeps the terminal's session: QoS 1 commands published during an outage are
    delivered when the same link reconnects (clean_session=false; MQTT 5: clean_start=false and
    a session expiry interval)."""
    relay = Relay(broker.port)
    h = LinkHarness(terminal=f"session-{protocol}", port=relay.port, protocol=protocol,
                    session_expiry_s=60).start()
    plat = platform_client(broker.port, [h.topics.status])
    try:
        h.wait_connected()
        h.wait_subscribed(plat)
        plat.publish(h.topics.cmd, "before")
        wait_until(lambda: h.commands == [b"before"], 10, "the first command")

        relay.cut()
        wait_until(lambda: not h.link.connected, 10, "the link to notice the outage")
        statuses: list[dict] = []
        wait_until(lambda: any(not s["online"] for s in received(plat, statuses)), 10,
                   "the broker to publish the last will")
        for i in range(3):
            plat.publish(h.topics.cmd, f"during-{i}")  # acknowledged: the broker queued them

        relay.restore()
        wait_until(lambda: h.link.connected and h.link.generation == 2, 15, "the reconnect")
        wait_until(lambda: b"during-2" in h.commands, 10, "the queued commands")
        # QoS 1 is at least once: "before" comes again if the cut beat its acknowledgement
        # (the agent refuses a repeated command id as replayed)
        assert [c for c in h.commands if c != b"before"] == [b"during-0", b"during-1", b"during-2"]
    finally:
        plat.close()
        h.stop()
        relay.close()


def test_without_a_session_expiry_mqtt5_loses_them(broker: Broker) -> None:
    """The control for the test above: MQTT 5 with session_expiry_s = 0 ends the session with
    the connection, so the commands sent meanwhile are gone."""
    relay = Relay(broker.port)
    h = LinkHarness(terminal="session-none", port=relay.port, protocol="5",
                    session_expiry_s=0).start()
    plat = platform_client(broker.port, [])
    try:
        h.wait_connected()
        relay.cut()
        wait_until(lambda: not h.link.connected, 10, "the link to notice the outage")
        plat.publish(h.topics.cmd, "lost")
        relay.restore()
        wait_until(lambda: h.link.generation == 2, 15, "the reconnect")
        wait_until(lambda: h.link.connected, 15, "the link to be connected")
        # once the new subscription is in place a probe arrives; nothing queued came before it
        h.wait_subscribed(plat)
        assert h.commands == []
    finally:
        plat.close()
        h.stop()
        relay.close()


def test_birth_and_will_carry_the_connection_number(broker: Broker) -> None:
    relay = Relay(broker.port)
    h = LinkHarness(terminal="birth-will", port=relay.port).start()
    plat = platform_client(broker.port, [h.topics.status])
    try:
        h.wait_connected()
        relay.cut()
        wait_until(lambda: h.link.generation == 1 and not h.link.connected, 10, "the outage")
        relay.restore()
        wait_until(lambda: h.link.generation == 2, 15, "the reconnect")
        seen: list[dict] = []
        wait_until(lambda: len(received(plat, seen)) >= 3, 10, "birth, will, birth")
        # The broker may publish the old connection's will after the new birth (it notices
        # the dead connection late): the connection number tells them apart, in any order.
        got = {(m["online"], m["connection"]) for m in seen}
        assert (True, 1) in got and (False, 1) in got, seen
        assert (True, h.link.connection) in got and h.link.connection > 1, seen
    finally:
        plat.close()
        h.stop()
        relay.close()


def test_the_first_connection_waits_a_random_start_up_delay(broker: Broker,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    caplog.set_level(logging.INFO, logger="lmt.mqtt")
    expected = random.Random(3).uniform(0.0, 1.0)
    t0 = time.monotonic()
    with LinkHarness(terminal="jitter", port=broker.port, connect_jitter_s=1.0,
                     rng=random.Random(3)) as h:
        h.wait_connected()
        took = time.monotonic() - t0
    assert expected - 0.02 <= took < expected + 5, (took, expected)
    assert f"in {expected:.1f} s (mqtt.connect_jitter_s)" in caplog.text
