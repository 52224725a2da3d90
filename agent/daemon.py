"""The agent daemon: wiring, and its two loops. It reads, persists, actuates and publishes;
every decision is the control supervisor's (:mod:`lmt.control.supervisor`).

One asyncio loop runs two tasks:

- the cycle (every ``poll.interval_s``, and at once when a verified command arrives):
  commands verified (:mod:`lmt.agent.commands`) → devices read (:mod:`lmt.agent.poller`; a
  transport's readings go to the outbox as soon as it is done) → one supervisor ``step`` on
  this cycle's readings and requests → its state and records saved in one transaction →
  its actions carried out (:mod:`lmt.agent.actuator`) → ``outcome`` folded in and saved;
- the sync (:mod:`lmt.agent.sync`): publish the outbox in sequence order at QoS 1, and move
  each stream's delivered watermark only when the broker acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from paho.mqtt.client import MQTTMessageInfo

from lmt.config.agent import AgentConfig
from lmt.control import supervisor, warmup
from lmt.control.supervisor import VOLATILE, Inputs, OptOut, Request, SupervisorState

from . import lmt_version
from .actuator import Actuator
from .buffer import BufferFile, BufferUnwritable
from .commands import BUDGET_SHARE, Intake, LedgerRequest
from .degraded import RETRY_S, start_degraded, take_up
from .derive import load_state, supervisor_config
from .devices import build_devices
from .ledger import LedgerRunner, LedgerSize
from .messages import Status, validate_body
from .mqtt import MqttLink, Topics
from .outbox import Outbox
from .poller import Poller, PollResult
from .security import load_public_key
from .state_store import StateStore, dumps
from .sync import Syncer

log = logging.getLogger("lmt.agent")

SAVE_EVERY_S = 60.0  # the state's volatile parts (the clock, the baseline) are saved this often
_WARN = {"load_unresponsive", "cap_unmet", "control_fault", "switch_failed", "commands_dropped",
         "ledger_fault"}


class AgentFailed(RuntimeError):
    """The agent stopped because one of its tasks failed (the service should restart it)."""


class Agent:
    def __init__(self, cfg: AgentConfig, config_path: Path | None = None,
                 clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock  # wall clock: timestamps, command validity, DR windows
        self.mono = mono  # monotonic clock: control timing, deadlines, back-off
        self.terminal = cfg.terminal.id
        self.topics = Topics(cfg.mqtt.topic_prefix, self.terminal)
        raw = config_path.read_bytes() if config_path else cfg.model_dump_json().encode()
        self.config_hash = hashlib.sha256(raw).hexdigest()
        self.session = int(time.time() * 1000)
        public_key = load_public_key(cfg.security.platform_public_key)
        try:
            self.file = BufferFile(cfg.buffer.path)
            try:
                self.ledger_size: LedgerSize | None = LedgerSize(self.file)
                self.outbox = Outbox(self.file, max_mb=cfg.buffer.max_mb,
                                     exempt_bytes=self.ledger_size)
            except BaseException:
                self.file.close()
                raise
        except BufferUnwritable as exc:  # the disk is full: control goes on, in memory
            self.ledger_size = None
            self.file, self.outbox = start_degraded(cfg.buffer.path, cfg.buffer.max_mb,
                                                    str(exc), clock())
        self.store = StateStore(self.file)
        self.devices, self.transports = build_devices(cfg)
        self.poller = Poller(cfg, self.devices, self.append, clock, mono)
        self.actuator = Actuator(cfg, self.devices)
        self.intake = Intake(cfg.security, public_key, self.terminal, self.store, self.append,
                             clock, budget_s=BUDGET_SHARE * cfg.poll.interval_s, mono=mono)
        self.control = supervisor_config(cfg)
        self.ledger = LedgerRunner(cfg, {n: d.profile for n, d in self.devices.items()},
                                   self.file, self.outbox, self.store, str(self.session),
                                   self.append, self.ledger_size) if cfg.ledger_meters() else None
        self._ledger_failed: str | None = None
        self.state: SupervisorState = load_state(self.store, self.control, clock())
        main = self.devices[cfg.control.main_meter].profile
        self._energy_point = cfg.modes.energy_point if main.has_point(cfg.modes.energy_point) \
            else None
        self._saved: str | None = None
        self._saved_at = -math.inf
        self._last_prune = mono()
        self._last_take_up = mono()
        self.stopping = False
        self.wake = asyncio.Event()
        self.sync_wake = asyncio.Event()
        self.link: MqttLink | None = None
        self.syncer: Syncer | None = None

    # -- what the tests and the field tools look at -----------------------------------------
    @property
    def health(self) -> dict[str, Any]:
        return self.poller.health

    @property
    def latest(self) -> dict[str, tuple[float, dict[str, float | bool | None]]]:
        return self.poller.latest

    def site_kw(self, max_age_s: float | None = None) -> float | None:
        return self.poller.site_kw(max_age_s)

    @property
    def mode_state(self) -> Any:
        return self.state.mode_state

    @property
    def mode_params(self) -> Any:
        return self.state.mode_params

    def close(self) -> None:
        """Release the buffer and the transports of an agent that was made but not run."""
        for transport in self.transports:
            transport.close()
        self.outbox.close()
        self.file.close()

    # -- records ------------------------------------------------------------------------------
    def append(self, stream: str, bodies: list[dict[str, Any]]) -> None:
        if self.outbox.append(stream, bodies):
            self.sync_wake.set()

    def commit(self, state: SupervisorState, records: Sequence[supervisor.Record],
               optouts: Sequence[int] = (), seen: Sequence[tuple[str, float, float]] = ()
               ) -> None:
        """Save the supervisor's state, its records, the optouts it took and the ids of the
        commands it answered, in one transaction. The state is written when more than its
        volatile parts changed (or a minute passed)."""
        if state is self.state and not (records or optouts or seen) \
                and self.mono() - self._saved_at < SAVE_EVERY_S:
            return  # the very state saved just before (an outcome with nothing to fold)
        self.state = state
        d = state.to_dict()
        key = dumps({k: v for k, v in d.items() if k not in VOLATILE})
        now = self.clock()
        due = key != self._saved or self.mono() - self._saved_at >= SAVE_EVERY_S
        if not (due or records or optouts or seen):
            return
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_stream.setdefault(r.stream, []).append(validate_body(r.stream, r.body))
            _log_record(r)
        with self.outbox.transaction():
            self.store.save_text("supervisor", dumps(d), now)
            self.store.optouts_done(optouts)
            self.store.remember_commands(list(seen))
            for stream in ("results", "events"):
                if stream in by_stream:
                    self.append(stream, by_stream[stream])
        self._saved, self._saved_at = key, self.mono()

    def status_payload(self, online: bool) -> str:
        return Status(terminal=self.terminal, online=online, ts=self.clock(),
                      version=lmt_version(), config_hash=self.config_hash,
                      devices=list(self.devices), session=self.session,
                      flags=["buffer_unwritable"] if self.file.in_memory_for else []
                      ).model_dump_json()

    # -- one cycle: read, decide, persist, actuate --------------------------------------------
    def inputs(self, result: PollResult, requests: Sequence[Request], stopping: bool = False,
               optouts: Sequence[OptOut] = ()) -> Inputs:
        cfg, p = self.cfg, self.poller
        main = cfg.control.main_meter
        energy = p.value(main, self._energy_point) if self._energy_point else None
        return Inputs(
            now=self.clock(), mono=self.mono(), session=str(self.session),
            site_kw=p.site_kw() if main in result.fresh else None,
            recent_kw=p.recent_site_kw(),
            import_kwh=energy if isinstance(energy, int | float) and not isinstance(energy, bool)
            else None,
            loads=[p.value(ld.device, ld.point) if ld.device in result.fresh else None
                   for ld in cfg.loads],
            loads_age_s=[self.mono() - p.read_started[ld.device]
                         if ld.device in result.fresh and ld.device in p.read_started else None
                         for ld in cfg.loads],
            requests=requests, optouts=optouts,
            contact=self.link is not None and self.link.connected, stopping=stopping,
            spent_yuan=None if self.ledger is None else self.ledger.spent_yuan)

    async def control_cycle(self, result: PollResult, requests: Sequence[Request],
                            stopping: bool = False) -> None:
        optouts = [] if stopping else [OptOut(i, ev, why) for i, ev, why, _ in
                                       self.store.pending_optouts()]
        inputs = self.inputs(result, requests, stopping, optouts)
        try:
            state, actions, records = supervisor.step(self.control, self.state, inputs)
        except Exception as exc:  # a bug in control must not stop polling and the sync
            log.exception("control step failed; nothing is switched this cycle")
            self.intake.forget(list(requests))  # not remembered: the platform may resend them
            self.append("results", [validate_body("results", {
                "ts": inputs.now, "command_id": r.id, "status": "rejected",
                "reason": "unavailable", "detail": f"control failed ({type(exc).__name__})",
                "data": {}}) for r in requests])
            return
        self.commit(state, records, [o.request_id for o in optouts],  # persist, then actuate
                    self.intake.seen(list(requests)))
        done = await self.actuator.carry_out(actions) if actions else []
        state, records = supervisor.outcome(self.control, state, done, self.clock())
        self.commit(state, records)

    def ledger_commands(self, requests: Sequence[LedgerRequest]) -> None:
        """Tariff and carbon-curve commands go to the ledger (never to control)."""
        for r in requests:
            seen = self.intake.seen([r])
            if self.ledger is None:
                with self.outbox.transaction():
                    self.store.remember_commands(seen)
                    self.append("results", [validate_body("results", {
                        "ts": self.clock(), "command_id": r.id, "status": "rejected",
                        "reason": "invalid", "detail": "this terminal keeps no energy ledger "
                                                       "([ledger] enabled = false)", "data": {}})])
                continue
            self.ledger.command(r, self.clock(), self.mono(), seen)

    def ledger_cycle(self) -> None:
        """The cycle's readings into the ledger. A failure there (a bug) is logged and
        reported once; polling, control and the sync go on."""
        if self.ledger is None:
            return
        try:
            modes = self.state.report.get("modes") or {}
            balance = None if modes.get("purchase_left_kwh") is None and \
                modes.get("month_used_kwh") is None else {
                    "unit": modes.get("purchase_unit", "kwh"),
                    "left": _round(modes.get("purchase_left_kwh"), 2),
                    "month_used_kwh": _round(modes.get("month_used_kwh"), 3),
                    "spent_yuan": _round(self.ledger.spent_yuan, 2)}
            self.ledger.on_cycle(self.poller.latest, self.clock(), self.mono(), balance)
            self._ledger_failed = None
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}"
            if what != self._ledger_failed:
                log.exception("ledger failed; control goes on")
                self._ledger_failed = what
                self.append("events", [validate_body("events", {
                    "ts": self.clock(), "type": "ledger_fault",
                    "data": {"detail": f"the ledger failed ({what}); readings and control go "
                                       "on, intervals wait"}})])

    async def cycle_loop(self, stop: asyncio.Event) -> None:
        interval = self.cfg.poll.interval_s
        next_at = self.mono()
        main, point = self.cfg.control.main_meter, self.cfg.control.power_point
        while not stop.is_set():
            started = self.mono()
            self.intake.new_cycle()
            taken = self.intake.take()
            requests = [r for r in taken if not isinstance(r, LedgerRequest)]
            self.ledger_commands([r for r in taken if isinstance(r, LedgerRequest)])
            if requests:  # control needs the site's power now
                self.poller.force(main, point)
            self.poller.urgent = supervisor.controlling(self.state)
            if self.ledger is not None:  # an interval ended: its registers now, not in a minute
                for device, points in self.ledger.energy_points().items():
                    self.poller.read_soon(device, points)
            result = await self.poller.poll(started + interval)
            await self.control_cycle(result, requests)
            self.ledger_cycle()
            self._housekeeping()
            next_at = max(next_at + interval, self.mono())
            if await self._wait(next_at, stop):  # a command: a cycle now, the next one after it
                next_at = self.mono()

    async def _wait(self, until: float, stop: asyncio.Event) -> bool:
        """Until the next cycle is due (False), or a command is verified (True: it is carried
        out at once); refusals meanwhile are answered within a few tens of milliseconds."""
        intake = self.intake
        while not stop.is_set():
            self.wake.clear()
            if intake.requests:
                return True
            due = intake.answer_due
            wait = min(until, due) if due is not None else until
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, wait - self.mono()))
            except TimeoutError:
                if self.mono() >= until:
                    return False
            intake.verify_pending()
        return False

    def receive_command(self, payload: bytes) -> None:
        """From the MQTT link (on the loop)."""
        if self.intake.receive(payload):
            self.wake.set()

    def _housekeeping(self) -> None:
        if self.file.in_memory_for is not None and self.mono() - self._last_take_up >= RETRY_S:
            self._last_take_up = self.mono()
            got = take_up(self.file, self.outbox, self.cfg.buffer.max_mb, self.clock())
            if got is not None:  # the disk has room again: the buffer file takes over
                self.file, self.outbox = got
                self.store = self.intake.store = StateStore(self.file)
                # measured afresh: the rows kept in memory meanwhile are in the table now
                self.ledger_size = LedgerSize(self.file, remeasure=True)
                self.outbox.exempt_bytes = self.ledger_size
                if self.ledger is not None:
                    self.ledger.size = self.ledger_size
                    self.ledger.bind(self.file, self.outbox, self.store)
                self._saved = None
                if self.syncer is not None:
                    self.syncer.buffer = self.outbox
                    self.syncer.connected()
                if self.link is not None:
                    self.link.publish_status()
                self.sync_wake.set()
        if self.mono() - self._last_prune < 60.0:
            return
        self._last_prune = self.mono()
        n = self.outbox.prune_delivered(self.clock() - self.cfg.buffer.keep_delivered_h * 3600)
        if n:
            log.debug("pruned %d delivered records", n)

    # -- sync -----------------------------------------------------------------------------
    def _publish_batch(self, stream: str, batch: tuple[int, int, str],
                       historical: bool) -> MQTTMessageInfo:
        """One message of consecutive records. Their stored JSON bodies were joined by the
        outbox (:meth:`Outbox.pending_batch`), never decoded and encoded again."""
        assert self.link is not None
        payload = (f'{{"terminal":{json.dumps(self.terminal)},"stream":"{stream}",'
                   f'"historical":{"true" if historical else "false"},"records":[{batch[2]}]}}')
        return self.link.publish(self.topics.for_stream(stream), payload)

    async def sync_loop(self, stop: asyncio.Event) -> None:
        link = self.link
        assert link is not None
        sc = self.cfg.sync
        # sync.max_inflight messages on the wire (the link's window); as many again handed to
        # paho, ready to go the moment an acknowledgement frees a slot
        syncer = self.syncer = Syncer(self.outbox, self._publish_batch, sc.max_batch,
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

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        warmup()  # loads the compiled kernels from numba's disk cache: no compile mid-command
        self.link = MqttLink(self.cfg.mqtt, self.terminal, self.topics, loop,
                             self.receive_command, self.status_payload,
                             inflight_window=self.cfg.sync.max_inflight)
        self.append("events", [validate_body("events", {
            "ts": self.clock(), "type": "agent_started",
            "data": {"version": lmt_version(), "config_hash": self.config_hash}})])
        self.link.on_ack = self.sync_wake.set
        # the sync refills in steps of a quarter window: wake it about as often
        self.link.ack_wake_every = max(1, self.cfg.sync.max_inflight // 4)
        self.link.start()
        log.info("terminal %s started: %d devices, %d loads, broker %s:%d", self.terminal,
                 len(self.devices), len(self.cfg.loads), self.cfg.mqtt.host, self.cfg.mqtt.port)
        sync_stop = asyncio.Event()
        sync = asyncio.create_task(self.sync_loop(sync_stop))
        failed: list[BaseException] = []

        def sync_ended(task: asyncio.Task[None]) -> None:
            # The sync never ends by itself: if it failed (the buffer unreadable, say), stop
            # the agent with an error, so the service manager restarts it.
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
            await self.poller.stop()
            self.stopping = self.intake.stopping = True
            self.link.unsubscribe_commands()
            self.intake.budget_s = 5.0
            self.intake.new_cycle()
            left = self.intake.take()  # the queued ones are refused: the terminal is stopping
            self.intake.forget(left)  # (not remembered: the platform may send them again)
            self.append("results", [validate_body("results", {
                "ts": self.clock(), "command_id": r.id, "status": "rejected",
                "reason": "unavailable", "detail": "the terminal is stopping", "data": {}})
                for r in left])
            # no load stays off: the supervisor releases what it holds, the command fails
            await self.control_cycle(PollResult(), (), stopping=True)
            if self.ledger is not None:
                self.ledger.save(self.clock(), self.mono())
            self.poller.flush()
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
            self.outbox.close()
            self.file.close()
            log.info("terminal %s stopped", self.terminal)
        if failed:
            raise AgentFailed(f"the sync task failed: {type(failed[0]).__name__}: {failed[0]}")


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _log_record(r: supervisor.Record) -> None:
    b = r.body
    if r.stream == "results":
        log.info("command %s: %s%s%s", b["command_id"], b["status"],
                 f" ({b['reason']})" if b.get("reason") else "",
                 f": {b['detail']}" if b.get("detail") else "")
    elif b["type"] in _WARN:
        log.warning("%s: %s", b["type"], b["data"].get("detail") or b["data"])
    elif b["type"].startswith("mode_") and b["type"] != "mode_record":
        d = b["data"]
        log.info("%s: %s round %s: %s", b["type"], d.get("mode"), d.get("round"), d.get("reason"))
