"""Modbus RTU master on one serial line (RS-485 bus), shared by the device ids on it.

:class:`ModbusRtuBus` has the same ``call(label, function, coro_factory)`` contract as
:class:`~lmt.drivers.modbus.ModbusTcpBus`, so a :class:`~lmt.drivers.modbus.ModbusDevice` works
on either. It uses pymodbus's ``AsyncModbusSerialClient`` (RTU framer, pyserial underneath) and
adds what a shared half-duplex line needs:

* strictly one transaction at a time (an ``asyncio.Lock``), several device ids on the line;
* the inter-frame silence of the Modbus serial line spec before every request: 3.5 character
  times after the last byte on the line (our request or the last byte received), fixed at
  1.75 ms above 19200 bit/s;
* a response timeout that runs from the end of the request's transmission to the end of the
  expected answer: ``timeout_s`` plus the wire time of both frames at the line's baud rate, so
  a 157-byte answer at 2400 bit/s (0.7 s on the wire) does not eat the timeout;
* typed errors with the reason: no such port, permission denied (the ``dialout`` group), port
  busy, no answer, CRC error, garbled or incomplete answer (:class:`DeviceUnavailable`, its
  ``cause`` ``no_such_port``, ``permission``, ``busy``, ``no_answer`` or ``garbled``; a port
  that went away under a transaction is ``connect``, one that cannot be configured ``other``),
  exception answers (:class:`DeviceException`); the port stays open after a failed
  transaction (one silent device does not take the line down) and is reopened lazily when it
  went away (USB adapter unplugged);
* bytes that arrive between transactions (a late answer to a timed-out request) are read out
  before the next request is sent, never taken for its answer; an answer with another
  function code than the request's is refused as well;
* counters: ``transactions``, ``bytes_sent``, ``bytes_received`` (whole RTU frames, CRC
  included, through pymodbus's ``trace_packet`` hook) and ``stale_bytes`` (read out between
  transactions, included in ``bytes_received``).

A character is ``1 start + byte_size + parity bit + stop_bits`` bits (11 bits for 8E1 and 8N2,
10 for 8N1).
"""

from __future__ import annotations

import asyncio
import os
import termios
import time
from typing import TYPE_CHECKING

import serial
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerRTU, FramerType

from .errors import Cause, DeviceUnavailable
from .modbus import ModbusBus, hex_bytes
from .serial_line import char_time_s, modbus_rtu_silence_s, open_failure

if TYPE_CHECKING:
    from lmt.config.agent import Line

MAX_RTU_FRAME = 256  # bytes: device id + PDU (at most 253) + CRC


silence_s = modbus_rtu_silence_s  # the Modbus RTU inter-frame silence


def crc16(data: bytes) -> bytes:
    """The Modbus CRC-16 of ``data``, as it is sent (low byte first)."""
    return FramerRTU.compute_CRC(data).to_bytes(2, "big")


def answer_size(request: bytes) -> int | None:
    """Length of the normal answer to an RTU request frame (None: not known from the request)."""
    if len(request) < 6:
        return None
    function, count = request[1], int.from_bytes(request[4:6], "big")
    if function in (1, 2):
        return 5 + (count + 7) // 8
    if function in (3, 4):
        return 5 + 2 * count
    if function in (5, 6, 15, 16):
        return 8
    return None


def open_error(port: str, exc: BaseException) -> str:
    """One sentence saying why ``port`` could not be opened, and what to do about it (its cause:
    :func:`~lmt.drivers.serial_line.open_failure`)."""
    return open_failure(port, exc)[0]


class ModbusRtuBus(ModbusBus):
    """One serial line running Modbus RTU, shared by the device ids on it."""

    def __init__(self, port: str, baud: int = 9600, parity: str = "N", stop_bits: int = 1,
                 byte_size: int = 8, timeout_s: float = 1.0, name: str | None = None) -> None:
        if parity not in ("N", "E", "O"):
            raise ValueError(f"parity must be N, E or O, not {parity!r}")
        if stop_bits not in (1, 2) or byte_size not in (7, 8):
            raise ValueError("stop_bits must be 1 or 2 and byte_size 7 or 8")
        super().__init__(timeout_s)
        self.port = port
        self.baud = baud
        self.parity = parity
        self.stop_bits = stop_bits
        self.byte_size = byte_size
        self._name = name or port
        self.char_time_s = char_time_s(baud, byte_size, parity, stop_bits)
        self.silence_s = silence_s(baud, byte_size, parity, stop_bits)
        self._idle_since = 0.0  # monotonic time the line last went quiet
        self.stale_bytes = 0  #: bytes that came between transactions, read out and dropped

    @classmethod
    def from_line(cls, line: Line, timeout_s: float = 1.0) -> ModbusRtuBus:
        """The bus of an agent ``[[lines]]`` entry (``line.timeout_s`` wins over ``timeout_s``)."""
        return cls(line.port, baud=line.baud_rate, parity=line.parity_bit, stop_bits=line.stop_bits,
                   byte_size=line.byte_size, timeout_s=line.timeout_s or timeout_s, name=line.name)

    def __repr__(self) -> str:
        return (f"ModbusRtuBus({self.port!r}, {self.baud} {self.byte_size}{self.parity}"
                f"{self.stop_bits})")

    @property
    def name(self) -> str:
        return self._name

    def wire_time_s(self, n_bytes: int) -> float:
        """Seconds ``n_bytes`` take on the line."""
        return n_bytes * self.char_time_s

    # -- hooks ---------------------------------------------------------------------------------

    def _make_client(self) -> ModbusBaseClient:
        return AsyncModbusSerialClient(
            self.port, framer=FramerType.RTU, baudrate=self.baud, bytesize=self.byte_size,
            parity=self.parity, stopbits=self.stop_bits, name=self._name,
            timeout=self.timeout_s + self.wire_time_s(2 * MAX_RTU_FRAME), retries=0,
            reconnect_delay=0, trace_packet=self._trace_packet, trace_pdu=self._trace_pdu,
            trace_connect=self._trace_connect)

    def _probe(self) -> tuple[str, Cause] | None:
        """Open and configure the port as pymodbus will, then close it; the reason it cannot be
        used and its cause, or None. (pymodbus logs open errors and returns False, and a
        ``termios.error`` while configuring escapes it with the port left open and locked.)"""
        try:
            probe = serial.Serial(self.port, baudrate=self.baud, bytesize=self.byte_size,
                                  parity=self.parity, stopbits=self.stop_bits, exclusive=True,
                                  timeout=0)
        except (serial.SerialException, OSError) as exc:
            return open_failure(self.port, exc)
        except termios.error as exc:
            return self._settings_error(exc), "other"
        try:
            probe.timeout = 0.1  # pymodbus's second configuration of the port
        except (termios.error, serial.SerialException, OSError) as exc:
            return self._settings_error(exc), "other"
        finally:
            probe.close()
        return None

    def _settings_error(self, exc: BaseException) -> str:
        settings = f"{self.baud} {self.byte_size}{self.parity}{self.stop_bits}"
        msg = f"cannot set {settings} on serial port {self.port}: {exc}"
        if os.path.realpath(self.port).startswith("/dev/pts/"):
            msg += (" (a pseudo-terminal carries 8 data bits without parity: open it as 8N1 or "
                    "8N2, 8N2 has the character time of 8E1)")
        return msg

    async def ensure_connected(self) -> ModbusBaseClient:
        if (self._client is None or not self._client.connected) and (why := self._probe()):
            raise DeviceUnavailable(self.name, *why)
        return await super().ensure_connected()

    def _connect_error(self, exc: BaseException) -> tuple[str, Cause]:
        # pymodbus opens the port itself: an error there is one of opening it
        return f"cannot connect: {exc}", open_failure(self.port, exc)[1]

    async def _connect_failed(self) -> tuple[str, Cause]:
        return self._probe() or (f"cannot open serial port {self.port}", "other")

    async def _before_request(self) -> None:
        # The line must have been silent for 3.5 character times before a new frame, and
        # whatever came in meanwhile (a late answer to a timed-out request) must never be
        # taken for the next answer: read it out and wait for silence again.
        while True:
            while (wait := self._idle_since + self.silence_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            if not (stale := self._read_stale()):
                return
            self.stale_bytes += len(stale)
            self.bytes_received += len(stale)
            self._idle_since = time.monotonic()

    def _read_stale(self) -> bytes:
        """Bytes waiting in the port's input buffer (pymodbus 3.16's SerialTransport)."""
        client = self._client
        port = getattr(getattr(client.ctx, "transport", None), "sync_serial", None) if client else None
        if port is None:
            return b""
        try:
            waiting = port.in_waiting
            return bytes(port.read(waiting)) if waiting else b""
        except (serial.SerialException, OSError):
            return b""

    def _on_sent(self, frame: bytes) -> None:
        now = time.monotonic()
        self._idle_since = now + self.wire_time_s(len(frame))
        # pymodbus reads its (single) timeout after handing the frame to the transport: make it
        # this request's, from the end of the request to the end of the expected answer.
        expected = answer_size(frame) or MAX_RTU_FRAME
        client = self._client
        if client is not None:
            client.ctx.comm_params.timeout_connect = (
                self.wire_time_s(len(frame) + expected) + self.timeout_s)

    def _on_received(self, data: bytes) -> None:
        self._idle_since = max(self._idle_since, time.monotonic())

    def _close_after_failure(self) -> bool:
        return False  # one device not answering leaves the line usable for the others

    def _no_answer(self, exc: ModbusException) -> tuple[str, Cause]:
        rx, req = bytes(self._answer), self._request
        if self._lost:  # the port itself failed (adapter unplugged): the way to the device
            return f"serial port {self.port} went away", "connect"
        if not rx:
            return f"no answer within {self.timeout_s:g} s", "no_answer"
        if len(rx) >= 4 and req and rx[0] == req[0] and rx[1] & 0x7F == req[1]:
            size = 5 if rx[1] & 0x80 else answer_size(req) or len(rx)
            if len(rx) < size:
                return f"incomplete answer ({len(rx)} of {size} bytes: {hex_bytes(rx)})", "garbled"
            if crc16(rx[: size - 2]) != rx[size - 2: size]:
                return (f"CRC error in the answer ({size} bytes: {hex_bytes(rx[:size])})",
                        "garbled")
        return f"garbled answer ({len(rx)} bytes: {hex_bytes(rx)})", "garbled"
