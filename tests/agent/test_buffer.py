"""The SQLite buffer: sequence numbers, delivery watermark, restart, replay memory."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lmt.agent.buffer import BufferError, BufferFile
from lmt.agent.outbox import Outbox
from lmt.agent.state_store import StateStore


def test_sequences_per_stream_survive_restart(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    b = Outbox.open(path)
    recs = b.append("telemetry", [{"ts": 1.0, "v": i} for i in range(5)])
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5]
    assert [r.seq for r in b.append("events", [{"ts": 2.0}])] == [1]
    b.mark_delivered("telemetry", 3)
    b.close()

    b = Outbox.open(path)
    assert b.delivered_seq("telemetry") == 3
    assert [r.body["v"] for r in b.pending("telemetry", b.delivered_seq("telemetry"), 10)] == [3, 4]
    assert [r.seq for r in b.append("telemetry", [{"ts": 3.0}])] == [6]
    assert b.undelivered_count("telemetry") == 3
    # the watermark never moves back
    b.mark_delivered("telemetry", 1)
    assert b.delivered_seq("telemetry") == 3
    b.close()


def test_wal_and_durability_settings(tmp_path: Path) -> None:
    b = Outbox.open(tmp_path / "b.sqlite")
    assert b.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert b.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    b.close()


def test_command_ids_are_remembered(tmp_path: Path) -> None:
    f = BufferFile(tmp_path / "b.sqlite")
    s = StateStore(f)
    assert not s.command_seen("c1")
    s.remember_command("c1", expires_at=100.0, now=50.0)
    f.close()
    f = BufferFile(tmp_path / "b.sqlite")
    assert StateStore(f).command_seen("c1")
    f.close()


def test_state_and_records_share_one_transaction(tmp_path: Path) -> None:
    """A cycle's state and its records are saved together or not at all."""
    f = BufferFile(tmp_path / "b.sqlite")
    out, store = Outbox(f), StateStore(f)
    with pytest.raises(RuntimeError), out.transaction():
        store.save("supervisor", {"v": 1}, now=1.0)
        out.append("events", [{"ts": 1.0, "type": "agent_started", "data": {}}])
        raise RuntimeError("crash before the commit")
    assert store.load("supervisor") is None
    assert out.pending("events", 0, 10) == []
    assert out.last_seq("events") == 0  # the rolled-back seq is given again: no gap
    with out.transaction():
        store.save("supervisor", {"v": 1}, now=1.0)
        out.append("events", [{"ts": 1.0, "type": "agent_started", "data": {}}])
    f.close()
    f = BufferFile(tmp_path / "b.sqlite")
    assert StateStore(f).load("supervisor") == {"v": 1}
    assert len(Outbox(f).pending("events", 0, 10)) == 1
    f.close()


def test_corrupt_file_is_reported_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    junk = b"this is not an sqlite database" * 100
    path.write_bytes(junk)
    with pytest.raises(BufferError, match="left as it is"):
        Outbox.open(path)
    assert path.read_bytes() == junk


def test_unknown_stream_refused(tmp_path: Path) -> None:
    b = Outbox.open(tmp_path / "b.sqlite")
    with pytest.raises(ValueError):
        b.append("nope", [{}])
    b.close()
    assert sqlite3.connect(tmp_path / "b.sqlite").execute("SELECT COUNT(*) FROM outbox").fetchone()
