"""DL/T 645-2007 meters on a serial line: the frame and value codec, and an async master.

The codec is pure functions (no I/O), tested against the worked byte
sequences of the DL/T 645-2007 domain notes:

* frames — :func:`encode_frame`, :func:`find_frame` / :func:`decode_frame`, and
  :func:`frame_length`, the :class:`~lmt.drivers.serial_line.SerialLine` reader that tells when
  a reply is complete. Any number of ``FE`` preamble bytes and any garbage before the first
  ``68`` are skipped; a frame whose direction bit says *request* is skipped too (the echo some
  RS-485 adapters give of our own request);
* values — :func:`decode_value`: little-endian BCD laid out by the point's ``format``
  (``XXXXXX.XX``: 4 bytes, 2 decimals), bit 7 of the top byte the sign for ``signed`` points;
* requests — read data (``11``) with follow-up reads (``12``) for multi-frame replies, read
  address (``13``), broadcast time sync (``08``), and trip / allow close / alarm / power
  guarantee (``1C``);
* status word 3 (DI ``04000503``) — :class:`StatusWord3`, used to confirm every ``1C`` command.

:class:`Dlt645Meter` reads a profile's points (one request per data identifier;
:meth:`~Dlt645Meter.read` returns a :class:`~lmt.drivers.result.ReadResult`) and sends the
``1C`` commands, each confirmed by reading status word 3 back. Failures are typed, each with its
``cause``: no answer or a garbled one is :class:`~lmt.drivers.errors.DeviceUnavailable`
(``no_answer``, ``garbled``, or the port's trouble; :class:`Dlt645FrameError`, ``garbled``, for
a bad checksum or malformed data), an abnormal reply is :class:`Dlt645Refused` (``exception``),
a command the meter took but did not carry out is
:class:`~lmt.drivers.errors.VerificationError` (``verification``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum
from typing import ClassVar

from lmt.config.profiles import Point, Profile

from .errors import Cause, DeviceException, DeviceUnavailable, DriverError, VerificationError
from .result import PointsFailure, ReadResult
from .serial_line import SerialLine

START = 0x68
END = 0x16
PREAMBLE = 0xFE
OFFSET = 0x33
WILDCARD = "AAAAAAAAAAAA"
BROADCAST = "999999999999"

DIR_REPLY = 0x80
ABNORMAL = 0x40
MORE_FOLLOWS = 0x20
FUNCTION_MASK = 0x1F

HEADER_LEN = 10  # 68 A0..A5 68 C L
MIN_FRAME_LEN = 12  # header + CS + 16


class Function(IntEnum):
    """The function code, D4..D0 of the control byte."""

    BROADCAST_TIME = 0x08
    READ_DATA = 0x11
    READ_FOLLOW = 0x12
    READ_ADDRESS = 0x13
    WRITE_DATA = 0x14
    WRITE_ADDRESS = 0x15
    FREEZE = 0x16
    CHANGE_BAUD = 0x17
    CHANGE_PASSWORD = 0x18
    CLEAR_DEMAND = 0x19
    CLEAR_METER = 0x1A
    CLEAR_EVENTS = 0x1B
    CONTROL = 0x1C


class ControlCommand(IntEnum):
    """N1 of a ``1C`` request."""

    TRIP = 0x1A
    ALLOW_CLOSE = 0x1B
    ALARM = 0x2A
    CLEAR_ALARM = 0x2B
    GUARANTEE = 0x3A
    CLEAR_GUARANTEE = 0x3B


#: Error byte of an abnormal reply: bit -> meaning (bit 7 is reserved).
ERROR_BITS: tuple[tuple[int, str], ...] = (
    (0x01, "other error"),
    (0x02, "no data requested"),
    (0x04, "wrong password or not authorised"),
    (0x08, "baud rate cannot be changed"),
    (0x10, "too many year time zones"),
    (0x20, "too many day periods"),
    (0x40, "too many tariffs"),
    (0x80, "reserved bit 7"),
)
NO_DATA = 0x02
UNAUTHORISED = 0x04

DI_STATUS_WORD_3 = "04000503"
DI_DATE = "04000101"  # YYMMDDWW
DI_TIME = "04000102"  # hhmmss

_MAX_FOLLOW_UPS = 255

ESAM_NOTE = ("many utility prepayment meters accept 1C only in the encrypted form, through their "
             "ESAM security module after identity authentication; plain-text 1C works only on "
             "meters that allow it with the configured password and level")


# -- errors ----------------------------------------------------------------------------------


class FrameError(ValueError):
    """Bytes that are not a valid DL/T 645 frame or value (codec level, no device name)."""


class ChecksumError(FrameError):
    """A complete frame whose checksum does not match."""


class Dlt645FrameError(DeviceUnavailable):
    """The meter's answer was garbled: bad checksum, wrong length, non-BCD data, wrong DI.
    Cause ``garbled``."""

    default_cause: ClassVar[Cause] = "garbled"


class Dlt645Refused(DeviceException):
    """The meter answered with an abnormal reply (D6 set); ``meanings`` decodes its error byte.
    Cause ``exception`` (whatever the error byte: it is not a Modbus exception code)."""

    def __init__(self, device: str, function: int, code: int, hint: str = "") -> None:
        self.function = function
        self.code = code
        self.meanings = error_meanings(code)
        text = (f"meter refused function {function:02X} (abnormal reply, error byte {code:02X}: "
                f"{', '.join(self.meanings) or 'no bit set'})")
        DriverError.__init__(self, device, f"{text}; {hint}" if hint else text, "exception")

    @property
    def no_data(self) -> bool:
        """The meter does not have the data asked for (error bit 1 only)."""
        return self.code == NO_DATA

    @property
    def unauthorised(self) -> bool:
        return bool(self.code & UNAUTHORISED)


def error_meanings(code: int) -> list[str]:
    """The meanings of the bits set in an abnormal reply's error byte, low bit first."""
    return [text for bit, text in ERROR_BITS if code & bit]


# -- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One decoded frame; ``data`` has the 0x33 offset removed."""

    address: str
    control: int
    data: bytes

    @property
    def is_reply(self) -> bool:
        return bool(self.control & DIR_REPLY)

    @property
    def is_abnormal(self) -> bool:
        return bool(self.control & ABNORMAL)

    @property
    def more_follows(self) -> bool:
        return bool(self.control & MORE_FOLLOWS)

    @property
    def function(self) -> int:
        return self.control & FUNCTION_MASK


def address_bytes(address: str) -> bytes:
    """The 6 address bytes as sent: BCD, low byte first (``A`` digits allowed for wildcards)."""
    if len(address) != 12 or any(c not in "0123456789Aa" for c in address):
        raise ValueError(f"a DL/T 645 address has 12 digits (A for wildcard), not {address!r}")
    return bytes.fromhex(address)[::-1]


def address_text(raw: bytes) -> str:
    """The 12-digit address of 6 address bytes (low byte first)."""
    return raw[::-1].hex().upper()


def di_bytes(di: str) -> bytes:
    """A data identifier as sent: ``"02030000"`` (DI3..DI0) -> ``00 00 03 02`` (DI0 first)."""
    if len(di) != 8:
        raise ValueError(f"a data identifier has 8 hex digits (DI3..DI0), not {di!r}")
    return bytes.fromhex(di)[::-1]


def di_text(raw: bytes) -> str:
    """``"02030000"`` for the 4 DI bytes as received (DI0 first)."""
    return raw[:4][::-1].hex().upper()


def encode_frame(address: str, control: int, data: bytes = b"", preamble: int = 4) -> bytes:
    """A complete frame: ``preamble`` × FE, 68, address, 68, C, L, data + 0x33, CS, 16."""
    if len(data) > 255:
        raise ValueError("a frame holds at most 255 data bytes")
    body = bytearray([START, *address_bytes(address), START, control & 0xFF, len(data)])
    body.extend((b + OFFSET) & 0xFF for b in data)
    body.append(sum(body) & 0xFF)
    body.append(END)
    return bytes([PREAMBLE] * preamble) + bytes(body)


def _candidates(buf: bytes | bytearray) -> Iterable[tuple[int, int | None]]:
    """(start, end) of each frame candidate; end None = incomplete (more bytes may finish it).

    A ``68`` starts a candidate; it is dropped when the second ``68`` or the closing ``16`` is
    not where the length says: that ``68`` was noise. After a complete candidate the scan goes
    on after its end; after an incomplete one it goes on inside it, since that ``68`` may have
    been noise (a ``68`` checksum, a stray byte) in front of the real frame.
    """
    i = buf.find(START)
    while i >= 0:
        nxt = i + 1
        if len(buf) - i < HEADER_LEN:
            yield i, None
        elif buf[i + 7] == START:
            end = i + MIN_FRAME_LEN + buf[i + 9]
            if len(buf) < end:
                yield i, None
            elif buf[end - 1] == END:
                yield i, end
                nxt = end
        i = buf.find(START, nxt)


def _checksum_ok(buf: bytes | bytearray, start: int, end: int) -> bool:
    return sum(buf[start:end - 2]) & 0xFF == buf[end - 2]


def _first_frame(buf: bytes | bytearray, replies_only: bool) -> tuple[int, int] | int:
    """(start, end) of the first complete frame, or where a frame may still start.

    A complete candidate found behind an incomplete one counts only with a good checksum:
    otherwise it is more likely bytes inside the frame still arriving.
    """
    pending: int | None = None
    for start, end in _candidates(buf):
        if end is None:
            if pending is None:
                pending = start
            continue
        if pending is not None and not _checksum_ok(buf, start, end):
            continue
        if replies_only and not buf[start + 8] & DIR_REPLY:
            continue
        return start, end
    return len(buf) if pending is None else pending


def frame_length(buf: bytes | bytearray, replies_only: bool = True) -> int | None:
    """The SerialLine reader: bytes up to the end of the first complete reply frame, or None.

    The checksum is not checked here, so a frame with a bad checksum ends the wait and is
    reported as such by :func:`find_frame` instead of timing out.
    """
    found = _first_frame(buf, replies_only)
    return found[1] if isinstance(found, tuple) else None


def find_frame(buf: bytes | bytearray, replies_only: bool = False) -> tuple[Frame | None, int]:
    """The first complete frame in ``buf`` and the bytes it consumed (garbage before included).

    Returns ``(None, n)`` when no complete frame is there yet; the ``n`` bytes before any
    possible frame start can be dropped. Raises :class:`ChecksumError` for a complete frame
    whose checksum is wrong.
    """
    found = _first_frame(buf, replies_only)
    if not isinstance(found, tuple):
        return None, found
    start, end = found
    if not _checksum_ok(buf, start, end):
        cs = sum(buf[start:end - 2]) & 0xFF
        raise ChecksumError(f"bad checksum: frame says {buf[end - 2]:02X}, bytes sum to {cs:02X}")
    data = bytes((b - OFFSET) & 0xFF for b in buf[start + HEADER_LEN:end - 2])
    return Frame(address_text(bytes(buf[start + 1:start + 7])), buf[start + 8], data), end


def decode_frame(buf: bytes | bytearray) -> Frame:
    """The one frame in ``buf`` (preamble and garbage skipped); raises FrameError if none."""
    frame, _ = find_frame(buf)
    if frame is None:
        raise FrameError(f"no complete frame in {bytes(buf).hex(' ').upper() or 'nothing'}")
    return frame


# -- values ----------------------------------------------------------------------------------


def bcd_digits(data: bytes) -> str:
    """The decimal digits of little-endian BCD bytes, most significant first."""
    text = data[::-1].hex()
    if not text.isdigit():
        raise FrameError(f"not BCD: {data.hex(' ').upper()}")
    return text


def decode_bcd(data: bytes, signed: bool = False) -> int:
    """The integer in little-endian BCD bytes; bit 7 of the top (last) byte is the sign if signed."""
    if not data:
        raise FrameError("no BCD bytes")
    negative = False
    if signed and data[-1] & 0x80:
        negative = True
        data = data[:-1] + bytes([data[-1] & 0x7F])
    value = int(bcd_digits(data))
    return -value if negative else value


def decode_value(data: bytes, point: Point) -> float | None:
    """The engineering value of a DL/T 645 point: BCD by ``format``, × multiplier + offset.

    ``data`` holds the point's bytes (``point.dlt_bytes``) as they follow the DI in a reply.
    A raw value listed in the point's ``invalid`` (compared as the decimal integer of the
    digits, sign applied) decodes as None: the meter says *not available*.
    """
    n = point.dlt_bytes
    if len(data) != n:
        raise FrameError(f"{point.name}: format {point.format} takes {n} bytes, got {len(data)}")
    raw = decode_bcd(data, point.signed)
    if raw in point.invalid:
        return None
    value = raw / 10 ** point.dlt_decimals
    return value * point.multiplier + point.offset


def encode_bcd(value: int, size: int) -> bytes:
    """``size`` little-endian BCD bytes of a non-negative integer (for request payloads)."""
    digits = f"{value:0{2 * size}d}"
    if value < 0 or len(digits) > 2 * size:
        raise ValueError(f"{value} does not fit {size} BCD bytes")
    return bytes.fromhex(digits)[::-1]


# -- requests --------------------------------------------------------------------------------


def read_request(address: str, di: str, preamble: int = 4) -> bytes:
    """Read data (11) of one data identifier."""
    return encode_frame(address, Function.READ_DATA, di_bytes(di), preamble)


def read_follow_request(address: str, di: str, seq: int, preamble: int = 4) -> bytes:
    """Read follow-up data (12): frame ``seq`` (1, 2, …) of a multi-frame reply."""
    if not 1 <= seq <= 255:
        raise ValueError("the follow-up frame number is 1..255")
    return encode_frame(address, Function.READ_FOLLOW, di_bytes(di) + bytes([seq]), preamble)


def read_address_request(preamble: int = 4) -> bytes:
    """Read address (13) to the wildcard AA…AA: only one meter may be on the line."""
    return encode_frame(WILDCARD, Function.READ_ADDRESS, b"", preamble)


def time_payload(dt: datetime) -> bytes:
    """``ss mm hh DD MM YY`` BCD (the order of the broadcast time sync and of valid-until)."""
    if not 2000 <= dt.year <= 2099:
        raise ValueError("DL/T 645 dates are 2000..2099")
    return bytes(int(f"{v:02d}", 16) for v in (dt.second, dt.minute, dt.hour, dt.day, dt.month,
                                                dt.year % 100))


def time_sync_request(dt: datetime, preamble: int = 4) -> bytes:
    """Broadcast time sync (08) to 99…99: every meter sets its clock, none answers."""
    return encode_frame(BROADCAST, Function.BROADCAST_TIME, time_payload(dt), preamble)


def control_payload(command: int, valid_until: datetime, password: str = "000000",
                    level: int = 2, operator: str = "00000000") -> bytes:
    """The ``1C`` data before the 0x33 offset: ``PA P0 P1 P2 C0 C1 C2 C3 N1 N2 N3..N8``.

    ``password`` is the 6-digit password as printed (``"123456"``), sent low byte first after
    its privilege level ``PA``; ``operator`` the 8-digit operator code, low byte first; N1 the
    command, N2 = 00; N3..N8 the valid-until time ``YYMMDDhhmmss`` sent low byte first
    (``ss mm hh DD MM YY``), like every multi-byte field.
    """
    if len(password) != 6 or len(operator) != 8:
        raise ValueError("password has 6 hex digits, operator code 8")
    if not 0 <= level <= 0xFF:
        raise ValueError("password level is one byte")
    return (bytes([level]) + bytes.fromhex(password)[::-1] + bytes.fromhex(operator)[::-1]
            + bytes([command & 0xFF, 0x00]) + time_payload(valid_until))


def control_request(address: str, command: int, valid_until: datetime, password: str = "000000",
                    level: int = 2, operator: str = "00000000", preamble: int = 4) -> bytes:
    """Trip / allow close / alarm / power guarantee (1C)."""
    return encode_frame(address, Function.CONTROL,
                        control_payload(command, valid_until, password, level, operator), preamble)


def reply_payload(frame: Frame, di: str, seq: int | None = None) -> tuple[bytes, bool]:
    """The data bytes of one read reply (after its DI, before a follow-up's SEQ), more follows.

    ``seq`` None: the reply to read data (11); otherwise to follow-up ``seq`` (12), whose data
    ends with the frame number. Raises FrameError when the DI or number does not match.
    """
    if len(frame.data) < 4 or di_text(frame.data) != di.upper():
        got = di_text(frame.data) if len(frame.data) >= 4 else frame.data.hex().upper()
        raise FrameError(f"reply is for DI {got}, asked {di.upper()}")
    body = frame.data[4:]
    if seq is not None:
        if not body or body[-1] != seq:
            raise FrameError(f"follow-up reply numbered {body[-1] if body else None}, asked {seq}")
        body = body[:-1]
    return body, frame.more_follows


def assemble(frames: Iterable[Frame], di: str) -> bytes:
    """The data of a multi-frame reply: first frame (11) then follow-ups 1, 2, … (12)."""
    out = bytearray()
    more = True
    for n, frame in enumerate(frames):
        if not more:
            raise FrameError("a frame after the last one")
        body, more = reply_payload(frame, di, None if n == 0 else n)
        out += body
    if more:
        raise FrameError("the reply announces more frames")
    return bytes(out)


# -- status word 3 ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusWord3:
    """Meter run status word 3 (DI 04000503, 2 bytes, low byte first): the operating state.

    Bits as the open implementations decode them (all agree on bits 0..11):
    4 relay state (1 = open), 6 relay command (1 = trip), 7 pre-trip alarm, 8..9 meter type
    (0 not prepayment, 1 energy prepayment, 2 money prepayment). Bits 12..15 are *reserved* in
    the 2007 text; the 2013 amendment and State Grid meters use 12 power guarantee (保电),
    13 identity authentication valid, 14 local account open, 15 remote account open.
    """

    raw: int

    @classmethod
    def from_bytes(cls, data: bytes) -> StatusWord3:
        if len(data) != 2:
            raise FrameError(f"status word 3 has 2 bytes, got {len(data)}")
        return cls(data[0] | data[1] << 8)

    def bit(self, n: int) -> bool:
        return bool(self.raw >> n & 1)

    @property
    def programming_allowed(self) -> bool:
        return self.bit(3)

    @property
    def relay_open(self) -> bool:
        """Bit 4: the relay is open (load disconnected)."""
        return self.bit(4)

    @property
    def relay_command_open(self) -> bool:
        """Bit 6: the last relay command was trip (1A); 0 after allow close (1B)."""
        return self.bit(6)

    @property
    def pre_trip_alarm(self) -> bool:
        """Bit 7: pre-trip alarm (alarm command 2A, or a trip counting down its delay)."""
        return self.bit(7)

    @property
    def meter_type(self) -> int:
        return self.raw >> 8 & 0x3

    @property
    def guarantee(self) -> bool:
        """Bit 12: power guarantee (保电) on; 2013 amendment, reserved in the 2007 text."""
        return self.bit(12)

    @property
    def identity_authenticated(self) -> bool:
        return self.bit(13)

    def describe(self) -> str:
        return (f"status word 3 = {self.raw:04X}: relay {'open' if self.relay_open else 'closed'}"
                f" (bit 4), command {'trip' if self.relay_command_open else 'close'} (bit 6), "
                f"pre-trip alarm {'on' if self.pre_trip_alarm else 'off'} (bit 7), guarantee "
                f"{'on' if self.guarantee else 'off'} (bit 12)")


# -- the master ------------------------------------------------------------------------------


class Dlt645Meter:
    """One DL/T 645-2007 meter on a :class:`SerialLine`, read and switched through its profile.

    ``last_latency_s`` is the round trip of the last transaction: from the request's first byte
    on the wire to the reply complete (transmission times included).
    """

    def __init__(self, name: str, line: SerialLine, address: str, profile: Profile,
                 timeout_s: float = 1.0, *, password: str = "000000", password_level: int = 2,
                 operator: str = "00000000", command_valid_s: float = 300.0,
                 settle_s: float = 2.0, poll_interval_s: float = 0.2, preamble: int = 4) -> None:
        address_bytes(address)
        if profile.protocol != "dlt645":
            raise ValueError(f"{name}: profile {profile.id!r} is not a DL/T 645 profile")
        self.name = name
        self.line = line
        self.address = address.upper()
        self.profile = profile
        self.timeout_s = timeout_s
        self.password = password
        self.password_level = password_level
        self.operator = operator
        self.command_valid_s = command_valid_s
        self.settle_s = settle_s
        self.poll_interval_s = poll_interval_s
        self.preamble = preamble
        self.last_latency_s = 0.0

    # -- transport ---------------------------------------------------------------------------

    @staticmethod
    async def _exchange(line: SerialLine, label: str, request: bytes, function: int,
                        address: str | None, timeout_s: float | None, hint: str = ""
                        ) -> tuple[Frame, float]:
        """One request/reply; the checked reply frame and the round trip in seconds."""
        raw = await line.transact(request, frame_length, timeout_s)
        latency = line.last_round_trip_s
        try:
            frame, _ = find_frame(raw, replies_only=True)
        except ChecksumError as exc:
            raise Dlt645FrameError(label, f"{exc} in the answer ({raw.hex(' ').upper()})") from exc
        if frame is None:  # frame_length said complete: cannot happen
            raise Dlt645FrameError(label, f"no frame in the answer ({raw.hex(' ').upper()})")
        if address is not None and frame.address != address:
            raise Dlt645FrameError(label, f"answer came from address {frame.address}")
        if frame.function != function:
            raise Dlt645FrameError(label, f"answer has function {frame.function:02X}, "
                                          f"asked {function:02X}")
        if frame.is_abnormal:
            code = frame.data[0] if frame.data else 0
            raise Dlt645Refused(label, function, code, hint)
        return frame, latency

    async def _request(self, request: bytes, function: int, hint: str = "") -> Frame:
        frame, self.last_latency_s = await self._exchange(
            self.line, self.name, request, function, self.address, self.timeout_s, hint)
        return frame

    # -- reading -----------------------------------------------------------------------------

    async def read_di(self, di: str) -> bytes:
        """The data of one identifier (after its DI), following multi-frame replies to the end.

        Raises :class:`Dlt645Refused` for an abnormal reply (``no_data`` when the meter has no
        such data), :class:`Dlt645FrameError` for a reply of another DI or out of sequence.
        """
        di = di.upper()
        frame = await self._request(read_request(self.address, di, self.preamble),
                                    Function.READ_DATA)
        try:
            body, more = reply_payload(frame, di)
            data = bytearray(body)
            seq = 0
            while more:
                seq += 1
                if seq > _MAX_FOLLOW_UPS:
                    raise FrameError(f"more than {_MAX_FOLLOW_UPS} follow-up frames")
                frame = await self._request(
                    read_follow_request(self.address, di, seq, self.preamble), Function.READ_FOLLOW)
                body, more = reply_payload(frame, di, seq)
                data += body
        except FrameError as exc:
            raise Dlt645FrameError(self.name, f"DI {di}: {exc}") from exc
        return bytes(data)

    def _points(self, names: Iterable[str] | None) -> list[Point]:
        if names is None:
            return list(self.profile.points)
        return [self.profile.point(n) for n in names]

    def _by_di(self, names: Iterable[str] | None) -> dict[str, list[Point]]:
        by_di: dict[str, list[Point]] = {}
        for p in self._points(names):
            assert p.di is not None
            by_di.setdefault(p.di.upper(), []).append(p)
        return by_di

    def transactions(self, names: Iterable[str] | None = None) -> int:
        """How many requests reading these points takes: one per data identifier (a reply
        split over several frames takes follow-up requests on top)."""
        return len(self._by_di(names))

    def wire_time_s(self, names: Iterable[str] | None = None) -> float:
        """Seconds the requests and replies of reading these points take on the line at its
        baud rate, with the idle gap kept before each request."""
        frame = self.preamble + MIN_FRAME_LEN + 4  # preamble, header, DI, CS, 16
        size = sum(2 * frame + max(p.byte_offset + p.dlt_bytes for p in points)
                   for points in self._by_di(names).values())
        n = self.transactions(names)
        return size * self.line.char_time_s + n * self.line.silence_s

    async def read(self, names: Iterable[str] | None = None) -> ReadResult:
        """Read points (all of the profile's when ``names`` is None), one request per DI, as
        many as the meter gives.

        Points sharing a DI share its read. A point is None only when the meter says it has no
        such data (abnormal reply "no data requested") or the value is one of the point's
        ``invalid`` raw values. A DI the meter refuses (another abnormal reply) or whose data
        does not decode is left out, its points missing from the values and listed in the
        result's ``failures`` with the error, and the other DIs are still read. The read
        raises when no DI could be read, or at the first sign that the meter is not reachable
        (no answer, a garbled frame).
        """
        return await self._read(names, partial=True)

    async def read_points(self, names: Iterable[str] | None = None) -> dict[str, float | None]:
        """Read points (all of the profile's when ``names`` is None), one request per DI; every
        failure raises (the field tools' strict read; :meth:`read` reads what it can)."""
        return (await self._read(names, False)).values

    async def _read(self, names: Iterable[str] | None, partial: bool) -> ReadResult:
        """The DI reads of :meth:`read` (``partial``) and of a strict :meth:`read_points`."""
        by_di = self._by_di(names)
        out: dict[str, float | None] = {}
        failures: list[PointsFailure] = []
        for di, points in by_di.items():
            try:
                data = await self.read_di(di)
            except Dlt645Refused as exc:
                if exc.no_data:
                    out.update((p.name, None) for p in points)
                    continue
                if not partial:
                    raise
                failures.append((tuple(p.name for p in points), exc))
                continue
            try:
                out.update(self._decode_di(di, data, points))
            except Dlt645FrameError as exc:
                if not partial:
                    raise
                failures.append((tuple(p.name for p in points), exc))
        if failures and len(failures) == len(by_di):
            raise failures[0][1]
        return ReadResult(out, tuple(failures))

    def _decode_di(self, di: str, data: bytes, points: list[Point]) -> dict[str, float | None]:
        """The values of the points of one DI from its data; Dlt645FrameError if they do not
        decode."""
        out: dict[str, float | None] = {}
        for p in points:  # several points may share a (block) DI, each at its byte offset
            start, n = p.byte_offset, p.dlt_bytes
            if len(data) < start + n:
                raise Dlt645FrameError(self.name, f"DI {di}: {len(data)} data bytes, "
                                                  f"{p.name} ({p.format}) needs {start + n}")
            try:
                out[p.name] = decode_value(data[start:start + n], p)
            except FrameError as exc:
                raise Dlt645FrameError(self.name, f"DI {di}: {exc}") from exc
        return out

    async def read_status_word3(self) -> StatusWord3:
        data = await self.read_di(DI_STATUS_WORD_3)
        try:
            return StatusWord3.from_bytes(data[:2] if len(data) >= 2 else data)
        except FrameError as exc:
            raise Dlt645FrameError(self.name, str(exc)) from exc

    async def read_clock(self) -> datetime:
        """The meter's date (04000101, YYMMDDWW) and time (04000102, hhmmss), naive local."""
        date = await self.read_di(DI_DATE)
        clock = await self.read_di(DI_TIME)
        try:
            _, day, month, year = (int(bcd_digits(bytes([b]))) for b in date[:4])
            second, minute, hour = (int(bcd_digits(bytes([b]))) for b in clock[:3])
            return datetime(2000 + year, month, day, hour, minute, second)
        except (FrameError, ValueError) as exc:
            raise Dlt645FrameError(self.name, f"meter clock unreadable: {exc}") from exc

    @staticmethod
    async def read_address(line: SerialLine, timeout_s: float | None = None,
                           preamble: int = 4) -> str:
        """The address of the one meter on ``line`` (read address to the wildcard AA…AA).

        Every meter answers the wildcard: with several on the line the answers collide and
        this raises :class:`Dlt645FrameError` (or times out on noise).
        """
        try:
            frame, _ = await Dlt645Meter._exchange(line, line.name, read_address_request(preamble),
                                                   Function.READ_ADDRESS, None, timeout_s)
        except Dlt645FrameError as exc:
            raise Dlt645FrameError(line.name, f"{exc.message}; read address "
                                   "needs exactly one meter on the line: several meters answer "
                                   "the wildcard at once and their answers collide") from exc
        if len(frame.data) != 6:
            raise Dlt645FrameError(line.name, f"read address answered {len(frame.data)} bytes")
        return address_text(frame.data)

    # -- time ----------------------------------------------------------------------------------

    @staticmethod
    async def broadcast_time(line: SerialLine, dt: datetime, preamble: int = 4) -> None:
        """Set every meter's clock on ``line`` (broadcast 08 to 99…99; no meter answers)."""
        await line.send(time_sync_request(dt, preamble))

    async def sync_time(self, dt: datetime | None = None) -> None:
        """Broadcast time sync on this meter's line (every meter on it takes the time)."""
        await self.broadcast_time(self.line, dt or datetime.now(), self.preamble)

    # -- control (1C) --------------------------------------------------------------------------

    async def _control(self, command: ControlCommand) -> None:
        valid_until = datetime.now().replace(microsecond=0) + timedelta(seconds=self.command_valid_s)
        request = control_request(self.address, command, valid_until, self.password,
                                  self.password_level, self.operator, self.preamble)
        label = command.name.lower().replace("_", " ")
        try:
            await self._request(request, Function.CONTROL)
        except Dlt645Refused as exc:
            raise Dlt645Refused(self.name, Function.CONTROL, exc.code,
                                f"the meter refused the {label} command (1C N1={command:02X}); "
                                f"{ESAM_NOTE}") from None

    async def _confirm(self, command: ControlCommand, ok_when: str, settle_s: float | None
                       ) -> StatusWord3:
        """Read status word 3 until ``ok_when`` holds or ``settle_s`` passes."""
        deadline = time.monotonic() + (self.settle_s if settle_s is None else settle_s)
        while True:
            status = await self.read_status_word3()
            if _holds(status, ok_when):
                return status
            if time.monotonic() >= deadline:
                raise VerificationError(self.name, _why(command, status))
            await asyncio.sleep(self.poll_interval_s)

    async def _command(self, command: ControlCommand, ok_when: str, verify: bool,
                       settle_s: float | None) -> StatusWord3 | None:
        await self._control(command)
        if not verify:
            return None
        return await self._confirm(command, ok_when, settle_s)

    async def trip(self, verify: bool = True, settle_s: float | None = None) -> StatusWord3 | None:
        """Open the relay (1A); confirmed when bits 4 (relay open) and 6 (command trip) are set."""
        return await self._command(ControlCommand.TRIP, "tripped", verify, settle_s)

    async def allow_close(self, verify: bool = True,
                          settle_s: float | None = None) -> StatusWord3 | None:
        """Allow the relay to close (1B); confirmed when bit 6 (command) reads *close*.

        Many meters then close only when the customer presses the button: the returned
        status word's ``relay_open`` says whether the relay has closed yet.
        """
        return await self._command(ControlCommand.ALLOW_CLOSE, "close allowed", verify, settle_s)

    async def alarm(self, verify: bool = True, settle_s: float | None = None) -> StatusWord3 | None:
        """Alarm (2A); confirmed by bit 7 (pre-trip alarm)."""
        return await self._command(ControlCommand.ALARM, "alarm", verify, settle_s)

    async def clear_alarm(self, verify: bool = True,
                          settle_s: float | None = None) -> StatusWord3 | None:
        """Clear the alarm (2B); confirmed by bit 7 clear."""
        return await self._command(ControlCommand.CLEAR_ALARM, "no alarm", verify, settle_s)

    async def guarantee(self, on: bool, verify: bool = True,
                        settle_s: float | None = None) -> StatusWord3 | None:
        """Power guarantee (保电) on (3A) or off (3B); confirmed by bit 12."""
        command = ControlCommand.GUARANTEE if on else ControlCommand.CLEAR_GUARANTEE
        return await self._command(command, "guarantee" if on else "no guarantee", verify, settle_s)


def _holds(status: StatusWord3, state: str) -> bool:
    return {
        "tripped": status.relay_command_open and status.relay_open,
        "close allowed": not status.relay_command_open,
        "alarm": status.pre_trip_alarm,
        "no alarm": not status.pre_trip_alarm,
        "guarantee": status.guarantee,
        "no guarantee": not status.guarantee,
    }[state]


def _why(command: ControlCommand, status: StatusWord3) -> str:
    text = f"{command.name.lower().replace('_', ' ')} accepted but not carried out: {status.describe()}"
    if command is ControlCommand.TRIP:
        if status.guarantee:
            text += "; the meter is under power guarantee (保电), which blocks tripping"
        elif status.relay_command_open and status.pre_trip_alarm:
            text += "; the pre-trip alarm is on: the meter is counting down its trip delay"
    if command in (ControlCommand.GUARANTEE, ControlCommand.CLEAR_GUARANTEE):
        text += ("; bit 12 is reserved in the 2007 text: a meter built to it does not report the "
                 "guarantee (use verify=False)")
    if command in (ControlCommand.ALARM, ControlCommand.CLEAR_ALARM):
        text += "; some meters do not show the 2A alarm in bit 7 (use verify=False)"
    return text
