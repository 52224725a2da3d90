"""Control that outlives the agent, and control that checks it worked, end to end: `lmt run`
and `lmt sim` as real processes, a real broker, Modbus TCP.

- SIGKILL mid-cap: the command is in the persisted state; after the restart the site is back
  under the cap within two cycles of the first fresh reading (also when the relays were reset
  while the agent was down), and the command gets exactly one final result, at its end.
- SIGKILL during the staggered restore at a command's end: no load is left off.
- A main meter frozen by the simulator's fault injection during a cap: the loads shed show no
  effect (``load_unresponsive``), the agent sheds no more (``cap_unmet``), and the final result
  says the cap was not met.
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from lmt.agent.broker import Broker, free_port
from lmt.agent.platform import _Client
from lmt.firmware_sim.control import request
from lmt.firmware_sim.server import ready_info_path
from tests.agent.test_control_flow import TERMINAL, Rig
from tests.conftest import EXAMPLES, lmt_argv, wait_until

FINAL = ("completed", "cancelled", "superseded", "failed")


class Watch(Rig):
    """The control-flow rig, plus the main meter's telemetry; records de-duplicated by
    (stream, seq), as a platform does (a killed agent sends again what it did not see
    acknowledged)."""

    def __init__(self, tmp: Path, site_port: int, broker: Broker, **overrides: Any) -> None:
        super().__init__(tmp, site_port, broker, **overrides)
        self.tel = _Client("127.0.0.1", broker.port)
        self.tel.connect([f"lmt/v1/{TERMINAL}/telemetry"])
        self.readings: list[dict] = []  # the main meter's
        self.all_readings: list[dict] = []

    def close(self) -> None:
        self.tel.close()
        super().close()

    def pump(self) -> None:
        super().pump()
        for name in ("results", "events"):
            seen: set[int] = set()
            kept = []
            for r in getattr(self, name):
                if r["seq"] not in seen:
                    seen.add(r["seq"])
                    kept.append(r)
            setattr(self, name, kept)
        while not self.tel.messages.empty():
            batch = json.loads(self.tel.messages.get().payload)
            self.all_readings += batch["records"]
            self.readings += [r for r in batch["records"] if r["device"] == "main-meter"]

    def of(self, type_: str, since: float = 0.0) -> list[dict]:
        self.pump()
        return [e for e in self.events if e["type"] == type_ and e["ts"] >= since]

    def finals(self, cid: str) -> list[dict]:
        self.pump()
        return [r for r in self.results if r["command_id"] == cid and r["status"] in FINAL]

    def run(self) -> subprocess.Popen[bytes]:
        n = len(self.of("agent_started"))
        agent = subprocess.Popen(lmt_argv("run", "--config", str(self.cfg_path)),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: len(self.of("agent_started")) > n, 30, "the agent")
        return agent

    def set_coils(self, on: bool) -> None:
        assert not self.modbus.write_coils(0, [on] * 7, device_id=2).isError()


def _kill(agent: subprocess.Popen[bytes]) -> None:
    agent.kill()  # as a power cut would: no chance to restore anything
    agent.wait(10)


def _stop(agent: subprocess.Popen[bytes]) -> None:
    agent.terminate()
    agent.wait(15)


def test_sigkill_mid_cap_the_command_goes_on(tmp_path: Path, site: int, broker: Broker) -> None:
    rig = Watch(tmp_path, site, broker)
    agent = rig.run()
    try:
        p0 = rig.power_kw()
        cap = round(p0 - 50)
        cid, answers = rig.command("cap", cap_kw=cap, duration_s=25)
        end_at = answers[-1]["data"]["end_at"]
        wait_until(lambda: "executed" in rig.statuses(cid), 10, "executed")
        wait_until(lambda: rig.power_kw() <= cap, 10, "the site under the cap")
        _kill(agent)
        assert rig.off_loads(), "the loads are still off after the kill"
        # worse: the relay module lost power meanwhile and came back closed
        rig.set_coils(True)
        assert rig.power_kw() > cap
        restart = time.time()
        agent = rig.run()
        wait_until(lambda: rig.power_kw() <= cap, 15, "the site under the cap again")
        first = wait_until(lambda: next((r for r in rig.readings if r["ts"] >= restart), None),
                           10, "a reading after the restart")
        assert isinstance(first, dict)
        shed = wait_until(lambda: [e for e in rig.of("load_shed", restart)
                                   if e["data"]["command_id"] == cid], 10,
                          "the command's loads shed again, under its own id")
        assert isinstance(shed, list)
        # within two cycles (poll.interval_s = 1 s) of the first fresh reading
        assert shed[0]["ts"] - first["ts"] <= 2.0, (shed[0]["ts"], first["ts"])
        assert "accepted" not in rig.statuses(cid)[1:], "no second acceptance"
        done = wait_until(lambda: rig.finals(cid), 40, "the command's final result")
        assert isinstance(done, list)
        assert [r["status"] for r in done] == ["completed"]
        assert done[0]["ts"] >= end_at - 0.5, "at its end, not at the restart"
        assert done[0]["data"]["cap_met"] is True
        wait_until(lambda: not rig.off_loads(), 15, "every load back")
        time.sleep(1.0)  # a final result twice would arrive now: none does
        assert len(rig.finals(cid)) == 1
    finally:
        _stop(agent)
        rig.close()


def test_sigkill_during_the_staggered_restore_leaves_no_load_off(tmp_path: Path, site: int,
                                                                 broker: Broker) -> None:
    rig = Watch(tmp_path, site, broker, poll={"interval_s": 1.5},
                control={"restore_step_kw": 5.0, "min_off_s": 0.0, "min_on_s": 0.0})
    agent = rig.run()
    try:
        p0 = rig.power_kw()
        cid, _answers = rig.command("cap", cap_kw=round(p0 - 70), duration_s=4)
        wait_until(lambda: len(rig.off_loads()) >= 3, 10, "loads shed")
        t_end = time.time()
        # the end: one load a cycle comes back (5 kW a cycle, at least one load)
        wait_until(lambda: rig.of("load_restored", t_end), 15, "the first restore")
        _kill(agent)
        assert rig.off_loads(), "killed with loads still off"
        agent = rig.run()
        wait_until(lambda: not rig.off_loads(), 20, "no load left off")
        done = wait_until(lambda: rig.finals(cid), 15, "the command's final result")
        assert isinstance(done, list) and [r["status"] for r in done] == ["completed"]
    finally:
        _stop(agent)
        rig.close()


@contextmanager
def _site_with_control(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The demo site with its control channel (for fault injection): (port, control port)."""
    cfg = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
    cfg["server"]["port"] = free_port()
    (tmp_path / "site.toml").write_text(tomli_w.dumps(cfg))
    ready = tmp_path / "sim.port"
    p = subprocess.Popen(lmt_argv("sim", str(tmp_path / "site.toml"), "--ready-file", str(ready),
                                  "--control-port", "0"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(ready.exists, 30, "the simulator")
        info = json.loads(ready_info_path(ready).read_text())
        yield int(info["port"]), int(info["control_port"])
    finally:
        p.terminate()
        p.wait(10)


def test_a_frozen_meter_stops_the_escalation(tmp_path: Path, broker: Broker) -> None:
    with _site_with_control(tmp_path) as (port, control):
        rig = Watch(tmp_path, port, broker)
        agent = rig.run()
        try:
            wait_until(lambda: len(rig.readings) > 5 or rig.pump(), 15, "a few readings")
            p0 = rig.power_kw()
            ok = request(control, {"device": "main-meter", "faults": {"frozen": True}})
            assert ok["ok"], ok
            cid, _answers = rig.command("cap", cap_kw=round(p0 - 15), duration_s=14)
            shed = wait_until(lambda: [e for e in rig.of("load_shed")
                                       if e["data"]["command_id"] == cid], 10, "a first shed")
            assert isinstance(shed, list)
            first = {e["data"]["load"] for e in shed}
            unresp = wait_until(lambda: rig.of("load_unresponsive"), 15, "load_unresponsive")
            assert isinstance(unresp, list)
            data = unresp[0]["data"]
            assert data["command_id"] == cid and set(data["loads"]) == first
            assert data["expected_kw"] < -10.0 and abs(data["measured_kw"]) < 1.0
            unmet = wait_until(lambda: rig.of("cap_unmet"), 10, "cap_unmet")
            assert isinstance(unmet, list) and unmet[0]["data"]["reason"] == "unresponsive"
            done = wait_until(lambda: rig.finals(cid), 30, "the command's final result")
            assert isinstance(done, list) and done[0]["status"] == "completed"
            final = done[0]["data"]
            assert final["cap_met"] is False and "cap not met" in done[0]["detail"]
            assert set(final["unresponsive"]) == first
            # nothing shed after the first decision: no blind escalation
            later = {e["data"]["load"] for e in rig.of("load_shed")
                     if e["data"]["command_id"] == cid}
            assert later == first, f"escalated blind: {sorted(later - first)}"
        finally:
            _stop(agent)
            rig.close()
