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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from lmt.config.site import SimLoad, SiteConfig

PHASES = ("l1", "l2", "l3")

#: Canonical quantity names (as used by the profiles' point names) a sample contains.
QUANTITIES: tuple[str, ...] = (
    *(f"voltage_{p}_v" for p in PHASES),
    *(f"current_{p}_a" for p in PHASES),
    *(f"power_{p}_w" for p in PHASES),
    *(f"power_factor_{p}" for p in PHASES),
    "power_w",
    "power_factor",
    "frequency_hz",
    "import_energy_kwh",
    "export_energy_kwh",
)

_VOLTAGE_NOISE = 0.003  # ± fraction of the nominal voltage, per phase
_FREQUENCY_NOISE_HZ = 0.02  # ± deviation from the nominal frequency
_IMBALANCE = 0.02  # ± fraction of the per-phase share
_SECONDS_PER_DAY = 86_400.0

# Noise of one second: load kW, per-phase voltage deviation (fraction), frequency deviation Hz.
_Noise = tuple[float, tuple[float, float, float], float]

# Unit aliases: a point named with the left suffix is served the right quantity times factor.
_ALIASES: tuple[tuple[str, str, float], ...] = (
    ("_kw", "_w", 1e-3),
    ("_wh", "_kwh", 1e3),
)


def hour_of_day(t: float) -> float:
    """Hour of the day (UTC, fractional) of unix time ``t``."""
    return (t % _SECONDS_PER_DAY) / 3600.0


def lookup(quantities: Mapping[str, float], name: str) -> float:
    """The value of point ``name`` in a sample, with unit aliases; unknown names give 0.0.

    ``power_kw`` and ``power_l1_kw`` are served from ``power_w`` / ``power_l1_w`` in kW,
    ``import_energy_wh`` from ``import_energy_kwh`` in Wh.
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
        self._last_t: float | None = None
        self._last_kw = 0.0

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
        if t is not None and self._last_t is not None and t >= self._last_t:
            self._last_kw = self.power_kw(t)
        return load

    def loads_on(self) -> dict[str, bool]:
        """On/off state of every load, by load name."""
        return {load.name: self._on[relay] for relay, load in self._loads.items()}

    def switched_kw(self) -> float:
        """Rated power of the loads that are on."""
        return sum(load.kw for relay, load in self._loads.items() if self._on[relay])

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

    def power_kw(self, t: float) -> float:
        """Total active power at ``t``: base load plus the loads that are on."""
        return self.base_load_kw(t) + self.switched_kw()

    # -- energy ------------------------------------------------------------------------------

    @property
    def import_energy_kwh(self) -> float:
        """Import energy register as of the last sample."""
        return self._energy_kwh

    def _integrate(self, t: float) -> None:
        """Advance the energy register to ``t`` (trapezoid from the previous sample)."""
        kw = self.power_kw(t)
        if self._last_t is None:
            self._last_t, self._last_kw = t, kw
            return
        if t < self._last_t:  # clock went backwards: keep the register, do not integrate
            return
        self._energy_kwh += (self._last_kw + kw) / 2.0 * (t - self._last_t) / 3600.0
        self._last_t, self._last_kw = t, kw

    # -- samples -----------------------------------------------------------------------------

    def quantities(self, t: float) -> dict[str, float]:
        """Every quantity at ``t`` (energy as of the last sample); does not advance energy."""
        s = self.site
        p_w = self.power_kw(t) * 1000.0
        _, volt_noise, freq_noise = self._noise_at(t)
        p1 = p_w * self._shares[0]
        p2 = p_w * self._shares[1]
        phase_w = (p1, p2, p_w - p1 - p2)
        pf = s.power_factor
        out: dict[str, float] = {}
        for i, ph in enumerate(PHASES):
            v = s.voltage_v * (1.0 + volt_noise[i])
            out[f"voltage_{ph}_v"] = v
            out[f"current_{ph}_a"] = phase_w[i] / (v * pf)
            out[f"power_{ph}_w"] = phase_w[i]
            out[f"power_factor_{ph}"] = pf
        out["power_w"] = p_w
        out["power_factor"] = pf
        out["frequency_hz"] = s.frequency_hz + freq_noise
        out["import_energy_kwh"] = self._energy_kwh
        out["export_energy_kwh"] = 0.0
        return out

    def sample(self, t: float) -> dict[str, float]:
        """Advance the energy register to ``t`` and return every quantity at ``t``."""
        self._integrate(t)
        return self.quantities(t)
