"""The site model's derived quantities and its EV charging point, directly (no server)."""

from __future__ import annotations

import math

import pytest

from lmt.config.site import SimDevice, SiteConfig, SiteInfo
from lmt.firmware_sim.physics import (
    EV_MAX_CURRENT_A,
    EV_START_ENERGY_KWH,
    QUANTITIES,
    SitePhysics,
    canonical_name,
    is_known,
    lookup,
    mode3_code,
)

T0 = 1_750_000_000.0


def _site(**site: float) -> SiteConfig:
    return SiteConfig(site=SiteInfo(**site),
                      devices=[SimDevice(name="meter", profile="eastron-sdm630")])


def test_reactive_apparent_and_power_factor_are_consistent() -> None:
    q = SitePhysics(_site(power_factor=0.9)).quantities(T0)
    for ph in ("l1", "l2", "l3"):
        p, s, r = q[f"power_{ph}_w"], q[f"apparent_power_{ph}_va"], q[f"reactive_power_{ph}_var"]
        assert s == pytest.approx(math.hypot(p, r), rel=1e-12)
        assert p / s == pytest.approx(q[f"power_factor_{ph}"], rel=1e-12)
        assert s == pytest.approx(q[f"voltage_{ph}_v"] * q[f"current_{ph}_a"], rel=1e-12)
        assert r > 0  # inductive
    assert q["reactive_power_var"] == pytest.approx(
        sum(q[f"reactive_power_{ph}_var"] for ph in ("l1", "l2", "l3")), rel=1e-12)
    assert q["apparent_power_va"] == pytest.approx(math.hypot(q["power_w"], q["reactive_power_var"]))
    assert q["power_factor"] == 0.9


def test_line_voltages_are_the_phasor_differences() -> None:
    q = SitePhysics(_site()).quantities(T0)
    angle = {"l1": 0.0, "l2": -2 * math.pi / 3, "l3": 2 * math.pi / 3}

    def phasor(ph: str) -> complex:
        return q[f"voltage_{ph}_v"] * complex(math.cos(angle[ph]), math.sin(angle[ph]))

    for line, (a, b) in {"l1_l2": ("l1", "l2"), "l2_l3": ("l2", "l3"), "l3_l1": ("l3", "l1")}.items():
        assert q[f"voltage_{line}_v"] == pytest.approx(abs(phasor(a) - phasor(b)), rel=1e-12)
        assert q[f"voltage_{line}_v"] == pytest.approx(230.0 * math.sqrt(3), rel=0.01)


def test_phase_energies_integrate_their_phase_and_sum_to_the_total() -> None:
    phys = SitePhysics(_site(noise_kw=0.0))
    start = phys.quantities(T0)
    assert sum(start[f"import_energy_{ph}_kwh"] for ph in ("l1", "l2", "l3")) == pytest.approx(
        start["import_energy_kwh"], rel=1e-12)
    phys.sample(T0)
    q = phys.sample(T0 + 3600)
    total = sum(q[f"import_energy_{ph}_kwh"] for ph in ("l1", "l2", "l3"))
    assert total == pytest.approx(q["import_energy_kwh"], rel=1e-12)
    gained_l1 = q["import_energy_l1_kwh"] - start["import_energy_l1_kwh"]
    mean_l1_kw = (start["power_l1_w"] + q["power_l1_w"]) / 2000
    assert gained_l1 == pytest.approx(mean_l1_kw, rel=1e-9)
    assert q["export_energy_l1_kwh"] == 0.0


def test_ev_waits_until_it_gets_a_setpoint() -> None:
    q = SitePhysics(_site()).quantities(T0)
    assert q["ev_setpoint_a"] == 0.0 and q["ev_power_w"] == 0.0
    assert q["ev_current_l1_a"] == 0.0 and q["ev_charging"] == 0.0
    assert math.isnan(q["ev_power_factor"])  # no current, no power factor
    assert q["ev_mode3_state"] == mode3_code("B1")
    assert q["ev_import_energy_kwh"] == EV_START_ENERGY_KWH
    assert q["ev_available"] == 1.0 and q["ev_meter_initialised"] == 1.0


def test_ev_setpoint_drives_current_power_state_and_site_load() -> None:
    phys = SitePhysics(_site(noise_kw=0.0))
    before = phys.sample(T0)
    assert phys.write_point("ev_setpoint_a", 16.0, T0) is True
    q = phys.quantities(T0)
    assert q["ev_setpoint_a"] == 16.0 and q["ev_current_limit_a"] == 16.0
    assert q["ev_charging"] == 1.0 and q["ev_mode3_state"] == mode3_code("C2")
    ev_w = sum(q[f"voltage_{ph}_v"] * 16.0 * q["power_factor"] for ph in ("l1", "l2", "l3"))
    assert q["ev_power_w"] == pytest.approx(ev_w, rel=1e-12)
    assert q["power_w"] - before["power_w"] == pytest.approx(ev_w, rel=1e-9)  # behind the meter
    assert q["ev_power_factor"] == q["power_factor"]
    for ph in ("l1", "l2", "l3"):  # still P = V I PF on every phase of the site
        assert q[f"power_{ph}_w"] == pytest.approx(
            q[f"voltage_{ph}_v"] * q[f"current_{ph}_a"] * q[f"power_factor_{ph}"], rel=1e-12)
    # an hour of charging lands in both the charger's and the site's energy registers
    later = phys.sample(T0 + 3600)
    ev_kwh = later["ev_import_energy_kwh"] - EV_START_ENERGY_KWH
    assert ev_kwh == pytest.approx((q["ev_power_w"] + later["ev_power_w"]) / 2000, rel=1e-9)


@pytest.mark.parametrize("setpoint,amps", [(5.9, 0.0), (6.0, 6.0), (40.0, EV_MAX_CURRENT_A),
                                           (-3.0, 0.0), (math.nan, 0.0), (None, 0.0)])
def test_ev_current_limits(setpoint: float | None, amps: float) -> None:
    phys = SitePhysics(_site())
    phys.write_point("ev_setpoint_a", setpoint)
    assert phys.ev_current_a() == amps
    assert phys.quantities(T0)["ev_current_l2_a"] == amps


def test_only_writable_points_are_taken() -> None:
    phys = SitePhysics(_site())
    assert phys.write_point("power_w", 5.0) is False
    assert phys.write_point("ev_setpoint_a", 10.0) is True


def test_mode3_codes_and_meter_age() -> None:
    assert mode3_code("A") == 0x0041 and mode3_code("C2") == 0x3243 and mode3_code("B1") == 0x3142
    q = SitePhysics(_site()).quantities(T0 + 0.25)
    assert q["ev_meter_age_s"] == pytest.approx(0.25)


def test_every_quantity_is_known_with_unit_aliases() -> None:
    q = SitePhysics(_site()).quantities(T0)
    assert set(q) == set(QUANTITIES)
    assert all(is_known(name) for name in QUANTITIES)
    assert canonical_name("reactive_power_kvar") == ("reactive_power_var", 1e-3)
    assert canonical_name("apparent_power_l1_kva") == ("apparent_power_l1_va", 1e-3)
    assert canonical_name("ev_import_energy_wh") == ("ev_import_energy_kwh", 1e3)
    assert lookup(q, "power_l1_kw") == pytest.approx(q["power_l1_w"] / 1000)
    assert lookup(q, "import_energy_l2_wh") == pytest.approx(q["import_energy_l2_kwh"] * 1000)
