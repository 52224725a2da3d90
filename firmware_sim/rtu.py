"""A Modbus RTU line served on a pseudo-terminal: several device ids behind one serial port.

Why not pymodbus's ``ModbusSerialServer`` on the pty's slave path (it would work: pyserial opens
a pty like any tty)? Because a simulated line must be able to misbehave and to be watched at
the byte level, which that server cannot do: answer late or not at all for one device id
while the others still answer, send a frame with a broken CRC or random bytes, hold the line
busy while a slow device thinks, and record when each frame starts so tests can check the
master's inter-frame silence and that it never talks over a pending answer. So this module
runs a small RTU slave loop on the pty's *master* side: it splits the byte stream into frames,
checks the CRC and the device id, hands the PDU to the site (which decodes and executes it
with pymodbus's request classes on the same per-device datastore as the TCP server) and frames
the answer — or the fault — itself.

Framing: a request's length follows from its function code (01-06: 8 bytes, 15/16: byte
count + 9, 22: 10, 23: byte count + 13). Anything else ends at a silence of 3.5 character
times (at least 20 ms: a pseudo-terminal and a busy event loop can hold back part of a frame
longer than a real UART would); a frame with a bad CRC is ignored, as a real device does.
Frames for device ids not on the line get no answer; device id 0 is a broadcast (writes are
executed by every device on the line, nobody answers).

Wire time: with ``wire_time`` (default) the line behaves as if it ran at its baud rate: an
answer is written only once the request would have been transmitted, the end-of-frame
silence has passed and the answer itself would have been transmitted (a 157-byte answer at
2400 bit/s arrives 0.7 s after the request). Without it, answers come as fast as the host can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import termios
import time
import tty
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from pymodbus.framer import FramerRTU

from lmt.config.site import SimLine

from .faults import Reply

_log = logging.getLogger(__name__)

#: ``handler(device_id, pdu) -> Reply``: the site's answer to one request PDU.
Handler = Callable[[int, bytes], Awaitable[Reply]]

_FIXED_SIZE = {1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8, 22: 10}
_BYTE_COUNT_AT = {15: 6, 16: 6, 23: 10}  # position of the byte count; size = count + pos + 3
_BROADCAST_WRITES = {5, 6, 15, 16, 22, 23}
_FRAME_TIMEOUT_FLOOR_S = 0.02
_RECORDS_KEPT = 10_000


def crc16(data: bytes) -> bytes:
    """The Modbus CRC-16 of ``data``, as sent on the line (low byte first)."""
    return FramerRTU.compute_CRC(data).to_bytes(2, "big")


def char_time_s(baud: int, byte_size: int = 8, parity: str = "N", stop_bits: int = 1) -> float:
    """Seconds per character: start bit, data bits, parity bit, stop bits."""
    return (1 + byte_size + (0 if parity == "N" else 1) + stop_bits) / baud


def request_size(buffer: bytes | bytearray) -> int | None:
    """Length of the RTU request frame at the start of ``buffer``; 0: need more bytes; None:
    not known from the function code (the frame ends at a silence)."""
    if len(buffer) < 2:
        return 0
    function = buffer[1]
    if function in _FIXED_SIZE:
        return _FIXED_SIZE[function]
    if function in _BYTE_COUNT_AT:
        pos = _BYTE_COUNT_AT[function]
        return buffer[pos] + pos + 3 if len(buffer) > pos else 0
    return None


@dataclass
class FrameRecord:
    """One request frame the simulated line received."""

    start: float  #: monotonic time its first byte was read
    size: int
    device_id: int
    function: int
    gap_s: float | None  #: silence on the line before it (None: the first frame)
    overlapped: bool  #: it came while an earlier request was still being answered
    crc_ok: bool
    answered: bool = False


class RtuLineServer:
    """One simulated RS-485 line on a pseudo-terminal; serves the device ids given."""

    def __init__(self, line: SimLine, handler: Handler, device_ids: Collection[int],
                 wire_time: bool = True) -> None:
        self.line = line
        self.name = line.name
        self.handler = handler
        self.device_ids = frozenset(device_ids)
        self.wire_time = wire_time
        self.baud = line.baud or 9600
        self.parity = line.parity or "N"
        self.char_time_s = char_time_s(self.baud, line.byte_size, self.parity, line.stop_bits)
        #: the Modbus RTU inter-frame silence: 3.5 characters, 1.75 ms above 19200 bit/s
        self.silence_s = 0.00175 if self.baud > 19200 else 3.5 * self.char_time_s
        self.frame_timeout_s = max(self.silence_s, _FRAME_TIMEOUT_FLOOR_S)
        self.path: str | None = None  #: the pty's slave device, e.g. /dev/pts/4 (while running)
        self.link: Path | None = line.link
        self._master: int | None = None
        self._slave: int | None = None
        self._buffer = bytearray()
        self._frame_start = 0.0
        self._frame_gap: float | None = None
        self._frame_overlapped = False
        self._timer: asyncio.TimerHandle | None = None
        self._queue: asyncio.Queue[tuple[bytes, FrameRecord]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._busy = False
        self._idle_since: float | None = None  # end of the last frame on the (virtual) line
        #: every request frame received, oldest first (the last 10 000)
        self.frames: deque[FrameRecord] = deque(maxlen=_RECORDS_KEPT)
        self.overlaps = 0  #: frames that came while the line was busy
        self.bad_frames = 0  #: frames dropped for a bad CRC or a bad length
        self.answers = 0  #: frames written (answers, broken answers, garbage)
        self.bytes_received = 0
        self.bytes_sent = 0

    def __repr__(self) -> str:
        return f"RtuLineServer({self.name!r}, {self.path})"

    def describe(self) -> str:
        """``rs485 (modbus-rtu 9600 8N1) on /dev/pts/4 -> /tmp/ttyRS485``."""
        where = f"{self.path}" + (f" -> {self.link}" if self.link else "")
        return (f"{self.name} (modbus-rtu {self.baud} {self.line.byte_size}{self.parity}"
                f"{self.line.stop_bits}) on {where}")

    def wire_s(self, n_bytes: int) -> float:
        return n_bytes * self.char_time_s if self.wire_time else 0.0

    def min_gap_s(self) -> float | None:
        """The shortest silence seen before a request frame (None before the second frame)."""
        gaps = [f.gap_s for f in self.frames if f.gap_s is not None]
        return min(gaps) if gaps else None

    # -- start / stop ----------------------------------------------------------------------------

    async def start(self) -> str:
        """Open the pseudo-terminal (and the ``link`` symlink); returns the slave's path."""
        if self._master is not None:
            raise RuntimeError(f"line {self.name!r} is already started")
        master, slave = os.openpty()
        try:
            tty.setraw(slave)  # no echo, no line editing, no XON/XOFF: 8-bit clean
            speed = getattr(termios, f"B{self.baud}", None)
            if speed is not None:
                attrs = termios.tcgetattr(slave)
                attrs[4] = attrs[5] = speed
                termios.tcsetattr(slave, termios.TCSANOW, attrs)
            os.set_blocking(master, False)
            path = os.ttyname(slave)
            if self.link is not None:
                _make_link(self.link, path)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        # The slave stays open here too: the master then never sees a hang-up when a client
        # closes the port, and a client can open and close it as often as it likes.
        self._master, self._slave, self.path = master, slave, path
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._serve(), name=f"rtu line {self.name}")
        asyncio.get_running_loop().add_reader(master, self._readable)
        return path

    async def stop(self) -> None:
        """Close the pseudo-terminal (clients see the port vanish) and remove the link."""
        master, slave = self._master, self._slave
        if master is None or slave is None:
            return
        self._master = self._slave = None
        asyncio.get_running_loop().remove_reader(master)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        os.close(master)
        os.close(slave)
        if self.link is not None and self.path is not None:
            _remove_link(self.link, self.path)
        self.path = None

    @property
    def running(self) -> bool:
        return self._master is not None

    @property
    def idle(self) -> bool:
        """Every request received has been answered (or left unanswered) and nothing is pending."""
        return not self._busy and not self._buffer and (self._queue is None or self._queue.empty())

    # -- receiving -------------------------------------------------------------------------------

    def _readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: nobody has the slave open (cannot happen while we hold it)
            return
        now = time.monotonic()
        self.bytes_received += len(data)
        if not self._buffer:
            self._begin_frame(now)
        self._buffer += data
        self._split(now)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.frame_timeout_s, self._silence)

    def _begin_frame(self, now: float) -> None:
        self._frame_start = now
        self._frame_gap = None if self._idle_since is None else now - self._idle_since
        assert self._queue is not None
        self._frame_overlapped = self._busy or not self._queue.empty()
        if self._frame_overlapped:
            self.overlaps += 1

    def _split(self, now: float) -> None:
        """Queue every complete frame at the start of the buffer."""
        while self._buffer:
            size = request_size(self._buffer)
            if size is None or size == 0 or len(self._buffer) < size:
                return
            frame = bytes(self._buffer[:size])
            del self._buffer[:size]
            self._queue_frame(frame)
            if self._buffer:  # the next frame came in the same chunk: back to back
                self._begin_frame(now)

    def _silence(self) -> None:
        """No byte for the frame timeout: what is buffered is one frame."""
        self._timer = None
        if self._buffer:
            frame = bytes(self._buffer)
            self._buffer.clear()
            self._queue_frame(frame)

    def _queue_frame(self, frame: bytes) -> None:
        ok = len(frame) >= 4 and crc16(frame[:-2]) == frame[-2:]
        record = FrameRecord(start=self._frame_start, size=len(frame), device_id=frame[0],
                             function=frame[1] if len(frame) > 1 else 0, gap_s=self._frame_gap,
                             overlapped=self._frame_overlapped, crc_ok=ok)
        self.frames.append(record)
        # the request occupies the line until its last byte would have been sent
        end = record.start + self.wire_s(len(frame))
        self._idle_since = end if self._idle_since is None else max(self._idle_since, end)
        assert self._queue is not None
        self._queue.put_nowait((frame, record))

    # -- answering -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            frame, record = await self._queue.get()
            self._busy = True
            try:
                await self._answer(frame, record)
            except Exception:
                _log.exception("line %s: request %s failed", self.name, frame.hex(" "))
            finally:
                self._busy = False

    async def _answer(self, frame: bytes, record: FrameRecord) -> None:
        if not record.crc_ok:
            self.bad_frames += 1
            return
        device_id, pdu = frame[0], frame[1:-2]
        if device_id == 0:
            if pdu[0] in _BROADCAST_WRITES:
                for dev in sorted(self.device_ids):
                    await self.handler(dev, pdu)
            return
        if device_id not in self.device_ids:
            return
        reply = await self.handler(device_id, pdu)
        if reply.garbage is not None:
            out = reply.garbage
        elif reply.pdu is not None:
            body = bytes([device_id]) + reply.pdu
            crc = crc16(body)
            out = body + (bytes(b ^ 0xFF for b in crc) if reply.bad_crc else crc)
        else:
            return  # silent
        # The device notices the end of the request 3.5 characters after its last byte, then
        # answers; the master has the answer once its last byte has crossed the line.
        ready = record.start + self.wire_s(record.size) + (self.silence_s if self.wire_time else 0)
        due = max(ready, time.monotonic()) + self.wire_s(len(out))
        while (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        record.answered = True
        self._write(out)

    def _write(self, data: bytes) -> None:
        if self._master is None:
            return
        now = time.monotonic()
        # counted first: whoever has read the bytes sees them counted (tests in other threads)
        self.bytes_sent += len(data)
        self.answers += 1
        self._idle_since = now if self._idle_since is None else max(self._idle_since, now)
        try:
            n = os.write(self._master, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            _log.debug("line %s: write failed: %s", self.name, exc)
            n = 0
        if n < len(data):  # nobody reads the port and its buffer is full: the answer is lost
            _log.debug("line %s: %d of %d bytes written", self.name, n, len(data))
            self.bytes_sent -= len(data) - n


def _make_link(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target``, replacing a stale symlink (never a file)."""
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise OSError(f"cannot make {link} a link to the simulated line: it exists and is "
                      "not a symlink")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _remove_link(link: Path, target: str) -> None:
    with contextlib.suppress(OSError):
        if link.is_symlink() and os.readlink(link) == target:
            link.unlink()
