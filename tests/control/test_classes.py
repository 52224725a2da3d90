"""Load classes in the cap controller: adjustable setpoints, per-load minimum on/off times,
the maximum off time and rotation. Cycle tables: a small plant (base load + the loads as
switched) is run through :func:`decide_cap` cycle by cycle, and each cycle's actions and
site power are compared with the expected row."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lmt.control import CapParams, Decision, LoadSpec, LoadState, decide_cap, decide_release

P0 = CapParams(cap_kw=100.0, margin_kw=0.0, hysteresis_kw=0.0, min_off_s=0.0, min_on_s=0.0)


@dataclass
class Plant:
    """Site power = base + each on/off load that is on + each adjustable load at its setpoint."""

    base_kw: float
    loads: list[LoadSpec]
    states: list[LoadState]

    def site_kw(self) -> float:
        kw = self.base_kw
        for ld, st in zip(self.loads, self.states, strict=True):
            if ld.adjustable:
                kw += ld.rated_kw * st.setpoint_pct / 100.0
            elif st.is_on:
                kw += ld.rated_kw
        return kw

    def apply(self, dec: Decision, now: float) -> list[str]:
        """Carry out a decision the way the agent does; returns ``["-a", "b=35.0", "+c"]``."""
        out = []
        for i, kind, pct, _why in dec.steps():
            ld, st = self.loads[i], self.states[i]
            st.last_switch_s = now
            if kind == "shed":
                st.is_on, st.shed_by_us = False, True
                out.append(f"-{ld.name}")
            elif kind == "restore":
                st.is_on, st.shed_by_us = True, False
                out.append(f"+{ld.name}")
            else:
                assert pct is not None
                if not st.shed_by_us:
                    st.restore_pct = st.setpoint_pct
                st.setpoint_pct = pct
                st.shed_by_us = pct < st.restore_pct
                out.append(f"{ld.name}={pct:.1f}")
        return out

    def run(self, table: list[tuple[float, float, list[str], float]],
            params: CapParams = P0) -> None:
        """Rows ``(time s, base kW, expected actions, expected site kW after)``."""
        for now, base, want, want_kw in table:
            self.base_kw = base
            dec = decide_cap(self.site_kw(), now, self.loads, self.states, params)
            got = self.apply(dec, now)
            assert got == want, (now, dec.reasons)
            assert self.site_kw() == pytest.approx(want_kw, abs=0.05), (now, dec.reasons)


def plant(base: float, *loads: LoadSpec) -> Plant:
    return Plant(base, list(loads), [LoadState(is_on=True) for _ in loads])


def test_adjustable_load_is_lowered_just_enough_and_raised_back() -> None:
    ev = LoadSpec("ev", 20.0, 5, kind="adjustable", min_pct=10.0)
    p = plant(0.0, ev)
    p.run([
        (0, 85.0, ["ev=75.0"], 100.0),     # 5 kW over: 25 % of 20 kW, no overshoot
        (1, 85.0, [], 100.0),              # at the cap: hold
        (2, 92.0, ["ev=40.0"], 100.0),     # 7 kW more
        (3, 110.0, ["ev=10.0"], 112.0),    # not coverable: down to its floor, not below
        (4, 90.0, ["ev=50.0"], 100.0),     # headroom 8 kW: part of the way back (+40 %)
        (5, 70.0, ["ev=100.0"], 90.0),     # everything fits: back to where it was
        (6, 70.0, [], 90.0),
    ])
    assert not p.states[0].shed_by_us


def test_adjustable_absorbs_the_overshoot_of_a_mixed_selection() -> None:
    pump = LoadSpec("pump", 10.0, 10)
    ev = LoadSpec("ev", 20.0, 5, kind="adjustable")
    heater = LoadSpec("heater", 30.0, 1)
    p = plant(60.0, pump, ev, heater)  # 120 kW
    # 20 over: cheapest cover is the heater (cost 1, 10 kW over) ...
    p.run([(0, 60.0, ["-heater"], 90.0)])
    # ... then 35 over with only pump (10) and ev (20) left: best effort, both all the way
    p.run([(1, 105.0, ["-pump", "ev=0.0"], 105.0)])


def test_adjustable_and_interruptible_least_cost_then_trim() -> None:
    ev = LoadSpec("ev", 20.0, 5, kind="adjustable")
    pump = LoadSpec("pump", 10.0, 10)
    p = plant(80.0, ev, pump)  # 110
    # need 10: the ev alone (cost 5) covers it; it goes to 50 % and the site lands on the cap
    p.run([(0, 80.0, ["ev=50.0"], 100.0)])
    dec = decide_cap(115.0, 1.0, p.loads, p.states, P0)  # need 15, ev has 10 left: ev + pump
    assert dec.shed == (1,) and dec.setpoints == ((0, 25.0),), dec.reasons
    assert "overshoot 0.0 kW" in dec.reasons[0]


def test_per_load_minimum_on_and_off_times() -> None:
    slow = LoadSpec("slow", 10.0, 1, min_on_s=60.0, min_off_s=120.0)
    fast = LoadSpec("fast", 10.0, 2)
    p = plant(85.0, slow, fast)
    p.states[0].last_switch_s = 0.0  # slow was switched on at t=0
    p.run([
        (10, 85.0, ["-fast"], 95.0),  # slow is cheaper but on for 10 s < 60 s: fast goes
        (20, 80.0, ["+fast"], 100.0),  # room again; fast has no minimum off (P0: 0)
        (70, 85.0, ["-slow"], 95.0),  # now slow may go
        (100, 70.0, [], 80.0),  # room, but slow is off 30 s < 120 s
        (190, 70.0, ["+slow"], 90.0),
    ])


def test_rotation_swaps_deferrable_loads_at_their_maximum_off_time() -> None:
    a = LoadSpec("boiler-a", 10.0, 1, kind="deferrable", max_off_s=60.0, min_on_s=30.0)
    b = LoadSpec("boiler-b", 10.0, 2, kind="deferrable", max_off_s=60.0, min_on_s=30.0)
    p = plant(85.0, a, b)  # 105: one boiler must be off
    p.run([
        (0, 85.0, ["-boiler-a"], 95.0),
        (30, 85.0, [], 95.0),
        (60, 85.0, ["-boiler-b", "+boiler-a"], 95.0),  # a's 60 s are up: b in its place
        (90, 85.0, [], 95.0),
        (120, 85.0, ["-boiler-a", "+boiler-b"], 95.0),  # and back: a round robin
        (180, 85.0, ["-boiler-b", "+boiler-a"], 95.0),
    ])


def test_rotation_without_a_replacement_still_restores() -> None:
    a = LoadSpec("boiler", 10.0, 1, kind="deferrable", max_off_s=60.0, min_on_s=300.0)
    critical = LoadSpec("server", 50.0, 100, kind="critical")
    p = plant(45.0, a, critical)
    p.run([(0, 45.0, ["-boiler"], 95.0)])
    dec = decide_cap(p.site_kw(), 60.0, p.loads, p.states, P0)
    assert dec.restore == (0,) and not dec.shed and dec.method == "rotation"
    assert "no other load can take its place" in dec.reasons[-1]


def test_a_failing_load_is_not_rotated() -> None:
    a = LoadSpec("boiler-a", 10.0, 1, kind="deferrable", max_off_s=60.0)
    b = LoadSpec("boiler-b", 10.0, 2, kind="deferrable", max_off_s=60.0)
    p = plant(85.0, a, b)
    p.run([(0, 85.0, ["-boiler-a"], 95.0)])
    p.states[0].available = False  # its relay failed: no swap that could not finish
    p.run([(60, 85.0, [], 95.0)])
    p.states[0].available = True
    p.run([(61, 85.0, ["-boiler-b", "+boiler-a"], 95.0)])


def test_rotation_needs_no_replacement_when_there_is_room() -> None:
    a = LoadSpec("boiler", 10.0, 1, kind="deferrable", max_off_s=60.0)
    b = LoadSpec("pump", 10.0, 2)
    p = plant(85.0, a, b)
    p.run([(0, 85.0, ["-boiler"], 95.0), (60, 70.0, ["+boiler"], 90.0)])
    # an interruptible load without max_off_s stays off as long as the cap needs it
    p2 = plant(85.0, LoadSpec("pump", 10.0, 1), LoadSpec("fan", 10.0, 2))
    p2.run([(0, 85.0, ["-pump"], 95.0), (10_000, 85.0, [], 95.0)])


def test_release_takes_adjustable_loads_back_to_their_former_setpoint() -> None:
    ev = LoadSpec("ev", 20.0, 5, kind="adjustable")
    pump = LoadSpec("pump", 10.0, 10)
    p = plant(90.0, ev, pump)
    p.states[0].setpoint_pct = 80.0  # the charger ran at 80 % before the cap
    p.run([(0, 80.0, ["ev=50.0"], 100.0)])  # 106 kW: 6 kW off the charger (30 %)
    assert p.states[0].restore_pct == 80.0
    dec = decide_release(p.loads, p.states)
    assert dec.setpoints == ((0, 80.0),) and dec.method == "release"
    assert "back to 80.0 %" in dec.reasons[0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "boost"}, "kind must be one of"),
    ({"kind": "deferrable"}, "needs max_off_s"),
    ({"kind": "adjustable", "critical": True}, "critical=True"),
    ({"min_on_s": -1.0}, "min_on_s"),
    ({"max_off_s": float("inf")}, "max_off_s"),
    ({"kind": "adjustable", "min_pct": 100.0}, "min_pct"),
])
def test_load_spec_is_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoadSpec("x", 1.0, 1, **kwargs)


def test_critical_flag_and_kind_agree() -> None:
    assert LoadSpec("x", 1.0, 1, critical=True).kind == "critical"
    assert LoadSpec("x", 1.0, 1, kind="critical").critical
    dec = decide_cap(200.0, 0.0, [LoadSpec("x", 1.0, 1, kind="critical")],
                     [LoadState(is_on=True)], P0)
    assert dec == Decision((), (), ())


def test_an_adjustable_load_not_read_yet_is_left_alone() -> None:
    ev = LoadSpec("ev", 20.0, 1, kind="adjustable")
    pump = LoadSpec("pump", 10.0, 10)
    states = [LoadState(is_on=True, setpoint_pct=float("nan")), LoadState(is_on=True)]
    dec = decide_cap(105.0, 0.0, [ev, pump], states, P0)
    assert dec.shed == (1,) and not dec.setpoints  # the pump, though the charger is cheaper
    # held from before a restart, not read since: the release still takes it back
    states[0].shed_by_us, states[0].restore_pct = True, 80.0
    assert decide_cap(50.0, 0.0, [ev, pump], states, P0).setpoints == ()
    assert decide_release([ev, pump], states).setpoints == ((0, 80.0),)
