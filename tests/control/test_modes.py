"""Terminal control modes, as cycle tables.

Each table steps a small site through local time (2025-03-03 is a Monday; rows say "HH:MM",
"+N HH:MM" for N days later, or a full "YYYY-MM-DD HH:MM"). A row gives the site's *load* —
what it would draw with every round closed, carried forward until a row changes it — and the
harness subtracts the kW of the rounds the previous cycle left tripped, so the power each cycle
sees follows the machine's own decisions. ``ev`` is the exact list of decisions of that cycle
("kind mode round"), "" = none; ``off`` the rounds wanted tripped after it; ``alarm`` the rounds
with their alarm on; ``mode``/``sp`` the running power control and its setpoint. Between every
two cycles the state goes through JSON and back, so each table also proves that a restart from
the persisted state changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from lmt.control.modes import (
    CycleInputs,
    CycleOutputs,
    EnergyParams,
    FloatDownParams,
    GuaranteeParams,
    ModeDecision,
    ModeParams,
    ModeState,
    MonthlyParams,
    PeriodParams,
    PowerParams,
    PurchaseParams,
    RemoteOrder,
    RestDayParams,
    SuspensionParams,
    accepts_group_command,
    local_time,
    step,
)

MONDAY = date(2025, 3, 3)
ROUNDS: dict[int, float | None] = {1: 20.0, 2: 30.0, 3: 40.0}
ANY: Any = ...  # "don't check"


def when(text: str) -> tuple[float, date, int]:
    """'10:05', '10:05:30', '+1 10:05' (a day later), '2025-04-01 00:00' -> (unix s, date, minute)."""
    day, clock = MONDAY, text
    if " " in text:
        head, clock = text.split()
        day = MONDAY + timedelta(days=int(head)) if head.startswith("+") else date.fromisoformat(head)
    h, m, *s = (int(x) for x in clock.split(":"))
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    return midnight + h * 3600 + m * 60 + (s[0] if s else 0), day, h * 60 + m


def at(text: str) -> float:
    return when(text)[0]


@dataclass
class C:
    """One cycle of a table and what it must produce."""

    at: str
    load: float | None = None  # kW with every round closed; carried forward
    ev: str = ""
    off: str | None = None
    alarm: str | None = None
    kwh: float | None = None  # cumulative import; carried forward
    yuan: float | None = None  # the running cost of the import; carried forward
    contact: float | None = 0.0
    params: ModeParams | None = None  # new parameters from this cycle on
    mode: Any = ANY
    sp: Any = ANY
    guarantee: str | None = None
    fresh: bool = True  # False: no power reading this cycle


def fmt(decisions: tuple[ModeDecision, ...]) -> str:
    return "; ".join(f"{d.kind} {d.mode}" + ("" if d.round is None else f" {d.round}") for d in decisions)


def rounds_text(rounds: tuple[int, ...]) -> str:
    return " ".join(map(str, rounds))


def run(params: ModeParams, rows: list[C], state: ModeState | None = None,
        rounds: dict[int, float | None] = ROUNDS) -> tuple[ModeState, list[CycleOutputs]]:
    load = kwh = yuan = None
    tripped = tuple(state.tripped) if state is not None else ()
    outs = []
    for i, row in enumerate(rows):
        params = row.params or params
        load = row.load if row.load is not None else load
        kwh = row.kwh if row.kwh is not None else kwh
        yuan = row.yuan if row.yuan is not None else yuan
        now, day, minute = when(row.at)
        assert local_time(now, 0) == (day, minute)
        site = None
        if load is not None and row.fresh:
            site = load - sum(rounds.get(r) or 0.0 for r in tripped)
        inputs = CycleInputs(now, day, minute, site, kwh, row.contact, rounds, spent_yuan=yuan)
        before = state.to_dict() if state is not None else None
        new_state, out = step(params, state, inputs)
        assert state is None or state.to_dict() == before, "step mutated its state argument"
        where = f"cycle {i} at {row.at}"
        got = fmt(out.decisions)
        assert got == row.ev, f"{where}: decisions {got!r}, expected {row.ev!r}"
        if row.off is not None:
            assert rounds_text(out.tripped) == row.off, f"{where}: tripped {out.tripped}, not {row.off!r}"
        if row.alarm is not None:
            assert rounds_text(out.alarms) == row.alarm, f"{where}: alarms {out.alarms}, not {row.alarm!r}"
        if row.mode is not ANY:
            assert out.power_mode == row.mode, f"{where}: power mode {out.power_mode!r}, not {row.mode!r}"
        if row.sp is not ANY:
            assert out.setpoint_kw == pytest.approx(row.sp), f"{where}: setpoint {out.setpoint_kw}"
        if row.guarantee is not None:
            assert out.guarantee == row.guarantee, f"{where}: guarantee {out.guarantee!r}"
        for d in out.decisions:
            assert d.power_kw == site and d.reason, f"{where}: {d}"
        tripped = out.tripped
        outs.append(out)
        # every cycle is a restart: the next one starts from the persisted JSON
        state = ModeState.from_dict(json.loads(json.dumps(new_state.to_dict())))
    assert state is not None
    return state, outs


def minutes(start: str, end: str, **kw: Any) -> list[C]:
    """One quiet cycle a minute from ``start`` to ``end`` (both included, same day)."""
    t0, t1 = at(start), at(end)
    prefix = start.split()[0] + " " if " " in start else ""
    rows = []
    t = t0
    while t <= t1:
        clock = datetime.fromtimestamp(t, tz=UTC).strftime("%H:%M")
        rows.append(C(prefix + clock, **kw))
        t += 60
    return rows


# ---------------------------------------------------------------------------------------------
# Remote trip / allow close


def test_remote_trip_alarm_delay_then_limit_time() -> None:
    params = ModeParams(remote=(RemoteOrder(2, "trip", at("10:00"), alarm_delay_min=2, limit_half_hours=1),))
    run(params, [
        C("09:59", load=100, off=""),
        C("10:00", ev="alarm remote 2", off="", alarm="2"),   # the order: alarm for 2 min
        C("10:01", off="", alarm="2"),
        C("10:02", ev="trip remote 2", off="2", alarm=""),    # then the trip
        C("10:31", off="2"),                                  # limit: half an hour from the trip
        C("10:32", ev="restore remote 2", off=""),
        C("11:00", off=""),                                   # done: never again for this order
    ])


def test_remote_trip_until_allowed_to_close() -> None:
    trip = ModeParams(remote=(RemoteOrder(1, "trip", at("10:00")),))
    close = ModeParams(remote=(RemoteOrder(1, "close", at("12:00")),))
    run(trip, [
        C("10:00", load=100, ev="trip remote 1", off="1"),     # delay 0: at once
        C("11:59", off="1"),                                   # limit 0: until released
        C("12:00", params=close, ev="restore remote 1", off=""),
        C("12:01", off=""),
    ])


def test_remote_order_withdrawn_and_unknown_round() -> None:
    trip = ModeParams(remote=(RemoteOrder(1, "trip", at("10:00"), alarm_delay_min=5),
                              RemoteOrder(5, "trip", at("10:00"))))
    run(trip, [
        C("10:00", load=100, ev="alarm remote 1; ignored remote 5", alarm="1"),
        C("10:01", params=ModeParams(), ev="alarm_off remote 1", alarm="", off=""),
        C("10:05", off=""),
    ])


def test_several_remote_rounds_each_on_its_own_delay() -> None:
    params = ModeParams(remote=(
        RemoteOrder(1, "trip", at("10:00"), alarm_delay_min=1),
        RemoteOrder(3, "trip", at("10:00"), alarm_delay_min=15, limit_half_hours=1),
    ))
    run(params, [
        C("10:00", load=100, ev="alarm remote 1; alarm remote 3", alarm="1 3"),
        C("10:01", ev="trip remote 1", off="1", alarm="3"),
        C("10:14", off="1", alarm="3"),
        C("10:15", ev="trip remote 3", off="1 3", alarm=""),
        C("10:45", ev="restore remote 3", off="1"),
    ])


# ---------------------------------------------------------------------------------------------
# Period power control

PERIOD = ModeParams(
    power=PowerParams(rounds=(1, 2, 3), slide_min=2, alarm_min=(1, 2, 0)),
    period=PeriodParams(enabled=True, periods=((480, 720), (720, 1080)),
                        schemes=((100.0, 150.0), (80.0, None)), scheme=1, periods_on=(1, 2)),
)

PERIOD_ROWS = [
    C("07:58", load=130, mode=None, sp=None),
    C("08:00", mode="period", sp=100.0),             # switch-on: wait one slide window (2 min)
    C("08:01"),
    C("08:02", ev="alarm period 1", alarm="1"),      # window 130 > 100: alarm round 1 (1 min)
    C("08:03", ev="trip period 1", off="1", alarm=""),
    C("08:04"),                                      # re-measure: no full minute since the trip
    C("08:05", ev="alarm period 2", alarm="2"),      # 110 > 100: alarm round 2 (2 min)
    C("08:06", alarm="2"),
    C("08:07", ev="trip period 2", off="1 2"),
    C("08:08"),
    C("08:09", off="1 2"),                           # 80: 80 + 20 is not under 100, stay off
    C("11:59", off="1 2"),
    C("12:00", ev="restore period 2", off="1", sp=150.0),  # new period: reset, staggered restore
    C("12:01", ev="restore period 1", off=""),
    C("12:02", off=""),
]


def test_period_control_trips_round_by_round_and_resets_at_a_new_period() -> None:
    run(PERIOD, PERIOD_ROWS)


def test_period_control_scheme_mask_and_float_coefficient() -> None:
    scheme2 = replace(PERIOD, period=replace(PERIOD.period, scheme=2, float_pct=-10.0))
    only2 = replace(PERIOD, period=replace(PERIOD.period, periods_on=(2,)))
    run(scheme2, [
        C("09:00", load=50, mode="period", sp=72.0),  # scheme 2, period 1: 80 kW - 10 %
        C("13:00", mode=None, sp=None),               # scheme 2 does not control period 2
    ])
    run(only2, [
        C("09:00", load=50, mode=None),               # period 1 is not in the mask
        C("13:00", mode="period", sp=150.0),
    ])


def test_alarm_is_withdrawn_when_power_falls_before_the_trip() -> None:
    params = replace(PERIOD, power=PowerParams(rounds=(1, 2, 3), slide_min=2, alarm_min=(5,)))
    run(params, [
        C("08:00", load=130),
        C("08:01"),
        C("08:02", ev="alarm period 1", alarm="1"),
        C("08:03", load=90, alarm="1"),               # window 08:01-08:02 still 130
        C("08:04", alarm="1"),                        # (130 + 90) / 2 = 110: still over
        C("08:05", ev="alarm_off period 1", alarm="", off=""),  # 90 <= 100
        C("08:10", off=""),
    ])


def test_period_control_resets_at_a_day_change() -> None:
    params = ModeParams(
        power=PowerParams(rounds=(1, 2, 3), slide_min=1),
        period=PeriodParams(enabled=True, periods=((0, 1440),), schemes=((100.0,),), periods_on=(1,)),
        restore_interval_s=60,
    )
    run(params, [
        C("23:50", load=130, mode="period", sp=100.0),
        C("23:51"),                                   # no full minute since switch-on yet
        C("23:52", ev="trip period 1", off="1"),      # alarm time 0: trip at once
        C("23:53"),
        C("23:54", ev="trip period 2", off="1 2"),    # 110 > 100
        C("23:55"),
        C("23:56", off="1 2"),                        # 80
        C("+1 00:00", load=90, ev="restore period 2", off="1"),  # new day: reset; 40 + 30 < 100
        C("+1 00:01", ev="restore period 1", off=""),            # 70 + 20 < 100
    ])


def test_power_control_trips_only_its_rounds_lowest_first() -> None:
    params = replace(PERIOD, power=PowerParams(rounds=(3, 2), slide_min=2))
    run(params, [
        C("08:00", load=200),
        C("08:01"),
        C("08:02", ev="trip period 2", off="2"),
        C("08:03"),
        C("08:04", ev="trip period 3", off="2 3"),
        C("08:05"),
        C("08:06", off="2 3"),                        # 130 > 100 but no round left to trip
    ])


def test_no_power_reading_holds_everything() -> None:
    run(PERIOD, [
        C("08:00", load=130),
        C("08:01"),
        C("08:02", ev="alarm period 1", alarm="1"),
        C("08:03", fresh=False, ev="trip period 1", off="1"),  # the window still holds 08:01-08:02
        C("08:04", fresh=False),
        C("08:05", fresh=False, off="1"),             # nothing measured since the trip: wait
        C("08:06", off="1"),
        C("08:07", ev="alarm period 2"),
    ])


# ---------------------------------------------------------------------------------------------
# Rest day, business suspension, float-down, protection floor, and who runs


def test_rest_day_control_on_its_weekdays_and_hours() -> None:
    params = ModeParams(power=PowerParams(slide_min=1), rest_day=RestDayParams(
        enabled=True, setpoint_kw=70.0, start_min=8 * 60, duration_half_hours=4, weekdays=(6, 7)))
    run(params, [
        C("+5 07:59", load=100, mode=None),           # Saturday, before the start
        C("+5 08:00", mode="rest_day", sp=70.0),
        C("+5 08:01"),
        C("+5 08:02", ev="trip rest_day 1", off="1"),
        C("+5 08:03"),
        C("+5 08:04", ev="trip rest_day 2", off="1 2"),  # 80 > 70
        C("+5 08:05"),
        C("+5 08:06", off="1 2"),                     # 50
        C("+5 10:00", ev="restore rest_day 2", off="1", mode=None),  # two hours over
        C("+5 10:01", ev="restore rest_day 1", off=""),
        C("+7 09:00", mode=None),                     # Monday: not a rest day
    ])


def test_business_suspension_between_its_dates() -> None:
    params = ModeParams(power=PowerParams(slide_min=1), suspension=SuspensionParams(
        enabled=True, start=date(2025, 3, 4), end=date(2025, 3, 5), setpoint_kw=90.0))
    run(params, [
        C("23:59", load=100, mode=None),
        C("+1 00:00", mode="suspension", sp=90.0),
        C("+1 00:01"),
        C("+1 00:02", ev="trip suspension 1", off="1"),
        C("+2 23:59", off="1"),                       # the end date is included
        C("+3 00:00", ev="restore suspension 1", off="", mode=None),
    ])


FLOAT = ModeParams(
    power=PowerParams(rounds=(1, 2, 3), slide_min=1),
    float_down=FloatDownParams(enabled=True, issued_s=at("10:00"), window_min=3, k_pct=-20.0,
                               control_half_hours=2),
)


def test_float_down_setpoint_from_the_window_before_switch_on() -> None:
    run(FLOAT, [
        C("09:56", load=120, mode=None),
        C("09:57", load=90),
        C("09:58", load=100),
        C("09:59", load=110),                         # the 3-minute window: mean 100
        C("10:00", mode="float_down", sp=80.0),       # 100 x (100 - 20) / 100
        C("10:01"),                                   # one slide window after switch-on
        C("10:02", ev="trip float_down 1", off="1"),  # 110 > 80
        C("10:03"),
        C("10:04", ev="trip float_down 2", off="1 2"),  # 90 > 80
        C("10:05"),
        C("10:06", off="1 2"),                        # 60: 60 + 20 is not under 80
        C("10:59", off="1 2", mode="float_down"),
        C("11:00", ev="restore float_down 2", off="1", mode=None, sp=None),  # control time over
        C("11:01", ev="restore float_down 1", off=""),
    ])


def test_float_down_freeze_delay_and_a_terminal_without_history() -> None:
    delayed = replace(FLOAT, float_down=replace(FLOAT.float_down, window_min=2, k_pct=10.0,
                                                freeze_delay_min=3))
    run(delayed, [
        C("10:00", load=50, mode="float_down", sp=None),  # baseline frozen 3 min after switch-on
        C("10:01", load=60, sp=None),
        C("10:02", load=70, sp=None),
        C("10:03", load=200, sp=pytest.approx(71.5)),  # window 10:01-10:02: 65 x 1.1
    ])
    fresh = replace(FLOAT, float_down=replace(FLOAT.float_down, window_min=2, k_pct=0.0))
    run(fresh, [
        C("10:00", load=50, sp=None),                 # no reading before the command
        C("10:01", load=60, sp=None),
        C("10:02", load=70, sp=None),
        C("10:03", load=90, sp=pytest.approx(65.0),   # the first full window after it;
          ev="trip float_down 1"),                    # 70 > 65
    ])


def test_precedence_of_the_power_controls_and_the_protection_floor() -> None:
    params = ModeParams(
        floor_kw=60.0,
        period=PeriodParams(enabled=True, periods=((0, 1440),), schemes=((100.0,),), periods_on=(1,)),
        rest_day=RestDayParams(enabled=True, setpoint_kw=90.0, start_min=600, duration_half_hours=2,
                               weekdays=(1, 2)),
        suspension=SuspensionParams(enabled=True, start=date(2025, 3, 4), end=date(2025, 3, 5),
                                    setpoint_kw=50.0),
        float_down=FloatDownParams(enabled=True, issued_s=at("+1 10:30"), window_min=1, k_pct=10.0),
    )
    run(params, [
        C("09:59", load=50, mode="period", sp=100.0),
        C("10:00", mode="rest_day", sp=90.0),         # rest-day > period
        C("11:00", mode="period", sp=100.0),
        C("+1 10:00", mode="suspension", sp=60.0),    # suspension > rest-day; 50 kW raised to the floor
        C("+1 10:29", mode="suspension"),
        C("+1 10:30", mode="float_down", sp=60.0),    # float-down > all; 55 kW raised to the floor
        C("+1 11:00", mode="suspension", sp=60.0),    # its half-hour is over
        C("+3 10:00", mode="period", sp=100.0),       # Thursday
    ])


def test_a_new_power_control_takes_over_and_restores_only_what_fits() -> None:
    rest = RestDayParams(enabled=True, setpoint_kw=130.0, start_min=600, duration_half_hours=2,
                         weekdays=(1,))
    params = replace(PERIOD, rest_day=rest, power=PowerParams(rounds=(1, 2, 3), slide_min=1),
                     restore_interval_s=120.0)
    run(params, [
        C("09:50", load=180),
        C("09:51"),
        C("09:52", ev="trip period 1", off="1"),
        C("09:53"),
        C("09:54", ev="trip period 2", off="1 2"),
        C("09:55"),
        C("09:56", ev="trip period 3", off="1 2 3"),  # 130 > 100
        C("09:57"),
        C("09:59", load=170, off="1 2 3"),            # 80: nothing fits under 100
        C("10:00", ev="restore period 3", off="1 2", mode="rest_day", sp=130.0),  # 80 + 40 < 130
        C("10:01", off="1 2"),                        # restore interval: 2 min
        C("10:02", off="1 2"),                        # 120 + 30 is not under 130: wait
        C("10:03", load=140, off="1 2"),
        C("10:04", ev="restore period 2", off="1"),   # 90 + 30 < 130
        C("10:05"),
        C("10:06", off="1"),                          # 120 + 20 is not under 130: stays off
    ])


def test_power_falling_restores_rounds_that_fit_in_reverse_trip_order() -> None:
    run(replace(PERIOD, power=PowerParams(rounds=(1, 2, 3), slide_min=1)), [
        C("08:00", load=130),
        C("08:01"),
        C("08:02", ev="trip period 1", off="1"),      # 130 > 100
        C("08:03"),
        C("08:04", ev="trip period 2", off="1 2"),    # 110 > 100
        C("08:05", load=125, off="1 2"),              # 75 + 30 is not under 100; round 1 comes last
        C("08:06", load=110, off="1 2"),              # 60 now, but the last minute was 75
        C("08:07", ev="restore period 2", off="1"),   # 60 + 30 < 100
        C("08:08", off="1"),                          # 90 + 20: no
        C("08:09", load=90, off="1"),                 # 70 now, but the last minute was 90
        C("08:10", ev="restore period 1", off=""),    # 70 + 20 < 100
    ])


# ---------------------------------------------------------------------------------------------
# Rotation


def test_rotation_swaps_a_round_off_for_too_long() -> None:
    params = ModeParams(
        power=PowerParams(rounds=(1, 2, 3), slide_min=1, alarm_min=(0, 1, 0), max_off_min=(30, 30, 30)),
        period=PeriodParams(enabled=True, periods=((0, 1440),), schemes=((100.0,),), periods_on=(1,)),
    )
    run(params, [
        C("10:00", load=110),
        C("10:01"),
        C("10:02", ev="trip period 1", off="1"),      # 110 > 100
        C("10:31", off="1"),
        C("10:32", ev="alarm period 2", alarm="2"),   # round 1 off 30 min: round 2 to replace it
        C("10:33", ev="trip period 2; restore period 1", off="2", alarm=""),
        C("11:02", off="2"),
        C("11:03", ev="trip period 3; restore period 2", off="3"),  # round 1 (20 kW) cannot replace 30 kW
        C("11:33", off="3"),
        C("12:33", off="3"),                          # nothing as large as round 3: it stays off
    ], rounds={1: 20.0, 2: 30.0, 3: 40.0})


# ---------------------------------------------------------------------------------------------
# Monthly energy control and purchased energy


MONTHLY = ModeParams(
    energy=EnergyParams(rounds=(1, 2, 3), interval_s=60.0),
    monthly=MonthlyParams(enabled=True, limit_kwh=1000.0, alarm_pct=80.0),
)


def test_monthly_energy_alarm_trips_and_month_rollover() -> None:
    _, outs = run(MONTHLY, [
        C("2025-03-01 00:00", load=50, kwh=4000.0),   # the month starts at 4000 kWh
        C("2025-03-20 10:00", kwh=4799.0),
        C("2025-03-20 10:01", kwh=4800.0, ev="alarm monthly"),  # 80 % of 1000 kWh
        C("2025-03-31 22:00", kwh=5000.0, ev="trip monthly 1", off="1"),  # the limit
        C("2025-03-31 22:00:30", kwh=5000.5),         # one round per interval
        C("2025-03-31 22:01", ev="trip monthly 2", off="1 2"),
        C("2025-03-31 22:02", ev="trip monthly 3", off="1 2 3"),
        C("2025-03-31 22:03", off="1 2 3"),
        C("2025-04-01 00:00", kwh=5010.0, ev="alarm_off monthly; restore monthly 3", off="1 2"),
        C("2025-04-01 00:01", ev="restore monthly 2", off="1"),
        C("2025-04-01 00:02", ev="restore monthly 1", off=""),
        C("2025-04-30 23:00", kwh=5809.0),            # the new month counts from 5010
        C("2025-04-30 23:01", kwh=5810.0, ev="alarm monthly"),
    ])
    assert outs[-1].month_used_kwh == pytest.approx(800.0)
    assert outs[-1].energy_alarms == ("monthly",)


def test_monthly_control_switched_off_releases_its_rounds() -> None:
    run(MONTHLY, [
        C("2025-03-01 00:00", load=50, kwh=0.0),
        C("2025-03-02 00:00", kwh=1000.0, ev="alarm monthly; trip monthly 1", off="1"),
        C("2025-03-02 00:01", params=ModeParams(), ev="alarm_off monthly; restore monthly 1", off=""),
    ])


PREPAID = ModeParams(
    energy=EnergyParams(rounds=(1, 2), interval_s=60.0),
    purchase=PurchaseParams(enabled=True, order_no=1, append=False, amount_kwh=100.0,
                            alarm_kwh=20.0, trip_kwh=5.0),
)


def test_prepaid_thresholds_orders_and_staged_trips() -> None:
    def order(no: int, append: bool, amount: float) -> ModeParams:
        return replace(PREPAID, purchase=replace(PREPAID.purchase, order_no=no, append=append,
                                                 amount_kwh=amount))

    _, outs = run(PREPAID, [
        C("10:00", load=50, kwh=1000.0, ev="order purchase"),  # refresh: 100 kWh left
        C("11:00", kwh=1079.0),                        # 21 left
        C("11:01", kwh=1080.0, ev="alarm purchase"),  # 20 left: the alarm threshold
        C("12:00", kwh=1095.0, ev="trip purchase 1", off="1"),  # 5 left: the trip threshold
        C("12:00:30", kwh=1095.2),
        C("12:01", kwh=1095.5, ev="trip purchase 2", off="1 2"),  # staged, one per interval
        C("12:02", off="1 2"),                        # no energy round left
        C("12:05", params=order(2, True, 50.0),       # append: 4.5 + 50 left
          ev="order purchase; alarm_off purchase; restore purchase 2", off="1"),
        C("12:06", ev="restore purchase 1", off=""),
        C("12:07", params=order(1, False, 100.0), ev="ignored purchase"),  # a replayed order
        C("12:08"),
        C("12:09", params=order(3, False, 10.0), ev="order purchase; alarm purchase"),  # refresh: 10
        C("12:10", kwh=1100.5, ev="trip purchase 1", off="1"),  # 5 left
    ])
    assert outs[-1].purchase_left_kwh == pytest.approx(5.0)


PREPAID_YUAN = ModeParams(
    energy=EnergyParams(rounds=(1, 2), interval_s=60.0),
    purchase=PurchaseParams(enabled=True, order_no=1, append=False, unit="yuan",
                            amount_yuan=500.0, alarm_yuan=100.0, trip_yuan=20.0),
)


def test_a_prepaid_order_in_money_counts_down_with_the_running_cost() -> None:
    """The same rounds, thresholds and orders as in kWh, counted on the ledger's running cost
    (``spent_yuan``), not on the register: here the register stands still while the money goes
    (a peak price); an order in kWh after it starts a fresh count in kWh."""
    def order(no: int, append: bool, amount: float) -> ModeParams:
        return replace(PREPAID_YUAN, purchase=replace(PREPAID_YUAN.purchase, order_no=no,
                                                      append=append, amount_yuan=amount))

    _, outs = run(PREPAID_YUAN, [
        C("10:00", load=50, kwh=1000.0, yuan=2000.0, ev="order purchase"),  # 500 yuan left
        C("11:00", yuan=2399.0),                      # 101 left
        C("11:01", yuan=2400.0, ev="alarm purchase"),  # 100 left: the alarm threshold
        C("12:00", yuan=2480.0, ev="trip purchase 1", off="1"),  # 20 left: the trip threshold
        C("12:01", yuan=2481.0, ev="trip purchase 2", off="1 2"),
        C("12:05", params=order(2, True, 300.0),      # append: 19 + 300 left
          ev="order purchase; alarm_off purchase; restore purchase 2", off="1"),
        C("12:06", ev="restore purchase 1", off=""),
    ])
    assert outs[-1].purchase_left_kwh == pytest.approx(319.0)
    assert outs[-1].purchase_unit == "yuan"
    in_kwh = replace(PREPAID, purchase=replace(PREPAID.purchase, order_no=3))
    _, outs = run(PREPAID_YUAN, [
        C("10:00", load=50, kwh=1000.0, yuan=2000.0, ev="order purchase"),
        C("10:01", params=in_kwh, ev="order purchase"),  # refreshed: 100 kWh from now
        C("10:02", kwh=1010.0, yuan=9999.0),          # money no longer counts
    ])
    assert outs[-1].purchase_unit == "kwh" and outs[-1].purchase_left_kwh == pytest.approx(90.0)


def test_a_money_order_waits_for_a_price() -> None:
    """No tariff (no running cost): the order is applied once there is one."""
    run(PREPAID_YUAN, [
        C("10:00", load=50, kwh=1000.0),
        C("10:01", yuan=5.0, ev="order purchase"),
    ])


def test_money_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="alarm threshold 5 yuan is below the trip threshold 10"):
        PurchaseParams(unit="yuan", alarm_yuan=5.0, trip_yuan=10.0)
    with pytest.raises(ValueError, match="unit"):
        PurchaseParams(unit="cny")


# ---------------------------------------------------------------------------------------------
# Precedence: OR of the modes, allow-close, guarantee


def test_a_round_is_tripped_while_any_mode_holds_it_and_allow_close_releases_it() -> None:
    def remote(*orders: RemoteOrder) -> ModeParams:
        return replace(MONTHLY, remote=orders)

    trip1 = RemoteOrder(1, "trip", at("2025-03-10 10:01"))
    close2 = RemoteOrder(2, "close", at("2025-03-10 10:03"))
    close1 = RemoteOrder(1, "close", at("2025-04-01 00:01"))
    run(MONTHLY, [
        C("2025-03-10 10:00", load=100, kwh=5000.0),
        C("2025-03-10 10:01", params=remote(trip1), kwh=6000.0,
          ev="trip remote 1; alarm monthly; trip monthly 2", off="1 2"),  # round 1 already off: held too
        C("2025-03-10 10:02", ev="trip monthly 3", off="1 2 3"),
        C("2025-03-10 10:03", params=remote(trip1, close2), ev="restore remote 2", off="1 3"),
        C("2025-03-10 10:10", off="1 3"),             # monthly leaves round 2 alone now
        C("2025-04-01 00:00", kwh=6100.0, ev="alarm_off monthly; restore monthly 3",
          off="1"),                                   # a new month; remote still holds round 1
        C("2025-04-01 00:01", params=remote(close1, close2), ev="restore remote 1", off=""),
        C("2025-04-20 10:00", kwh=7100.0, ev="alarm monthly; trip monthly 1", off="1"),  # re-armed
    ])


def test_guarantee_overrides_everything_and_controls_restart_after_it() -> None:
    base = replace(PERIOD, power=PowerParams(rounds=(1, 2, 3), slide_min=1),
                   remote=(RemoteOrder(1, "trip", at("10:00")),))
    g_on = replace(base, guarantee=GuaranteeParams(on=True, issued_s=at("10:05"), duration_half_hours=1))
    g_trip3 = replace(g_on, remote=(*base.remote, RemoteOrder(3, "trip", at("10:06"))))
    run(base, [
        C("10:00", load=150, ev="trip remote 1", off="1"),
        C("10:01"),
        C("10:02", ev="trip period 2", off="1 2"),    # 130 > 100; round 1 is off already: adopted
        C("10:03"),
        C("10:05", params=g_on, ev="guarantee_on guarantee; restore guarantee 1; restore guarantee 2",
          off="", mode=None, guarantee="manual"),
        C("10:06", params=g_trip3, ev="ignored remote 3", off=""),
        C("10:34", off="", guarantee="manual"),
        C("10:35", ev="guarantee_off guarantee", off="", mode="period", guarantee="off"),
        C("10:36", off=""),                           # power control waits one window again
        C("10:37", ev="trip period 1", off="1"),      # 150 > 100; the remote trip was cancelled
    ])


def test_automatic_guarantee_after_no_contact() -> None:
    params = ModeParams(remote=(RemoteOrder(1, "trip", at("10:00")),),
                        guarantee=GuaranteeParams(auto_after_h=2))
    run(params, [
        C("10:00", load=100, ev="trip remote 1", off="1"),
        C("11:59:59", contact=7199.0, off="1", guarantee="off"),
        C("12:00", contact=7200.0, ev="guarantee_on guarantee; restore guarantee 1", off="",
          guarantee="auto"),
        C("13:00", contact=None, off="", guarantee="off", ev="guarantee_off guarantee"),  # unknown: no auto
        C("13:01", contact=10800.0, off="", guarantee="auto", ev="guarantee_on guarantee"),
        C("13:02", contact=0.0, ev="guarantee_off guarantee", off="", guarantee="off"),
    ])


def test_indefinite_guarantee_until_cleared() -> None:
    on = ModeParams(guarantee=GuaranteeParams(on=True, issued_s=at("10:00")))
    run(on, [
        C("10:00", load=10, ev="guarantee_on guarantee", guarantee="manual"),
        C("+30 10:00", guarantee="manual"),
        C("+30 10:01", params=ModeParams(), ev="guarantee_off guarantee", guarantee="off"),
    ])


# ---------------------------------------------------------------------------------------------
# Rounds, restart, exclusion


def test_a_round_removed_from_the_configuration_is_released() -> None:
    params = ModeParams(remote=(RemoteOrder(2, "trip", at("10:00")),
                                RemoteOrder(3, "trip", at("10:00"), alarm_delay_min=5)))
    state, _ = run(params, [C("10:00", load=100, ev="trip remote 2; alarm remote 3", off="2", alarm="3")])
    run(params, [
        C("10:01", ev="restore config 2; alarm_off remote 3", off="", alarm=""),
        C("10:05", off=""),
    ], state=state, rounds={1: 20.0})


def test_restart_from_persisted_state_trips_nothing_twice_and_leaves_nothing_off() -> None:
    params = replace(PERIOD, remote=(RemoteOrder(3, "trip", at("08:00"), limit_half_hours=1),))
    state, _ = run(params, [
        C("08:00", load=170, ev="trip remote 3", off="3"),
        C("08:01"),
        C("08:02", ev="alarm period 1", alarm="1"),   # 130 > 100
        C("08:03", ev="trip period 1", off="1 3"),
        C("08:04"),
    ])
    # The agent stops here and comes back 40 minutes later from the persisted state: the
    # remote limit time ended meanwhile. Nothing is tripped again; round 3 comes back as soon
    # as it fits (100 - 60 = 40 kW, + 40 kW < 100), round 1 stays with period control.
    resumed = ModeState.from_dict(json.loads(json.dumps(state.to_dict())))
    run(params, [
        C("08:44", load=100, ev="restore remote 3", off="1", alarm=""),
        C("08:45", off="1"),
        C("08:46", off="1"),                          # 80 + 20 is not under 100
        C("12:00", ev="restore period 1", off=""),    # the period ends
    ], state=resumed)


def test_exclusion_is_exposed_for_the_command_layer() -> None:
    params = ModeParams(exclusion=True)
    _, outs = run(params, [C("10:00", load=10)])
    assert outs[0].excluded
    assert not accepts_group_command(params, time_sync=False)
    assert accepts_group_command(params, time_sync=True)
    assert accepts_group_command(ModeParams(), time_sync=False)


def test_local_time_uses_the_given_offset() -> None:
    now = at("2025-03-31 16:30")
    assert local_time(now, 8 * 3600) == (date(2025, 4, 1), 30)
    assert local_time(now, 0) == (date(2025, 3, 31), 16 * 60 + 30)


# ---------------------------------------------------------------------------------------------
# Parameters: JSON and validation

FULL = ModeParams(
    power=PowerParams(rounds=(1, 2), slide_min=5, alarm_min=(1, 2), max_off_min=(60,)),
    energy=EnergyParams(rounds=(3,), interval_s=30.0),
    floor_kw=40.0,
    restore_interval_s=90.0,
    remote=(RemoteOrder(1, "trip", 1.7e9, 3, 2), RemoteOrder(2, "close", 1.7e9)),
    period=PeriodParams(enabled=True, periods=((0, 480), (480, 1440)),
                        schemes=((100.0, None), (90.0, 80.0)), scheme=2, periods_on=(1, 2), float_pct=-5.0),
    rest_day=RestDayParams(enabled=True, setpoint_kw=60.0, start_min=0, duration_half_hours=48,
                           weekdays=(7,)),
    suspension=SuspensionParams(enabled=True, start=date(2025, 8, 1), end=date(2025, 8, 15),
                                setpoint_kw=20.0),
    float_down=FloatDownParams(enabled=True, issued_s=1.7e9, window_min=10, k_pct=-15.0,
                               freeze_delay_min=2, control_half_hours=4, alarm_min=(0, 1)),
    monthly=MonthlyParams(enabled=True, limit_kwh=50_000.0, alarm_pct=90.0),
    purchase=PurchaseParams(enabled=True, order_no=7, append=True, amount_kwh=500.0, alarm_kwh=50.0,
                            trip_kwh=10.0),
    guarantee=GuaranteeParams(on=False, auto_after_h=24),
    exclusion=True,
)


def test_params_round_trip_through_json() -> None:
    data = json.loads(json.dumps(FULL.to_dict()))
    assert data["suspension"]["start"] == "2025-08-01"
    assert ModeParams.from_dict(data) == FULL
    assert ModeParams.from_dict({}) == ModeParams()


def test_state_round_trips_mid_control() -> None:
    state, _ = run(PERIOD, PERIOD_ROWS[:8])
    data = json.loads(json.dumps(state.to_dict()))
    assert ModeState.from_dict(data) == state
    assert data["tripped"] and data["holds"]["1"] == ["period"]


def bad(**changes: Any) -> dict[str, Any]:
    data = FULL.to_dict()
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split("__")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
    return data


@pytest.mark.parametrize(("data", "message"), [
    (bad(remote=[{"round": 9, "action": "trip", "issued_s": 0}]),
     "RemoteOrder.round must be an integer from 1 to 8"),
    (bad(remote=[{"round": 1, "action": "open", "issued_s": 0}]), "'trip' or 'close'"),
    (bad(remote=[{"round": 1, "action": "trip", "issued_s": 0, "alarm_delay_min": 16}]), "alarm_delay_min"),
    (bad(remote=[{"round": 1, "action": "trip", "issued_s": 0}] * 2), "more than one order for a round"),
    (bad(power__slide_min=0), "PowerParams.slide_min must be an integer from 1 to 60"),
    (bad(power__rounds=[1, 1]), "round listed twice"),
    (bad(power__alarm_min=[0] * 9), "at most 8 values"),
    (bad(period__periods=[[0, 600], [500, 900]]), "periods must be in order and not overlap"),
    (bad(period__periods=[[600, 600]]), "must be after start"),
    (bad(period__schemes=[[100.0]]), "1 setpoints for 2 periods"),
    (bad(period__scheme=3), "scheme 3 is selected but only 2 are defined"),
    (bad(period__float_pct=150), "float_pct must be from -99 to 99"),
    (bad(rest_day__start_min=1200, rest_day__duration_half_hours=10), "runs past midnight"),
    (bad(rest_day__weekdays=[0]), "weekdays: day must be an integer from 1 to 7"),
    (bad(suspension__end="2025-07-01"), "end 2025-07-01 is before start 2025-08-01"),
    (bad(suspension__start="1st of August"), "expected a date YYYY-MM-DD"),
    (bad(float_down__window_min=61), "window_min"),
    (bad(float_down__control_half_hours=0), "control_half_hours"),
    (bad(monthly__limit_kwh=0), "enabled with a limit of 0 kWh"),
    (bad(monthly__alarm_pct=120), "alarm_pct must be from 0 to 100"),
    (bad(purchase__alarm_kwh=5), "alarm threshold 5 kWh is below the trip threshold 10 kWh"),
    (bad(guarantee__auto_after_h=-1), "auto_after_h"),
    (bad(floor_kw=-1), "floor_kw"),
    (bad(exclusion="yes"), "ModeParams.exclusion: expected true or false"),
    (bad(power__slide_min=2.5), "ModeParams.power.slide_min: expected an integer"),
    (bad(color="red"), "unknown field(s) color"),
    (bad(remote=[{"round": 1, "action": "trip"}]), "issued_s"),
])
def test_invalid_params_are_refused_with_a_clear_message(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        ModeParams.from_dict(data)
    assert message in str(err.value)


def test_invalid_inputs_are_refused() -> None:
    now, day, minute = when("10:00")
    with pytest.raises(ValueError, match="round must be an integer from 1 to 8"):
        CycleInputs(now, day, minute, 10.0, rounds={9: 1.0})
    with pytest.raises(ValueError, match="minute_of_day"):
        CycleInputs(now, day, 1440, 10.0)
    nan = CycleInputs(now, day, minute, float("nan"))
    assert nan.power_kw is None
