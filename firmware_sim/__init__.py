"""lmt.firmware_sim: a simulated site (meters, relay modules, an EV charger, loads) served over
Modbus TCP, Modbus RTU lines and DL/T 645-2007 meter lines (pseudo-terminals), with per-device
fault injection and a control channel to change the faults while it runs.

Depends on ``lmt.config``, pymodbus's server side, numpy, pyserial and the standard library
only; it is a peer of ``lmt.drivers``, never built on it.
"""

from __future__ import annotations

import importlib
from typing import Any

from lmt.config.site import Faults as Faults

# Loaded on first use (PEP 562): ``lmt sim --help`` and the agent's command line, which only
# need the argument parser, do not pay for numpy, pymodbus's server and the simulators.
_EXPORTS = {
    "CoilChange": ".server",
    "CoilWrite": ".server",
    "ControlServer": ".control",
    "Dlt645Line": ".dlt645",
    "FaultInjector": ".faults",
    "MeterRelayChange": ".server",
    "RtuLineServer": ".rtu",
    "SimulatedSite": ".server",
    "SitePhysics": ".physics",
    "run_site": ".server",
}

__all__ = sorted([*_EXPORTS, "Faults"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
