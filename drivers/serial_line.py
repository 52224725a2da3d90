"""One serial line (an RS-485 bus or a point-to-point port), used one transaction at a time.

Protocol-neutral: a :class:`SerialLine` moves bytes. The protocol driver builds the request and
passes a *reader* callback that says when the bytes received so far hold a complete answer
(``reader(buffer) -> length of the answer, or None to keep waiting``). The line does the rest:

* opens the port non-blocking with pyserial (``exclusive=True``: an advisory lock, so two
  programs that both use it cannot share a port by accident) and reads it through the asyncio
  loop (``loop.add_reader`` on the file descriptor: real ttys, USB adapters, pseudo-terminals);
* runs exactly one transaction at a time (an ``asyncio.Lock``), flushes stale input before each
  request (a late answer to a timed-out request must never be taken for the next answer) and
  keeps the bus silent for ``silence_s`` before sending (Modbus RTU: 3.5 character times);
* counts ``bytes_sent``, ``bytes_received``, ``transactions`` and ``stale_bytes`` (flushed),
  and keeps ``last_round_trip_s`` (request written to answer complete);
* maps every failure to a typed :class:`~lmt.drivers.errors.DeviceUnavailable` that says what to
  do: a missing port, a permission problem (the ``dialout`` group), a port held by another
  program, an answer that never came or never completed, a line that never falls silent
  (:class:`NoisyLine`); its ``cause`` says which for the code (``no_such_port``,
  ``permission``, ``busy``, ``no_answer``, ``garbled``; ``connect`` when the port fails under
  a transaction, ``other`` when it cannot be configured).

The character time is ``(1 start + byte_size + parity bits + stop_bits) / baud`` seconds.
A request's transmission time is estimated from it, and the answer timeout runs from the
estimated end of transmission, so a long request at 1200 bit/s does not eat the timeout.

Some RS-485 adapters hear their own transmitter: the request comes back before the answer.
The reader sees it (a DL/T 645 reader skips frames that are not replies); when nothing but
that echo came back, the timeout says *no answer … (only the echo of the request came back)*,
not noise (cause ``no_answer``).

Once bytes arrive, the wait goes on while they keep coming (an answer still on the wire), but
never beyond a hard limit: the timeout plus the wire time of the longest answer
(``max_answer_bytes``, 300 by default: a Modbus RTU frame is at most 256 bytes, a DL/T 645
frame 4 + 12 + 255). A line that keeps receiving bytes without a complete answer among them (an
adapter spewing garbage, a wrong baud rate on a busy bus) fails there with :class:`NoisyLine`
instead of holding the transaction forever. At most ``4 × max_answer_bytes`` bytes are kept
(the oldest are dropped; an answer is never longer than that), so noise cannot fill memory.
"""

from __future__ import annotations

import asyncio
import errno
import os
import termios
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal

import serial

from .errors import Cause, DeviceUnavailable

if TYPE_CHECKING:
    from lmt.config.agent import Line

Parity = Literal["N", "E", "O"]

#: ``reader(buffer)``: length of the complete answer at the start of ``buffer`` (garbage
#: before it included), or None while it is incomplete.
FrameReader = Callable[[bytearray], int | None]

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
_READ_CHUNK = 4096
_FLUSH_MAX = 16 * _READ_CHUNK  # bytes dropped per flush: a line that never stops cannot hang it
_HEX_SHOWN = 48  # bytes of an incomplete answer quoted in an error message

#: Default longest answer, in bytes: a Modbus RTU frame is at most 256, a DL/T 645 frame 271.
MAX_ANSWER_BYTES = 300


class NoisyLine(DeviceUnavailable):
    """The line carries noise, not answers: bytes kept arriving until the hard limit with no
    complete answer among them (raised by :meth:`SerialLine.transact`; the field tools' scan
    raises it too when every address it tries gets a broken frame). Cause ``garbled``."""

    default_cause: ClassVar[Cause] = "garbled"


def open_failure(port: str, exc: BaseException) -> tuple[str, Cause]:
    """Why ``port`` could not be opened, in one sentence that says what to do, and its cause
    (``no_such_port``, ``permission``, ``busy`` or ``other``). Shared by :class:`SerialLine`
    and the Modbus RTU bus, which open ports alike."""
    code = getattr(exc, "errno", None)
    if code is None and isinstance(exc.__context__, OSError):
        code = exc.__context__.errno
    if code == errno.ENOENT or (code is None and not os.path.exists(port)):
        return (f"no such serial port {port} (is the adapter plugged in? "
                "ls /dev/serial/by-id/ lists the ones present)"), "no_such_port"
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied on {port}: add the agent's user to the 'dialout' group "
                "(sudo usermod -aG dialout <user>, then log in again)"), "permission"
    if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY):
        return (f"serial port {port} is busy: another program holds it "
                f"(fuser -v {port} shows which)"), "busy"
    return f"cannot open serial port {port}: {exc}", "other"


def char_time_s(baud: int, byte_size: int = 8, parity: str = "N", stop_bits: int = 1) -> float:
    """Seconds one character takes on the wire: start bit, data bits, parity bit, stop bits."""
    bits = 1 + byte_size + (0 if parity == "N" else 1) + stop_bits
    return bits / baud


def modbus_rtu_silence_s(baud: int, byte_size: int = 8, parity: str = "N",
                         stop_bits: int = 1) -> float:
    """The Modbus RTU inter-frame gap: 3.5 character times, fixed at 1.75 ms above 19200 bit/s."""
    if baud > 19200:
        return 0.00175
    return 3.5 * char_time_s(baud, byte_size, parity, stop_bits)


def dlt645_silence_s(baud: int, byte_size: int = 8, parity: str = "E", stop_bits: int = 1) -> float:
    """The idle gap kept before a DL/T 645 request: 3.5 character times, at least 20 ms.

    DL/T 645 has no timing-based framing (the preamble and the 68/16 delimiters frame it), but
    meters answer 20 ms or more after a request and some RS-485 adapters turn their driver
    round slowly; a short idle gap after the previous answer avoids talking over its tail.
    """
    return max(0.02, 3.5 * char_time_s(baud, byte_size, parity, stop_bits))


class SerialLine:
    """Async, one-at-a-time access to one serial port."""

    def __init__(self, port: str, baud_rate: int = 9600, parity: Parity = "N", stop_bits: int = 1,
                 byte_size: int = 8, timeout_s: float = 1.0, silence_s: float | None = None,
                 byte_timeout_s: float | None = None, name: str | None = None,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        if parity not in _PARITY:
            raise ValueError(f"parity must be N, E or O, not {parity!r}")
        if stop_bits not in (1, 2) or byte_size not in (5, 6, 7, 8):
            raise ValueError("stop_bits must be 1 or 2 and byte_size 5..8")
        if max_answer_bytes < 1:
            raise ValueError("max_answer_bytes must be at least 1")
        self.port = port
        self.name = name or port
        self.baud_rate = baud_rate
        self.parity: Parity = parity
        self.stop_bits = stop_bits
        self.byte_size = byte_size
        self.timeout_s = timeout_s
        self.char_time_s = char_time_s(baud_rate, byte_size, parity, stop_bits)
        self.silence_s = (modbus_rtu_silence_s(baud_rate, byte_size, parity, stop_bits)
                          if silence_s is None else silence_s)
        # Once an answer has started, a gap this long without a byte ends the wait early.
        self.byte_timeout_s = (max(0.05, 20 * self.char_time_s) if byte_timeout_s is None
                               else byte_timeout_s)
        self.max_answer_bytes = max_answer_bytes
        self._serial: serial.Serial | None = None
        self._lock = asyncio.Lock()
        self._idle_since = 0.0  # monotonic time the bus last went quiet (after our tx or an rx)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.transactions = 0
        self.stale_bytes = 0
        self.last_round_trip_s = 0.0  # request written -> answer complete, last transaction

    @classmethod
    def from_config(cls, line: Line, timeout_s: float | None = None) -> SerialLine:
        """A line from an agent ``[[lines]]`` entry, with the protocol's defaults and gap."""
        parity = line.parity_bit
        if line.protocol == "dlt645":
            silence = dlt645_silence_s(line.baud_rate, line.byte_size, parity, line.stop_bits)
        else:
            silence = modbus_rtu_silence_s(line.baud_rate, line.byte_size, parity, line.stop_bits)
        return cls(line.port, baud_rate=line.baud_rate, parity=parity,  # type: ignore[arg-type]
                   stop_bits=line.stop_bits, byte_size=line.byte_size,
                   timeout_s=line.timeout_s or timeout_s or 1.0, silence_s=silence, name=line.name)

    def __repr__(self) -> str:
        return (f"SerialLine({self.port!r}, {self.baud_rate} {self.byte_size}{self.parity}"
                f"{self.stop_bits})")

    # -- port --------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def open(self) -> None:
        """Open the port now (transactions open it on first use); raises DeviceUnavailable."""
        if self._serial is not None:
            return
        parity = _PARITY[self.parity]
        try:
            try:
                ser = serial.Serial(self.port, baudrate=self.baud_rate, bytesize=self.byte_size,
                                    parity=parity, stopbits=self.stop_bits, timeout=0,
                                    write_timeout=None, exclusive=True)
            except termios.error as exc:
                # A pseudo-terminal (a simulated line) has no parity bit; Linux may refuse to
                # set one again once a previous user left it cleared. Bytes pass alike.
                if exc.args[0] != errno.EINVAL or not _is_pty(self.port) or parity == "N":
                    raise OSError(exc.args[0], f"cannot configure {self.port}: {exc}") from exc
                ser = serial.Serial(self.port, baudrate=self.baud_rate, bytesize=self.byte_size,
                                    parity=serial.PARITY_NONE, stopbits=self.stop_bits,
                                    timeout=0, write_timeout=None, exclusive=True)
        except (serial.SerialException, OSError) as exc:
            message, cause = open_failure(self.port, exc)
            raise DeviceUnavailable(self.name, message, cause) from exc
        self._serial = ser
        self._idle_since = time.monotonic()

    def _open_error(self, exc: BaseException) -> str:
        """Why the port could not be opened (the sentence of :func:`open_failure`)."""
        return open_failure(self.port, exc)[0]

    def close(self) -> None:
        ser, self._serial = self._serial, None
        if ser is not None:
            try:
                asyncio.get_running_loop().remove_reader(ser.fileno())
            except (RuntimeError, ValueError, OSError):
                pass
            ser.close()

    def _fail(self, message: str, exc: BaseException | None = None) -> DeviceUnavailable:
        """The port broke (adapter unplugged...): close it so the next transaction reopens.
        Cause ``connect``: the way to the device is gone, whatever it would have answered."""
        self.close()
        return DeviceUnavailable(self.name, message, "connect")

    # -- transactions ------------------------------------------------------------------------

    def _flush_input(self, ser: serial.Serial) -> int:
        """Discard the input waiting (at most ``_FLUSH_MAX`` bytes); returns how many bytes."""
        fd = ser.fileno()
        flushed = 0
        while flushed < _FLUSH_MAX:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EIO:  # a pty with no other end yet: nothing to flush
                    break
                raise self._fail(f"serial port {self.port} failed: {exc.strerror}", exc) from exc
            if not chunk:
                break
            flushed += len(chunk)
        self.stale_bytes += flushed
        return flushed

    async def _quiet_bus(self, ser: serial.Serial) -> None:
        """Wait for ``silence_s`` of quiet after the last activity, dropping stale input.

        Bytes that arrive meanwhile (a late answer to an earlier request) are flushed and the
        silence starts again, a few times at most.
        """
        for _ in range(4):
            wait = self._idle_since + self.silence_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not self._flush_input(ser):
                return
            self._idle_since = time.monotonic()

    def _send(self, ser: serial.Serial, request: bytes) -> float:
        """Write the request; returns the monotonic time its last character leaves the wire."""
        try:
            ser.write(request)
        except (serial.SerialException, OSError) as exc:
            raise self._fail(f"cannot write to serial port {self.port}: {exc}", exc) from exc
        self.bytes_sent += len(request)
        tx_end = time.monotonic() + len(request) * self.char_time_s
        self._idle_since = tx_end
        return tx_end

    async def send(self, request: bytes) -> None:
        """Send a request that gets no answer (a broadcast); returns once it is on the wire."""
        async with self._lock:
            self.open()
            assert self._serial is not None
            ser = self._serial
            await self._quiet_bus(ser)
            self.transactions += 1
            tx_end = self._send(ser, request)
            wait = tx_end - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    def hard_limit_s(self, timeout_s: float | None = None) -> float:
        """The longest a transaction waits after its request left: the timeout, plus the wire
        time of the longest answer, plus one inter-byte gap."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return timeout + self.max_answer_bytes * self.char_time_s + self.byte_timeout_s

    async def transact(self, request: bytes, reader: FrameReader,
                       timeout_s: float | None = None) -> bytes:
        """Send ``request`` and return the answer ``reader`` recognises (garbage before included).

        Raises :class:`DeviceUnavailable` when nothing arrives within ``timeout_s`` (default
        ``self.timeout_s``) after the request left, when an answer starts but never completes,
        or when the port fails; :class:`NoisyLine` when bytes keep arriving until
        :meth:`hard_limit_s` without a complete answer among them.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        hard_limit = self.hard_limit_s(timeout)
        keep = 2 * self.max_answer_bytes  # bytes kept when the buffer is trimmed
        async with self._lock:
            self.open()
            assert self._serial is not None
            ser = self._serial
            loop = asyncio.get_running_loop()
            fd = ser.fileno()
            await self._quiet_bus(ser)
            buf = bytearray()
            done: asyncio.Future[int] = loop.create_future()
            last_rx = [0.0]
            received = [0]  # bytes received in this transaction (buf may have been trimmed)

            def on_readable() -> None:
                # One chunk per call: a line that never stops sending must not keep the loop
                # (and the deadline's timer) from running; the loop calls again while readable.
                try:
                    chunk = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    return
                except OSError as exc:
                    if not done.done():
                        done.set_exception(exc)
                    loop.remove_reader(fd)
                    return
                if not chunk:
                    return
                now = time.monotonic()
                last_rx[0] = now
                self._idle_since = now
                self.bytes_received += len(chunk)
                received[0] += len(chunk)
                if done.done():
                    return
                buf.extend(chunk)
                if len(buf) > 2 * keep:  # noise: an answer is never this long, drop the oldest
                    del buf[:-keep]
                try:
                    n = reader(buf)
                except Exception as exc:  # a buggy reader must not hang the line
                    done.set_exception(exc)
                    return
                if n is not None:
                    done.set_result(n)

            loop.add_reader(fd, on_readable)
            try:
                self.transactions += 1
                sent_at = time.monotonic()
                tx_end = self._send(ser, request)
                deadline = tx_end + timeout
                hard_deadline = tx_end + hard_limit
                while True:
                    # Waiting ends at the deadline, or later while an answer is still arriving,
                    # but never after the hard deadline.
                    if last_rx[0]:
                        deadline = max(deadline, last_rx[0] + self.byte_timeout_s)
                    noisy = deadline > hard_deadline
                    remaining = min(deadline, hard_deadline) - time.monotonic()
                    if remaining <= 0:
                        if noisy:
                            raise NoisyLine(self.name, self._noise_message(
                                hard_limit, received[0], buf))
                        raise DeviceUnavailable(self.name,
                                                *self._timeout_failure(timeout, buf, request))
                    try:
                        n = await asyncio.wait_for(asyncio.shield(done), remaining)
                    except TimeoutError:
                        continue
                    except OSError as exc:
                        raise self._fail(f"serial port {self.port} failed: {exc.strerror or exc}",
                                         exc) from exc
                    self.last_round_trip_s = last_rx[0] - sent_at
                    return bytes(buf[:n])
            finally:
                if not done.done():
                    done.cancel()
                if self._serial is ser:
                    try:
                        loop.remove_reader(fd)
                    except (ValueError, OSError):
                        pass

    @staticmethod
    def _shown(buf: bytearray) -> str:
        return buf[:_HEX_SHOWN].hex(" ").upper() + (" …" if len(buf) > _HEX_SHOWN else "")

    def _timeout_failure(self, timeout: float, buf: bytearray, request: bytes = b""
                         ) -> tuple[str, Cause]:
        """Why the wait for an answer ended at the timeout, and its cause: nothing or only our
        own echo came back (``no_answer``), or bytes that never made a complete answer
        (``garbled``)."""
        if not buf:
            return f"no answer within {timeout:g} s on {self.port}", "no_answer"
        if request and request.startswith(bytes(buf)):
            # An RS-485 adapter that hears its own transmitter: our request, nothing else.
            return (f"no answer within {timeout:g} s on {self.port} (only the echo of the "
                    "request came back)"), "no_answer"
        return (f"no complete answer within {timeout:g} s on {self.port}: {len(buf)} bytes of "
                f"noise or a cut-off frame ({self._shown(buf)}); check baud rate, parity and "
                "wiring (A/B)"), "garbled"

    def _noise_message(self, limit: float, received: int, buf: bytearray) -> str:
        return (f"no complete answer within {limit:.2g} s on {self.port}: the line never fell "
                f"silent, {received} bytes of noise ({self._shown(buf)}); check baud rate, "
                "parity and wiring (A/B), or the adapter")


def _is_pty(port: str) -> bool:
    """Unix98 pseudo-terminal slaves have major numbers 136-143."""
    try:
        return 136 <= os.major(os.stat(port).st_rdev) <= 143
    except OSError:
        return False
