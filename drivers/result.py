"""The outcome of a partial read: the values that could be read, and what could not and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import DriverError

#: Points a partial read could not get (one block, or one DL/T 645 data identifier) and why.
PointsFailure = tuple[tuple[str, ...], DriverError]


@dataclass(frozen=True)
class ReadResult:
    """What a device's ``read(names)`` got.

    ``values``: the points read, by name (None where the device says it has no such value, or
    the raw value is one of the point's ``invalid`` ones). ``failures``: the blocks (Modbus) or
    data identifiers (DL/T 645) the device refused or answered undecodably, each with its point
    names and the error (its ``cause`` says why); their points are missing from ``values``.
    A read that gets nothing at all raises instead of returning an empty result.
    """

    values: dict[str, Any]
    failures: tuple[PointsFailure, ...] = ()
