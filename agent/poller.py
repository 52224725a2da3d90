"""Polling: read every device that is due, keep their health, hand the readings on.

Each transport (a serial line, a TCP connection to a meter or gateway) is polled by its own
task, its devices one after another (one transaction at a time per line), the transports side
by side. A transport's readings go to the outbox (and wake the sync) as soon as that transport
is done, not after the slowest meter of the cycle: a 2400-baud line never holds up the main
meter's telemetry on another transport. The cycle waits for the transports until its interval
is up; a line still busy then carries on in the background and its readings count for the
next cycle.

A failing device is retried every cycle until it has failed for ``offline_after_s`` (every
cycle while it is urgent: the main meter while control is active), then marked offline (an
event) and retried with jittered exponential back-off (:mod:`lmt.agent.health`). Points a
device could not read while the rest of it answered are left out of its reading and reported
when the set of failing points changes (``points_failed``, ``points_recovered``). Nothing a
device does stops the loop: every failure is a value here, classified by its ``cause``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmt.config.agent import AgentConfig
from lmt.config.agent import Device as DeviceConfig
from lmt.drivers.errors import DriverError

from .devices import Device, due_names, set_request_timeout, transport_of
from .health import DeviceHealth, HealthPolicy
from .messages import EventType, event_body, reading_body

log = logging.getLogger("lmt.agent")

Sink = Callable[[str, list[dict[str, Any]]], None]  # (stream, bodies): to the outbox


@dataclass
class PollResult:
    """One cycle's reads: the devices that answered (also when some of their points failed),
    and those that failed, with their error."""

    fresh: set[str] = field(default_factory=set)
    failures: dict[str, DriverError | TimeoutError] = field(default_factory=dict)


def health_policy(cfg: AgentConfig, d: DeviceConfig) -> HealthPolicy:
    """A device's health policy: response timeouts per transaction, from its line's own
    ``timeout_s`` when it has one (the adaptive ceiling is raised to it if need be)."""
    p = cfg.poll
    line = cfg.line(d.line) if d.line is not None else None
    timeout = line.timeout_s if line is not None and line.timeout_s else p.timeout_s
    return HealthPolicy(timeout_s=timeout, min_timeout_s=p.min_timeout_s,
                        max_timeout_s=max(p.max_timeout_s, timeout),
                        offline_after_s=p.offline_after_s if d.offline_after_s is None
                        else d.offline_after_s,
                        retry_interval_s=p.interval_s, backoff_max_s=p.backoff_max_s)


class Poller:
    def __init__(self, cfg: AgentConfig, devices: Mapping[str, Device], sink: Sink,
                 clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.devices = devices
        self.sink = sink
        self.clock = clock
        self.mono = mono
        self.health = {d.name: DeviceHealth(health_policy(cfg, d)) for d in cfg.devices}
        self.last_read: dict[str, dict[str, float]] = {name: {} for name in devices}
        # latest values per device: (monotonic time of the read, values); failed points removed
        self.latest: dict[str, tuple[float, dict[str, float | bool | None]]] = {}
        self.read_started: dict[str, float] = {}  # when each device's latest read began (mono)
        self.urgent = False  # control is active: the main meter is retried every cycle
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._result = PollResult()
        self._pending: list[dict[str, Any]] = []
        self._flush_soon = False
        self._last_flush = 0.0
        self._per_transport = cfg.buffer.flush_interval_s <= cfg.poll.interval_s
        self._lines: dict[int, list[str]] = {}
        for name, dev in devices.items():
            self._lines.setdefault(id(transport_of(dev)), []).append(name)
        meter = devices[cfg.control.main_meter].profile.point(cfg.control.power_point)
        self._power_to_kw = 0.001 if meter.unit == "W" else 1.0

    # -- the main meter --------------------------------------------------------------------
    def site_kw(self, max_age_s: float | None = None) -> float | None:
        got = self.latest.get(self.cfg.control.main_meter)
        if got is None:
            return None
        at, values = got
        power = values.get(self.cfg.control.power_point)
        if power is None or isinstance(power, bool):
            return None
        if max_age_s is not None and self.mono() - at > max_age_s:
            return None
        kw = float(power) * self._power_to_kw
        return kw if math.isfinite(kw) else None

    def recent_site_kw(self) -> float | None:
        """The main-meter power if read in the last three cycles (at least 3 s)."""
        return self.site_kw(max_age_s=max(3.0, 3 * self.cfg.poll.interval_s))

    def value(self, device: str, point: str) -> float | bool | None:
        got = self.latest.get(device)
        return None if got is None else got[1].get(point)

    def force(self, device: str, point: str) -> None:
        """Read ``point`` of ``device`` in this very cycle (a command needs the site's power
        now, even if it was read a moment ago) and retry the device at once."""
        self.health[device].next_attempt = self.mono()
        self.last_read[device].pop(point, None)

    def read_soon(self, device: str, points: tuple[str, ...]) -> None:
        """Read these (slow) points of ``device`` when it is next polled, whatever their age
        (its health and back-off are left alone)."""
        last = self.last_read.get(device)
        if last is not None:
            for point in points:
                last.pop(point, None)

    # -- one cycle -------------------------------------------------------------------------
    async def poll(self, deadline_mono: float) -> PollResult:
        """Read every device that is due; wait for the transports until ``deadline_mono``. A
        line still busy then adds its devices to the next cycle's result."""
        if len(self._lines) == 1 and not self._tasks:  # one transport: no task needed
            await self._poll_line(next(iter(self._lines.values())), inline=True)
        else:
            started = []
            for key, names in self._lines.items():
                task = self._tasks.get(key)
                if task is None or task.done():
                    task = self._tasks[key] = asyncio.create_task(self._poll_line(names))
                    started.append(task)
            if started:
                wait = max(0.0, deadline_mono - self.mono())
                await asyncio.wait(started, timeout=wait if wait > 0 else None)
        if self._pending and (self._per_transport or self.mono() + self.cfg.poll.interval_s
                              > self._last_flush + self.cfg.buffer.flush_interval_s):
            self.flush()
        result, self._result = self._result, PollResult()
        return result

    def flush(self) -> None:
        """Hand the readings held so far to the outbox (one transaction)."""
        self._flush_soon = False
        if self._pending:
            pending, self._pending = self._pending, []
            self.sink("telemetry", pending)
        self._last_flush = self.mono()

    def _transport_done(self) -> None:
        if not self._per_transport or not self._pending or self._flush_soon:
            return
        # transports finishing in the same loop iteration share one transaction
        self._flush_soon = True
        asyncio.get_running_loop().call_soon(self.flush)

    async def _poll_line(self, names: list[str], inline: bool = False) -> None:
        for name in names:
            if await self._poll_device(name):
                self._result.fresh.add(name)
        if not inline:  # (inline, poll() itself writes them once it returns)
            self._transport_done()

    async def stop(self) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.flush()

    def _event(self, type_: EventType, **data: Any) -> None:
        self.sink("events", [event_body(type_, self.clock(), data)])

    async def _poll_device(self, name: str) -> bool:
        """Read one device if it is due; True when it answered."""
        dev = self.devices[name]
        h = self.health[name]
        if not h.due(self.mono()):
            return False
        ts, t0 = self.clock(), self.mono()
        last = self.last_read[name]
        names = due_names(dev, last, t0, self.cfg.poll.interval_s * 0.9,
                          self.cfg.poll.slow_interval_s)
        if not names:
            return False
        # every point due: the device's whole plan, cached as such (no sort of the names)
        query = None if len(names) == len(dev.profile.points) else names
        # The timeout is per transaction: a read of n requests gets n timeouts, plus the
        # time its frames take on a serial line.
        n, wire = dev.transactions(query), dev.wire_time_s(query)
        deadline = h.deadline_s(n, wire)
        set_request_timeout(dev, h.timeout_s)
        try:
            async with asyncio.timeout(deadline):  # no extra task per read (as wait_for makes)
                got = await dev.read(query)
        except (DriverError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                transport_of(dev).close()  # drop the half-finished transaction
            self._result.failures[name] = exc
            error = str(exc) or (f"no answer within {deadline:.2f} s ({n} requests, "
                                 f"{h.timeout_s:.2f} s each)")
            urgent = self.urgent and name == self.cfg.control.main_meter
            timed_out = isinstance(exc, TimeoutError) or getattr(exc, "cause", "") == "no_answer"
            if h.failure(self.mono(), error, urgent=urgent, timed_out=timed_out):
                log.warning("device %s offline: %s", name, error)
                self._event("device_offline", device=name, error=error,
                            cause="no_answer" if isinstance(exc, TimeoutError) else exc.cause,
                            failing_s=round(self.mono() - (h.failing_since or t0), 3))
            return False
        elapsed = self.mono() - t0
        if h.success(self.mono(), max(0.0, elapsed - wire) / max(1, n)):
            log.info("device %s back online", name)
            self._event("device_online", device=name)
        self._points_changed(name, names, got.values, got.failures)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in got.values.items()}
        last.update(dict.fromkeys(clean, t0))
        merged = {**self.latest[name][1], **clean} if name in self.latest else clean
        for points, _ in got.failures:  # never taken for fresh (control, load states)
            for p in points:
                merged.pop(p, None)
        self.latest[name] = (self.mono(), merged)
        self.read_started[name] = t0
        self._pending.append(reading_body(ts, name, clean))
        return True

    def _points_changed(self, name: str, asked: list[str], values: dict[str, Any],
                        failures: tuple[tuple[tuple[str, ...], DriverError], ...]) -> None:
        """Points of an answering device that failed (an exception for one block, a refused
        data identifier) are left out of its reading, so they stay due; an event says when
        the set of failing points changes, not every cycle."""
        newly, recovered = self.health[name].points_read(
            asked, values, [(points, str(exc)) for points, exc in failures])
        for points, error in newly:
            log.warning("device %s: cannot read %s: %s", name, ", ".join(points), error)
            self._event("points_failed", device=name, points=points, error=error)
        if recovered:
            log.info("device %s: %s read again", name, ", ".join(recovered))
            self._event("points_recovered", device=name, points=recovered)
