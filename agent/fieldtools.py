"""Field tools for installers: `lmt read` (one-off reads) and `lmt scan` (find devices).

Both speak Modbus TCP, Modbus RTU and DL/T 645, print for people by default and JSON with
``--json``, and turn every failure into one specific sentence (port busy, permission denied,
no answer, exception code and its meaning).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from lmt.config.agent import SERIAL_DEFAULTS
from lmt.config.profiles import Profile, Table, available_profiles, load_profile
from lmt.drivers.errors import DeviceException, DeviceUnavailable, DriverError
from lmt.drivers.modbus_tcp import ModbusDevice, ModbusTcpBus

TABLE_FUNCTION = {Table.COIL: 1, Table.DISCRETE: 2, Table.HOLDING: 3, Table.INPUT: 4}


@dataclass
class Target:
    """Where to talk: a TCP endpoint, or a serial line with its settings."""

    tcp: tuple[str, int] | None = None
    serial: str | None = None
    protocol: str = "modbus"  # "modbus" or "dlt645"
    baud: int | None = None
    parity: str | None = None
    stop_bits: int = 1
    byte_size: int = 8
    timeout_s: float = 1.0

    def describe(self) -> str:
        if self.tcp:
            return f"Modbus TCP {self.tcp[0]}:{self.tcp[1]}"
        what = "DL/T 645" if self.protocol == "dlt645" else "Modbus RTU"
        return f"{what} on {self.serial} ({self.baud_rate} {self.byte_size}{self.parity_bit}" \
               f"{self.stop_bits})"

    @property
    def baud_rate(self) -> int:
        return self.baud or SERIAL_DEFAULTS[self._line_protocol][0]

    @property
    def parity_bit(self) -> str:
        return self.parity or SERIAL_DEFAULTS[self._line_protocol][1]

    @property
    def _line_protocol(self) -> str:
        return "dlt645" if self.protocol == "dlt645" else "modbus-rtu"


def make_modbus_bus(t: Target) -> Any:
    """A bus for ``t``: ModbusTcpBus, or the RTU bus for a serial line."""
    if t.tcp:
        return ModbusTcpBus(t.tcp[0], t.tcp[1], timeout_s=t.timeout_s)
    from lmt.drivers.modbus_rtu import ModbusRtuBus  # type: ignore[import-not-found]

    return ModbusRtuBus(t.serial, baud=t.baud_rate, parity=t.parity_bit, stop_bits=t.stop_bits,
                        byte_size=t.byte_size, timeout_s=t.timeout_s)


# -- read ------------------------------------------------------------------------------------
@dataclass
class RawRequest:
    table: Table
    address: int
    count: int

    @classmethod
    def parse(cls, text: str) -> RawRequest:
        """'holding:100:4' / 'input:0x34:2' / 'coil:0:8'."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"expected TABLE:ADDRESS[:COUNT], got {text!r}")
        try:
            table = Table(parts[0])
        except ValueError:
            raise ValueError(f"table must be one of {', '.join(t.value for t in Table)}, "
                             f"got {parts[0]!r}") from None
        try:
            address = int(parts[1], 0)
            count = int(parts[2], 0) if len(parts) == 3 else 1
        except ValueError:
            raise ValueError(f"address and count must be numbers, got {text!r}") from None
        limit = 2000 if table.is_bit else 125
        if not 0 <= address <= 0xFFFF or not 1 <= count <= limit:
            raise ValueError(f"address 0-65535 and count 1-{limit} for {table.value}")
        return cls(table, address, count)


async def read_raw(bus: Any, device_id: int, req: RawRequest) -> list[int] | list[bool]:
    fn = TABLE_FUNCTION[req.table]

    def request(c: Any) -> Any:
        method = {Table.COIL: c.read_coils, Table.DISCRETE: c.read_discrete_inputs,
                  Table.HOLDING: c.read_holding_registers,
                  Table.INPUT: c.read_input_registers}[req.table]
        return method(req.address, count=req.count, device_id=device_id)

    rr = await bus.call(f"id {device_id}", fn, request)
    if req.table.is_bit:
        return [bool(b) for b in rr.bits[: req.count]]
    return list(rr.registers)


async def read_points(bus: Any, device_id: int, profile: Profile, names: list[str] | None
                      ) -> dict[str, Any]:
    dev = ModbusDevice(f"id {device_id}", bus, device_id, profile)
    return await dev.read_points(names or None)


def format_value(v: Any, unit: str) -> str:
    if v is None:
        return "(not available)"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float) and not math.isfinite(v):
        return "(not a number)"
    return f"{v:g} {unit}".rstrip()


# -- scan ------------------------------------------------------------------------------------
@dataclass
class Found:
    device_id: int | str
    answered: str  # "data" or "exception N (meaning)"
    profile: str | None = None
    score: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)


PLAUSIBLE: dict[str, tuple[float, float]] = {
    "voltage": (80.0, 300.0), "frequency_hz": (45.0, 65.0), "power_factor": (-1.0001, 1.0001),
}


def plausibility(values: dict[str, Any]) -> float:
    """Share of values that look like a real device's (voltages, frequency, power factor)."""
    checked = ok = 0
    for name, v in values.items():
        for key, (lo, hi) in PLAUSIBLE.items():
            if key in name and isinstance(v, float):
                checked += 1
                ok += lo <= v <= hi
    return ok / checked if checked else 0.5


async def probe(bus: Any, device_id: int) -> str | None:
    """Does any device answer at this id? Any answer, even an exception, says yes."""
    try:
        await read_raw(bus, device_id, RawRequest(Table.HOLDING, 0, 1))
        return "data"
    except DeviceException as exc:
        if exc.code in (10, 11):  # a gateway saying nothing answers at that id
            return None
        return f"exception {exc.code}"
    except DeviceUnavailable:
        return None


async def suggest_profile(bus: Any, device_id: int, kinds: tuple[str, ...] = ("meter", "relay",
                                                                             "load")
                          ) -> tuple[str | None, float, dict[str, Any]]:
    """Try every Modbus profile; the best is the one whose points all read and look real."""
    best: tuple[str | None, float, dict[str, Any]] = (None, 0.0, {})
    for pid in sorted(available_profiles()):
        prof = load_profile(pid)
        if prof.protocol != "modbus" or prof.kind not in kinds:
            continue
        try:
            values = await read_points(bus, device_id, prof, None)
        except DriverError:
            continue
        # Plausible values first; then the profile that reads the most points (a meter that
        # answers a three-phase map is not the single-phase model whose map is a subset).
        score = round(plausibility(values), 3) * 1000 + len(values)
        if score > best[1]:
            best = (pid, score, values)
    return best


async def scan_modbus(bus: Any, ids: list[int], progress: Callable[[int, int, str], None],
                      identify: bool = True) -> list[Found]:
    found: list[Found] = []
    for n, i in enumerate(ids, 1):
        got = await probe(bus, i)
        progress(n, len(ids), f"id {i}: {'found' if got else '-'}")
        if got is None:
            continue
        f = Found(i, got)
        if identify:
            f.profile, f.score, f.values = await suggest_profile(bus, i)
        found.append(f)
    return found


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream, self.width = stream, width
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int, note: str) -> None:
        if not self.tty:
            return
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{total} {note:<24}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def parse_ids(text: str) -> list[int]:
    """'1-10,17,20-22' -> ids, each 1-247."""
    ids: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"not an id range: {part!r}") from None
        if not 1 <= a <= b <= 247:
            raise ValueError(f"device ids are 1-247, got {part!r}")
        ids.extend(range(a, b + 1))
    return ids


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def dump_json(obj: Any, stream: TextIO = sys.stdout) -> None:
    print(json.dumps(obj, default=str), file=stream)


# -- DL/T 645 --------------------------------------------------------------------------------
DLT645_PROFILE = "dlt645-2007-3phase"
PROBE_DI = "04000401"  # communication address: any reply (even "no data") names the meter


def make_serial_line(t: Target) -> Any:
    from lmt.drivers.serial_line import SerialLine

    return SerialLine(t.serial or "", baud_rate=t.baud_rate, parity=t.parity_bit,  # type: ignore[arg-type]
                      stop_bits=t.stop_bits, byte_size=t.byte_size, timeout_s=t.timeout_s)


async def dlt645_probe(line: Any, pattern: str, timeout_s: float) -> tuple[str, str | None]:
    """Ask every meter whose address matches ``pattern`` (AA bytes are wildcards).

    Returns ("none", None) for silence, ("one", address) for one clean reply, or
    ("collision", None) when answers overlapped into a broken frame.
    """
    from lmt.drivers import dlt645

    try:
        raw = await line.transact(dlt645.read_request(pattern, PROBE_DI), dlt645.frame_length,
                                  timeout_s)
        frame = dlt645.decode_frame(raw)
    except (dlt645.FrameError, dlt645.Dlt645FrameError):
        return "collision", None
    except DeviceUnavailable as exc:
        if "no answer within" in str(exc):
            return "none", None
        if "no complete answer" in str(exc) or "checksum" in str(exc):
            return "collision", None  # overlapping answers make noise or a cut-off frame
        raise  # the port itself failed: say so
    return "one", frame.address


async def scan_dlt645(line: Any, progress: Callable[[int, int, str], None], timeout_s: float
                      ) -> list[str]:
    """Find every meter on a line by abbreviated addressing: fix the address from its low byte
    up (AA bytes above it are wildcards) and go one byte deeper wherever answers collide."""
    found: list[str] = []
    todo = [""]  # known low digits of addresses that still collide
    done = 0
    while todo:
        suffix = todo.pop(0)
        wild = "AA" * (6 - len(suffix) // 2 - 1)
        for b in range(100):
            pattern = f"{wild}{b:02d}{suffix}"
            kind, addr = await dlt645_probe(line, pattern, timeout_s)
            done += 1
            progress(done, done + 99 - b + 100 * len(todo), f"{pattern}: {kind}")
            if kind == "one" and addr is not None and addr not in found:
                found.append(addr)
            elif kind == "collision" and len(suffix) < 10:
                todo.append(f"{b:02d}{suffix}")
    progress(done, done, "done")
    return sorted(found)


def read_dlt645_cli(args: Any, t: Target) -> int:
    from lmt.drivers.dlt645 import Dlt645Meter

    if not args.address or len(args.address) != 12 or not args.address.isdigit():
        print("lmt read: --dlt645 needs --address with the meter's 12-digit address "
              "(find it with `lmt scan --dlt645 PORT`)", file=sys.stderr)
        return 2
    if args.di:
        from lmt.config.profiles import Point

        try:
            point = Point(name="value", di=args.di, format=args.format or "XXXXXX.XX")
        except ValueError as exc:
            print(f"lmt read: --di/--format: {exc}", file=sys.stderr)
            return 2
        profile = Profile(id="adhoc", vendor="-", model="-", kind="meter", protocol="dlt645",
                          source="command line", points=(point,))
        names: list[str] | None = None
    else:
        profile = load_profile(args.profile or DLT645_PROFILE)
        if profile.protocol != "dlt645":
            print(f"lmt read: profile {profile.id!r} is not a DL/T 645 profile", file=sys.stderr)
            return 2
        names = list(args.points) or None
        for n in names or []:
            if not profile.has_point(n):
                print(f"lmt read: profile {profile.id!r} has no point {n!r}", file=sys.stderr)
                return 2

    async def go() -> dict[str, Any]:
        line = make_serial_line(t)
        try:
            meter = Dlt645Meter(args.address, line, args.address, profile, timeout_s=t.timeout_s)
            return await meter.read_points(names)
        finally:
            line.close()

    try:
        got = run(go())
    except DriverError as exc:
        print(f"lmt read: {t.describe()}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        dump_json({"address": args.address, "profile": profile.id, "values": got})
    else:
        for name, v in got.items():
            print(f"{name:24s} {format_value(v, profile.point(name).unit)}")
    return 0


def scan_dlt645_cli(args: Any, t: Target) -> int:
    async def go() -> list[str]:
        line = make_serial_line(t)
        try:
            return await scan_dlt645(line, Progress(), t.timeout_s)
        finally:
            line.close()

    try:
        found = run(go())
    except DriverError as exc:
        print(f"lmt scan: {t.describe()}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        dump_json({"target": t.describe(), "found": [
            {"address": a, "profile": DLT645_PROFILE} for a in found]})
        return 0
    print(f"{t.describe()}: {len(found)} meter(s) answered")
    for a in found:
        print(f"  address {a}  suggested profile: {DLT645_PROFILE}")
    return 0
