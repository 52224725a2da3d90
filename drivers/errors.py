"""Typed driver errors. Drivers raise these; they never return ``None`` for a failure.

Every :class:`DriverError` carries a machine-readable :attr:`~DriverError.cause`, so the agent
and the field tools decide what a failure means (count a timeout, back off a busy device, say
"no such port") without reading the message, which is for people and may change:

``no_answer``
    Nothing answered within the timeout: a silent or switched-off device, a wrong device id or
    address, an answer too late. An RS-485 adapter's echo of the request with nothing after it
    is no answer too (the request heard back is not an answer; a DL/T 645 scan must not take
    it for colliding meters).
``garbled``
    Bytes came back but not a usable answer: a bad CRC or checksum, wrong framing, an
    incomplete or cut-off answer, noise (:class:`~lmt.drivers.serial_line.NoisyLine`), data
    that does not decode, an answer to another request or from another address.
``connect``
    No connection to the device: TCP connection refused, reset or dropped, cannot connect; a
    serial port that failed or went away under a transaction (an unplugged USB adapter).
``no_such_port``
    The serial port does not exist.
``permission``
    The serial port exists but may not be opened (EACCES, EPERM: the ``dialout`` group).
``busy``
    The serial port is held by another program (locked, EBUSY), or the Modbus device answered
    exception 6, "server device busy": try again later.
``exception``
    The device answered, and refused: any other Modbus exception code
    (:class:`DeviceException`; the gateway's 10 and 11 included, ``code`` tells them apart), a
    DL/T 645 abnormal reply (:class:`~lmt.drivers.dlt645.Dlt645Refused`: a refused data
    identifier, a refused command).
``verification``
    A write or command was accepted but did not take: the read-back differs, or the DL/T 645
    status word does not show the command carried out (:class:`VerificationError`).
``other``
    Anything else (a serial port that cannot be configured, an unexpected I/O error).
"""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

#: Why a driver call failed; see the module docstring for what each value covers.
Cause = Literal["no_answer", "garbled", "connect", "no_such_port", "permission", "busy",
                "exception", "verification", "other"]

#: Every cause, in the order of :data:`Cause`.
CAUSES: tuple[Cause, ...] = get_args(Cause)

EXCEPTION_CODES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}

#: The Modbus exception code "server device busy": cause ``busy``, not ``exception``.
BUSY_CODE = 6


class DriverError(Exception):
    """Base class of every driver failure.

    ``message`` is the sentence for people (``str(exc)`` prefixes the device); ``cause`` is
    what the code goes by, the class's :attr:`default_cause` unless the raise site says.
    """

    #: The cause of an error of this class when the raise site names none.
    default_cause: ClassVar[Cause] = "other"

    def __init__(self, device: str, message: str, cause: Cause | None = None) -> None:
        self.device = device
        self.message = message
        self.cause: Cause = self.default_cause if cause is None else cause
        super().__init__(f"{device}: {message}")


class DeviceUnavailable(DriverError):
    """No usable answer: connection refused or dropped, timeout, garbled frame, port trouble.

    Raise sites name the cause (``DeviceUnavailable(device, message, "no_answer")``).
    """


class DeviceException(DriverError):
    """The device answered with a Modbus exception code (cause ``exception``; ``busy`` for
    code 6, "server device busy")."""

    default_cause: ClassVar[Cause] = "exception"

    def __init__(self, device: str, function: int, code: int) -> None:
        self.function = function
        self.code = code
        meaning = EXCEPTION_CODES.get(code, "unknown exception")
        super().__init__(device, f"function {function} answered exception {code} ({meaning})",
                         "busy" if code == BUSY_CODE else None)


class VerificationError(DriverError):
    """A write was accepted but reading it back gave another value (cause ``verification``)."""

    default_cause: ClassVar[Cause] = "verification"
