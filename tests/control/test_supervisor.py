"""Cycle tables of the control supervisor (``lmt.control.supervisor``): no broker, no simulator.

Each test drives :class:`~tests.control.supervisor_rig.Rig` — a site model, a clock and a
state persisted before every actuation — through control cycles and checks, cycle by cycle,
the writes the supervisor asks for and the records it makes.
"""

from __future__ import annotations

import json
import math

import pytest

from lmt.control import supervisor as sup
from lmt.control.supervisor import (
    CancelRequest,
    CapRequest,
    DrRequest,
    GuaranteeRequest,
    ModesRequest,
    OptOut,
    RemoteRequest,
    ShedRequest,
    SupervisorState,
    step,
)
from tests.control.supervisor_rig import SITE, WALL0, Rig, config, load


def dr(rig: Rig, event_id: str, signal: str, value: float, duration_s: float, *,
       start_in: float = 0.0, ramp_s: float = 0.0, recovery_s: float = 0.0) -> DrRequest:
    start = rig.wall + 2.0 + start_in  # active from the cycle after the one it arrives in
    return DrRequest(event_id, issued_at=rig.wall, start=start, duration_s=duration_s,
                     signal=signal, value=value, ramp_s=ramp_s, recovery_s=recovery_s,
                     expires_at=start + duration_s)


def cap(cid: str, kw: float, s: float, loads: tuple[str, ...] | None = None) -> CapRequest:
    return CapRequest(cid, kw, duration_s=s, loads=loads)


# -- a cap command, start to end ----------------------------------------------------------------
def test_cap_sheds_the_cheapest_cover_then_releases_staggered() -> None:
    rig = Rig(config())
    assert rig.cycle().actions == []
    log = rig.cycle([cap("c1", 150.0, 10.0)])
    # need 187 - 149 = 38 kW: ev + chiller (52 kW, cost 50) is the cheapest cover
    assert log.names(rig.cfg) == ["shed ev", "shed chiller"]
    assert log.kinds[:2] == ["accepted", "control_started"]
    executed = log.results("executed")
    assert executed and executed[0]["data"]["shed"] == ["ev", "chiller"]
    assert rig.true_kw() == 135.0
    # held while the command runs: the headroom (149 - 135 - 2 = 12) fits neither
    for _ in range(9):
        assert rig.cycle().actions == []
    # the end (t = 12 = 2 + 10): most important first, at most 50 kW per cycle; the next one
    # only once the first shows on the meter (here: the very next reading)
    assert rig.cycle().names(rig.cfg) == ["restore chiller"]
    log = rig.cycle()
    assert log.names(rig.cfg) == ["restore ev"]
    final = log.results("completed")
    assert len(final) == 1
    data = final[0]["data"]
    assert data["cap_met"] is True and data["switched"] == ["ev", "chiller"]
    assert data["time_to_cap_s"] == 1.0 and data["above_cap_s"] == 0.0
    assert "all loads restored; cap met" in final[0]["detail"]
    assert rig.off() == [] and rig.held() == [] and rig.state.command is None
    assert rig.cycle().actions == []


def test_persist_then_actuate_the_saved_state_records_every_action() -> None:
    """What step returns already says what its actions are about to do."""
    rig = Rig(config(loads=(*SITE, load("charger", 22.0, 5, kind="adjustable", full_scale=32.0))))
    rig.cycle()
    state, actions, _ = step(rig.cfg, rig.state, sup.Inputs(
        now=rig.wall + 1, mono=rig.t + 1, session="s1", site_kw=rig.meter_kw(),
        loads=rig.read_loads(), requests=[cap("c1", 180.0, 60.0)]))
    assert actions
    saved = SupervisorState.from_dict(json.loads(json.dumps(state.to_dict())))
    for a in actions:
        ld = saved.loads[rig.cfg.loads[a.load].name]
        assert ld.held and ld.owner == "c1" and ld.since == rig.wall + 1
        if a.kind == "set":
            assert ld.restore_pct == 100.0 and a.pct is not None and a.pct < 100.0
    assert saved.command is not None and saved.command.id == "c1"
    assert saved.command.end_at == rig.wall + 61


def test_step_is_deterministic_and_leaves_its_arguments_alone() -> None:
    rig = Rig(config())
    rig.run(3)
    inp = sup.Inputs(now=rig.wall + 1, mono=rig.t + 1, session="s1", site_kw=187.0,
                     loads=rig.read_loads(), requests=[cap("c1", 150.0, 10.0)])
    before = json.dumps(rig.state.to_dict())
    a = step(rig.cfg, rig.state, inp)
    b = step(rig.cfg, rig.state, inp)
    assert json.dumps(rig.state.to_dict()) == before
    assert a[1] == b[1] and a[2] == b[2] and a[0].to_dict() == b[0].to_dict()


# -- the lower cap wins ------------------------------------------------------------------------
def test_lower_cap_wins_command_first_then_dr() -> None:
    rig = Rig(config())
    rig.cycle()
    assert rig.cycle([cap("c1", 170.0, 30.0)]).names(rig.cfg) == ["shed ev"]  # need 18
    rig.cycle()
    # a DR event capping at 140: lower, it takes over (need 165 - 139 = 26 more)
    log = rig.cycle([dr(rig, "e1", "cap_kw", 140.0, 10.0)])
    assert [r["status"] for r in log.results()] == ["accepted", "received", "scheduled"]
    log = rig.cycle()
    assert "active" in log.kinds
    assert log.names(rig.cfg) == ["shed chiller"]
    assert rig.true_kw() == 135.0
    assert rig.state.dr_owner == "e1"
    for _ in range(9):
        assert rig.cycle().actions == []
    # the event ends at its end: the command's higher cap holds again: loads come back under it
    # (headroom 169 - 135 - 2 = 32): the chiller; ev (22) does not fit beside it
    log = rig.cycle()
    assert log.kinds[:1] == ["completed"] and log.names(rig.cfg) == ["restore chiller"]
    assert [lg.names(rig.cfg) for lg in rig.run(5)] == [[]] * 5
    assert rig.off() == ["ev"] and rig.true_kw() == 165.0


def test_lower_cap_wins_dr_first_then_command() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([dr(rig, "e1", "cap_kw", 170.0, 20.0)])
    log = rig.cycle()
    assert log.names(rig.cfg) == ["shed ev"]
    log = rig.cycle([cap("c1", 140.0, 5.0)])
    assert log.names(rig.cfg) == ["shed chiller"]  # 165 - 139 = 26: the chiller
    ex = log.results("executed")[0]
    assert ex["data"]["shed"] == ["chiller"] and "lower cap" not in ex["detail"]
    rig.run(4)
    # the command ends while the event still caps at 170: the event takes its loads over
    log = rig.cycle()
    done = log.results("completed")
    assert done and done[0]["command_id"] == "c1"
    assert "loads now held by DR event e1" in done[0]["detail"]
    # under the event's 170 cap the chiller comes back (135 + 30 + 2 <= 169), ev stays off
    logs = [log, *rig.run(8)]
    assert ["restore chiller"] in [lg.names(rig.cfg) for lg in logs]
    assert rig.off() == ["ev"]
    assert all(ld.owner == "e1" for ld in rig.state.loads.values() if ld.held)


# -- DR takeover, ramp and recovery ------------------------------------------------------------
def test_dr_recovery_paces_restores_under_a_rising_ceiling() -> None:
    rig = Rig(config(restore_step_kw=100.0))
    rig.run(3)  # baseline 187
    rig.cycle([dr(rig, "e1", "reduction_kw", 60.0, 5.0, recovery_s=20.0)])
    log = rig.cycle()
    # cap 187 - 60 = 127: need 61: ev + heater + chiller (64 kW)
    assert log.names(rig.cfg) == ["shed ev", "shed heater", "shed chiller"]
    rig.run(4)
    log = rig.cycle()
    assert log.kinds == ["completed"]  # at its end; the recovery starts at the last cap (127)
    restored = {}
    for k in range(1, 26):  # the ceiling rises 60 kW over 20 s: 3 kW/s
        log = rig.cycle()
        for name in log.names(rig.cfg):
            restored[name.split()[1]] = k
        if k < 20:
            assert rig.true_kw() <= 127.0 + 3.0 * k + 1e-9, (k, rig.true_kw())
    # each as soon as site + its kW fits under the ceiling: heater (123 + 12 <= 127 + 9),
    # then ev (135 + 22 <= 127 + 30); the chiller needs 157 + 30 = 187: the recovery's end
    assert restored == {"heater": 3, "ev": 10, "chiller": 20}
    assert rig.off() == []


def test_dr_ramp_sheds_but_restores_nothing_while_the_cap_falls() -> None:
    rig = Rig(config())
    rig.run(3)
    rig.cycle([dr(rig, "e1", "cap_kw", 130.0, 20.0, ramp_s=10.0)])
    switched = []
    for _ in range(12):
        log = rig.cycle()
        switched += log.names(rig.cfg)
    assert all(s.startswith("shed") for s in switched), switched
    assert rig.true_kw() <= 130.0


# -- staggered release, restarts --------------------------------------------------------------
def test_restart_mid_cap_keeps_the_command_and_its_loads() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 20.0)])
    assert rig.off() == ["chiller", "ev"]
    rig.run(2)
    rig.crash()  # SIGKILL: the relays stay as they are
    rig.base_kw = 120.0  # meanwhile the site grew: 155 with ev and chiller off
    log = rig.cycle()  # the first cycle after the restart, with a fresh reading
    assert log.names(rig.cfg) == ["shed heater"]  # need 155 - 149 = 6: under the cap again
    assert rig.true_kw() <= 150.0
    assert log.results() == []  # no second acceptance, no final result yet
    logs = rig.run(30)
    finals = [r for lg in logs for r in lg.results() if r["status"] in ("completed", "failed")]
    assert [r["command_id"] for r in finals] == ["c1"]  # exactly one final result, at its end
    assert rig.off() == []


def test_crash_between_persist_and_actuation_loses_no_load() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 4.0)])
    rig.run(3)
    log = rig.cycle(crash_before_actuation=True)  # the end: the restores were never written
    assert log.names(rig.cfg) == ["restore chiller"]
    assert rig.off() == ["chiller", "ev"]
    logs = rig.run(6)
    assert rig.off() == []
    finals = [r for lg in logs for r in lg.results("completed")]
    assert len(finals) == 1 and finals[0]["command_id"] == "c1"


def test_restart_mid_restore_brings_every_load_back() -> None:
    rig = Rig(config(restore_step_kw=20.0))
    rig.cycle()
    rig.cycle([cap("c1", 140.0, 3.0)])  # need 48: ev + chiller again (52)
    rig.run(2)
    assert rig.cycle().names(rig.cfg) == ["restore chiller"]  # at least one load a cycle
    rig.crash()
    logs = rig.run(5)
    assert rig.off() == []
    assert sum(lg.names(rig.cfg) == ["restore ev"] for lg in logs) == 1
    assert [r["status"] for lg in logs for r in lg.results()] == ["completed"]


def test_restart_mid_dr_resumes_the_event() -> None:
    rig = Rig(config())
    rig.run(3)
    rig.cycle([dr(rig, "e1", "cap_kw", 150.0, 30.0)])
    rig.cycle()
    assert rig.off() == ["chiller", "ev"]
    rig.crash()
    rig.run(3)
    assert rig.off() == ["chiller", "ev"] and rig.state.dr_owner == "e1"
    logs = rig.run(30)
    assert "completed" in [k for lg in logs for k in lg.kinds]
    assert rig.off() == []


def test_a_load_held_before_a_restart_with_no_command_comes_back() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 60.0)])
    state = rig.state
    assert state is not None and state.command is not None
    state.command = None  # an older agent's buffer: loads held, no command
    rig.persist(state)
    rig.crash()
    log = rig.cycle()
    assert log.names(rig.cfg) == ["restore chiller"]
    assert "no command holds it" in log.actions[0].reason


def test_stopping_restores_at_once_and_fails_the_command() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 60.0)])
    log = rig.cycle(stopping=True)
    assert sorted(log.names(rig.cfg)) == ["restore chiller", "restore ev"]
    failed = log.results("failed")
    assert failed and "all loads restored" in failed[0]["detail"]
    assert rig.state.command is None


def test_stopping_with_a_failing_relay_says_what_stayed_off() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 60.0)])
    rig.fail.add("ev")
    log = rig.cycle(stopping=True)
    failed = log.results("failed")
    assert failed and "could not restore ev" in failed[0]["detail"]
    assert log.events("switch_failed")


# -- the clock ---------------------------------------------------------------------------------
def test_a_wall_clock_step_neither_shortens_nor_stretches_a_command() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 10.0)])
    rig.cycle(wall_step=3600.0)  # NTP steps the clock an hour ahead
    rig.run(7)
    assert rig.off() == ["chiller", "ev"]
    rig.cycle(wall_step=-7200.0)  # and two hours back
    log = rig.cycle()
    assert log.names(rig.cfg) == ["restore chiller"]  # 10 s after acceptance on the monotonic clock


def test_across_a_restart_the_command_ends_by_the_wall_clock() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 10.0)])
    rig.crash()
    rig.t = 1000.0  # a new boot: the monotonic clock starts elsewhere
    rig.wall += 30.0  # down for 30 s: the command's end has passed
    log = rig.cycle()
    assert log.names(rig.cfg) == ["restore chiller"]


# -- load classes -------------------------------------------------------------------------------
def test_rotation_takes_turns_between_deferrable_loads() -> None:
    loads = (load("pump-a", 10.0, 1, kind="deferrable", max_off_s=4.0, min_on_s=1.0),
             load("pump-b", 10.0, 2, kind="deferrable", max_off_s=4.0, min_on_s=1.0))
    rig = Rig(config(loads=loads), base_kw=100.0)
    rig.cycle()
    assert rig.cycle([cap("c1", 115.0, 60.0)]).names(rig.cfg) == ["shed pump-a"]
    names = [lg.names(rig.cfg) for lg in rig.run(12)]
    swaps = [n for n in names if n]
    assert ["shed pump-b", "restore pump-a"] in swaps
    assert ["shed pump-a", "restore pump-b"] in swaps
    assert rig.true_kw() <= 115.0


def test_minimum_on_and_off_times_hold() -> None:
    loads = (load("a", 20.0, 1, min_off_s=8.0), load("b", 20.0, 2, min_on_s=30.0))
    rig = Rig(config(loads=loads, hysteresis_kw=0.0), base_kw=100.0)
    rig.cycle()
    assert rig.cycle([cap("c1", 130.0, 60.0)]).names(rig.cfg) == ["shed a"]
    rig.base_kw = 80.0  # room for a again, but its minimum off time (8 s) holds it
    for _ in range(6):
        assert rig.cycle().actions == []
    logs = rig.run(3)
    assert ["restore a"] in [lg.names(rig.cfg) for lg in logs]


def test_adjustable_setpoint_lowered_just_enough_then_back() -> None:
    loads = (load("charger", 22.0, 1, kind="adjustable", full_scale=32.0, min_pct=20.0),
             load("heater", 12.0, 50))
    rig = Rig(config(loads=loads), base_kw=100.0)
    rig.cycle()
    log = rig.cycle([cap("c1", 125.0, 5.0)])  # 134 - 124 = 10 kW off the charger
    assert log.names(rig.cfg) == ["set charger 54.5"]
    assert rig.state.loads["charger"].restore_pct == 100.0
    adj = log.events("load_adjusted")[0]["data"]
    assert adj["setpoint_pct"] == 54.5 and adj["from_pct"] == 100.0
    rig.run(4)
    log = rig.cycle()
    assert log.names(rig.cfg) == ["set charger 100.0"]
    assert rig.held() == []


def test_an_adjustable_load_is_rewritten_while_held_and_unknown_after_a_restart() -> None:
    loads = (load("charger", 22.0, 1, kind="adjustable", full_scale=32.0, rewrite_s=2.0),)
    rig = Rig(config(loads=loads), base_kw=100.0)
    rig.cycle()
    rig.cycle([cap("c1", 115.0, 60.0)])
    quiet = [a for lg in rig.run(4) for a in lg.actions if a.quiet]
    assert len(quiet) == 2 and all(a.value == round(a.pct / 100 * 32.0, 4) for a in quiet)
    rig.crash()
    log = rig.cycle(loads_read=False)
    assert rig.state.loads["charger"].setpoint_pct is None  # not read since the start
    assert log.actions == []


# -- failures -----------------------------------------------------------------------------------
def test_a_failed_write_is_retried_later_and_another_load_covers() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.fail.add("chiller")
    log = rig.cycle([cap("c1", 150.0, 60.0)])
    assert log.names(rig.cfg) == ["shed ev", "shed chiller"]
    failed = log.events("switch_failed")
    assert failed and failed[0]["data"]["load"] == "chiller"
    assert rig.state.loads["chiller"].retry_t is not None
    # the next reading: still 16 kW over; chiller's relay is failing: heater + lighting
    log = rig.cycle()
    assert sorted(log.names(rig.cfg)) == ["shed heater", "shed lighting"]
    assert rig.true_kw() <= 149.0


# -- the measured response --------------------------------------------------------------------
def test_a_load_that_switches_without_effect_is_unresponsive_and_its_kw_not_counted() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.dead.add("chiller")  # the relay switches, the chiller runs on (mis-wired)
    rig.cycle([cap("c1", 150.0, 60.0)])  # ev + chiller: 52 kW expected, 22 seen (42 %)
    logs = rig.run(4)
    assert not [e for lg in logs for e in lg.events("load_unresponsive")]
    # ev's 22 kW showed (over 30 % of 52): the controller sheds the rest it needs
    shed_more = [n for lg in logs for n in lg.names(rig.cfg)]
    assert shed_more and all(n.startswith("shed") for n in shed_more)
    assert rig.true_kw() <= 149.0


def test_a_frozen_meter_stops_escalation_and_the_final_result_says_the_cap_was_not_met() -> None:
    rig = Rig(config())
    rig.run(6)
    rig.frozen = 187.0  # the main meter's register is frozen
    log = rig.cycle([cap("c1", 5.0, 15.0)])
    first = log.names(rig.cfg)
    assert first == ["shed ev", "shed heater", "shed chiller", "shed lighting"] or first
    # no more loads exist here; make a site where escalation could go on
    rig2 = Rig(config(loads=(*SITE, load("a", 5.0, 90), load("b", 5.0, 95))), base_kw=100.0)
    rig2.run(6)
    rig2.frozen = 197.0
    log = rig2.cycle([cap("c1", 192.0, 20.0)])  # need 6 kW: a + b? no: a 5 < 6 -> cheapest cover
    shed = log.names(rig2.cfg)
    assert shed and all(s.startswith("shed") for s in shed)
    logs = rig2.run(25)
    later = [n for lg in logs for n in lg.names(rig2.cfg) if n.startswith("shed")]
    assert later == [], f"escalated blind: {later}"
    kinds = [k for lg in logs for k in lg.kinds]
    assert "load_unresponsive" in kinds and "cap_unmet" in kinds
    unresp = next(e for lg in logs for e in lg.events("load_unresponsive"))["data"]
    assert unresp["measured_kw"] == 0.0 and unresp["expected_kw"] < 0
    unmet = next(e for lg in logs for e in lg.events("cap_unmet"))["data"]
    assert unmet["reason"] == "unresponsive" and unmet["command_id"] == "c1"
    final = [r for lg in logs for r in lg.results("completed")]
    assert len(final) == 1
    data = final[0]["data"]
    assert data["cap_met"] is False and data["above_cap_s"] > 15.0
    assert data["max_excess_kw"] == pytest.approx(5.0)
    assert sorted(data["unresponsive"]) == sorted(n.split()[1] for n in shed)
    assert "cap not met" in final[0]["detail"]


def test_after_a_responsive_shed_one_idle_load_does_not_stop_the_controller() -> None:
    rig = Rig(config(loads=(load("ev", 22.0, 10), load("idle", 10.0, 15),
                            load("heater", 12.0, 20))), base_kw=100.0)
    rig.cycle()
    rig.cycle([cap("c1", 125.0, 60.0)])  # 144 - 124 = 20: ev (22)
    rig.run(2)
    rig.dead.add("idle")
    rig.base_kw = 112.0  # load rises: 134 -> need 10: the idle load (cheapest)
    logs = rig.run(8)
    names = [n for lg in logs for n in lg.names(rig.cfg)]
    assert "shed idle" in names and "shed heater" in names  # the heater covers it after all
    assert [e for lg in logs for e in lg.events("load_unresponsive")]
    assert not [e for lg in logs for e in lg.events("cap_unmet")]


def test_a_cap_below_the_uncontrollable_load_is_reported_infeasible() -> None:
    rig = Rig(config())
    rig.cycle()
    log = rig.cycle([cap("c1", 100.0, 30.0)])  # the site draws 115 kW with all it may shed off
    unmet = log.events("cap_unmet")
    assert unmet and unmet[0]["data"]["reason"] == "infeasible"
    assert unmet[0]["data"]["uncontrollable_kw"] == pytest.approx(115.0)
    assert sorted(log.names(rig.cfg)) == ["shed chiller", "shed ev", "shed heater",
                                          "shed lighting"]  # best effort
    logs = rig.run(35)
    assert not [e for lg in logs for e in lg.events("cap_unmet")]  # said once
    final = next(r for lg in logs for r in lg.results("completed"))
    assert final["data"]["cap_met"] is False
    assert "below the site's uncontrollable load" in final["detail"]


# -- commands refused, cancelled, superseded ---------------------------------------------------
def test_refusals_name_their_reason() -> None:
    rig = Rig(config())
    rig.cycle()
    log = rig.cycle([CancelRequest("x1", "nope"), cap("c2", 150.0, 10.0, loads=("boiler",)),
                     cap("c3", 150.0, 10.0, loads=("servers",)),
                     CapRequest("c4", 150.0, until=WALL0 - 10.0),
                     RemoteRequest("r1", 3, "trip")])
    got = {r["command_id"]: (r["reason"], r["detail"]) for r in log.results("rejected")}
    assert got["x1"][0] == "unknown_target"
    assert got["c2"][0] == "invalid" and "unknown load 'boiler'" in got["c2"][1]
    assert got["c3"][0] == "invalid" and "critical" in got["c3"][1]
    assert got["c4"][0] == "expired"
    assert got["r1"][0] == "invalid" and "round 3" in got["r1"][1]
    assert log.actions == []
    log = rig.cycle([ShedRequest("s1", 500.0, 10.0)])
    assert log.results("rejected")[0]["reason"] == "invalid"
    log = rig.cycle([ShedRequest("s2", 10.0, 10.0)], fresh=False)
    assert log.results("accepted")  # the recent reading serves


def test_cancel_and_supersede() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 60.0)])
    log = rig.cycle([cap("c2", 170.0, 60.0)])
    sup_ = log.results("superseded")
    assert sup_ and sup_[0]["command_id"] == "c1" and "by c2" in sup_[0]["detail"]
    assert all(ld.owner == "c2" for ld in rig.state.loads.values() if ld.held)
    rig.run(2)
    log = rig.cycle([CancelRequest("x1", "c2")])
    assert [r["status"] for r in log.results()] == ["accepted"]
    logs = [log, *rig.run(5)]
    statuses = [(r["command_id"], r["status"]) for lg in logs for r in lg.results()]
    assert ("c2", "cancelled") in statuses and ("x1", "completed") in statuses
    assert rig.off() == []


def test_shed_only_the_named_loads() -> None:
    rig = Rig(config())
    rig.cycle()
    log = rig.cycle([cap("c1", 150.0, 60.0, loads=("heater", "lighting"))])
    assert sorted(log.names(rig.cfg)) == ["shed heater", "shed lighting"]


# -- terminal control modes ---------------------------------------------------------------------
def test_remote_trip_holds_a_round_and_a_cap_leaves_it_alone() -> None:
    loads = (load("a", 20.0, 10, round=1), load("b", 20.0, 20, round=2), load("c", 20.0, 30))
    rig = Rig(config(loads=loads), base_kw=100.0)
    rig.cycle()
    log = rig.cycle([RemoteRequest("r1", 1, "trip")])
    assert [r["status"] for r in log.results()] == ["accepted", "completed"]
    assert log.names(rig.cfg) == ["shed a"]
    assert "mode_trip" in log.kinds
    assert rig.state.mode_held == ["a"]
    # a cap under it sheds b and c, never "restores" a
    log = rig.cycle([cap("c1", 125.0, 3.0)])
    assert log.names(rig.cfg) == ["shed b"]
    logs = rig.run(8)
    assert ["restore b"] in [lg.names(rig.cfg) for lg in logs]
    assert rig.off() == ["a"]
    # allow close: the round comes back (staggered release)
    logs = rig.run(1, requests=[RemoteRequest("r2", 1, "close")])
    logs += rig.run(4)
    assert ["restore a"] in [lg.names(rig.cfg) for lg in logs]
    assert rig.off() == []


def test_restart_mid_modes_does_not_trip_twice() -> None:
    loads = (load("a", 20.0, 10, round=1), load("b", 20.0, 20))
    rig = Rig(config(loads=loads), base_kw=100.0)
    rig.cycle()
    rig.cycle([RemoteRequest("r1", 1, "trip")])
    rig.crash()
    logs = rig.run(3)
    assert [n for lg in logs for n in lg.names(rig.cfg)] == []
    assert rig.off() == ["a"] and rig.state.mode_held == ["a"]
    assert "mode_trip" not in [k for lg in logs for k in lg.kinds]


def test_guarantee_and_modes_params_and_bad_params() -> None:
    loads = (load("a", 20.0, 10, round=1),)
    rig = Rig(config(loads=loads), base_kw=100.0)
    rig.cycle()
    log = rig.cycle([ModesRequest("m1", {"power": {"nonsense": 1}})])
    assert log.results("rejected")[0]["reason"] == "invalid"
    log = rig.cycle([GuaranteeRequest("g1", True)])
    assert "mode_guarantee_on" in log.kinds
    assert rig.state.mode_params.guarantee.on


def test_two_minute_records() -> None:
    rig = Rig(config(record_after_s=5.0))
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 60.0)])
    logs = rig.run(6)
    recs = [e for lg in logs for e in lg.events("control_record")]
    assert len(recs) == 1
    assert recs[0]["data"]["shed"] == ["ev", "chiller"]
    assert recs[0]["data"]["site_kw"] == 187.0 and recs[0]["data"]["site_kw_after_2min"] == 135.0


# -- DR: opt-out, delivery ----------------------------------------------------------------------
def test_opt_out_ends_the_event_and_brings_loads_back() -> None:
    rig = Rig(config())
    rig.run(3)
    rig.cycle([dr(rig, "e1", "cap_kw", 150.0, 60.0)])
    rig.cycle()
    assert rig.off()
    log = rig.cycle(optouts=[OptOut(1, "e1", "customer override at the local page")])
    assert "opted_out" in log.kinds
    rig.run(3)
    assert rig.off() == []
    log = rig.cycle(optouts=[OptOut(2, "nope", "typo")])
    assert log.events("optout_ignored")


def test_dr_delivery_is_metered_over_the_window() -> None:
    rig = Rig(config())
    rig.run(10)  # baseline 187
    rig.cycle([dr(rig, "e1", "cap_kw", 150.0, 10.0)])
    logs = rig.run(14)
    end = next(r for lg in logs for r in lg.results("completed") if r["command_id"] == "e1")
    got = end["data"]["delivery"]
    assert got["baseline_kw"] == pytest.approx(187.0)
    assert got["method"] == "power samples"
    assert got["delivered_reduction_kw"] == pytest.approx(187.0 - 135.0, abs=6.0)


def test_the_state_survives_json() -> None:
    loads = (*SITE, load("charger", 22.0, 5, kind="adjustable", full_scale=32.0),
             load("r1", 5.0, 7, round=1))
    rig = Rig(config(loads=loads))
    rig.run(3)
    rig.cycle([cap("c1", 150.0, 60.0), RemoteRequest("r1", 1, "trip")])
    rig.cycle([dr(rig, "e1", "cap_kw", 140.0, 60.0)])
    rig.run(3)
    d = rig.state.to_dict()
    back = SupervisorState.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    assert not any(isinstance(v, float) and not math.isfinite(v)
                   for v in _leaves(d)), "JSON has no inf or NaN"
    with pytest.raises(ValueError, match="unknown field"):
        SupervisorState.from_dict({**d, "bogus": 1})


def _leaves(x: object) -> list[object]:
    if isinstance(x, dict):
        return [v for val in x.values() for v in _leaves(val)]
    if isinstance(x, list):
        return [v for val in x for v in _leaves(val)]
    return [x]


def test_an_adjustable_load_is_unknown_until_read_and_held_until_back_where_it_was() -> None:
    loads = (load("charger", 22.0, 1, kind="adjustable", full_scale=32.0, rewrite_s=2.0),)
    rig = Rig(config(loads=loads), base_kw=100.0)
    # not read yet: a cap far below the site touches nothing (it could be idle at 0 A)
    log = rig.cycle([cap("c1", 110.0, 60.0)], loads_read=False)
    assert log.actions == [] and rig.state.loads["charger"].setpoint_pct is None
    log = rig.cycle()  # read: 32 A is 100 %; 122 - 109 = 13 kW off the charger
    assert log.names(rig.cfg) == ["set charger 40.9"]
    ld = rig.state.loads["charger"]
    assert ld.held and ld.restore_pct == 100.0
    switched = ld.switched_t
    # a rewrite (rewrite_s) writes the same value again: no switch, minimum times run on
    logs = rig.run(3)
    rewrites = [a for lg in logs for a in lg.actions if a.quiet]
    assert rewrites and rig.state.loads["charger"].switched_t == switched
    assert rig.state.loads["charger"].written_t > switched
    # someone turns it up a little by hand (31.9 A = 99.7 %): still held
    rig.pct["charger"] = 31.9 / 32.0 * 100.0
    rig.cycle()
    assert rig.state.loads["charger"].held
    # back at 32 A: back where it was, no longer held
    rig.pct["charger"] = 100.0
    rig.cycle()
    assert not rig.state.loads["charger"].held


def test_stopping_while_a_command_releases_ends_it_as_it_was_ending() -> None:
    rig = Rig(config(restore_step_kw=20.0))
    rig.cycle()
    rig.cycle([cap("c1", 150.0, 3.0)])
    rig.run(2)
    assert rig.cycle().names(rig.cfg) == ["restore chiller"]  # the end: staggered
    log = rig.cycle(stopping=True)
    assert log.names(rig.cfg) == ["restore ev"]  # the rest at once
    assert [r["status"] for r in log.results()] == ["completed"]
    assert rig.state.command is None and rig.off() == []


def test_a_reading_from_before_the_last_write_is_ignored() -> None:
    """A slow line's read of the relays that started before this cycle's write (it overlapped
    it) says nothing about the write's result: the hold stands."""
    rig = Rig(config())
    rig.cycle()
    before = rig.read_loads()  # a slow line reads the relays ...
    assert rig.cycle([cap("c1", 170.0, 5.0)]).names(rig.cfg) == ["shed ev"]  # ... ev is shed
    rig.cycle(loads=before, loads_age_s=[1.5] * len(before))  # ... its reading comes in late
    assert rig.held() == ["ev"] and rig.off() == ["ev"]
    rig.cycle(loads=before, loads_age_s=[0.0] * len(before))  # read after the write: believed
    assert rig.held() == []  # (switched back on by hand, as far as it knows)


def test_a_new_command_waits_for_the_last_sheds_effect_and_takes_over_its_check() -> None:
    rig = Rig(config())
    rig.run(6)
    rig.frozen = 187.0  # the meter does not show the sheds (frozen)
    assert rig.cycle([cap("c1", 170.0, 60.0)]).names(rig.cfg) == ["shed ev"]
    log = rig.cycle([cap("c2", 120.0, 60.0)])
    assert log.actions == [] and not log.results("executed"), "held back, not 'nothing needed'"
    logs = rig.run(6)
    unresp = [e for lg in logs for e in lg.events("load_unresponsive")]
    unmet = [e for lg in logs for e in lg.events("cap_unmet")]
    assert unresp and unresp[0]["data"]["command_id"] == "c2"
    assert unmet and unmet[0]["data"]["command_id"] == "c2"
    ex = [r for lg in logs for r in lg.results("executed")]
    assert ex and "nothing more" in ex[0]["detail"]
    assert rig.state.command is not None and "ev" in rig.state.command.unresponsive


def test_contact_and_the_automatic_guarantee() -> None:
    """Connected to the platform is contact: no automatic guarantee while the link is up."""
    loads = (load("a", 20.0, 10, round=1),)
    rig = Rig(config(loads=loads), base_kw=100.0)
    rig.cycle([GuaranteeRequest("g0", False, auto_after_h=1)])
    rig.cycle([RemoteRequest("r1", 1, "trip")])
    assert rig.off() == ["a"]
    for _ in range(70):
        rig.cycle(dt=60.0)  # an hour and ten minutes, connected all along
    assert rig.off() == ["a"] and rig.state.mode_state.guarantee == "off"
    for _ in range(70):
        rig.cycle(dt=60.0, contact=False)  # the platform unreachable for over an hour
    assert rig.state.mode_state.guarantee == "auto"


def test_a_load_no_longer_in_a_round_comes_back() -> None:
    loads = (load("a", 20.0, 10, round=1), load("b", 20.0, 20))
    rig = Rig(config(loads=loads), base_kw=100.0)
    rig.cycle()
    rig.cycle([RemoteRequest("r1", 1, "trip")])
    assert rig.off() == ["a"]
    rig.cfg = config(loads=(load("a", 20.0, 10), load("b", 20.0, 20)))  # a left its round
    rig.run(3)
    assert rig.off() == [] and rig.state.mode_held == []


def test_a_command_naming_a_load_the_configuration_lost() -> None:
    rig = Rig(config())
    rig.cycle()
    rig.cycle([cap("c1", 170.0, 30.0, loads=("ev", "lighting"))])
    rig.cfg = config(loads=tuple(lc for lc in SITE if lc.name != "lighting"))
    logs = rig.run(3)  # no KeyError: the command goes on with the loads it still has
    assert rig.state.command is not None and rig.state.command.loads == ["ev"]
    assert logs


def test_killed_while_stopping_the_command_fails_once_its_loads_are_back() -> None:
    rig = Rig(config())
    rig.run(3)
    rig.cycle([dr(rig, "e1", "cap_kw", 150.0, 60.0), cap("c1", 170.0, 60.0)])
    rig.cycle()
    rig.cycle(stopping=True, crash_before_actuation=True)  # SIGKILL in the stop
    logs = rig.run(6)
    finals = [r for lg in logs for r in lg.results() if r["command_id"] == "c1"]
    assert [r["status"] for r in finals] == ["failed"]
    assert "could not restore" not in finals[0]["detail"]


def test_infeasible_is_not_judged_on_a_setpoint_not_yet_read() -> None:
    loads = (load("charger", 44.0, 1, kind="adjustable", full_scale=64.0), load("heater", 12.0, 20))
    rig = Rig(config(loads=loads), base_kw=100.0)
    log = rig.cycle([cap("c1", 140.0, 5.0)], loads_read=False)  # the charger not read yet
    assert not log.events("cap_unmet")
    logs = rig.run(10)
    assert not [e for lg in logs for e in lg.events("cap_unmet")]
    final = next(r for lg in logs for r in lg.results("completed"))
    assert final["data"]["cap_met"] and "uncontrollable" not in final["detail"]


def test_cap_unmet_of_a_dr_event_names_its_cap() -> None:
    rig = Rig(config())
    rig.run(3)
    rig.cycle([dr(rig, "e1", "cap_kw", 150.0, 60.0)])
    rig.frozen = 187.0
    unmet = [e["data"] for lg in rig.run(8) for e in lg.events("cap_unmet")]
    assert unmet and all(d["command_id"] == "e1" and d["cap_kw"] == 150.0 for d in unmet)
