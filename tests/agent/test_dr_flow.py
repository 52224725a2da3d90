"""Demand-response events in the agent, end to end: signed ``dr_event`` commands over a real
broker, the simulated demo site over Modbus TCP, the scheduler's state in the real SQLite
buffer. Life cycle, cancel, the customer's opt-out (``lmt optout``), an end while the broker is
down, and a restart mid-event."""

from __future__ import annotations

import json
import queue
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.platform import dr_event_body, send, sign_command_file
from lmt.config import load_agent_config
from tests.agent.harness import AgentThread
from tests.agent.test_control_flow import TERMINAL, Rig
from tests.conftest import lmt_argv, wait_until


class DrRig(Rig):
    def dr_event(self, cap_kw: float, start_in_s: float, duration_s: float, **kw: Any
                 ) -> tuple[str, float, list[dict]]:
        start = time.time() + start_in_s
        body = dr_event_body(TERMINAL, start=start, duration_s=duration_s, signal="cap_kw",
                             value=cap_kw, **kw)
        answers = send("127.0.0.1", self.broker.port, "lmt/v1", TERMINAL,
                       sign_command_file(self.key, body), timeout_s=20)
        return body["id"], body["start"], answers

    def record(self, cid: str, status: str) -> dict | None:
        self.pump()
        return next((r for r in self.results if r["command_id"] == cid and r["status"] == status),
                    None)

    def shed_by(self, cid: str) -> list[dict]:
        self.pump()
        return [e for e in self.events if e["type"] == "load_shed"
                and e["data"]["command_id"] == cid]


def _start(rig: Rig) -> AgentThread:
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
    return runner


def test_event_schedules_activates_sheds_and_completes_on_time(tmp_path: Path, site: int,
                                                                broker: Broker) -> None:
    rig = DrRig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        p0 = rig.power_kw()
        cap = round(p0 - 50)
        eid, start, answers = rig.dr_event(cap, start_in_s=3, duration_s=8)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: rig.record(eid, "scheduled"), 10, "received, scheduled")
        assert rig.statuses(eid)[:3] == ["accepted", "received", "scheduled"]
        assert rig.record(eid, "scheduled")["data"]["start"] == pytest.approx(start)
        assert all(rig.coils()[:7]), "nothing is shed before the start"
        active = wait_until(lambda: rig.record(eid, "active"), 10, "active")
        assert isinstance(active, dict)
        assert active["data"]["at"] >= start and active["data"]["cap_kw"] == cap
        wait_until(lambda: rig.power_kw() < cap, 10, "the site under the DR cap")
        shed = wait_until(lambda: rig.shed_by(eid), 10, "load_shed events under the event id")
        assert isinstance(shed, list) and all(e["data"]["site_kw"] > 0 for e in shed)
        done = wait_until(lambda: rig.record(eid, "completed"), 15, "completed")
        assert isinstance(done, dict)
        assert done["data"]["at"] == pytest.approx(start + 8)
        wait_until(lambda: all(rig.coils()[:7]), 10, "the loads restored after the end")
        assert rig.statuses(eid) == ["accepted", "received", "scheduled", "active", "completed"]
        # the scheduler's state is in the buffer
        assert runner.agent.buffer.load_dr_state()["events"][0]["state"] == "completed"
    finally:
        runner.stop()
        rig.close()


def test_cancel_and_opt_out_during_events(tmp_path: Path, site: int, broker: Broker) -> None:
    rig = DrRig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        p0 = rig.power_kw()
        a, _, _ = rig.dr_event(round(p0 - 50), start_in_s=0.5, duration_s=600)
        wait_until(lambda: rig.record(a, "active") and rig.off_loads(), 15, "A active, shed")
        kid, answers = rig.command("cancel", target=a)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: rig.record(a, "cancelled"), 10, "A cancelled")
        assert "completed" in rig.statuses(kid)
        wait_until(lambda: all(rig.coils()[:7]), 10, "A's loads restored")
        _k2, answers = rig.command("cancel", target=a)  # already final
        assert answers[-1]["reason"] == "unknown_target"

        b, _, _ = rig.dr_event(round(p0 - 50), start_in_s=0.5, duration_s=600)
        wait_until(lambda: rig.record(b, "active") and rig.off_loads(), 15, "B active, shed")
        out = subprocess.run(lmt_argv("optout", "--config", str(rig.cfg_path), b,
                                      "--reason", "customer pressed override"),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert b in out.stdout
        rec = wait_until(lambda: rig.record(b, "opted_out"), 10, "B opted out")
        assert isinstance(rec, dict) and "customer pressed override" in rec["detail"]
        wait_until(lambda: all(rig.coils()[:7]), 5, "B's loads restored at once")
        assert "completed" not in rig.statuses(b)
        # no buffer file: a clear error
        bad = rig.cfg_path.read_text().replace("buffer.sqlite", "missing/none.sqlite")
        (tmp_path / "bad.toml").write_text(bad)
        out = subprocess.run(lmt_argv("optout", "--config", str(tmp_path / "bad.toml"), b),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "no buffer file" in out.stderr
    finally:
        runner.stop()
        rig.close()


def test_event_ends_on_time_while_the_broker_is_down(tmp_path: Path, site: int) -> None:
    with Broker(persistence=True) as own:
        rig = DrRig(tmp_path, site, own, mqtt={"reconnect_max_s": 1.0})
        # a persistent session, so the results queued while the broker restarts reach us
        got: queue.Queue[dict] = queue.Queue()
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dr-{uuid.uuid4().hex[:8]}",
                          protocol=mqtt.MQTTv311, clean_session=False)
        sub.reconnect_delay_set(0.1, 0.5)
        sub.on_connect = lambda c, *a: c.subscribe(f"lmt/v1/{TERMINAL}/result", qos=1)
        sub.on_message = lambda c, u, m: [got.put(r) for r in json.loads(m.payload)["records"]]
        sub.connect("127.0.0.1", own.port)
        sub.loop_start()
        runner = _start(rig)
        try:
            p0 = rig.power_kw()
            eid, start, _ = rig.dr_event(round(p0 - 50), start_in_s=0.5, duration_s=6)
            wait_until(lambda: rig.record(eid, "active") and rig.off_loads(), 15, "active, shed")
            rig.sub.close()
            own.stop()
            wait_until(lambda: time.time() > start + 6 and all(rig.coils()[:7]), 15,
                       "the loads restored at the end, broker down")
            assert runner.agent.dr.state_of(eid) == "completed"
            own.start()
            seen: list[dict] = []

            def completed() -> dict | None:
                while not got.empty():
                    seen.append(got.get())
                return next((r for r in seen if r["command_id"] == eid
                             and r["status"] == "completed"), None)

            done = wait_until(completed, 20, "the completed record after the broker restart")
            assert isinstance(done, dict) and done["data"]["at"] == pytest.approx(start + 6)
        finally:
            runner.stop()
            sub.loop_stop()
            sub.disconnect()
            rig.modbus.close()


def test_restart_mid_event_keeps_it_active(tmp_path: Path, site: int, broker: Broker) -> None:
    rig = DrRig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        p0 = rig.power_kw()
        cap = round(p0 - 50)
        eid, start, _ = rig.dr_event(cap, start_in_s=0.5, duration_s=14)
        wait_until(lambda: rig.record(eid, "active") and rig.off_loads(), 15, "active, shed")
        runner.stop()
        runner = _start(rig)
        assert runner.agent.dr.state_of(eid) == "active"
        wait_until(lambda: rig.off_loads() and rig.power_kw() < cap, 15,
                   "the cap held again after the restart")
        assert rig.statuses(eid) == ["accepted", "received", "scheduled", "active"]
        done = wait_until(lambda: rig.record(eid, "completed"), 25, "completed")
        assert isinstance(done, dict) and done["data"]["at"] == pytest.approx(start + 14)
        wait_until(lambda: all(rig.coils()[:7]), 10, "the loads restored after the end")
    finally:
        runner.stop()
        rig.close()
