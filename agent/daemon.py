"""The agent daemon: poll devices, buffer everything, sync to MQTT, carry out signed commands.

One asyncio loop runs three tasks:
- the cycle: read every device (coalesced block reads), buffer the readings, and when a
  command or a demand-response event is active run one closed-loop control step on the fresh
  main-meter reading;
- the sync: publish buffered records in sequence order at QoS 1, and move each stream's
  delivered watermark only when the broker acknowledged;
- commands arrive from paho's thread, are queued, and are verified, answered and carried out
  by the cycle, which alone changes control state.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from paho.mqtt.client import MQTTMessageInfo

from lmt.config.agent import AgentConfig
from lmt.config.agent import Device as DeviceConfig
from lmt.control import (
    CapParams,
    Decision,
    LoadSpec,
    LoadState,
    decide_cap,
    decide_release,
    modes,
    warmup,
)
from lmt.control.dr import (
    DrEvent,
    DrScheduler,
    Target,
    Transition,
    baseline_before,
    delivered_reduction_kw,
)
from lmt.drivers.errors import DriverError

from . import lmt_version
from .buffer import Buffer, Record
from .devices import build_devices, due_names, set_request_timeout, transport_of
from .health import DeviceHealth, HealthPolicy
from .messages import (
    CancelCommand,
    CapCommand,
    Command,
    DrEventCommand,
    GuaranteeCommand,
    ModesCommand,
    RemoteCommand,
    ShedCommand,
    Status,
)
from .mqtt import MqttLink, Topics
from .security import Refusal, load_public_key, verify_command
from .sync import Syncer

log = logging.getLogger("lmt.agent")


@dataclass
class ActiveControl:
    command_id: str
    kind: str
    cap_kw: float
    end_mono: float  # monotonic deadline: a wall-clock step does not move it
    executed: bool = False
    ending: str | None = None  # None, "completed" or "cancelled"
    cancel_id: str | None = None
    loads: frozenset[int] | None = None  # the command's `loads`: only these may be shed


class AgentFailed(RuntimeError):
    """The agent stopped because one of its tasks failed (the service should restart it)."""


SWITCH_RETRY_S = 30.0  # a load whose relay failed is left out of shedding this long
MODE_RECORD_AFTER_S = 120.0  # a mode decision's record adds the site power this much later
MODES_OWNER = "modes"  # command_id of the loads the terminal control modes switch
# A setpoint read back within this many % of a value is that value (a float32 register keeps
# ~7 digits); wider, a small step down would read as "back where it was" and lose the hold.
SETPOINT_TOL_PCT = 0.01
# DR delivery: the import register's difference is used only over a window at least this
# long (it is a slow point, read every poll.slow_interval_s) and only when the end was seen live
REGISTER_MIN_WINDOW_S = 900.0


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A partial ModeParams update: objects merged field by field, anything else replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path | None = None,
                 clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock  # wall clock: timestamps, command validity
        self.mono = mono  # monotonic clock: control timing, deadlines, back-off
        self.terminal = cfg.terminal.id
        self.topics = Topics(cfg.mqtt.topic_prefix, self.terminal)
        raw = config_path.read_bytes() if config_path else cfg.model_dump_json().encode()
        self.config_hash = hashlib.sha256(raw).hexdigest()
        self.session = int(time.time() * 1000)
        self.public_key = load_public_key(cfg.security.platform_public_key)
        self.buffer = Buffer(cfg.buffer.path, max_mb=cfg.buffer.max_mb)
        self.devices, self.transports = build_devices(cfg)
        self._last_read: dict[str, dict[str, float]] = {name: {} for name in self.devices}
        self.health = {name: DeviceHealth(self._policy(d)) for name, d in
                       zip(self.devices, cfg.devices, strict=True)}
        self.latest: dict[str, tuple[float, dict[str, float | bool | None]]] = {}
        meter = self.devices[cfg.control.main_meter].profile.point(cfg.control.power_point)
        self._power_to_kw = 0.001 if meter.unit == "W" else 1.0
        self.load_specs = [LoadSpec(ld.name, ld.rated_kw, ld.priority, kind=ld.kind,
                                    min_on_s=ld.min_on_s, min_off_s=ld.min_off_s,
                                    max_off_s=ld.max_off_s, min_pct=ld.min_pct)
                           for ld in cfg.loads]
        self.load_states = [LoadState(is_on=True) for _ in cfg.loads]
        # Loads a command had shed when the agent last stopped (crash, power cut): they are
        # restored by the first control step unless a command holds them; an adjustable one
        # goes back to the setpoint it had before we lowered it.
        held = self.buffer.shed_loads()
        since = self.buffer.shed_since()
        self._restore_pcts: dict[str, float] = dict(self.buffer.load_mode("restore_pct") or {})
        for ld, st in zip(cfg.loads, self.load_states, strict=True):
            st.shed_by_us = ld.name in held
            if st.shed_by_us:  # off since then (wall clock, on the monotonic one): max off time
                st.last_switch_s = self.mono() - max(0.0, self.clock() - since[ld.name])
            if ld.kind == "adjustable":
                st.setpoint_pct = math.nan  # unknown until read: no decision touches it
                if st.shed_by_us:
                    st.restore_pct = float(self._restore_pcts.get(ld.name, 100.0))
        self._last_write: dict[int, float] = {}  # adjustable: when its setpoint was last written
        self._retry_switch: dict[int, float] = {}
        self.active: ActiveControl | None = None
        # Demand response: the scheduler (persisted in the buffer), the recent main-meter
        # readings for the baseline (wall time, kW), and the event whose control holds loads.
        self.dr = self._load_dr()
        self._dr_saved = json.dumps(self.dr.to_dict(), sort_keys=True)
        self._meter_ring: deque[tuple[float, float]] = deque()
        # what each active DR event has metered so far (persisted: a restart keeps counting)
        self._delivery: dict[str, dict[str, Any]] = dict(self.buffer.load_mode("dr_delivery")
                                                         or {})
        self._delivery_saved = 0.0
        self.dr_target: Target | None = None
        self._dr_owner: str | None = None
        # Terminal control modes: params (signed commands) and state, both in the buffer;
        # rounds -> their loads; decision records waiting for their power two minutes later.
        self.rounds: dict[int, list[int]] = {}
        for i, ld in enumerate(cfg.loads):
            if ld.round is not None:
                self.rounds.setdefault(ld.round, []).append(i)
        self.mode_params, self.mode_state = self._load_modes()
        self._mode_records: list[dict[str, Any]] = list(self.buffer.load_mode("records") or [])
        # cap/DR switching decisions waiting for the site power two minutes later
        self._switch_records: list[dict[str, Any]] = list(
            self.buffer.load_mode("switch_records") or [])
        self._mode_held: set[int] = set()  # loads held off by a tripped round
        self._mode_freed = False  # a round was released: its loads come back staggered
        self._mode_out: modes.CycleOutputs | None = None
        self._contact_mono = self.mono()  # platform contact: MQTT connected or a command
        self._energy_point: str | None = None
        main = self.devices[cfg.control.main_meter].profile
        if main.has_point(cfg.modes.energy_point):
            self._energy_point = cfg.modes.energy_point
        self.stopping = False
        self._commands: deque[bytes] = deque()
        self._pending_readings: list[dict[str, Any]] = []
        self._last_flush = 0.0
        self._last_prune = self.mono()
        self.wake = asyncio.Event()
        self.sync_wake = asyncio.Event()
        self.link: MqttLink | None = None
        self.syncer: Syncer | None = None
        self._line_tasks: dict[int, asyncio.Task[None]] = {}
        self._fresh: set[str] = set()  # devices read since the cycle last looked
        self._cycle_deadline = 0.0  # monotonic: when this cycle's interval is up

    def _load_dr(self) -> DrScheduler:
        fractions = self.cfg.dr.level_fractions
        state = self.buffer.load_dr_state()
        if state is not None:
            try:
                dr = DrScheduler.from_dict(state, fractions)
                if dr.terminal_id == self.terminal:
                    return dr
                log.warning("DR state in the buffer is for terminal %s, not %s: not used",
                            dr.terminal_id, self.terminal)
            except ValueError as exc:
                log.error("DR state in the buffer is unreadable (%s): starting with no events",
                          exc)
        return DrScheduler(self.terminal, fractions)

    def _load_modes(self) -> tuple[modes.ModeParams, modes.ModeState | None]:
        params, state = modes.ModeParams(), None
        try:
            raw = self.buffer.load_mode("params")
            if raw is not None:
                params = modes.ModeParams.from_dict(raw)
            raw = self.buffer.load_mode("state")
            if raw is not None:
                state = modes.ModeState.from_dict(raw)
        except ValueError as exc:
            log.error("terminal control mode data in the buffer is unreadable (%s): "
                      "starting from what could be read", exc)
        return params, state

    def _policy(self, d: DeviceConfig) -> HealthPolicy:
        """A device's health policy: response timeouts per transaction, from its line's own
        ``timeout_s`` when it has one (the adaptive ceiling is raised to it if need be)."""
        p = self.cfg.poll
        line = self.cfg.line(d.line) if d.line is not None else None
        timeout = line.timeout_s if line is not None and line.timeout_s else p.timeout_s
        return HealthPolicy(timeout_s=timeout, min_timeout_s=p.min_timeout_s,
                            max_timeout_s=max(p.max_timeout_s, timeout),
                            offline_after_s=p.offline_after_s if d.offline_after_s is None
                            else d.offline_after_s,
                            retry_interval_s=p.interval_s, backoff_max_s=p.backoff_max_s)

    # -- records ------------------------------------------------------------------------------
    def _append(self, stream: str, bodies: list[dict[str, Any]]) -> list[Record]:
        recs = self.buffer.append(stream, bodies)
        if recs:
            self.sync_wake.set()
        return recs

    def event(self, type_: str, **data: Any) -> None:
        self._append("events", [{"ts": self.clock(), "type": type_, "data": data}])

    def result(self, command_id: str | None, status: str, reason: str | None = None,
               detail: str = "", **data: Any) -> None:
        log.info("command %s: %s%s%s", command_id, status, f" ({reason})" if reason else "",
                 f": {detail}" if detail else "")
        self._append("results", [{"ts": self.clock(), "command_id": command_id, "status": status,
                                  "reason": reason, "detail": detail, "data": data}])

    def report_dr(self, transitions: list[Transition]) -> None:
        """Each DR state change is a result under the event's id; then persist the state. The
        end of an event that was active carries what it delivered (``delivery``)."""
        for tr in transitions:
            data = dict(tr.data)
            if tr.state == "active":
                self._delivery_start(tr.event_id, tr.at)
            elif tr.event_id in self._delivery:
                got = self._delivery_end(tr.event_id, tr.at, data.get("baseline_kw"))
                if got is not None and data.get("was_active"):
                    data["delivery"] = got
            self.result(tr.event_id, tr.state, detail=tr.detail, at=tr.at, **data)
        self._save_dr()

    # -- DR delivery: metered energy over the active window against the baseline -------------
    def _energy_now(self) -> float | None:
        """The main meter's import energy register (kWh), if it has one and it was read."""
        if self._energy_point is None:
            return None
        got = self.latest.get(self.cfg.control.main_meter)
        value = got[1].get(self._energy_point) if got is not None else None
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            return None
        return float(value)

    def _delivery_start(self, event_id: str, at: float) -> None:
        kw = self.recent_site_kw()
        self._delivery[event_id] = {"start": at, "start_kwh": self._energy_now(), "kwh": 0.0,
                                    "covered_s": 0.0,
                                    "last": None if kw is None else [max(at, self.clock()), kw]}
        self.buffer.save_mode("dr_delivery", self._delivery, self.clock())

    def _delivery_sample(self, site: float | None) -> None:
        """Integrate the main-meter power over each active event (trapezoids; a gap longer
        than three poll cycles is not bridged, and counts as not covered)."""
        if not self._delivery or site is None:
            return
        now = self.clock()
        gap = max(5.0, 3 * self.cfg.poll.interval_s)
        for event_id, acc in self._delivery.items():
            try:
                end = self.dr.window(event_id)[1]
            except KeyError:
                end = now
            last = acc["last"]
            if last is not None and 0 < now - last[0] <= gap and last[0] < end:
                dt = min(now, end) - last[0]  # not past the window's end
                acc["kwh"] += (last[1] + site) / 2 * dt / 3600.0
                acc["covered_s"] += dt
            acc["last"] = [now, site]
        if now - self._delivery_saved >= 60.0:
            self.buffer.save_mode("dr_delivery", self._delivery, now)
            self._delivery_saved = now

    def _delivery_end(self, event_id: str, at: float, baseline_kw: float | None
                      ) -> dict[str, Any] | None:
        acc = self._delivery.pop(event_id)
        self.buffer.save_mode("dr_delivery", self._delivery, self.clock())
        duration = at - acc["start"]
        if duration <= 0 or baseline_kw is None:
            return None
        # The power samples (every cycle) unless they cover under 90 % of the window (the
        # agent was down): then the import register's difference, when it was read at both
        # ends (it is polled less often, so it is the coarser measure of a short event).
        end_kwh = self._energy_now()
        live = self.clock() - at <= max(5.0, 3 * self.cfg.poll.interval_s)
        register = (end_kwh - acc["start_kwh"] if isinstance(acc["start_kwh"], float)
                    and end_kwh is not None and live else None)
        if duration < REGISTER_MIN_WINDOW_S:
            register = None  # polled slowly: its difference over a short window says little
        coverage = min(1.0, acc["covered_s"] / duration)
        if coverage >= 0.9 or (register is None and coverage > 0):
            metered, method = acc["kwh"] / coverage, "power samples"
        elif register is not None:
            metered, method = register, "energy register"
        else:
            return None
        baseline_kwh = baseline_kw * duration / 3600.0
        return {"start": round(acc["start"], 3), "end": round(at, 3),
                "register_kwh": None if register is None else round(register, 4),
                "duration_s": round(duration, 3), "baseline_kw": round(baseline_kw, 3),
                "baseline_kwh": round(baseline_kwh, 4), "metered_kwh": round(metered, 4),
                "mean_kw": round(metered / (duration / 3600.0), 3),
                "delivered_reduction_kw": round(
                    delivered_reduction_kw(baseline_kwh, metered, duration), 3),
                "method": method, "coverage": round(coverage, 3)}

    def _save_dr(self) -> None:
        state = self.dr.to_dict()
        text = json.dumps(state, sort_keys=True)
        if text != self._dr_saved:
            self.buffer.save_dr_state(state, self.clock())
            self._dr_saved = text

    def flush_readings(self) -> None:
        if self._pending_readings:
            self._append("telemetry", self._pending_readings)
            self._pending_readings = []
        self._last_flush = self.mono()

    def status_payload(self, online: bool) -> str:
        return Status(terminal=self.terminal, online=online, ts=self.clock(),
                      version=lmt_version(), config_hash=self.config_hash,
                      devices=list(self.devices), session=self.session).model_dump_json()

    # -- polling ------------------------------------------------------------------------------
    async def poll_devices(self) -> set[str]:
        """Read every device that is due; return the names read successfully since the last
        call (also when some of their points failed: :meth:`_points_changed` reports those).

        Each transport (a serial line, a TCP connection) is polled by its own task, its devices
        one after another (one transaction at a time per line), the transports side by side.
        The cycle waits for them until its interval is up; a line still busy then (a slow
        2400-baud line) carries on in the background and its readings count for the next
        cycle, so it never holds up the main meter on another transport."""
        by_transport: dict[int, list[str]] = {}
        for name, dev in self.devices.items():
            by_transport.setdefault(id(transport_of(dev)), []).append(name)
        if len(by_transport) == 1 and not self._line_tasks:  # one transport: no task needed
            await self._poll_line(next(iter(by_transport.values())))
            by_transport = {}
        started = []
        for key, names in by_transport.items():
            task = self._line_tasks.get(key)
            if task is None or task.done():
                task = self._line_tasks[key] = asyncio.create_task(self._poll_line(names))
                started.append(task)
        if started:
            wait = max(0.0, self._cycle_deadline - self.mono())
            await asyncio.wait(started, timeout=wait if wait > 0 else None)
        fresh, self._fresh = self._fresh, set()
        # Write the batch now if holding it until the next cycle would pass the flush interval.
        if self.mono() + self.cfg.poll.interval_s > self._last_flush + self.cfg.buffer.flush_interval_s:
            self.flush_readings()
        return fresh

    async def _poll_line(self, names: list[str]) -> None:
        for name in names:
            if await self._poll_device(name):
                self._fresh.add(name)

    async def _stop_polling(self) -> None:
        tasks = [t for t in self._line_tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_device(self, name: str) -> bool:
        """Read one device if it is due; True when it answered."""
        dev = self.devices[name]
        h = self.health[name]
        if not h.due(self.mono()):
            return False
        ts, t0 = self.clock(), self.mono()
        last = self._last_read[name]
        names = due_names(dev, last, t0, self.cfg.poll.interval_s * 0.9,
                          self.cfg.poll.slow_interval_s)
        if not names:
            return False
        # The timeout is per transaction: a read of n requests gets n timeouts, plus the
        # time its frames take on a serial line.
        n, wire = dev.transactions(names), dev.wire_time_s(names)
        deadline = h.deadline_s(n, wire)
        set_request_timeout(dev, h.timeout_s)
        try:
            async with asyncio.timeout(deadline):  # no extra task per read (as wait_for makes)
                values = await dev.read_points(names, partial=True)
        except (DriverError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                transport_of(dev).close()  # drop the half-finished transaction
            error = str(exc) or (f"no answer within {deadline:.2f} s ({n} requests, "
                                 f"{h.timeout_s:.2f} s each)")
            urgent = (self.active is not None or self.dr_target is not None) \
                and name == self.cfg.control.main_meter
            timed_out = isinstance(exc, TimeoutError) or "no answer" in error
            if h.failure(self.mono(), error, urgent=urgent, timed_out=timed_out):
                log.warning("device %s offline: %s", name, error)
                self.event("device_offline", device=name, error=error,
                           failing_s=round(self.mono() - (h.failing_since or t0), 3))
            return False
        elapsed = self.mono() - t0
        if h.success(self.mono(), max(0.0, elapsed - wire) / max(1, n)):
            log.info("device %s back online", name)
            self.event("device_online", device=name)
        self._points_changed(name, names, values, dev.last_failures)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in values.items()}
        last.update(dict.fromkeys(clean, t0))
        merged = {**self.latest[name][1], **clean} if name in self.latest else clean
        for points, _ in dev.last_failures:  # never taken for fresh (control, load states)
            for p in points:
                merged.pop(p, None)
        self.latest[name] = (self.mono(), merged)
        self._pending_readings.append({"ts": ts, "device": name, "values": clean})
        return True

    def _points_changed(self, name: str, asked: list[str], values: dict[str, Any],
                        failures: list[tuple[tuple[str, ...], DriverError]]) -> None:
        """Points of an answering device that failed (an exception for one block, a refused
        data identifier) are left out of its reading, so they stay due; an event says when
        the set of failing points changes, not every cycle."""
        newly, recovered = self.health[name].points_read(
            asked, values, [(points, str(exc)) for points, exc in failures])
        for points, error in newly:
            log.warning("device %s: cannot read %s: %s", name, ", ".join(points), error)
            self.event("points_failed", device=name, points=points, error=error)
        if recovered:
            log.info("device %s: %s read again", name, ", ".join(recovered))
            self.event("points_recovered", device=name, points=recovered)

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
        return float(power) * self._power_to_kw

    def recent_site_kw(self) -> float | None:
        """The main-meter power if read in the last three cycles (at least 3 s): for a decision
        or a record made in a cycle without a fresh reading."""
        return self.site_kw(max_age_s=max(3.0, 3 * self.cfg.poll.interval_s))

    def _sync_load_states(self, fresh: set[str]) -> None:
        now = self.mono()
        for i, (ld, st) in enumerate(zip(self.cfg.loads, self.load_states, strict=True)):
            if ld.device in fresh and ld.kind == "adjustable":
                value = self.latest[ld.device][1].get(ld.point)
                if isinstance(value, bool) or not isinstance(value, int | float) \
                        or not math.isfinite(value):
                    continue
                st.setpoint_pct = float(value) / self._full_scale(i) * 100.0
                if st.shed_by_us and st.setpoint_pct >= st.restore_pct - SETPOINT_TOL_PCT:
                    # back where it was (by hand, or the device's own fallback): not held
                    st.shed_by_us = False
                    self.buffer.clear_shed(ld.name)
            elif ld.device in fresh:
                on = self.latest[ld.device][1].get(ld.point)
                if on is None:
                    continue
                st.is_on = bool(on)
                if st.is_on and st.shed_by_us:
                    # On although we shed it: switched back by hand, or the off-write never
                    # took. Either way we no longer hold it off.
                    st.shed_by_us = False
                    self.buffer.clear_shed(ld.name)
            st.available = self._retry_switch.get(i, 0.0) <= now

    # -- control ------------------------------------------------------------------------------
    async def _switch(self, idx: int, on: bool, site_kw: float | None, reason: str,
                      command_id: str | None) -> bool:
        return (await self._switch_many([(idx, on, reason)], site_kw, command_id))[0]

    async def _switch_many(self, items: list[tuple[int, bool, str]], site_kw: float | None,
                           command_id: str | None) -> list[bool]:
        """Switch on/off loads ``(index, on, reason)``: per device one write per run of adjacent
        coils and one read-back (devices side by side), the buffer updated in one transaction
        each for the shed records and the events. True for each load that took."""
        if not items:
            return []
        if site_kw is None:  # no reading this cycle (a cancel wakes it): the latest recent one
            site_kw = self.recent_site_kw()
        offs = [self.cfg.loads[i].name for i, on, _ in items if not on]
        if offs:
            # Recorded before the write: if it takes effect but the answer is lost, the load
            # is still restored later (and after a restart).
            for i, on, _ in items:
                if not on:
                    self.load_states[i].shed_by_us = True
            self.buffer.set_shed_many(offs, command_id, self.clock())
        by_device: dict[str, dict[str, bool]] = {}
        for i, on, _ in items:
            ld = self.cfg.loads[i]
            by_device.setdefault(ld.device, {})[ld.point] = on

        async def write(device: str, values: dict[str, bool]) -> dict[str, Exception | None]:
            try:
                return await self.devices[device].write_coils(values)
            except Exception as exc:  # a failed switch must never stop the cycle
                return dict.fromkeys(values, exc)

        answers = await asyncio.gather(*(write(d, v) for d, v in by_device.items()))
        errors = dict(zip(by_device, answers, strict=True))
        done: list[bool] = []
        events: list[dict[str, Any]] = []
        back: list[str] = []
        now, ts = self.mono(), self.clock()
        for i, on, reason in items:
            ld, st = self.cfg.loads[i], self.load_states[i]
            exc = errors[ld.device][ld.point]
            if exc is not None:
                self._write_failed(i, "on" if on else "off", exc, command_id, on=on)
                done.append(False)
                continue
            st.is_on = on
            st.last_switch_s = now
            if on:
                st.shed_by_us = False
                back.append(ld.name)
            log.info("%s %s: %s", "restored" if on else "shed", ld.name, reason)
            events.append({"ts": ts, "type": "load_restored" if on else "load_shed",
                           "data": {"load": ld.name, "device": ld.device, "point": ld.point,
                                    "rated_kw": ld.rated_kw,
                                    "site_kw": None if site_kw is None else round(site_kw, 3),
                                    "reason": reason, "command_id": command_id}})
            done.append(True)
        if back:
            self.buffer.clear_shed_many(back)
        if events:
            self._append("events", events)
            if command_id != MODES_OWNER:  # the modes keep their own records (mode_record)
                self._switch_records.append({
                    "due": ts + MODE_RECORD_AFTER_S, "command_id": command_id, "at": ts,
                    "shed": [e["data"]["load"] for e in events if e["type"] == "load_shed"],
                    "restored": [e["data"]["load"] for e in events
                                 if e["type"] == "load_restored"],
                    "site_kw": None if site_kw is None else round(site_kw, 3)})
                self.buffer.save_mode("switch_records", self._switch_records, ts)
        return done

    def _due_switch_records(self) -> None:
        """``control_record``: a cap/DR switching decision again, with the site power two
        minutes after it (the proof that the load stayed off, or came back)."""
        now = self.clock()
        due = [r for r in self._switch_records if r["due"] <= now]
        if not due:
            return
        kw = self.recent_site_kw()
        for r in due:
            self.event("control_record", **{k: v for k, v in r.items() if k != "due"},
                       site_kw_after_2min=None if kw is None else round(kw, 3))
        self._switch_records = [r for r in self._switch_records if r["due"] > now]
        self.buffer.save_mode("switch_records", self._switch_records, now)

    def _write_failed(self, idx: int, what: str, exc: Exception, command_id: str | None,
                      **data: Any) -> None:
        ld, st = self.cfg.loads[idx], self.load_states[idx]
        if isinstance(exc, DriverError):
            error = str(exc)
            log.warning("switching %s %s failed: %s", ld.name, what, error)
        else:  # a bug or a configuration the validation missed: say so, carry on
            error = f"{type(exc).__name__}: {exc}"
            log.exception("switching %s %s failed unexpectedly", ld.name, what)
        self._retry_switch[idx] = self.mono() + SWITCH_RETRY_S
        st.available = False
        self.event("switch_failed", load=ld.name, **data, error=error, command_id=command_id)

    def _full_scale(self, idx: int) -> float:
        return self.cfg.loads[idx].full_scale or 100.0

    async def _set(self, idx: int, pct: float, site_kw: float | None, reason: str,
                   command_id: str | None, quiet: bool = False) -> bool:
        """Write an adjustable load's setpoint (% of its full scale); ``quiet``: a periodic
        rewrite of the same value, logged but not an event."""
        ld, st = self.cfg.loads[idx], self.load_states[idx]
        before = st.setpoint_pct
        if pct < before and not st.shed_by_us:
            # Held from here on, recorded before the write (as for a shed): restored after a
            # restart to the setpoint it had (saved first: a crash between the two leaves an
            # unused setpoint, never a hold without one).
            st.restore_pct, st.shed_by_us = before, True
            self._restore_pcts[ld.name] = round(before, 3)
            self.buffer.save_mode("restore_pct", self._restore_pcts, self.clock())
            self.buffer.set_shed(ld.name, command_id, self.clock())
        value = round(pct / 100.0 * self._full_scale(idx), 4)
        try:
            await self.devices[ld.device].write_point(ld.point, value)
        except Exception as exc:  # a failed write must never stop the cycle
            self._write_failed(idx, f"to {pct:.1f} %", exc, command_id, setpoint_pct=pct)
            return False
        st.setpoint_pct = pct
        self._last_write[idx] = self.mono()
        if not quiet:  # a rewrite of the same value is no switch: min on/off times run on
            st.last_switch_s = self._last_write[idx]
        if st.shed_by_us and pct >= st.restore_pct - 1e-6:
            st.shed_by_us = False
            self.buffer.clear_shed(ld.name)
            self._restore_pcts.pop(ld.name, None)
        if quiet:
            log.debug("%s setpoint rewritten: %.1f %%", ld.name, pct)
            return True
        log.info("%s set to %.1f %%: %s", ld.name, pct, reason)
        self.event("load_adjusted", load=ld.name, device=ld.device, point=ld.point,
                   rated_kw=ld.rated_kw, setpoint_pct=round(pct, 2),
                   from_pct=round(before, 2) if math.isfinite(before) else None,
                   value=value, kw_change=round((pct - before) * ld.rated_kw / 100.0, 3)
                   if math.isfinite(before) else None,
                   site_kw=None if site_kw is None else round(site_kw, 3),
                   reason=reason, command_id=command_id)
        return True

    async def _apply(self, dec: Decision, site: float | None, owner: str | None,
                     restore_only: bool = False, suffix: str = "",
                     shed_only: bool = False) -> list[str]:
        """Carry out a decision's steps in order (the sheds together, then the setpoints, then
        the restores together); the names of the loads shed or lowered. ``restore_only``:
        only what brings load back (a recovering DR event); ``shed_only``: only what takes
        load off (a DR cap still ramping down)."""
        steps = dec.steps()
        if dec.method.startswith("rotation"):
            # a swap is one unit: its restore is the point (max off time), its sheds make room
            restore_only = shed_only = False
        done = []
        sheds = [(i, False, why + suffix) for i, kind, _, why in steps if kind == "shed"]
        if sheds and not restore_only:
            for (i, _, _), ok in zip(sheds, await self._switch_many(sheds, site, owner),
                                     strict=True):
                if ok:
                    done.append(self.cfg.loads[i].name)
        for idx, kind, pct, why in steps:
            if kind != "set":
                continue
            assert pct is not None
            lower = pct < self.load_states[idx].setpoint_pct
            if (restore_only and lower) or (shed_only and not lower):
                continue
            if await self._set(idx, pct, site, why + suffix, owner) and lower:
                done.append(self.cfg.loads[idx].name)
        restores = [(i, True, why + suffix) for i, kind, _, why in steps
                    if kind == "restore" and not shed_only]
        await self._switch_many(restores, site, owner)
        return done

    async def _rewrite_setpoints(self, owner: str | None) -> None:
        """Devices that fall back to a default without fresh writes (an EV charger's validity
        time): the setpoint of a load we hold lowered is written again every ``rewrite_s``."""
        now = self.mono()
        for idx, (ld, st) in enumerate(zip(self.cfg.loads, self.load_states, strict=True)):
            if ld.rewrite_s is not None and st.shed_by_us and st.available \
                    and math.isfinite(st.setpoint_pct) \
                    and now - self._last_write.get(idx, st.last_switch_s) >= ld.rewrite_s:
                await self._set(idx, st.setpoint_pct, None, "rewrite", owner, quiet=True)

    async def _release(self, site: float | None, why: str, command_id: str | None,
                       staggered: bool = True) -> bool:
        """Restore the loads we hold off, most important first; True when none is left off.

        ``staggered``: at most ``control.restore_step_kw`` of rated load (and at least one
        load) per cycle, so the site does not rebound all at once; the rest follow in the next
        cycles. A stopping agent restores everything at once."""
        view = self._cap_view()
        dec = decide_release(self.load_specs, view)
        step, planned = self.cfg.control.restore_step_kw, 0.0
        restores: list[tuple[int, bool, str]] = []
        for idx, kind, pct, _why in dec.steps():
            ld, st = self.cfg.loads[idx], view[idx]
            if kind == "set":
                assert pct is not None
                kw = (pct - st.setpoint_pct) * ld.rated_kw / 100.0
                if not math.isfinite(kw):  # not read since a restart: count it whole
                    kw = ld.rated_kw
            else:
                kw = ld.rated_kw
            if staggered and planned > 0 and planned + kw > step:
                break
            planned += kw
            if kind == "set":
                assert pct is not None
                await self._set(idx, pct, site, f"back to {pct:.1f} %: {why}", command_id)
            else:
                restores.append((idx, True, f"restore {ld.name}: {why}"))
        await self._switch_many(restores, site, command_id)
        return not any(st.shed_by_us for st in self._cap_view())

    def _dr_step(self, site: float | None) -> Target | None:
        """The customer's opt-outs, then one scheduler tick with the baseline now."""
        now = self.clock()
        window = self.cfg.dr.baseline_window_s
        if site is not None:
            self._meter_ring.append((now, site))
        while self._meter_ring and self._meter_ring[0][0] < now - window:
            self._meter_ring.popleft()
        for req_id, event_id, reason, _at in self.buffer.pending_optouts():
            try:
                self.report_dr(self.dr.opt_out(event_id, now, reason))
            except (KeyError, ValueError) as exc:
                why = exc.args[0] if exc.args else str(exc)
                log.warning("opt-out of %s ignored: %s", event_id, why)
                self.event("optout_ignored", event_id=event_id, reason=reason, error=str(why))
            else:
                log.info("DR event %s: opted out locally (%s)", event_id, reason)
            self.buffer.optout_done(req_id)
        times = [t for t, _ in self._meter_ring]
        kws = [p for _, p in self._meter_ring]
        transitions, target = self.dr.tick(now, baseline_before(times, kws, now, window))
        self._delivery_sample(site)
        self.report_dr(transitions)
        return target

    async def control_step(self, fresh: set[str]) -> None:
        self._sync_load_states(fresh)
        self._due_switch_records()
        site = self.site_kw() if self.cfg.control.main_meter in fresh else None
        await self._modes_step(site)
        dr = self.dr_target = self._dr_step(site)
        dr_cap = dr.cap_kw if dr is not None and dr.cap_kw is not None else None
        act = self.active
        now = self.mono()
        if act is not None and act.ending is None and now >= act.end_mono:
            act.ending = "completed"
        if act is not None and act.ending is not None:
            if dr_cap is not None:  # the DR event holds the loads on: it takes them over
                self._finish(act, act.ending, f"loads now held by DR event {dr.event_id}"
                             if dr is not None else "", site)
                act = None
            else:
                if await self._release(site, f"command {act.ending}", act.command_id):
                    self._finish(act, act.ending, "all loads restored", site)
                return
        # the lower cap wins: a cap/shed command and a DR event at the same time
        caps: list[tuple[float, str]] = []
        if act is not None:
            caps.append((act.cap_kw, act.command_id))
        if dr is not None and dr_cap is not None:
            caps.append((dr_cap, dr.event_id))
        if not caps:
            await self._no_cap(site, dr)
            return
        cap, owner = min(caps)
        if dr is not None and owner == dr.event_id:
            self._dr_owner = owner
        if site is None:
            log.warning("no fresh main-meter reading: control holds this cycle")
            return
        params = CapParams(cap_kw=cap, margin_kw=self.cfg.control.margin_kw,
                           hysteresis_kw=self.cfg.control.restore_hysteresis_kw,
                           min_off_s=self.cfg.control.min_off_s,
                           min_on_s=self.cfg.control.min_on_s)
        view = self._cap_view()
        if act is not None and owner == act.command_id and act.loads is not None:
            # only the command's loads may be shed (any load it shed may come back)
            view = [st if i in act.loads else replace(st, available=False)
                    for i, st in enumerate(view)]
        dec = decide_cap(site, now, self.load_specs, view, params)
        shed_only = restore_only = False
        if dr is not None and owner == dr.event_id and dr.ramping:
            shed_only = True  # the cap falls on: restoring now would only flap
        elif dr is not None and dr.recovering and dr.restore_ceiling_kw is not None \
                and not dec.shed and not any(pct < view[i].setpoint_pct
                                             for i, pct in dec.setpoints):
            # a command caps the site while a DR event recovers: loads come back under the
            # lower of the command's cap and the event's rising ceiling
            limit = min(cap - params.margin_kw - params.hysteresis_kw, dr.restore_ceiling_kw)
            params = replace(params, cap_kw=limit, margin_kw=0.0, hysteresis_kw=0.0)
            dec = decide_cap(site, now, self.load_specs, view, params)
            restore_only = True
        done = await self._apply(dec, site, owner, restore_only=restore_only,
                                 shed_only=shed_only)
        await self._rewrite_setpoints(owner)
        if act is not None and not act.executed:
            act.executed = True
            self.result(act.command_id, "executed",
                        detail=f"site {site:.1f} kW, cap {act.cap_kw:.1f} kW, "
                               f"shed: {', '.join(done) or 'nothing needed'}"
                               + (f" (DR event {owner}'s lower cap {cap:.1f} kW applies)"
                                  if owner != act.command_id else ""),
                        site_kw=round(site, 3), cap_kw=act.cap_kw, shed=done)

    async def _no_cap(self, site: float | None, dr: Target | None) -> None:
        """No cap holds: a DR event recovering restores loads paced under its ceiling;
        otherwise every load we hold off comes back."""
        if not any(st.shed_by_us for st in self._cap_view()):
            self._dr_owner = None
            self._mode_freed = False
            return
        if dr is not None and dr.recovering and dr.restore_ceiling_kw is not None:
            if site is None:
                return
            # restore only: a load comes back while site + its rated power ≤ the ceiling
            params = CapParams(cap_kw=dr.restore_ceiling_kw, margin_kw=0.0, hysteresis_kw=0.0,
                               min_off_s=self.cfg.control.min_off_s,
                               min_on_s=self.cfg.control.min_on_s)
            dec = decide_cap(site, self.mono(), self.load_specs, self._cap_view(), params)
            await self._apply(dec, site, dr.event_id, restore_only=True,
                              suffix=f" (DR event {dr.event_id} recovery, ceiling "
                                     f"{dr.restore_ceiling_kw:.1f} kW)")
            await self._rewrite_setpoints(dr.event_id)
            return
        if self._dr_owner is not None:
            state = self.dr.state_of(self._dr_owner) or "ended"
            if await self._release(site, f"DR event {self._dr_owner} {state}", self._dr_owner):
                self._dr_owner = None
            return
        # released by a control mode, or left over from before a restart
        why = ("its round was released by the terminal control modes" if self._mode_freed
               else "no command holds it (shed before the agent restarted)")
        await self._release(site, why, None)

    # -- terminal control modes ---------------------------------------------------------------
    def _cap_view(self) -> list[LoadState]:
        """The loads as the cap/DR controller sees them: a load held off by a tripped round is
        neither its to restore nor to shed (off, not shed by it, unavailable)."""
        if not self._mode_held:
            return self.load_states
        return [LoadState(is_on=False, available=False) if i in self._mode_held else st
                for i, st in enumerate(self.load_states)]

    def _mode_inputs(self, site: float | None) -> modes.CycleInputs:
        now = self.clock()
        day, minute = modes.local_time(now, self.cfg.modes.utc_offset_s)
        energy = self._energy_now()
        if self.link is not None and self.link.connected:
            self._contact_mono = self.mono()
        rounds = {r: sum(self.cfg.loads[i].rated_kw for i in idx) for r, idx in self.rounds.items()}
        return modes.CycleInputs(now_s=now, local_date=day, minute_of_day=minute, site_kw=site,
                                 import_kwh=energy,
                                 since_contact_s=max(0.0, self.mono() - self._contact_mono),
                                 rounds=rounds)

    async def _modes_step(self, site: float | None) -> None:
        """One step of the control modes: persist the state and the decision records, publish
        them, then drive every round's loads to the wanted state."""
        if not self.rounds:
            return
        try:
            state, out = modes.step(self.mode_params, self.mode_state, self._mode_inputs(site))
        except Exception:  # a bug in the modes must not stop the cycle (caps, DR, telemetry)
            log.exception("terminal control modes step failed; rounds stay as they are")
            return
        self.mode_state, self._mode_out = state, out
        now = self.clock()
        for d in out.decisions:
            data = {"round": d.round, "mode": d.mode, "reason": d.reason,
                    "power_kw": None if d.power_kw is None else round(d.power_kw, 3)}
            log.info("mode %s: %s round %s: %s", d.kind, d.mode, d.round, d.reason)
            self.event(f"mode_{d.kind}", **data)
            self._mode_records.append({"due": now + MODE_RECORD_AFTER_S, "kind": d.kind, **data})
        due = [r for r in self._mode_records if r["due"] <= now]
        if due:
            kw = self.recent_site_kw()
            for r in due:
                rec = {k: v for k, v in r.items() if k != "due"}
                self.event("mode_record", **rec,
                           power_kw_after_2min=None if kw is None else round(kw, 3))
            self._mode_records = [r for r in self._mode_records if r["due"] > now]
        # before switching: after a crash the relays are driven to the persisted wanted state
        self.buffer.save_mode("state", state.to_dict(), now)
        if out.decisions or due:
            self.buffer.save_mode("records", self._mode_records, now)
        tripped = set(out.tripped)
        held = {i for r in tripped for i in self.rounds.get(r, [])}
        if self._mode_held - held:
            self._mode_freed = True  # released loads are restored by the staggered release
        self._mode_held = held
        trips: list[tuple[int, bool, str]] = []
        for idx in sorted(held):
            st, ld = self.load_states[idx], self.cfg.loads[idx]
            if st.is_on and st.available:
                trips.append((idx, False, f"round {ld.round} tripped by the terminal control "
                                          "modes"))
            elif not st.shed_by_us:  # already off: ours to restore once the round is released
                st.shed_by_us = True
                self.buffer.set_shed(ld.name, MODES_OWNER, self.clock())
        await self._switch_many(trips, site, MODES_OWNER)

    def _finish(self, act: ActiveControl, status: str, detail: str, site: float | None) -> None:
        self.result(act.command_id, status, detail=detail, cap_kw=act.cap_kw)
        if act.cancel_id:
            self.result(act.cancel_id, "completed", detail=f"{act.command_id} {status}")
        self.event("control_ended", command_id=act.command_id, how=status, site_kw=site)
        if self.active is act:
            self.active = None

    async def _stop_control(self) -> None:
        """On shutdown, no load stays off: restore what the active command shed, and say so.

        A DR event stays in its state (persisted): it resumes control at the next start."""
        act = self.active
        if act is None:
            if any(st.shed_by_us for st in self._cap_view()):
                owner = self._dr_owner
                await self._release(self.site_kw(), "agent stopping" + (
                    f" (DR event {owner} resumes control at the next start)" if owner else ""),
                    owner, staggered=False)
            return
        if await self._release(self.site_kw(), "agent stopping", act.command_id,
                               staggered=False):
            detail = "agent stopped before the command ended; all loads restored"
        else:
            left = [ld.name for ld, st in zip(self.cfg.loads, self._cap_view(), strict=True)
                    if st.shed_by_us]
            detail = (f"agent stopped before the command ended; could not restore "
                      f"{', '.join(left)} (restored at the next start)")
        self._finish(act, "failed", detail, self.site_kw())

    # -- commands -----------------------------------------------------------------------------
    def receive_command(self, payload: bytes) -> None:
        """From the MQTT link (on the loop): queue for the cycle, which owns all control state."""
        self._commands.append(payload)
        self.wake.set()

    def process_commands(self) -> None:
        while self._commands:
            self.handle_command(self._commands.popleft())

    def handle_command(self, payload: bytes) -> None:
        now = self.clock()
        sec = self.cfg.security
        try:
            cmd = verify_command(payload, self.public_key, self.terminal, now,
                                 sec.clock_skew_s, sec.max_lifetime_s)
        except Refusal as r:
            if r.reason in ("malformed", "bad_signature"):
                # The id is unauthenticated: never answer under it, or anyone could make a
                # live command look refused. It is given for diagnosis only.
                self.result(None, "rejected", r.reason, r.detail, claimed_id=r.command_id)
            else:
                self.result(r.command_id, "rejected", r.reason, r.detail)
            return
        if self.buffer.command_seen(cmd.id):
            self.result(cmd.id, "rejected", "replayed",
                        "this command id was received before (a duplicate delivery never "
                        "changes the original command)")
            return
        if self.stopping:  # not remembered: the platform may send it again after the restart
            self.result(cmd.id, "rejected", "unavailable", "the terminal is stopping")
            return
        self.buffer.remember_command(cmd.id, cmd.expires_at, now)
        try:
            self._start_command(cmd, now)
        except Refusal as r:
            self.result(cmd.id, "rejected", r.reason, r.detail)

    def _start_command(self, cmd: Command, now: float) -> None:
        mono = self.mono()
        self._contact_mono = mono
        if isinstance(cmd, ModesCommand | RemoteCommand | GuaranteeCommand):
            self._mode_command(cmd, now)
            return
        if isinstance(cmd, DrEventCommand):
            self._receive_dr(cmd, now)
            return
        if isinstance(cmd, CancelCommand) and self.dr.state_of(cmd.target) is not None:
            state = self.dr.state_of(cmd.target)
            if state in ("completed", "cancelled", "superseded", "opted_out", "expired"):
                raise Refusal("unknown_target", f"DR event {cmd.target!r} is already {state}")
            self.result(cmd.id, "accepted", detail=f"cancelling DR event {cmd.target}")
            self.report_dr(self.dr.cancel(cmd.target, now, f"command {cmd.id}"))
            self.result(cmd.id, "completed", detail=f"DR event {cmd.target} cancelled")
            return
        if isinstance(cmd, CancelCommand):
            if self.active is None or self.active.command_id != cmd.target \
                    or self.active.ending is not None:
                raise Refusal("unknown_target", f"no active control with id {cmd.target!r}")
            self.result(cmd.id, "accepted", detail=f"cancelling {cmd.target}")
            self.active.ending = "cancelled"
            self.active.cancel_id = cmd.id
            return
        assert isinstance(cmd, ShedCommand | CapCommand)
        allowed = self._allowed_loads(cmd.loads)
        if isinstance(cmd, ShedCommand):
            site = self.recent_site_kw()
            if site is None:
                raise Refusal("unavailable", "no recent main-meter reading to shed from")
            cap, duration = site - cmd.shed_kw, cmd.duration_s
            if cap <= 0:
                raise Refusal("invalid", f"shed_kw {cmd.shed_kw:g} exceeds the site's "
                              f"{site:.1f} kW import")
            detail = f"shed {cmd.shed_kw:g} kW from {site:.1f} kW: cap {cap:.1f} kW"
        else:
            cap = cmd.cap_kw
            duration = cmd.duration_s if cmd.duration_s is not None else (cmd.until or now) - now
            if duration <= 0:
                raise Refusal("expired", "the cap's end time has passed")
            detail = f"cap {cap:g} kW"
        detail += f" for {duration:.0f} s"
        if cmd.loads is not None:
            detail += f", shedding only {', '.join(cmd.loads)}"
        old = self.active
        if old is not None:
            # The new command takes over the loads the old one shed.
            self._finish(old, "superseded", f"by {cmd.id}", self.site_kw())
        # Control needs the site's power now: the main meter is retried at once, and its power
        # point is due in this very cycle even if it was read a moment ago (else the first
        # switch would wait for the next cycle).
        self.health[self.cfg.control.main_meter].next_attempt = mono
        self._last_read[self.cfg.control.main_meter].pop(self.cfg.control.power_point, None)
        self.result(cmd.id, "accepted", detail=detail, cap_kw=round(cap, 3),
                    end_at=round(now + duration, 3))
        self.active = ActiveControl(cmd.id, cmd.type, cap, mono + duration, loads=allowed)
        self.event("control_started", command_id=cmd.id, kind=cmd.type, cap_kw=round(cap, 3),
                   end_at=round(now + duration, 3))

    def _allowed_loads(self, names: list[str] | None) -> frozenset[int] | None:
        """A command's ``loads`` as indices; Refusal for an unknown or a critical load."""
        if names is None:
            return None
        index = {ld.name: i for i, ld in enumerate(self.cfg.loads)}
        unknown = [n for n in names if n not in index]
        if unknown:
            known = ", ".join(index) or "none"
            raise Refusal("invalid", f"unknown load {', '.join(map(repr, unknown))} (this "
                          f"terminal's loads: {known})")
        critical = [n for n in names if self.cfg.loads[index[n]].critical]
        if critical:
            raise Refusal("invalid", f"load {', '.join(map(repr, critical))} is critical: "
                          "never shed")
        return frozenset(index[n] for n in names)

    def _mode_command(self, cmd: ModesCommand | RemoteCommand | GuaranteeCommand, now: float) -> None:
        """Change the stored mode parameters; the next control cycle acts on them. Every
        command is addressed to this terminal alone, so exclusion (剔除, which ignores group
        commands) never refuses one."""
        current = self.mode_params.to_dict()
        if isinstance(cmd, ModesCommand):
            update, detail = cmd.params, f"mode parameters set: {', '.join(sorted(cmd.params))}"
        elif isinstance(cmd, RemoteCommand):
            order = {"round": cmd.round, "action": cmd.action, "issued_s": now,
                     "alarm_delay_min": cmd.alarm_delay_min, "limit_half_hours": cmd.limit_half_hours}
            others = [o for o in current["remote"] if o["round"] != cmd.round]
            update = {"remote": [*others, order]}
            detail = (f"remote {cmd.action} of round {cmd.round}"
                      + (f" after {cmd.alarm_delay_min} min of alarm" if cmd.action == "trip" else ""))
            if cmd.round not in self.rounds:
                raise Refusal("invalid", f"round {cmd.round} has no load on this terminal")
        else:
            g: dict[str, Any] = {"on": cmd.on, "issued_s": now,
                                 "duration_half_hours": cmd.duration_half_hours}
            if cmd.auto_after_h is not None:
                g["auto_after_h"] = cmd.auto_after_h
            update, detail = {"guarantee": g}, f"power guarantee {'on' if cmd.on else 'off'}"
        try:
            params = modes.ModeParams.from_dict(_merge(current, update))
        except ValueError as exc:
            raise Refusal("invalid", str(exc)) from None
        self.buffer.save_mode("params", params.to_dict(), now)
        self.mode_params = params
        # the next cycle acts with a fresh main-meter reading (its decisions carry the power)
        self.health[self.cfg.control.main_meter].next_attempt = self.mono()
        self._last_read[self.cfg.control.main_meter].pop(self.cfg.control.power_point, None)
        self.wake.set()
        self.result(cmd.id, "accepted", detail=detail)
        self.result(cmd.id, "completed", detail=f"{detail}; the control modes act on it from the "
                    "next cycle")

    def _receive_dr(self, cmd: DrEventCommand, now: float) -> None:
        try:
            ev = DrEvent(id=cmd.id, issued_at=cmd.issued_at, start=cmd.start,
                         duration_s=cmd.duration_s, signal=cmd.signal, value=cmd.value,
                         randomize_s=cmd.randomize_s, ramp_s=cmd.ramp_s,
                         recovery_s=cmd.recovery_s, expires_at=cmd.expires_at)
        except ValueError as exc:
            raise Refusal("invalid", str(exc)) from None
        if ev.signal == "level" and ev.value > 0 and int(ev.value) not in self.dr.level_fractions:
            raise Refusal("invalid", f"level {ev.value:g} has no reduction fraction configured "
                          "(dr.level_fractions)")
        try:
            transitions = self.dr.receive(ev, now)
        except ValueError as exc:
            raise Refusal("invalid", str(exc)) from None
        self.health[self.cfg.control.main_meter].next_attempt = self.mono()
        self.result(cmd.id, "accepted", detail=f"DR event: {ev.describe()}")
        self.report_dr(transitions)

    # -- sync -----------------------------------------------------------------------------
    def _publish_batch(self, stream: str, batch: tuple[int, int, str],
                       historical: bool) -> MQTTMessageInfo:
        """One message of consecutive records. Their stored JSON bodies were joined by the
        buffer (:meth:`Buffer.pending_batch`), never decoded and encoded again."""
        assert self.link is not None
        payload = (f'{{"terminal":{json.dumps(self.terminal)},"stream":"{stream}",'
                   f'"historical":{"true" if historical else "false"},"records":[{batch[2]}]}}')
        return self.link.publish(self.topics.for_stream(stream), payload)

    async def sync_loop(self, stop: asyncio.Event) -> None:
        link = self.link
        assert link is not None
        sc = self.cfg.sync
        # sync.max_inflight messages on the wire (the link's window); as many again handed to
        # paho, ready to go the moment an acknowledgement frees a slot (no round trip through
        # this task per message)
        syncer = self.syncer = Syncer(self.buffer, self._publish_batch, sc.max_batch,
                                      2 * sc.max_inflight, sc.backlog_rate)
        gen = -1
        try:
            while True:
                self.sync_wake.clear()  # before looking: a wake-up from now on is not lost
                if link.connected:
                    if link.generation != gen:  # new connection: resend what is unacknowledged
                        gen = link.generation
                        syncer.connected()
                    syncer.collect_acks()
                    syncer.send_pending(backlog=not stop.is_set())  # stopping: no new history
                else:
                    syncer.collect_acks()  # acknowledged before the connection dropped
                if stop.is_set() and not syncer.inflight:
                    return
                wait = syncer.wait_s() if link.connected else 0.5
                try:
                    await asyncio.wait_for(self.sync_wake.wait(), 0.5 if wait is None else wait)
                except TimeoutError:
                    pass
        finally:
            syncer.save_acks()

    # -- main ------------------------------------------------------------------------------
    async def cycle_loop(self, stop: asyncio.Event) -> None:
        interval = self.cfg.poll.interval_s
        next_at = time.monotonic()
        while not stop.is_set():
            self._cycle_deadline = self.mono() + interval
            self.process_commands()
            fresh = await self.poll_devices()
            await self.control_step(fresh)
            self._housekeeping()
            next_at = max(next_at + interval, time.monotonic())
            self.wake.clear()
            if self._commands:
                continue
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, next_at - time.monotonic()))
                next_at = time.monotonic()
            except TimeoutError:
                pass

    def _housekeeping(self) -> None:
        if self.mono() - self._last_prune < 60.0:
            return
        self._last_prune = self.mono()
        n = self.buffer.prune_delivered(self.clock() - self.cfg.buffer.keep_delivered_h * 3600)
        if n:
            log.debug("pruned %d delivered records", n)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        warmup()  # loads the compiled kernels from numba's disk cache: no compile mid-command
        self.link = MqttLink(self.cfg.mqtt, self.terminal, self.topics, loop,
                             self.receive_command, self.status_payload,
                             inflight_window=self.cfg.sync.max_inflight)
        self.event("agent_started", version=lmt_version(), config_hash=self.config_hash)
        self.link.on_ack = self.sync_wake.set
        # the sync refills in steps of a quarter window: wake it about as often
        self.link.ack_wake_every = max(1, self.cfg.sync.max_inflight // 4)
        self.link.start()
        log.info("terminal %s started: %d devices, %d loads, broker %s:%d", self.terminal,
                 len(self.devices), len(self.load_specs), self.cfg.mqtt.host, self.cfg.mqtt.port)
        sync_stop = asyncio.Event()
        sync = asyncio.create_task(self.sync_loop(sync_stop))
        failed: list[BaseException] = []

        def sync_ended(task: asyncio.Task[None]) -> None:
            # The sync never ends by itself: if it failed (the buffer unreadable, say), stop
            # the agent with an error, so the service manager restarts it, rather than keep
            # polling while nothing is published.
            if task.cancelled() or sync_stop.is_set() or task.exception() is None:
                return
            exc = task.exception()
            assert exc is not None
            log.error("the sync task failed: %s: %s; stopping", type(exc).__name__, exc,
                      exc_info=exc)
            failed.append(exc)
            stop.set()

        async def wake_on_stop() -> None:  # a stop (SIGTERM) ends the cycle's wait at once
            await stop.wait()
            self.wake.set()

        sync.add_done_callback(sync_ended)
        waker = asyncio.create_task(wake_on_stop())
        try:
            await self.cycle_loop(stop)
        finally:
            waker.cancel()
            await self._stop_polling()
            self.stopping = True
            self.link.unsubscribe_commands()
            self.process_commands()  # answered: rejected, the terminal is stopping
            await self._stop_control()
            self.flush_readings()
            sync_stop.set()
            self.sync_wake.set()
            try:
                await asyncio.wait_for(sync, 3.0)
            except TimeoutError:
                log.warning("stopping with unacknowledged messages; they stay in the buffer")
                sync.cancel()
            except Exception:  # already logged by sync_ended
                pass
            self.link.stop()
            for transport in self.transports:
                transport.close()
            self.buffer.close()
            log.info("terminal %s stopped", self.terminal)
        if failed:
            raise AgentFailed(f"the sync task failed: {type(failed[0]).__name__}: {failed[0]}")
