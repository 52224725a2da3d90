"""Command intake: verify each incoming command, refuse replays, turn it into a control request.

Messages arrive from the MQTT link (handed from paho's thread to the loop) into a bounded
queue (:data:`QUEUE` messages, :data:`QUEUE_BYTES` bytes). Each cycle spends at most
:data:`BUDGET_SHARE` of ``poll.interval_s`` verifying them (Ed25519 signature over the exact
body bytes, terminal, validity window, schema: :func:`lmt.agent.security.verify_command`),
checks the id against the ids already seen (kept in the state store, so a replay is refused
after a restart too), and hands the verified ones to the supervisor as requests
(:mod:`lmt.control.supervisor`), which decides what they do. Their ids are remembered in the
same transaction as the supervisor's answer to them (:meth:`Intake.seen`): a crash in between
leaves neither, and the platform's resend is carried out. Refusals are answered on the result
topic within :data:`ANSWER_WITHIN_S`, several in one transaction. A flood cannot
starve polling and control: what does not fit in the queue is dropped (the oldest first),
counted and reported (``commands_dropped``), and no exception raised by one message can end
the agent.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lmt.config.agent import Security
from lmt.control.supervisor import (
    CancelRequest,
    CapRequest,
    DrRequest,
    GuaranteeRequest,
    ModesRequest,
    RemoteRequest,
    Request,
    ShedRequest,
)

from .messages import (
    CancelCommand,
    CapCommand,
    CarbonCurveCommand,
    Command,
    DrEventCommand,
    GuaranteeCommand,
    ModesCommand,
    RejectReason,
    RemoteCommand,
    ShedCommand,
    TariffCommand,
    event_body,
    result_body,
)
from .security import Refusal, verify_command
from .state_store import StateStore

log = logging.getLogger("lmt.agent")

QUEUE = 2048  # commands waiting to be verified; beyond, the oldest are dropped ...
QUEUE_BYTES = 4 * 1024 * 1024  # ... and beyond this many bytes of them
BUDGET_SHARE = 0.25  # of each cycle's interval, at most, is spent verifying commands
ANSWER_WITHIN_S = 0.05  # refusals wait at most this long to share one transaction
# Unauthenticated refusals (malformed, bad signature) are answered one by one from a bucket of
# this many, refilled this many per second; beyond, they are counted in commands_dropped: a
# flood of forgeries must not fill the buffer with results, which are never dropped.
UNAUTHENTICATED_BURST = 1000
UNAUTHENTICATED_PER_S = 5.0
Sink = Callable[[str, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class LedgerRequest:
    """A verified command for the energy ledger (not for control): ``tariff`` or
    ``carbon_curve`` with its body's payload."""

    id: str
    kind: str
    payload: dict[str, Any]
    effective_from: float | None = None


AnyRequest = Request | LedgerRequest


def to_request(cmd: Command) -> AnyRequest:
    """A verified command as the supervisor's request."""
    if isinstance(cmd, CapCommand):
        return CapRequest(cmd.id, cmd.cap_kw, duration_s=cmd.duration_s, until=cmd.until,
                          loads=None if cmd.loads is None else tuple(cmd.loads))
    if isinstance(cmd, ShedCommand):
        return ShedRequest(cmd.id, cmd.shed_kw, cmd.duration_s,
                           loads=None if cmd.loads is None else tuple(cmd.loads))
    if isinstance(cmd, CancelCommand):
        return CancelRequest(cmd.id, cmd.target)
    if isinstance(cmd, DrEventCommand):
        return DrRequest(cmd.id, issued_at=cmd.issued_at, start=cmd.start,
                         duration_s=cmd.duration_s, signal=cmd.signal, value=cmd.value,
                         randomize_s=cmd.randomize_s, ramp_s=cmd.ramp_s,
                         recovery_s=cmd.recovery_s, expires_at=cmd.expires_at)
    if isinstance(cmd, ModesCommand):
        return ModesRequest(cmd.id, dict(cmd.params))
    if isinstance(cmd, RemoteCommand):
        return RemoteRequest(cmd.id, cmd.round, cmd.action, alarm_delay_min=cmd.alarm_delay_min,
                             limit_half_hours=cmd.limit_half_hours)
    if isinstance(cmd, TariffCommand):
        return LedgerRequest(cmd.id, "tariff", dict(cmd.tariff), cmd.effective_from)
    if isinstance(cmd, CarbonCurveCommand):
        return LedgerRequest(cmd.id, "carbon_curve", dict(cmd.curve))
    assert isinstance(cmd, GuaranteeCommand)
    return GuaranteeRequest(cmd.id, cmd.on, duration_half_hours=cmd.duration_half_hours,
                            auto_after_h=cmd.auto_after_h)


class Intake:
    def __init__(self, security: Security, public_key: Ed25519PublicKey, terminal: str,
                 store: StateStore, sink: Sink, clock: Callable[[], float],
                 budget_s: float = 0.25, queue: int = QUEUE, queue_bytes: int = QUEUE_BYTES,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.security = security
        self.public_key = public_key
        self.terminal = terminal
        self.store = store
        self.sink = sink
        self.clock = clock
        self.mono = mono
        self.budget_s = budget_s
        self.queue: deque[bytes] = deque()
        self.max_queue, self.max_bytes = queue, queue_bytes
        self.requests: list[AnyRequest] = []
        self.stopping = False
        self._pending: dict[str, tuple[float, float]] = {}  # verified, not yet remembered
        self._bytes = 0
        self._spent = 0.0
        self._answers: list[dict[str, Any]] = []
        self._answers_since: float | None = None
        self._dropped = 0
        self._unanswered = 0
        self._tokens = float(UNAUTHENTICATED_BURST)
        self._tokens_at = mono()
        self._dropped_since: float | None = None

    def receive(self, payload: bytes) -> bool:
        """From the MQTT link (on the loop): queue for verification. True when this cycle's
        budget has room to verify it now."""
        self.queue.append(payload)
        self._bytes += len(payload)
        while len(self.queue) > self.max_queue or self._bytes > self.max_bytes:
            self._bytes -= len(self.queue.popleft())
            self._dropped += 1
            if self._dropped_since is None:
                self._dropped_since = self.clock()
        return self._spent < self.budget_s

    def new_cycle(self) -> None:
        self._spent = 0.0

    @property
    def answer_due(self) -> float | None:
        """When the refusals held now must be written (monotonic), or None."""
        return None if self._answers_since is None else self._answers_since + ANSWER_WITHIN_S

    def verify_pending(self) -> None:
        """Verify what the cycle's budget allows; refusals are answered in one transaction
        once :data:`ANSWER_WITHIN_S` has passed (or at the next cycle)."""
        t0 = self.mono()
        while self.queue and self._spent + (self.mono() - t0) < self.budget_s:
            payload = self.queue.popleft()
            self._bytes -= len(payload)
            n = len(self._answers)
            try:
                self._verify(payload, self._answers)
            except Exception as exc:  # no message may end the agent
                log.exception("command handling failed")
                self._answers.append(result_body(None, "rejected", self.clock(), "malformed",
                                                 f"unreadable command ({type(exc).__name__})"))
            if len(self._answers) > n and self._answers_since is None:
                self._answers_since = self.mono()
        self._spent += self.mono() - t0
        if self._answers and (self.requests or self.mono() >= (self.answer_due or 0.0)):
            self.answer()

    def answer(self) -> None:
        """Write the refusals held so far, and report commands dropped unread."""
        if self._answers:
            answers, self._answers, self._answers_since = self._answers, [], None
            self.sink("results", answers)
        if self._dropped or self._unanswered:
            now = self.clock()
            log.warning("command flood: %d commands dropped unread, %d forged or malformed ones "
                        "refused without a result", self._dropped, self._unanswered)
            self.sink("events", [event_body("commands_dropped", now, {
                "count": self._dropped + self._unanswered, "unread": self._dropped,
                "unanswered": self._unanswered, "since": self._dropped_since, "until": now,
                "queue": self.max_queue, "budget_s": round(self.budget_s, 3),
                "detail": "more commands arrived than the terminal verifies: the oldest were "
                          "dropped unread (no result: resend them), and malformed or forged "
                          "ones beyond a burst of "
                          f"{UNAUTHENTICATED_BURST} ({UNAUTHENTICATED_PER_S:g} a second after "
                          "it) were refused without a result of their own"})])
            self._dropped, self._unanswered, self._dropped_since = 0, 0, None

    def take(self) -> list[AnyRequest]:
        """The verified requests for this cycle's supervisor step (refusals answered)."""
        self.verify_pending()
        self.answer()
        out, self.requests = self.requests, []
        return out

    def _refuse(self, results: list[dict[str, Any]], command_id: str | None,
                reason: RejectReason, detail: str, **data: Any) -> None:
        log.info("command %s: rejected (%s): %s", command_id, reason, detail)
        results.append(result_body(command_id, "rejected", self.clock(), reason, detail,
                                   data or None))

    def _verify(self, payload: bytes, results: list[dict[str, Any]]) -> None:
        now = self.clock()
        sec = self.security
        try:
            cmd = verify_command(payload, self.public_key, self.terminal, now,
                                 sec.clock_skew_s, sec.max_lifetime_s)
        except Refusal as r:
            if r.reason in ("malformed", "bad_signature"):
                t = self.mono()
                self._tokens = min(float(UNAUTHENTICATED_BURST), self._tokens
                                   + (t - self._tokens_at) * UNAUTHENTICATED_PER_S)
                self._tokens_at = t
                if self._tokens < 1.0:
                    self._unanswered += 1
                    if self._dropped_since is None:
                        self._dropped_since = now
                    return
                self._tokens -= 1.0
                # The id is unauthenticated: never answer under it, or anyone could make a
                # live command look refused. It is given for diagnosis only.
                self._refuse(results, None, r.reason, r.detail, claimed_id=r.command_id)
            else:
                self._refuse(results, r.command_id, r.reason, r.detail)
            return
        if cmd.id in self._pending or self.store.command_seen(cmd.id):
            self._refuse(results, cmd.id, "replayed",
                         "this command id was received before (a duplicate delivery never "
                         "changes the original command)")
            return
        if self.stopping:  # not remembered: the platform may send it again after the restart
            self._refuse(results, cmd.id, "unavailable", "the terminal is stopping")
            return
        self._pending[cmd.id] = (cmd.expires_at, now)
        self.requests.append(to_request(cmd))

    def seen(self, requests: list[AnyRequest]) -> list[tuple[str, float, float]]:
        """The ids of these requests to remember (id, expires at, received at), in the
        transaction that saves the supervisor's answer to them; they are no longer pending."""
        return [(r.id, *self._pending.pop(r.id)) for r in requests if r.id in self._pending]

    def forget(self, requests: list[AnyRequest]) -> None:
        """These requests were not answered (the step failed, the agent stopped): their ids are
        not remembered, so the platform may send them again."""
        for r in requests:
            self._pending.pop(r.id, None)
