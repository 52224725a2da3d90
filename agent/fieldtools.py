"""Field tools for installers: `lmt read` (one-off reads) and `lmt scan` (find devices).

Both speak Modbus TCP, Modbus RTU and DL/T 645, print for people by default and JSON with
``--json``, and turn every failure into one specific sentence (port busy, permission denied,
no answer, exception code and its meaning); with ``--json`` the failure is also a JSON object
on stdout (:func:`error_json`). Before asking anything, both open the port or connect once
(:func:`open_target`), so a port that cannot be used is reported as such (:class:`PortError`),
never as "no device answered".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from lmt.config.agent import SERIAL_DEFAULTS
from lmt.config.profiles import Profile, Table, available_profiles, load_profile
from lmt.drivers.errors import (
    EXCEPTION_CODES,
    Cause,
    DeviceException,
    DeviceUnavailable,
    DriverError,
    VerificationError,
)
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
    from lmt.drivers.modbus_rtu import ModbusRtuBus

    assert t.serial is not None
    return ModbusRtuBus(t.serial, baud=t.baud_rate, parity=t.parity_bit, stop_bits=t.stop_bits,
                        byte_size=t.byte_size, timeout_s=t.timeout_s)


# -- the port --------------------------------------------------------------------------------
class PortError(DeviceUnavailable):
    """The port cannot be opened or the connection made: nothing on it has been asked yet.

    ``kind``: ``no-such-port``, ``permission-denied``, ``port-busy``, ``port-error`` (serial);
    ``connection-refused``, ``connect-timeout``, ``unknown-host``, ``host-unreachable``,
    ``connect-failed`` (TCP). ``cause``: the driver's (``no_such_port``, ``permission``,
    ``busy``; ``connect`` for every TCP kind).
    """

    def __init__(self, device: str, message: str, kind: str, cause: Cause = "connect") -> None:
        self.kind = kind
        super().__init__(device, message, cause)


#: The PortError kind of a serial port's open error, by its cause (others: ``port-error``).
SERIAL_PORT_KINDS: dict[Cause, str] = {
    "no_such_port": "no-such-port", "permission": "permission-denied", "busy": "port-busy"}


def _serial_port_error(port: str, exc: DeviceUnavailable) -> PortError:
    """The serial line's or the RTU bus's open error as a PortError of its kind."""
    return PortError(port, exc.message, SERIAL_PORT_KINDS.get(exc.cause, "port-error"), exc.cause)


async def check_tcp(host: str, port: int, timeout_s: float) -> None:
    """Connect once to ``host:port`` and close again; raises :class:`PortError` saying why not."""
    name = f"{host}:{port}"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except ConnectionRefusedError:
        raise PortError(name, f"connection refused: nothing listens on {host} port {port} "
                        "(wrong port, or the device's Modbus TCP server is off)",
                        "connection-refused") from None
    except TimeoutError:
        raise PortError(name, f"no connection within {timeout_s:g} s: {host} does not answer on "
                        f"port {port} (wrong address, device off, or a firewall)",
                        "connect-timeout") from None
    except socket.gaierror as exc:
        raise PortError(name, f"unknown host {host!r} ({exc.strerror})", "unknown-host") from None
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            raise PortError(name, f"cannot reach {host}: {exc.strerror} (check the address, the "
                            "cable and the network settings)", "host-unreachable") from None
        raise PortError(name, f"cannot connect: {exc.strerror or exc}", "connect-failed") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def open_target(t: Target, conn: Any) -> None:
    """Open the port of ``t`` (``conn``: its RTU bus or DL/T 645 serial line) or connect once to
    its TCP endpoint; raises :class:`PortError` when that cannot be done."""
    if t.tcp:
        await check_tcp(t.tcp[0], t.tcp[1], t.timeout_s)
        return
    try:
        if t.protocol == "dlt645":
            conn.open()
        else:
            await conn.ensure_connected()
    except PortError:
        raise
    except DeviceUnavailable as exc:
        raise _serial_port_error(t.serial or "", exc) from exc


#: The ``--json`` error kind of a DeviceUnavailable, by its cause (others: ``unavailable``).
UNAVAILABLE_KINDS: dict[Cause, str] = {"no_answer": "no-answer", "garbled": "bad-answer"}


def error_message(t: Target, exc: DriverError) -> str:
    """The error's sentence, without repeating the port or endpoint the target names."""
    own = {t.serial, f"{t.tcp[0]}:{t.tcp[1]}" if t.tcp else None} - {None}
    if isinstance(exc, PortError) or exc.device in own:
        return exc.message
    return str(exc)


def error_json(t: Target, exc: DriverError) -> dict[str, Any]:
    """``{"target": …, "error": {"kind": …, "message": …, …}}`` for ``--json``."""
    from lmt.drivers.dlt645 import Dlt645Refused
    from lmt.drivers.serial_line import NoisyLine

    err: dict[str, Any] = {"message": error_message(t, exc), "device": exc.device}
    if isinstance(exc, PortError):
        err["kind"] = exc.kind
    elif isinstance(exc, Dlt645Refused):
        err.update(kind="refused", function=f"{exc.function:02X}", code=exc.code,
                   meanings=exc.meanings)
    elif isinstance(exc, DeviceException):
        err.update(kind="exception", function=exc.function, code=exc.code,
                   meaning=EXCEPTION_CODES.get(exc.code, "unknown exception"))
    elif isinstance(exc, NoisyLine):
        err["kind"] = "noise"
    elif isinstance(exc, DeviceUnavailable):  # a DL/T 645 frame error is garbled: bad-answer
        err["kind"] = UNAVAILABLE_KINDS.get(exc.cause, "unavailable")
    elif isinstance(exc, VerificationError):
        err["kind"] = "verification"
    else:
        err["kind"] = "error"
    return {"target": t.describe(), "error": {"kind": err.pop("kind"), **err}}


def report_error(command: str, t: Target, exc: DriverError, as_json: bool) -> int:
    """Print the failure (one sentence on stderr; with ``as_json`` also the JSON object on
    stdout); returns the exit code, 1."""
    print(f"lmt {command}: {t.describe()}: {error_message(t, exc)}", file=sys.stderr)
    if as_json:
        dump_json(error_json(t, exc))
    return 1


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


# Line-to-line voltages (voltage_l1_l2_v …): 208 V (US 120/208) to 480 V (US 277/480), with room.
LINE_TO_LINE = re.compile(r"_l\d_l\d_")
PLAUSIBLE_LL_VOLTAGE = (140.0, 520.0)


def plausibility(values: dict[str, Any]) -> float:
    """Share of values that look like a real device's (voltages, frequency, power factor)."""
    checked = ok = 0
    for name, v in values.items():
        for key, (lo, hi) in PLAUSIBLE.items():
            if key in name and isinstance(v, float):
                if key == "voltage" and LINE_TO_LINE.search(name):
                    lo, hi = PLAUSIBLE_LL_VOLTAGE
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
                      identify: bool = True,
                      reopen: Callable[[], Awaitable[None]] | None = None) -> list[Found]:
    """Probe ``ids``; suggest a profile for each device found (``identify``).

    A probe without an answer counts as "nobody there" only while the port is still usable:
    when the bus has lost its connection, ``reopen`` (:func:`open_target`) is called, and the
    :class:`PortError` it raises (adapter unplugged, gateway gone) ends the scan.
    """
    found: list[Found] = []
    for n, i in enumerate(ids, 1):
        got = await probe(bus, i)
        progress(n, len(ids), f"id {i}: {'found' if got else '-'}")
        if got is None:
            if reopen is not None and not bus.connected:
                await reopen()
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
    """The serial line of ``t``, with its protocol's idle gap before each request."""
    from lmt.drivers.serial_line import SerialLine, dlt645_silence_s, modbus_rtu_silence_s

    gap = dlt645_silence_s if t.protocol == "dlt645" else modbus_rtu_silence_s
    return SerialLine(t.serial or "", baud_rate=t.baud_rate, parity=t.parity_bit,  # type: ignore[arg-type]
                      stop_bits=t.stop_bits, byte_size=t.byte_size, timeout_s=t.timeout_s,
                      silence_s=gap(t.baud_rate, t.byte_size, t.parity_bit, t.stop_bits))


async def dlt645_probe(line: Any, pattern: str, timeout_s: float) -> tuple[str, str | None]:
    """Ask every meter whose address matches ``pattern`` (AA bytes are wildcards).

    Returns ("none", None) for silence, ("one", address) for one clean reply, or
    ("collision", None) when answers overlapped into a broken frame. Only replies count: an
    RS-485 adapter that echoes the request (its own transmitter heard back) is not a meter.
    Raises the line's error when the port failed or the line never falls silent (noise).
    """
    from lmt.drivers import dlt645
    from lmt.drivers.serial_line import NoisyLine

    try:
        raw = await line.transact(dlt645.read_request(pattern, PROBE_DI), dlt645.frame_length,
                                  timeout_s)
        frame, _ = dlt645.find_frame(raw, replies_only=True)
    except dlt645.FrameError:  # a bad checksum: overlapping answers
        return "collision", None
    except NoisyLine:
        raise  # not a collision: nothing on this line can be told apart
    except DeviceUnavailable as exc:
        if exc.cause == "no_answer":  # silence, or only the adapter's echo of the request
            return "none", None
        if exc.cause == "garbled":
            return "collision", None  # overlapping answers make noise or a cut-off frame
        raise  # the port itself failed: say so
    if frame is None or not _matches(pattern, frame.address):
        return "collision", None  # garbled: not the reply of a meter this pattern reaches
    return "one", frame.address


def _matches(pattern: str, address: str) -> bool:
    """Is ``address`` (12 digits) one of those ``pattern`` reaches (AA bytes: any)?"""
    if len(address) != 12 or not address.isdigit():
        return False
    return all(pattern[i:i + 2] in ("AA", address[i:i + 2]) for i in range(0, 12, 2))


async def scan_dlt645(line: Any, progress: Callable[[int, int, str], None], timeout_s: float
                      ) -> list[str]:
    """Find every meter on a line by abbreviated addressing: fix the address from its low byte
    up (AA bytes above it are wildcards) and go one byte deeper wherever answers collide.

    Raises :class:`~lmt.drivers.serial_line.NoisyLine` when all 100 patterns of a level collide
    (noise, not meters) or the line never falls silent, and the line's error when the port fails.
    """
    from lmt.drivers.serial_line import NoisyLine

    found: list[str] = []
    todo = [""]  # known low digits of addresses that still collide
    done = 0
    while todo:
        suffix = todo.pop(0)
        wild = "AA" * (6 - len(suffix) // 2 - 1)
        collided: list[str] = []
        for b in range(100):
            pattern = f"{wild}{b:02d}{suffix}"
            kind, addr = await dlt645_probe(line, pattern, timeout_s)
            done += 1
            progress(done, done + 99 - b + 100 * len(todo), f"{pattern}: {kind}")
            if kind == "one" and addr is not None and addr not in found:
                found.append(addr)
            elif kind == "collision" and len(suffix) < 10:
                collided.append(f"{b:02d}{suffix}")
        if len(collided) == 100:
            # Two meters behind every one of 100 patterns is not a bus: it is noise, and going
            # deeper would take 100 times as long for nothing.
            raise NoisyLine(getattr(line, "name", "line"), (
                f"every address pattern {wild}xx{suffix} got noise or a broken frame, not one "
                "clean reply: check baud rate, parity and wiring (A/B)"))
        todo.extend(collided)
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
            await open_target(t, line)
            meter = Dlt645Meter(args.address, line, args.address, profile, timeout_s=t.timeout_s)
            return await meter.read_points(names)
        finally:
            line.close()

    try:
        got = run(go())
    except DriverError as exc:
        return report_error("read", t, exc, args.json)
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
            await open_target(t, line)
            return await scan_dlt645(line, Progress(), t.timeout_s)
        finally:
            line.close()

    try:
        found = run(go())
    except DriverError as exc:
        return report_error("scan", t, exc, args.json)
    if args.json:
        dump_json({"target": t.describe(), "found": [
            {"address": a, "profile": DLT645_PROFILE} for a in found]})
        return 0
    print(f"{t.describe()}: {len(found)} meter(s) answered")
    for a in found:
        print(f"  address {a}  suggested profile: {DLT645_PROFILE}")
    return 0
