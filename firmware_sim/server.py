"""Serve a simulated site: one Modbus TCP server, and a pseudo-terminal per serial line.

Each device's register map comes from its profile. Coils, discrete inputs, holding and input
registers are separate address spaces (pymodbus's four-block ``SimDevice`` form). An address
answers only if a profile point covers it, or if it lies in a gap between two points of at
most the profile's ``max_gap`` (the profile declares that a block read may bridge such a gap,
so the device answers it, with zeros); anything else answers exception 02 ILLEGAL DATA ADDRESS.

Meter values are computed by :class:`~lmt.firmware_sim.physics.SitePhysics` at the moment of
each read, in the device's access hook, so a read that follows a relay write already sees the
load switched. A write to a relay coil switches its load, over TCP as over RTU; a write to a
writable register point the model knows (an EV charger's ``ev_setpoint_a``) reaches the model.

TCP and RTU share one request path (:meth:`SimulatedSite.handle_request`): the device's fault
injector decides what the request gets (:mod:`~lmt.firmware_sim.faults`); a request to be
answered is decoded with pymodbus's request classes and executed on the device's datastore
(pymodbus ``SimDevice`` + our access hook); the transport frames the answer. The TCP server
and the RTU line loop (:mod:`~lmt.firmware_sim.rtu`) are ours, not pymodbus's servers, so that
faults can be injected per device and per request.

A ``frozen`` device (:class:`~lmt.config.site.Faults`) keeps a snapshot of its four tables,
taken when the fault is switched on (or when the site starts, for one frozen in the site file):
as a read would have answered every address at that moment. Requests still run on the live
datastore (the access hook, the model's energy integration, writes: a relay module switches its
load), and :meth:`_Device.frozen_answer` then puts the snapshot's values into the answer to a
read, coils and discrete inputs included: a frozen relay module reads back its old states.

Points whose registers overlap must be bit fields (``bit = N``) of the same status word(s):
they are served as one merged cell, composed from the model on every read (each point sets
its own bit); a write of the register is decoded per bit, and only the writable bits keep what
was written.

Every device is a meter of :class:`~lmt.firmware_sim.physics.SitePhysics`: it is served what
*it* measures (its ``[devices.metering]`` scope, the whole site by default, as its
``[devices.tamper]`` signatures let it see it) and its own energy registers.
:meth:`SimulatedSite.set_tamper`, :meth:`~SimulatedSite.count_event`,
:meth:`~SimulatedSite.jump_register` and :meth:`~SimulatedSite.set_unmetered_kw` change them while
the site runs (the control channel calls them), each logged.

A ``dlt645`` line is served by a :class:`~lmt.firmware_sim.dlt645.Dlt645Line` on its own
pseudo-terminal: its meters answer on their 12-digit ``address``, each with its own view of the
model (as a Modbus meter's), draw their
faults from the same per-device injectors as the Modbus devices (``set_faults`` and the control
channel reach them) and report a relay that opens or closes (a 1C trip or close) to
:meth:`SimulatedSite.add_meter_relay_listener`. Opening a meter's relay does not change the
model: the readings carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import (
    ReadCoilsRequest,
    ReadDiscreteInputsRequest,
    WriteSingleCoilRequest,
)
from pymodbus.pdu.register_message import ReadWriteMultipleRegistersRequest
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore
from pymodbus.simulator.simruntime import SimRuntime

from lmt.config.profiles import Point, Profile, Table, load_profile
from lmt.config.site import EVENT_KEYS, Faults, SimLoad, SiteConfig, Tamper, load_site
from lmt.config.site import SimDevice as DeviceConfig

from .dlt645 import Dlt645Line
from .encoding import decode, encode
from .faults import FaultInjector, Outcome, Reply
from .physics import SitePhysics, is_known, lookup
from .rtu import RtuLineServer

_log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: Function code -> the table it addresses.
_FC_TABLE: dict[int, Table] = {
    1: Table.COIL, 5: Table.COIL, 15: Table.COIL,
    2: Table.DISCRETE,
    3: Table.HOLDING, 6: Table.HOLDING, 16: Table.HOLDING, 22: Table.HOLDING, 23: Table.HOLDING,
    4: Table.INPUT,
}
_REGISTER_READS = frozenset({3, 4, 23})
_TABLES = (Table.COIL, Table.DISCRETE, Table.HOLDING, Table.INPUT)  # SimDevice tuple order
_BLOCK_KEYS = ("c", "d", "h", "i")  # pymodbus's SimRuntime blocks, in the same order

# A frozen device's snapshot: per table, (first address of the block, its words). The bit
# tables' blocks are in 16-bit words too (bit a is bit a % 16 of word a // 16).
_Snapshot = dict[Table, tuple[int, list[int]]]

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


@dataclass(frozen=True)
class _Cell:
    """Registers served as one unit: one register point, or bit fields sharing registers."""

    address: int
    size: int
    points: tuple[Point, ...]

    @property
    def merged(self) -> bool:
        return len(self.points) > 1

    @property
    def writable(self) -> bool:
        return any(p.writable for p in self.points)


def _cells(points: Iterable[Point], where: str) -> list[_Cell]:
    """The register points of one table as cells: points whose registers overlap form one cell,
    which is allowed only for bit fields (several bits of one status word); raises ValueError
    for any other overlap."""
    groups: list[list[Point]] = []
    end = -1
    for p in sorted(points, key=lambda p: (p.address, p.bit or 0)):
        assert p.address is not None
        if groups and p.address < end:
            groups[-1].append(p)
            end = max(end, p.address + p.size)
        else:
            groups.append([p])
            end = p.address + p.size
    cells = []
    for group in groups:
        start = min(p.address for p in group if p.address is not None)
        stop = max(p.address + p.size for p in group if p.address is not None)
        if len(group) > 1 and any(p.bit is None for p in group):
            names = ", ".join(p.name for p in group)
            raise ValueError(f"{where}: points {names} overlap at register {start}; only bit "
                             "fields (bit = N) may share a register")
        cells.append(_Cell(start, stop - start, tuple(group)))
    return cells


def _bit_mask(point: Point) -> list[int]:
    """The words of a bit-field point with only its own bit set."""
    return encode(True, point)


@dataclass(frozen=True)
class MeterRelayChange:
    """The relay of a DL/T 645 meter opened (a 1C trip) or closed again."""

    time: float
    device: str
    address: str
    closed: bool

    def describe(self) -> str:
        """One log line: ``meter-b relay -> OPEN``."""
        return f"{self.device} relay -> {'CLOSED' if self.closed else 'OPEN'}"


def _spans(points: Iterable[Point], max_gap: int) -> tuple[set[int], list[tuple[int, int]]]:
    """(every answering address, [(start, length)] of the bridgeable gaps) of one table."""
    answering: set[int] = set()
    gaps: list[tuple[int, int]] = []
    prev_end: int | None = None
    for p in sorted(points, key=lambda p: p.address or 0):
        assert p.address is not None  # a Modbus point
        end = p.address + p.size
        if prev_end is not None and 0 < p.address - prev_end <= max_gap:
            gaps.append((prev_end, p.address - prev_end))
            answering.update(range(prev_end, p.address))
        answering.update(range(p.address, end))
        prev_end = end if prev_end is None else max(prev_end, end)
    return answering, gaps


class _Device:
    """One configured Modbus device: its register map, SimDevice, access hook and faults."""

    def __init__(self, site: SimulatedSite, config: DeviceConfig, profile: Profile,
                 faults: FaultInjector) -> None:
        self.site = site
        self.config = config
        self.name = config.name
        self.device_id = config.device_id
        self.line = config.line
        self.profile = profile
        self.faults = faults
        self.points: dict[Table, list[Point]] = {t: [] for t in _TABLES}
        for p in profile.points:
            assert p.table is not None  # every point of a Modbus profile has one
            self.points[p.table].append(p)
        self.answering: dict[Table, set[int]] = {}
        self.gaps: dict[Table, list[tuple[int, int]]] = {}
        for table in _TABLES:
            self.answering[table], self.gaps[table] = _spans(self.points[table], profile.max_gap)
        self.coils: dict[int, Point] = {p.address: p for p in self.points[Table.COIL]
                                        if p.address is not None}
        where = f"device {self.name!r} (profile {profile.id!r})"
        self.cells: dict[Table, list[_Cell]] = {
            t: _cells(self.points[t], where) for t in (Table.HOLDING, Table.INPUT)}
        # Register points the physics serves (refreshed on every read); the others hold what
        # was written to them, initially 0.
        self.live: set[str] = {p.name for t in (Table.HOLDING, Table.INPUT)
                               for p in self.points[t] if is_known(p.name) and not p.writable}
        # Cells composed again on every read: those with a live point, and merged bit fields
        # (so that a write of the whole register changes only the bits a master may write).
        self.refresh: dict[Table, list[_Cell]] = {
            t: [c for c in cells if c.merged or any(p.name in self.live for p in c.points)]
            for t, cells in self.cells.items()}
        # The datastore this device is served from (set when its bus starts), and while the
        # ``frozen`` fault is on, what every read answers.
        self.runtime: SimRuntime | None = None
        self._snapshot: _Snapshot | None = None
        faults.on_frozen(self._frozen_changed)

    def bits_answer(self, table: Table, address: int, count: int) -> bool:
        answering = self.answering[table]
        return all(a in answering for a in range(address, address + count))

    # -- building ----------------------------------------------------------------------------

    def _bit_block(self, table: Table) -> list[SimData]:
        blocks = []
        for p in self.points[table]:
            assert p.address is not None
            relay = f"{self.name}.{p.name}"
            if table is Table.COIL:
                value = self.site.physics.relay_on(relay)
            else:
                value = bool(lookup(self.site.physics.quantities(self.site.clock(), self.name),
                                          p.name))
            blocks.append(SimData(address=p.address, values=[value], datatype=DataType.BITS))
        for start, length in self.gaps[table]:
            blocks.append(SimData(address=start, values=[False] * length,
                                  datatype=DataType.BITS))
        if not blocks:  # pymodbus needs one entry per block; bits_answer() rejects it all
            blocks.append(SimData(address=0, values=[False], datatype=DataType.BITS))
        return blocks

    def _compose(self, cell: _Cell, quantities: dict[str, float], current: list[int] | None
                 ) -> list[int]:
        """The registers of ``cell``: live points from the model; writable points keep what
        ``current`` holds for them (their own bits, in a merged cell; None: nothing written
        yet, they hold 0); other points read 0."""
        if not cell.merged:
            p = cell.points[0]
            if p.name in self.live:
                return encode(lookup(quantities, p.name), p)
            return list(current) if p.writable and current is not None else encode(0.0, p)
        words = [0] * cell.size
        for p in cell.points:
            assert p.address is not None
            at = p.address - cell.address
            if p.name in self.live:
                part = encode(lookup(quantities, p.name), p)
            elif p.writable and current is not None:
                part = [w & m for w, m in zip(current[at:at + p.size], _bit_mask(p), strict=True)]
            else:
                part = encode(0.0, p)
            for i, w in enumerate(part):
                words[at + i] |= w
        return words

    def _register_block(self, table: Table) -> list[SimData]:
        quantities = self.site.physics.quantities(self.site.clock(), self.name)
        blocks = []
        for cell in self.cells[table]:
            blocks.append(SimData(address=cell.address,
                                  values=self._compose(cell, quantities, None),
                                  datatype=DataType.REGISTERS, readonly=not cell.writable))
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

    # -- the frozen fault ----------------------------------------------------------------------

    def attach(self, runtime: SimRuntime) -> None:
        """Serve from ``runtime`` (a bus has started); a device frozen already is snapshotted
        now."""
        self.runtime = runtime
        self._snapshot = self._take_snapshot() if self.faults.frozen else None

    def _frozen_changed(self, frozen: bool) -> None:
        self._snapshot = self._take_snapshot() if frozen else None

    def _take_snapshot(self) -> _Snapshot | None:
        """Every table as a read would answer it now (None: not served yet). Live registers are
        composed from the model's quantities at this moment (energy as of the last sample,
        without advancing it); everything else is what the datastore holds."""
        if self.runtime is None:
            return None
        quantities = self.site.physics.quantities(self.site.clock(), self.name)
        snapshot: _Snapshot = {}
        for table, key in zip(_TABLES, _BLOCK_KEYS, strict=True):
            start, _, registers, _ = self.runtime.block[key]
            words = list(registers)
            for cell in self.refresh.get(table, ()):
                i = cell.address - start
                words[i:i + cell.size] = self._compose(cell, quantities, words[i:i + cell.size])
            snapshot[table] = (start, words)
        return snapshot

    def frozen_answer(self, request: ModbusPDU, response: ModbusPDU) -> None:
        """While ``frozen``: give the answer to a read the snapshot's values for the addresses it
        asked (an exception, or the answer to a write, stays as it is: the write took effect)."""
        function = response.function_code
        if function not in (1, 2, 3, 4, 23) or isinstance(response, ExceptionResponse):
            return
        if self._snapshot is None:  # frozen before the bus was served: from its first read
            self._snapshot = self._take_snapshot()
            if self._snapshot is None:
                return
        start, words = self._snapshot[_FC_TABLE[function]]
        if function in (1, 2):
            response.bits = [bool((words[a // 16 - start] >> (a % 16)) & 1)
                             for a in range(request.address, request.address + request.count)]
            return
        if isinstance(request, ReadWriteMultipleRegistersRequest):
            address, count = request.read_address, request.read_count
        else:
            address, count = request.address, request.count
        response.registers = words[address - start:address - start + count]

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
            if table is Table.HOLDING:
                self._write_registers(start_address, address, registers,
                                      [int(v) for v in set_values])
            return None
        # A write's answer (pymodbus reads the registers back for it) echoes what was written:
        # only reads see the registers composed afresh.
        if function_code in _REGISTER_READS and self.refresh[table]:
            quantities = self.site.physics.sample(self.site.clock(), self.name)
            for cell in self.refresh[table]:
                i = cell.address - start_address
                registers[i:i + cell.size] = self._compose(cell, quantities,
                                                           registers[i:i + cell.size])
        return None

    def _write_registers(self, start_address: int, address: int, registers: list[int],
                         values: list[int]) -> None:
        """Tell the model the new value of every writable point the write touches (the hook
        runs before pymodbus stores ``values``: the point's words are taken with them laid over)."""
        end = address + len(values)
        t = self.site.clock()
        for p in self.points[Table.HOLDING]:
            assert p.address is not None
            if not p.writable or p.address >= end or p.address + p.size <= address:
                continue
            words = list(registers[p.address - start_address: p.address - start_address + p.size])
            for i in range(p.size):
                if address <= p.address + i < end:
                    words[i] = values[p.address + i - address]
            self.site.physics.write_point(p.name, decode(words, p), t)

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


class _BusCore(SimCore):
    """The datastore of one bus (the TCP server or one RTU line): its devices by device id."""

    def __init__(self, devices: list[_Device]) -> None:
        super().__init__([d.simdevice() for d in devices])
        self.by_id = {d.device_id: d for d in devices}
        for d in devices:
            d.attach(self.devices[d.device_id])

    def bits_answer(self, device_id: int, table: Table, address: int, count: int) -> bool:
        device = self.by_id.get(device_id)
        return device is not None and device.bits_answer(table, address, count)


class _ReadCoils(ReadCoilsRequest):
    """pymodbus checks bit addresses per 16-bit word: check each bit of the request here."""

    async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
        if isinstance(context, _BusCore) and not context.bits_answer(device_id, Table.COIL,
                                                                     self.address, self.count):
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
        return await super().datastore_update(context, device_id)


class _ReadDiscreteInputs(ReadDiscreteInputsRequest):
    async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
        if isinstance(context, _BusCore) and not context.bits_answer(device_id, Table.DISCRETE,
                                                                     self.address, self.count):
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_ADDRESS)
        return await super().datastore_update(context, device_id)


class _WriteSingleCoil(WriteSingleCoilRequest):
    """A write-coil value other than FF00/0000 answers 03 (pymodbus takes any non-zero as on)."""

    raw_value: int = _COIL_ON

    def decode(self, data: bytes) -> None:
        super().decode(data)
        self.raw_value = struct.unpack(">H", data[2:4])[0]

    async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
        if self.raw_value not in (_COIL_ON, _COIL_OFF):
            return ExceptionResponse(self.function_code, ExcCodes.ILLEGAL_VALUE)
        return await super().datastore_update(context, device_id)


def _request_decoder() -> DecodePDU:
    decoder = DecodePDU(True)
    for cls in (_ReadCoils, _ReadDiscreteInputs, _WriteSingleCoil):
        decoder.register(cls)
    return decoder


def _exception(function: int, code: int) -> bytes:
    return bytes([(function | 0x80) & 0xFF, code & 0xFF])


class SimulatedSite:
    """A :class:`~lmt.config.site.SiteConfig` served over Modbus TCP, Modbus RTU lines and
    DL/T 645 lines.

    ``wire_time``: serial lines answer at the pace of their baud rate (see
    :mod:`~lmt.firmware_sim.rtu`); False answers as fast as possible. ``profiles``: profiles
    by id that take the place of the library's (a profile under test, built in code).
    """

    def __init__(self, config: SiteConfig, host: str | None = None, port: int | None = None,
                 clock: Clock = time.time, wire_time: bool = True,
                 profiles: Mapping[str, Profile] | None = None) -> None:
        given = dict(profiles or {})

        def profile(profile_id: str) -> Profile:
            return given[profile_id] if profile_id in given else load_profile(profile_id)

        self.config = config
        self._profile = profile
        self.host = config.server.host if host is None else host
        self.port = config.server.port if port is None else port
        self.clock = clock
        self.physics = SitePhysics(config)
        protocol = {ln.name: ln.protocol for ln in config.lines}
        #: Fault injectors of every device (DL/T 645 meters included), by device name.
        self.injectors: dict[str, FaultInjector] = {
            d.name: FaultInjector(d.faults, f"{config.site.seed}:{d.name}") for d in config.devices}
        #: Devices on DL/T 645 lines (meters served by :attr:`dlt645_lines`).
        self.dlt645_devices: list[DeviceConfig] = [
            d for d in config.devices if d.line is not None and protocol[d.line] == "dlt645"]
        self.devices = [_Device(self, d, profile(d.profile), self.injectors[d.name])
                        for d in config.devices if d not in self.dlt645_devices]
        self.tcp_devices = [d for d in self.devices if d.line is None]
        #: Modbus RTU lines by name (``path`` is set once started).
        self.rtu_lines: dict[str, RtuLineServer] = {}
        for ln in config.lines:
            if ln.protocol != "modbus-rtu":
                continue
            on = [d for d in self.devices if d.line == ln.name]
            self.rtu_lines[ln.name] = RtuLineServer(ln, self._rtu_handler(ln.name),
                                                    [d.device_id for d in on], wire_time)
        #: DL/T 645 lines by name (``device_path`` is set once started); a line with no
        #: meters is not opened.
        self.dlt645_lines: dict[str, Dlt645Line] = {}
        self._meter_names: dict[tuple[str, str], str] = {}  # (line, address) -> device name
        for ln in config.lines:
            meters = [d for d in self.dlt645_devices if d.line == ln.name]
            if ln.protocol != "dlt645" or not meters:
                continue
            addresses = {}
            for d in meters:
                assert d.address is not None  # the site file's validation requires it
                addresses[d.address] = d
                self._meter_names[(ln.name, d.address)] = d.name
            self.dlt645_lines[ln.name] = Dlt645Line(
                {a: profile(d.profile) for a, d in addresses.items()},
                {a: partial(self.physics.sample, device=d.name) for a, d in addresses.items()},
                clock=clock, line_settings=ln,
                on_relay=self._meter_relay_handler(ln.name), seed=config.site.seed,
                injectors={a: self.injectors[d.name] for a, d in addresses.items()},
                wire_time=wire_time)
        self._cores: dict[str | None, _BusCore] = {}  # by line name; None: the TCP server
        self._decoder = _request_decoder()
        #: Coil writes by device name, oldest first.
        self.coil_writes: dict[str, list[CoilWrite]] = {d.name: [] for d in self.devices}
        self._listeners: list[Callable[[CoilChange], None]] = []
        #: DL/T 645 meter relays that opened or closed, oldest first.
        self.meter_relay_changes: list[MeterRelayChange] = []
        self._relay_listeners: list[Callable[[MeterRelayChange], None]] = []
        self._tcp: _TcpServer | None = None
        self.bound_port: int | None = None

    def add_listener(self, callback: Callable[[CoilChange], None]) -> None:
        """Call ``callback`` (in the server's event loop) whenever a coil changes state."""
        self._listeners.append(callback)

    def add_meter_relay_listener(self, callback: Callable[[MeterRelayChange], None]) -> None:
        """Call ``callback`` (in the server's event loop) whenever a DL/T 645 meter's relay
        opens or closes."""
        self._relay_listeners.append(callback)

    async def start(self) -> int:
        """Start the TCP server and every serial line; returns the bound TCP port."""
        if self._tcp is not None:
            raise RuntimeError("the simulated site is already started")
        self._cores = {None: _BusCore(self.tcp_devices)}
        for name in self.rtu_lines:
            self._cores[name] = _BusCore([d for d in self.devices if d.line == name])
        tcp = _TcpServer(self, self._cores[None], self.host, self.port)
        port = await tcp.start()
        self._tcp = tcp
        try:
            for line in self.rtu_lines.values():
                await line.start()
            for meters in self.dlt645_lines.values():
                await meters.start()
        except BaseException:
            await self.stop()
            raise
        self.bound_port = port
        self.physics.sample(self.clock())  # the energy register integrates from now
        return port

    async def stop(self) -> None:
        """Stop the TCP server (closing every connection) and the lines; a no-op when stopped."""
        tcp, self._tcp = self._tcp, None
        if tcp is None:
            return
        for line in self.rtu_lines.values():
            await line.stop()
        for meters in self.dlt645_lines.values():
            await meters.stop()
        await tcp.stop()

    @property
    def running(self) -> bool:
        return self._tcp is not None

    def loads_on(self) -> dict[str, bool]:
        """On/off state of every load, by load name."""
        return self.physics.loads_on()

    def site_power_kw(self, t: float | None = None) -> float:
        """Total active power the main meter measures at ``t`` (default: now), in kW."""
        return self.physics.power_kw(self.clock() if t is None else t)

    def line_paths(self) -> dict[str, str]:
        """The device path of every started serial line (Modbus RTU and DL/T 645), by line
        name, in the site file's order."""
        paths: dict[str, str] = {}
        for ln in self.config.lines:
            rtu, dlt = self.rtu_lines.get(ln.name), self.dlt645_lines.get(ln.name)
            if rtu is not None and rtu.path:
                paths[ln.name] = rtu.path
            elif dlt is not None and dlt.running:
                paths[ln.name] = dlt.device_path
        return paths

    def meter_relay_closed(self, device_name: str) -> bool:
        """Whether the relay of the DL/T 645 meter ``device_name`` is closed."""
        for d in self.dlt645_devices:
            if d.name == device_name and d.line is not None and d.address is not None:
                return self.dlt645_lines[d.line].relay_closed(d.address)
        raise KeyError(f"no DL/T 645 meter named {device_name!r}")

    # -- faults ----------------------------------------------------------------------------------

    def set_faults(self, device_name: str, faults: Faults) -> None:
        """Replace the faults of a device, Modbus or DL/T 645 (from now on, for every
        request)."""
        injector = self.injectors.get(device_name)
        if injector is None:
            raise KeyError(f"no device named {device_name!r} (devices: "
                           f"{', '.join(self.injectors)})")
        injector.faults = faults

    def faults(self, device_name: str) -> Faults:
        """The faults a device currently shows."""
        injector = self.injectors.get(device_name)
        if injector is None:
            raise KeyError(f"no device named {device_name!r}")
        return injector.faults

    # -- energy-ledger signatures ----------------------------------------------------------------

    def _meter_device(self, device_name: str) -> DeviceConfig:
        for d in self.config.devices:
            if d.name == device_name:
                if self._profile(d.profile).kind != "meter":
                    raise ValueError(f"{device_name!r} is not a meter (profile {d.profile!r})")
                return d
        raise KeyError(f"no device named {device_name!r} (devices: "
                       f"{', '.join(d.name for d in self.config.devices)})")

    def set_tamper(self, device_name: str, tamper: Tamper) -> None:
        """Replace the signatures a meter shows, from now on (its registers count what it sees
        from now; a reversed CT or a shunt that starts counts its DL/T 645 event)."""
        self._meter_device(device_name)
        self.physics.set_tamper(device_name, tamper, self.clock())
        _log.info("%s tamper -> %s", device_name, describe_tamper(tamper))

    def tamper(self, device_name: str) -> Tamper:
        """The signatures a meter currently shows."""
        self._meter_device(device_name)
        return self.physics.tamper(device_name)

    def count_event(self, device_name: str, key: str) -> int:
        """A meter records one event (``"cover_open"``: its cover was opened); returns the new
        count. The meter's profile must serve the count (``event_<key>_count``)."""
        d = self._meter_device(device_name)
        if key not in EVENT_KEYS:
            raise KeyError(f"no event {key!r} (events: {', '.join(EVENT_KEYS)})")
        point = f"event_{key}_count"
        if not self._profile(d.profile).has_point(point):
            raise ValueError(f"{device_name!r} (profile {d.profile!r}) has no point {point}")
        count = self.physics.count_event(device_name, key)
        _log.info("%s event %s -> %d", device_name, key, count)
        return count

    def events(self, device_name: str) -> dict[str, int]:
        """A meter's event counters."""
        self._meter_device(device_name)
        return self.physics.events(device_name)

    def jump_register(self, device_name: str, kwh: float) -> float:
        """A one-off step of a meter's import register by ``kwh`` (negative: back), now;
        returns the new reading."""
        self._meter_device(device_name)
        reading = self.physics.jump_register(device_name, kwh, self.clock())
        _log.info("%s import register %+.2f kWh -> %.2f kWh", device_name, kwh, reading)
        return reading

    def set_unmetered_kw(self, kw: float) -> None:
        """Change the load between the main meter and the sub-meters, from now on."""
        self.physics.set_unmetered_kw(kw, self.clock())
        _log.info("unmetered load -> %.1f kW", kw)

    # -- the request path shared by TCP and RTU --------------------------------------------------

    def _rtu_handler(self, line: str) -> Callable[[int, bytes], Coroutine[Any, Any, Reply]]:
        async def handler(device_id: int, pdu: bytes) -> Reply:
            return await self.handle_request(line, device_id, pdu)
        return handler

    async def handle_request(self, line: str | None, device_id: int, request: bytes) -> Reply:
        """What the device ``device_id`` on ``line`` (None: the TCP server) answers to the
        request PDU ``request`` (function code + data), faults applied."""
        serial = line is not None
        core = self._cores[line]
        device = core.by_id.get(device_id)
        if device is None:
            # on a line nobody answers; a TCP gateway says the target did not respond
            return Reply() if serial else Reply(_exception(request[0], ExcCodes.GATEWAY_NO_RESPONSE))
        decision = device.faults.decide(serial)
        if decision.outcome is Outcome.SILENT:
            return Reply()
        if decision.delay_s > 0:
            await asyncio.sleep(decision.delay_s)
        if decision.outcome is Outcome.DROP:
            return Reply(drop=True)
        if decision.outcome is Outcome.EXCEPTION:
            return Reply(_exception(request[0], decision.exception_code))
        answer = await self._execute(core, device_id, request)
        if decision.outcome is Outcome.GARBAGE:
            return Reply(garbage=device.faults.garbage(len(answer) + (3 if serial else 7)))
        return Reply(answer, bad_crc=decision.outcome is Outcome.CRC_ERROR)

    async def _execute(self, core: _BusCore, device_id: int, request: bytes) -> bytes:
        """Decode and run one request on the bus's datastore; returns the answer PDU."""
        function = request[0]
        if function not in _FC_TABLE:
            return _exception(function, ExcCodes.ILLEGAL_FUNCTION)
        pdu = self._decoder.decode(request)
        if pdu is None:  # wrong length, count out of range
            return _exception(function, ExcCodes.ILLEGAL_VALUE)
        pdu.dev_id = device_id
        try:
            # pymodbus annotates the context as a ModbusServerContext; its own server, like
            # this one, passes its SimCore datastore
            response = await pdu.datastore_update(core, device_id)  # type: ignore[arg-type]
            device = core.by_id.get(device_id)
            if device is not None and device.faults.frozen:
                device.frozen_answer(pdu, response)
            return bytes([response.function_code]) + response.encode()
        except Exception:
            _log.exception("device id %d: request %s failed", device_id, request.hex(" "))
            return _exception(function, ExcCodes.DEVICE_FAILURE)

    # -- hooks -----------------------------------------------------------------------------------

    def _meter_relay_handler(self, line: str) -> Callable[[str, bool], None]:
        def on_relay(address: str, closed: bool) -> None:
            self._meter_relay(line, address, closed)
        return on_relay

    def _meter_relay(self, line: str, address: str, closed: bool) -> None:
        change = MeterRelayChange(self.clock(), self._meter_names[(line, address)], address,
                                  closed)
        self.meter_relay_changes.append(change)
        for callback in self._relay_listeners:
            try:
                callback(change)
            except Exception:
                _log.exception("meter relay listener failed")

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


class _TcpServer:
    """Modbus TCP: MBAP frames; the unit id selects the device. Requests on one connection are
    answered concurrently (a slow device does not hold up the others behind a gateway)."""

    def __init__(self, site: SimulatedSite, core: _BusCore, host: str, port: int) -> None:
        self.site = site
        self.core = core
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        try:
            self._server = await asyncio.start_server(self._connection, self.host, self.port)
        except OSError as exc:
            raise OSError(f"cannot listen on {self.host}:{self.port} "
                          f"({exc.strerror or 'address in use or not available'})") from exc
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (me := asyncio.current_task()) is not None:
            self._track(me)
        self._writers.add(writer)
        try:
            while True:
                tid, pid, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                if pid != 0 or not 2 <= length <= 254:
                    break  # not Modbus: hang up
                pdu = await reader.readexactly(length - 1)
                self._track(asyncio.create_task(self._answer(writer, tid, unit, pdu)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, tid: int, unit: int, pdu: bytes) -> None:
        reply = await self.site.handle_request(None, unit, pdu)
        if writer.is_closing():
            return
        if reply.drop:
            writer.close()
        elif reply.garbage is not None:
            writer.write(reply.garbage)
        elif reply.pdu is not None:
            writer.write(struct.pack(">HHHB", tid, 0, len(reply.pdu) + 1, unit) + reply.pdu)


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


def ready_info_path(ready_file: Path) -> Path:
    """Where ``lmt sim --ready-file F`` writes its JSON details: ``F.json`` next to ``F``."""
    return ready_file.with_name(ready_file.name + ".json")


async def run_site(path: Path | str, port_override: int | None = None,
                   ready_file: Path | None = None, control_port: int | None = None) -> None:
    """Serve the site file ``path`` until cancelled, SIGTERM or SIGINT.

    Once serving, writes the bound TCP port into ``ready_file`` (text, ``"5020\n"``) and, just
    before it, ``<ready_file>.json``: ``{"port": 5020, "control_port": 40123 or null,
    "lines": {"<line>": "/dev/pts/4", ...}}`` (every Modbus RTU and DL/T 645 line's
    pseudo-terminal); both are removed again on stop. With ``control_port`` (0: a free port),
    serves the control channel (:mod:`~lmt.firmware_sim.control`) on 127.0.0.1. Logs one line
    per bus (with each serial line's pseudo-terminal), each coil change and each DL/T 645 meter
    relay that opens or closes (logger ``lmt.firmware_sim.server``, INFO; to stderr when the
    program has not configured logging).
    Raises ``ConfigError`` for a bad site file and ``OSError`` when it cannot listen.
    """
    with _log_to_stderr():
        await _run_site(path, port_override, ready_file, control_port)


def describe_tamper(tamper: Tamper) -> str:
    """``ct_shunt l2 (2 % seen), ct_reversed l3, pt_loss l1 (0 % seen), phase_break l2,
    registers stopped``, or ``none``."""
    parts = []
    if tamper.ct_shunt is not None:
        parts.append(f"ct_shunt {tamper.ct_shunt.phase} ({tamper.ct_shunt.seen:.0%} seen)")
    if tamper.ct_reversed is not None:
        parts.append(f"ct_reversed {tamper.ct_reversed}")
    if tamper.pt_loss is not None:
        parts.append(f"pt_loss {tamper.pt_loss.phase} ({tamper.pt_loss.seen:.0%} seen)")
    if tamper.phase_break is not None:
        parts.append(f"phase_break {tamper.phase_break}")
    if tamper.registers != "counting":
        parts.append(f"registers {tamper.registers}")
    return ", ".join(parts) or "none"


def _describe(devices: Iterable[_Device]) -> str:
    return ", ".join(f"{d.name} (id {d.device_id}, {d.profile.id})" for d in devices) or "no devices"


def describe_dlt645_line(line: Dlt645Line) -> str:
    """``mains (dlt645 2400 8E1) on /dev/pts/5 -> /tmp/ttyDLT``."""
    s = line.settings
    where = (line.device_path or "(not started)") + (f" -> {s.link}" if s.link else "")
    return (f"{s.name} (dlt645 {s.baud or 2400} {s.byte_size}{s.parity or 'E'}{s.stop_bits}) "
            f"on {where}")


async def _run_site(path: Path | str, port_override: int | None, ready_file: Path | None,
                    control_port: int | None) -> None:
    from .control import ControlServer  # control imports this module

    config = load_site(path)
    site = SimulatedSite(config, port=port_override)
    site.add_listener(lambda change: _log.info("%s", change.describe()))
    site.add_meter_relay_listener(lambda change: _log.info("%s", change.describe()))
    control = ControlServer(site, port=control_port) if control_port is not None else None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            continue
        installed.append(sig)
    info = ready_info_path(Path(ready_file)) if ready_file is not None else None
    try:
        port = await site.start()
        _log.info("lmt sim: %s on %s:%d: %s", config.site.name, site.host, port,
                  _describe(site.tcp_devices))
        for name, line in site.rtu_lines.items():
            _log.info("lmt sim: line %s: %s", line.describe(),
                      _describe(d for d in site.devices if d.line == name))
        for name, meters in site.dlt645_lines.items():
            _log.info("lmt sim: line %s: %s", describe_dlt645_line(meters), ", ".join(
                f"{d.name} ({d.address}, {d.profile})"
                for d in site.dlt645_devices if d.line == name))
        for ln in config.lines:
            if ln.protocol == "dlt645" and ln.name not in site.dlt645_lines:
                _log.info("lmt sim: line %s (dlt645) has no meters: not opened", ln.name)
        for d in config.devices:
            if d.tamper != Tamper():
                _log.info("lmt sim: %s tamper: %s", d.name, describe_tamper(d.tamper))
        if config.site.unmetered_kw:
            _log.info("lmt sim: unmetered load %.1f kW", config.site.unmetered_kw)
        bound_control = await control.start() if control is not None else None
        if bound_control is not None:
            _log.info("lmt sim: control channel on 127.0.0.1:%d", bound_control)
        if ready_file is not None and info is not None:
            write_atomically(info, json.dumps({"port": port, "control_port": bound_control,
                                               "lines": site.line_paths()}) + "\n")
            write_atomically(Path(ready_file), f"{port}\n")
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        was_running = site.running
        if control is not None:
            await control.stop()
        await site.stop()
        for f in (ready_file, info):
            if f is not None:
                with contextlib.suppress(OSError):
                    Path(f).unlink(missing_ok=True)
        if was_running:
            _log.info("lmt sim: %s stopped", config.site.name)
