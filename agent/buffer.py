"""The local store-and-forward buffer: an SQLite file (WAL) holding every outgoing record.

Each record belongs to a stream (``telemetry``, ``events``, ``results``) and gets that
stream's next sequence number when it is written. Records are sent in sequence order; the
per-stream watermark ``delivered_seq`` moves forward only when the broker acknowledged
everything up to it, so a restart resumes from the oldest undelivered record.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``: a committed batch survives a
power cut (an fsync of the WAL per commit; batching keeps that to about one per second).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

STREAMS = ("results", "events", "telemetry")


class BufferError(Exception):
    """The buffer file cannot be opened or used."""


@dataclass(frozen=True)
class Record:
    stream: str
    seq: int
    ts: float
    body: dict[str, Any]


class Buffer:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA busy_timeout = 5000")
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("PRAGMA quick_check").fetchall()
            self._create_schema()
        except (sqlite3.DatabaseError, OSError) as exc:
            raise BufferError(f"{self.path}: cannot open the buffer ({exc}); the file is left "
                              "as it is for inspection") from exc
        self._next_seq = {s: self._max_seq(s) + 1 for s in STREAMS}

    def _create_schema(self) -> None:
        with self.db.atomic():
            if not self.db["outbox"].exists():
                self.db["outbox"].create(
                    {"stream": str, "seq": int, "ts": float, "body": str},
                    pk=("stream", "seq"), not_null=("stream", "seq", "ts", "body"), strict=True,
                )
            if not self.db["stream_state"].exists():
                self.db["stream_state"].create(
                    {"stream": str, "delivered_seq": int}, pk="stream",
                    not_null=("stream", "delivered_seq"), strict=True,
                )
            for s in STREAMS:
                self.db.execute("INSERT OR IGNORE INTO stream_state(stream, delivered_seq) "
                                "VALUES (?, 0)", [s])
            if not self.db["shed_loads"].exists():
                self.db["shed_loads"].create(
                    {"load": str, "command_id": str, "since": float}, pk="load",
                    not_null=("load", "since"), strict=True,
                )
            if not self.db["seen_commands"].exists():
                self.db["seen_commands"].create(
                    {"id": str, "expires_at": float, "received_at": float}, pk="id",
                    not_null=("id", "expires_at", "received_at"), strict=True,
                )

    def _max_seq(self, stream: str) -> int:
        row = self.db.execute("SELECT MAX(seq) FROM outbox WHERE stream = ?", [stream]).fetchone()
        if row[0] is not None:
            return int(row[0])
        return self.delivered_seq(stream)

    def close(self) -> None:
        self.db.close()

    # -- writing --------------------------------------------------------------------------
    def append(self, stream: str, bodies: Iterable[dict[str, Any]],
               ts: float | None = None) -> list[Record]:
        """Write records in one transaction; each gets the stream's next sequence number."""
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        now = time.time() if ts is None else ts
        records: list[Record] = []
        seq = self._next_seq[stream]
        for body in bodies:
            rts = float(body.get("ts", now))
            records.append(Record(stream, seq, rts, body))
            seq += 1
        if not records:
            return records
        with self.db.atomic():
            self.db.conn.executemany(
                "INSERT INTO outbox(stream, seq, ts, body) VALUES (?, ?, ?, ?)",
                [(r.stream, r.seq, r.ts, json.dumps(r.body, separators=(",", ":")))
                 for r in records],
            )
        self._next_seq[stream] = seq
        return records

    # -- reading and delivery ---------------------------------------------------------------
    def pending(self, stream: str, after_seq: int, limit: int) -> list[Record]:
        rows = self.db.execute(
            "SELECT seq, ts, body FROM outbox WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
            [stream, after_seq, limit],
        ).fetchall()
        return [Record(stream, int(s), float(t), json.loads(b)) for s, t, b in rows]

    def delivered_seq(self, stream: str) -> int:
        row = self.db.execute("SELECT delivered_seq FROM stream_state WHERE stream = ?",
                              [stream]).fetchone()
        return int(row[0]) if row else 0

    def last_seq(self, stream: str) -> int:
        return self._next_seq[stream] - 1

    def mark_delivered(self, stream: str, upto_seq: int) -> None:
        """The broker acknowledged every record of ``stream`` up to ``upto_seq``."""
        with self.db.atomic():
            self.db.execute(
                "UPDATE stream_state SET delivered_seq = MAX(delivered_seq, ?) WHERE stream = ?",
                [upto_seq, stream],
            )

    def undelivered_count(self, stream: str) -> int:
        return self.last_seq(stream) - self.delivered_seq(stream)

    # -- command replay protection ---------------------------------------------------------
    def command_seen(self, command_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM seen_commands WHERE id = ?", [command_id]).fetchone()
        return row is not None

    def remember_command(self, command_id: str, expires_at: float, now: float) -> None:
        with self.db.atomic():
            self.db.execute("INSERT OR IGNORE INTO seen_commands(id, expires_at, received_at) "
                            "VALUES (?, ?, ?)", [command_id, expires_at, now])
            # An expired id would be refused as expired anyway: forget it after a day's margin.
            self.db.execute("DELETE FROM seen_commands WHERE expires_at < ?", [now - 86400.0])

    # -- loads held off by a command (survives a restart) -------------------------------------
    def set_shed(self, load: str, command_id: str | None, since: float) -> None:
        with self.db.atomic():
            self.db.execute("INSERT OR REPLACE INTO shed_loads(load, command_id, since) "
                            "VALUES (?, ?, ?)", [load, command_id, since])

    def clear_shed(self, load: str) -> None:
        with self.db.atomic():
            self.db.execute("DELETE FROM shed_loads WHERE load = ?", [load])

    def shed_loads(self) -> dict[str, str | None]:
        """Load name -> id of the command that shed it."""
        return {r[0]: r[1] for r in
                self.db.execute("SELECT load, command_id FROM shed_loads").fetchall()}

    # -- retention ----------------------------------------------------------------------------
    def prune_delivered(self, older_than_ts: float) -> int:
        """Delete delivered records older than ``older_than_ts``; return how many."""
        n = 0
        with self.db.atomic():
            for s in STREAMS:
                cur = self.db.execute("DELETE FROM outbox WHERE stream = ? AND seq <= ? AND ts < ?",
                                      [s, self.delivered_seq(s), older_than_ts])
                n += cur.rowcount
        return n
