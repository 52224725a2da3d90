"""One meter reading, normalised for the ledger: what every analytics module takes as input.

The agent builds a :class:`Sample` from a device's reading (whatever its profile calls the points
and in whatever unit: W or kW, Wh or kWh), with the times it was read. Nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

PHASES = ("l1", "l2", "l3")

Phase3 = tuple[float | None, float | None, float | None]
NONE3: Phase3 = (None, None, None)


@dataclass(frozen=True, slots=True)
class Sample:
    """A meter's values at one read. Any value may be None (not read, or not provided).

    ``t``: wall-clock unix seconds of the read (what intervals are cut by); ``mono``: the
    monotonic clock of the same read (to tell a clock step from time passing).
    ``import_kwh``/``export_kwh``: the cumulative energy registers (kWh, as the meter counts);
    ``power_kw``: total active power, positive = import; per phase: voltage (V, phase to
    neutral), current (A), active power (kW, positive = import); ``power_factor``: total.
    ``counters``: the meter's own event counters (DL/T 645: cover opened, terminal box opened,
    magnetic field, reverse flow, loss of current ...), by name, when they were read.
    """

    t: float
    mono: float
    import_kwh: float | None = None
    export_kwh: float | None = None
    power_kw: float | None = None
    voltage_v: Phase3 = NONE3
    current_a: Phase3 = NONE3
    phase_kw: Phase3 = NONE3
    power_factor: float | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
