"""The outbox: every outgoing record, by stream and sequence number, in the buffer file.

Each record belongs to a stream (``telemetry``, ``events``, ``results``) and gets that
stream's next sequence number when it is written. Records are sent in sequence order; the
per-stream watermark ``delivered_seq`` moves forward only when the broker acknowledged
everything up to it, so a restart resumes from the oldest undelivered record. Acknowledged
ranges above the watermark (live data acknowledged before the backlog) are kept too, so
nothing acknowledged is sent twice.

Disk cap (``buffer.max_mb``): the database file, its WAL and its shared-memory index together
stay under the cap. When the records pass a high-water mark, delivered records are pruned
first, then undelivered telemetry is dropped oldest first down to a low-water mark; events and
command results are never dropped. Each drop is recorded (table ``drops``) and reported as a
``telemetry_dropped`` event naming the sequence range. See docs/buffer.md.

The outbox shares the buffer file (:class:`lmt.agent.buffer.BufferFile`) with the state store;
:mod:`lmt.agent.sync` depends on the outbox alone.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_core import to_json

from .buffer import STREAMS, BufferError, BufferFile

log = logging.getLogger("lmt.agent.buffer")

DEFAULT_MAX_MB = 256.0
HIGH_WATER = 0.90  # of the records' budget: past this, make room ...
LOW_WATER = 0.80  # ... down to this
SHM_BYTES = 32768  # the WAL index (<file>-shm) for up to 4096 WAL frames
ROW_OVERHEAD = 40  # bytes per row beyond its JSON body: record header, key, index entry

__all__ = ["DEFAULT_MAX_MB", "STREAMS", "BufferError", "Outbox", "Record"]


@dataclass(frozen=True)
class Record:
    stream: str
    seq: int
    ts: float
    body: dict[str, Any]


class Outbox:
    """The streams of one buffer file. ``Outbox.open(path)`` opens the file for the outbox
    alone (and closes it with the outbox); the agent opens the file once and gives it to both
    stores."""

    def __init__(self, file: BufferFile, max_mb: float = DEFAULT_MAX_MB,
                 owns_file: bool = False, exempt_bytes: Callable[[], int] | None = None
                 ) -> None:
        self.file = file
        self.exempt_bytes = exempt_bytes
        self.db = file.db
        self.path = file.path
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._owns_file = owns_file
        self._closed = False
        self._full = False  # events and results alone fill the cap (buffer_full reported)
        self._full_event: dict[str, Any] | None = None  # buffer_full event to write next
        self._open_drop: int | None = None  # drops.id still growing (new telemetry refused)
        self._owed = True  # a drop may be unreported (looked up at the next write)
        self._room_left = 0  # bytes that may be written before the file's size is asked again
        self._checkpoint_due = False  # room was made inside a transaction: checkpoint after it
        try:
            self._next_seq = {s: self._max_seq(s) + 1 for s in STREAMS}
            self._configure_cap()
            self._startup_cap()
        except (sqlite3.Error, OSError) as exc:
            self._closed = True
            if owns_file:
                file.close()
            raise self.file._error(exc) from exc

    @classmethod
    def open(cls, path: Path | str, max_mb: float = DEFAULT_MAX_MB) -> Outbox:
        return cls(BufferFile(path), max_mb, owns_file=True)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction of the buffer file (records here, and whatever the caller writes to
        the state store): all or nothing. Rolled back, the sequence numbers it gave are given
        again, so a stream never has a gap nobody reported."""
        saved = (dict(self._next_seq), self._open_drop, self._full_event, self._full)
        try:
            with self.file.atomic():
                yield
        except BaseException:
            self._next_seq, self._open_drop, self._full_event, self._full = saved
            self._owed = True  # what the rolled-back writes reported is owed again
            self._room_left = 0
            raise
        if self._checkpoint_due and not self.db.conn.in_transaction:
            self._checkpoint()

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
            if self._owns_file:
                self.file.close()

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
        # compact JSON, the same text as json.dumps(body, separators=(",", ":")) but faster
        rows = [(float(body.get("ts", now)), body, to_json(body).decode()) for body in bodies]
        if not rows:
            return []
        need = self._estimate(len(text) for _, _, text in rows)
        try:
            keep = self._make_room(stream, need)
            written = self._write(stream, rows, keep)
            if self._checkpoint_due:
                self._checkpoint()  # (postponed again when this runs inside a transaction)
            return written
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
            raise self.file._error(exc, at_start=False) from exc

    def _write(self, stream: str, rows: list[tuple[float, dict[str, Any], str]],
               keep: bool) -> list[Record]:
        nxt = dict(self._next_seq)
        first = nxt[stream]
        records = [Record(stream, first + i, rts, body) for i, (rts, body, _) in enumerate(rows)]
        nxt[stream] = first + len(records)
        open_drop = self._open_drop
        try:
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
                        f"disk cap {self.max_bytes / 2**20:g} MB full of undelivered events "
                        "and results: new telemetry not written", extend=open_drop)
                self._emit_pending_events(nxt, skip=open_drop)
        except BaseException:
            self._owed = True  # what this write would have reported is owed again
            raise
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
        """Bytes of the pages in use: what the file needs (free pages are reused), less what
        the tables of others sharing the file take (``exempt_bytes``: the energy ledger's
        intervals, sized by their own retention, never by this cap)."""
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        exempt = self.exempt_bytes() if self.exempt_bytes is not None else 0
        return max(0, int(pages - free) * self.page_size - exempt)

    def _file_bytes(self) -> int:
        return int(self.db.execute("PRAGMA page_count").fetchone()[0]) * self.page_size

    def _checkpoint(self) -> None:
        """Copy the WAL into the file and cut it to zero bytes (needs no other reader). Inside a
        transaction SQLite refuses it (SQLITE_LOCKED): then it is done once that commits."""
        if self.db.conn.in_transaction:
            self._checkpoint_due = True
            return
        self._checkpoint_due = False
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _make_room(self, stream: str, need: int, disk_full: bool = False) -> bool:
        """Make room for ``need`` bytes of new ``stream`` records; False: do not write them."""
        if not disk_full and not self._full and self._room_left > need:
            self._room_left -= need  # far below the mark: no need to ask the file (every write)
            return True
        live = self._live_bytes()
        # ask the file again once half the room to the high-water mark is used
        self._room_left = max(0, (self.high_water - live - need) // 2)
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
        """Delete delivered records (telemetry, then intervals, bills, events, results; oldest
        first) until the records fit in ``target`` bytes; return how many. (The ledger keeps
        its intervals and bills in tables of its own.)"""
        n = 0
        for stream in ("telemetry", "intervals", "bills", "events", "results"):
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
            drop_id = int(extend or 0)
        else:
            cur = self.db.execute(
                "INSERT INTO drops(ts, stream, first_seq, last_seq, count, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)", [time.time(), stream, first, last, count, reason])
            drop_id = int(cur.lastrowid or 0)
        self.db.execute("UPDATE stream_state SET last_seq = MAX(last_seq, ?) WHERE stream = ?",
                        [last, stream])
        self.mark_acked([(stream, first, last)])
        self._owed = True
        return drop_id

    def _emit_pending_events(self, nxt: dict[str, int], skip: int | None = None) -> None:
        """Write the events owed (in the caller's transaction): a ``telemetry_dropped`` per
        unreported drop, ``buffer_full``; ``nxt`` (next seq per stream) is advanced. The
        caller clears ``_full_event`` once its transaction committed."""
        bodies: list[tuple[int | None, dict[str, Any]]] = []
        if not self._owed and self._full_event is None:
            return  # no drop unreported: no query (this runs with every write)
        for drop_id, dts, stream, first, last, count, reason in self.db.execute(
                "SELECT id, ts, stream, first_seq, last_seq, count, reason FROM drops "
                "WHERE event_seq IS NULL ORDER BY id").fetchall():
            if drop_id == skip:
                continue  # (still growing: reported once it is complete)
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
        self._owed = skip is not None  # the open drop is still to be reported

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

