"""The local store-and-forward buffer: an SQLite file (WAL) holding every outgoing record.

Each record belongs to a stream (``telemetry``, ``events``, ``results``) and gets that
stream's next sequence number when it is written. Records are sent in sequence order; the
per-stream watermark ``delivered_seq`` moves forward only when the broker acknowledged
everything up to it, so a restart resumes from the oldest undelivered record.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``: a committed batch survives a
power cut (an fsync of the WAL per commit; batching keeps that to about one per second).

Disk cap (``buffer.max_mb``): the database file, its WAL and its shared-memory index together
stay under the cap. When the records pass a high-water mark, delivered records are pruned
first, then undelivered telemetry is dropped oldest first down to a low-water mark; events and
command results are never dropped. Each drop is recorded (table ``drops``) and reported as a
``telemetry_dropped`` event naming the sequence range. See docs/buffer.md.

At start-up a damaged, foreign, locked or unwritable file is refused with a ``BufferError``
that says what to do; the file is inspected through a read-only connection first and is never
modified, renamed or replaced. An advisory lock (``<file>.lock``) keeps a second agent out.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

STREAMS = ("results", "events", "telemetry")

log = logging.getLogger("lmt.agent.buffer")

APPLICATION_ID = 0x4C4D5442  # "LMTB" in the file header: this file is an lmt-edge buffer
SCHEMA_VERSION = 2  # 1: outbox, stream_state, shed_loads, seen_commands; 2: + drops, last_seq
# (+ dr_state, optout_requests and mode_store, created when missing: older versions ignore them)
DEFAULT_MAX_MB = 256.0
HIGH_WATER = 0.90  # of the records' budget: past this, make room ...
LOW_WATER = 0.80  # ... down to this
SHM_BYTES = 32768  # the WAL index (<file>-shm) for up to 4096 WAL frames
ROW_OVERHEAD = 40  # bytes per row beyond its JSON body: record header, key, index entry


_OPTOUT_DDL = ("CREATE TABLE IF NOT EXISTS optout_requests (id INTEGER PRIMARY KEY, "
               "event_id TEXT NOT NULL, reason TEXT NOT NULL, requested_at REAL NOT NULL) STRICT")


def request_optout(path: Path | str, event_id: str, reason: str, now: float) -> int:
    """Queue the customer's opt-out of a DR event in the buffer file of a running (or stopped)
    agent; the agent applies it in its next control cycle. The agent holds the file open in
    WAL mode: this is a second, short connection that waits for its write lock. Returns the
    request id; ``FileNotFoundError`` when the buffer file does not exist (never made here).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no buffer file at {path} (has the agent run with this "
                                "configuration?)")
    con = sqlite3.connect(path.resolve().as_uri() + "?mode=rw", uri=True, isolation_level=None,
                          timeout=10.0)
    try:
        con.execute("PRAGMA busy_timeout = 10000")
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute(_OPTOUT_DDL)
            cur = con.execute("INSERT INTO optout_requests(event_id, reason, requested_at) "
                              "VALUES (?, ?, ?)", [event_id, reason, now])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return int(cur.lastrowid or 0)
    finally:
        con.close()


class BufferError(Exception):
    """The buffer file cannot be opened or used."""


@dataclass(frozen=True)
class Record:
    stream: str
    seq: int
    ts: float
    body: dict[str, Any]


class Buffer:
    def __init__(self, path: Path | str, max_mb: float = DEFAULT_MAX_MB) -> None:
        self.path = Path(path)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._lock_fd: int | None = None
        self._closed = False
        self._full = False  # events and results alone fill the cap (buffer_full reported)
        self._full_event: dict[str, Any] | None = None  # buffer_full event to write next
        self._open_drop: int | None = None  # drops.id still growing (new telemetry refused)
        try:
            self._prepare_location()
            self._take_lock()
            fresh = self._inspect()
            self._open(fresh)
        except BufferError:
            self._release_lock()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._release_lock()
            raise self._error(exc) from exc
        try:
            self._next_seq = {s: self._max_seq(s) + 1 for s in STREAMS}
            self._configure_cap()
            self._startup_cap()
        except (sqlite3.Error, OSError) as exc:
            self._closed = True
            self.db.close()
            self._release_lock()
            raise self._error(exc) from exc

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
            if "last_seq" not in self.db["stream_state"].columns_dict:
                # the highest seq ever given: survives dropping every record of a stream
                self.db["stream_state"].add_column("last_seq", int, not_null_default=0)
            for s in STREAMS:
                self.db.execute("INSERT OR IGNORE INTO stream_state(stream, delivered_seq) "
                                "VALUES (?, 0)", [s])
            if not self.db["drops"].exists():
                self.db["drops"].create(
                    {"id": int, "ts": float, "stream": str, "first_seq": int, "last_seq": int,
                     "count": int, "reason": str, "event_seq": int}, pk="id",
                    not_null=("ts", "stream", "first_seq", "last_seq", "count", "reason"),
                    strict=True,
                )
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
            if not self.db["dr_state"].exists():  # one row: the DR scheduler's to_dict() JSON
                self.db["dr_state"].create(
                    {"id": int, "state": str, "saved_at": float}, pk="id",
                    not_null=("id", "state", "saved_at"), strict=True,
                )
            self.db.execute(_OPTOUT_DDL)
            if not self.db["mode_store"].exists():  # terminal control modes: params, state, records
                self.db["mode_store"].create(
                    {"key": str, "value": str, "saved_at": float}, pk="key",
                    not_null=("key", "value", "saved_at"), strict=True,
                )

    def _max_seq(self, stream: str) -> int:
        """The highest sequence number ever given in ``stream``: never reused, even when its
        records were pruned or dropped."""
        row = self.db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM outbox WHERE stream = ?), 0), "
            "delivered_seq, last_seq) FROM stream_state WHERE stream = ?", [stream, stream],
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._open_drop is not None or self._full_event is not None:
                self._open_drop = None  # new telemetry was being refused: report it now
                with self.db.atomic():
                    self._emit_pending_events(self._next_seq)
                self._full_event = None
        except sqlite3.Error as exc:
            log.error("buffer %s: could not record the last drop at close (%s); it is "
                      "reported at the next start", self.path, exc)
        finally:
            self.db.close()
            self._release_lock()

    # -- writing --------------------------------------------------------------------------
    def append(self, stream: str, bodies: Iterable[dict[str, Any]],
               ts: float | None = None) -> list[Record]:
        """Write records in one transaction; each gets the stream's next sequence number.

        The disk cap is kept here: when the new records would pass the high-water mark, room
        is made first (delivered records, then the oldest undelivered telemetry). When events
        and results alone fill the cap, new telemetry is not written (its sequence numbers
        are reported as dropped) and events and results are written regardless."""
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        now = time.time() if ts is None else ts
        rows = [(float(body.get("ts", now)), body, json.dumps(body, separators=(",", ":")))
                for body in bodies]
        if not rows:
            return []
        need = self._estimate(len(text) for _, _, text in rows)
        try:
            keep = self._make_room(stream, need)
            return self._write(stream, rows, keep)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_FULL":
                raise
            # The filesystem is full before the cap: free pages inside the file by dropping
            # old telemetry (SQLite reuses them), then try once more.
            log.error("buffer %s: the disk is full; dropping old telemetry to make room",
                      self.path)
        try:
            keep = self._make_room(stream, need, disk_full=True)
            return self._write(stream, rows, keep)
        except sqlite3.OperationalError as exc:
            raise self._error(exc, at_start=False) from exc

    def _write(self, stream: str, rows: list[tuple[float, dict[str, Any], str]],
               keep: bool) -> list[Record]:
        nxt = dict(self._next_seq)
        first = nxt[stream]
        records = [Record(stream, first + i, rts, body) for i, (rts, body, _) in enumerate(rows)]
        nxt[stream] = first + len(records)
        open_drop = self._open_drop
        with self.db.atomic():
            if keep:
                open_drop = None  # telemetry is written again: the refused range is complete
                self.db.conn.executemany(
                    "INSERT INTO outbox(stream, seq, ts, body) VALUES (?, ?, ?, ?)",
                    [(stream, r.seq, r.ts, text) for r, (_, _, text) in zip(records, rows,
                                                                             strict=True)],
                )
            else:
                open_drop = self._record_drop(
                    stream, first, records[-1].seq, len(records),
                    f"disk cap {self.max_bytes / 2**20:g} MB full of undelivered events and "
                    "results: new telemetry not written", extend=open_drop)
            self._emit_pending_events(nxt, skip=open_drop)
        self._full_event = None
        if open_drop is not None and open_drop != self._open_drop:
            log.warning("buffer %s: new telemetry is not written from seq %d on (reported as "
                        "dropped when there is room again)", self.path, first)
        self._open_drop = open_drop
        self._next_seq = nxt
        return records

    # -- reading and delivery ---------------------------------------------------------------
    def pending(self, stream: str, after_seq: int, limit: int,
                upto_seq: int | None = None) -> list[Record]:
        """Up to ``limit`` records with ``after_seq < seq <= upto_seq``, in sequence order."""
        rows = self.db.execute(
            "SELECT seq, ts, body FROM outbox WHERE stream = ? AND seq > ? AND seq <= ? "
            "ORDER BY seq LIMIT ?",
            [stream, after_seq, (1 << 62) if upto_seq is None else upto_seq, limit],
        ).fetchall()
        return [Record(stream, int(s), float(t), json.loads(b)) for s, t, b in rows]

    def pending_batch(self, stream: str, after_seq: int, limit: int,
                      upto_seq: int | None = None) -> tuple[int, int, str] | None:
        """The next up to ``limit`` records after ``after_seq`` (and up to ``upto_seq``) as
        one JSON array body ready to publish: (first seq, last seq, ``{"seq":…,…},…``). The
        text is assembled inside SQLite, in sequence order (the ordered subquery feeds the
        aggregate row by row); each stored body gains its ``seq`` as first key."""
        row = self.db.execute(
            "SELECT MIN(seq), MAX(seq), group_concat(rec, ',') FROM ("
            " SELECT seq, CASE WHEN body = '{}' THEN '{\"seq\":' || seq || '}'"
            " ELSE '{\"seq\":' || seq || ',' || substr(body, 2) END AS rec"
            " FROM outbox WHERE stream = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?)",
            [stream, after_seq, (1 << 62) if upto_seq is None else upto_seq, limit],
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return int(row[0]), int(row[1]), row[2]

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

    # -- acknowledged ranges above the watermark (live data acknowledged before the backlog) --
    def _ensure_acked_table(self) -> None:
        if not self.db["acked"].exists():
            self.db["acked"].create({"stream": str, "first": int, "last": int},
                                    pk=("stream", "first"), not_null=("stream", "first", "last"),
                                    strict=True)

    def acked_ranges(self, stream: str) -> list[tuple[int, int]]:
        """Acknowledged ranges above ``delivered_seq``, in order."""
        return [(int(a), int(b)) for a, b in self.db.execute(
            "SELECT first, last FROM acked WHERE stream = ? ORDER BY first", [stream]).fetchall()]

    def mark_acked(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        """The broker acknowledged these (stream, first seq, last seq) ranges, in any order.

        Ranges touching the watermark move it forward; the others are kept (in one small
        table) so that they are not sent again, even after a restart."""
        by_stream: dict[str, list[tuple[int, int]]] = {}
        for stream, first, last in ranges:
            by_stream.setdefault(stream, []).append((first, last))
        with self.db.atomic():
            for stream, new in by_stream.items():
                delivered = self.delivered_seq(stream)
                merged: list[list[int]] = []
                for a, b in sorted(self.acked_ranges(stream) + new):
                    if b <= delivered:
                        continue
                    if merged and a <= merged[-1][1] + 1:
                        merged[-1][1] = max(merged[-1][1], b)
                    else:
                        merged.append([a, b])
                while merged and merged[0][0] <= delivered + 1:
                    delivered = max(delivered, merged.pop(0)[1])
                self.db.execute("UPDATE stream_state SET delivered_seq = MAX(delivered_seq, ?) "
                                "WHERE stream = ?", [delivered, stream])
                self.db.execute("DELETE FROM acked WHERE stream = ?", [stream])
                self.db.conn.executemany("INSERT INTO acked(stream, first, last) VALUES (?, ?, ?)",
                                         [(stream, a, b) for a, b in merged])

    def unacked_ranges(self, stream: str) -> list[tuple[int, int]]:
        """The sequence ranges written but not yet acknowledged (some may have been dropped)."""
        out: list[tuple[int, int]] = []
        nxt = self.delivered_seq(stream) + 1
        for a, b in self.acked_ranges(stream):
            if a > nxt:
                out.append((nxt, a - 1))
            nxt = max(nxt, b + 1)
        if nxt <= self.last_seq(stream):
            out.append((nxt, self.last_seq(stream)))
        return out

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

    def set_shed_many(self, loads: list[str], command_id: str | None, since: float) -> None:
        """:meth:`set_shed` for several loads in one transaction (one fsync)."""
        with self.db.atomic():
            self.db.conn.executemany("INSERT OR REPLACE INTO shed_loads(load, command_id, since) "
                                "VALUES (?, ?, ?)", [(ld, command_id, since) for ld in loads])

    def clear_shed_many(self, loads: list[str]) -> None:
        with self.db.atomic():
            self.db.conn.executemany("DELETE FROM shed_loads WHERE load = ?", [(ld,) for ld in loads])

    def shed_loads(self) -> dict[str, str | None]:
        """Load name -> id of the command that shed it."""
        return {r[0]: r[1] for r in
                self.db.execute("SELECT load, command_id FROM shed_loads").fetchall()}

    def shed_since(self) -> dict[str, float]:
        """Load name -> when (wall clock) it was shed."""
        return {r[0]: float(r[1]) for r in
                self.db.execute("SELECT load, since FROM shed_loads").fetchall()}

    # -- demand response: the scheduler's state, and the customer's opt-out requests ---------
    def save_dr_state(self, state: dict[str, Any], now: float) -> None:
        with self.db.atomic():
            self.db.execute("INSERT OR REPLACE INTO dr_state(id, state, saved_at) VALUES (1, ?, ?)",
                            [json.dumps(state, separators=(",", ":")), now])

    def load_dr_state(self) -> dict[str, Any] | None:
        row = self.db.execute("SELECT state FROM dr_state WHERE id = 1").fetchone()
        return None if row is None else json.loads(row[0])

    # -- terminal control modes: "params" (ModeParams), "state" (ModeState), "records" ------
    def save_mode(self, key: str, value: Any, now: float) -> None:
        with self.db.atomic():
            self.db.execute("INSERT OR REPLACE INTO mode_store(key, value, saved_at) VALUES (?, ?, ?)",
                            [key, json.dumps(value, separators=(",", ":")), now])

    def load_mode(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM mode_store WHERE key = ?", [key]).fetchone()
        return None if row is None else json.loads(row[0])

    def pending_optouts(self) -> list[tuple[int, str, str, float]]:
        """Opt-out requests not yet handled, oldest first: (id, event id, reason, requested at)."""
        return [(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in self.db.execute(
            "SELECT id, event_id, reason, requested_at FROM optout_requests ORDER BY id")]

    def optout_done(self, request_id: int) -> None:
        with self.db.atomic():
            self.db.execute("DELETE FROM optout_requests WHERE id = ?", [request_id])

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

    # -- start-up: refuse a file we cannot use, never touch it ---------------------------------
    def _prepare_location(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise self._refuse(f"its folder {self.path.parent} cannot be made: that name "
                               "is taken by a file", "Give buffer.path in a folder.") from None
        if self.path.exists() and not self.path.is_file():
            raise self._refuse("is not a regular file",
                               "buffer.path must name a file (it is made when missing).")

    def _take_lock(self) -> None:
        """An advisory lock next to the file, held while open: two agents never share one."""
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise self._refuse(
                    f"is in use by another lmt agent (process {holder or 'unknown'}, lock "
                    f"file {lock.name})",
                    "Only one agent may use a buffer: stop the other one, or give this agent "
                    "its own buffer.path.") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the lock file stays (no race)
            self._lock_fd = None

    def _inspect(self) -> bool:
        """Check an existing file through a read-only connection; True when it is new/empty.

        A read-only connection never writes the file nor checkpoints a WAL into it, so a file
        that fails a check is exactly as it was."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            if not os.access(self.path.parent, os.W_OK):
                raise self._error(PermissionError(errno.EACCES, "folder not writable"))
            return True
        os.close(os.open(self.path, os.O_RDWR | os.O_CLOEXEC))  # writable? (writes nothing)
        sidecars = [Path(f"{self.path}{x}") for x in ("-wal", "-shm")]
        existed = [x.exists() for x in sidecars]
        ok = False
        con = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True,
                              isolation_level=None, timeout=2.0)
        try:
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = [r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            if app_id not in (0, APPLICATION_ID):
                raise self._refuse(f"belongs to another application (SQLite application_id "
                                   f"{app_id:#x})", self._WRONG_FILE)
            if not tables:
                ok = True
                return True
            cols = {t: {r[1] for r in con.execute(f'PRAGMA table_info("{t}")')}
                    for t in ("outbox", "stream_state") if t in tables}
            if not ({"stream", "seq", "ts", "body"} <= cols.get("outbox", set())
                    and {"stream", "delivered_seq"} <= cols.get("stream_state", set())):
                raise self._refuse("is an SQLite database but not an lmt-edge buffer (tables: "
                                   f"{', '.join(tables)})", self._WRONG_FILE)
            if version > SCHEMA_VERSION:
                raise self._refuse(f"was written by a newer lmt-edge (buffer schema {version}; "
                                   f"this version knows up to {SCHEMA_VERSION})",
                                   "Upgrade lmt-edge, or move the file aside.")
            problems = [r[0] for r in con.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                found = "; ".join(" ".join(str(x).split()) for x in problems)
                raise self._refuse(f"is damaged (SQLite quick_check: {found})",
                                   self._salvage_hint())
            ok = True
            return False
        finally:
            con.close()
            if not ok:  # leave no trace: remove the empty side files this check made
                for side, was in zip(sidecars, existed, strict=True):
                    try:
                        if not was and (side.name.endswith("-shm") or side.stat().st_size == 0):
                            side.unlink()
                    except OSError:
                        pass

    def _open(self, fresh: bool) -> None:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                               timeout=2.0)
        self.db = sqlite_utils.Database(conn)
        try:
            if fresh:  # before the first table: lets a lowered cap shrink the file later
                self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise self._refuse(f"cannot be switched to WAL mode (journal_mode {mode})",
                                   "Put the buffer on a local filesystem (not a network "
                                   "share).")
            self.db.execute("PRAGMA synchronous = FULL")
            # Take the write lock now: another process holding it is a clear start-up error,
            # not a stall at the first reading.
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self._create_schema()
                self._ensure_acked_table()
                self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self.db.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            self.db.execute("PRAGMA busy_timeout = 5000")
        except BaseException:
            conn.close()
            raise

    _WRONG_FILE = ("Check buffer.path in the configuration: it must name a file of its own "
                   "(a new buffer is made when the file is missing).")

    def _salvage_hint(self) -> str:
        name = self.path.name
        return (f"Move it aside (for example rename it to {name}.damaged, with {name}-wal if "
                "there is one) and start again with a new, empty buffer; undelivered records "
                f"can be salvaged from the old file with `sqlite3 {name}.damaged .recover`.")

    def _refuse(self, what: str, todo: str, at_start: bool = True) -> BufferError:
        kept = (" The file is left as it is for inspection."
                if at_start and self.path.exists() and self.path.stat().st_size else "")
        verb = "cannot open the buffer" if at_start else "cannot write the buffer"
        return BufferError(f"{self.path}: {verb}: it {what}. {todo}{kept}")

    def _error(self, exc: BaseException, at_start: bool = True) -> BufferError:
        """Turn an SQLite or OS error into a message that says what to do."""
        name = getattr(exc, "sqlite_errorname", "") or ""
        code = exc.errno if isinstance(exc, OSError) else None
        detail = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        writable = ("The agent's user must be able to write the file and its folder (SQLite "
                    f"makes {self.path.name}-wal and {self.path.name}-shm next to it), on a "
                    "filesystem mounted read-write.")
        if name.startswith("SQLITE_NOTADB"):
            what = "is not an SQLite database (damaged, or another kind of file)"
            todo = self._salvage_hint()
        elif name.startswith("SQLITE_CORRUPT"):
            what, todo = f"is damaged ({detail})", self._salvage_hint()
        elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            what = "is locked by another process"
            todo = ("Only one program may write a buffer: stop the other one (`fuser "
                    f"{self.path.name}` names it) and start again.")
        elif name.startswith("SQLITE_FULL") or code == errno.ENOSPC:
            what = "cannot be written: the disk is full"
            todo = ("Free space on the filesystem that holds it (buffer.max_mb caps the "
                    "buffer itself, not what else fills the disk).")
        elif name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM",
                              "SQLITE_AUTH")) or code in (errno.EACCES, errno.EPERM,
                                                          errno.EROFS):
            what, todo = f"cannot be written ({detail})", writable
        elif code == errno.ENOTDIR:
            what = f"cannot be made there ({detail}: a part of its folder's path is a file)"
            todo = "Give buffer.path in a folder."
        elif name.startswith("SQLITE_IOERR") or code == errno.EIO:
            what = f"cannot be read or written: I/O error ({detail})"
            todo = ("The storage may be failing (a worn SD card?): check the kernel log "
                    "(dmesg) and the card.")
        else:
            what, todo = f"cannot be used ({type(exc).__name__}: {detail})", writable
        return self._refuse(what, todo, at_start)

    # -- disk cap ---------------------------------------------------------------------------
    def _configure_cap(self) -> None:
        self.page_size = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        # The WAL is checkpointed every wal_pages pages and cut back to that size after: it
        # stays under two of those (one more large transaction), plus its 32 KiB index.
        wal_pages = min(1000, max(16, self.max_bytes // self.page_size // 32))
        self.db.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
        self.db.execute(f"PRAGMA journal_size_limit = {wal_pages * self.page_size}")
        self.wal_allowance = 2 * wal_pages * self.page_size + SHM_BYTES
        budget = self.max_bytes - self.wal_allowance
        if budget < 256 * 1024:
            self.close()
            raise ValueError(f"buffer cap {self.max_bytes / 2**20:g} MB is too small (at least "
                             f"{(self.wal_allowance + 256 * 1024) / 2**20:.2f} MB)")
        self.high_water = int(budget * HIGH_WATER)
        self.low_water = int(budget * LOW_WATER)
        self._chunk_bytes = max(64 * 1024, wal_pages * self.page_size // 2)

    def _startup_cap(self) -> None:
        """Report drops that were recorded but not yet reported (a crash in between), and
        bring a file over the cap (the cap was lowered) back under it."""
        if self._live_bytes() > self.high_water:
            self._make_room("events", 0)
            if self.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
                # give the free pages back (executescript: it steps the pragma to the end)
                self.db.conn.executescript("PRAGMA incremental_vacuum;")
                self._checkpoint()
            elif self._file_bytes() > self.high_water:
                log.warning("buffer %s (%.1f MB) is larger than its cap allows; it will not "
                            "grow, and shrinks only with an offline VACUUM", self.path,
                            self._file_bytes() / 2**20)
        with self.db.atomic():
            self._emit_pending_events(self._next_seq)
        self._full_event = None

    @staticmethod
    def _estimate(lengths: Iterable[int]) -> int:
        """Bytes that rows with JSON bodies of these lengths take in the file, with margin."""
        return int(sum(n + ROW_OVERHEAD for n in lengths) * 1.15)

    def _live_bytes(self) -> int:
        """Bytes of the pages in use: what the file needs (free pages are reused)."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self.page_size

    def _file_bytes(self) -> int:
        return int(self.db.execute("PRAGMA page_count").fetchone()[0]) * self.page_size

    def _checkpoint(self) -> None:
        """Copy the WAL into the file and cut it to zero bytes (needs no other reader)."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _make_room(self, stream: str, need: int, disk_full: bool = False) -> bool:
        """Make room for ``need`` bytes of new ``stream`` records; False: do not write them."""
        live = self._live_bytes()
        if not disk_full and live + need <= self.high_water:
            return self._room_again(live + need)
        target = self.low_water - need
        if disk_full:
            target = min(target, live - max(2 * need, self._chunk_bytes))
        freed = self._prune_for_room(target)
        freed += self._drop_for_room(target, "disk full" if disk_full else
                                     f"disk cap {self.max_bytes / 2**20:g} MB: oldest "
                                     "undelivered telemetry dropped")
        if freed:
            self._checkpoint()
        live = self._live_bytes()
        if disk_full or live + need <= self.high_water:
            return self._room_again(live + need)
        if not self._full:
            self._full = True
            undelivered = {s: self.db.execute(
                "SELECT COUNT(*) FROM outbox WHERE stream = ? AND seq > ?",
                [s, self.delivered_seq(s)]).fetchone()[0] for s in ("events", "results")}
            log.error("buffer %s: undelivered events and results fill the %g MB disk cap "
                      "(%d events, %d results); they are kept (the file grows past the cap) "
                      "and new telemetry is not written until they are delivered", self.path,
                      self.max_bytes / 2**20, undelivered["events"], undelivered["results"])
            self._full_event = {
                "ts": time.time(), "type": "buffer_full",
                "data": {"cap_mb": round(self.max_bytes / 2**20, 3),
                         "used_mb": round(live / 2**20, 3),
                         "undelivered_events": undelivered["events"],
                         "undelivered_results": undelivered["results"],
                         "detail": "events and results are kept beyond the cap; new telemetry "
                                   "is not written until they are delivered"}}
        return stream != "telemetry"

    def _room_again(self, used: int) -> bool:
        if self._full and used <= self.low_water:
            self._full = False
            log.warning("buffer %s: room again under the disk cap; telemetry is written again",
                        self.path)
        return True

    def _delivered_ranges(self, stream: str) -> list[tuple[int, int]]:
        done = self.delivered_seq(stream)
        return ([(1, done)] if done else []) + list(self.acked_ranges(stream))

    def _chunk(self, stream: str, first: int, last: int, want: int) -> tuple[int, int] | None:
        """The oldest records of ``stream`` in [first, last] worth about ``want`` bytes (at
        most one chunk, so one transaction stays small): (first seq, last seq) or None."""
        want = max(1, min(want, self._chunk_bytes))
        got, start, upto = 0, None, None
        for seq, size in self.db.execute(
                "SELECT seq, length(body) FROM outbox WHERE stream = ? AND seq BETWEEN ? AND ? "
                "ORDER BY seq LIMIT 2000", [stream, first, last]):
            start = seq if start is None else start
            upto = seq
            got += self._estimate([size])
            if got >= want:
                break
        return None if start is None or upto is None else (int(start), int(upto))

    def _prune_for_room(self, target: int) -> int:
        """Delete delivered records (telemetry, then events, then results; oldest first)
        until the records fit in ``target`` bytes; return how many."""
        n = 0
        for stream in ("telemetry", "events", "results"):
            for first, last in self._delivered_ranges(stream):
                while (over := self._live_bytes() - target) > 0:
                    got = self._chunk(stream, first, last, over)
                    if got is None:
                        break
                    with self.db.atomic():
                        n += self.db.execute(
                            "DELETE FROM outbox WHERE stream = ? AND seq BETWEEN ? AND ?",
                            [stream, got[0], got[1]]).rowcount
                    first = got[1] + 1
        return n

    def _drop_for_room(self, target: int, reason: str) -> int:
        """Drop undelivered telemetry, oldest first, until the records fit in ``target``
        bytes; each contiguous range becomes one drop. Return how many records."""
        n = 0
        drop: int | None = None
        for first, last in self.unacked_ranges("telemetry"):
            while (over := self._live_bytes() - target) > 0:
                got = self._chunk("telemetry", first, last, over)
                if got is None:
                    break
                with self.db.atomic():
                    count = self.db.execute(
                        "DELETE FROM outbox WHERE stream = 'telemetry' AND seq BETWEEN ? AND ?",
                        list(got)).rowcount
                    drop = self._record_drop("telemetry", got[0], got[1], count, reason,
                                             extend=drop)
                n += count
                first = got[1] + 1
        if drop is not None:
            d = self.db.execute("SELECT first_seq, last_seq FROM drops WHERE id = ?",
                                [drop]).fetchone()
            log.warning("buffer %s: %s: telemetry %d..%d (%d records)", self.path, reason,
                        d[0], d[1], n)
        return n

    def _record_drop(self, stream: str, first: int, last: int, count: int, reason: str,
                     extend: int | None = None) -> int:
        """Record dropped records (in the caller's transaction); return the drop's id.

        The dropped range counts as settled: the delivered watermark moves over it like over
        acknowledged records, so the sync never waits for it and retention keeps working."""
        row = None if extend is None else self.db.execute(
            "SELECT last_seq FROM drops WHERE id = ? AND event_seq IS NULL", [extend]).fetchone()
        if row is not None and row[0] + 1 == first:
            self.db.execute("UPDATE drops SET last_seq = ?, count = count + ? WHERE id = ?",
                            [last, count, extend])
            drop_id = extend
        else:
            cur = self.db.execute(
                "INSERT INTO drops(ts, stream, first_seq, last_seq, count, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)", [time.time(), stream, first, last, count, reason])
            drop_id = int(cur.lastrowid or 0)
        self.db.execute("UPDATE stream_state SET last_seq = MAX(last_seq, ?) WHERE stream = ?",
                        [last, stream])
        self.mark_acked([(stream, first, last)])
        return drop_id

    def _emit_pending_events(self, nxt: dict[str, int], skip: int | None = None) -> None:
        """Write the events owed (in the caller's transaction): a ``telemetry_dropped`` per
        unreported drop, ``buffer_full``; ``nxt`` (next seq per stream) is advanced. The
        caller clears ``_full_event`` once its transaction committed."""
        bodies: list[tuple[int | None, dict[str, Any]]] = []
        for drop_id, dts, stream, first, last, count, reason in self.db.execute(
                "SELECT id, ts, stream, first_seq, last_seq, count, reason FROM drops "
                "WHERE event_seq IS NULL ORDER BY id").fetchall():
            if drop_id == skip:
                continue
            bodies.append((drop_id, {"ts": dts, "type": f"{stream}_dropped",
                                     "data": {"stream": stream, "first_seq": first,
                                              "last_seq": last, "count": count,
                                              "reason": reason}}))
        if self._full_event is not None:
            bodies.append((None, self._full_event))
        for drop_id, body in bodies:
            seq = nxt["events"]
            nxt["events"] = seq + 1
            self.db.execute("INSERT INTO outbox(stream, seq, ts, body) VALUES ('events', ?, ?, ?)",
                            [seq, float(body["ts"]), json.dumps(body, separators=(",", ":"))])
            if drop_id is not None:
                self.db.execute("UPDATE drops SET event_seq = ? WHERE id = ?", [seq, drop_id])

    def drops(self) -> list[dict[str, Any]]:
        """Every drop: stream, first_seq, last_seq, count, reason, ts, event_seq (the
        ``telemetry_dropped`` event that reported it; None until written)."""
        cols = ("id", "ts", "stream", "first_seq", "last_seq", "count", "reason", "event_seq")
        return [dict(zip(cols, r, strict=True)) for r in self.db.execute(
            f"SELECT {', '.join(cols)} FROM drops ORDER BY id").fetchall()]

    def usage(self) -> dict[str, Any]:
        """Disk use against the cap, for status and diagnostics (bytes)."""
        sizes = {x: (os.stat(f"{self.path}{x}").st_size if os.path.exists(f"{self.path}{x}")
                     else 0) for x in ("", "-wal", "-shm")}
        return {"max_bytes": self.max_bytes, "high_water": self.high_water,
                "low_water": self.low_water, "records_bytes": self._live_bytes(),
                "file_bytes": sizes[""], "wal_bytes": sizes["-wal"], "shm_bytes": sizes["-shm"],
                "full": self._full}
