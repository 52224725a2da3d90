"""Live data first, the backlog behind it at the configured rate, marked historical; what the
broker acknowledged out of order is never sent again, even after a restart (real mosquitto,
real simulated site, real SQLite file)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.outbox import Outbox
from lmt.agent.platform import StreamTracker, _Client
from lmt.config import load_agent_config
from tests.agent.harness import AgentThread, write_agent_config
from tests.conftest import wait_until

BACKLOG = 3000
TOPIC = "lmt/v1/demo-0001/telemetry"


def prefill(path: Path, n: int = BACKLOG) -> None:
    """An outage's worth of readings, written before the agent starts."""
    buf = Outbox.open(path)
    t0 = time.time() - 3600
    buf.append("telemetry", [{"ts": t0 + i, "device": "main-meter", "values": {"power_w": 1000.0 + i}}
                             for i in range(n)])
    buf.close()


class Collector:
    """A platform-side subscriber: every record with its arrival time and historical flag."""

    def __init__(self, port: int) -> None:
        self.client = _Client("127.0.0.1", port)
        self.client.connect([TOPIC])
        self.tracker = StreamTracker()
        self.got: list[tuple[float, int, bool]] = []  # (arrival, seq, historical)

    def drain(self) -> None:
        while not self.client.messages.empty():
            msg = self.client.messages.get_nowait()
            batch = json.loads(msg.payload)
            now = time.monotonic()
            for rec in batch["records"]:
                self.tracker.accept("demo-0001", "telemetry", rec["seq"])
                self.got.append((now, rec["seq"], batch["historical"]))

    def has(self, pred) -> bool:  # type: ignore[no-untyped-def]
        self.drain()
        return any(pred(seq, hist) for _, seq, hist in self.got)

    def complete_upto(self, seq: int) -> bool:
        self.drain()
        return self.tracker.delivered.get(("demo-0001", "telemetry"), 0) >= seq

    def close(self) -> None:
        self.client.close()


def test_live_first_backlog_rate_limited_and_historical(tmp_path: Path, site: int,
                                                         broker: Broker) -> None:
    rate = 1000.0
    cfg_path, _ = write_agent_config(tmp_path, site, broker.port, poll={"interval_s": 0.2},
                                     buffer={"flush_interval_s": 0.2},
                                     sync={"backlog_rate": rate, "max_batch": 20})
    prefill(tmp_path / "buffer.sqlite")
    col = Collector(broker.port)
    runner = AgentThread(Agent(load_agent_config(cfg_path))).start()
    try:
        wait_until(lambda: col.has(lambda seq, hist: seq > BACKLOG and not hist), 20,
                   "a live reading")
        backlog_done = [seq for _, seq, hist in col.got if hist and seq <= BACKLOG]
        assert len(backlog_done) < BACKLOG, "live data waited for the whole backlog"
        wait_until(lambda: col.complete_upto(BACKLOG + 5), 60, "the backlog to drain")
    finally:
        runner.stop()
        col.close()
    hist = sorted((t, seq) for t, seq, h in col.got if h)
    live = [seq for _, seq, h in col.got if not h]
    # (the agent's own first readings may be written before it connects: backlog too)
    assert set(range(1, BACKLOG + 1)) <= {seq for _, seq in hist}, "backlog not marked historical"
    assert live and min(live) > BACKLOG and not set(live) & {seq for _, seq in hist}
    # The rate limit holds (an upper bound: a slow machine only makes it slower). The bucket
    # starts full, so one second's worth may go at once.
    span = hist[-1][0] - hist[0][0]
    assert len(hist) - rate <= rate * 1.25 * span, f"{len(hist)} backlog readings in {span:.2f} s"
    assert col.tracker.open_gaps() == []


def test_acknowledged_out_of_order_is_not_sent_again_after_restart(tmp_path: Path, site: int,
                                                                   broker: Broker) -> None:
    cfg_path, _ = write_agent_config(tmp_path, site, broker.port, poll={"interval_s": 0.2},
                                     buffer={"flush_interval_s": 0.2},
                                     sync={"backlog_rate": 200.0, "max_batch": 20})
    db = tmp_path / "buffer.sqlite"
    prefill(db)
    col = Collector(broker.port)
    try:
        runner = AgentThread(Agent(load_agent_config(cfg_path))).start()
        try:
            wait_until(lambda: col.has(lambda seq, hist: seq > BACKLOG + 5 and not hist), 20,
                       "live readings")
        finally:
            runner.stop()  # a clean stop, mid-backlog
        buf = Outbox.open(db)
        try:
            acked, delivered = buf.acked_ranges("telemetry"), buf.delivered_seq("telemetry")
        finally:
            buf.close()
        assert delivered < BACKLOG, "the backlog finished before the stop: test too slow"
        assert acked and acked[-1][1] > BACKLOG, "live acknowledgements were not kept"

        fast = load_agent_config(cfg_path).model_copy(deep=True)
        fast.sync.backlog_rate = 0.0  # no limit: drain the rest quickly
        runner = AgentThread(Agent(fast)).start()
        try:
            last = acked[-1][1]
            wait_until(lambda: col.complete_upto(last + 5), 60, "the rest of the backlog")
        finally:
            runner.stop()
        assert col.tracker.duplicates == 0, "acknowledged records were sent again"
        assert col.tracker.open_gaps() == []
    finally:
        col.close()
