"""Every theft, tamper and loss signature the simulator can show is detected by the ledger,
within its configured delay and not before, and cleared when it is gone.

The site's physics (``lmt.firmware_sim.physics``) runs on a synthetic clock stepped every
5 s; each ledger meter is read as the agent reads it — power, voltage and current every step,
energy registers and DL/T 645 event counters every 60 s and the registers again at once after
an interval boundary — through the simulator's register encoding and the driver's decoding,
into ``Sample``s made by ``lmt.agent.ledger.to_sample`` with the real profiles, and fed to the
pure ledger configured by ``lmt.agent.ledger.ledger_config`` (``tests/analytics/simsite.py``).

The site: a main meter (SDM630, float32 registers) and two sub-meters whose scopes split the
site exactly — ``sub-a`` (SDM630: the chiller and 60 % of the base load) and ``sub-b`` (a
DL/T 645 meter, BCD registers and event counters: the heater, 40 % of the base load and the
EV charging point) — in one loss group. Every test also checks that nothing else was raised.

Loss of voltage and phase break come from the meter's ``pt_loss`` (its voltage input on a phase
reduced: voltage and power × ``seen``, the current as it is) and ``phase_break`` (neither
voltage nor current on a phase at that meter; the site's load, and so the main meter, unchanged)
signatures. Each also shows as a voltage imbalance (and a phase break as a current imbalance:
the broken phase carries nothing), which is asserted with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Literal

import pytest

from lmt.analytics.theft import (
    CtBypassRule,
    ImbalanceRule,
    PhaseLossRule,
    RegisterStoppedRule,
    ReversePowerRule,
    VoltageLossRule,
)
from lmt.config.site import CtShunt, PtLoss, SiteConfig, Tamper
from tests.analytics.simsite import Kept, SimLedger, indicators, local_midnight

T0 = local_midnight(date(2026, 7, 15))  # a Wednesday, local midnight (an interval boundary)
STEP_S = 5.0
SLOW_S = 60.0  # the registers' and counters' poll interval
INTERVAL_S = 900.0
DELAY_S = 60.0  # the phase detectors' delay and clear delay (the meter's 60 s)
assert CtBypassRule().delay_s == ReversePowerRule().delay_s == DELAY_S
assert VoltageLossRule().delay_s == VoltageLossRule().clear_delay_s == DELAY_S
assert PhaseLossRule().delay_s == PhaseLossRule().clear_delay_s == ImbalanceRule().delay_s == DELAY_S
STOPPED_S = RegisterStoppedRule().delay_s  # 900 s
DECREASE_CLEAR_S = 900.0  # register_decreased: cleared after 900 s of reads that do not go down
RAISE_AFTER, CLEAR_AFTER = 3, 2  # the loss group's N and M (not the defaults 2 and 2)
METERS = ("main-meter", "sub-a", "sub-b")


def site(sub_b_events: dict[str, int] | None = None) -> SiteConfig:
    """20 kW base load (noise 0.3 kW), a 15 kW chiller behind sub-a (27 kW) and a 10 kW heater
    behind sub-b (18 kW): about 45 kW, under the DL/T 645 profile's 79.9999 kW."""
    sub_b: dict[str, object] = {"name": "sub-b", "profile": "dlt645-2007-3phase", "line": "mains",
                                "address": "202300000001",
                                "metering": {"loads": ["heater"], "base_share": 0.4, "ev": True},
                                "events": sub_b_events or {}}
    return SiteConfig.model_validate({
        "site": {"name": "signatures", "seed": 5, "base_load_kw": 20.0, "noise_kw": 0.3},
        "lines": [{"name": "mains", "protocol": "dlt645"}],
        "devices": [
            {"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
            {"name": "relays", "profile": "generic-relay-8", "device_id": 2},
            {"name": "sub-a", "profile": "eastron-sdm630", "device_id": 3,
             "metering": {"loads": ["chiller"], "base_share": 0.6}},
            sub_b,
        ],
        "loads": [{"name": "chiller", "relay": "relays.relay_1", "kw": 15.0},
                  {"name": "heater", "relay": "relays.relay_2", "kw": 10.0}]})


def sim(config: SiteConfig | None = None) -> SimLedger:
    return SimLedger(config or site(), main="main-meter", meters=METERS, t0=T0, step_s=STEP_S,
                     slow_s=SLOW_S, ledger={
                         "loss_groups": [{"name": "site", "main": "main-meter",
                                          "subs": ["sub-a", "sub-b"], "raise_after": RAISE_AFTER,
                                          "clear_after": CLEAR_AFTER}]})


@dataclass
class Run:
    sim: SimLedger
    on: float  # the step at which the signature started (the next reading is the first to show it)
    off: float  # ... and ended (the end of the run, for one that was not stopped)

    def of(self, type_: str, indicator: str, meter: str | None = None) -> list[Kept]:
        """The events of that type and indicator (or loss group), in order."""
        out = []
        for k in self.sim.events():
            data = k.record.body["data"]
            if k.record.body["type"] == type_ and (data.get("indicator") or data.get("group")) \
                    == indicator and (meter is None or data.get("meter", meter) == meter):
                out.append(k)
        return out

    def one(self, type_: str, indicator: str, meter: str | None = None) -> Kept:
        got = self.of(type_, indicator, meter)
        assert len(got) == 1, (type_, indicator, indicators(self.sim.events()))
        return got[0]


ON = T0 + 2 * INTERVAL_S + 10.0  # 10 s into an interval
OFF = T0 + 5 * INTERVAL_S  # on a boundary


def run(start: Callable[[SimLedger, float], object],
        stop: Callable[[SimLedger, float], object] | None,
        *, on: float = ON, hold_s: float = OFF - ON, after_s: float = 2400.0,
        config: SiteConfig | None = None) -> Run:
    """Run the clean site until ``on``, start the signature there (at that step's time, as the
    control channel would), hold it ``hold_s`` (by default until ``OFF``), stop it and run
    ``after_s`` more."""
    s = sim(config)
    s.run_until(on)
    assert s.events() == [], indicators(s.events())  # clean until then
    on = s.t
    start(s, on)
    s.run_until(on + hold_s)
    off = s.t
    if stop is not None:
        stop(s, off)
        s.run_until(off + after_s)
    return Run(s, on, off)


def tamper(device: str, t: Tamper) -> Callable[[SimLedger, float], None]:
    return lambda s, at: s.physics.set_tamper(device, t, at)


def reads_at(t: float) -> bool:
    """Whether the registers and counters are read at the step at ``t`` (every 60 s from T0;
    the interval boundaries fall on such steps, so no extra read after a boundary)."""
    return round(t - T0) % round(SLOW_S) == 0


def reads_after(t: float) -> list[float]:
    """The next register reads after ``t``."""
    first = T0 + (math.floor((t - T0) / SLOW_S) + 1) * SLOW_S
    return [first + i * SLOW_S for i in range(3)]


def assert_raised_at_delay(r: Run, k: Kept, delay_s: float, first_seen: float) -> None:
    """Raised by the first reading at ``since + delay_s``, ``since`` being the first reading that
    showed the condition: no earlier, no later."""
    since = k.record.body["data"]["since"]
    assert since == first_seen, (since - r.on, first_seen - r.on)
    assert k.t == since + delay_s, (k.t - since, delay_s)


# -- the phase signatures ----------------------------------------------------------------------
#
# The signature starts 10 s into an interval (ON) and ends on a boundary (OFF), 3 intervals
# later: the loss group sees the interval it started in and the next two over the limit
# (raised at the end of the third), and the two after OFF within it (cleared at their end).

FIRST_OVER = ON - 10.0  # the interval the signature started in
RAISED_AT = FIRST_OVER + RAISE_AFTER * INTERVAL_S
CLEARED_AT = OFF + CLEAR_AFTER * INTERVAL_S


def assert_loss_raised_and_cleared(r: Run, *, pct: tuple[float, float]) -> None:
    loss = r.one("loss_exceeded", "site")
    data = loss.record.body["data"]
    assert (loss.t, data["since"], data["intervals_over"]) == (RAISED_AT, FIRST_OVER, RAISE_AFTER)
    assert pct[0] < data["loss_pct"] < pct[1], data["loss_pct"]
    cleared = r.one("loss_cleared", "site")
    assert (cleared.t, cleared.record.body["data"]["intervals_under"]) == (CLEARED_AT, CLEAR_AFTER)


def test_a_bypassed_ct_on_one_phase() -> None:
    # sub-b's L2 current transformer shorted: the meter sees none of L2's current (seen = 0)
    r = run(tamper("sub-b", Tamper(ct_shunt=CtShunt(phase="l2", seen=0.0))), tamper("sub-b", Tamper()))
    first = r.on + STEP_S  # the first reading that shows it
    ct = r.one("theft_indicator", "ct_bypass", "sub-b")
    assert ct.record.body["data"]["phase"] == "l2" and ct.record.body["data"]["erc"] == "ERC9"
    assert_raised_at_delay(r, ct, DELAY_S, first)  # 65 s after the shunt
    readings = ct.record.body["data"]["readings"]
    assert readings["current_a"]["l2"] == 0.0 and readings["current_a"]["l1"] > 20.0
    imbalance = r.one("theft_indicator", "current_imbalance", "sub-b")
    assert_raised_at_delay(r, imbalance, DELAY_S, first)
    # the meter's own loss-of-current counter (DL/T 645 18020001), at its next read
    counter = r.one("theft_indicator", "meter_event", "sub-b")
    assert counter.record.body["data"]["readings"]["counter"] == "current_loss_l2"
    assert counter.record.body["data"]["phase"] == "l2"
    assert counter.t == reads_after(r.on)[0]
    # sub-b misses L2 (6 kW of the site's 45: 13 %)
    assert_loss_raised_and_cleared(r, pct=(10.0, 16.0))
    # gone at OFF: the current is back at the next reading, cleared 60 s later
    for ind in ("ct_bypass", "current_imbalance"):
        assert r.one("theft_indicator_cleared", ind, "sub-b").t == r.off + STEP_S + DELAY_S
    assert len(r.sim.events()) == 7  # nothing else


def test_a_partly_shunted_ct_shows_as_current_imbalance() -> None:
    # the simulator's default shunt leaves the meter 2 % of L1's current: 0.8 A of 41 A, far
    # above the loss-of-current threshold (0.5 % of Ib = 0.025 A): not a ct_bypass, but an
    # unbalance of 98 % (limit 30 %), and sub-a misses 9 kW of the site's 45 (20 %)
    r = run(tamper("sub-a", Tamper(ct_shunt=CtShunt(phase="l1"))), tamper("sub-a", Tamper()))
    imbalance = r.one("theft_indicator", "current_imbalance", "sub-a")
    assert_raised_at_delay(r, imbalance, DELAY_S, r.on + STEP_S)
    assert imbalance.record.body["data"]["readings"]["unbalance"] > 0.95
    assert r.of("theft_indicator", "ct_bypass") == []
    assert_loss_raised_and_cleared(r, pct=(17.0, 22.0))
    assert r.one("theft_indicator_cleared", "current_imbalance", "sub-a").t == \
        r.off + STEP_S + DELAY_S
    assert len(r.sim.events()) == 4


@pytest.mark.parametrize(("device", "phase", "pct"), [("main-meter", "l3", (-250.0, -150.0)),
                                                      ("sub-b", "l1", (20.0, 32.0))])
def test_reversed_wiring_on_one_phase(device: str, phase: Literal["l1", "l2", "l3"],
                                      pct: tuple[float, float]) -> None:
    r = run(tamper(device, Tamper(ct_reversed=phase)), tamper(device, Tamper()))
    rev = r.one("theft_indicator", "reverse_power", device)
    assert rev.record.body["data"]["phase"] == phase
    assert_raised_at_delay(r, rev, DELAY_S, r.on + STEP_S)
    assert rev.record.body["data"]["readings"]["phase_kw"][phase] < -5.0
    expected = 4  # reverse_power raised and cleared, loss_exceeded and loss_cleared
    if device == "sub-b":  # the DL/T 645 meter counts it itself (1B010001), read within 60 s
        counter = r.one("theft_indicator", "meter_event", device)
        assert counter.record.body["data"]["readings"]["counter"] == f"reverse_flow_{phase}"
        assert counter.record.body["data"]["erc"] == "ERC9"
        assert counter.t == reads_after(r.on)[0]
        expected += 1
    # the reversed phase counts against its meter's total: the main meter reads a third of
    # the site (a negative loss: the sub-meters sum to more), or sub-b a third of its load
    assert_loss_raised_and_cleared(r, pct=pct)
    assert r.one("theft_indicator_cleared", "reverse_power", device).t == r.off + STEP_S + DELAY_S
    assert len(r.sim.events()) == expected


def test_a_lost_voltage_input_on_one_phase() -> None:
    # 失压法窃电: sub-b's L1 voltage link half open (seen 0.5): it reads 115 V of 230 on L1 and,
    # as it computes P = V I PF, half of L1's power, while L1's current flows as before
    r = run(tamper("sub-b", Tamper(pt_loss=PtLoss(phase="l1", seen=0.5))),
            tamper("sub-b", Tamper()))
    first = r.on + STEP_S  # the first reading that shows it
    lost = r.one("theft_indicator", "voltage_loss", "sub-b")
    data = lost.record.body["data"]
    assert (data["phase"], data["erc"]) == ("l1", "ERC10")
    assert_raised_at_delay(r, lost, DELAY_S, first)  # 65 s after the link was opened
    readings = data["readings"]
    assert 114.5 < readings["voltage_v"]["l1"] < 115.7  # 78 % of 230: 179.4 V
    assert readings["voltage_v"]["l2"] > 228.0 and readings["current_a"]["l1"] > 20.0
    # the phases' voltages unbalanced by half (limit 30 %): raised with it
    imbalance = r.one("theft_indicator", "voltage_imbalance", "sub-b")
    assert_raised_at_delay(r, imbalance, DELAY_S, first)
    assert imbalance.record.body["data"]["readings"]["unbalance"] == pytest.approx(0.5, abs=0.01)
    # the meter's own loss-of-voltage counter (DL/T 645 10000001), at its next read
    counter = r.one("theft_indicator", "meter_event", "sub-b")
    assert counter.record.body["data"]["readings"]["counter"] == "voltage_loss"
    assert counter.record.body["data"]["erc"] == "ERC10"
    assert counter.t == reads_after(r.on)[0]
    # sub-b misses half of L1 (3 kW of the site's 45: 6.7 %, limit 5 %)
    assert_loss_raised_and_cleared(r, pct=(5.5, 8.0))
    # gone at OFF: the voltage is back at the next reading, cleared 60 s later
    for ind in ("voltage_loss", "voltage_imbalance"):
        assert r.one("theft_indicator_cleared", ind, "sub-b").t == r.off + STEP_S + DELAY_S
    assert r.of("theft_indicator", "phase_loss") == r.of("theft_indicator", "ct_bypass") == []
    assert r.of("theft_indicator", "current_imbalance") == []  # the current is as it was
    assert len(r.sim.events()) == 7  # nothing else


@pytest.mark.parametrize(("device", "phase", "pct"), [("sub-a", "l2", (17.0, 22.0)),
                                                      ("sub-b", "l3", (11.0, 16.0))])
def test_a_broken_phase(device: str, phase: Literal["l1", "l2", "l3"],
                        pct: tuple[float, float]) -> None:
    # 断相 at the meter: neither voltage nor current on one phase (the SDM630's float32 and the
    # DL/T 645 meter's BCD alike) while the others carry load
    r = run(tamper(device, Tamper(phase_break=phase)), tamper(device, Tamper()))
    first = r.on + STEP_S
    broken = r.one("theft_indicator", "phase_loss", device)
    data = broken.record.body["data"]
    assert (data["phase"], data["erc"]) == (phase, "ERC10")
    assert_raised_at_delay(r, broken, DELAY_S, first)  # 65 s after the break
    readings = data["readings"]
    assert readings["voltage_v"][phase] == 0.0 and readings["current_a"][phase] == 0.0
    assert max(readings["current_a"].values()) > 10.0
    # a dead phase unbalances both the voltages and the currents (100 %): raised with it; no
    # ct_bypass (its voltage is gone: that detector cannot judge) and no loss of voltage (no
    # current)
    for ind in ("voltage_imbalance", "current_imbalance"):
        assert_raised_at_delay(r, r.one("theft_indicator", ind, device), DELAY_S, first)
    assert r.of("theft_indicator", "ct_bypass") == r.of("theft_indicator", "voltage_loss") == []
    # the site's load is unchanged (the main meter still sees the phase): the group loses it
    assert_loss_raised_and_cleared(r, pct=pct)
    for ind in ("phase_loss", "voltage_imbalance", "current_imbalance"):
        assert r.one("theft_indicator_cleared", ind, device).t == r.off + STEP_S + DELAY_S
    assert len(r.sim.events()) == 8  # nothing else: no meter counter either


# -- losses ------------------------------------------------------------------------------------


def test_an_unmetered_load_between_the_main_meter_and_its_sub_meters() -> None:
    # 4 kW tapped before the sub-meters from a boundary on: every interval of it loses 1 kWh
    # of about 13 (8 %, limit 5 %); raised after N = 3 such intervals, cleared after M = 2
    # within the limit once it is removed (again at a boundary)
    on = T0 + 2 * INTERVAL_S
    r = run(lambda s, at: s.physics.set_unmetered_kw(4.0, at),
            lambda s, at: s.physics.set_unmetered_kw(0.0, at),
            on=on, hold_s=4 * INTERVAL_S, after_s=3 * INTERVAL_S)
    assert r.on == on and r.off == on + 4 * INTERVAL_S
    losses = r.sim.losses("site")
    before = [x for x in losses if x["start"] < on]
    assert len(before) == 2
    assert all(x["status"] == "within" and abs(x["loss_kwh"]) < 0.01 for x in before)
    during = [x for x in losses if on <= x["start"] < r.off]
    assert [(x["status"], x["intervals_over"]) for x in during] == [
        ("over", 1), ("over", 2), ("over", 3), ("over", 0)]  # raised with the third
    for x in during:
        assert x["loss_kwh"] == pytest.approx(4.0 * 0.25, abs=0.005)  # 4 kW × 15 min
        assert x["main_kwh"] == pytest.approx(x["sub_kwh"] + 1.0, abs=0.005)
    loss = r.one("loss_exceeded", "site")
    data = loss.record.body["data"]
    assert loss.t == data["at"] == on + RAISE_AFTER * INTERVAL_S  # the N-th's end, not before
    assert (data["since"], data["intervals_over"]) == (on, RAISE_AFTER)
    assert data["loss_kwh"] == pytest.approx(1.0, abs=0.005)
    assert data["limits"] == {"method": "relative", "relative_pct": 5.0, "absolute_kwh": 1.0,
                              "min_main_kwh": 1.0, "raise_after": RAISE_AFTER,
                              "clear_after": CLEAR_AFTER}  # as configured (agent defaults)
    cleared = r.one("loss_cleared", "site")
    assert cleared.t == r.off + CLEAR_AFTER * INTERVAL_S
    assert (cleared.record.body["data"]["since"], cleared.record.body["data"]["raised_at"]) == (
        on, loss.t)
    assert len(r.sim.events()) == 2  # no theft indicator: the meters themselves are clean


# -- the registers -----------------------------------------------------------------------------


def test_a_stopped_register() -> None:
    # sub-a's registers stand still while its power and current go on
    r = run(tamper("sub-a", Tamper(registers="stopped")), tamper("sub-a", Tamper()))
    stopped = r.one("theft_indicator", "register_stopped", "sub-a")
    data = stopped.record.body["data"]
    # the first register read after the stop still shows what was counted before it (10 s);
    # the next one stands: the condition starts there, and is raised 900 s later
    reads = reads_after(r.on)
    assert data["since"] == reads[1]
    assert stopped.t == reads[1] + STOPPED_S  # 1010 s after the stop
    assert data["readings"]["measured_kwh"] >= 0.02 and data["erc"] == "ERC30"
    cleared = r.one("theft_indicator_cleared", "register_stopped", "sub-a")
    moved = reads_after(r.off)[0]  # the first read that has moved again
    assert cleared.t == moved + DELAY_S  # register_stopped clears 60 s after
    # sub-a's intervals count nothing while it stands: the loss group sees all of it
    standing = [x for x in r.sim.intervals("sub-a") if x["start"] >= ON and x["end"] <= OFF]
    assert len(standing) == 2 and all(x["import_kwh"] == 0.0 for x in standing)
    assert_loss_raised_and_cleared(r, pct=(55.0, 65.0))
    assert len(r.sim.events()) == 4


def test_a_decreasing_register() -> None:
    # sub-b's registers count down by what they would have counted up
    r = run(tamper("sub-b", Tamper(registers="decreasing")), tamper("sub-b", Tamper()))
    dec = r.one("theft_indicator", "register_decreased", "sub-b")
    data = dec.record.body["data"]
    # raised by the first register read lower than the one before (delay 0): the first read
    # after the change (10 s counted up before it, 50 s down since)
    assert dec.t == data["since"] == reads_after(r.on)[0]
    reading = data["readings"]["import_kwh"]
    assert reading["after"] < reading["before"] and data["erc"] == "ERC27"
    # it keeps going down: raised once, not per read; cleared 900 s after it counts up again
    cleared = r.one("theft_indicator_cleared", "register_decreased", "sub-b")
    assert cleared.t == reads_after(r.off)[0] + DECREASE_CLEAR_S
    # the ledger's intervals take each decrease as a reset (the energy from the power
    # readings), which the loss group does not judge
    down = [x for x in r.sim.intervals("sub-b") if x["start"] >= FIRST_OVER and x["end"] <= OFF]
    assert len(down) == 3
    assert all(x["quality"] == "register_reset" and x["import_kwh"] > 3.0 for x in down)
    assert {x["status"] for x in r.sim.losses("site") if x["start"] in
            {y["start"] for y in down}} == {"missing"}
    assert len(r.sim.events()) == 2


def test_a_register_jumps_back_once() -> None:
    # the control channel's register_jump_kwh: sub-a's import register steps back 500 kWh
    on = FIRST_OVER + 35.0
    r = run(lambda s, at: s.physics.jump_register("sub-a", -500.0, at), None, on=on, hold_s=2400.0)
    dec = r.one("theft_indicator", "register_decreased", "sub-a")
    data = dec.record.body["data"]
    reads = reads_after(r.on)
    assert dec.t == data["since"] == reads[0]  # the next read: 25 s later
    reading = data["readings"]["import_kwh"]
    assert reading["before"] - reading["after"] == pytest.approx(500.0, abs=1.0)
    # from then on it counts up: cleared 900 s after the first read that went up again
    assert r.one("theft_indicator_cleared", "register_decreased", "sub-a").t == \
        reads[1] + DECREASE_CLEAR_S
    before, jump = [x for x in r.sim.intervals("sub-a")
                    if x["start"] in (FIRST_OVER - INTERVAL_S, FIRST_OVER)]
    assert (before["quality"], jump["quality"]) == ("complete", "register_reset")
    # the energy across the step from the power readings: what the interval before had
    assert jump["import_kwh"] == pytest.approx(before["import_kwh"], abs=0.1)
    assert len(r.sim.events()) == 2


# -- the meter's own event counters -----------------------------------------------------------


def test_the_meter_cover_opened() -> None:
    # sub-b (DL/T 645) had recorded two cover openings before: its first reading is the
    # baseline, not an event; a third opening is one meter_event (ERC37) at the counters'
    # next read (Sample.counters, as to_sample builds them from the profile's
    # event_*_count points, polled with the slow points: within 60 s)
    config = site(sub_b_events={"cover_open": 2, "terminal_cover_open": 1})
    r = run(lambda s, at: s.physics.count_event("sub-b", "cover_open"), None,
            on=FIRST_OVER + 35.0, hold_s=600.0, config=config)
    ev = r.one("theft_indicator", "meter_event", "sub-b")
    data = ev.record.body["data"]
    assert ev.t == reads_after(r.on)[0]  # 25 s later
    assert data["erc"] == "ERC37" and data["phase"] is None
    assert data["readings"] == {"counter": "cover_open", "before": 2, "after": 3, "increase": 1,
                                "previous_read_t": ev.t - SLOW_S}
    assert len(r.sim.events()) == 1


def test_the_meters_own_loss_of_voltage_counter() -> None:
    # the meter's loss-of-voltage count (10000001) rising by two with no signature on it (the
    # control channel's "event"): one meter_event with the increase
    r = run(lambda s, at: s.physics.count_event("sub-b", "voltage_loss", 2), None,
            on=FIRST_OVER + 35.0, hold_s=600.0)
    ev = r.one("theft_indicator", "meter_event", "sub-b")
    assert ev.record.body["data"]["erc"] == "ERC10"
    assert ev.record.body["data"]["readings"]["counter"] == "voltage_loss"
    assert ev.record.body["data"]["readings"]["increase"] == 2
    assert ev.t == reads_after(r.on)[0]
    assert len(r.sim.events()) == 1
