"""Demand-response events in the agent, end to end: signed ``dr_event`` commands over a real
broker, the simulated demo site over Modbus TCP, the scheduler's state in the real SQLite
buffer. Life cycle, cancel, the customer's opt-out (``lmt optout``), an end while the broker is
down, and a restart mid-event; the level and reduction signals against the baseline the agent
measures, a ramp, and a ``cap`` command at the same time as an event (the lower cap wins)."""

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
from lmt.control.dr import DrScheduler
from tests.agent.harness import AgentThread
from tests.agent.modes_helpers import buffered_readings, events_of, patch_config
from tests.agent.test_control_flow import TERMINAL, Rig
from tests.conftest import lmt_argv, wait_until


class DrRig(Rig):
    def dr_event(self, cap_kw: float, start_in_s: float, duration_s: float, **kw: Any
                 ) -> tuple[str, float, list[dict]]:
        return self.dr_signal("cap_kw", cap_kw, start_in_s, duration_s, **kw)

    def dr_signal(self, signal: str, value: float, start_in_s: float, duration_s: float,
                  **kw: Any) -> tuple[str, float, list[dict]]:
        """Send a ``dr_event`` starting ``start_in_s`` from now; (id, start, answers)."""
        start = time.time() + start_in_s
        body = dr_event_body(TERMINAL, start=start, duration_s=duration_s, signal=signal,
                             value=value, **kw)
        answers = send("127.0.0.1", self.broker.port, "lmt/v1", TERMINAL,
                       sign_command_file(self.key, body), timeout_s=20)
        assert answers[-1]["status"] == "accepted", answers
        return body["id"], body["start"], answers

    def record(self, cid: str, status: str) -> dict | None:
        self.pump()
        return next((r for r in self.results if r["command_id"] == cid and r["status"] == status),
                    None)

    def events_by(self, type_: str, **match: Any) -> list[dict]:
        """Whole events of ``type_`` whose data has every ``match`` item, in order."""
        self.pump()
        return events_of(self.events, type_, **match)

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
        saved = runner.agent.store.load("supervisor")
        assert saved["dr"]["events"][0]["state"] == "completed"
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
            assert _dr_state(runner, eid) == "completed"
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
        assert _dr_state(runner, eid) == "active"
        wait_until(lambda: rig.off_loads() and rig.power_kw() < cap, 15,
                   "the cap held again after the restart")
        assert rig.statuses(eid) == ["accepted", "received", "scheduled", "active"]
        done = wait_until(lambda: rig.record(eid, "completed"), 25, "completed")
        assert isinstance(done, dict) and done["data"]["at"] == pytest.approx(start + 14)
        wait_until(lambda: all(rig.coils()[:7]), 10, "the loads restored after the end")
    finally:
        runner.stop()
        rig.close()


# -- signals, ramp, and a cap command at the same time ------------------------------------------

BASELINE_WINDOW_S = 1.1  # dr.baseline_window_s: about 5 readings, between two cycles' times
MARGIN_KW = 2.0  # the demo agent's control.margin_kw


def _fast_rig(tmp_path: Path, site: int, broker: Broker) -> DrRig:
    """A cycle every 0.2 s, no minimum on/off times, and a short baseline window."""
    rig = DrRig(tmp_path, site, broker, poll={"interval_s": 0.2},
                control={"min_off_s": 0.0, "min_on_s": 0.0})
    patch_config(rig.cfg_path, dr={"baseline_window_s": BASELINE_WINDOW_S})
    return rig


def _metered_baseline(rig: DrRig, at: float) -> float:
    """The mean main-meter power (kW) of the agent's readings in the baseline window before
    ``at``, from its telemetry."""
    kws = [r["values"]["power_w"] / 1000.0 for r in buffered_readings(rig.cfg_path, "main-meter")
           if at - BASELINE_WINDOW_S <= r["ts"] < at and r["values"].get("power_w") is not None]
    assert kws, "no reading in the baseline window"
    return sum(kws) / len(kws)


@pytest.mark.parametrize(("signal", "value", "cap_of"), [
    ("level", 2, lambda b: b * (1 - 0.20)),  # the default fraction of level 2
    ("reduction_pct", 25, lambda b: b * (1 - 0.25)),
    ("reduction_kw", 40, lambda b: b - 40),
], ids=["level", "reduction_pct", "reduction_kw"])
def test_signal_caps_the_site_below_the_measured_baseline(
        tmp_path: Path, site: int, broker: Broker, signal: str, value: float,
        cap_of: Any) -> None:
    """A level or reduction signal: at activation the agent takes the baseline from its own
    main-meter readings of the window before, and the cap from the signal; the loads it sheds
    (under the event's id) cover the site's excess over that cap, and the site stays under it
    until the event completes."""
    rig = _fast_rig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        eid, start, _ = rig.dr_signal(signal, value, start_in_s=0.6, duration_s=2.5)
        active = wait_until(lambda: rig.record(eid, "active"), 10, "active")
        assert isinstance(active, dict)
        data = active["data"]
        baseline, cap = data["baseline_kw"], data["cap_kw"]
        assert data["at"] >= start
        assert cap == pytest.approx(cap_of(baseline))
        # the agent's baseline: the mean of its readings just before the activation
        wait_until(lambda: buffered_readings(rig.cfg_path, "main-meter")[-1]["ts"] > data["at"],
                   5, "the readings up to the activation in the buffer")
        assert baseline == pytest.approx(_metered_baseline(rig, data["at"]), abs=1.0)
        wait_until(lambda: rig.off_loads() and rig.power_kw() < cap, 5, "the site under the cap")
        # every open relay has its load_shed event under the event's id (events come over MQTT)
        wait_until(lambda: {e["data"]["load"] for e in rig.shed_by(eid)} == rig.off_loads(), 5,
                   "the event's load_shed events")
        shed = rig.shed_by(eid)
        # what was shed covers the excess the first decision saw over cap - margin
        need = shed[0]["data"]["site_kw"] - (cap - MARGIN_KW)
        assert sum(e["data"]["rated_kw"] for e in shed) >= need
        assert sum(e["data"]["rated_kw"] for e in shed) >= baseline - cap - 3.0
        for _ in range(5):
            assert rig.power_kw() < cap
        done = wait_until(lambda: rig.record(eid, "completed"), 10, "completed")
        assert isinstance(done, dict) and done["data"]["at"] == pytest.approx(start + 2.5)
        wait_until(lambda: all(rig.coils()[:7]), 5, "the loads restored after the end")
    finally:
        runner.stop()
        rig.close()


def test_ramp_steps_the_limit_in(tmp_path: Path, site: int, broker: Broker) -> None:
    """A 60 kW reduction ramped in over 2 s: the cap moves linearly from the baseline to the
    full signal, so loads are shed in steps as it falls, each only when the site is over the
    cap of that moment, and the full cap is met once the ramp is over."""
    ramp_s, duration_s = 2.0, 2.8
    rig = _fast_rig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        eid, start, _ = rig.dr_signal("reduction_kw", 60, start_in_s=0.6,
                                      duration_s=duration_s, ramp_s=ramp_s)
        active = wait_until(lambda: rig.record(eid, "active"), 10, "active")
        assert isinstance(active, dict)
        baseline, full = active["data"]["baseline_kw"], active["data"]["cap_kw"]
        assert full == pytest.approx(baseline - 60)
        wait_until(lambda: rig.power_kw() < full, 10, "the site under the full cap")
        assert time.time() < start + duration_s, "the full cap was met during the event"
        wait_until(lambda: rig.record(eid, "completed"), 10, "completed")
        wait_until(lambda: rig.events_by("load_restored", command_id=eid), 5, "the restores")
        shed = rig.shed_by(eid)  # published before the restores (one stream, in order)
        assert shed
        # nothing comes back while the cap still falls (it would only be shed again)
        early = [e for e in rig.events_by("load_restored", command_id=eid)
                 if e["ts"] < start + ramp_s]
        assert not early, early

        def cap_at(t: float) -> float:
            return baseline + (full - baseline) * min(1.0, max(0.0, (t - start) / ramp_s))

        for e in shed:
            # never ahead of the ramp: the site was over the cap of that moment (the cap only
            # falls, and the event is stamped after the decision)
            assert start <= e["ts"] <= start + ramp_s + 0.5
            assert e["data"]["site_kw"] > cap_at(e["ts"]) - MARGIN_KW, (e, cap_at(e["ts"]))
        steps: list[list[dict]] = []  # the sheds of one cycle together
        for e in shed:
            if steps and e["ts"] - steps[-1][0]["ts"] < 0.1:
                steps[-1].append(e)
            else:
                steps.append([e])
        assert len(steps) >= 2, f"all at once: {[e['data']['load'] for e in shed]}"
        assert sum(e["data"]["rated_kw"] for e in steps[0]) < 60.0
        assert steps[-1][0]["ts"] - steps[0][0]["ts"] >= 0.25 * ramp_s
        wait_until(lambda: all(rig.coils()[:7]), 5, "the loads restored after the end")
    finally:
        runner.stop()
        rig.close()


def test_lower_dr_cap_wins_over_a_cap_command_which_holds_after_the_event(
        tmp_path: Path, site: int, broker: Broker) -> None:
    """A cap command, then a DR event with a lower cap: the event's cap applies (its sheds
    carry the event id); when the event completes the command's cap still holds: loads come
    back only while the site stays under it, under the command's id."""
    rig = _fast_rig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        p0 = rig.power_kw()
        high, low = float(round(p0 - 25)), float(round(p0 - 70))
        cid, answers = rig.command("cap", cap_kw=high, duration_s=600)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: rig.record(cid, "executed") and rig.power_kw() < high, 5,
                   "the command's cap met")
        eid, _start_t, _ = rig.dr_signal("cap_kw", low, start_in_s=0.3, duration_s=2.0)
        wait_until(lambda: rig.record(eid, "active") and rig.power_kw() < low, 5,
                   "the event's lower cap met")
        wait_until(lambda: rig.shed_by(eid), 5, "sheds under the event's id")
        active = rig.record(eid, "active")
        assert active is not None and rig.shed_by(cid)
        assert all(e["ts"] < active["ts"] for e in rig.shed_by(cid)), "the command's: before"
        wait_until(lambda: rig.record(eid, "completed"), 5, "the event completed")
        # the command's cap still holds: some loads back, not all, the site under it
        wait_until(lambda: rig.events_by("load_restored", command_id=cid), 5,
                   "loads back under the command's cap")
        for _ in range(10):
            assert rig.power_kw() < high
        assert rig.off_loads(), "the command still holds loads off"
        assert rig.statuses(cid) == ["accepted", "executed"]
        kid, _ = rig.command("cancel", target=cid)
        wait_until(lambda: "completed" in rig.statuses(kid), 5, "the cancel done")
        wait_until(lambda: all(rig.coils()[:7]), 5, "every load back")
    finally:
        runner.stop()
        rig.close()


def test_recovery_paces_the_restores_under_a_cap_command_too(
        tmp_path: Path, site: int, broker: Broker) -> None:
    """A harmless cap command (above the site) runs while a DR event ends with a recovery
    period: the loads still come back under the event's rising ceiling, not at once."""
    rig = _fast_rig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        p0 = rig.power_kw()
        cid, answers = rig.command("cap", cap_kw=float(round(p0 + 80)), duration_s=600)
        assert answers[-1]["status"] == "accepted"
        recovery_s = 3.0
        eid, _start_t, _ = rig.dr_signal("cap_kw", float(round(p0 - 70)), start_in_s=0.3,
                                      duration_s=1.5, recovery_s=recovery_s)
        done = wait_until(lambda: rig.record(eid, "completed"), 10, "the event completed")
        assert isinstance(done, dict)
        end = done["data"]["at"]
        active = rig.record(eid, "active")
        assert active is not None
        baseline, end_cap = active["data"]["baseline_kw"], float(round(p0 - 70))
        wait_until(lambda: all(rig.coils()[:7]), 10, "every load back")

        def restored() -> list[dict]:
            return [e for e in rig.events_by("load_restored") if e["ts"] >= end]
        wait_until(lambda: len(restored()) == len(rig.shed_by(eid)) + len(rig.shed_by(cid)),
                   5, "every restore reported")
        back = restored()
        assert len(back) >= 2, back

        def ceiling(t: float) -> float:
            return end_cap + (baseline - end_cap) * min(1.0, (t - end) / recovery_s)

        # during the recovery: site at the decision + the load under the ceiling of that moment
        # (after it, only the command's cap holds)
        for e in back:
            if e["ts"] < end + recovery_s:
                assert e["data"]["site_kw"] + e["data"]["rated_kw"] <= ceiling(e["ts"]) + 0.5, e
        assert back[-1]["ts"] - back[0]["ts"] >= 0.3 * recovery_s, "paced, not at once"
        assert rig.statuses(cid)[:2] == ["accepted", "executed"]
    finally:
        runner.stop()
        rig.close()

def test_lower_cap_command_wins_over_an_event_which_holds_after_it(
        tmp_path: Path, site: int, broker: Broker) -> None:
    """A DR event, then a cap command with a lower cap: the command's cap applies (its sheds
    carry its id); when it ends it is reported completed at once, and the event's cap still
    holds the site: loads come back only while it stays under, under the event's id."""
    rig = _fast_rig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        p0 = rig.power_kw()
        high, low = float(round(p0 - 25)), float(round(p0 - 70))
        eid, _start_t, _ = rig.dr_signal("cap_kw", high, start_in_s=0.3, duration_s=600)
        wait_until(lambda: rig.record(eid, "active") and rig.power_kw() < high, 5,
                   "the event's cap met")
        cid, answers = rig.command("cap", cap_kw=low, duration_s=2.0)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: rig.record(cid, "executed") and rig.power_kw() < low, 5,
                   "the command's lower cap met")
        wait_until(lambda: rig.shed_by(cid), 5, "sheds under the command's id")
        done = wait_until(lambda: rig.record(cid, "completed"), 5, "the command ended")
        assert isinstance(done, dict) and eid in done["detail"]
        wait_until(lambda: rig.events_by("load_restored", command_id=eid), 5,
                   "loads back under the event's cap")
        for _ in range(10):
            assert rig.power_kw() < high
        assert rig.off_loads(), "the event still holds loads off"
        assert rig.statuses(eid)[-1] == "active"
        _kid, _ = rig.command("cancel", target=eid)
        wait_until(lambda: rig.record(eid, "cancelled"), 5, "the event cancelled")
        wait_until(lambda: all(rig.coils()[:7]), 5, "every load back")
    finally:
        runner.stop()
        rig.close()


def _dr_state(runner: AgentThread, event_id: str) -> str | None:
    """The event's state in the agent's supervisor state."""
    dr = runner.agent.state.dr
    return None if dr is None else DrScheduler.from_dict(dr).state_of(event_id)
