"""The agent daemon: poll devices, buffer everything, sync to MQTT, carry out signed commands.

One asyncio loop runs three tasks:
- the cycle: read every device (coalesced block reads), buffer the readings, and when a
  command is active run one closed-loop control step on the fresh main-meter reading;
- the sync: publish buffered records in sequence order at QoS 1, and move each stream's
  delivered watermark only when the broker acknowledged;
- commands arrive from paho's thread and are verified and answered on the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paho.mqtt.client import MQTT_ERR_SUCCESS, MQTTMessageInfo

from lmt.config.agent import AgentConfig
from lmt.config.profiles import load_profile
from lmt.control import CapParams, LoadSpec, LoadState, decide_cap, decide_release, warmup
from lmt.drivers.errors import DriverError
from lmt.drivers.modbus_tcp import ModbusDevice, ModbusTcpBus

from . import lmt_version
from .buffer import STREAMS, Buffer, Record
from .messages import CancelCommand, CapCommand, Command, ShedCommand, Status
from .mqtt import MqttLink, Topics
from .security import Refusal, load_public_key, verify_command

log = logging.getLogger("lmt.agent")


@dataclass
class DeviceHealth:
    online: bool = True
    failures: int = 0
    next_retry: float = 0.0
    last_error: str = ""

    def backoff_s(self) -> float:
        return min(30.0, 0.5 * 2 ** min(self.failures, 8))


@dataclass
class ActiveControl:
    command_id: str
    kind: str
    cap_kw: float
    end_at: float
    executed: bool = False
    ending: str | None = None  # None, "completed" or "cancelled"
    cancel_id: str | None = None
    started_kw: float | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.terminal = cfg.terminal.id
        self.topics = Topics(cfg.mqtt.topic_prefix, self.terminal)
        raw = config_path.read_bytes() if config_path else cfg.model_dump_json().encode()
        self.config_hash = hashlib.sha256(raw).hexdigest()
        self.session = int(time.time() * 1000)
        self.public_key = load_public_key(cfg.security.platform_public_key)
        self.buffer = Buffer(cfg.buffer.path)
        buses: dict[tuple[str, int], ModbusTcpBus] = {}
        self.devices: dict[str, ModbusDevice] = {}
        for d in cfg.devices:
            bus = buses.setdefault((d.host, d.port),
                                   ModbusTcpBus(d.host, d.port, cfg.poll.timeout_s))
            self.devices[d.name] = ModbusDevice(d.name, bus, d.device_id, load_profile(d.profile))
        self.buses = list(buses.values())
        self.health = {name: DeviceHealth() for name in self.devices}
        self.latest: dict[str, tuple[float, dict[str, float | bool]]] = {}
        meter = self.devices[cfg.control.main_meter].profile.point(cfg.control.power_point)
        self._power_to_kw = 0.001 if meter.unit == "W" else 1.0
        self.load_specs = [LoadSpec(ld.name, ld.rated_kw, ld.priority, ld.critical)
                           for ld in cfg.loads]
        self.load_states = [LoadState(is_on=True) for _ in cfg.loads]
        self.active: ActiveControl | None = None
        self._pending_readings: list[dict[str, Any]] = []
        self._last_flush = 0.0
        self.wake = asyncio.Event()
        self.sync_wake = asyncio.Event()
        self.link: MqttLink | None = None

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

    def flush_readings(self) -> None:
        if self._pending_readings:
            self._append("telemetry", self._pending_readings)
            self._pending_readings = []
        self._last_flush = self.clock()

    def status_payload(self, online: bool) -> str:
        return Status(terminal=self.terminal, online=online, ts=self.clock(),
                      version=lmt_version(), config_hash=self.config_hash,
                      devices=list(self.devices), session=self.session).model_dump_json()

    # -- polling ------------------------------------------------------------------------------
    async def poll_devices(self, now: float) -> set[str]:
        """Read every device that is due; return the names read successfully."""
        fresh: set[str] = set()
        for name, dev in self.devices.items():
            h = self.health[name]
            if not h.online and now < h.next_retry:
                continue
            try:
                values = await asyncio.wait_for(dev.read_points(),
                                                self.cfg.poll.timeout_s * 3)
            except (DriverError, TimeoutError) as exc:
                h.failures += 1
                h.last_error = str(exc)
                h.next_retry = now + h.backoff_s()
                if h.online:
                    h.online = False
                    log.warning("device %s offline: %s", name, exc)
                    self.event("device_offline", device=name, error=str(exc))
                continue
            if not h.online:
                log.info("device %s back online", name)
                self.event("device_online", device=name, after_failures=h.failures)
            h.online, h.failures = True, 0
            self.latest[name] = (now, values)
            self._pending_readings.append({"ts": now, "device": name, "values": values})
            fresh.add(name)
        # Write the batch now if holding it until the next cycle would pass the flush interval.
        if now + self.cfg.poll.interval_s > self._last_flush + self.cfg.buffer.flush_interval_s:
            self.flush_readings()
        return fresh

    def site_kw(self, max_age_s: float | None = None) -> float | None:
        got = self.latest.get(self.cfg.control.main_meter)
        if got is None:
            return None
        ts, values = got
        if max_age_s is not None and self.clock() - ts > max_age_s:
            return None
        return float(values[self.cfg.control.power_point]) * self._power_to_kw

    def _sync_load_states(self, fresh: set[str]) -> None:
        for ld, st in zip(self.cfg.loads, self.load_states, strict=True):
            if ld.device in fresh:
                st.is_on = bool(self.latest[ld.device][1][ld.point])

    # -- control ------------------------------------------------------------------------------
    async def _switch(self, idx: int, on: bool, now: float, site_kw: float | None,
                      reason: str) -> bool:
        ld = self.cfg.loads[idx]
        st = self.load_states[idx]
        try:
            await self.devices[ld.device].write_coil(ld.point, on)
        except DriverError as exc:
            log.warning("switching %s %s failed: %s", ld.name, "on" if on else "off", exc)
            self.event("switch_failed", load=ld.name, on=on, error=str(exc))
            return False
        st.is_on = on
        st.shed_by_us = not on
        st.last_switch_s = now
        cid = self.active.command_id if self.active else None
        action = {"load": ld.name, "device": ld.device, "point": ld.point,
                  "rated_kw": ld.rated_kw, "site_kw": None if site_kw is None else round(site_kw, 3),
                  "reason": reason, "command_id": cid}
        log.info("%s %s: %s", "restored" if on else "shed", ld.name, reason)
        self.event("load_restored" if on else "load_shed", **action)
        if self.active:
            self.active.actions.append({"load": ld.name, "on": on})
        return True

    async def control_step(self, now: float, fresh: set[str]) -> None:
        act = self.active
        if act is None:
            return
        self._sync_load_states(fresh)
        site = self.site_kw() if self.cfg.control.main_meter in fresh else None
        if act.ending is None and now >= act.end_at:
            act.ending = "completed"
        if act.ending is not None:
            dec = decide_release(self.load_specs, self.load_states)
            for idx, why in zip(dec.restore, dec.reasons, strict=False):
                await self._switch(idx, True, now, site, why)
            if not any(st.shed_by_us for st in self.load_states):
                self.result(act.command_id, act.ending, detail="all loads restored",
                            site_kw=site, cap_kw=act.cap_kw)
                if act.cancel_id:
                    self.result(act.cancel_id, "completed", detail=f"{act.command_id} cancelled")
                self.event("control_ended", command_id=act.command_id, how=act.ending,
                           site_kw=site)
                self.active = None
            return
        if site is None:
            log.warning("no fresh main-meter reading: control holds this cycle")
            return
        params = CapParams(cap_kw=act.cap_kw, margin_kw=self.cfg.control.margin_kw,
                           hysteresis_kw=self.cfg.control.restore_hysteresis_kw,
                           min_off_s=self.cfg.control.min_off_s,
                           min_on_s=self.cfg.control.min_on_s)
        dec = decide_cap(site, now, self.load_specs, self.load_states, params)
        actions = [(i, False) for i in dec.shed] + [(i, True) for i in dec.restore]
        for (idx, on), why in zip(actions, dec.reasons, strict=False):
            await self._switch(idx, on, now, site, why)
        if not act.executed:
            act.executed = True
            shed = [self.cfg.loads[i].name for i in dec.shed]
            self.result(act.command_id, "executed",
                        detail=f"site {site:.1f} kW, cap {act.cap_kw:.1f} kW, "
                               f"shed: {', '.join(shed) or 'nothing needed'}",
                        site_kw=round(site, 3), cap_kw=act.cap_kw, shed=shed)

    async def _stop_control(self) -> None:
        """On shutdown, no load stays off: restore what the active command shed, and say so."""
        act = self.active
        if act is None:
            return
        now = self.clock()
        dec = decide_release(self.load_specs, self.load_states)
        for idx in dec.restore:
            await self._switch(idx, True, now, self.site_kw(), "agent stopping: command ended early")
        left = [ld.name for ld, st in zip(self.cfg.loads, self.load_states, strict=True)
                if st.shed_by_us]
        detail = "agent stopped before the command ended; " + (
            f"could not restore {', '.join(left)}" if left else "all loads restored")
        self.result(act.command_id, "failed", detail=detail)
        if act.cancel_id:
            self.result(act.cancel_id, "completed", detail=f"{act.command_id} ended")
        self.event("control_ended", command_id=act.command_id, how="agent_stopped",
                   site_kw=self.site_kw())
        self.active = None

    # -- commands -----------------------------------------------------------------------------
    def handle_command(self, payload: bytes) -> None:
        now = self.clock()
        sec = self.cfg.security
        try:
            cmd = verify_command(payload, self.public_key, self.terminal, now,
                                 sec.clock_skew_s, sec.max_lifetime_s)
        except Refusal as r:
            self.result(r.command_id, "rejected", r.reason, r.detail)
            return
        if self.buffer.command_seen(cmd.id):
            self.result(cmd.id, "rejected", "replayed", "this command id was received before")
            return
        self.buffer.remember_command(cmd.id, cmd.expires_at, now)
        try:
            self._start_command(cmd, now)
        except Refusal as r:
            self.result(cmd.id, "rejected", r.reason, r.detail)
            return
        self.wake.set()

    def _start_command(self, cmd: Command, now: float) -> None:
        if isinstance(cmd, CancelCommand):
            if self.active is None or self.active.command_id != cmd.target \
                    or self.active.ending is not None:
                raise Refusal("unknown_target", f"no active control with id {cmd.target!r}")
            self.result(cmd.id, "accepted", detail=f"cancelling {cmd.target}")
            self.active.ending = "cancelled"
            self.active.cancel_id = cmd.id
            return
        if isinstance(cmd, ShedCommand):
            site = self.site_kw(max_age_s=max(3.0, 3 * self.cfg.poll.interval_s))
            if site is None:
                raise Refusal("unavailable", "no recent main-meter reading to shed from")
            cap, end = site - cmd.shed_kw, now + cmd.duration_s
            if cap <= 0:
                raise Refusal("invalid", f"shed_kw {cmd.shed_kw} exceeds the site's "
                              f"{site:.1f} kW import")
            detail = f"shed {cmd.shed_kw:g} kW from {site:.1f} kW: cap {cap:.1f} kW"
        else:
            assert isinstance(cmd, CapCommand)
            cap = cmd.cap_kw
            end = cmd.until if cmd.until is not None else now + (cmd.duration_s or 0.0)
            if end <= now:
                raise Refusal("expired", "the cap's end time has passed")
            detail = f"cap {cap:g} kW"
        detail += f" for {end - now:.0f} s"
        old = self.active
        if old is not None:
            # The new command takes over the loads the old one shed; the old one gets its
            # final answer now (and a pending cancel of it is done).
            self.result(old.command_id, "superseded", detail=f"by {cmd.id}")
            if old.cancel_id:
                self.result(old.cancel_id, "completed", detail=f"{old.command_id} superseded")
        self.result(cmd.id, "accepted", detail=detail, cap_kw=round(cap, 3), end_at=end)
        self.active = ActiveControl(cmd.id, cmd.type, cap, end)
        self.event("control_started", command_id=cmd.id, kind=cmd.type, cap_kw=round(cap, 3),
                   end_at=end)

    # -- sync -----------------------------------------------------------------------------
    def _batch_payload(self, stream: str, recs: list[Record], now: float) -> str:
        historical = now - recs[-1].ts > max(10.0, 5 * self.cfg.poll.interval_s)
        return json.dumps({
            "terminal": self.terminal, "stream": stream, "historical": historical,
            "records": [{"seq": r.seq, **r.body} for r in recs],
        }, separators=(",", ":"))

    async def sync_loop(self, stop: asyncio.Event) -> None:
        link = self.link
        assert link is not None
        inflight: dict[str, deque[tuple[int, MQTTMessageInfo]]] = {s: deque() for s in STREAMS}
        sent = {s: self.buffer.delivered_seq(s) for s in STREAMS}
        gen = -1
        while True:
            if link.connected:
                if link.generation != gen:  # new connection: resend all that is unacknowledged
                    gen = link.generation
                    for s in STREAMS:
                        inflight[s].clear()
                        sent[s] = self.buffer.delivered_seq(s)
                self._collect_acks(inflight)
                self._send_pending(inflight, sent)
            if stop.is_set() and not any(inflight.values()):
                return
            busy = any(inflight.values())
            self.sync_wake.clear()
            try:
                await asyncio.wait_for(self.sync_wake.wait(), 0.02 if busy else 0.5)
            except TimeoutError:
                pass

    def _collect_acks(self, inflight: dict[str, deque[tuple[int, MQTTMessageInfo]]]) -> None:
        for s, q in inflight.items():
            upto = None
            while q and q[0][1].is_published():
                upto = q.popleft()[0]
            if upto is not None:
                self.buffer.mark_delivered(s, upto)

    def _send_pending(self, inflight: dict[str, deque[tuple[int, MQTTMessageInfo]]],
                      sent: dict[str, int]) -> None:
        assert self.link is not None
        total = sum(len(q) for q in inflight.values())
        now = self.clock()
        for s in STREAMS:  # results first, then events, then telemetry
            while total < self.cfg.sync.max_inflight:
                recs = self.buffer.pending(s, sent[s], self.cfg.sync.max_batch)
                if not recs:
                    break
                info = self.link.publish(self.topics.for_stream(s),
                                         self._batch_payload(s, recs, now))
                if info.rc != MQTT_ERR_SUCCESS:
                    return
                inflight[s].append((recs[-1].seq, info))
                sent[s] = recs[-1].seq
                total += 1

    # -- main ------------------------------------------------------------------------------
    async def cycle_loop(self, stop: asyncio.Event) -> None:
        interval = self.cfg.poll.interval_s
        next_at = time.monotonic()
        while not stop.is_set():
            now = self.clock()
            fresh = await self.poll_devices(now)
            await self.control_step(now, fresh)
            next_at = max(next_at + interval, time.monotonic())
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, next_at - time.monotonic()))
                next_at = time.monotonic()
            except TimeoutError:
                pass

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        warmup()  # loads the compiled kernels from numba's disk cache: no compile mid-command
        self.link = MqttLink(self.cfg.mqtt, self.terminal, self.topics, loop,
                             self.handle_command, self.status_payload)
        self.event("agent_started", version=lmt_version(), config_hash=self.config_hash)
        self.link.start()
        log.info("terminal %s started: %d devices, %d loads, broker %s:%d", self.terminal,
                 len(self.devices), len(self.load_specs), self.cfg.mqtt.host, self.cfg.mqtt.port)
        sync_stop = asyncio.Event()
        sync = asyncio.create_task(self.sync_loop(sync_stop))
        try:
            await self.cycle_loop(stop)
        finally:
            await self._stop_control()
            self.flush_readings()
            sync_stop.set()
            self.sync_wake.set()
            try:
                await asyncio.wait_for(sync, 3.0)
            except TimeoutError:
                log.warning("stopping with unacknowledged messages; they stay in the buffer")
                sync.cancel()
            self.link.stop()
            for bus in self.buses:
                bus.close()
            self.buffer.close()
            log.info("terminal %s stopped", self.terminal)
