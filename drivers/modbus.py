"""Modbus driver: coalesced block reads of a profile's points, verified coil writes, on any bus.

A bus is one Modbus connection — :class:`ModbusTcpBus` (a TCP socket to a meter or a gateway)
or :class:`~lmt.drivers.modbus_rtu.ModbusRtuBus` (one serial line) — shared by the device ids
behind it and running one transaction at a time. A :class:`ModbusDevice` is one device id on a
bus, read and written through its profile; it works the same on either bus.

Every bus counts its ``transactions`` and the bytes of the Modbus frames it sent and received
(``bytes_sent``/``bytes_received``: MBAP header + PDU on TCP, the whole RTU frame with its CRC
on a serial line; TCP/IP headers are not counted).

Failures are typed (:mod:`lmt.drivers.errors`), each with its ``cause``: cannot connect, a
connection refused or dropped (``connect``), no answer within the timeout (``no_answer``), an
answer that does not decode, is short or answers another request (``garbled``), an exception
answer (``exception``, ``busy`` for code 6), a write whose read-back differs (``verification``).

:meth:`ModbusDevice.read` reads what it can and returns a :class:`~lmt.drivers.result.ReadResult`:
the values, and the blocks the device refused with their errors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from lmt.config.profiles import Point, Profile, Table

from .codec import Decoder, decoder, encode_value
from .errors import Cause, DeviceException, DeviceUnavailable, VerificationError
from .plan import Block, due_points, plan_reads
from .result import PointsFailure, ReadResult

Value = float | bool | None

#: Builds the request on the bus's pymodbus client, e.g. ``lambda c: c.read_coils(0, count=8)``.
RequestFactory = Callable[[Any], Awaitable[ModbusPDU]]

#: Exception codes that say the device itself is not reachable (a gateway's "path unavailable",
#: "target failed to respond"): the whole device is unavailable, not one block.
UNREACHABLE_CODES = frozenset({10, 11})

_RTU_REQUEST_BYTES = 8  # a read request on a serial line: id, function, address, count, CRC

_HEX_SHOWN = 24  # bytes of a garbled answer quoted in an error message


def hex_bytes(data: bytes, limit: int = _HEX_SHOWN) -> str:
    """``01 04 02 ff`` (first ``limit`` bytes, then ``…``)."""
    shown = data[:limit].hex(" ")
    return shown + (" …" if len(data) > limit else "")


class ModbusBus:
    """One Modbus bus: one transaction at a time, typed errors, wire counters.

    Subclasses make the pymodbus client (lazily, inside the running loop: pymodbus clients
    need one at construction) and may hook the moments around a transaction.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        #: A shorter timeout per request, changed between requests (the agent's adaptive
        #: timeout); ``timeout_s`` stays pymodbus's own ceiling. None: ``timeout_s`` alone.
        self.request_timeout_s: float | None = None
        self._client: ModbusBaseClient | None = None
        self._lock: asyncio.Lock | None = None
        self.transactions = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._rx_seen = b""  # the receive buffer trace_packet saw last (pymodbus accumulates)
        self._request = b""  # the last frame sent
        self._answer = bytearray()  # bytes received since the last frame sent
        self._lost = False  # the connection went down during the transaction

    # -- to be provided by a subclass ------------------------------------------------------------

    @property
    def name(self) -> str:
        raise NotImplementedError

    def _make_client(self) -> ModbusBaseClient:
        raise NotImplementedError

    def _connect_error(self, exc: BaseException) -> tuple[str, Cause]:
        """Why connecting raised ``exc``, in one sentence, and its cause."""
        return f"cannot connect: {exc}", "connect"

    async def _connect_failed(self) -> tuple[str, Cause]:
        """Why the client could not connect, in one sentence, and its cause."""
        return "cannot connect", "connect"

    async def _before_request(self) -> None:
        """Called under the bus lock, connected, just before the request is built and sent."""

    def _on_sent(self, frame: bytes) -> None:
        """Called as pymodbus hands a request frame to the transport."""

    def _on_received(self, data: bytes) -> None:
        """Called with each chunk of bytes received."""

    def _no_answer(self, exc: ModbusException) -> tuple[str, Cause]:
        """Why a request got no usable answer (called after pymodbus gave up), and its cause."""
        if self._lost:
            return "connection closed by the device", "connect"
        if not self._answer:
            return f"no answer within {self.timeout_s:g} s", "no_answer"
        return (f"garbled answer ({len(self._answer)} bytes: {hex_bytes(bytes(self._answer))})",
                "garbled")

    def _close_after_failure(self) -> bool:
        """Close the connection after a failed transaction (TCP: yes, a fresh socket is cheap)."""
        return True

    # -- the client ------------------------------------------------------------------------------

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        """pymodbus ``trace_packet`` hook: count the bytes on the wire.

        On receive pymodbus passes its whole receive buffer, which grows chunk by chunk until a
        frame decodes; only what is new since the previous call is counted.
        """
        if sending:
            self.bytes_sent += len(data)
            self._rx_seen = b""
            self._request = bytes(data)
            self._answer.clear()
            self._on_sent(data)
            return data
        seen = self._rx_seen
        new = data[len(seen):] if seen and data.startswith(seen) else data
        self._rx_seen = bytes(data)
        if new:
            self.bytes_received += len(new)
            self._answer += new
            self._on_received(bytes(new))
        return data

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:  # a frame decoded: pymodbus dropped it from its receive buffer
            self._rx_seen = b""
        return pdu

    def _trace_connect(self, connected: bool) -> None:
        if not connected:
            self._lost = True

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def ensure_connected(self) -> ModbusBaseClient:
        """The connected client (made on first use); raises DeviceUnavailable."""
        if self._client is None:
            self._client = self._make_client()
        if self._client.connected:
            return self._client
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            raise DeviceUnavailable(self.name, *self._connect_error(exc)) from exc
        if not ok:
            raise DeviceUnavailable(self.name, *await self._connect_failed())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    async def call(self, label: str, function: int, coro_factory: RequestFactory) -> ModbusPDU:
        """Run one request under the bus lock; map failures to typed errors.

        ``function`` is the request's function code: an answer with another one (a late answer
        to an earlier request) is refused. Raises DeviceUnavailable (no usable answer) or
        DeviceException (the device answered with an exception code).
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            client = await self.ensure_connected()
            await self._before_request()
            self.transactions += 1
            self._lost = False
            self._answer.clear()
            try:
                async with asyncio.timeout(self.request_timeout_s):  # None: pymodbus's alone
                    rr = await coro_factory(client)
            except TimeoutError as exc:  # ours (the agent's adaptive timeout), or pymodbus's
                client.close()  # drop the half-finished transaction
                if self.request_timeout_s is not None:
                    raise DeviceUnavailable(label, f"no answer within {self.request_timeout_s:g} s",
                                            "no_answer") from exc
                raise DeviceUnavailable(label, f"connection failed: {exc}", "connect") from exc
            except ModbusException as exc:
                reason, cause = self._no_answer(exc)
                if self._close_after_failure():
                    client.close()
                raise DeviceUnavailable(label, reason, cause) from exc
            except OSError as exc:
                client.close()
                raise DeviceUnavailable(label, f"connection failed: {exc}", "connect") from exc
        answered = rr.function_code & 0x7F
        if answered != function:
            raise DeviceUnavailable(label, f"answer to another request (function {answered}, "
                                           f"expected {function})", "garbled")
        if rr.isError():
            code = getattr(rr, "exception_code", 0)
            raise DeviceException(label, function, int(code))
        return rr


class ModbusTcpBus(ModbusBus):
    """One Modbus TCP connection, shared by the device ids behind it."""

    def __init__(self, host: str, port: int, timeout_s: float = 1.0) -> None:
        super().__init__(timeout_s)
        self.host = host
        self.port = port

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def _make_client(self) -> ModbusBaseClient:
        # reconnect_delay=0: no background reconnects; the agent decides when to retry.
        return AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s, retries=0,
                                    reconnect_delay=0, trace_packet=self._trace_packet,
                                    trace_pdu=self._trace_pdu, trace_connect=self._trace_connect)

    async def _connect_failed(self) -> tuple[str, Cause]:
        return "cannot connect (refused or timed out)", "connect"


class ModbusDevice:
    """A device id on a Modbus bus (TCP or RTU), read and written through its profile."""

    def __init__(self, name: str, bus: ModbusBus, device_id: int, profile: Profile) -> None:
        self.name = name
        self.bus = bus
        self.device_id = device_id
        self.profile = profile
        self._plans: dict[tuple[str, ...], list[Block]] = {}
        # per planned block (they live in _plans): (name, offset, size, decoder) of its points
        self._decoders: dict[int, list[tuple[str, int, int, Decoder]]] = {}
        self.last_latency_s = 0.0
        #: Adjacent coils in one request (function 15); False once the device answered
        #: "illegal function" to one: then one coil per request (function 05).
        self.multi_coil_writes = True

    def plan(self, names: Iterable[str] | None = None) -> list[Block]:
        """Block reads for these points (all when None); never across a profile barrier."""
        key = tuple(sorted(names)) if names is not None else ()
        if key not in self._plans:
            pts = self.profile.points if not key else tuple(self.profile.point(n) for n in key)
            self._plans[key] = plan_reads(pts, self.profile.max_gap, barriers=self.profile.points)
        return self._plans[key]

    def transactions(self, names: Iterable[str] | None = None) -> int:
        """How many requests reading these points takes (one per planned block)."""
        return len(self.plan(names))

    def wire_time_s(self, names: Iterable[str] | None = None) -> float:
        """Seconds the requests and answers of reading these points take on a serial line, with
        the inter-frame silence before each request; 0 over TCP."""
        char = float(getattr(self.bus, "char_time_s", 0.0))  # serial (RTU) buses only
        if not char:
            return 0.0
        blocks = self.plan(names)
        size = sum(_RTU_REQUEST_BYTES + 5 + ((b.count + 7) // 8 if b.table.is_bit else 2 * b.count)
                   for b in blocks)
        return size * char + len(blocks) * float(getattr(self.bus, "silence_s", 0.0))

    def due(self, last_read: dict[str, float], now: float, fast_interval_s: float,
            slow_interval_s: float) -> list[str]:
        """Names of the points older than their poll class allows (poll by age)."""
        return [p.name for p in due_points(self.profile.points, last_read, now, fast_interval_s,
                                           slow_interval_s)]

    async def _read_block(self, block: Block) -> list[int] | list[bool]:
        dev = self.device_id
        fn = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}[block.table]

        def request(c: Any) -> Awaitable[ModbusPDU]:
            if block.table is Table.COIL:
                return c.read_coils(block.address, count=block.count, device_id=dev)
            if block.table is Table.DISCRETE:
                return c.read_discrete_inputs(block.address, count=block.count, device_id=dev)
            if block.table is Table.HOLDING:
                return c.read_holding_registers(block.address, count=block.count, device_id=dev)
            return c.read_input_registers(block.address, count=block.count, device_id=dev)

        rr = await self.bus.call(self.name, fn, request)
        if block.table.is_bit:
            bits = list(rr.bits)
            if len(bits) < block.count:
                raise DeviceUnavailable(self.name, f"short answer: {len(bits)} bits", "garbled")
            return bits[: block.count]
        regs = list(rr.registers)
        if len(regs) != block.count:
            raise DeviceUnavailable(self.name, f"short answer: {len(regs)} of {block.count} registers",
                                    "garbled")
        return regs

    async def read(self, names: Iterable[str] | None = None) -> ReadResult:
        """Read points (all of the profile's when ``names`` is None) in planned block reads, as
        many as the device gives.

        A block the device answers with an exception (an illegal data address, say) is left
        out, its points missing from the values and listed in the result's ``failures`` with
        the error, and the other blocks are still read. The read raises when no block could be
        read, or at the first sign that the device is not reachable (:class:`DeviceUnavailable`:
        no answer, connection lost, garbled; or a gateway's exception 10/11).
        """
        return await self._read(names, partial=True)

    async def read_points(self, names: Iterable[str] | None = None) -> dict[str, Value]:
        """Read points (all of the profile's when ``names`` is None) in planned block reads;
        any failure raises (the field tools' strict read; :meth:`read` reads what it can)."""
        return (await self._read(names, False)).values

    async def _read(self, names: Iterable[str] | None, partial: bool) -> ReadResult:
        """The block reads of :meth:`read` (``partial``) and of a strict :meth:`read_points`."""
        start = time.monotonic()
        blocks = self.plan(names)
        out: dict[str, Value] = {}
        failures: list[PointsFailure] = []
        for block in blocks:
            try:
                data = await self._read_block(block)
            except DeviceException as exc:
                if not partial or exc.code in UNREACHABLE_CODES:
                    raise
                failures.append((tuple(p.name for p in block.points), exc))
                continue
            if block.table.is_bit:
                for p in block.points:
                    assert p.address is not None  # a planned block holds Modbus points only
                    out[p.name] = bool(data[p.address - block.address])
                continue
            decoders = self._decoders.get(id(block))
            if decoders is None:
                decoders = self._decoders[id(block)] = [
                    (p.name, (p.address or 0) - block.address, p.size, decoder(p))
                    for p in block.points]
            for name, off, size, decode in decoders:
                out[name] = decode(data[off: off + size])
        if failures and len(failures) == len(blocks):
            raise failures[0][1]
        self.last_latency_s = time.monotonic() - start
        return ReadResult(out, tuple(failures))

    async def write_coil(self, point_name: str, value: bool, verify: bool = True) -> None:
        """Write one coil; with ``verify``, read it back and raise if it did not take."""
        point: Point = self.profile.point(point_name)
        if point.table is not Table.COIL or not point.writable:
            raise ValueError(f"{self.name}: point {point_name!r} is not a writable coil")
        dev = self.device_id
        await self.bus.call(self.name, 5,
                            lambda c: c.write_coil(point.address, value, device_id=dev))
        if verify:
            got = (await self.read_points([point_name]))[point_name]
            if bool(got) != value:
                raise VerificationError(self.name, f"{point_name} written {value}, reads {got}")

    async def write_coils(self, values: dict[str, bool], verify: bool = True
                          ) -> dict[str, Exception | None]:
        """Write several coils: one request per run of adjacent addresses (function 15, or 05
        for a run of one), then, with ``verify``, one read-back of them all. Returns each
        point's error, None where the write took. A run whose request fails fails alone."""
        points: dict[str, Point] = {}
        for name in values:
            point = self.profile.point(name)
            if point.table is not Table.COIL or not point.writable or point.address is None:
                raise ValueError(f"{self.name}: point {name!r} is not a writable coil")
            points[name] = point
        order = sorted(values, key=lambda n: points[n].address or 0)
        runs: list[list[str]] = []
        for name in order:
            if runs and points[name].address == (points[runs[-1][-1]].address or 0) + 1:
                runs[-1].append(name)
            else:
                runs.append([name])
        errors: dict[str, Exception] = {}
        dev = self.device_id
        if not self.multi_coil_writes:  # a module without function 15: one coil per request
            runs = [[n] for n in order]
        for run in runs:
            address = points[run[0]].address or 0
            bits = [bool(values[n]) for n in run]
            try:
                if len(bits) > 1:
                    try:
                        await self.bus.call(self.name, 15, _write_coils(address, bits, dev))
                        continue
                    except DeviceException as exc:
                        if exc.code != 1:  # 1: illegal function; fall back to 05, remember it
                            raise
                        self.multi_coil_writes = False
                for n, a, b in zip(run, range(address, address + len(bits)), bits,
                                   strict=True):
                    try:
                        await self.bus.call(self.name, 5, _write_coil(a, b, dev))
                    except Exception as exc:  # this coil alone
                        errors[n] = exc
            except Exception as exc:  # reported per point; the other runs go on
                for n in run:
                    errors[n] = exc
        written = [n for n in order if n not in errors]
        if verify and written:
            try:
                got = (await self.read(written)).values
            except Exception as exc:  # written, but not confirmed
                got = {}
                for n in written:
                    errors[n] = exc
            for n in written:
                if n not in errors and (got.get(n) is None or bool(got[n]) != bool(values[n])):
                    errors[n] = VerificationError(self.name, f"{n} written {bool(values[n])}, "
                                                  f"reads {got.get(n)}")
        return {n: errors.get(n) for n in values}

    async def write_point(self, point_name: str, value: float | bool, verify: bool = True) -> None:
        """Write a writable point (a coil, or holding registers: function 16); with ``verify``,
        read it back and raise VerificationError if the device holds another value."""
        point: Point = self.profile.point(point_name)
        if not point.writable:
            raise ValueError(f"{self.name}: point {point_name!r} is not writable")
        if point.table is Table.COIL:
            await self.write_coil(point_name, bool(value), verify)
            return
        if point.table is not Table.HOLDING:
            raise ValueError(f"{self.name}: {point.table} points cannot be written")
        assert point.address is not None
        current = None
        if point.bit is not None:  # a bit field: read-modify-write the register(s)
            block = self.plan([point_name])[0]
            data = await self._read_block(block)
            off = point.address - block.address
            current = data[off: off + point.size]
        regs = encode_value(value, point, current)
        dev, address = self.device_id, point.address
        await self.bus.call(self.name, 16,
                            lambda c: c.write_registers(address, regs, device_id=dev))
        if verify:
            got = (await self.read_points([point_name]))[point_name]
            if not _same_value(point, value, got):
                raise VerificationError(self.name, f"{point_name} written {value}, reads {got}")


def _write_coil(address: int, value: bool, device_id: int) -> RequestFactory:
    """Function 05 for one coil (its arguments bound now, not when a loop has moved on)."""
    return lambda c: c.write_coil(address, value, device_id=device_id)


def _write_coils(address: int, values: list[bool], device_id: int) -> RequestFactory:
    """Function 15 for a run of coils from ``address``."""
    return lambda c: c.write_coils(address, values, device_id=device_id)


def _same_value(point: Point, written: float | bool, got: Value) -> bool:
    """Does a read-back match the written value, within the point's resolution?"""
    if got is None:
        return False
    if point.is_bool:
        return bool(got) == bool(written)
    if point.type is not None and point.type.value.startswith("float"):
        tol = 1e-6 * max(1.0, abs(float(written)))  # float32 keeps ~7 digits
    else:
        tol = abs(point.multiplier) / 2  # integer registers: one step of the multiplier
    return abs(float(got) - float(written)) <= tol + 1e-12
