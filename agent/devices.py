"""Build the agent's devices from its configuration: every protocol behind one interface.

A device reads its points (``read(names)``: a :class:`~lmt.drivers.result.ReadResult`, the
values that could be read and the blocks or data identifiers that failed, each error with its
``cause``), says what a read costs (``transactions(names)`` requests,
``wire_time_s(names)`` on a serial line: the agent's deadline for the read), may write them
(Modbus), and has a transport (a TCP connection, or a serial line shared by the devices on it)
that the agent resets after a timeout.
"""

from __future__ import annotations

from typing import Any, Protocol

from lmt.config.agent import AgentConfig
from lmt.config.profiles import Profile, load_profile
from lmt.drivers.dlt645 import Dlt645Meter
from lmt.drivers.modbus import ModbusBus, ModbusDevice, ModbusTcpBus
from lmt.drivers.modbus_rtu import ModbusRtuBus
from lmt.drivers.plan import due_points
from lmt.drivers.result import ReadResult
from lmt.drivers.serial_line import SerialLine


class Transport(Protocol):
    def close(self) -> None: ...


class Device(Protocol):
    """What the poller needs of a device (Modbus devices and DL/T 645 meters have it); the
    actuator's side is :class:`lmt.agent.actuator.Writable`."""

    name: str
    profile: Profile

    async def read(self, names: Any = None) -> ReadResult: ...

    def transactions(self, names: Any = None) -> int: ...

    def wire_time_s(self, names: Any = None) -> float: ...


def transport_of(dev: Any) -> Transport:
    return dev.bus if isinstance(dev, ModbusDevice) else dev.line


def set_request_timeout(dev: Any, timeout_s: float) -> None:
    """The response timeout of each of this device's next requests (the adaptive one) where
    the transport takes one per request: Modbus TCP and DL/T 645. A Modbus RTU line keeps its
    configured timeout (``[[lines]] timeout_s``)."""
    if isinstance(dev, Dlt645Meter):
        dev.timeout_s = timeout_s
    elif isinstance(dev, ModbusDevice) and isinstance(dev.bus, ModbusTcpBus):
        dev.bus.request_timeout_s = timeout_s


def due_names(dev: Any, last_read: dict[str, float], now: float, fast_s: float, slow_s: float
              ) -> list[str]:
    """Points older than their poll class allows: fast ones every cycle, slow ones (energy
    totals) every ``slow_s``."""
    return [p.name for p in due_points(dev.profile.points, last_read, now, fast_s, slow_s)]


def build_devices(cfg: AgentConfig) -> tuple[dict[str, Any], list[Transport]]:
    """Devices by name, and every transport (so the agent can close them)."""
    timeout = cfg.poll.timeout_s
    tcp: dict[tuple[str, int], ModbusBus] = {}
    rtu: dict[str, ModbusBus] = {}
    serial: dict[str, SerialLine] = {}
    devices: dict[str, Any] = {}
    for d in cfg.devices:
        profile = load_profile(d.profile)
        if d.line is None:
            assert d.host is not None
            if (d.host, d.port) not in tcp:
                # pymodbus's timeout is the ceiling; each request gets the adaptive one
                tcp[(d.host, d.port)] = ModbusTcpBus(d.host, d.port,
                                                     max(cfg.poll.max_timeout_s, timeout))
                tcp[(d.host, d.port)].request_timeout_s = timeout
            bus = tcp[(d.host, d.port)]
            devices[d.name] = ModbusDevice(d.name, bus, d.device_id, profile)
            continue
        line = cfg.line(d.line)
        if line.protocol == "modbus-rtu":
            if line.name not in rtu:
                rtu[line.name] = ModbusRtuBus.from_line(line, line.timeout_s or timeout)
            devices[d.name] = ModbusDevice(d.name, rtu[line.name], d.device_id, profile)
        else:
            if line.name not in serial:
                serial[line.name] = SerialLine.from_config(line, line.timeout_s or timeout)
            assert d.address is not None
            devices[d.name] = Dlt645Meter(d.name, serial[line.name], d.address, profile,
                                          timeout_s=line.timeout_s or timeout)
    transports: list[Transport] = [*tcp.values(), *rtu.values(), *serial.values()]
    return devices, transports
