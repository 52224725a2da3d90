"""Terminal control modes in the agent, end to end: signed ``remote``, ``guarantee`` and
``modes`` commands over a real broker, the simulated demo site over Modbus TCP (rounds 1-6 are
relay_1..relay_6), mode parameters and state in the real SQLite buffer, and a restart.

The power and energy modes run on minutes, months and control times: those tests give the
agent a wall clock of their own (:class:`~tests.agent.modes_helpers.FastClock`), faster than
real time and able to jump, and stamp their signed commands with it. The energy modes read the
meter's real import register; the monthly test drives it by moving the simulated site's clock.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import lmt.agent.derive as derive
from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.platform import command_body, send, sign_command_file
from lmt.config import load_agent_config, load_site
from tests.agent.harness import AgentThread
from tests.agent.modes_helpers import FastClock, buffered_readings, events_of, local_epoch
from tests.agent.test_control_flow import TERMINAL, Rig
from tests.conftest import EXAMPLES, SiteThread, wait_until

RATE = 120.0  # the fast clock: a minute of mode control in 0.5 s
# a cycle every 0.1 s (about 5 readings in each fast minute); a round's loads switch back as
# soon as it is released (no minimum on/off time); the energy register read every cycle
FAST_POLL = {"interval_s": 0.1, "slow_interval_s": 0.1}
NO_MIN_TIMES = {"min_off_s": 0.0, "min_on_s": 0.0}
# Intervals between two records are checked on their timestamps (the agent's clock), which are
# taken a moment after the cycle's time the decision used: allow 3 % of the interval for it.
SLACK = 0.97


class ModesRig(Rig):
    """The control-flow rig with the agent's wall clock: commands are stamped with it."""

    def __init__(self, tmp: Path, site_port: int, broker: Broker,
                 clock: Callable[[], float] = time.time, **overrides: Any) -> None:
        super().__init__(tmp, site_port, broker, **overrides)
        self.clock = clock

    def command(self, kind: str, **params: Any) -> tuple[str, list[dict]]:
        # valid from the agent's now; an hour of its time, so a fast clock does not expire it
        body = command_body(kind, TERMINAL, issued_at=self.clock(), expires_in_s=3600.0,
                            **params)
        answers = send("127.0.0.1", self.broker.port, "lmt/v1", TERMINAL,
                       sign_command_file(self.key, body), timeout_s=20)
        return body["id"], answers

    def start(self) -> AgentThread:
        runner = AgentThread(Agent(load_agent_config(self.cfg_path), clock=self.clock)).start()
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        return runner

    def mode_events(self, kind: str, rnd: int | None = None) -> list[dict]:
        self.pump()
        return [e["data"] for e in self.events if e["type"] == f"mode_{kind}"
                and (rnd is None or e["data"]["round"] == rnd)]

    def mode_records(self, kind: str, **match: Any) -> list[dict]:
        """Whole ``mode_<kind>`` events (ts, seq, data), in order."""
        return self.events_by(f"mode_{kind}", **match)

    def events_by(self, type_: str, **match: Any) -> list[dict]:
        """Whole events of ``type_`` whose data has every ``match`` item, in order."""
        self.pump()
        return events_of(self.events, type_, **match)

    def answer(self, kind: str, **params: object) -> tuple[str, dict]:
        cid, answers = self.command(kind, **params)
        return cid, answers[-1]

    def accepted(self, kind: str, **params: object) -> None:
        _cid, ans = self.answer(kind, **params)
        assert ans["status"] == "accepted", ans

    def mean_power(self, n: int = 5) -> float:
        return sum(self.power_kw() for _ in range(n)) / n


def _start(rig: ModesRig) -> AgentThread:
    return rig.start()


def _outputs(runner: AgentThread) -> Any:
    """The agent's last mode outputs (the supervisor's report of ``modes.CycleOutputs``)."""
    out = runner.agent.state.report.get("modes")
    assert out is not None
    return SimpleNamespace(**{**out, "energy_alarms": tuple(out["energy_alarms"])})


def test_remote_guarantee_restart_and_invalid(tmp_path: Path, site: int, broker: Broker,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(derive, "RECORD_AFTER_S", 2.0)  # the 2-minute record, sooner
    rig = ModesRig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        assert all(rig.coils()[:7])
        # remote trip of round 1 (chiller-1, relay_1) at once
        _cid, ans = rig.answer("remote", round=1, action="trip")
        assert ans["status"] == "accepted", ans
        wait_until(lambda: not rig.coils()[0], 10, "round 1 tripped")
        trip = wait_until(lambda: rig.mode_events("trip", 1), 10, "a mode_trip event")
        assert isinstance(trip, list) and trip[0]["mode"] == "remote" and trip[0]["power_kw"] > 0
        rec = wait_until(lambda: [r for r in rig.mode_events("record", 1) if r["kind"] == "trip"],
                         15, "the trip's record with the power after")
        assert isinstance(rec, list) and rec[0]["power_kw_after_2min"] > 0
        assert rec[0]["power_kw"] == trip[0]["power_kw"]
        assert all(rig.coils()[1:7]), "only round 1 is tripped"
        # allow close: back on
        _cid, ans = rig.answer("remote", round=1, action="close")
        assert ans["status"] == "accepted"
        wait_until(lambda: rig.coils()[0], 10, "round 1 closed again")
        restore = wait_until(lambda: rig.mode_events("restore", 1), 10, "a mode_restore event")
        assert isinstance(restore, list) and restore[0]["reason"] == "remote allow close"

        # a guarantee closes a tripped round
        rig.answer("remote", round=2, action="trip")
        wait_until(lambda: not rig.coils()[1], 10, "round 2 tripped")
        _cid, ans = rig.answer("guarantee", on=True)
        assert ans["status"] == "accepted"
        wait_until(lambda: rig.coils()[1], 10, "round 2 closed by the guarantee")
        wait_until(lambda: rig.mode_events("guarantee_on"), 10, "guarantee on")
        assert rig.mode_events("restore", 2)[0]["mode"] == "guarantee"
        rig.answer("guarantee", on=False)
        wait_until(lambda: rig.mode_events("guarantee_off"), 10, "guarantee off")
        assert rig.coils()[1], "the old trip is not repeated after the guarantee"

        # a trip that survives a restart, not repeated
        rig.answer("remote", round=3, action="trip")
        wait_until(lambda: not rig.coils()[2], 10, "round 3 tripped")
        wait_until(lambda: len(rig.mode_events("trip", 3)) == 1, 10, "its trip event")
        runner.stop()
        assert not rig.coils()[2], "a tripped round stays open while the agent is down"
        runner = _start(rig)
        wait_until(lambda: runner.agent.mode_state is not None
                   and 3 in runner.agent.mode_state.tripped and runner.agent.state.mode_held, 10,
                   "the persisted state in force")
        assert runner.agent.mode_params.remote[-1].round == 3
        assert not rig.coils()[2] and all(rig.coils()[:2])
        n_ignored = len(rig.mode_events("ignored", 1))
        rig.answer("remote", round=1, action="close")  # not tripped: an "ignored" record after
        wait_until(lambda: len(rig.mode_events("ignored", 1)) > n_ignored, 10, "the ignored close")
        assert len(rig.mode_events("trip", 3)) == 1, "the trip is not repeated"
        assert not rig.coils()[2]

        # an invalid parameter: refused with the reason, nothing switched, nothing stored
        before = rig.coils()
        _cid, ans = rig.answer("modes", params={"power": {"slide_min": 99}})
        assert ans["status"] == "rejected" and ans["reason"] == "invalid"
        assert "PowerParams.slide_min" in ans["detail"]
        _cid, ans = rig.answer("modes", params={"no_such": 1})
        assert ans["reason"] == "invalid" and "no_such" in ans["detail"]
        _cid, ans = rig.answer("remote", round=8, action="trip")
        assert ans["reason"] == "invalid" and "round 8" in ans["detail"]
        assert runner.agent.mode_params.power.slide_min == 1
        assert rig.coils() == before
        # a valid partial update is stored and keeps the rest
        _cid, ans = rig.answer("modes", params={"floor_kw": 5, "power": {"slide_min": 2}})
        assert ans["status"] == "accepted"
        p = runner.agent.store.load("supervisor")["mode_params"]
        assert p["floor_kw"] == 5 and p["power"]["slide_min"] == 2 and p["remote"]
        rig.answer("remote", round=3, action="close")
        wait_until(lambda: rig.coils()[2], 10, "round 3 closed")
    finally:
        runner.stop()
        rig.close()


def test_critical_load_cannot_have_a_round(tmp_path: Path) -> None:
    from lmt.config.agent import Load

    with pytest.raises(ValueError, match="critical"):
        Load(name="server-room", device="relays", point="relay_7", rated_kw=6, critical=True,
             round=1)


def test_platform_sign_mode_commands(tmp_path: Path) -> None:
    import json
    import subprocess

    from lmt.agent.security import generate_keypair
    from tests.conftest import lmt_argv

    key, _pub = generate_keypair(tmp_path / "keys")
    cases = [
        (["modes", "--params", '{"floor_kw": 5}'], {"type": "modes", "params": {"floor_kw": 5}}),
        (["remote", "trip", "--round", "2", "--alarm-delay", "1", "--limit", "4"],
         {"type": "remote", "round": 2, "action": "trip", "alarm_delay_min": 1, "limit_half_hours": 4}),
        (["guarantee", "on", "--half-hours", "4"],
         {"type": "guarantee", "on": True, "duration_half_hours": 4}),
    ]
    for args, want in cases:
        out = subprocess.run(lmt_argv("platform", "sign", "--terminal", "t1", "--key", str(key), *args),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        body = json.loads(json.loads(out.stdout)["body"])
        assert want.items() <= body.items()
        assert "auto_after_h" not in body


# -- power control ------------------------------------------------------------------------------

def _power_trips(rig: ModesRig, n: int, setpoint: float, mode: str) -> list[dict]:
    """Wait for ``n`` trips of the power control; check each followed an alarm on its round
    a minute (alarm_min 1) before, with the power over the setpoint, rounds lowest first."""
    wait_until(lambda: len(rig.mode_records("trip", mode=mode)) >= n, 20, f"{n} rounds tripped")
    alarms = rig.mode_records("alarm", mode=mode)
    trips = rig.mode_records("trip", mode=mode)
    assert [t["data"]["round"] for t in trips] == list(range(1, n + 1))
    assert [a["data"]["round"] for a in alarms[:n]] == list(range(1, n + 1))
    for alarm, trip in zip(alarms, trips, strict=False):
        # alarm, then the trip once its minute of alarm time is over (clock seconds)
        assert alarm["seq"] < trip["seq"]
        assert trip["ts"] - alarm["ts"] >= SLACK * 60.0, (alarm, trip)
        assert "trip in 1 min" in alarm["data"]["reason"]
        for rec in (alarm, trip):
            assert rec["data"]["power_kw"] > setpoint, rec
        assert f"> setpoint {setpoint:.1f} kW" in trip["data"]["reason"]
    # round by round: the next alarm only after the previous trip (and a new measurement)
    for trip, nxt in zip(trips, alarms[1:], strict=False):
        assert nxt["seq"] > trip["seq"] and nxt["ts"] - trip["ts"] >= SLACK * 60.0
    return trips


def _restores(rig: ModesRig, rounds: list[int], interval_s: float) -> list[dict]:
    """Wait for ``rounds`` to be restored in this order, one per restore interval."""
    wait_until(lambda: len(rig.mode_records("restore")) >= len(rounds), 20,
               f"rounds {rounds} restored")
    restores = rig.mode_records("restore")
    assert [r["data"]["round"] for r in restores] == rounds
    for a, b in itertools.pairwise(restores):
        assert b["ts"] - a["ts"] >= SLACK * interval_s, (a, b)
    wait_until(lambda: all(rig.coils()[:7]), 10, "every relay closed again")
    return restores


def test_period_power_control_trips_round_by_round_and_restores_when_raised(
        tmp_path: Path, site: int, broker: Broker) -> None:
    """Period power control from a signed ``modes`` command: with the setpoint of the current
    local period 45 kW under the site's power, round 1 is alarmed, tripped a minute later, the
    power measured again, round 2 alarmed and tripped; then the site is under the setpoint and
    round 3 is left alone. Raising the setpoint brings the rounds back, highest first, one per
    restore interval, while the power plus the round fits under it."""
    clock = FastClock(local_epoch(2025, 6, 10, 10, 0), rate=RATE)  # a Tuesday, 10:00 local
    rig = ModesRig(tmp_path, site, broker, clock=clock, poll=FAST_POLL, control=NO_MIN_TIMES)
    runner = rig.start()
    try:
        p0 = rig.mean_power()
        sp = float(round(p0 - 45))  # one 30 kW round is not enough, two are
        rig.accepted("modes", params={
            "power": {"rounds": [1, 2, 3], "slide_min": 1, "alarm_min": [1, 1, 1]},
            "restore_interval_s": 60.0,
            "period": {"enabled": True, "periods": [[0, 600], [600, 1440]],
                       "schemes": [[None, sp]], "scheme": 1, "periods_on": [1, 2]}})
        trips = _power_trips(rig, 2, sp, "period")
        assert "(period 2, scheme 1)" in trips[0]["data"]["reason"]
        wait_until(lambda: rig.off_loads() == {"chiller-1", "chiller-2"}, 5, "rounds 1, 2 open")
        shed = wait_until(lambda: rig.events_by("load_shed", command_id="modes")[1:], 5,
                          "the loads' load_shed events")
        assert isinstance(shed, list)
        assert [e["data"]["load"] for e in rig.events_by("load_shed")] == ["chiller-1",
                                                                           "chiller-2"]
        # measured again after the second trip: under the setpoint, so round 3 stays closed
        agent = runner.agent
        wait_until(lambda: 2 in agent.mode_state.tripped
                   and (m := _outputs(runner).measured_kw) is not None and m < sp, 10,
                   "the power measured under the setpoint after the second trip")
        out = _outputs(runner)
        assert out.power_mode == "period" and out.setpoint_kw == pytest.approx(sp)
        assert agent.mode_state.power.alarm_round is None
        assert not rig.mode_records("trip", round=3) and rig.coils()[2]
        # the decision record two minutes later has the power after the trip
        rec = wait_until(lambda: [r for r in rig.mode_events("record", 1) if r["kind"] == "trip"],
                         10, "the record of round 1's trip")
        assert isinstance(rec, list)
        assert rec[0]["power_kw_after_2min"] < rec[0]["power_kw"] - 20

        # the setpoint raised above the site: power fell, the rounds come back staggered
        rig.accepted("modes", params={"period": {"schemes": [[None, float(round(p0 + 40))]]}})
        restores = _restores(rig, [2, 1], 60.0)
        assert all(r["data"]["mode"] == "period" and r["data"]["reason"].startswith("power fell")
                   for r in restores)
        wait_until(lambda: rig.events_by("load_restored")[1:], 5, "the load_restored events")
        assert [e["data"]["load"] for e in rig.events_by("load_restored")] == ["chiller-2",
                                                                               "chiller-1"]
        assert len(rig.mode_records("trip")) == 2, "nothing tripped again"
    finally:
        runner.stop()
        rig.close()


def test_float_down_freezes_a_baseline_trips_and_ends_with_its_control_time(
        tmp_path: Path, site: int, broker: Broker) -> None:
    """Current-power float-down: the baseline is the 1-minute mean of the window before the
    switch-on (window_min 1, no freeze delay), the setpoint that baseline × (100 - 20) %; the
    control alarms and trips rounds 1 and 2 one by one and stops there. When its control time
    (one half-hour) is over, the rounds it tripped come back through the staggered restore."""
    clock = FastClock(local_epoch(2025, 6, 10, 15, 0), rate=RATE)
    rig = ModesRig(tmp_path, site, broker, clock=clock, poll=FAST_POLL, control=NO_MIN_TIMES)
    runner = rig.start()
    agent = runner.agent
    try:
        # a whole minute of history before the switch-on
        wait_until(lambda: agent.mode_state is not None and agent.mode_state.minute_means, 10,
                   "a 1-minute mean before the switch-on")
        p0 = rig.mean_power()
        issued = clock()
        rig.accepted("modes", params={
            "power": {"rounds": [1, 2, 3], "slide_min": 1},
            "restore_interval_s": 60.0,
            "float_down": {"enabled": True, "issued_s": issued, "window_min": 1, "k_pct": -20.0,
                           "freeze_delay_min": 0, "control_half_hours": 1,
                           "alarm_min": [1, 1, 1]}})
        # the setpoint is known once the baseline is (the state is set just before the outputs)
        wait_until(lambda: (agent.state.report.get("modes") or {}).get("setpoint_kw") is not None,
                   10, "the baseline and the setpoint")
        state = agent.mode_state
        frozen = math.floor(issued / 60.0) - 1  # the minute before the switch-on
        means = dict(state.minute_means)
        assert state.power.mode == "float_down"
        assert state.power.baseline_kw == pytest.approx(means[frozen])
        assert state.power.baseline_kw == pytest.approx(p0, abs=4.0)
        sp = _outputs(runner).setpoint_kw
        assert sp == pytest.approx(state.power.baseline_kw * 0.8)
        trips = _power_trips(rig, 2, sp, "float_down")
        assert all("float_down control:" in t["data"]["reason"] for t in trips)
        wait_until(lambda: rig.off_loads() == {"chiller-1", "chiller-2"}, 5, "rounds 1, 2 open")
        wait_until(lambda: 2 in agent.mode_state.tripped
                   and (m := _outputs(runner).measured_kw) is not None and m < sp, 10,
                   "the power measured under the setpoint after the second trip")
        assert _outputs(runner).setpoint_kw == pytest.approx(sp)
        assert agent.mode_state.power.baseline_kw == state.power.baseline_kw, "frozen"
        assert not rig.mode_records("trip", round=3) and rig.coils()[2]

        # the half-hour of control is over: released, back highest round first
        clock.jump(issued + 1800.0 - clock())
        restores = _restores(rig, [2, 1], 60.0)
        for r in restores:
            assert r["data"]["mode"] == "float_down"
            assert r["data"]["reason"] == "float_down control ended; staggered restore"
        assert _outputs(runner).power_mode is None
        assert len(rig.mode_records("trip")) == 2
    finally:
        runner.stop()
        rig.close()


# -- energy control -----------------------------------------------------------------------------

def test_monthly_energy_control_counts_the_meter_and_a_new_month_releases(
        tmp_path: Path, broker: Broker) -> None:
    """Monthly energy control on the meter's import register. The agent counts the month from
    the first reading it sees (nothing seeds it); the simulated site's clock is moved on a
    quarter of an hour to drive its meter (about 46 kWh). A limit above that import but with
    its alarm share below raises the alarm and trips nothing; the limit lowered below this
    month's import so far trips round 1 at once and round 2 one energy interval later. The
    first cycle of the next month (the agent's clock jumps to it) withdraws the alarm, counts
    again from the register then, and releases the rounds to the staggered restore."""
    site_clock = FastClock(time.time())  # jumps integrate the site's power into its register
    clock = FastClock(local_epoch(2025, 1, 31, 23, 0))  # real time, an hour before February
    with SiteThread(load_site(EXAMPLES / "demo-site.toml"), clock=site_clock) as st:
        rig = ModesRig(tmp_path, st.port, broker, clock=clock, poll=FAST_POLL,
                       control=NO_MIN_TIMES)
        runner = rig.start()
        agent = runner.agent
        try:
            wait_until(lambda: agent.mode_state is not None and agent.mode_state.month_start_kwh
                       is not None, 10, "the month's first register reading")
            state = agent.mode_state
            assert state.month == "2025-01"
            # counted from the first reading the agent took: that reading's register value
            first = wait_until(lambda: _first_energy(rig), 10, "the first reading")
            assert state.month_start_kwh == first
            assert 0.0 <= _outputs(runner).month_used_kwh < 1.0

            # a quarter of an hour of the site's import at once
            site_clock.jump(900.0)
            wait_until(lambda: (used := _outputs(runner).month_used_kwh) is not None
                       and used >= 40.0, 10, "the import counted")
            assert _outputs(runner).month_used_kwh < 50.0
            assert agent.mode_state.month_start_kwh == first
            # a limit of 50 kWh, alarm at 80 %: the alarm at once, no trip
            rig.accepted("modes", params={
                "monthly": {"enabled": True, "limit_kwh": 50.0, "alarm_pct": 80.0},
                "energy": {"rounds": [1, 2], "interval_s": 1.0}, "restore_interval_s": 1.0})
            wait_until(lambda: agent.mode_state.monthly.alarm, 5, "the monthly alarm on")
            assert agent.mode_state.tripped == {}, "under the limit: nothing tripped"
            alarm = wait_until(lambda: rig.mode_records("alarm", mode="monthly"), 5,
                               "the alarm's record")
            assert isinstance(alarm, list) and alarm[0]["data"]["round"] is None
            assert "kWh used this month of 50 kWh" in alarm[0]["data"]["reason"]
            assert _outputs(runner).energy_alarms == ("monthly",)

            # the limit lowered under this month's import so far: trips, one per interval
            rig.accepted("modes", params={"monthly": {"limit_kwh": 40.0}})
            wait_until(lambda: len(rig.mode_records("trip")) >= 2, 10, "two rounds tripped")
            trips = rig.mode_records("trip")
            assert [t["data"]["round"] for t in trips] == [1, 2]
            assert all(t["data"]["mode"] == "monthly" and t["data"]["power_kw"] > 0
                       and t["data"]["reason"].startswith("monthly control: ")
                       and t["data"]["reason"].endswith("kWh used this month of 40 kWh")
                       for t in trips)
            assert trips[1]["ts"] - trips[0]["ts"] >= SLACK * 1.0
            assert len(rig.mode_records("alarm")) == 1, "the alarm stayed on"
            wait_until(lambda: rig.off_loads() == {"chiller-1", "chiller-2"}, 5, "rounds 1, 2 open")

            # a new month: alarm withdrawn, counted again from now, rounds back highest first
            register = agent.mode_state.month_start_kwh + _outputs(runner).month_used_kwh
            clock.jump(local_epoch(2025, 2, 1, 0, 0, 5) - clock())
            restores = _restores(rig, [2, 1], 1.0)
            assert all(r["data"]["reason"] == "new month 2025-02; staggered restore"
                       for r in restores)
            off = rig.mode_records("alarm_off", mode="monthly")
            assert off and off[0]["data"]["reason"] == "new month 2025-02"
            state = agent.mode_state
            assert state.month == "2025-02" and state.month_start_kwh >= register
            assert 0.0 <= _outputs(runner).month_used_kwh < 1.0
            assert _outputs(runner).energy_alarms == ()
            assert len(rig.mode_records("trip")) == 2
        finally:
            runner.stop()
            rig.close()


def _first_energy(rig: ModesRig) -> float | None:
    """The import register in the agent's first main-meter reading."""
    readings = buffered_readings(rig.cfg_path, "main-meter")
    return readings[0]["values"].get("import_energy_kwh") if readings else None


def test_purchase_control_trips_when_little_is_left_and_a_purchase_restores(
        tmp_path: Path, site: int, broker: Broker) -> None:
    """Purchased-energy (prepaid) control: an order that leaves less than the trip threshold
    raises the alarm and trips the energy rounds, one per interval; a newer order that lifts
    what is left above the thresholds withdraws the alarm and releases them (highest first,
    staggered); a stale order number is refused once and adds nothing."""
    rig = ModesRig(tmp_path, site, broker, poll=FAST_POLL, control=NO_MIN_TIMES)
    runner = rig.start()
    try:
        rig.accepted("modes", params={
            "energy": {"rounds": [3, 4], "interval_s": 1.0}, "restore_interval_s": 1.0,
            "purchase": {"enabled": True, "order_no": 1, "append": False, "amount_kwh": 5.0,
                         "alarm_kwh": 20.0, "trip_kwh": 10.0}})
        wait_until(lambda: len(rig.mode_records("trip")) >= 2, 10, "two rounds tripped")
        order = rig.mode_records("order")
        alarm = rig.mode_records("alarm", mode="purchase")
        trips = rig.mode_records("trip")
        assert order[0]["data"]["reason"] == "purchase order 1: refreshed to 5 kWh, 5.0 kWh left"
        assert alarm and alarm[0]["data"]["round"] is None
        assert "kWh left (alarm at 20, trip at 10)" in alarm[0]["data"]["reason"]
        assert [t["data"]["round"] for t in trips] == [3, 4]
        assert all(t["data"]["mode"] == "purchase" and t["data"]["power_kw"] > 0 for t in trips)
        assert order[0]["seq"] < alarm[0]["seq"] < trips[0]["seq"]
        assert trips[1]["ts"] - trips[0]["ts"] >= SLACK * 1.0
        wait_until(lambda: rig.off_loads() == {"air-compressor", "ev-chargers"}, 5,
                   "rounds 3, 4 open")
        left = _outputs(runner).purchase_left_kwh
        assert 4.0 < left <= 5.0  # minus what the site imported since the order

        # a new purchase appends 100 kWh: over both thresholds, the rounds come back
        rig.accepted("modes", params={"purchase": {"order_no": 2, "amount_kwh": 100.0,
                                                   "append": True}})
        restores = _restores(rig, [4, 3], 1.0)
        assert all(r["data"]["mode"] == "purchase" and "staggered restore" in r["data"]["reason"]
                   for r in restores)
        orders = rig.mode_records("order")
        assert len(orders) == 2 and "purchase order 2: appended 100 kWh to" in orders[1]["data"]["reason"]
        assert rig.mode_records("alarm_off", mode="purchase")
        left = _outputs(runner).purchase_left_kwh
        assert 104.0 < left <= 105.0

        # the old order number again: refused once, nothing added, nothing switched
        rig.accepted("modes", params={"purchase": {"order_no": 1, "amount_kwh": 100.0}})
        ignored = wait_until(lambda: rig.mode_records("ignored", mode="purchase"), 10,
                             "the stale order ignored")
        assert isinstance(ignored, list) and len(ignored) == 1
        assert ignored[0]["data"]["reason"] == "purchase order 1 is not newer than order 2"
        assert _outputs(runner).purchase_left_kwh <= left
        assert len(rig.mode_records("order")) == 2 and len(rig.mode_records("trip")) == 2
        assert all(rig.coils()[:7])
    finally:
        runner.stop()
        rig.close()
