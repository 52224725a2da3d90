"""A DL/T 645-2007 meter line on a pseudo-terminal: several meters, one RS-485 bus.

:class:`Dlt645Line` opens a pty pair and answers on the master side as the meters on the line
would; a driver opens ``device_path`` (the slave, a real tty) like any serial port. It is a peer
of ``lmt.drivers.dlt645``, written separately from it (its own frame parser and BCD encoder), so
a bug cannot hide behind both sides sharing code.

What a meter does:

* ``11`` read data: profile points by DI (values from the meter's ``quantities(t)``, aliases
  through :func:`~lmt.firmware_sim.physics.lookup`; a quantity it does not hold, such as an
  event counter of a hand-made sample, reads 0), block reads (a DI with one ``FF`` byte, e.g.
  ``0201FF00`` = the three phase voltages in DI order), status word 3 (``04000503``), date
  (``04000101``) and time (``04000102``) of the meter clock, the address (``04000401``) and raw
  data set with :meth:`Dlt645Line.set_raw`. An unknown DI gets the abnormal reply "no data
  requested" (error byte 02). A reply longer than ``max_reply_data`` bytes is split: the first
  frame is ``B1``, the rest are fetched with ``12`` follow-up reads numbered 1, 2, … (``B2``
  while more follow, ``92`` for the last), each ending with its frame number.
* ``13`` read address: answered to the wildcard ``AA…AA`` (and to the meter's own address).
  When several meters on the line match a request, they all answer at once, as real meters do,
  and the answers collide: the simulator sends the byte-wise AND of their frames (RS-485
  contention gives no defined result; AND is one repeatable choice). The master sees a frame
  with a bad checksum, or noise.
* ``08`` broadcast time sync (to ``99…99``): every meter sets its clock; no answer.
* ``1C`` control: password and level checked (a wrong one gets error byte 04, password /
  not authorised), the valid-until time checked against the meter clock (expired: error 01),
  then ``1A`` trip (after ``trip_delay_s``, with the pre-trip alarm on meanwhile), ``1B`` allow
  close (the relay closes at once when ``auto_close``, else when :meth:`press_button` is
  called), ``2A``/``2B`` alarm on/off, ``3A``/``3B`` power guarantee on/off. Under power
  guarantee a trip is acknowledged but not carried out (the command bit stays *close*).
  ``on_relay(address, closed)`` is called whenever a relay changes.
* Status word 3 (2 bytes, low byte first): bit 4 relay open, bit 6 relay command trip, bit 7
  pre-trip alarm (2A alarm or a trip counting down), bit 12 power guarantee.

Faults per meter (:class:`~lmt.config.site.Faults`, changed while running with
:meth:`Dlt645Line.set_faults`), drawn per request by the meter's
:class:`~lmt.firmware_sim.faults.FaultInjector` in the same order as for Modbus devices (the
first that fires decides): ``offline`` and ``no_answer_rate`` (the request is not heard, so a
1C does nothing), ``exception_code`` at ``exception_rate`` (an abnormal reply with that error
byte, e.g. 4 = not authorised; the request is not carried out), ``crc_error_rate`` (the
request is carried out, the reply's checksum is off by one), ``garbage_rate`` (carried out,
random bytes instead of the reply), ``delay_s`` (answer late); ``drop_rate`` does not apply to
a serial line. ``frozen`` (a hung metering chip): every read answers, for every data identifier
(measurements, status word 3, date and time, raw data), what it had when the fault was switched
on (or when the line started, for a meter frozen before); the model, the meter clock and the
relay go on underneath, and a ``1C`` still acts (a trip opens the relay; status word 3 goes on
reading the old state). A site passes its own injectors (``injectors``), so that its
``set_faults``, the control channel and the per-device statistics cover DL/T 645 meters too. A
late reply is dropped when the next request arrives before it went out: the meter does not talk
over the master.

Replies go out after ``response_delay_s`` plus their transmission time at the line's baud rate
(``line_settings``; DL/T 645 default 2400 bit/s 8E1), so timing looks like a real line
(``wire_time=False``: without the transmission time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import termios
import time
import tty
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

from lmt.config.profiles import Point, Profile, load_profile
from lmt.config.site import Faults, SimLine

from .faults import FaultInjector, Outcome
from .physics import lookup

_log = logging.getLogger(__name__)

Clock = Callable[[], float]
Quantities = Callable[[float], Mapping[str, float]]
RelayCallback = Callable[[str, bool], None]

DEFAULT_PROFILE = "dlt645-2007-3phase"

_START, _END, _PREAMBLE, _OFFSET = 0x68, 0x16, 0xFE, 0x33
_BROADCAST = "999999999999"
_ERR_OTHER, _ERR_NO_DATA, _ERR_PASSWORD = 0x01, 0x02, 0x04

DI_STATUS_WORD_3 = "04000503"
DI_DATE = "04000101"
DI_TIME = "04000102"
DI_ADDRESS = "04000401"

# Status word 3 bits.
SW3_RELAY_OPEN = 1 << 4
SW3_RELAY_COMMAND_TRIP = 1 << 6
SW3_PRE_TRIP_ALARM = 1 << 7
SW3_GUARANTEE = 1 << 12


# -- encoding (the simulator's own, independent of lmt.drivers) ---------------------------------


def bcd_bytes(raw: int, size: int) -> bytes:
    """``size`` BCD bytes of a non-negative integer, low byte first."""
    return bytes.fromhex(f"{raw:0{2 * size}d}")[::-1]


def encode_point(value: float, point: Point) -> bytes:
    """The bytes a meter sends for ``value`` of ``point``: BCD by format, saturating.

    Raw = (value - offset) / multiplier × 10^decimals, rounded. A signed point keeps the sign
    in bit 7 of the top byte, so its largest magnitude is 7 followed by nines; an unsigned
    point reads 0 for a negative value.
    """
    size = point.dlt_bytes
    scaled = (value - point.offset) / point.multiplier * 10 ** point.dlt_decimals
    raw = 0 if not math.isfinite(scaled) else round(scaled)
    negative = raw < 0 and point.signed
    magnitude = abs(raw) if point.signed else max(raw, 0)
    limit = (8 * 10 ** (2 * size - 1) - 1) if point.signed else 10 ** (2 * size) - 1
    magnitude = min(magnitude, limit)
    out = bytearray(bcd_bytes(magnitude, size))
    if negative and magnitude:
        out[-1] |= 0x80
    return bytes(out)


def _frame(address: str, control: int, data: bytes, preamble: int = 4) -> bytes:
    body = bytearray([_START, *bytes.fromhex(address)[::-1], _START, control, len(data)])
    body += bytes((b + _OFFSET) & 0xFF for b in data)
    body.append(sum(body) & 0xFF)
    body.append(_END)
    return bytes([_PREAMBLE] * preamble) + bytes(body)


@dataclass(frozen=True)
class _Request:
    address: str
    control: int
    data: bytes


def _parse(buf: bytearray) -> tuple[list[_Request], int]:
    """Complete, valid request frames in ``buf`` and how many bytes are done with.

    Noise and frames with a bad checksum are skipped, as a meter ignores them. A ``68`` that
    starts no complete frame does not hold up a valid frame behind it.
    """
    found: list[_Request] = []
    used = 0
    i = buf.find(_START)
    while i >= 0:
        nxt = i + 1
        if len(buf) - i >= 10 and buf[i + 7] == _START:
            end = i + 12 + buf[i + 9]
            if (end <= len(buf) and buf[end - 1] == _END
                    and sum(buf[i:end - 2]) & 0xFF == buf[end - 2]):
                if not buf[i + 8] & 0x80:  # requests only: D7 = 0
                    data = bytes((b - _OFFSET) & 0xFF for b in buf[i + 10:end - 2])
                    address = bytes(buf[i + 1:i + 7])[::-1].hex().upper()
                    found.append(_Request(address, buf[i + 8], data))
                used = nxt = end
        i = buf.find(_START, nxt)
    start = buf.find(_START, used)
    return found, len(buf) if start < 0 else start


def _bcd_int(b: int) -> int:
    return (b >> 4) * 10 + (b & 0x0F)


def _time_from(data: bytes) -> datetime:
    """ss mm hh DD MM YY -> datetime."""
    ss, mm, hh, dd, mo, yy = (_bcd_int(b) for b in data[:6])
    return datetime(2000 + yy, mo, dd, hh, mm, ss)


# -- meters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Readings:
    """What a meter's read answers are made of, as of one moment: a frozen meter's snapshot."""

    values: Mapping[str, float]
    status_word3: int
    now: datetime
    raw: Mapping[str, bytes]


@dataclass
class _Meter:
    address: str
    profile: Profile
    quantities: Quantities
    by_di: dict[str, list[Point]]
    injector: FaultInjector
    password: str = "000000"
    level: int = 2
    relay_closed: bool = True
    relay_command_trip: bool = False
    alarm: bool = False
    guarantee: bool = False
    trip_timer: asyncio.TimerHandle | None = None
    clock_offset_s: float = 0.0
    raw: dict[str, bytes] = field(default_factory=dict)
    follow: tuple[str, list[bytes], int] | None = None  # DI, chunks still to send, next number
    snapshot: _Readings | None = None  # while ``frozen``: what every read answers

    @property
    def faults(self) -> Faults:
        return self.injector.faults

    def status_word3(self) -> int:
        word = 0
        if not self.relay_closed:
            word |= SW3_RELAY_OPEN
        if self.relay_command_trip:
            word |= SW3_RELAY_COMMAND_TRIP
        if self.alarm or self.trip_timer is not None:
            word |= SW3_PRE_TRIP_ALARM
        if self.guarantee:
            word |= SW3_GUARANTEE
        return word


class Dlt645Line:
    """Meters (address -> profile, None for the default three-phase profile) on one pty line."""

    def __init__(self, meters: Mapping[str, Profile | None],
                 quantities: Quantities | Mapping[str, Quantities], clock: Clock = time.time,
                 line_settings: SimLine | None = None, *, on_relay: RelayCallback | None = None,
                 password: str = "000000", password_level: int = 2,
                 response_delay_s: float = 0.02, max_reply_data: int = 200,
                 trip_delay_s: float = 0.0, auto_close: bool = True, seed: int | str = 0,
                 faults: Mapping[str, Faults] | None = None,
                 injectors: Mapping[str, FaultInjector] | None = None,
                 wire_time: bool = True) -> None:
        if not meters:
            raise ValueError("a line needs at least one meter")
        if not 1 <= max_reply_data <= 200:
            raise ValueError("max_reply_data is 1..200")
        self.clock = clock
        self.settings = line_settings or SimLine(name="dlt645", protocol="dlt645")
        baud = self.settings.baud or 2400
        parity = self.settings.parity or "E"
        bits = 1 + self.settings.byte_size + (0 if parity == "N" else 1) + self.settings.stop_bits
        self.char_time_s = bits / baud if wire_time else 0.0
        self.on_relay = on_relay
        self.response_delay_s = response_delay_s
        self.max_reply_data = max_reply_data
        self.trip_delay_s = trip_delay_s
        self.auto_close = auto_close
        self._meters: dict[str, _Meter] = {}
        for address, profile in meters.items():
            if len(address) != 12 or not address.isdigit():
                raise ValueError(f"meter address must have 12 digits, not {address!r}")
            prof = profile if profile is not None else load_profile(DEFAULT_PROFILE)
            if prof.protocol != "dlt645":
                raise ValueError(f"profile {prof.id!r} is not a DL/T 645 profile")
            q = quantities if callable(quantities) else quantities[address]
            by_di: dict[str, list[Point]] = {}
            for p in prof.points:
                assert p.di is not None
                by_di.setdefault(p.di.upper(), []).append(p)
            injector = (injectors or {}).get(address) \
                or FaultInjector(Faults(), f"{seed}:{address}")
            meter = _Meter(address, prof, q, by_di, injector, password=password,
                           level=password_level)
            self._meters[address] = meter
            injector.on_frozen(partial(self._frozen_changed, meter))
        for address, f in (faults or {}).items():
            self.set_faults(address, f)
        self._master: int | None = None
        self._slave: int | None = None
        self.device_path = ""
        self._link: Path | None = None
        self._rx = bytearray()
        self._reply_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0  # valid request frames heard
        self.replies = 0  # replies written (collisions count once)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> str:
        """Open the pty, start answering; returns ``device_path``."""
        self._loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.device_path = os.ttyname(slave)
        if self.settings.link is not None:
            link = Path(self.settings.link)
            if link.is_symlink():
                link.unlink()
            elif link.exists():
                raise FileExistsError(f"{link} exists and is not a symlink: not replacing it")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.device_path)
            self._link = link
        self._loop.add_reader(master, self._on_readable)
        for m in self._meters.values():  # frozen before the line was served: from now
            m.snapshot = self._readings(m) if m.faults.frozen else None
        _log.debug("DL/T 645 line on %s (%s) with meters %s", self.device_path,
                   self._link or "no link", ", ".join(self._meters))
        return self.device_path

    async def stop(self) -> None:
        if self._reply_task is not None:
            self._reply_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reply_task
            self._reply_task = None
        for m in self._meters.values():
            if m.trip_timer is not None:
                m.trip_timer.cancel()
                m.trip_timer = None
        if self._master is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._master)
            os.close(self._master)
            self._master = None
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None
        if self._link is not None:
            with contextlib.suppress(FileNotFoundError):
                self._link.unlink()
            self._link = None

    async def __aenter__(self) -> Dlt645Line:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- state, for sites and tests ----------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the pty is open (between :meth:`start` and :meth:`stop`)."""
        return self._master is not None

    @property
    def addresses(self) -> list[str]:
        return list(self._meters)

    def _meter(self, address: str) -> _Meter:
        try:
            return self._meters[address]
        except KeyError:
            raise KeyError(f"no meter {address} on this line") from None

    def set_faults(self, address: str, faults: Faults) -> None:
        self._meter(address).injector.faults = faults

    def faults(self, address: str) -> Faults:
        return self._meter(address).faults

    def _frozen_changed(self, m: _Meter, frozen: bool) -> None:
        """``frozen`` was switched on (snapshot now, if the line is served) or off."""
        m.snapshot = self._readings(m) if frozen and self.running else None

    def _readings(self, m: _Meter) -> _Readings:
        return _Readings(self._values(m), m.status_word3(), self.meter_time(m.address),
                         dict(m.raw))

    def set_password(self, address: str, password: str, level: int = 2) -> None:
        m = self._meter(address)
        m.password, m.level = password, level

    def set_raw(self, address: str, di: str, data: bytes) -> None:
        """Serve ``data`` (before the 0x33 offset) for ``di`` on this meter."""
        self._meter(address).raw[di.upper()] = bytes(data)

    def relay_closed(self, address: str) -> bool:
        return self._meter(address).relay_closed

    def status_word3(self, address: str) -> int:
        return self._meter(address).status_word3()

    def meter_time(self, address: str) -> datetime:
        """The meter clock (naive local time), set by the last broadcast time sync."""
        return datetime.fromtimestamp(self.clock() + self._meter(address).clock_offset_s)

    def press_button(self, address: str) -> None:
        """The customer presses the meter's button: closes the relay if closing is allowed."""
        m = self._meter(address)
        if not m.relay_command_trip:
            self._set_relay(m, True)

    def _set_relay(self, m: _Meter, closed: bool) -> None:
        if m.relay_closed == closed:
            return
        m.relay_closed = closed
        if self.on_relay is not None:
            try:
                self.on_relay(m.address, closed)
            except Exception:
                _log.exception("on_relay callback failed")

    # -- the wire --------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        assert self._master is not None
        try:
            chunk = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError:  # EIO: no slave open (cannot happen while we hold it)
            return
        self._rx += chunk
        requests, used = _parse(self._rx)
        del self._rx[:used]
        if len(self._rx) > 1024:  # noise that looks like a frame start: keep a frame's worth
            del self._rx[:-300]
        for req in requests:
            self._handle(req)

    def _handle(self, req: _Request) -> None:
        self.requests += 1
        # The master talks again: a reply still waiting to go out is dropped.
        if self._reply_task is not None and not self._reply_task.done():
            self._reply_task.cancel()
        if req.address == _BROADCAST:
            if req.control == 0x08 and len(req.data) >= 6:
                self._time_sync(req.data)
            return
        targets = [m for m in self._meters.values() if _matches(req.address, m.address)]
        answers: list[bytes] = []
        delay = 0.0
        for m in targets:
            decision = m.injector.decide(serial=True)
            if decision.outcome is Outcome.SILENT:
                continue
            if decision.outcome is Outcome.EXCEPTION:
                reply: bytes | None = _frame(m.address, (req.control | 0xC0) & 0xFF,
                                             bytes([decision.exception_code & 0xFF]))
            else:
                reply = self._answer(m, req)
            if reply is None:
                continue
            if decision.outcome is Outcome.CRC_ERROR:
                reply = reply[:-2] + bytes([(reply[-2] + 1) & 0xFF]) + reply[-1:]
            elif decision.outcome is Outcome.GARBAGE:
                reply = m.injector.garbage(len(reply))
            delay = max(delay, decision.delay_s)
            answers.append(reply)
        if not answers:
            return
        if len(answers) > 1:  # bus contention
            size = max(len(a) for a in answers)
            merged = bytearray([0xFF] * size)
            for a in answers:
                for i, b in enumerate(a):
                    merged[i] &= b
            out = bytes(merged)
        else:
            out = answers[0]
        assert self._loop is not None
        wait = self.response_delay_s + delay + len(out) * self.char_time_s
        self._reply_task = self._loop.create_task(self._send_later(out, wait))

    async def _send_later(self, data: bytes, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        if self._master is None:
            return
        try:
            os.write(self._master, data)
            self.replies += 1
        except OSError as exc:  # nobody reading and the pty buffer full
            _log.warning("reply dropped: %s", exc)

    # -- functions ---------------------------------------------------------------------------

    def _answer(self, m: _Meter, req: _Request) -> bytes | None:
        fn = req.control & 0x1F
        if fn == 0x11 and len(req.data) >= 4:
            return self._read(m, req)
        if fn == 0x12 and len(req.data) >= 5:
            return self._read_follow(m, req)
        if fn == 0x13:
            return _frame(m.address, 0x93, bytes.fromhex(m.address)[::-1])
        if fn == 0x1C and len(req.data) >= 16:
            return self._control(m, req.data)
        return _frame(m.address, (fn | 0xC0) & 0xFF, bytes([_ERR_OTHER]))

    def _read(self, m: _Meter, req: _Request) -> bytes:
        di_raw = req.data[:4]
        di = di_raw[::-1].hex().upper()
        m.follow = None
        data = self._data(m, di)
        if data is None:
            return _frame(m.address, 0xD1, bytes([_ERR_NO_DATA]))
        n = self.max_reply_data
        if len(data) <= n:
            return _frame(m.address, 0x91, di_raw + data)
        chunks = [data[i:i + n] for i in range(n, len(data), n)]
        m.follow = (di, chunks, 1)
        return _frame(m.address, 0xB1, di_raw + data[:n])

    def _read_follow(self, m: _Meter, req: _Request) -> bytes:
        di_raw, seq = req.data[:4], req.data[4]
        di = di_raw[::-1].hex().upper()
        if m.follow is None or m.follow[0] != di or m.follow[2] != seq or not m.follow[1]:
            return _frame(m.address, 0xD2, bytes([_ERR_NO_DATA]))
        _, chunks, _ = m.follow
        chunk, rest = chunks[0], chunks[1:]
        m.follow = (di, rest, seq + 1) if rest else None
        return _frame(m.address, 0xB2 if rest else 0x92, di_raw + chunk + bytes([seq]))

    def _values(self, m: _Meter) -> dict[str, float]:
        q = dict(m.quantities(self.clock()))
        if "reactive_power_kvar" not in q and "reactive_power_var" not in q and "power_w" in q:
            # a hand-made sample without reactive power: derived from the total power factor
            pf = q.get("power_factor", 1.0)
            tan = math.sqrt(max(0.0, 1.0 - pf * pf)) / pf if pf else 0.0
            q["reactive_power_kvar"] = q["power_w"] * tan / 1000.0
        if "combined_energy_kwh" not in q:
            # Combined active energy with the usual combination word 05: import + export.
            q["combined_energy_kwh"] = q.get("import_energy_kwh", 0.0) + q.get("export_energy_kwh",
                                                                              0.0)
        return q

    def _frozen(self, m: _Meter) -> _Readings | None:
        """A frozen meter's snapshot (taken now if it has none yet); None while live."""
        if not m.faults.frozen:
            return None
        if m.snapshot is None:
            m.snapshot = self._readings(m)
        return m.snapshot

    def _data(self, m: _Meter, di: str) -> bytes | None:
        """What a read of ``di`` answers (before the 0x33 offset), None for no such data; a
        frozen meter answers from its snapshot."""
        frozen = self._frozen(m)
        raw = m.raw if frozen is None else frozen.raw
        if di in raw:
            return raw[di]
        if di in m.by_di:
            members = m.by_di[di]
            values = self._values(m) if frozen is None else frozen.values
            if len(members) == 1 and not members[0].byte_offset:
                return encode_point(lookup(values, members[0].name), members[0])
            # several points in one DI: each at its byte offset
            out = bytearray(max(p.byte_offset + p.dlt_bytes for p in members))
            for p in members:
                out[p.byte_offset:p.byte_offset + p.dlt_bytes] = encode_point(lookup(values, p.name), p)
            return bytes(out)
        if di == DI_STATUS_WORD_3:
            word = m.status_word3() if frozen is None else frozen.status_word3
            return word.to_bytes(2, "little")
        if di in (DI_DATE, DI_TIME):
            now = self.meter_time(m.address) if frozen is None else frozen.now
            fields: tuple[int, ...]
            if di == DI_DATE:
                fields = ((now.weekday() + 1) % 7, now.day, now.month, now.year % 100)  # 0 = Sunday
            else:
                fields = (now.second, now.minute, now.hour)
            return bytes(int(f"{v:02d}", 16) for v in fields)
        if di == DI_ADDRESS:
            return bytes.fromhex(m.address)[::-1]
        if "FF" in (di[0:2], di[2:4], di[4:6], di[6:8]):
            return self._block(m, di, frozen)
        return None

    def _block(self, m: _Meter, di: str, frozen: _Readings | None) -> bytes | None:
        """A block read: the DI's FF byte runs over the points that match the other bytes."""
        k = next(i for i in range(0, 8, 2) if di[i:i + 2] == "FF")
        members = sorted((d for d in m.by_di if d[:k] == di[:k] and d[k + 2:] == di[k + 2:]),
                         key=lambda d: d[k:k + 2])
        if not members:
            return None
        values = self._values(m) if frozen is None else frozen.values
        return b"".join(encode_point(lookup(values, m.by_di[d][0].name), m.by_di[d][0])
                        for d in members)

    def _time_sync(self, data: bytes) -> None:
        try:
            dt = _time_from(data)
        except ValueError:
            return  # a meter ignores an impossible date
        offset = dt.timestamp() - self.clock()
        for m in self._meters.values():
            if not m.faults.offline:
                m.clock_offset_s = offset

    def _control(self, m: _Meter, data: bytes) -> bytes:
        level = data[0]
        password = data[1:4][::-1].hex()
        command = data[8]

        def refuse(code: int) -> bytes:
            return _frame(m.address, 0xDC, bytes([code]))

        if level != m.level or password != m.password:
            return refuse(_ERR_PASSWORD)
        try:
            valid_until = _time_from(data[10:16])
        except ValueError:
            return refuse(_ERR_OTHER)
        if valid_until < self.meter_time(m.address).replace(microsecond=0):
            return refuse(_ERR_OTHER)
        if command == 0x1A:
            if not m.guarantee:
                m.relay_command_trip = True
                self._schedule_trip(m)
        elif command == 0x1B:
            m.relay_command_trip = False
            if m.trip_timer is not None:
                m.trip_timer.cancel()
                m.trip_timer = None
            if self.auto_close:
                self._set_relay(m, True)
        elif command == 0x2A:
            m.alarm = True
        elif command == 0x2B:
            m.alarm = False
        elif command == 0x3A:
            m.guarantee = True
        elif command == 0x3B:
            m.guarantee = False
        else:
            return refuse(_ERR_OTHER)
        return _frame(m.address, 0x9C, b"")

    def _schedule_trip(self, m: _Meter) -> None:
        if m.trip_timer is not None:
            return
        if self.trip_delay_s <= 0:
            self._set_relay(m, False)
            return
        assert self._loop is not None

        def fire() -> None:
            m.trip_timer = None
            if m.relay_command_trip:
                self._set_relay(m, False)

        m.trip_timer = self._loop.call_later(self.trip_delay_s, fire)


def _matches(pattern: str, address: str) -> bool:
    """Whether a request address reaches a meter: exact, or AA wildcard bytes (from the top)."""
    return all(p == a or p == "A" for p, a in zip(pattern.upper(), address, strict=True))
