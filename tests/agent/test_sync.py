"""The agent marks buffered records delivered only after the broker acknowledged them, and
resumes from the oldest unacknowledged record after a broker outage (real mosquitto, real
simulated site over Modbus TCP, SQLite file)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.platform import StreamTracker, _Client
from lmt.config import load_agent_config
from tests.agent.harness import AgentThread, write_agent_config
from tests.conftest import lmt_argv, wait_until


def buffer_state(path: Path, stream: str = "telemetry") -> tuple[int, int]:
    """(delivered watermark, last sequence number), read through a separate connection."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        delivered = con.execute("SELECT delivered_seq FROM stream_state WHERE stream = ?",
                                [stream]).fetchone()[0]
        last = con.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE stream = ?",
                           [stream]).fetchone()[0]
        return int(delivered), int(last)
    finally:
        con.close()


def test_delivered_only_after_ack_and_resumed_after_outage(tmp_path: Path, site: int) -> None:
    broker = Broker().start()
    cfg_path, _ = write_agent_config(tmp_path, site, broker.port,
                                     mqtt={"reconnect_min_s": 1, "reconnect_max_s": 2},
                                     poll={"interval_s": 0.2}, buffer={"flush_interval_s": 0.2})
    db = tmp_path / "buffer.sqlite"
    runner = AgentThread(Agent(load_agent_config(cfg_path))).start()
    sub: _Client | None = None
    try:
        wait_until(lambda: (lambda d, last: d >= 10 and d == last)(*buffer_state(db)), 30,
                   "the first readings to be acknowledged")
        broker.stop()
        # after the broker is gone, nothing more can be acknowledged ...
        wait_until(lambda: not runner.agent.link.connected, 10, "the agent to notice")
        # acknowledgements that arrived before the connection dropped are recorded within
        # the sync's save interval (0.1 s): take the snapshot once a reading came after that
        _, last = buffer_state(db)
        wait_until(lambda: buffer_state(db)[1] >= last + 2, 30, "a reading during the outage")
        frozen, last = buffer_state(db)
        wait_until(lambda: buffer_state(db)[1] >= last + 10, 30, "readings during the outage")
        delivered, last = buffer_state(db)
        assert delivered == frozen, "records marked delivered while the broker was down"
        assert last >= delivered + 10

        # ... and after it is back, the backlog is resent from the oldest unacknowledged record
        broker = Broker(port=broker.port).start()
        sub = _Client("127.0.0.1", broker.port)
        sub.connect(["lmt/v1/+/telemetry"])
        wait_until(lambda: buffer_state(db)[0] >= last, 30, "the backlog to be acknowledged")
        tracker = StreamTracker()
        first = None
        while first is None or tracker.delivered[("demo-0001", "telemetry")] < last:
            msg = sub.messages.get(timeout=10)
            for rec in json.loads(msg.payload)["records"]:
                first = rec["seq"] if first is None else min(first, rec["seq"])
                tracker.accept("demo-0001", "telemetry", rec["seq"])
        assert first is not None and first <= frozen + 1, "the backlog was not resent from its start"
        assert tracker.open_gaps() == []
    finally:
        if sub:
            sub.close()
        runner.stop()
        broker.stop()


def _status(sub: _Client, timeout_s: float = 15.0) -> dict:
    msg = sub.messages.get(timeout=timeout_s)
    assert msg.topic == "lmt/v1/demo-0001/status"
    return json.loads(msg.payload)


def test_retained_status_clean_stop_and_last_will(tmp_path: Path, site: int,
                                                  broker: Broker) -> None:
    """Online is retained on connect; SIGTERM publishes offline; SIGKILL leaves the will."""
    cfg_path, _ = write_agent_config(tmp_path, site, broker.port)
    sub = _Client("127.0.0.1", broker.port)
    sub.connect(["lmt/v1/demo-0001/status"])
    try:
        for stop in ("SIGTERM", "SIGKILL"):
            agent = subprocess.Popen(lmt_argv("run", "--config", str(cfg_path)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            st = _status(sub)
            while not st["online"]:  # the retained offline status of the previous round
                st = _status(sub)
            assert st["devices"] == ["main-meter", "relays"] and st["contract"] == 1
            assert len(st["config_hash"]) == 64 and st["version"]
            if stop == "SIGTERM":
                agent.terminate()
                assert agent.wait(15) == 0
            else:
                agent.kill()
                agent.wait(15)
            off = _status(sub)
            assert off["online"] is False and off["session"] == st["session"], stop
        # a new subscriber sees the retained offline status
        late = _Client("127.0.0.1", broker.port)
        late.connect(["lmt/v1/demo-0001/status"])
        msg = late.messages.get(timeout=10)
        late.close()
        assert msg.retain and json.loads(msg.payload)["online"] is False
    finally:
        sub.close()


def test_stop_during_a_command_restores_the_loads(tmp_path: Path, site: int,
                                                  broker: Broker) -> None:
    from pymodbus.client import ModbusTcpClient

    from lmt.agent.platform import command_body, send, sign_command_file

    cfg_path, key = write_agent_config(tmp_path, site, broker.port)
    runner = AgentThread(Agent(load_agent_config(cfg_path))).start()
    modbus = ModbusTcpClient("127.0.0.1", port=site)
    assert modbus.connect()

    def coils() -> list[bool]:
        return list(modbus.read_coils(0, count=8, device_id=2).bits[:8])

    sub = _Client("127.0.0.1", broker.port)
    sub.connect(["lmt/v1/demo-0001/result"])
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        body = command_body("cap", "demo-0001", cap_kw=50.0, duration_s=600)
        answers = send("127.0.0.1", broker.port, "lmt/v1", "demo-0001",
                       sign_command_file(key, body), timeout_s=20)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: sum(not c for c in coils()[:7]) >= 3, 15, "loads to be shed")
    finally:
        runner.stop()
    try:
        assert all(coils()[:7]), "a load stayed off after the agent stopped"
        statuses = []
        while "failed" not in statuses:
            msg = sub.messages.get(timeout=10)
            statuses += [r["status"] for r in json.loads(msg.payload)["records"]
                         if r["command_id"] == body["id"]]
        assert statuses[-1] == "failed"
    finally:
        sub.close()
        modbus.close()
