"""Helpers for the control-mode and demand-response flows: a wall clock the test owns (faster
than real time, and able to jump), agent files with extra sections, and the records the agent
published, by type.

The agent takes its wall clock as a callable (``Agent(cfg, clock=...)``); everything the
terminal control modes time (1-minute means, slide windows, alarm times, periods, months) and
every timestamp it publishes come from it, while polling, deadlines and relay timing stay on
the real monotonic clock. So a clock that runs ``rate`` times faster makes a minute of mode
control pass in ``60 / rate`` real seconds, and :meth:`FastClock.jump` crosses a month or a
control time at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomli_w

CHINA_UTC_OFFSET_S = 8 * 3600  # the demo agent's [modes] utc_offset_s


class FastClock:
    """Wall-clock seconds starting at ``start``, running ``rate`` times real time, plus the
    jumps made so far. Thread-safe (the agent calls it from its own thread)."""

    def __init__(self, start: float, rate: float = 1.0) -> None:
        self._t0 = time.monotonic()
        self.start = start
        self.rate = rate
        self._offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.start + self.rate * (time.monotonic() - self._t0) + self._offset

    def jump(self, seconds: float) -> None:
        """Move the clock forward (or back) by ``seconds`` at once."""
        with self._lock:
            self._offset += seconds

    def real_s(self, clock_s: float) -> float:
        """How many real seconds ``clock_s`` seconds of this clock take."""
        return clock_s / self.rate


def local_epoch(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
                second: float = 0.0, utc_offset_s: int = CHINA_UTC_OFFSET_S) -> float:
    """Unix seconds of a local time at a fixed UTC offset (as ``modes.local_time`` reads it)."""
    local = datetime(year, month, day, hour, minute, tzinfo=UTC) + timedelta(seconds=second)
    return local.timestamp() - utc_offset_s


def patch_config(path: Path, **sections: dict[str, Any]) -> None:
    """Update sections of an agent file in place (a missing section, e.g. ``dr``, is added)."""
    cfg = tomllib.loads(path.read_text())
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(cfg))


def events_of(events: list[dict[str, Any]], type_: str, **match: Any) -> list[dict[str, Any]]:
    """The events of ``type_`` whose data has every ``match`` item, in publication order
    (by sequence number, duplicates from a redelivery dropped)."""
    seen: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["type"] == type_ and all(e["data"].get(k) == v for k, v in match.items()):
            seen.setdefault(e["seq"], e)
    return [seen[s] for s in sorted(seen)]


def buffered_readings(cfg_path: Path, device: str) -> list[dict[str, Any]]:
    """The agent's telemetry readings of ``device`` in its buffer file, in sequence order: a
    second, read-only connection (the agent keeps the file open in WAL mode). Readings are
    written there at each flush (``buffer.flush_interval_s``)."""
    path = Path(tomllib.loads(cfg_path.read_text())["buffer"]["path"])
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0)
    try:
        rows = db.execute("SELECT body FROM outbox WHERE stream = 'telemetry' ORDER BY seq")
        readings = [json.loads(body) for (body,) in rows]
    finally:
        db.close()
    return [r for r in readings if r["device"] == device]
