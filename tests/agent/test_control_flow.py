"""The agent's command life cycle on a simulated site, over real MQTT and Modbus TCP:
shed, cancel, supersede, a relay that fails, a staggered restore. (A killed agent and a
frozen meter: tests/agent/test_crash_flow.py.)"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from pymodbus.client import ModbusTcpClient

from lmt.agent.broker import Broker, free_port
from lmt.agent.daemon import Agent
from lmt.agent.platform import _Client, command_body, send, sign_command_file
from lmt.config import load_agent_config
from tests.agent.harness import AgentThread, write_agent_config
from tests.conftest import wait_until

TERMINAL = "demo-0001"


class Rig:
    """A site (subprocess), an agent config, a Modbus observer and a results subscriber."""

    def __init__(self, tmp: Path, site_port: int, broker: Broker, **overrides: Any) -> None:
        self.broker = broker
        self.cfg_path, self.key = write_agent_config(tmp, site_port, broker.port, **overrides)
        self.modbus = ModbusTcpClient("127.0.0.1", port=site_port)
        assert self.modbus.connect()
        self.sub = _Client("127.0.0.1", broker.port)
        self.sub.connect([f"lmt/v1/{TERMINAL}/result", f"lmt/v1/{TERMINAL}/events"])
        self.results: list[dict] = []
        self.events: list[dict] = []

    def close(self) -> None:
        self.sub.close()
        self.modbus.close()

    def pump(self) -> None:
        while not self.sub.messages.empty():
            msg = self.sub.messages.get()
            batch = json.loads(msg.payload)
            (self.results if batch["stream"] == "results" else self.events).extend(
                batch["records"])

    def statuses(self, cid: str) -> list[str]:
        self.pump()
        return [r["status"] for r in self.results if r["command_id"] == cid]

    def event_loads(self, type_: str) -> list[str]:
        self.pump()
        return [e["data"]["load"] for e in self.events if e["type"] == type_]

    def coils(self) -> list[bool]:
        rr = self.modbus.read_coils(0, count=8, device_id=2)
        assert not rr.isError()
        return list(rr.bits[:8])

    def off_loads(self) -> set[str]:
        """Loads whose relay is open (the demo site's relay_1..relay_7)."""
        names = ["chiller-1", "chiller-2", "air-compressor", "ev-chargers", "water-heater",
                 "hall-b-lighting", "server-room"]
        return {n for n, on in zip(names, self.coils()[:7], strict=True) if not on}

    def power_kw(self) -> float:
        import struct
        rr = self.modbus.read_input_registers(0x34, count=2, device_id=1)
        return struct.unpack(">f", struct.pack(">2H", *rr.registers))[0] / 1000

    def command(self, kind: str, **params: Any) -> tuple[str, list[dict]]:
        body = command_body(kind, TERMINAL, **params)
        answers = send("127.0.0.1", self.broker.port, "lmt/v1", TERMINAL,
                       sign_command_file(self.key, body), timeout_s=20)
        return body["id"], answers


def test_shed_then_cancel(tmp_path: Path, site: int, broker: Broker) -> None:
    rig = Rig(tmp_path, site, broker)
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        before = sum(rig.power_kw() for _ in range(3)) / 3
        cid, answers = rig.command("shed", shed_kw=40.0, duration_s=600)
        assert answers[-1]["status"] == "accepted" and "shed 40 kW" in answers[-1]["detail"]
        cap = answers[-1]["data"]["cap_kw"]
        assert cap == pytest.approx(before - 40, abs=5)
        wait_until(lambda: rig.power_kw() < cap, 10, "the site under the shed target")
        wait_until(lambda: "executed" in rig.statuses(cid), 10, "executed")
        kid, answers = rig.command("cancel", target=cid)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: "completed" in rig.statuses(kid), 15, "the cancel to complete")
        assert rig.statuses(cid) == ["accepted", "executed", "cancelled"]
        assert all(rig.coils()[:7])
        # cancelling it again: nothing active by that id
        _kid2, answers = rig.command("cancel", target=cid)
        assert answers[-1]["reason"] == "unknown_target"
    finally:
        runner.stop()
        rig.close()


def test_supersede_keeps_what_is_needed(tmp_path: Path, site: int, broker: Broker) -> None:
    rig = Rig(tmp_path, site, broker)
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        p0 = rig.power_kw()
        a, _ = rig.command("cap", cap_kw=round(p0 - 60), duration_s=600)
        wait_until(lambda: rig.power_kw() < p0 - 60, 10, "the deep cap")
        # every relay that is open has its load_shed event (events arrive over MQTT)
        wait_until(lambda: rig.off_loads() and rig.off_loads() == set(rig.event_loads("load_shed")),
                   10, "the shed events")
        shed_a = set(rig.event_loads("load_shed"))
        b, answers = rig.command("cap", cap_kw=round(p0 - 20), duration_s=600)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: rig.statuses(a) == ["accepted", "executed", "superseded"], 10,
                   "A superseded")
        # B restores loads one per cycle while they fit, and never rises above its cap
        wait_until(lambda: rig.event_loads("load_restored"), 20, "a staggered restore")
        for _ in range(10):
            assert rig.power_kw() < p0 - 20
        restored = set(rig.event_loads("load_restored"))
        assert restored <= shed_a
        assert not set(rig.event_loads("load_shed")) - shed_a, "B shed a load A had not"
        _kid, _ = rig.command("cancel", target=b)
        wait_until(lambda: "cancelled" in rig.statuses(b), 15, "B cancelled")
        assert all(rig.coils()[:7])
    finally:
        runner.stop()
        rig.close()


def test_a_failing_relay_is_passed_over(tmp_path: Path, site: int, broker: Broker) -> None:
    dead = free_port()  # a second relay module that does not answer
    rig = Rig(tmp_path, site, broker, poll={"offline_after_s": 0.5})
    cfg = tomllib.loads(rig.cfg_path.read_text())
    cfg["devices"].append({"name": "relays-b", "profile": "generic-relay-8",
                           "host": "127.0.0.1", "port": dead, "device_id": 1})
    cfg["loads"].append({"name": "dryer", "device": "relays-b", "point": "relay_1",
                         "rated_kw": 50.0, "priority": 1})
    rig.cfg_path.write_text(tomli_w.dumps(cfg))
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        p0 = rig.power_kw()
        cid, _ = rig.command("cap", cap_kw=round(p0 - 30), duration_s=600)
        # the dryer (priority 1) is tried first, fails, and the next loads are shed instead
        wait_until(lambda: rig.power_kw() < p0 - 30, 15, "the cap met without the dryer")
        rig.pump()
        failed = [e for e in rig.events if e["type"] == "switch_failed"]
        assert failed and failed[0]["data"]["load"] == "dryer"
        assert "dryer" not in rig.event_loads("load_shed")
        executed = next(r for r in rig.results if r["command_id"] == cid and
                    r["status"] == "executed")
        assert "dryer" not in executed["data"]["shed"]
        offline = [e for e in rig.events if e["type"] == "device_offline"]
        assert offline and offline[0]["data"]["device"] == "relays-b"
    finally:
        runner.stop()
        rig.close()


def test_first_switch_in_the_cycle_of_the_command_and_restore_staggered(
        tmp_path: Path, site: int, broker: Broker) -> None:
    """A command is acted on in the cycle it arrives in, even when the main meter was read a
    moment before (its power point is made due at once); when it ends, loads come back at
    most control.restore_step_kw per cycle, not all at once."""
    rig = Rig(tmp_path, site, broker, poll={"interval_s": 2.0},
              control={"restore_step_kw": 20.0, "min_off_s": 0.0, "min_on_s": 0.0})
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        cap = round(rig.power_kw() - 45.0)
        cid, answers = rig.command("cap", cap_kw=float(cap), duration_s=8)
        assert answers[-1]["status"] == "accepted"
        accepted_ts = answers[-1]["ts"]
        wait_until(lambda: len(rig.event_loads("load_shed")) >= 2, 15, "loads shed")
        first_shed = min(e["ts"] for e in rig.events if e["type"] == "load_shed")
        assert first_shed - accepted_ts < 1.0, "the first switch waited for the next cycle"
        shed = rig.event_loads("load_shed")
        wait_until(lambda: "completed" in rig.statuses(cid), 30, "the end of the command")
        wait_until(lambda: not rig.off_loads(), 30, "all loads back on")
        rig.pump()
        restores = sorted(e["ts"] for e in rig.events if e["type"] == "load_restored")
        assert len(restores) == len(shed) >= 2
        # 20 kW per cycle: the demo's shed loads (22, 30, 12 kW ...) come back one per cycle
        assert restores[-1] - restores[0] >= 1.5, f"restored together: {restores}"
    finally:
        runner.stop()
        rig.close()
