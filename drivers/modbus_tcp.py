"""Modbus TCP driver: coalesced block reads of a profile's points, verified coil writes.

One :class:`ModbusTcpBus` is one TCP connection (a meter, or a gateway in front of several
device ids); it runs one transaction at a time. A :class:`ModbusDevice` is one device id on a
bus, read and written through its profile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from lmt.config.profiles import Point, Profile, Table

from .codec import decode_registers
from .errors import DeviceException, DeviceUnavailable, VerificationError
from .plan import Block, plan_reads

Value = float | bool


class ModbusTcpBus:
    """One Modbus TCP connection, shared by the device ids behind it."""

    def __init__(self, host: str, port: int, timeout_s: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._client: AsyncModbusTcpClient | None = None  # made on first use, inside the loop
        self._lock: asyncio.Lock | None = None
        self.transactions = 0

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._client is not None and bool(self._client.connected)

    async def ensure_connected(self) -> AsyncModbusTcpClient:
        if self._client is None:
            # reconnect_delay=0: no background reconnects; the agent decides when to retry.
            self._client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.timeout_s,
                                                retries=0, reconnect_delay=0)
        if self._client.connected:
            return self._client
        try:
            ok = await self._client.connect()
        except (OSError, ModbusException) as exc:
            raise DeviceUnavailable(self.name, f"cannot connect: {exc}") from exc
        if not ok:
            raise DeviceUnavailable(self.name, "cannot connect (refused or timed out)")
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    async def call(self, label: str, function: int, coro_factory):  # type: ignore[no-untyped-def]
        """Run one request under the bus lock; map transport failures to typed errors."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            client = await self.ensure_connected()
            self.transactions += 1
            try:
                rr = await coro_factory(client)
            except ModbusException as exc:
                client.close()
                raise DeviceUnavailable(label, f"no valid answer: {exc}") from exc
            except (TimeoutError, OSError) as exc:
                client.close()
                raise DeviceUnavailable(label, f"connection failed: {exc}") from exc
        if rr.isError():
            code = getattr(rr, "exception_code", 0)
            raise DeviceException(label, function, int(code))
        return rr


class ModbusDevice:
    """A device id on a Modbus bus, read and written through its profile."""

    def __init__(self, name: str, bus: ModbusTcpBus, device_id: int, profile: Profile) -> None:
        self.name = name
        self.bus = bus
        self.device_id = device_id
        self.profile = profile
        self._plans: dict[tuple[str, ...], list[Block]] = {}
        self.last_latency_s = 0.0

    def plan(self, names: Iterable[str] | None = None) -> list[Block]:
        key = tuple(sorted(names)) if names is not None else ()
        if key not in self._plans:
            pts = self.profile.points if not key else tuple(self.profile.point(n) for n in key)
            self._plans[key] = plan_reads(pts, self.profile.max_gap)
        return self._plans[key]

    async def _read_block(self, block: Block) -> list[int] | list[bool]:
        dev = self.device_id
        fn = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}[block.table]

        def request(c: AsyncModbusTcpClient):  # type: ignore[no-untyped-def]
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
                raise DeviceUnavailable(self.name, f"short answer: {len(bits)} bits")
            return bits[: block.count]
        regs = list(rr.registers)
        if len(regs) != block.count:
            raise DeviceUnavailable(self.name, f"short answer: {len(regs)} of {block.count} registers")
        return regs

    async def read_points(self, names: Iterable[str] | None = None) -> dict[str, Value]:
        """Read points (all of the profile's when ``names`` is None) in planned block reads."""
        start = time.monotonic()
        out: dict[str, Value] = {}
        for block in self.plan(names):
            data = await self._read_block(block)
            for p in block.points:
                off = p.address - block.address
                if block.table.is_bit:
                    out[p.name] = bool(data[off])
                else:
                    out[p.name] = decode_registers(data[off: off + p.size], p)
        self.last_latency_s = time.monotonic() - start
        return out

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
