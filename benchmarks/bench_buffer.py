"""Store-and-forward: buffer ingest, backlog drain to a local mosquitto, one hour of backlog.

Run: .venv/bin/python benchmarks/bench_buffer.py [--rows N] [--drain N] [--no-hour]
Prints one JSON object per line: {"name", "value", "unit", "baseline", "ratio"}.
(The buffer's write cost, synchronous=FULL against NORMAL: bench_buffer_durability.py.)

1. Ingest into the buffer (readings/s), in batches of one 50-device poll cycle, against a bare
   sqlite3 ``executemany`` of the same rows on a file with the same pragmas (WAL,
   synchronous=FULL), same run (goal: ratio >= 0.5).
2. Backlog drain to a local mosquitto (readings/s): the agent's own sync task (``Agent.
   sync_loop`` over its MQTT link, QoS 1, acknowledged ranges recorded in SQLite, backlog
   rate limit off) against a bare paho QoS 1 publish loop of the same messages with the same
   in-flight window, serialised from an in-memory queue (no disk, nothing recorded), same run
   (goal: ratio >= 0.7).
3. Time to drain one hour of backlog of a 50-device site polled every second (180,000
   readings): measured with the rate limit off, against the bare paho loop; and what the
   default rate limit (``sync.backlog_rate``) makes of it, with live data flowing beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import tomli_w
from common import emit
from paho.mqtt.enums import CallbackAPIVersion

from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.mqtt import MqttLink
from lmt.agent.outbox import Outbox
from lmt.agent.security import generate_keypair
from lmt.config import load_agent_config
from lmt.config.agent import Sync

DEVICES = 50


def readings(n: int, t0: float = 1.8e9) -> list[dict]:
    """``n`` readings as a 50-device site produces them: one per device per second."""
    out = []
    for i in range(n):
        dev, sec = i % DEVICES, i // DEVICES
        p = 10000.0 + 37.0 * dev + (sec % 60)
        out.append({"ts": t0 + sec, "device": f"meter-{dev:02d}", "values": {
            "power_w": p, "voltage_l1_v": 230.1, "voltage_l2_v": 229.8, "voltage_l3_v": 231.0,
            "current_l1_a": p / 690.0, "current_l2_a": p / 690.0, "current_l3_a": p / 690.0,
            "power_factor": 0.97, "frequency_hz": 50.01, "import_energy_kwh": 12345.67 + sec / 360}})
    return out


# -- 1. ingest ----------------------------------------------------------------------------------
def ingest_ours(path: Path, rows: list[dict]) -> float:
    buf = Outbox.open(path)
    t0 = time.perf_counter()
    for i in range(0, len(rows), DEVICES):
        buf.append("telemetry", rows[i:i + DEVICES])
    dt = time.perf_counter() - t0
    buf.close()
    return dt


def ingest_bare(path: Path, rows: list[dict]) -> float:
    con = sqlite3.connect(str(path), isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = FULL")
    con.execute("CREATE TABLE outbox (stream TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,"
                " body TEXT NOT NULL, PRIMARY KEY (stream, seq)) STRICT")
    t0 = time.perf_counter()
    seq = 1
    for i in range(0, len(rows), DEVICES):
        batch = rows[i:i + DEVICES]
        con.execute("BEGIN")
        con.executemany("INSERT INTO outbox(stream, seq, ts, body) VALUES (?, ?, ?, ?)",
                        [("telemetry", seq + k, r["ts"], json.dumps(r, separators=(",", ":")))
                         for k, r in enumerate(batch)])
        con.execute("COMMIT")
        seq += len(batch)
    dt = time.perf_counter() - t0
    con.close()
    return dt


# -- 2. drain -----------------------------------------------------------------------------------
def agent_config(work: Path, broker_port: int, sync: Sync) -> Path:
    pub = work / "keys" / "platform.pub"
    if not pub.exists():
        _, pub = generate_keypair(work / "keys")
    cfg = {"terminal": {"id": "bench"},
           "mqtt": {"port": broker_port, "client_id": "bench-agent"},
           "security": {"platform_public_key": str(pub)},
           "buffer": {"path": str(work / "drain.sqlite")},
           "sync": sync.model_dump(),
           "devices": [{"name": "meter", "profile": "eastron-sdm630", "host": "127.0.0.1",
                        "port": 1, "device_id": 1}],
           "control": {"main_meter": "meter"}}
    path = work / "agent.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def drain_ours(work: Path, port: int, rows: list[dict], sync: Sync) -> float:
    """Time for the agent's sync task to publish ``rows`` and record every acknowledgement."""
    db = work / "drain.sqlite"
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)
    buf = Outbox.open(db)
    for i in range(0, len(rows), 1000):
        buf.append("telemetry", rows[i:i + 1000])
    buf.close()
    agent = Agent(load_agent_config(agent_config(work, port, sync)))
    n = len(rows)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        agent.link = link = MqttLink(agent.cfg.mqtt, agent.terminal, agent.topics, loop,
                                     lambda _: None, agent.status_payload,
                                     inflight_window=sync.max_inflight)
        link.on_ack = agent.sync_wake.set
        link.ack_wake_every = max(1, sync.max_inflight // 4)  # as Agent.run sets it
        link.start()
        while not link.connected:
            await asyncio.sleep(0.01)
        stop = asyncio.Event()
        t0 = time.perf_counter()
        task = asyncio.create_task(agent.sync_loop(stop))
        while True:  # watch the sync's own state, then check the file once
            syncer = agent.syncer
            if (syncer is not None and syncer.cursors["telemetry"].live_after >= n
                    and not syncer.cursors["telemetry"].backlog and not syncer.inflight
                    and not syncer.unsaved_acks and agent.outbox.delivered_seq("telemetry") >= n):
                break
            await asyncio.sleep(0.002)
        dt = time.perf_counter() - t0
        stop.set()
        agent.sync_wake.set()
        await task
        link.stop()
        return dt

    try:
        return asyncio.run(run())
    finally:
        agent.close()


def drain_bare(port: int, rows: list[dict], sync: Sync) -> float:
    """A bare paho QoS 1 loop publishing the same messages with the same in-flight window,
    from an in-memory queue of readings (as a gateway without a disk buffer does): each
    message is serialised in the loop, nothing is stored, no acknowledgement is recorded."""
    batches = []
    for i in range(0, len(rows), sync.max_batch):
        batches.append([{"seq": i + k + 1, **r} for k, r in enumerate(rows[i:i + sync.max_batch])])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(sync.max_inflight)
    c.max_queued_messages_set(0)
    done = threading.Event()
    acked = [0]

    def on_publish(client, userdata, mid, reason_code, properties):  # type: ignore[no-untyped-def]
        acked[0] += 1
        if acked[0] == len(batches):
            done.set()

    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    for recs in batches:
        c.publish("lmt/v1/bench/telemetry", json.dumps(
            {"terminal": "bench", "stream": "telemetry", "historical": True, "records": recs},
            separators=(",", ":")), qos=1)
    done.wait(600)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000, help="readings for the ingest comparison")
    ap.add_argument("--drain", type=int, default=30_000, help="readings for the drain comparison")
    ap.add_argument("--hour", action=argparse.BooleanOptionalAction, default=True,
                    help="also drain one hour of a 50-device site (180,000 readings)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = readings(args.rows)
        ours, bare = [], []
        for k in range(3):  # interleaved, best of three: the machine is shared
            ours.append(ingest_ours(work / f"ours{k}.sqlite", rows))
            bare.append(ingest_bare(work / f"bare{k}.sqlite", rows))
        emit("buffer_ingest", len(rows) / min(ours), "readings/s", len(rows) / min(bare))

        sync = Sync(max_batch=20, max_inflight=20, backlog_rate=0)
        with Broker() as broker:
            rows = readings(args.drain)
            ours, bare = [], []
            for _ in range(2):
                ours.append(drain_ours(work, broker.port, rows, sync))
                bare.append(drain_bare(broker.port, rows, sync))
            emit("backlog_drain", len(rows) / min(ours), "readings/s", len(rows) / min(bare))

            if args.hour:
                hour = readings(3600 * DEVICES)
                t_ours = drain_ours(work, broker.port, hour, sync)
                t_bare = drain_bare(broker.port, hour, sync)
                emit("drain_1h_50_devices_unlimited", t_ours, "s", t_bare)
                rate = Sync().backlog_rate
                # With the default limit the backlog goes at `rate` while live data (50/s)
                # flows beside it: the drain time is set by the limit, not by the machine.
                emit("drain_1h_50_devices_default_rate_computed", len(hour) / rate, "s", t_ours)


if __name__ == "__main__":
    main()
