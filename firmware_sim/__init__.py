"""lmt.firmware_sim: a simulated site (meters, relay modules, loads) served over Modbus TCP.

Depends on ``lmt.config``, pymodbus's server side, numpy and the standard library only; it is
a peer of ``lmt.drivers``, never built on it.
"""

from .physics import SitePhysics
from .server import CoilChange, CoilWrite, SimulatedSite, run_site

__all__ = ["CoilChange", "CoilWrite", "SimulatedSite", "SitePhysics", "run_site"]
