"""Flexibility as cycle tables: the loads as they stand in, kW per class out, by hand."""

from __future__ import annotations

import pytest

from lmt.control.cap import LoadSpec
from lmt.control.flex import LoadNow, flexibility

CHILLER = LoadSpec("chiller", 30.0, 40, min_on_s=120.0)
COMPRESSOR = LoadSpec("compressor", 18.5, 60)
HEATER = LoadSpec("heater", 12.0, 20, kind="deferrable", max_off_s=1800.0)
BOILER = LoadSpec("boiler", 9.0, 25, kind="deferrable", max_off_s=600.0)
EV = LoadSpec("ev", 22.0, 10, kind="adjustable", min_pct=25.0)
SERVERS = LoadSpec("servers", 6.0, 100, kind="critical")


@pytest.mark.parametrize(("loads", "kw", "held", "why"), [
    # everything on and long enough: 30 + 18.5 | 22 × (100 − 25) % | 12 + 9
    ([LoadNow(CHILLER, True), LoadNow(COMPRESSOR, True), LoadNow(EV, True, setpoint_pct=100.0),
      LoadNow(HEATER, True), LoadNow(BOILER, True), LoadNow(SERVERS, True)],
     {"interruptible": 48.5, "adjustable": 16.5, "deferrable": 21.0}, 0.0,
     {"servers": "critical"}),
    # the chiller on for 60 s of its 120; the compressor off; the EV at 50 %: 22 × 25 %
    ([LoadNow(CHILLER, True, on_for_s=60.0), LoadNow(COMPRESSOR, False),
      LoadNow(EV, True, setpoint_pct=50.0)],
     {"interruptible": 0.0, "adjustable": 5.5, "deferrable": 0.0}, 0.0,
     {"chiller": "minimum on time", "compressor": "off"}),
    # held by a command: not offered again, counted as held (the EV lowered to 40 %: 22 × 60 %)
    ([LoadNow(CHILLER, False, held=True), LoadNow(EV, True, held=True, setpoint_pct=40.0),
      LoadNow(COMPRESSOR, True, on_for_s=600.0)],
     {"interruptible": 18.5, "adjustable": 0.0, "deferrable": 0.0}, 30.0 + 13.2,
     {"chiller": "held", "ev": "held"}),
    # an EV at its minimum, or with its setpoint unknown, offers nothing
    ([LoadNow(EV, True, setpoint_pct=25.0)], dict.fromkeys(("interruptible", "adjustable",
                                                            "deferrable"), 0.0), 0.0,
     {"ev": "at its minimum"}),
    ([LoadNow(EV, True)], dict.fromkeys(("interruptible", "adjustable", "deferrable"), 0.0), 0.0,
     {"ev": "setpoint unknown"}),
    # a learned kW replaces the rating: the chiller really draws 24
    ([LoadNow(CHILLER, True, learned_kw=24.0)],
     {"interruptible": 24.0, "adjustable": 0.0, "deferrable": 0.0}, 0.0, {}),
])
def test_flexibility_per_class(loads: list[LoadNow], kw: dict[str, float], held: float,
                               why: dict[str, str]) -> None:
    f = flexibility(loads)
    assert f.kw == pytest.approx(kw)
    assert f.total_kw == pytest.approx(sum(kw.values()))
    assert f.held_kw == pytest.approx(held)
    assert {r["load"]: r["why_not"] for r in f.loads if r["why_not"]} == why


def test_the_default_minimum_on_time_applies_to_loads_without_their_own() -> None:
    f = flexibility([LoadNow(COMPRESSOR, True, on_for_s=3.0)], min_on_s=5.0)
    assert f.total_kw == 0.0 and f.loads[0]["why_not"] == "minimum on time"
    assert flexibility([LoadNow(COMPRESSOR, True, on_for_s=5.0)], min_on_s=5.0).total_kw == 18.5


def test_deferrable_loads_are_offered_for_their_shortest_maximum_off_time() -> None:
    f = flexibility([LoadNow(HEATER, True), LoadNow(BOILER, True)])
    assert f.kw["deferrable"] == 21.0 and f.deferrable_for_s == 600.0
    assert flexibility([LoadNow(CHILLER, True)]).deferrable_for_s is None


@pytest.mark.parametrize("kwargs", [{"guarantee": True}, {"excluded": True}])
def test_guarantee_and_exclusion_offer_nothing(kwargs: dict[str, bool]) -> None:
    f = flexibility([LoadNow(CHILLER, True), LoadNow(HEATER, True),
                     LoadNow(EV, True, setpoint_pct=100.0), LoadNow(SERVERS, True),
                     LoadNow(COMPRESSOR, False, held=True)], **kwargs)
    assert f.total_kw == 0.0
    assert f.blocked == ("guarantee" if "guarantee" in kwargs else "excluded")
    assert f.held_kw == 18.5  # what commands hold stays reported
    assert {r["why_not"] for r in f.loads} == {f.blocked, "critical", "held"}
