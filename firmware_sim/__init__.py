"""lmt.firmware_sim: a simulated site (meters, relay modules, an EV charger, loads) served over
Modbus TCP, Modbus RTU lines and DL/T 645-2007 meter lines (pseudo-terminals), with per-device
fault injection and a control channel to change the faults while it runs.

Depends on ``lmt.config``, pymodbus's server side, numpy, pyserial and the standard library
only; it is a peer of ``lmt.drivers``, never built on it.
"""

from lmt.config.site import Faults

from .control import ControlServer
from .dlt645 import Dlt645Line
from .faults import FaultInjector
from .physics import SitePhysics
from .rtu import RtuLineServer
from .server import CoilChange, CoilWrite, MeterRelayChange, SimulatedSite, run_site

__all__ = [
    "CoilChange",
    "CoilWrite",
    "ControlServer",
    "Dlt645Line",
    "FaultInjector",
    "Faults",
    "MeterRelayChange",
    "RtuLineServer",
    "SimulatedSite",
    "SitePhysics",
    "run_site",
]
