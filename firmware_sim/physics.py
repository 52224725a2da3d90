"""The electrical model of a simulated site: what its main meter measures at time ``t``.

Total active power is an uncontrolled base load with a daily cycle and noise, plus the rated
power of every switchable load whose relay is on. It is split over three phases with a small
fixed imbalance; voltage, current and power factor per phase are consistent with it
(``P = V * I * PF`` per phase, total = sum of phases). Import energy integrates the total power
between samples.

Time is always passed in (unix seconds), never read from a clock here: the model is a pure
function of ``t``, the relay states and the sampling history. The noise of a given second is
drawn from a generator seeded by ``(site.seed, second)``, so repeated queries within the same
second agree and a run is reproducible whatever the order of the queries.

Besides the per-phase basics the model serves what meters derive from them: reactive and
apparent power (``S = P / PF``, ``Q = sqrt(S^2 - P^2)``, inductive, so ``Q >= 0``), line
voltages (phasors 120 degrees apart: ``V12 = sqrt(V1^2 + V2^2 + V1 V2)``), total power factor and
per-phase energy registers (each phase integrated on its own; they sum to the total).

One EV charging point hangs behind the meter (three-phase, a car that takes up to
:data:`EV_MAX_CURRENT_A`): its current setpoint starts at 0 A (the car waits, IEC 61851 state
B1) and is changed with :meth:`SitePhysics.write_point` (``ev_setpoint_a``), as a Modbus master
writing the charger's setpoint register would. At 6 A or more it charges (state C2) at the
site's power factor, and its power is part of the site's load. Quantities that do not exist at
a moment are NaN (the charger's power factor while it draws nothing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from lmt.config.site import SimLoad, SiteConfig

PHASES = ("l1", "l2", "l3")

#: Canonical quantity names (as used by the profiles' point names) a sample contains.
LINES = ("l1_l2", "l2_l3", "l3_l1")

#: Canonical quantity names (as used by the profiles' point names) a sample contains.
QUANTITIES: tuple[str, ...] = (
    *(f"voltage_{p}_v" for p in PHASES),
    *(f"voltage_{ln}_v" for ln in LINES),
    *(f"current_{p}_a" for p in PHASES),
    *(f"power_{p}_w" for p in PHASES),
    *(f"reactive_power_{p}_var" for p in PHASES),
    *(f"apparent_power_{p}_va" for p in PHASES),
    *(f"power_factor_{p}" for p in PHASES),
    "power_w",
    "reactive_power_var",
    "apparent_power_va",
    "power_factor",
    "frequency_hz",
    "phase_sequence_ok",
    "import_energy_kwh",
    "export_energy_kwh",
    *(f"import_energy_{p}_kwh" for p in PHASES),
    *(f"export_energy_{p}_kwh" for p in PHASES),
    # the EV charging point
    "ev_setpoint_a",
    "ev_current_limit_a",
    *(f"ev_current_{p}_a" for p in PHASES),
    *(f"ev_power_{p}_w" for p in PHASES),
    "ev_power_w",
    "ev_power_factor",
    "ev_import_energy_kwh",
    "ev_mode3_state",
    "ev_charging",
    "ev_available",
    "ev_meter_initialised",
    "ev_meter_age_s",
)

#: The charger's station limit and the car's maximum charging current, per phase.
EV_MAX_CURRENT_A = 32.0
#: Below this setpoint IEC 61851 does not allow charging: the charger pauses the car.
EV_MIN_CURRENT_A = 6.0
#: The charger's own energy register at start (energy delivered to cars so far).
EV_START_ENERGY_KWH = 4321.0

#: Names a master may write (:meth:`SitePhysics.write_point`).
WRITABLE: tuple[str, ...] = ("ev_setpoint_a",)


def mode3_code(state: str) -> int:
    """An IEC 61851 Mode 3 state (``"A"``, ``"B1"``, ``"C2"`` ...) as a 16-bit code.

    The state's first two ASCII characters, the first in the low byte: ``"A"`` = 0x0041,
    ``"B1"`` = 0x3142, ``"C2"`` = 0x3243 - how a charger that reports the state as text
    (Alfen: registers 1201-1205, two characters per register) reads as one little-endian word.
    """
    raw = state.encode("ascii")[:2].ljust(2, b"\0")
    return raw[0] | (raw[1] << 8)

_VOLTAGE_NOISE = 0.003  # ± fraction of the nominal voltage, per phase
_FREQUENCY_NOISE_HZ = 0.02  # ± deviation from the nominal frequency
_IMBALANCE = 0.02  # ± fraction of the per-phase share
_SECONDS_PER_DAY = 86_400.0

# Noise of one second: load kW, per-phase voltage deviation (fraction), frequency deviation Hz.
_Noise = tuple[float, tuple[float, float, float], float]

# Unit aliases: a point named with the left suffix is served the right quantity times factor.
_ALIASES: tuple[tuple[str, str, float], ...] = (
    ("_kw", "_w", 1e-3),
    ("_kvar", "_var", 1e-3),
    ("_kva", "_va", 1e-3),
    ("_wh", "_kwh", 1e3),
)


def hour_of_day(t: float) -> float:
    """Hour of the day (UTC, fractional) of unix time ``t``."""
    return (t % _SECONDS_PER_DAY) / 3600.0


def lookup(quantities: Mapping[str, float], name: str) -> float:
    """The value of point ``name`` in a sample, with unit aliases; unknown names give 0.0.

    ``power_kw`` and ``power_l1_kw`` are served from ``power_w`` / ``power_l1_w`` in kW
    (likewise ``_kvar`` and ``_kva``), ``import_energy_wh`` from ``import_energy_kwh`` in Wh.
    """
    value = quantities.get(name)
    if value is not None:
        return value
    canonical = canonical_name(name)
    if canonical is None:
        return 0.0
    base, factor = canonical
    return quantities[base] * factor


def canonical_name(name: str) -> tuple[str, float] | None:
    """``(quantity, factor)`` that serves point ``name``, or None if the model does not know it."""
    if name in QUANTITIES:
        return name, 1.0
    for suffix, target, factor in _ALIASES:
        if name.endswith(suffix):
            base = name[: -len(suffix)] + target
            if base in QUANTITIES:
                return base, factor
    return None


def is_known(name: str) -> bool:
    """Whether the model serves a value for point ``name`` (otherwise it reads 0)."""
    return canonical_name(name) is not None


class SitePhysics:
    """Relay states, power and energy of a :class:`~lmt.config.site.SiteConfig`."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site.site
        self._loads: dict[str, SimLoad] = {load.relay: load for load in site.loads}
        self._on: dict[str, bool] = {load.relay: load.on for load in site.loads}
        # A fixed per-phase imbalance that sums to zero: the phase shares sum to exactly 1.
        rng = np.random.default_rng([self.site.seed, 1])
        dev = rng.uniform(-_IMBALANCE, _IMBALANCE, size=3)
        dev -= dev.mean()
        self._shares = tuple(float(s) for s in (1.0 + dev) / 3.0)
        # (second, noise of that second); replaced as one tuple so readers never see a mix.
        self._noise_cache: tuple[int, _Noise] | None = None
        self._energy_kwh = float(self.site.import_energy_kwh)
        # Per-phase import registers: the start reading split like the load, then integrated.
        self._phase_energy_kwh = [self._energy_kwh * share for share in self._shares]
        self._ev_energy_kwh = EV_START_ENERGY_KWH
        self._ev_setpoint_a = 0.0
        self._last_t: float | None = None
        self._last_kw = 0.0
        self._last_phase_kw: tuple[float, ...] = (0.0, 0.0, 0.0)
        self._last_ev_kw = 0.0

    # -- loads -------------------------------------------------------------------------------

    @property
    def loads(self) -> dict[str, SimLoad]:
        """The switchable loads, keyed by relay (``"<device>.<point>"``)."""
        return dict(self._loads)

    def load_for(self, relay: str) -> SimLoad | None:
        """The load switched by relay ``"<device>.<point>"``, if any."""
        return self._loads.get(relay)

    def relay_on(self, relay: str) -> bool:
        """Whether the load on ``relay`` is supplied; False for a relay with no load."""
        return self._on.get(relay, False)

    def set_relay(self, relay: str, on: bool, t: float | None = None) -> SimLoad | None:
        """Switch the load on ``relay``; returns it (None if no load hangs on that relay).

        With ``t``, energy is first integrated up to ``t`` at the old power, so the switch
        lands exactly at ``t`` in the energy register.
        """
        load = self._loads.get(relay)
        if load is None:
            return None
        if t is not None:
            self._integrate(t)
        self._on[relay] = bool(on)
        if t is not None:
            self._restart_at(t)
        return load

    def loads_on(self) -> dict[str, bool]:
        """On/off state of every load, by load name."""
        return {load.name: self._on[relay] for relay, load in self._loads.items()}

    def switched_kw(self) -> float:
        """Rated power of the loads that are on."""
        return sum(load.kw for relay, load in self._loads.items() if self._on[relay])

    # -- the EV charging point ---------------------------------------------------------------

    @property
    def ev_setpoint_a(self) -> float:
        """The charging current the charger was last told (A per phase)."""
        return self._ev_setpoint_a

    def ev_current_a(self) -> float:
        """The current the car draws per phase: the setpoint within the car's limit, or 0."""
        limit = min(max(self._ev_setpoint_a, 0.0), EV_MAX_CURRENT_A)
        return limit if limit >= EV_MIN_CURRENT_A else 0.0

    def ev_mode3_state(self) -> str:
        """IEC 61851 state: ``"C2"`` while charging, ``"B1"`` (connected, paused) otherwise."""
        return "C2" if self.ev_current_a() > 0.0 else "B1"

    def write_point(self, name: str, value: float | bool | None, t: float | None = None) -> bool:
        """A master wrote ``value`` to a writable point named ``name``; True if the model uses it.

        ``ev_setpoint_a`` sets the charging current (``None``/NaN: 0 A). With ``t``, energy is
        integrated up to ``t`` at the old power first, as for :meth:`set_relay`.
        """
        if name not in WRITABLE:
            return False
        amps = 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) \
            else float(value)
        if t is not None:
            self._integrate(t)
        self._ev_setpoint_a = amps
        if t is not None:
            self._restart_at(t)
        return True

    # -- power -------------------------------------------------------------------------------

    def _noise_at(self, t: float) -> _Noise:
        """(load kW, per-phase voltage fraction, frequency Hz) noise of the second of ``t``."""
        second = math.floor(t)
        cached = self._noise_cache
        if cached is not None and cached[0] == second:
            return cached[1]
        rng = np.random.default_rng([self.site.seed, 2, second % (1 << 63)])
        load = float(rng.normal(0.0, self.site.noise_kw)) if self.site.noise_kw > 0 else 0.0
        volts = rng.uniform(-_VOLTAGE_NOISE, _VOLTAGE_NOISE, size=3)
        freq = float(rng.uniform(-_FREQUENCY_NOISE_HZ, _FREQUENCY_NOISE_HZ))
        noise: _Noise = (load, (float(volts[0]), float(volts[1]), float(volts[2])), freq)
        self._noise_cache = (second, noise)
        return noise

    def base_load_kw(self, t: float) -> float:
        """Uncontrolled load at ``t``: daily cosine around ``peak_hour`` plus noise, >= 0."""
        s = self.site
        cycle = math.cos(2.0 * math.pi * (hour_of_day(t) - s.peak_hour) / 24.0)
        kw = s.base_load_kw * (1.0 + s.daily_swing * cycle) + self._noise_at(t)[0]
        return max(0.0, kw)

    def _voltages(self, t: float) -> tuple[float, float, float]:
        volts = self._noise_at(t)[1]
        v = self.site.voltage_v
        return (v * (1.0 + volts[0]), v * (1.0 + volts[1]), v * (1.0 + volts[2]))

    def _ev_phase_w(self, t: float) -> tuple[float, float, float]:
        amps = self.ev_current_a()
        pf = self.site.power_factor
        v1, v2, v3 = self._voltages(t)
        return (v1 * amps * pf, v2 * amps * pf, v3 * amps * pf)

    def _phase_w(self, t: float) -> tuple[float, float, float]:
        """Active power per phase at ``t``: the shared load split by the imbalance, plus the EV."""
        shared_w = (self.base_load_kw(t) + self.switched_kw()) * 1000.0
        ev = self._ev_phase_w(t)
        total_w = shared_w + sum(ev)
        p1 = shared_w * self._shares[0] + ev[0]
        p2 = shared_w * self._shares[1] + ev[1]
        return (p1, p2, total_w - p1 - p2)

    def power_kw(self, t: float) -> float:
        """Total active power at ``t``: base load, the loads that are on and the EV."""
        shared = self.base_load_kw(t) + self.switched_kw()
        return shared + sum(self._ev_phase_w(t)) / 1000.0

    # -- energy ------------------------------------------------------------------------------

    @property
    def import_energy_kwh(self) -> float:
        """Import energy register as of the last sample."""
        return self._energy_kwh

    def _restart_at(self, t: float) -> None:
        """After a change of state at ``t``: integrate on from ``t`` at the new power."""
        if self._last_t is not None and t >= self._last_t:
            self._last_kw = self.power_kw(t)
            self._last_phase_kw = tuple(w / 1000.0 for w in self._phase_w(t))
            self._last_ev_kw = sum(self._ev_phase_w(t)) / 1000.0

    def _integrate(self, t: float) -> None:
        """Advance the energy registers to ``t`` (trapezoid from the previous sample)."""
        kw = self.power_kw(t)
        phase_kw = tuple(w / 1000.0 for w in self._phase_w(t))
        ev_kw = sum(self._ev_phase_w(t)) / 1000.0
        if self._last_t is None:
            self._last_t, self._last_kw = t, kw
            self._last_phase_kw, self._last_ev_kw = phase_kw, ev_kw
            return
        if t < self._last_t:  # clock went backwards: keep the register, do not integrate
            return
        hours = (t - self._last_t) / 3600.0
        self._energy_kwh += (self._last_kw + kw) / 2.0 * hours
        for i in range(3):
            self._phase_energy_kwh[i] += (self._last_phase_kw[i] + phase_kw[i]) / 2.0 * hours
        self._ev_energy_kwh += (self._last_ev_kw + ev_kw) / 2.0 * hours
        self._last_t, self._last_kw = t, kw
        self._last_phase_kw, self._last_ev_kw = phase_kw, ev_kw

    # -- samples -----------------------------------------------------------------------------

    def quantities(self, t: float) -> dict[str, float]:
        """Every quantity at ``t`` (energy as of the last sample); does not advance energy."""
        s = self.site
        phase_w = self._phase_w(t)
        voltages = self._voltages(t)
        _, _, freq_noise = self._noise_at(t)
        pf = s.power_factor
        q_per_p = math.sqrt(max(0.0, 1.0 / (pf * pf) - 1.0))  # Q / P at this power factor
        ev_amps = self.ev_current_a()
        ev_w = self._ev_phase_w(t)
        out: dict[str, float] = {}
        for i, ph in enumerate(PHASES):
            v = voltages[i]
            out[f"voltage_{ph}_v"] = v
            out[f"current_{ph}_a"] = phase_w[i] / (v * pf)
            out[f"power_{ph}_w"] = phase_w[i]
            out[f"reactive_power_{ph}_var"] = phase_w[i] * q_per_p
            out[f"apparent_power_{ph}_va"] = phase_w[i] / pf
            out[f"power_factor_{ph}"] = pf
            out[f"import_energy_{ph}_kwh"] = self._phase_energy_kwh[i]
            out[f"export_energy_{ph}_kwh"] = 0.0
            out[f"ev_current_{ph}_a"] = ev_amps
            out[f"ev_power_{ph}_w"] = ev_w[i]
        for ln, (a, b) in zip(LINES, ((0, 1), (1, 2), (2, 0)), strict=True):
            va, vb = voltages[a], voltages[b]
            out[f"voltage_{ln}_v"] = math.sqrt(va * va + vb * vb + va * vb)
        p_w = sum(phase_w)
        out["power_w"] = p_w
        out["reactive_power_var"] = p_w * q_per_p
        out["apparent_power_va"] = p_w / pf
        out["power_factor"] = pf
        out["frequency_hz"] = s.frequency_hz + freq_noise
        out["phase_sequence_ok"] = 1.0
        out["import_energy_kwh"] = self._energy_kwh
        out["export_energy_kwh"] = 0.0
        out["ev_setpoint_a"] = self._ev_setpoint_a
        out["ev_current_limit_a"] = min(max(self._ev_setpoint_a, 0.0), EV_MAX_CURRENT_A)
        out["ev_power_w"] = sum(ev_w)
        out["ev_power_factor"] = pf if ev_amps > 0.0 else math.nan
        out["ev_import_energy_kwh"] = self._ev_energy_kwh
        out["ev_mode3_state"] = float(mode3_code(self.ev_mode3_state()))
        out["ev_charging"] = 1.0 if ev_amps > 0.0 else 0.0
        out["ev_available"] = 1.0
        out["ev_meter_initialised"] = 1.0
        out["ev_meter_age_s"] = t % 1.0  # the charger reads its meter on every whole second
        return out

    def sample(self, t: float) -> dict[str, float]:
        """Advance the energy registers to ``t`` and return every quantity at ``t``."""
        self._integrate(t)
        return self.quantities(t)
