"""Publishing the buffer: live first, the backlog behind it at a bounded rate.

On every (re)connect the records not yet acknowledged become the *backlog*, and everything
written from then on is *live*. Each stream is published in sequence order within each of the
two flows:

- results and events: backlog first, then live, never rate-limited (they are few and matter);
- telemetry: live records go out at once; the backlog drains behind them through a token
  bucket (``sync.backlog_rate`` readings per second) and may hold at most three quarters of
  the in-flight window, so current readings are never queued behind an hour of history. Backlog messages are
  marked ``historical``.

A message's records count as delivered only when the broker acknowledged it (PUBACK); the
buffer keeps the acknowledged ranges, so an acknowledgement out of order (live before backlog)
is kept across a restart and nothing acknowledged is sent again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from paho.mqtt.client import MQTT_ERR_SUCCESS, MQTTMessageInfo

from .outbox import STREAMS, Outbox

Batch = tuple[int, int, str]  # (first seq, last seq, the records as JSON array items)

RATE_LIMITED = ("telemetry",)


@dataclass
class InFlight:
    stream: str
    first: int
    last: int
    historical: bool
    info: MQTTMessageInfo


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; ``rate`` 0 means no limit.

    A batch may be taken whenever the balance is positive and drives it negative by its size,
    so the long-run rate holds whatever the batch size."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.clock = clock
        self.tokens = self.burst
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def ready(self) -> bool:
        if self.rate <= 0:
            return True
        self._refill()
        return self.tokens > 0

    def take(self, n: int) -> None:
        if self.rate > 0:
            self._refill()
            self.tokens -= n

    def wait_s(self) -> float:
        """Seconds until a batch may be taken."""
        if self.rate <= 0:
            return 0.0
        self._refill()
        return 0.0 if self.tokens > 0 else (1e-3 - self.tokens) / self.rate


@dataclass
class StreamCursor:
    backlog: deque[list[int]] = field(default_factory=deque)  # [first, last] still to send
    live_after: int = 0  # live records are those with seq > live_after


class Syncer:
    """The sync's state between broker connections; driven by the agent's sync task."""

    def __init__(self, buffer: Outbox, publish: Callable[[str, Batch, bool], MQTTMessageInfo],
                 max_batch: int, max_inflight: int, backlog_rate: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.buffer = buffer
        self.publish = publish  # (stream, batch, historical) -> paho's info for that message
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        # a quarter of the window stays free for live data
        self.backlog_window = max(1, max_inflight - max(1, max_inflight // 4))
        self.refill_at = max(1, max_inflight // 4)
        self._hist_inflight = 0
        self.bucket = TokenBucket(backlog_rate, burst=max(backlog_rate, max_batch), clock=clock)
        self.inflight: deque[InFlight] = deque()
        self.cursors = {s: StreamCursor() for s in STREAMS}
        self.sent_live = 0  # messages, for diagnostics and benchmarks
        self.sent_backlog = 0
        self.clock = clock
        self.save_every = max(1, max_inflight)
        self.save_after_s = 0.1
        self._unsaved: list[tuple[str, int, int]] = []
        self._unsaved_since = 0.0

    def connected(self) -> None:
        """A new connection: whatever is unacknowledged is the backlog, sent again."""
        self.collect_acks()
        self.save_acks()
        self.inflight.clear()
        self._hist_inflight = 0
        for s in STREAMS:
            cur = self.cursors[s]
            cur.backlog = deque([a, b] for a, b in self.buffer.unacked_ranges(s))
            cur.live_after = self.buffer.last_seq(s)

    def collect_acks(self) -> int:
        """Take every acknowledged message out of the window; return how many. Their ranges
        are written to the buffer in batches (a window's worth, or ``save_after_s``): one
        transaction per acknowledgement would cost an fsync each."""
        keep: deque[InFlight] = deque()
        n = 0
        for m in self.inflight:  # one pass: an ack may arrive (paho's thread) meanwhile
            if m.info.is_published():
                if not self._unsaved:
                    self._unsaved_since = self.clock()
                self._unsaved.append((m.stream, m.first, m.last))
                self._hist_inflight -= m.historical
                n += 1
            else:
                keep.append(m)
        self.inflight = keep
        if self._unsaved and (len(self._unsaved) >= self.save_every
                              or self.clock() - self._unsaved_since >= self.save_after_s):
            self.save_acks()
        return n

    @property
    def unsaved_acks(self) -> int:
        return len(self._unsaved)

    def save_acks(self) -> None:
        if self._unsaved:
            self.buffer.mark_acked(self._unsaved)
            self._unsaved = []

    def _send(self, stream: str, batch: Batch, historical: bool) -> bool:
        info = self.publish(stream, batch, historical)
        if info.rc != MQTT_ERR_SUCCESS:
            return False
        self.inflight.append(InFlight(stream, batch[0], batch[1], historical, info))
        if historical:
            self._hist_inflight += 1
            self.sent_backlog += 1
        else:
            self.sent_live += 1
        return True

    def _room(self, historical: bool) -> int:
        room = self.max_inflight - len(self.inflight)
        if historical:
            room = min(room, self.backlog_window - self._hist_inflight)
        # Refill in steps of a quarter window: one query for several messages, while the rest
        # of the window keeps the connection busy.
        return room if room >= self.refill_at or not self.inflight else 0

    def _send_backlog(self, stream: str, limited: bool) -> bool:
        """Send backlog messages while the window (and for telemetry the rate) allows; False
        when a publish failed."""
        cur = self.cursors[stream]
        room = self._room(True)
        while cur.backlog and room > 0 and (not limited or self.bucket.ready()):
            first, last = cur.backlog[0]
            batch = self.buffer.pending_batch(stream, first - 1, self.max_batch, upto_seq=last)
            if batch is None:
                cur.backlog.popleft()  # nothing left there (sent, or dropped by the disk cap)
                continue
            if not self._send(stream, batch, True):
                return False
            room -= 1
            if limited:
                self.bucket.take(batch[1] - batch[0] + 1)
            cur.backlog[0][0] = batch[1] + 1
            if cur.backlog[0][0] > last:
                cur.backlog.popleft()
        return True

    def _send_live(self, stream: str) -> bool:
        cur = self.cursors[stream]
        room = self._room(False)
        while room > 0 and cur.live_after < self.buffer.last_seq(stream):
            batch = self.buffer.pending_batch(stream, cur.live_after, self.max_batch)
            if batch is None:
                cur.live_after = self.buffer.last_seq(stream)  # the rest was dropped
                break
            if not self._send(stream, batch, False):
                return False
            room -= 1
            cur.live_after = batch[1]
        return True

    def send_pending(self, backlog: bool = True) -> None:
        """Publish what the window and the backlog rate allow; ``backlog`` False: live only."""
        for s in STREAMS:  # results first, then events, then telemetry
            limited = s in RATE_LIMITED
            if not limited:  # in order: this stream's backlog, then its live records
                if backlog and not self._send_backlog(s, False):
                    return
                if self.cursors[s].backlog:
                    continue
            if not self._send_live(s):
                return
            if limited and backlog and not self._send_backlog(s, True):
                return

    def wait_s(self) -> float | None:
        """How long the sync task may sleep: None = until woken (nothing to do). The link
        wakes the task on every acknowledgement; the timeouts here are a fallback."""
        if self._unsaved:
            return max(0.001, self._unsaved_since + self.save_after_s - self.clock())
        if self.inflight:
            return 0.05
        if any(self.cursors[s].backlog for s in RATE_LIMITED):
            return max(0.005, self.bucket.wait_s())
        return None
