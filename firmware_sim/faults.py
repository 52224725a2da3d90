"""Fault injection: what a simulated device does with one request, drawn from its ``Faults``.

Each device has a :class:`FaultInjector` with its own random generator, seeded from the site's
``seed`` and the device's name, so a device's sequence of faults is reproducible whatever the
other devices are asked. A rate of 0 never draws and never fires, a rate of 1 always fires.

For each request, in this order (the first that fires decides):

1. ``offline``: silent (the device has vanished).
2. ``no_answer_rate``: silent (the request was lost; a write does not take effect).
3. ``drop_rate`` (TCP only): the connection is closed instead of answering.
4. ``exception_code`` with ``exception_rate``: the device answers that exception code (the
   request is not executed).
5. ``crc_error_rate`` (serial lines only): the request is executed, the answer is sent with a
   wrong CRC — a write takes effect though the master sees a bad answer.
6. ``garbage_rate``: the request is executed, random bytes (as many as the answer frame) are
   sent instead of the answer.
7. otherwise the normal answer.

``delay_s`` delays everything but silence: the device answers (or drops) that much later.
``drop_rate`` is ignored on serial lines (no connection to close) and ``crc_error_rate`` over
TCP (TCP has no CRC; its checksums live below Modbus).

``frozen`` decides no outcome: it changes what an answer carries (a frozen register, a hung
metering chip). While it is on, every read answers the values the device had when it was
switched on, whatever else fires (a CRC error carries them too); the model goes on underneath
and writes still act on the real state. The injector only tells the device when ``frozen``
changes (:meth:`FaultInjector.on_frozen`); the device keeps the snapshot itself, where its
answers are made.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from lmt.config.site import Faults


class Outcome(StrEnum):
    ANSWER = "answer"
    SILENT = "silent"
    DROP = "drop"
    EXCEPTION = "exception"
    CRC_ERROR = "crc_error"
    GARBAGE = "garbage"


@dataclass(frozen=True)
class Decision:
    """What one request gets."""

    outcome: Outcome
    delay_s: float = 0.0
    exception_code: int = 0


@dataclass(frozen=True)
class Reply:
    """What a device puts on the wire for one request; the framing layer builds the frame.

    ``pdu`` is the answer (function code + data), None for silence. ``garbage`` replaces the
    whole frame; ``bad_crc`` asks a serial line to send the frame with a wrong CRC; ``drop``
    asks a TCP server to close the connection.
    """

    pdu: bytes | None = None
    garbage: bytes | None = None
    bad_crc: bool = False
    drop: bool = False


class FaultInjector:
    """One device's faults and the random generator that draws them."""

    def __init__(self, faults: Faults, seed: int | str) -> None:
        self._faults = faults
        self._rng = random.Random(str(seed))
        #: How many requests got each outcome.
        self.counts: Counter[Outcome] = Counter()
        self._frozen_listeners: list[Callable[[bool], None]] = []

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        was_frozen = self._faults.frozen
        self._faults = faults
        if faults.frozen != was_frozen:
            for callback in list(self._frozen_listeners):
                callback(faults.frozen)

    @property
    def frozen(self) -> bool:
        """Whether reads answer the snapshot of the moment ``frozen`` was switched on."""
        return self._faults.frozen

    def on_frozen(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(frozen)`` whenever new faults switch ``frozen`` on or off (the device
        takes its snapshot then, or drops it)."""
        self._frozen_listeners.append(callback)

    @property
    def active(self) -> bool:
        """True if any fault is set."""
        return self._faults != Faults()

    def _hit(self, rate: float) -> bool:
        if rate <= 0.0:
            return False
        if rate >= 1.0:
            return True
        return self._rng.random() < rate

    def decide(self, serial: bool) -> Decision:
        """Draw the outcome of one request (``serial``: on an RTU line, else over TCP)."""
        f = self._faults
        decision = self._draw(f, serial)
        self.counts[decision.outcome] += 1
        return decision

    def _draw(self, f: Faults, serial: bool) -> Decision:
        if f.offline or self._hit(f.no_answer_rate):
            return Decision(Outcome.SILENT)
        delay = f.delay_s
        if not serial and self._hit(f.drop_rate):
            return Decision(Outcome.DROP, delay)
        if f.exception_code is not None and self._hit(f.exception_rate):
            return Decision(Outcome.EXCEPTION, delay, f.exception_code)
        if serial and self._hit(f.crc_error_rate):
            return Decision(Outcome.CRC_ERROR, delay)
        if self._hit(f.garbage_rate):
            return Decision(Outcome.GARBAGE, delay)
        return Decision(Outcome.ANSWER, delay)

    def garbage(self, size: int) -> bytes:
        """``size`` random bytes (from the device's generator)."""
        return self._rng.randbytes(size)
