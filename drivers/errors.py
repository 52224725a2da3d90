"""Typed driver errors. Drivers raise these; they never return ``None`` for a failure."""

from __future__ import annotations

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


class DriverError(Exception):
    """Base class of every driver failure."""

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        super().__init__(f"{device}: {message}")


class DeviceUnavailable(DriverError):
    """No answer: connection refused or dropped, timeout, garbled frame."""


class DeviceException(DriverError):
    """The device answered with a Modbus exception code."""

    def __init__(self, device: str, function: int, code: int) -> None:
        self.function = function
        self.code = code
        meaning = EXCEPTION_CODES.get(code, "unknown exception")
        super().__init__(device, f"function {function} answered exception {code} ({meaning})")


class VerificationError(DriverError):
    """A write was accepted but reading it back gave another value."""
