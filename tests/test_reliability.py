"""Reliability with real processes: a real mosquitto, `lmt run` polling the simulated site, and
a platform-side consumer that de-duplicates by (terminal, stream, seq).

1. The broker is stopped and restarted 10 times during a run.
2. The agent is SIGKILLed 5 times at random moments while it publishes a heavy backlog.
3. A clean stop (SIGTERM) mid-backlog: memory flushed, quick exit, nothing sent twice.

In both, after de-duplication every record the terminal wrote reaches the consumer exactly
once, with no gap; records arrive in sequence order within the live flow and within the
backlog (live data may overtake the backlog: docs/mqtt.md, *Live first*).

The broker keeps its sessions on disk and is stopped with SIGTERM, as a service manager does:
a broker that dies with SIGKILL loses what it had acknowledged and not yet written, which no
client can prevent (a clustered platform broker replicates instead).
"""

from __future__ import annotations

import json
import queue
import random
import sqlite3
import subprocess
import threading
import time
import tomllib
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion

from lmt.agent.broker import Broker
from lmt.agent.outbox import STREAMS, Outbox
from lmt.agent.platform import StreamTracker
from tests.agent.harness import write_agent_config
from tests.conftest import lmt_argv, wait_until

TERMINAL = "demo-0001"
TOPIC_STREAM = {"telemetry": "telemetry", "events": "events", "result": "results"}


class Consumer:
    """A platform ingest: persistent session, QoS 1, de-duplication, order per flow."""

    def __init__(self, port: int) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ingest-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv311, clean_session=False)
        self.c.reconnect_delay_set(1, 1)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"lmt/v1/{TERMINAL}/+", qos=1)
        self.c.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload)))
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        wait_until(subscribed.is_set, 10, "the consumer's subscription")
        self.tracker = StreamTracker()
        self.last_in_flow: dict[tuple[str, bool], int] = {}
        self.disorder: list[str] = []
        self.new = 0  # records seen for the first time

    def drain(self) -> int:
        while True:
            try:
                topic, payload = self.inbox.get_nowait()
            except queue.Empty:
                return self.new
            kind = topic.rsplit("/", 1)[1]
            if kind not in TOPIC_STREAM:
                continue
            batch = json.loads(payload)
            stream, hist = TOPIC_STREAM[kind], bool(batch["historical"])
            for rec in batch["records"]:
                if not self.tracker.accept(TERMINAL, stream, rec["seq"]):
                    continue
                self.new += 1
                prev = self.last_in_flow.get((stream, hist), 0)
                if rec["seq"] < prev:
                    self.disorder.append(f"{stream} {'historical' if hist else 'live'} "
                                         f"#{rec['seq']} after #{prev}")
                self.last_in_flow[(stream, hist)] = rec["seq"]

    def has_all(self, last: dict[str, int]) -> bool:
        self.drain()
        for s, n in last.items():
            if n == 0:
                continue
            rs = self.tracker.ranges.get((TERMINAL, s), [])
            if not rs or rs[0][0] != 1 or rs[0][1] < n:
                return False
        return True

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def last_seqs(db: Path) -> dict[str, int]:
    buf = Outbox.open(db)
    try:
        return {s: buf.last_seq(s) for s in STREAMS}
    finally:
        buf.close()


def written(db: Path, stream: str = "telemetry") -> int:
    """The stream's last sequence number, read beside the running agent."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT MAX(seq) FROM outbox WHERE stream = ?", [stream]).fetchone()
        return int(row[0] or 0)
    except sqlite3.OperationalError:  # the agent is still creating the file's tables
        return 0
    finally:
        con.close()


def start_agent(cfg: Path) -> subprocess.Popen[bytes]:
    """`lmt run`; its log goes to agent.log next to the configuration (shown on a failure)."""
    log = open(cfg.parent / "agent.log", "ab")
    log.write(b"---- start\n")
    log.flush()
    return subprocess.Popen(lmt_argv("run", "--config", str(cfg)), stdout=subprocess.DEVNULL,
                            stderr=log)


def finish(agent: subprocess.Popen[bytes], consumer: Consumer, db: Path) -> None:
    """Stop the agent cleanly, then check everything it wrote reached the consumer."""
    seen = consumer.drain()  # running (its signal handlers set) once new records arrive
    wait_until(lambda: consumer.drain() > seen + 5, 30, "the agent publishing")
    so_far = {s: written(db, s) for s in STREAMS}
    wait_until(lambda: consumer.has_all(so_far), 60, f"the backlog up to {so_far} delivered")
    agent.terminate()
    assert agent.wait(20) == 0
    last = last_seqs(db)
    assert last["telemetry"] > 0 and last["events"] > 0
    try:
        wait_until(lambda: consumer.has_all(last), 60, f"every record of {last} at the consumer")
    except AssertionError:
        raise AssertionError(f"the consumer has {consumer.tracker.ranges}, the terminal wrote "
                             f"{last}") from None
    assert consumer.tracker.open_gaps() == []
    assert consumer.disorder == []


def test_broker_restarted_ten_times(tmp_path: Path, site: int) -> None:
    broker = Broker(persistence=True).start()
    cfg, _ = write_agent_config(tmp_path, site, broker.port,
                                mqtt={"reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                                poll={"interval_s": 0.1}, buffer={"flush_interval_s": 0.1},
                                sync={"max_batch": 5, "backlog_rate": 400.0})
    db = tmp_path / "buffer.sqlite"
    consumer = Consumer(broker.port)
    agent = start_agent(cfg)
    try:
        for _ in range(10):
            seen = consumer.drain()
            wait_until(lambda seen=seen: consumer.drain() >= seen + 20, 30, "records flowing")
            broker.stop()
            before = written(db)
            wait_until(lambda before=before: written(db) >= before + 10, 30,
                       "readings written during the outage")
            broker.start()
        finish(agent, consumer, db)
    finally:
        if agent.poll() is None:
            agent.kill()
        consumer.close()
        broker.stop()


def test_agent_sigkilled_five_times_while_publishing(tmp_path: Path, site: int) -> None:
    rng = random.Random(7)
    broker = Broker().start()
    cfg, _ = write_agent_config(tmp_path, site, broker.port,
                                poll={"interval_s": 0.1}, buffer={"flush_interval_s": 0.1},
                                sync={"max_batch": 5, "backlog_rate": 0.0})
    db = tmp_path / "buffer.sqlite"
    # a heavy backlog: three hours of a two-device site, so that it lasts through the five
    # kills (the five random moments take at most 7,500 records of it)
    buf = Outbox.open(db)
    t0 = time.time() - 3 * 3600
    buf.append("telemetry", [{"ts": t0 + i / 2, "device": "main-meter",
                              "values": {"power_w": float(i)}} for i in range(21600)])
    buf.close()
    consumer = Consumer(broker.port)
    agent = start_agent(cfg)
    try:
        for _ in range(5):
            seen = consumer.drain()
            k = rng.randint(20, 1500)  # a random moment while it publishes
            try:
                wait_until(lambda seen=seen, k=k: consumer.drain() >= seen + k, 60,
                           f"{k} more records")
            except AssertionError as exc:
                log = (tmp_path / "agent.log").read_text(errors="replace")[-4000:]
                raise AssertionError(f"{exc}; the consumer has {consumer.tracker.ranges}; "
                                     f"the agent's log ends:\n{log}") from None
            agent.kill()
            agent.wait(10)
            agent = start_agent(cfg)
        finish(agent, consumer, db)
    finally:
        if agent.poll() is None:
            agent.kill()
        consumer.close()
        broker.stop()


def test_clean_stop_keeps_memory_and_sends_nothing_twice(tmp_path: Path, site: int,
                                                         broker: Broker) -> None:
    """SIGTERM (as systemd sends) mid-backlog: the readings held in memory reach the buffer,
    the agent exits within a few seconds, and after the restart nothing acknowledged is sent
    again and nothing unacknowledged is missing."""
    cfg, _ = write_agent_config(tmp_path, site, broker.port,
                                poll={"interval_s": 0.1}, buffer={"flush_interval_s": 30.0},
                                sync={"max_batch": 5, "backlog_rate": 300.0})
    db = tmp_path / "buffer.sqlite"
    buf = Outbox.open(db)
    buf.append("telemetry", [{"ts": time.time() - 3600 + i, "device": "main-meter",
                              "values": {"power_w": float(i)}} for i in range(3000)])
    buf.close()
    consumer = Consumer(broker.port)
    agent = start_agent(cfg)
    try:
        # the first cycle's readings are written at once, the next ones held for 30 s; the
        # backlog goes at 300/s after a burst of 300: at 900 received, 2 s of cycles are held
        wait_until(lambda: written(db) > 3000, 30, "the first live readings")
        wait_until(lambda: consumer.drain() >= 900, 30, "two seconds of backlog")
        polled_before = written(db)
        t0 = time.monotonic()
        agent.terminate()
        assert agent.wait(10) == 0
        assert time.monotonic() - t0 < 5.0, "a clean stop took too long"
        assert written(db) > polled_before, "readings held in memory were lost at the stop"
        buf = Outbox.open(db)
        try:
            assert buf.delivered_seq("telemetry") < 3000, "the backlog finished: test too slow"
        finally:
            buf.close()
        # the restart sends the rest of the backlog at full speed (the rate mattered only
        # for stopping mid-backlog): what is checked now is what was sent twice or not at all
        restart = tomllib.loads(cfg.read_text())
        restart["sync"]["backlog_rate"] = 0.0  # no limit
        cfg.write_text(tomli_w.dumps(restart))
        agent = start_agent(cfg)
        finish(agent, consumer, db)
        assert consumer.tracker.duplicates == 0, "acknowledged records were sent again"
    finally:
        if agent.poll() is None:
            agent.kill()
        consumer.close()


def test_sigterm_is_prompt_even_with_a_long_poll_interval(tmp_path: Path, site: int,
                                                          broker: Broker) -> None:
    """systemd waits 20 s before SIGKILL: the stop must not wait for the next cycle."""
    cfg, _ = write_agent_config(tmp_path, site, broker.port, poll={"interval_s": 60.0})
    db = tmp_path / "buffer.sqlite"
    agent = start_agent(cfg)
    try:
        wait_until(lambda: db.exists() and written(db) > 0, 30, "the first reading")
        t0 = time.monotonic()
        agent.terminate()
        assert agent.wait(15) == 0
        assert time.monotonic() - t0 < 5.0
    finally:
        if agent.poll() is None:
            agent.kill()


def test_a_failing_sync_stops_the_agent_with_an_error(tmp_path: Path, site: int,
                                                      broker: Broker) -> None:
    """If publishing from the buffer fails for good, the agent stops with an error (so the
    service manager restarts it) instead of polling on while nothing is published."""
    from lmt.agent.daemon import Agent, AgentFailed
    from lmt.config import load_agent_config
    from tests.agent.harness import AgentThread

    cfg, _ = write_agent_config(tmp_path, site, broker.port, poll={"interval_s": 0.2})
    runner = AgentThread(Agent(load_agent_config(cfg))).start()
    agent = runner.agent
    wait_until(lambda: agent.syncer is not None and agent.syncer.sent_live > 0, 30,
               "the first message")

    def broken(*args: object, **kw: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    agent.outbox.pending_batch = broken  # type: ignore[method-assign]
    runner.thread.join(20)
    assert not runner.thread.is_alive(), "the agent kept running without its sync"
    assert isinstance(runner.error, AgentFailed) and "disk I/O error" in str(runner.error)
