"""A serial line that never falls silent (an adapter spewing garbage) must not hold a transaction
forever: the wait ends at a hard limit with a typed error, and the line stays usable."""

from __future__ import annotations

import asyncio
import os
import select
import termios
import threading
import time
import tty
from collections.abc import Iterator

import pytest

from lmt.config.profiles import load_profile
from lmt.drivers.dlt645 import Dlt645Meter, frame_length, read_request
from lmt.drivers.errors import DeviceUnavailable
from lmt.drivers.serial_line import NoisyLine, SerialLine
from tests.conftest import wait_until

# No 68 byte in it: it can never look like the start of a DL/T 645 frame.
NOISE = bytes([0x55, 0xAA, 0x00, 0xFF, 0x13, 0x37]) * 64


class NoisyPeer:
    """The other end of a pseudo-terminal: sends noise as fast as the pty takes it until stopped
    (``flood``), or only what the test writes."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo  # send back what the line sends (an adapter hearing its transmitter)
        self.master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        self.path = os.ttyname(slave)
        self._slave = slave  # held open, so the pty stays up while the line reopens it
        os.set_blocking(self.master, False)
        self.sent = 0
        self._stop = threading.Event()
        self._flooding = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def flood(self, on: bool) -> None:
        if on:
            self._flooding.set()
        else:
            self._flooding.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._flooding.is_set():
                select.select([self.master], [], [], 0.05)  # the line's request, or 50 ms
                self._drain()
                continue
            self._drain()
            _, writable, _ = select.select([], [self.master], [], 0.05)
            if not writable:
                continue
            try:
                self.sent += os.write(self.master, NOISE)
            except (BlockingIOError, OSError):
                continue

    def _drain(self) -> None:
        """Read what the line sent (its requests), so the pty never fills that way; echo it."""
        try:
            while chunk := os.read(self.master, 4096):
                if self.echo:
                    os.write(self.master, chunk)
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        os.close(self.master)
        os.close(self._slave)


@pytest.fixture
def peer() -> Iterator[NoisyPeer]:
    p = NoisyPeer()
    try:
        yield p
    finally:
        p.close()


def run_bounded(coro_fn: object, limit_s: float) -> object:
    """Run the coroutine in its own thread and loop; fail (not hang) if it takes too long."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro_fn())  # type: ignore[operator]
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"the transaction was still running after {limit_s} s"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("result")


def test_continuous_noise_fails_at_the_hard_limit(peer: NoisyPeer) -> None:
    line = SerialLine(peer.path, baud_rate=9600, timeout_s=0.2)
    limit = line.hard_limit_s()
    assert limit == pytest.approx(0.2 + 300 * 10 / 9600 + 0.05)

    async def main() -> tuple[float, BaseException | None]:
        try:
            peer.flood(True)
            wait_until(lambda: peer.sent > 0, 10, "the noise to start")
            start = time.monotonic()
            try:
                await line.transact(b"\x01\x03\x00\x00\x00\x01\x84\x0a", lambda buf: None)
            except DeviceUnavailable as exc:
                return time.monotonic() - start, exc
            return time.monotonic() - start, None
        finally:
            peer.flood(False)
            line.close()

    took, exc = run_bounded(main, 30)  # type: ignore[misc]
    assert isinstance(exc, NoisyLine), exc
    assert "never fell silent" in str(exc) and "bytes of noise" in str(exc)
    assert "55 AA 00 FF" in str(exc)
    # the hard limit, plus the silence before the request and a loaded machine's slack
    assert took < limit + 5
    assert line.bytes_received > 0


def test_a_dlt645_read_on_a_noisy_line_fails_then_the_line_recovers(peer: NoisyPeer) -> None:
    """A meter read through a noisy adapter fails with the noise error; once the noise stops,
    the same line object still works (here: a clean no-answer)."""
    line = SerialLine(peer.path, baud_rate=9600, parity="E", timeout_s=0.2)
    meter = Dlt645Meter("main", line, "123456789012", load_profile("dlt645-2007-3phase"),
                        timeout_s=0.2)

    async def main() -> tuple[BaseException | None, BaseException | None]:
        first = second = None
        try:
            peer.flood(True)
            wait_until(lambda: peer.sent > 0, 10, "the noise to start")
            try:
                await meter.read_points(["power_kw"])
            except DeviceUnavailable as exc:
                first = exc
            peer.flood(False)
            try:
                await meter.read_points(["power_kw"])
            except DeviceUnavailable as exc:
                second = exc
        finally:
            line.close()
        return first, second

    first, second = run_bounded(main, 30)  # type: ignore[misc]
    assert isinstance(first, NoisyLine) and "never fell silent" in str(first)
    assert second is not None and not isinstance(second, NoisyLine)
    assert "no answer within 0.2 s" in str(second) or "bytes of noise" in str(second)


def test_an_echo_of_the_request_alone_is_no_answer_not_noise() -> None:
    """An RS-485 adapter that hears its own transmitter sends the request back; when no meter
    answers, that is "no answer", not "bytes of noise" (a DL/T 645 scan counts noise as two
    meters answering at once and would search deeper under every address)."""
    peer = NoisyPeer(echo=True)
    line = SerialLine(peer.path, baud_rate=9600, parity="E", timeout_s=0.2)

    async def main() -> BaseException | None:
        try:
            await line.transact(read_request("123456789012", "02030000"), frame_length)
        except DeviceUnavailable as exc:
            return exc
        finally:
            line.close()
        return None

    try:
        exc = run_bounded(main, 30)
    finally:
        peer.close()
    assert isinstance(exc, DeviceUnavailable) and not isinstance(exc, NoisyLine)
    assert str(exc).endswith("no answer within 0.2 s on " + peer.path
                             + " (only the echo of the request came back)")
    assert line.bytes_received == line.bytes_sent == 20
