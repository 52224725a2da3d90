"""A terminal whose buffer file cannot be written (the disk is full) keeps controlling.

At start, when the buffer file cannot be opened for writing because the disk is full, the agent
starts degraded: the outbox and the state store work on a buffer in memory
(:meth:`lmt.agent.buffer.BufferFile.in_memory`) that took the file's state (the active command,
the held loads, the seen command ids) and continues its sequence numbers. Polling, control,
commands and the sync run as usual; the readings wait in memory under a bounded cap
(:data:`MEMORY_MB`: beyond it the oldest telemetry is dropped, and each drop reported); a
``buffer_unwritable`` event and the status flag ``buffer_unwritable`` say so. Every
:data:`RETRY_S` the file is tried again; once it opens, :func:`take_up` moves everything held in
memory into it — records with their sequence numbers, what the broker acknowledged, the drops,
the state — in one transaction, and reports ``buffer_writable``. A damaged or foreign file still
stops the agent at start, as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .buffer import _SEED_TABLES, STREAMS, BufferError, BufferFile
from .ledger import LEDGER_DDL, LEDGER_TABLES
from .messages import event_body
from .outbox import Outbox

log = logging.getLogger("lmt.agent.buffer")

MEMORY_MB = 16.0  # the cap of the buffer in memory (a Pi has the RAM; the disk had not)
RETRY_S = 10.0  # how often the file is tried again


def start_degraded(path: Path, max_mb: float, error: str, now: float
                   ) -> tuple[BufferFile, Outbox]:
    """The buffer in memory standing in for ``path``, with its ``buffer_unwritable`` event."""
    log.error("%s; starting degraded: readings wait in memory (at most %g MB) until the disk "
              "has room again", error, min(max_mb, MEMORY_MB))
    file = BufferFile.in_memory(path)
    out = Outbox(file, max_mb=max(1.0, min(max_mb, MEMORY_MB)))
    out.append("events", [event_body("buffer_unwritable", now, {
        "error": error, "memory_mb": min(max_mb, MEMORY_MB),
        "detail": "the buffer file cannot be written: control, polling, commands and the sync "
                  "go on; readings wait in memory until the disk has room again (the oldest "
                  "are dropped, and reported, beyond the memory cap)"})])
    return file, out


def take_up(memory: BufferFile, mem_out: Outbox, max_mb: float, now: float
            ) -> tuple[BufferFile, Outbox] | None:
    """Open the file the buffer in memory stands in for and move everything into it; None (and
    nothing changed) while it still cannot be opened."""
    assert memory.in_memory_for is not None
    try:
        file = BufferFile(memory.in_memory_for)
    except BufferError as exc:
        log.debug("buffer still unwritable: %s", exc)
        return None
    try:
        out = Outbox(file, max_mb=max_mb)
        with out.transaction():
            moved = _move(memory, mem_out, file, out)
            out.append("events", [event_body("buffer_writable", now, {
                **moved, "detail": "the buffer file is writable again: what waited in memory "
                                   "is in it (telemetry dropped meanwhile was reported)"})])
    except BufferError as exc:
        log.warning("buffer opened but could not take what waited in memory (%s): trying "
                    "again later", exc)
        file.close()
        return None
    log.warning("buffer %s writable again: %d records moved from memory, %d readings were "
                "dropped meanwhile", file.path, moved["flushed"], moved["dropped"])
    memory.close()
    return file, out


def _move(memory: BufferFile, mem_out: Outbox, file: BufferFile, out: Outbox) -> dict[str, Any]:
    mdb, db = memory.db, file.db
    flushed = 0
    for stream in STREAMS:
        start = out.last_seq(stream)  # numbers the file gave since: none, unless it was reset
        rows = mdb.execute("SELECT seq, ts, body FROM outbox WHERE stream = ? AND seq > ? "
                           "ORDER BY seq", [stream, start]).fetchall()
        db.conn.executemany("INSERT OR IGNORE INTO outbox(stream, seq, ts, body) "
                            "VALUES (?, ?, ?, ?)", [(stream, *r) for r in rows])
        flushed += len(rows)
        last = max(start, mem_out.last_seq(stream))
        db.execute("UPDATE stream_state SET last_seq = MAX(last_seq, ?) WHERE stream = ?",
                   [last, stream])
        out._next_seq[stream] = max(out._next_seq[stream], last + 1)
        # what the broker acknowledged while the records were in memory
        seed = memory.memory_seed[stream]
        acked = [(a, b) for a, b in mem_out.acked_ranges(stream)]
        done = mem_out.delivered_seq(stream)
        if done > seed:
            acked.append((seed + 1, done))
        out.mark_acked([(stream, a, b) for a, b in acked if b > seed])
    dropped = 0
    for row in mdb.execute("SELECT ts, stream, first_seq, last_seq, count, reason, event_seq "
                           "FROM drops ORDER BY id").fetchall():
        db.execute("INSERT INTO drops(ts, stream, first_seq, last_seq, count, reason, event_seq) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", list(row))
        dropped += int(row[4])
    for table in _SEED_TABLES:
        if not memory.has_table(table):
            continue
        rows = mdb.execute(f'SELECT * FROM "{table}"').fetchall()
        if not rows:
            continue
        if not file.has_table(table):
            continue  # an older agent's table the file no longer has: nothing to keep
        marks = ", ".join("?" * len(rows[0]))
        db.conn.executemany(f'INSERT OR REPLACE INTO "{table}" VALUES ({marks})', rows)
    for table in LEDGER_TABLES:  # what the ledger kept while in memory
        if memory.has_table(table):
            rows = mdb.execute(f'SELECT * FROM "{table}"').fetchall()
            if rows:
                for ddl in LEDGER_DDL:
                    db.execute(ddl)
                marks = ", ".join("?" * len(rows[0]))
                db.conn.executemany(f'INSERT OR REPLACE INTO "{table}" VALUES ({marks})', rows)
    return {"flushed": flushed, "dropped": dropped}
