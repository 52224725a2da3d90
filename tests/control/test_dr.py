"""Tests of the demand-response scheduler and the baseline helpers (lmt.control.dr).

Most tests are tables: a list of inputs in time order — ``("rx", event)``, ``("tick",
baseline_kw)``, ``("cancel", id)``, ``("opt_out", id)`` at a time — each with the transitions
it must return as ``(event id, state, at)`` and, for ticks, the expected target.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import pytest

from lmt.control.dr import (
    DrEvent,
    DrScheduler,
    Target,
    Transition,
    baseline_before,
    delivered_reduction_kw,
    like_days_baseline,
    start_offset,
)

T0 = 1_800_000_000.0
TERM = "demo-0001"


def ev(id: str = "e1", *, start: float = T0 + 100, duration_s: float = 600, signal: str = "cap_kw",
       value: float = 100.0, issued_at: float | None = None, **kw: Any) -> DrEvent:
    return DrEvent(id=id, issued_at=T0 if issued_at is None else issued_at, start=start,
                   duration_s=duration_s, signal=signal, value=value, **kw)


def brief(transitions: list[Transition]) -> list[tuple[str, str, float]]:
    return [(t.event_id, t.state, t.at) for t in transitions]


def cap(target: Target | None) -> float | None:
    return None if target is None or target.cap_kw is None else round(target.cap_kw, 6)


# A row: (now, action, argument, expected transitions, expected cap or "-" to skip).
Row = tuple[float, str, Any, list[tuple[str, str, float]], Any]


def run(sched: DrScheduler, rows: list[Row]) -> list[Target | None]:
    targets: list[Target | None] = []
    for i, (now, action, arg, want, want_cap) in enumerate(rows):
        target: Target | None = None
        if action == "rx":
            got = sched.receive(arg, now)
        elif action == "tick":
            got, target = sched.tick(now, arg)
            targets.append(target)
        elif action == "cancel":
            got = sched.cancel(arg, now)
        elif action == "opt_out":
            got = sched.opt_out(arg, now, "customer pressed override")
        else:
            raise AssertionError(action)
        assert brief(got) == want, f"row {i} ({now - T0:+g} s, {action})"
        if action == "tick" and want_cap != "-":
            assert cap(target) == want_cap, f"row {i} ({now - T0:+g} s): target {target}"
    return targets


# -- life cycle -----------------------------------------------------------------------------
def test_cap_event_life_cycle() -> None:
    s = DrScheduler(TERM)
    run(s, [
        (T0, "rx", ev(), [("e1", "received", T0), ("e1", "scheduled", T0)], "-"),
        (T0 + 1, "tick", 150.0, [], None),
        (T0 + 99.9, "tick", 150.0, [], None),
        (T0 + 100, "tick", 150.0, [("e1", "active", T0 + 100)], 100.0),
        (T0 + 101, "tick", 140.0, [], 100.0),            # reported once; cap fixed
        (T0 + 699.9, "tick", 150.0, [], 100.0),
        (T0 + 700, "tick", 150.0, [("e1", "completed", T0 + 700)], None),
        (T0 + 701, "tick", 150.0, [], None),
    ])
    assert s.state_of("e1") == "completed"
    assert s.state_of("nope") is None


def test_transitions_carry_detail_and_data() -> None:
    s = DrScheduler(TERM)
    rx = s.receive(ev(signal="reduction_kw", value=30.0), T0)
    assert rx[0].detail == "reduce 30 kW for 600 s"
    assert rx[1].data == {"start": T0 + 100, "end": T0 + 700, "offset_s": 0.0}
    (act,), _ = s.tick(T0 + 100, 200.0)
    assert act.data["baseline_kw"] == 200.0 and act.data["cap_kw"] == 170.0
    assert "cap 170.0 kW" in act.detail
    (done,), _ = s.tick(T0 + 700, 10.0)
    assert done.data == {"was_active": True, "baseline_kw": 200.0}


# -- signals --------------------------------------------------------------------------------
@pytest.mark.parametrize(("signal", "value", "baseline", "want"), [
    ("cap_kw", 120.0, 200.0, 120.0),
    ("cap_kw", 120.0, None, 120.0),          # a cap needs no baseline
    ("reduction_kw", 50.0, 200.0, 150.0),
    ("reduction_kw", 300.0, 200.0, 0.0),     # never below zero
    ("reduction_pct", 25.0, 200.0, 150.0),
    ("reduction_pct", 100.0, 200.0, 0.0),
    ("level", 1, 200.0, 180.0),
    ("level", 2, 200.0, 160.0),
    ("level", 3, 200.0, 130.0),
    ("level", 0, 200.0, None),               # level 0: normal operation, no limit
])
def test_signal_types(signal: str, value: float, baseline: float | None, want: float | None) -> None:
    s = DrScheduler(TERM)
    s.receive(ev(signal=signal, value=value), T0)
    (act,), target = s.tick(T0 + 100, baseline)
    assert act.state == "active"
    assert cap(target) == want


def test_level_fractions_are_per_site_and_fixed_at_receipt() -> None:
    s = DrScheduler(TERM, level_fractions={1: 0.5, 2: 0.6, 3: 0.7})
    s.receive(ev(signal="level", value=1), T0)
    s.level_fractions[1] = 0.9  # a later configuration change does not move a received event
    _, target = s.tick(T0 + 100, 100.0)
    assert cap(target) == 50.0
    with pytest.raises(ValueError, match="level 2 has no reduction fraction"):
        DrScheduler(TERM, level_fractions={1: 0.1}).receive(ev("e2", signal="level", value=2), T0)


def test_reduction_waits_for_a_baseline_and_keeps_the_first() -> None:
    s = DrScheduler(TERM)
    run(s, [
        (T0, "rx", ev(signal="reduction_pct", value=10.0),
         [("e1", "received", T0), ("e1", "scheduled", T0)], "-"),
        (T0 + 100, "tick", None, [("e1", "active", T0 + 100)], None),
        (T0 + 101, "tick", 300.0, [], 270.0),
        (T0 + 102, "tick", 250.0, [], 270.0),   # the baseline does not drift
    ])
    assert s.baseline_of("e1") == 300.0


# -- ramp and recovery ----------------------------------------------------------------------
def test_ramp_interpolates_from_baseline_to_full_signal() -> None:
    s = DrScheduler(TERM)
    s.receive(ev(signal="reduction_kw", value=40.0, ramp_s=100.0), T0)
    run(s, [
        (T0 + 100, "tick", 200.0, [("e1", "active", T0 + 100)], 200.0),
        (T0 + 125, "tick", 999.0, [], 190.0),
        (T0 + 150, "tick", 999.0, [], 180.0),
        (T0 + 200, "tick", 999.0, [], 160.0),
        (T0 + 500, "tick", 999.0, [], 160.0),
    ])


def test_target_says_when_the_cap_is_still_falling() -> None:
    s = DrScheduler(TERM)
    s.receive(ev(signal="reduction_kw", value=40.0, ramp_s=100.0), T0)
    got = [s.tick(t, 200.0)[1] for t in (T0 + 100, T0 + 150, T0 + 199, T0 + 200, T0 + 300)]
    assert [g.ramping for g in got if g is not None] == [True, True, True, False, False]
    flat = DrScheduler(TERM)
    flat.receive(ev(signal="reduction_kw", value=40.0), T0)
    target = flat.tick(T0 + 100, 200.0)[1]
    assert target is not None and not target.ramping

def test_cap_ramp_never_tighter_than_the_cap() -> None:
    s = DrScheduler(TERM)
    s.receive(ev(value=150.0, ramp_s=100.0), T0)
    _, low = s.tick(T0 + 100, 120.0)        # baseline already below the cap: the cap at once
    assert cap(low) == 150.0
    s2 = DrScheduler(TERM)
    s2.receive(ev(value=100.0, ramp_s=100.0), T0)
    s2.tick(T0 + 100, 200.0)
    assert cap(s2.tick(T0 + 150, 0.0)[1]) == 150.0


def test_recovery_paces_the_restore_and_never_caps() -> None:
    s = DrScheduler(TERM)
    s.receive(ev(signal="reduction_kw", value=40.0, recovery_s=100.0), T0)
    targets = run(s, [
        (T0 + 100, "tick", 200.0, [("e1", "active", T0 + 100)], 160.0),
        (T0 + 700, "tick", 200.0, [("e1", "completed", T0 + 700)], None),
        (T0 + 750, "tick", 200.0, [], None),
        (T0 + 800, "tick", 200.0, [], None),
    ])
    rec0, rec50, after = targets[1:]
    assert rec0 is not None and rec0.recovering and rec0.cap_kw is None
    assert rec0.restore_ceiling_kw == pytest.approx(160.0)
    assert rec0.restore_kw_per_s == pytest.approx(0.4)
    assert rec0.until == T0 + 800
    assert rec50 is not None and rec50.restore_ceiling_kw == pytest.approx(180.0)
    assert after is None


# -- randomised start -----------------------------------------------------------------------
def test_randomised_start_is_deterministic_and_within_bounds() -> None:
    offsets = [start_offset(f"t-{i:04d}", "e1", 300.0) for i in range(2000)]
    assert all(0.0 <= o < 300.0 for o in offsets)
    assert offsets == [start_offset(f"t-{i:04d}", "e1", 300.0) for i in range(2000)]
    assert 140 < statistics.mean(offsets) < 160 and min(offsets) < 3 and max(offsets) > 297
    assert start_offset(TERM, "e1", 300.0) != start_offset(TERM, "e2", 300.0)
    assert start_offset(TERM, "e1", 0.0) == 0.0


def test_randomised_window_drives_activation_and_end() -> None:
    s = DrScheduler(TERM)
    off = start_offset(TERM, "e1", 300.0)
    assert off > 1.0  # this terminal/event pair draws a real offset
    s.receive(ev(randomize_s=300.0), T0)
    assert s.window("e1") == (T0 + 100 + off, T0 + 700 + off)
    run(s, [
        (T0 + 100, "tick", 150.0, [], None),
        (T0 + 100 + off - 0.5, "tick", 150.0, [], None),
        (T0 + 100 + off, "tick", 150.0, [("e1", "active", T0 + 100 + off)], 100.0),
        (T0 + 701 + off, "tick", 150.0, [("e1", "completed", T0 + 700 + off)], None),
    ])
    # a restart draws the same offset
    again = DrScheduler.from_dict(json.loads(json.dumps(DrScheduler(TERM).to_dict())))
    again.receive(ev(randomize_s=300.0), T0)
    assert again.window("e1") == s.window("e1")


# -- supersede, cancel, opt out, expire -----------------------------------------------------
def test_newer_overlapping_event_supersedes() -> None:
    s = DrScheduler(TERM)
    a = ev("a", start=T0 + 100, duration_s=600, issued_at=T0)
    b = ev("b", start=T0 + 400, duration_s=600, value=80.0, issued_at=T0 + 10)
    c = ev("c", start=T0 + 900, duration_s=60, issued_at=T0 + 5)       # older, overlaps b
    d = ev("d", start=T0 + 1000, duration_s=60, issued_at=T0 + 1)      # touches b's end: no overlap
    run(s, [
        (T0, "rx", a, [("a", "received", T0), ("a", "scheduled", T0)], "-"),
        (T0 + 10, "rx", b, [("b", "received", T0 + 10), ("a", "superseded", T0 + 10),
                            ("b", "scheduled", T0 + 10)], "-"),
        (T0 + 20, "rx", c, [("c", "received", T0 + 20), ("c", "superseded", T0 + 20)], "-"),
        (T0 + 30, "rx", d, [("d", "received", T0 + 30), ("d", "scheduled", T0 + 30)], "-"),
        (T0 + 100, "tick", 150.0, [], None),                  # a never starts
        (T0 + 400, "tick", 150.0, [("b", "active", T0 + 400)], 80.0),
        (T0 + 1000, "tick", 150.0, [("b", "completed", T0 + 1000), ("d", "active", T0 + 1000)],
         100.0),
    ])


def test_equal_issue_time_the_later_received_wins() -> None:
    s = DrScheduler(TERM)
    s.receive(ev("a"), T0)
    got = s.receive(ev("b", value=90.0), T0 + 1)
    assert brief(got) == [("b", "received", T0 + 1), ("a", "superseded", T0 + 1),
                          ("b", "scheduled", T0 + 1)]
    assert got[1].data["by"] == "b"


def test_superseding_an_active_event_keeps_its_baseline() -> None:
    s = DrScheduler(TERM)
    s.receive(ev("a", signal="reduction_kw", value=50.0), T0)
    s.tick(T0 + 100, 200.0)
    mod = ev("a2", start=T0 + 300, signal="reduction_kw", value=80.0, issued_at=T0 + 300)
    run(s, [
        (T0 + 300, "rx", mod, [("a2", "received", T0 + 300), ("a", "superseded", T0 + 300),
                               ("a2", "scheduled", T0 + 300)], "-"),
        # site load is under control now (150 kW): the modification keeps the 200 kW baseline
        (T0 + 301, "tick", 150.0, [("a2", "active", T0 + 301)], 120.0),
    ])
    assert s.baseline_of("a2") == 200.0


def test_superseded_active_event_recovers_until_the_new_one_starts() -> None:
    s = DrScheduler(TERM)
    s.receive(ev("a", signal="reduction_kw", value=50.0, recovery_s=100.0), T0)
    s.tick(T0 + 100, 200.0)
    s.receive(ev("b", start=T0 + 600, duration_s=600, issued_at=T0 + 200), T0 + 200)
    _, target = s.tick(T0 + 250, 180.0)
    assert target is not None and target.recovering and target.event_id == "a"
    assert target.restore_ceiling_kw == pytest.approx(175.0)


def test_cancel_before_start_and_during() -> None:
    s = DrScheduler(TERM)
    s.receive(ev("early"), T0)
    s.receive(ev("late", start=T0 + 1000, recovery_s=60.0), T0)
    targets = run(s, [
        (T0 + 50, "cancel", "early", [("early", "cancelled", T0 + 50)], "-"),
        (T0 + 100, "tick", 150.0, [], None),
        (T0 + 1000, "tick", 150.0, [("late", "active", T0 + 1000)], 100.0),
        (T0 + 1100, "cancel", "late", [("late", "cancelled", T0 + 1100)], "-"),
        (T0 + 1100, "tick", 150.0, [], None),
        (T0 + 1130, "cancel", "late", [], "-"),          # already final: nothing
        (T0 + 1160, "tick", 150.0, [], None),
    ])
    assert targets[2] is not None and targets[2].recovering
    assert targets[2].restore_ceiling_kw == pytest.approx(100.0)
    assert targets[3] is None
    with pytest.raises(KeyError, match="no DR event 'ghost'"):
        s.cancel("ghost", T0 + 1200)


def test_cancel_during_ramp_recovers_from_the_ramped_cap() -> None:
    s = DrScheduler(TERM)
    s.receive(ev(value=100.0, ramp_s=100.0, recovery_s=100.0), T0)
    s.tick(T0 + 100, 200.0)
    s.cancel("e1", T0 + 150)                    # cap was 150 kW
    _, target = s.tick(T0 + 150, 200.0)
    assert target is not None and target.restore_ceiling_kw == pytest.approx(150.0)
    assert target.restore_kw_per_s == pytest.approx(0.5)


def test_opt_out_restores_at_once() -> None:
    s = DrScheduler(TERM)
    s.receive(ev("a", recovery_s=300.0), T0)
    s.receive(ev("b", start=T0 + 2000, issued_at=T0 + 1), T0)
    run(s, [
        (T0 + 100, "tick", 150.0, [("a", "active", T0 + 100)], 100.0),
        (T0 + 200, "opt_out", "a", [("a", "opted_out", T0 + 200)], "-"),
        (T0 + 200, "tick", 150.0, [], None),       # no recovery pacing: the customer wants them
        (T0 + 300, "opt_out", "b", [("b", "opted_out", T0 + 300)], "-"),   # ahead of its start
        (T0 + 2000, "tick", 150.0, [], None),
    ])
    assert s.opt_out("a", T0 + 400, "again") == []
    with pytest.raises(ValueError, match="reason"):
        s.opt_out("a", T0 + 400, "")


@pytest.mark.parametrize(("event", "now", "why"), [
    (ev(start=T0, duration_s=600), T0 + 600, "window ended"),
    (ev(start=T0, duration_s=600), T0 + 5000, "window ended"),
    (ev(start=T0 + 100, expires_at=T0 + 50), T0 + 60, "expires_at"),
])
def test_expired_at_receipt(event: DrEvent, now: float, why: str) -> None:
    s = DrScheduler(TERM)
    got = s.receive(event, now)
    assert brief(got) == [("e1", "received", now), ("e1", "expired", now)]
    assert why in got[1].detail
    assert s.tick(now + 1, 100.0) == ([], None)


def test_received_after_start_starts_at_the_next_cycle() -> None:
    s = DrScheduler(TERM)
    got = s.receive(ev(start=T0, duration_s=600), T0 + 200)
    assert brief(got) == [("e1", "received", T0 + 200), ("e1", "scheduled", T0 + 200)]
    assert "start passed 200 s ago" in got[1].detail
    (act,), target = s.tick(T0 + 201, 150.0)
    assert (act.state, act.at, cap(target)) == ("active", T0 + 201, 100.0)
    assert "201.0 s after the start" in act.detail


def test_repeated_delivery_is_ignored_and_a_reused_id_refused() -> None:
    s = DrScheduler(TERM)
    s.receive(ev(), T0)
    assert s.receive(ev(), T0 + 1) == []
    with pytest.raises(ValueError, match="already received with other content"):
        s.receive(ev(value=50.0), T0 + 2)


# -- ends on time while nothing ticks ------------------------------------------------------
def test_event_ending_while_ticks_stop_completes_at_its_end() -> None:
    s = DrScheduler(TERM)
    s.receive(ev("a", recovery_s=100.0), T0)
    s.receive(ev("b", start=T0 + 800, duration_s=100, issued_at=T0 + 1), T0)
    run(s, [
        (T0 + 100, "tick", 150.0, [("a", "active", T0 + 100)], 100.0),
        # nothing ticks (agent busy, platform unreachable) until long after both ends:
        # a completed at its end; b's whole window passed unattended: expired at its end
        (T0 + 5000, "tick", 150.0, [("a", "completed", T0 + 700), ("b", "expired", T0 + 900)],
         None),
    ])


def test_late_tick_inside_recovery_gets_the_paced_ceiling() -> None:
    s = DrScheduler(TERM)
    s.receive(ev(signal="reduction_kw", value=100.0, recovery_s=1000.0), T0)
    s.tick(T0 + 100, 200.0)
    got, target = s.tick(T0 + 1200, 200.0)
    assert brief(got) == [("e1", "completed", T0 + 700)]
    assert target is not None and target.cap_kw is None
    assert target.restore_ceiling_kw == pytest.approx(150.0)


def test_other_calls_report_ends_that_passed_first() -> None:
    s = DrScheduler(TERM)
    s.receive(ev("a"), T0)
    s.tick(T0 + 100, 150.0)
    got = s.receive(ev("b", start=T0 + 2000, issued_at=T0 + 900), T0 + 900)
    assert brief(got) == [("a", "completed", T0 + 700), ("b", "received", T0 + 900),
                          ("b", "scheduled", T0 + 900)]


# -- persistence ----------------------------------------------------------------------------
def test_persistence_round_trip_mid_event() -> None:
    live = DrScheduler(TERM, level_fractions={1: 0.25, 2: 0.5, 3: 0.75})
    live.receive(ev("a", signal="level", value=2, randomize_s=120.0, ramp_s=60.0, recovery_s=60.0),
                 T0)
    live.receive(ev("b", start=T0 + 5000, issued_at=T0 + 1), T0)
    live.tick(T0 + 300, 400.0)
    saved = json.loads(json.dumps(live.to_dict()))

    restarted = DrScheduler.from_dict(saved)   # default level fractions: stored ones still apply
    assert restarted.to_dict() == live.to_dict()
    assert restarted.window("a") == live.window("a")
    for now in (T0 + 301, T0 + 650, T0 + 700 + 130, T0 + 5000, T0 + 6000):
        assert restarted.tick(now, 10.0) == live.tick(now, 10.0)
    assert restarted.state_of("a") == "completed" and restarted.state_of("b") == "completed"


def test_restart_after_the_end_reports_completed_at_the_end() -> None:
    s = DrScheduler(TERM)
    s.receive(ev(), T0)
    s.tick(T0 + 200, 150.0)
    saved = json.dumps(s.to_dict())
    back = DrScheduler.from_dict(json.loads(saved))   # the terminal was down from +200 s
    got, target = back.tick(T0 + 3600, 150.0)
    assert brief(got) == [("e1", "completed", T0 + 700)] and target is None


@pytest.mark.parametrize("data", [{}, {"v": 2}, {"v": 1, "terminal_id": "x"},
                                  {"v": 1, "terminal_id": "x", "seq": 1, "events": [{"id": "a"}]}])
def test_from_dict_refuses_malformed_state(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="DR state"):
        DrScheduler.from_dict(data)


def test_final_events_are_forgotten_after_keep_final_s() -> None:
    s = DrScheduler(TERM, keep_final_s=3600.0)
    s.receive(ev(), T0)
    s.tick(T0 + 100, 150.0)
    s.tick(T0 + 700 + 3600, 150.0)
    assert s.state_of("e1") == "completed"
    s.tick(T0 + 700 + 3601, 150.0)
    assert s.state_of("e1") is None and s.to_dict()["events"] == []


# -- invalid input --------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"duration_s": -5.0}, "duration_s must be > 0"),
    ({"duration_s": 0.0}, "duration_s must be > 0"),
    ({"signal": "watts"}, "unknown signal 'watts'"),
    ({"signal": "cap_kw", "value": 0.0}, "cap_kw must be > 0"),
    ({"signal": "cap_kw", "value": -10.0}, "cap_kw must be > 0"),
    ({"signal": "reduction_pct", "value": 101.0}, r"reduction_pct must be in \(0, 100\]"),
    ({"signal": "reduction_pct", "value": 0.0}, r"reduction_pct must be in \(0, 100\]"),
    ({"signal": "reduction_kw", "value": -1.0}, "reduction_kw must be > 0"),
    ({"signal": "level", "value": 4}, "level must be 0, 1, 2 or 3"),
    ({"signal": "level", "value": 1.5}, "level must be 0, 1, 2 or 3"),
    ({"randomize_s": -1.0}, "randomize_s must be ≥ 0"),
    ({"ramp_s": -1.0}, "ramp_s must be ≥ 0"),
    ({"recovery_s": -1.0}, "recovery_s must be ≥ 0"),
    ({"ramp_s": 700.0}, "ramp_s .* is longer than duration_s"),
    ({"start": float("nan")}, "start must be finite"),
    ({"value": "lots"}, "value must be a number"),
    ({"id": ""}, "id must be a non-empty string"),
])
def test_invalid_events_are_refused_clearly(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ev(**kwargs)


@pytest.mark.parametrize(("levels", "message"), [
    ({4: 0.5}, "level must be 1, 2 or 3"),
    ({1: 0.0}, r"fraction must be in \(0, 1\]"),
    ({1: 1.5}, r"fraction must be in \(0, 1\]"),
])
def test_invalid_level_fractions(levels: dict[int, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DrScheduler(TERM, level_fractions=levels)


def test_invalid_times_are_refused() -> None:
    s = DrScheduler(TERM)
    with pytest.raises(ValueError, match="now must be finite"):
        s.tick(float("inf"), 1.0)
    with pytest.raises(ValueError, match="baseline_kw must be finite"):
        s.tick(T0, float("nan"))


# -- baselines ------------------------------------------------------------------------------
def test_baseline_before_is_the_mean_of_the_window() -> None:
    times = [T0 + i * 60 for i in range(30)]          # one sample a minute for 30 min
    kw = [100.0] * 15 + [200.0] * 15
    assert baseline_before(times, kw, T0 + 1800) == 200.0          # last 15 min
    assert baseline_before(times, kw, T0 + 1200) == pytest.approx((10 * 100 + 5 * 200) / 15)
    assert baseline_before(times, kw, T0 + 1800, window_s=1800) == 150.0
    assert baseline_before(times, kw, T0) is None
    with pytest.raises(ValueError, match="2 times but 1 values"):
        baseline_before([1.0, 2.0], [1.0], 3.0)


def test_like_days_baseline_with_day_of_adjustment() -> None:
    days = [[100.0] * 96 for _ in range(12)]
    days[0] = [999.0] * 96            # older than the last 10: left out
    days[-1][40] = 120.0
    event = range(40, 44)
    plain = like_days_baseline(days, event)
    assert plain.factor == 1.0 and plain.kw[0] == pytest.approx(102.0) and plain.kw[1] == 100.0
    today = [110.0] * 96
    adj = like_days_baseline(days, event, today=today, adjust_intervals=range(32, 40))
    assert adj.factor == pytest.approx(1.1)
    assert adj.kw[1] == pytest.approx(110.0) and adj.unadjusted_kw == plain.kw
    hot = like_days_baseline(days, event, today=[300.0] * 96, adjust_intervals=range(32, 40))
    cold = like_days_baseline(days, event, today=[10.0] * 96, adjust_intervals=range(32, 40))
    assert (hot.factor, cold.factor) == (1.2, 0.8)
    jiangsu = like_days_baseline(days, event, n_days=5)        # last 5 working days, no adjustment
    assert jiangsu.kw[0] == pytest.approx(104.0)
    with pytest.raises(ValueError, match="fewer than 44 intervals"):
        like_days_baseline([[1.0] * 10], event)
    with pytest.raises(ValueError, match="no past days"):
        like_days_baseline([], event)


def test_delivered_reduction() -> None:
    # baseline 200 kW for 1 h = 200 kWh; metered 150 kWh → 50 kW delivered
    assert delivered_reduction_kw(200.0, 150.0, 3600.0) == pytest.approx(50.0)
    assert delivered_reduction_kw(50.0, 40.0, 900.0) == pytest.approx(40.0)
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        delivered_reduction_kw(1.0, 1.0, 0.0)
