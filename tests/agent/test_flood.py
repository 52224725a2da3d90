"""A command flood does not starve the cycle: `lmt run` on the simulated site while a client
publishes 3,000 forged commands a second on its command topic. Polling and control keep their
period (the main meter's readings stay at most 1.5 × poll.interval_s apart), what the intake
could not verify is dropped and reported (``commands_dropped``), and a signed command sent
after the flood is carried out."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from lmt.agent.broker import Broker
from tests.agent.test_control_flow import TERMINAL
from tests.agent.test_crash_flow import Watch
from tests.conftest import wait_until

FORGED = json.dumps({"v": 1, "body": json.dumps({
    "id": "forged-0001", "terminal": TERMINAL, "type": "cap", "cap_kw": 1.0, "duration_s": 600,
    "issued_at": 0.0, "expires_at": 1.0}), "sig": "A" * 88})


def _flood(port: int, rate: float, seconds: float, stop: threading.Event) -> int:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    sent = 0
    t0 = time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() - t0 < seconds:
            due = int((time.monotonic() - t0) * rate)
            while sent < due:
                c.publish(f"lmt/v1/{TERMINAL}/cmd", FORGED, qos=0)
                sent += 1
            time.sleep(0.002)
    finally:
        c.loop_stop()
        c.disconnect()
    return sent


def test_a_command_flood_does_not_starve_the_cycle(tmp_path: Path, site: int,
                                                    broker: Broker) -> None:
    rig = Watch(tmp_path, site, broker)
    agent = rig.run()
    stop = threading.Event()
    try:
        wait_until(lambda: rig.pump() or len(rig.readings) > 3, 15, "readings")
        t0 = time.time()
        sent: list[int] = []
        flooder = threading.Thread(target=lambda: sent.append(_flood(broker.port, 3000.0, 6.0,
                                                                     stop)))
        flooder.start()
        flooder.join(30)
        t1 = time.time()
        assert sent and sent[0] >= 15000, sent
        wait_until(lambda: rig.pump() or any(r["ts"] > t1 + 1 for r in rig.readings), 15,
                   "readings after the flood")
        during = sorted(r["ts"] for r in rig.readings if t0 <= r["ts"] <= t1)
        gaps = [b - a for a, b in itertools.pairwise(during)]
        assert len(during) >= 6, during
        assert max(gaps) <= 1.5, f"cycle stretched to {max(gaps):.2f} s under the flood"
        dropped = wait_until(lambda: rig.of("commands_dropped"), 10, "commands_dropped")
        assert isinstance(dropped, list) and sum(e["data"]["count"] for e in dropped) > 1000
        refused = [r for r in rig.results if r["status"] == "rejected"
                   and r["reason"] == "bad_signature"]
        assert refused, "the forged commands that were read are refused"
        cid, answers = rig.command("cap", cap_kw=round(rig.power_kw() - 30), duration_s=5)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: "executed" in rig.statuses(cid), 10, "the real command carried out")
        assert agent.poll() is None, "the agent is still running"
    finally:
        stop.set()
        agent.terminate()
        agent.wait(15)
        rig.close()


def test_poison_messages_are_refused_and_the_agent_runs_on(tmp_path: Path, site: int,
                                                           broker: Broker) -> None:
    """Deep nesting, a huge body, binary junk, retained on the command topic: each is refused
    once, the agent keeps running — also when it starts with them waiting."""
    rig = Watch(tmp_path, site, broker)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="poisoner", protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        nested = '{"v":1,"body":"' + "[" * 3000 + "]" * 3000 + '","sig":"x"}'
        for payload in (nested.encode(), b"\xff\xfe" * 3000, b"{" * 100_000):
            c.publish(f"lmt/v1/{TERMINAL}/cmd", payload, qos=1, retain=True).wait_for_publish(5)
        agent = rig.run()  # the last one is retained: the agent reads it at once
        refused = wait_until(lambda: [r for r in (rig.pump() or rig.results)
                                      if r["status"] == "rejected"
                                      and r["reason"] == "malformed"], 15, "the refusal")
        assert isinstance(refused, list)
        for payload in (nested.encode(), b"\xff\xfe" * 3000):
            c.publish(f"lmt/v1/{TERMINAL}/cmd", payload, qos=1).wait_for_publish(5)
        wait_until(lambda: len([r for r in (rig.pump() or rig.results)
                                if r["reason"] == "malformed"]) >= 3, 15, "three refusals")
        _cid, answers = rig.command("cap", cap_kw=round(rig.power_kw() - 30), duration_s=5)
        assert answers[-1]["status"] == "accepted"
        assert agent.poll() is None
    finally:
        c.publish(f"lmt/v1/{TERMINAL}/cmd", b"", qos=1, retain=True).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()
        if agent is not None:
            agent.terminate()
            agent.wait(15)
        rig.close()
