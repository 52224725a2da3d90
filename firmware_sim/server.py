"""Serve a simulated site over Modbus TCP: one server, one device id per configured device.

Each device's register map comes from its profile. Coils, discrete inputs, holding and input
registers are separate address spaces (pymodbus's four-block ``SimDevice`` form). An address
answers only if a profile point covers it, or if it lies in a gap between two points of at
most the profile's ``max_gap`` (the profile declares that a block read may bridge such a gap,
so the device answers it, with zeros); anything else answers exception 02 ILLEGAL DATA ADDRESS.

Meter values are computed by :class:`~lmt.firmware_sim.physics.SitePhysics` at the moment of
each read, in the device's access hook, so a read that follows a relay write already sees the
load switched. A write to a relay coil switches its load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from lmt.config.profiles import Point, Profile, Table, load_profile
from lmt.config.site import SimDevice as DeviceConfig
from lmt.config.site import SimLoad, SiteConfig, load_site

from .encoding import encode
from .physics import SitePhysics, is_known, lookup

if TYPE_CHECKING:
    from pymodbus.datastore import ModbusServerContext

_log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: Function code -> the table it addresses.
_FC_TABLE: dict[int, Table] = {
    1: Table.COIL, 5: Table.COIL, 15: Table.COIL,
    2: Table.DISCRETE,
    3: Table.HOLDING, 6: Table.HOLDING, 16: Table.HOLDING, 22: Table.HOLDING, 23: Table.HOLDING,
    4: Table.INPUT,
}
_TABLES = (Table.COIL, Table.DISCRETE, Table.HOLDING, Table.INPUT)  # SimDevice tuple order

_COIL_ON = 0xFF00
_COIL_OFF = 0x0000


class CoilWrite(NamedTuple):
    """One coil written by a Modbus master (whether or not it changed the coil)."""

    time: float
    device: str
    point: str
    value: bool


@dataclass(frozen=True)
class CoilChange:
    """A coil that changed state, and the load it switches (None if it switches none)."""

    time: float
    device: str
    point: str
    value: bool
    load: SimLoad | None

    @property
    def relay(self) -> str:
        return f"{self.device}.{self.point}"

    def describe(self) -> str:
        """One log line: ``relays.relay_4 -> OFF (ev-chargers, 22.0 kW)``."""
        what = f"{self.load.name}, {self.load.kw:.1f} kW" if self.load else "no load"
        return f"{self.relay} -> {'ON' if self.value else 'OFF'} ({what})"


def _spans(points: Iterable[Point], max_gap: int) -> tuple[set[int], list[tuple[int, int]]]:
    """(every answering address, [(start, length)] of the bridgeable gaps) of one table."""
    answering: set[int] = set()
    gaps: list[tuple[int, int]] = []
    prev_end: int | None = None
    for p in sorted(points, key=lambda p: p.address):
        end = p.address + p.size
        if prev_end is not None and 0 < p.address - prev_end <= max_gap:
            gaps.append((prev_end, p.address - prev_end))
            answering.update(range(prev_end, p.address))
        answering.update(range(p.address, end))
        prev_end = end if prev_end is None else max(prev_end, end)
    return answering, gaps


class _Device:
    """One configured device: its register map, its SimDevice and its access hook."""

    def __init__(self, site: SimulatedSite, config: DeviceConfig, profile: Profile) -> None:
        self.site = site
        self.name = config.name
        self.device_id = config.device_id
        self.profile = profile
        self.points: dict[Table, list[Point]] = {t: [] for t in _TABLES}
        for p in profile.points:
            self.points[p.table].append(p)
        self.answering: dict[Table, set[int]] = {}
        self.gaps: dict[Table, list[tuple[int, int]]] = {}
        for table in _TABLES:
            self.answering[table], self.gaps[table] = _spans(self.points[table], profile.max_gap)
        self.coils: dict[int, Point] = {p.address: p for p in self.points[Table.COIL]}
        # Register points the physics serves (refreshed on every read); the others hold what
        # was written to them, initially 0.
        self.live: dict[Table, list[Point]] = {
            t: [p for p in self.points[t] if is_known(p.name) and not p.writable]
            for t in (Table.HOLDING, Table.INPUT)
        }

    def bits_answer(self, table: Table, address: int, count: int) -> bool:
        answering = self.answering[table]
        return all(a in answering for a in range(address, address + count))

    # -- building ----------------------------------------------------------------------------

    def _bit_block(self, table: Table) -> list[SimData]:
        blocks = []
        for p in self.points[table]:
            relay = f"{self.name}.{p.name}"
            if table is Table.COIL:
                value = self.site.physics.relay_on(relay)
            else:
                value = bool(lookup(self.site.physics.quantities(self.site.clock()), p.name))
            blocks.append(SimData(address=p.address, values=[value], datatype=DataType.BITS))
        for start, length in self.gaps[table]:
            blocks.append(SimData(address=start, values=[False] * length,
                                  datatype=DataType.BITS))
        if not blocks:  # pymodbus needs one entry per block; bits_answer() rejects it all
            blocks.append(SimData(address=0, values=[False], datatype=DataType.BITS))
        return blocks

    def _register_block(self, table: Table) -> list[SimData]:
        quantities = self.site.physics.quantities(self.site.clock())
        blocks = []
        for p in self.points[table]:
            value = lookup(quantities, p.name) if p in self.live[table] else 0.0
            blocks.append(SimData(address=p.address, values=encode(value, p),
                                  datatype=DataType.REGISTERS, readonly=not p.writable))
        for start, length in self.gaps[table]:
            blocks.append(SimData(address=start, count=length, values=0,
                                  datatype=DataType.REGISTERS, readonly=True))
        if not blocks:  # an invalid register: every address of the table answers 02
            blocks.append(SimData(address=0, datatype=DataType.INVALID))
        return blocks

    def simdevice(self) -> SimDevice:
        blocks = (self._bit_block(Table.COIL), self._bit_block(Table.DISCRETE),
                  self._register_block(Table.HOLDING), self._register_block(Table.INPUT))
        try:
            return SimDevice(id=self.device_id, simdata=blocks, action=self.action)
        except TypeError as exc:  # e.g. two points of the profile overlap
            raise ValueError(f"device {self.name!r} (profile {self.profile.id!r}): {exc}") \
                from exc

    # -- access hook -------------------------------------------------------------------------

    async def action(self, function_code: int, start_address: int, address: int, count: int,
                     registers: list[int], set_values: list[int] | list[bool] | None,
                     ) -> ExcCodes | None:
        """Called by pymodbus on every access, before it answers from ``registers``.

        ``registers`` is the whole block of the table (modified in place); ``start_address`` is
        its first address (in 16-bit words for coils and discrete inputs); for bit tables
        ``count`` is in words too, so bit reads are checked in the request instead.
        """
        table = _FC_TABLE.get(function_code)
        if table is None:
            return None
        if set_values is not None:
            if table is Table.COIL:
                return self._write_coils(start_address, address, registers,
                                         [bool(v) for v in set_values])
            return None
        if not table.is_bit and self.live[table]:
            quantities = self.site.physics.sample(self.site.clock())
            for p in self.live[table]:
                i = p.address - start_address
                registers[i:i + p.size] = encode(lookup(quantities, p.name), p)
        return None

    def _write_coils(self, start_word: int, address: int, registers: list[int],
                     values: list[bool]) -> ExcCodes | None:
        addresses = range(address, address + len(values))
        for a in addresses:
            p = self.coils.get(a)
            if p is None or not p.writable:
                return ExcCodes.ILLEGAL_ADDRESS
        t = self.site.clock()
        for a, value in zip(addresses, values, strict=True):
            old = bool((registers[a // 16 - start_word] >> (a % 16)) & 1)
            self.site._coil_written(t, self, self.coils[a], value, old)
        return None


async def _unknown_device(function_code: int, start_address: int, address: int, count: int,
                          registers: list[int], set_values: list[int] | list[bool] | None,
                          ) -> ExcCodes | None:
    """Access hook of the catch-all device: a gateway's answer for an absent device id."""
    return ExcCodes.GATEWAY_NO_RESPONSE


def _catch_all_device() -> SimDevice:
    """Device id 0 = every id not configured; each access answers 0B (no response)."""
    bits = [SimData(address=0, values=[0] * 4096, datatype=DataType.BITS)]
    regs = [SimData(address=0, count=65536, values=0, datatype=DataType.REGISTERS)]
    return SimDevice(id=0, simdata=(bits, list(bits), regs, list(regs)), action=_unknown_device)


def _request_classes(site: SimulatedSite) -> list[type[ModbusPDU]]:
    """Request decoders that make this server stricter than pymodbus's defaults.

    pymodbus checks bit addresses per 16-bit word and passes the hook a word count, so bit
    reads are checked here; and a write-coil value other than FF00/0000 answers 03.
    """

    class _ReadCoils(ReadCoilsRequest):
        async def datastore_update(self, context: ModbusServerContext, device_id: int,
                                   ) -> ModbusPDU:
            if not site._bits_answer(device_id, Table.COIL, self.address, self.count):
                return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
            return await super().datastore_update(context, device_id)

    class _ReadDiscreteInputs(ReadDiscreteInputsRequest):
        async def datastore_update(self, context: ModbusServerContext, device_id: int,
                                   ) -> ModbusPDU:
            if not site._bits_answer(device_id, Table.DISCRETE, self.address, self.count):
                return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
            return await super().datastore_update(context, device_id)

    class _WriteSingleCoil(WriteSingleCoilRequest):
        raw_value: int = _COIL_ON

        def decode(self, data: bytes) -> None:
            super().decode(data)
            self.raw_value = struct.unpack(">H", data[2:4])[0]

        async def datastore_update(self, context: ModbusServerContext, device_id: int,
                                   ) -> ModbusPDU:
            if self.raw_value not in (_COIL_ON, _COIL_OFF):
                return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_VALUE)
            return await super().datastore_update(context, device_id)

    return [_ReadCoils, _ReadDiscreteInputs, _WriteSingleCoil]


class SimulatedSite:
    """A :class:`~lmt.config.site.SiteConfig` served over one Modbus TCP server."""

    def __init__(self, config: SiteConfig, host: str | None = None, port: int | None = None,
                 clock: Clock = time.time) -> None:
        self.config = config
        self.host = config.server.host if host is None else host
        self.port = config.server.port if port is None else port
        self.clock = clock
        self.physics = SitePhysics(config)
        self.devices = [_Device(self, d, load_profile(d.profile)) for d in config.devices]
        self._by_id = {d.device_id: d for d in self.devices}
        #: Coil writes by device name, oldest first.
        self.coil_writes: dict[str, list[CoilWrite]] = {d.name: [] for d in self.devices}
        self._listeners: list[Callable[[CoilChange], None]] = []
        self._server: ModbusTcpServer | None = None
        self.bound_port: int | None = None

    def add_listener(self, callback: Callable[[CoilChange], None]) -> None:
        """Call ``callback`` (in the server's event loop) whenever a coil changes state."""
        self._listeners.append(callback)

    async def start(self) -> int:
        """Start listening; returns the bound TCP port (the one picked, for port 0)."""
        if self._server is not None:
            raise RuntimeError("the simulated site is already started")
        devices = [d.simdevice() for d in self.devices]
        devices.append(_catch_all_device())
        server = ModbusTcpServer(devices, address=(self.host, self.port),
                                 custom_pdu=_request_classes(self))
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:
            if ModbusTcpServer.active_server is server:
                ModbusTcpServer.active_server = None
            raise OSError(f"cannot listen on {self.host}:{self.port} "
                          "(address in use or not available)") from exc
        listener = cast(asyncio.Server, server.transport)
        self.bound_port = int(listener.sockets[0].getsockname()[1])
        self._server = server
        self.physics.sample(self.clock())  # the energy register integrates from now
        return self.bound_port

    async def stop(self) -> None:
        """Stop listening and close every connection; a no-op when not started."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.shutdown()
        if ModbusTcpServer.active_server is server:
            ModbusTcpServer.active_server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def loads_on(self) -> dict[str, bool]:
        """On/off state of every load, by load name."""
        return self.physics.loads_on()

    def site_power_kw(self, t: float | None = None) -> float:
        """Total active power the main meter measures at ``t`` (default: now), in kW."""
        return self.physics.power_kw(self.clock() if t is None else t)

    # -- hooks -------------------------------------------------------------------------------

    def _bits_answer(self, device_id: int, table: Table, address: int, count: int) -> bool:
        device = self._by_id.get(device_id)
        return device is None or device.bits_answer(table, address, count)

    def _coil_written(self, t: float, device: _Device, point: Point, value: bool,
                      old: bool) -> None:
        self.coil_writes[device.name].append(CoilWrite(t, device.name, point.name, value))
        load = self.physics.set_relay(f"{device.name}.{point.name}", value, t)
        if value == old:
            return
        change = CoilChange(t, device.name, point.name, value, load)
        for callback in self._listeners:
            try:
                callback(change)
            except Exception:
                _log.exception("coil change listener failed")


# -- `lmt sim` ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """Make this module's INFO lines reach stderr, unless the program configured logging.

    Under ``lmt sim`` the CLI has set up logging (format, ``--log-level``) and that is used;
    run bare (``python -m lmt.firmware_sim``, tests), the lines go to stderr as they are.
    """
    if logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = _log.level
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    try:
        yield
    finally:
        _log.removeHandler(handler)
        _log.setLevel(old_level)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either no file or the whole of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


async def run_site(path: Path | str, port_override: int | None = None,
                   ready_file: Path | None = None) -> None:
    """Serve the site file ``path`` until cancelled, SIGTERM or SIGINT.

    Writes the bound port into ``ready_file`` once listening (removed again on stop) and
    logs each coil change (logger ``lmt.firmware_sim.server``, INFO; to stderr when the
    program has not configured logging). Raises ``ConfigError`` for a bad site file and
    ``OSError`` when it cannot listen.
    """
    with _log_to_stderr():
        await _run_site(path, port_override, ready_file)


async def _run_site(path: Path | str, port_override: int | None,
                    ready_file: Path | None) -> None:
    config = load_site(path)
    site = SimulatedSite(config, port=port_override)
    site.add_listener(lambda change: _log.info("%s", change.describe()))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            continue
        installed.append(sig)
    try:
        port = await site.start()
        devices = ", ".join(f"{d.name} (id {d.device_id}, {d.profile.id})"
                            for d in site.devices)
        _log.info("lmt sim: %s on %s:%d: %s", config.site.name, site.host, port, devices)
        if ready_file is not None:
            write_atomically(Path(ready_file), f"{port}\n")
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        was_running = site.running
        await site.stop()
        if ready_file is not None:
            with contextlib.suppress(OSError):
                Path(ready_file).unlink(missing_ok=True)
        if was_running:
            _log.info("lmt sim: %s stopped", config.site.name)
