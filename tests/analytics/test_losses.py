"""lmt.analytics.losses: loss groups (ERC22), cycle tables of intervals in, events out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmt.analytics.losses import LossError, LossGroup, LossInterval, LossState, judge, step

T0 = 1_717_200_000 - 1_717_200_000 % 900  # a quarter-hour boundary
Q = 900  # 15-minute intervals

GROUP = LossGroup(name="feeder-1", main="main", subs=("a", "b"), relative_limit_pct=5.0,
                  absolute_limit_kwh=10.0, min_main_kwh=20.0, raise_after=2, clear_after=2)

Row = tuple[float | None, float | None, float | None] | tuple[
    float | None, float | None, float | None, dict[str, str]]


def interval(i: int, row: Row) -> LossInterval:
    main, a, b = row[0], row[1], row[2]
    quality = row[3] if len(row) == 4 else {}
    return LossInterval(start=T0 + i * Q, end=T0 + (i + 1) * Q,
                        kwh={"main": main, "a": a, "b": b}, quality=quality)


def run(group: LossGroup, rows: list[Row], state: LossState | None = None, first: int = 0
        ) -> tuple[LossState, list[list[dict[str, Any]]]]:
    st = state if state is not None else LossState()
    out = []
    for i, row in enumerate(rows, first):
        st, records = step(group, st, interval(i, row))
        out.append(records)
    return st, out


def statuses(out: list[list[dict[str, Any]]]) -> list[str]:
    return [recs[0]["data"]["status"] for recs in out]


def events(out: list[list[dict[str, Any]]]) -> list[tuple[int, str]]:
    return [(i, r["type"]) for i, recs in enumerate(out) for r in recs[1:]]


# -- the worked example of docs/carbon-and-losses.md ---------------------------------------------

WORKED = [  # main, sub a, sub b
    (100.0, 50.0, 46.0),   # 1: 4 kWh, 4.0 % within
    (100.0, 50.0, 43.0),   # 2: 7 kWh, 7.0 % over (1)
    (10.0, 5.0, 3.0),      # 3: 20 % but 10 kWh < 20 kWh minimum load: not judged
    (120.0, 60.0, 51.6),   # 4: 8.4 kWh, 7.0 % over (2): loss_exceeded since interval 2
    (110.0, None, 50.0),   # 5: sub a missing: not judged
    (100.0, 50.0, 47.0),   # 6: 3 kWh, 3.0 % within (1)
    (100.0, 51.0, 47.0),   # 7: 2 kWh, 2.0 % within (2): loss_cleared
]


def test_the_worked_example() -> None:
    st, out = run(GROUP, WORKED)
    assert statuses(out) == ["within", "over", "low_load", "over", "missing", "within", "within"]
    assert events(out) == [(3, "loss_exceeded"), (6, "loss_cleared")]
    raised = out[3][1]
    assert raised["ts"] == T0 + 4 * Q
    d = raised["data"]
    assert (d["group"], d["main"], d["main_kwh"], d["subs"], d["sub_kwh"]) == (
        "feeder-1", "main", 120.0, {"a": 60.0, "b": 51.6}, 111.6)
    assert (d["loss_kwh"], d["loss_pct"], d["intervals_over"]) == (8.4, 7.0, 2)
    assert (d["since"], d["at"]) == (T0 + 1 * Q, T0 + 4 * Q)  # the run started with interval 2
    assert d["limits"] == {"method": "relative", "relative_pct": 5.0, "absolute_kwh": 10.0,
                           "min_main_kwh": 20.0, "raise_after": 2, "clear_after": 2}
    cleared = out[6][1]["data"]
    assert (cleared["loss_kwh"], cleared["loss_pct"], cleared["intervals_under"]) == (2.0, 2.0, 2)
    assert (cleared["since"], cleared["raised_at"], cleared["cleared_at"]) == (
        T0 + 1 * Q, T0 + 4 * Q, T0 + 7 * Q)
    assert (cleared["peak_loss_kwh"], cleared["peak_loss_pct"]) == (8.4, 7.0)
    assert out[4][0]["data"]["missing"] == {"a": "no energy"}
    assert out[2][0]["data"]["exceeded"] is None and out[1][0]["data"]["exceeded"] is True
    assert not st.active and st.over == 0 and st.under == 0
    absolute = LossGroup(**{**GROUP.to_dict(), "method": "absolute"})  # 10 kWh: none exceeds
    assert events(run(absolute, WORKED)[1]) == []


def test_every_interval_gives_its_figures_first() -> None:
    _, out = run(GROUP, WORKED)
    for i, recs in enumerate(out):
        fig = recs[0]
        assert fig["type"] == "loss_interval" and fig["ts"] == T0 + (i + 1) * Q
        assert (fig["data"]["start"], fig["data"]["end"]) == (T0 + i * Q, T0 + (i + 1) * Q)
    first = out[0][0]["data"]
    assert (first["main_kwh"], first["sub_kwh"], first["loss_kwh"], first["loss_pct"]) == (
        100.0, 96.0, 4.0, 4.0)
    assert [recs[0]["data"]["active"] for recs in out] == [False, False, False, True, True, True,
                                                             False]
    # the runs including each interval (the docs' "counts" column)
    assert [recs[0]["data"]["intervals_over"] for recs in out] == [0, 1, 1, 2, 0, 0, 0]
    assert [recs[0]["data"]["intervals_under"] for recs in out] == [0, 0, 0, 0, 0, 1, 2]


# -- cycle tables ---------------------------------------------------------------------------------

OVER, WITHIN = (100.0, 50.0, 40.0), (100.0, 50.0, 48.0)  # 10 % and 2 %
LOW = (5.0, 1.0, 1.0)  # 60 %, but under the 20 kWh minimum load
MISSING = (100.0, 50.0, None)

CYCLES = [
    # (name, group changes, rows, expected events)
    ("one over is not enough", {}, [WITHIN, OVER, WITHIN, OVER], []),
    ("raised once, however long it lasts", {}, [OVER] * 6, [(1, "loss_exceeded")]),
    ("N = 3", {"raise_after": 3}, [OVER, OVER, WITHIN, OVER, OVER, OVER], [(5, "loss_exceeded")]),
    ("clear after M = 2", {}, [OVER, OVER, WITHIN, OVER, WITHIN, WITHIN, WITHIN],
     [(1, "loss_exceeded"), (5, "loss_cleared")]),
    ("M = 1 clears at once", {"clear_after": 1}, [OVER, OVER, WITHIN],
     [(1, "loss_exceeded"), (2, "loss_cleared")]),
    ("raise again after a clear", {}, [OVER, OVER, WITHIN, WITHIN, OVER, OVER],
     [(1, "loss_exceeded"), (3, "loss_cleared"), (5, "loss_exceeded")]),
    ("the guard: low load is not judged", {}, [OVER, LOW, LOW, OVER], [(3, "loss_exceeded")]),
    ("the guard: low load never raises", {}, [LOW] * 5, []),
    ("the guard: low load never clears", {}, [OVER, OVER, LOW, LOW, LOW, WITHIN],
     [(1, "loss_exceeded")]),
    ("skip: a missing interval does not break the run", {}, [OVER, MISSING, OVER],
     [(2, "loss_exceeded")]),
    ("skip: a missing interval does not clear", {}, [OVER, OVER, WITHIN, MISSING, WITHIN],
     [(1, "loss_exceeded"), (4, "loss_cleared")]),
    ("break: a missing interval restarts the raising run", {"on_missing": "break"},
     [OVER, MISSING, OVER, OVER], [(3, "loss_exceeded")]),
    ("break: a missing interval restarts the clearing run", {"on_missing": "break"},
     [OVER, OVER, WITHIN, MISSING, WITHIN, WITHIN], [(1, "loss_exceeded"), (5, "loss_cleared")]),
    ("break: low load restarts the run too", {"on_missing": "break"}, [OVER, LOW, OVER, OVER],
     [(3, "loss_exceeded")]),
    ("sub-meters above the main are as wrong", {}, [(100.0, 60.0, 48.0)] * 2,
     [(1, "loss_exceeded")]),
    ("absolute: judged at any load", {"method": "absolute", "absolute_limit_kwh": 2.5},
     [LOW, LOW], [(1, "loss_exceeded")]),
    ("absolute: within kWh although 10 %", {"method": "absolute", "absolute_limit_kwh": 15.0},
     [OVER] * 4, []),
    ("an estimated interval counts as missing", {},
     [OVER, (100.0, 50.0, 40.0, {"b": "estimated"}), WITHIN, OVER], []),
    ("unless the group accepts estimates", {"accept_quality": ("complete", "estimated")},
     [OVER, (100.0, 50.0, 40.0, {"b": "estimated"})], [(1, "loss_exceeded")]),
]


@pytest.mark.parametrize(("name", "changes", "rows", "expected"), CYCLES,
                         ids=[c[0] for c in CYCLES])
def test_cycle_table(name: str, changes: dict[str, Any], rows: list[Row],
                     expected: list[tuple[int, str]]) -> None:
    group = LossGroup(**{**GROUP.to_dict(), **changes})
    _, out = run(group, rows)
    assert events(out) == expected, name


def test_the_minimum_load_guard_applies_to_the_relative_test_only() -> None:
    low = interval(0, (15.0, 5.0, 5.0))  # 5 kWh lost: 33 %, at 15 kWh < 20 kWh
    v = judge(GROUP, low)
    assert (v.status, v.exceeded, v.loss_kwh) == ("low_load", None, 5.0)
    assert v.loss_pct == pytest.approx(100 * 5 / 15)
    absolute = LossGroup(**{**GROUP.to_dict(), "method": "absolute", "absolute_limit_kwh": 4.0})
    assert judge(absolute, low).status == "over"
    at_the_guard = judge(GROUP, interval(0, (20.0, 9.0, 9.0)))  # 10 % at exactly 20 kWh: judged
    assert at_the_guard.status == "over"
    nothing = judge(LossGroup(**{**GROUP.to_dict(), "min_main_kwh": 0.0}),
                    interval(0, (0.0, 0.0, 0.0)))
    assert (nothing.status, nothing.loss_pct) == ("low_load", None)  # no percentage of zero


def test_missing_members_are_named_with_why() -> None:
    v = judge(GROUP, LossInterval(T0, T0 + Q, {"main": 100.0, "a": -3.0},
                                  {"main": "gap"}))
    assert v.status == "missing"
    assert v.missing == {"main": "quality gap", "a": "bad value -3.0", "b": "no energy"}
    assert (v.sub_kwh, v.loss_kwh) == (None, None)


def test_the_peak_loss_is_reported_on_clearing() -> None:
    _, out = run(GROUP, [OVER, (100.0, 50.0, 35.0), (100.0, 50.0, 38.0), WITHIN, WITHIN])
    cleared = out[-1][1]
    assert cleared["type"] == "loss_cleared"
    assert (cleared["data"]["peak_loss_kwh"], cleared["data"]["peak_loss_pct"]) == (15.0, 15.0)


# -- restarts -------------------------------------------------------------------------------------


def restart(st: LossState) -> LossState:
    return LossState.from_dict(json.loads(json.dumps(st.to_dict())))


def test_a_restart_mid_raise_raises_once_with_the_run_start() -> None:
    st, out = run(GROUP, [WITHIN, OVER])
    assert (st.over, st.run_since, events(out)) == (1, T0 + Q, [])
    st = restart(st)
    st, out = run(GROUP, [OVER, OVER], state=st, first=2)
    assert events(out) == [(0, "loss_exceeded")]
    assert out[0][1]["data"]["since"] == T0 + Q
    assert out[0][1]["data"]["intervals_over"] == 2


def test_a_restart_mid_clear_clears_once() -> None:
    st, out = run(GROUP, [OVER, OVER, WITHIN])
    assert (st.active, st.under) == (True, 1)
    st = restart(st)
    st, out = run(GROUP, [WITHIN, WITHIN], state=st, first=3)
    assert events(out) == [(0, "loss_cleared")]
    assert (out[0][1]["data"]["since"], out[0][1]["data"]["raised_at"]) == (T0, T0 + 2 * Q)


def test_a_replayed_interval_after_a_restart_changes_nothing() -> None:
    st, out = run(GROUP, [OVER, OVER])
    assert events(out) == [(1, "loss_exceeded")]
    again = restart(st)
    for i in (0, 1):  # the agent replays intervals it had already stepped
        after, records = step(GROUP, again, interval(i, OVER))
        assert (after, records) == (again, [])
    partly = LossInterval(T0 + 2 * Q - 60, T0 + 3 * Q, {"main": 1.0, "a": 1.0, "b": 0.0})
    assert step(GROUP, again, partly) == (again, [])


def test_the_state_round_trips_exactly() -> None:
    st, _ = run(GROUP, [OVER, OVER, WITHIN])
    assert restart(st) == st
    assert LossState.from_dict(st.to_dict()).to_dict() == st.to_dict()


@pytest.mark.parametrize(("body", "message"), [
    ({"over": -1}, "LossState.over: expected a count"),
    ({"active": True, "over": 1}, "an active alarm counts under"),
    ({"under": 1}, "no alarm is active"),
    ({"over": "1"}, "LossState.over: expected an integer"),
    ({"colour": "red"}, "LossState: unknown field.s. colour"),
])
def test_a_bad_state_is_refused_naming_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossState.from_dict(body)


def test_a_state_of_another_group_is_refused() -> None:
    st, _ = run(GROUP, [OVER])
    other = LossGroup(**{**GROUP.to_dict(), "name": "feeder-2"})
    with pytest.raises(LossError, match="the state belongs to group 'feeder-1', not 'feeder-2'"):
        step(other, st, interval(1, OVER))


# -- configuration and input ---------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"name": ""}, "LossGroup.name: expected a non-empty string"),
    ({"main": ""}, r"LossGroup 'feeder-1'.main: expected a meter name"),
    ({"subs": ()}, r"LossGroup 'feeder-1'.subs: expected one or more meter names"),
    ({"subs": ("a", "a")}, "a meter is listed twice"),
    ({"subs": ("a", "main")}, "'main' is the main meter"),
    ({"relative_limit_pct": -1.0}, r"relative_limit_pct: expected a finite number"),
    ({"relative_limit_pct": 0.0}, "relative_limit_pct: the relative method needs a limit > 0"),
    ({"method": "absolute", "absolute_limit_kwh": 0.0}, "the absolute method needs a limit > 0"),
    ({"method": "both"}, r"method: expected one of relative, absolute"),
    ({"min_main_kwh": float("nan")}, "min_main_kwh: expected a finite number"),
    ({"raise_after": 0}, r"raise_after: expected a number of intervals in 1..1000"),
    ({"clear_after": True}, "clear_after: expected a number of intervals"),
    ({"on_missing": "zero"}, "on_missing: expected one of skip, break"),
    ({"accept_quality": ()}, "accept_quality: expected one or more quality names"),
])
def test_a_bad_group_is_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(LossError, match=message):
        LossGroup(**{**GROUP.to_dict(), **changes})


def test_a_group_reads_strictly_from_its_config_dict() -> None:
    body = GROUP.to_dict()
    assert LossGroup.from_dict(body) == GROUP
    assert body["subs"] == ["a", "b"]
    with pytest.raises(ValueError, match=r"LossGroup: unknown field\(s\) limit"):
        LossGroup.from_dict({**body, "limit": 3})
    with pytest.raises(ValueError, match=r"LossGroup.raise_after: expected an integer"):
        LossGroup.from_dict({**body, "raise_after": 2.5})


@pytest.mark.parametrize(("start", "end", "message"), [
    (T0, T0, "interval.end: must be after start"),
    (T0 + Q, T0, "interval.end: must be after start"),
    (float("nan"), T0, "interval.start: expected unix seconds"),
])
def test_a_bad_interval_is_refused(start: float, end: float, message: str) -> None:
    with pytest.raises(LossError, match=message):
        step(GROUP, LossState(), LossInterval(start, end, {"main": 1.0, "a": 0.5, "b": 0.5}))
