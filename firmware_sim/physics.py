"""The electrical model of a simulated site: what each of its meters measures at time ``t``.

Total active power is an uncontrolled base load with a daily cycle and noise, plus the rated
power of every switchable load whose relay is on, plus the EV charging point and the site's
unmetered load. It is split over three phases with a small fixed imbalance; voltage, current and
power factor per phase are consistent with it (``P = V * I * PF`` per phase, total = sum of
phases).

Every configured device is a meter with a scope (``[devices.metering]``): a main meter measures
the whole site (the default), a sub-meter only its loads, its share of the base load and, if it
says so, the EV charging point; the unmetered load (``site.unmetered_kw``) is seen by whole-site
meters only. A meter shows what its tamper signatures (``[devices.tamper]``) let it see: a
shunted CT reads a fraction of its phase, a reversed CT reads its phase negative, a lost voltage
input (``pt_loss``) a fraction of its phase's voltage and so of its power (the current as it
is), a broken phase (``phase_break``) nothing at all on it; the site's load is the same in every
case (a signature is what one meter sees, not a change of the site). Each meter has
its own energy registers (import and export, total and per phase), integrated from what that
meter reports, trapezoid between samples: per phase by the phase's direction, the totals by the
sign of the algebraic sum of the phases (as DL/T 645 and most three-phase meters count).
A ``stopped`` register stands still, a ``decreasing`` one counts down (never below 0). The
model's own view (``device=None``) is the whole site, untampered.

Time is always passed in (unix seconds), never read from a clock here: the model is a pure
function of ``t``, the relay states, the signatures and the sampling history. The noise of a
given second is drawn from a generator seeded by ``(site.seed, second)``, so repeated queries
within the same second agree and a run is reproducible whatever the order of the queries.

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

from lmt.config.site import (
    EVENT_COUNT_MAX,
    EVENT_KEYS,
    WHOLE_SITE,
    Metering,
    SimLoad,
    SiteConfig,
    Tamper,
    event_point,
)

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
    # DL/T 645 event counters (config.site.EVENT_KEYS)
    *(event_point(key) for key in EVENT_KEYS),
)

#: The charger's station limit and the car's maximum charging current, per phase.
EV_MAX_CURRENT_A = 32.0
#: Below this setpoint IEC 61851 does not allow charging: the charger pauses the car.
EV_MIN_CURRENT_A = 6.0
#: The charger's own energy register at start (energy delivered to cars so far).
EV_START_ENERGY_KWH = 4321.0

#: A shunt that leaves the meter less than this share of its phase's current starts a loss of
#: current event (DL/T 645 失流: voltage present, the phase's current below the meter's
#: threshold while the others carry load).
CURRENT_LOSS_SEEN = 0.05

#: A lost voltage input that leaves the meter less than this share of its phase's voltage starts a
#: loss of voltage event (DL/T 614-2007 3.2 失压: the voltage below 78 % of the nominal).
VOLTAGE_LOSS_SEEN = 0.78

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
    """The value of point ``name`` in a sample, with unit aliases; unknown names give 0.0, and so
    does a known quantity the sample does not hold (a hand-made sample without event counters).

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
    return quantities.get(base, 0.0) * factor


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


def _trapezoid(a: float, b: float, hours: float) -> float:
    return (a + b) / 2.0 * hours


def _pos(x: float) -> float:
    return x if x > 0.0 else 0.0


def _neg(x: float) -> float:
    return -x if x < 0.0 else 0.0


_REGISTER_SIGN = {"counting": 1.0, "stopped": 0.0, "decreasing": -1.0}


class _Meter:
    """One meter's scope, signatures, event counters and energy registers."""

    def __init__(self, name: str | None, scope: Metering, start_kwh: float,
                 shares: tuple[float, float, float]) -> None:
        self.name = name
        self.scope = scope
        self.tamper = Tamper()
        self.events: dict[str, int] = dict.fromkeys(EVENT_KEYS, 0)
        self.import_kwh = float(start_kwh)
        self.export_kwh = 0.0
        # Per-phase registers: the start reading split like the load, then integrated.
        self.import_phase = [self.import_kwh * share for share in shares]
        self.export_phase = [0.0, 0.0, 0.0]
        #: What the meter reported at the last sample (kW per phase, signed).
        self.last_kw: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def advance(self, now_kw: tuple[float, float, float], hours: float) -> None:
        """Integrate from the last sample to one ``hours`` later at which it reports ``now_kw``."""
        sign = _REGISTER_SIGN[self.tamper.registers]
        last = self.last_kw
        self.last_kw = now_kw
        if sign == 0.0 or hours <= 0.0:
            return
        for i in range(3):
            a, b = last[i], now_kw[i]
            self.import_phase[i] = max(0.0, self.import_phase[i]
                                       + sign * _trapezoid(_pos(a), _pos(b), hours))
            self.export_phase[i] = max(0.0, self.export_phase[i]
                                       + sign * _trapezoid(_neg(a), _neg(b), hours))
        p0, p1 = sum(last), sum(now_kw)
        self.import_kwh = max(0.0, self.import_kwh + sign * _trapezoid(_pos(p0), _pos(p1), hours))
        self.export_kwh = max(0.0, self.export_kwh + sign * _trapezoid(_neg(p0), _neg(p1), hours))

    def count(self, key: str, n: int = 1) -> None:
        """The meter records ``n`` events of ``key`` (a DL/T 645 count saturates at 999999)."""
        self.events[key] = min(EVENT_COUNT_MAX, self.events[key] + n)

    def registers(self) -> dict[str, float]:
        out = {"import_energy_kwh": self.import_kwh, "export_energy_kwh": self.export_kwh}
        for i, ph in enumerate(PHASES):
            out[f"import_energy_{ph}_kwh"] = self.import_phase[i]
            out[f"export_energy_{ph}_kwh"] = self.export_phase[i]
        return out


class SitePhysics:
    """Relay states, power and energy of a :class:`~lmt.config.site.SiteConfig`, as the site is
    and as each of its meters (devices) sees it."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site.site
        self._loads: dict[str, SimLoad] = {load.relay: load for load in site.loads}
        self._on: dict[str, bool] = {load.relay: load.on for load in site.loads}
        # A fixed per-phase imbalance that sums to zero: the phase shares sum to exactly 1.
        rng = np.random.default_rng([self.site.seed, 1])
        dev = rng.uniform(-_IMBALANCE, _IMBALANCE, size=3)
        dev -= dev.mean()
        self._shares = (float((1.0 + dev[0]) / 3.0), float((1.0 + dev[1]) / 3.0),
                        float((1.0 + dev[2]) / 3.0))
        # (second, noise of that second); replaced as one tuple so readers never see a mix.
        self._noise_cache: tuple[int, _Noise] | None = None
        self._unmetered_kw = float(self.site.unmetered_kw)
        start = float(self.site.import_energy_kwh)
        #: The site as it is (the model's own view, device None), then every device as a meter.
        self._site_meter = _Meter(None, WHOLE_SITE, start, self._shares)
        self._meters: dict[str, _Meter] = {}
        for d in site.devices:
            scope = d.metering
            m = _Meter(d.name, scope, start if scope.import_energy_kwh is None
                       else scope.import_energy_kwh, self._shares)
            m.events.update(d.events.model_dump())
            self._meters[d.name] = m
            self._apply_tamper(m, d.tamper)  # a signature in the site file starts now
        self._ev_energy_kwh = EV_START_ENERGY_KWH
        self._ev_setpoint_a = 0.0
        self._last_t: float | None = None
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
        lands exactly at ``t`` in the energy registers.
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

    # -- meters: scopes, signatures, events ---------------------------------------------------

    def _meter(self, device: str | None) -> _Meter:
        if device is None:
            return self._site_meter
        try:
            return self._meters[device]
        except KeyError:
            raise KeyError(f"no device named {device!r} (devices: "
                           f"{', '.join(self._meters)})") from None

    @property
    def meters(self) -> list[str]:
        """Every device's name: each is a meter with its own scope and registers."""
        return list(self._meters)

    def metering(self, device: str) -> Metering:
        """What ``device`` measures."""
        return self._meter(device).scope

    def tamper(self, device: str) -> Tamper:
        """The signatures ``device`` shows."""
        return self._meter(device).tamper

    def set_tamper(self, device: str, tamper: Tamper, t: float | None = None) -> None:
        """Replace the signatures of ``device``. With ``t``, energy is integrated up to ``t`` as
        the meter saw it before, and from ``t`` on as it sees it now. A reversed CT that starts
        counts a reverse-flow event of its phase, a shunt that leaves less than
        :data:`CURRENT_LOSS_SEEN` of the current a loss-of-current event, a lost voltage input
        that leaves less than :data:`VOLTAGE_LOSS_SEEN` of the voltage a loss-of-voltage event
        (``voltage_loss``, the meter's total count). A phase break counts nothing (the
        profiles serve no phase-break counter)."""
        m = self._meter(device)
        if t is not None:
            self._integrate(t)
        self._apply_tamper(m, tamper)
        if t is not None:
            self._restart_at(t)

    @staticmethod
    def _apply_tamper(m: _Meter, tamper: Tamper) -> None:
        old = m.tamper
        if tamper.ct_reversed is not None and tamper.ct_reversed != old.ct_reversed:
            m.count(f"reverse_flow_{tamper.ct_reversed}")
        shunt = tamper.ct_shunt
        if shunt is not None and shunt.seen < CURRENT_LOSS_SEEN:
            before = old.ct_shunt
            if before is None or before.phase != shunt.phase or before.seen >= CURRENT_LOSS_SEEN:
                m.count(f"current_loss_{shunt.phase}")
        pt = tamper.pt_loss
        if pt is not None and pt.seen < VOLTAGE_LOSS_SEEN:
            before_pt = old.pt_loss
            if before_pt is None or before_pt.phase != pt.phase \
                    or before_pt.seen >= VOLTAGE_LOSS_SEEN:
                m.count("voltage_loss")
        m.tamper = tamper

    def events(self, device: str) -> dict[str, int]:
        """The event counters of ``device`` (keys of :data:`~lmt.config.site.EVENT_KEYS`)."""
        return dict(self._meter(device).events)

    def count_event(self, device: str, key: str, n: int = 1) -> int:
        """``device`` records ``n`` events of ``key`` (the cover opened: ``"cover_open"``);
        returns the new count."""
        if key not in EVENT_KEYS:
            raise KeyError(f"no event {key!r} (events: {', '.join(EVENT_KEYS)})")
        m = self._meter(device)
        m.count(key, n)
        return m.events[key]

    def jump_register(self, device: str, kwh: float, t: float | None = None) -> float:
        """A one-off step of ``device``'s total import register by ``kwh`` (negative: back),
        never below 0; the per-phase registers do not follow. With ``t``, energy is integrated
        up to ``t`` first. Returns the new reading."""
        m = self._meter(device)
        if t is not None:
            self._integrate(t)
        m.import_kwh = max(0.0, m.import_kwh + kwh)
        return m.import_kwh

    def registers(self, device: str | None = None) -> dict[str, float]:
        """The energy registers of ``device`` (None: the site's own) as of the last sample."""
        return self._meter(device).registers()

    @property
    def unmetered_kw(self) -> float:
        """Load between the main meter and the sub-meters (whole-site meters see it)."""
        return self._unmetered_kw

    def set_unmetered_kw(self, kw: float, t: float | None = None) -> None:
        """Change the unmetered load; with ``t``, energy is integrated up to ``t`` first."""
        if not kw >= 0.0 or not math.isfinite(kw):
            raise ValueError(f"unmetered_kw must be a finite number >= 0 (got {kw!r})")
        if t is not None:
            self._integrate(t)
        self._unmetered_kw = float(kw)
        if t is not None:
            self._restart_at(t)

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

    def _scope_phase_w(self, t: float, scope: Metering) -> tuple[float, float, float]:
        """True active power per phase in ``scope`` at ``t``: its shared load split by the
        imbalance, plus the EV if it is in the scope."""
        if scope.whole_site:
            shared_kw = self.base_load_kw(t) + self.switched_kw() + self._unmetered_kw
            ev = self._ev_phase_w(t)
        else:
            shared_kw = self.base_load_kw(t) * scope.base_share + sum(
                load.kw for relay, load in self._loads.items()
                if self._on[relay] and load.name in scope.loads)
            ev = self._ev_phase_w(t) if scope.ev else (0.0, 0.0, 0.0)
        shared_w = shared_kw * 1000.0
        total_w = shared_w + sum(ev)
        p1 = shared_w * self._shares[0] + ev[0]
        p2 = shared_w * self._shares[1] + ev[1]
        return (p1, p2, total_w - p1 - p2)

    def _current_w(self, t: float, m: _Meter) -> list[float]:
        """Active power per phase at the true voltage and the current meter ``m`` sees at ``t``
        (``V * I_seen * PF``): its scope, its CT signatures and a broken phase applied."""
        p = list(self._scope_phase_w(t, m.scope))
        tamper = m.tamper
        if tamper.ct_shunt is not None:
            p[PHASES.index(tamper.ct_shunt.phase)] *= tamper.ct_shunt.seen
        if tamper.ct_reversed is not None:
            i = PHASES.index(tamper.ct_reversed)
            p[i] = -p[i]
        if tamper.phase_break is not None:
            p[PHASES.index(tamper.phase_break)] = 0.0
        return p

    @staticmethod
    def _voltage_seen(m: _Meter) -> tuple[float, float, float]:
        """The share of each phase's voltage meter ``m`` sees: ``pt_loss.seen`` on its phase, 0
        on a broken phase, 1 elsewhere."""
        seen = [1.0, 1.0, 1.0]
        tamper = m.tamper
        if tamper.pt_loss is not None:
            seen[PHASES.index(tamper.pt_loss.phase)] = tamper.pt_loss.seen
        if tamper.phase_break is not None:
            seen[PHASES.index(tamper.phase_break)] = 0.0
        return (seen[0], seen[1], seen[2])

    def _reported_w(self, t: float, m: _Meter) -> tuple[float, float, float]:
        """Active power per phase as meter ``m`` reports it at ``t``: its scope, tampered (``P =
        V_seen * I_seen * PF``; its registers integrate this)."""
        p = self._current_w(t, m)
        v = self._voltage_seen(m)
        return (p[0] * v[0], p[1] * v[1], p[2] * v[2])

    def power_kw(self, t: float, device: str | None = None) -> float:
        """Total active power at ``t`` as ``device`` reports it (None: the whole site: base load,
        the loads that are on, the EV and the unmetered load)."""
        return sum(self._reported_w(t, self._meter(device))) / 1000.0

    # -- energy ------------------------------------------------------------------------------

    @property
    def import_energy_kwh(self) -> float:
        """The site's import energy as of the last sample (what a clean main meter reads)."""
        return self._site_meter.import_kwh

    def _all_meters(self) -> list[_Meter]:
        return [self._site_meter, *self._meters.values()]

    def _restart_at(self, t: float) -> None:
        """After a change of state at ``t``: integrate on from ``t`` at the new power."""
        if self._last_t is not None and t >= self._last_t:
            for m in self._all_meters():
                m.last_kw = self._reported_kw(t, m)
            self._last_ev_kw = sum(self._ev_phase_w(t)) / 1000.0

    def _reported_kw(self, t: float, m: _Meter) -> tuple[float, float, float]:
        w = self._reported_w(t, m)
        return (w[0] / 1000.0, w[1] / 1000.0, w[2] / 1000.0)

    def _integrate(self, t: float) -> None:
        """Advance every meter's energy registers to ``t`` (trapezoid from the previous
        sample)."""
        last = self._last_t
        if last is not None and t <= last:  # the same moment, or the clock went back: keep
            return
        hours = 0.0 if last is None else (t - last) / 3600.0
        for m in self._all_meters():
            m.advance(self._reported_kw(t, m), hours)
        ev_kw = sum(self._ev_phase_w(t)) / 1000.0
        if last is not None:
            self._ev_energy_kwh += (self._last_ev_kw + ev_kw) / 2.0 * hours
        self._last_t, self._last_ev_kw = t, ev_kw

    # -- samples -----------------------------------------------------------------------------

    def quantities(self, t: float, device: str | None = None) -> dict[str, float]:
        """Every quantity at ``t`` as ``device`` measures it (None: the whole site, untampered);
        energy as of the last sample; does not advance energy."""
        s = self.site
        m = self._meter(device)
        current_w = self._current_w(t, m)  # at the true voltage: gives the current it sees
        true_v = self._voltages(t)
        seen_v = self._voltage_seen(m)
        voltages = (true_v[0] * seen_v[0], true_v[1] * seen_v[1], true_v[2] * seen_v[2])
        phase_w = (current_w[0] * seen_v[0], current_w[1] * seen_v[1], current_w[2] * seen_v[2])
        _, _, freq_noise = self._noise_at(t)
        pf = s.power_factor
        q_per_p = math.sqrt(max(0.0, 1.0 / (pf * pf) - 1.0))  # Q / P at this power factor
        ev_amps = self.ev_current_a()
        ev_w = self._ev_phase_w(t)
        out: dict[str, float] = {}
        for i, ph in enumerate(PHASES):
            v, p = voltages[i], phase_w[i]
            out[f"voltage_{ph}_v"] = v
            # signed: a reversed CT reads negative; a lost voltage input leaves it as it is
            out[f"current_{ph}_a"] = current_w[i] / (true_v[i] * pf)
            out[f"power_{ph}_w"] = p
            out[f"reactive_power_{ph}_var"] = p * q_per_p
            out[f"apparent_power_{ph}_va"] = abs(p) / pf
            out[f"power_factor_{ph}"] = -pf if p < 0.0 else pf
            out[f"import_energy_{ph}_kwh"] = m.import_phase[i]
            out[f"export_energy_{ph}_kwh"] = m.export_phase[i]
            out[f"ev_current_{ph}_a"] = ev_amps
            out[f"ev_power_{ph}_w"] = ev_w[i]
        for ln, (a, b) in zip(LINES, ((0, 1), (1, 2), (2, 0)), strict=True):
            va, vb = voltages[a], voltages[b]
            out[f"voltage_{ln}_v"] = math.sqrt(va * va + vb * vb + va * vb)
        p_w = sum(phase_w)
        out["power_w"] = p_w
        out["reactive_power_var"] = p_w * q_per_p
        if min(phase_w) >= 0.0:
            out["apparent_power_va"] = p_w / pf
            out["power_factor"] = pf
        else:  # phases of opposite signs: S is the sum of the phases' apparent powers
            apparent = sum(abs(p) for p in phase_w) / pf
            out["apparent_power_va"] = apparent
            out["power_factor"] = p_w / apparent if apparent > 0.0 else pf
        out["frequency_hz"] = s.frequency_hz + freq_noise
        out["phase_sequence_ok"] = 1.0
        out["import_energy_kwh"] = m.import_kwh
        out["export_energy_kwh"] = m.export_kwh
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
        for key, count in m.events.items():
            out[event_point(key)] = float(count)
        return out

    def sample(self, t: float, device: str | None = None) -> dict[str, float]:
        """Advance the energy registers to ``t`` and return every quantity at ``t`` as ``device``
        measures it."""
        self._integrate(t)
        return self.quantities(t, device)
