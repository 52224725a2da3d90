"""The buffer file: one SQLite file (WAL) holding every outgoing record and the terminal's state.

Two stores share it, each over its own tables, through one guard (:class:`BufferFile`: the
connection, the lock, the checks at start-up, the transactions):

- the outbox (:mod:`lmt.agent.outbox`): the streams (``telemetry``, ``events``, ``results``),
  their sequence numbers, the acknowledged ranges, the disk cap and what it dropped;
- the state store (:mod:`lmt.agent.state_store`): typed keys — the control supervisor's state,
  the command ids already seen (replay protection), the customer's opt-out requests.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``: a committed transaction survives a
power cut (an fsync of the WAL per commit). A cycle's state and its records are written in one
transaction (:meth:`BufferFile.atomic`), so neither is ever saved without the other.

At start-up a damaged, foreign, locked or unwritable file is refused with a ``BufferError``
that says what to do; the file is inspected through a read-only connection first and is never
modified, renamed or replaced. An advisory lock (``<file>.lock``) keeps a second agent out.
See docs/buffer.md.
"""


from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

STREAMS = ("results", "events", "bills", "intervals", "telemetry")  # in the sync's order

log = logging.getLogger("lmt.agent.buffer")

APPLICATION_ID = 0x4C4D5442  # "LMTB" in the file header: this file is an lmt-edge buffer
SCHEMA_VERSION = 2  # 1: outbox, stream_state, shed_loads, seen_commands; 2: + drops, last_seq
# (+ optout_requests, acked and state, created when missing: older versions ignore them; the
# dr_state, mode_store and shed_loads tables of earlier versions are read once, to migrate)


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


class BufferUnwritable(BufferError):
    """The buffer file cannot be written because the disk is full: the agent starts degraded,
    in memory, and takes the file up again once it is writable (:meth:`BufferFile.in_memory`)."""


# What a buffer in memory copies from the file it stands in for (read-only): the state store's
# tables (an older agent's too), so control and replay protection go on as they were.
_SEED_TABLES = ("state", "seen_commands", "optout_requests", "shed_loads", "dr_state",
                "mode_store")


class BufferFile:
    """The shared file guard: opens (or creates) the buffer file, checks it, holds its lock and
    its connection; the outbox and the state store work through it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._closed = False
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

    @classmethod
    def in_memory(cls, path: Path | str) -> BufferFile:
        """A buffer in memory standing in for the file at ``path`` while it cannot be written
        (the disk is full). What the file holds is read through a read-only connection: the
        state store's tables are copied, and the streams' sequence numbers continue after the
        file's (``memory_seed``: the last seq per stream), so nothing is numbered twice when
        the records are moved into the file later. The file is never touched."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self._lock_fd = None
        self._closed = False
        self.in_memory_for = self.path
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self._create_schema()
        self._ensure_acked_table()
        self.memory_seed = {s: 0 for s in STREAMS}
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return self
        try:
            ro = self._read_only()
        except sqlite3.Error as exc:
            log.error("buffer %s: could not read it while it is unwritable (%s); starting "
                      "from nothing", self.path, exc)
            return self
        try:
            tables = {r[0]: r[1] for r in ro.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table'")}
            if "stream_state" in tables:
                cols = {r[1] for r in ro.execute("PRAGMA table_info(stream_state)")}
                for stream in STREAMS:
                    row = ro.execute(
                        "SELECT MAX(COALESCE((SELECT MAX(seq) FROM outbox WHERE stream = ?), 0), "
                        "delivered_seq" + (", last_seq" if "last_seq" in cols else "") + ") "
                        "FROM stream_state WHERE stream = ?", [stream, stream]).fetchone()
                    self.memory_seed[stream] = int(row[0] or 0) if row else 0
                    self.db.execute("UPDATE stream_state SET delivered_seq = ?, last_seq = ? "
                                    "WHERE stream = ?", [self.memory_seed[stream]] * 2 + [stream])
            for table in _SEED_TABLES:
                if table not in tables:
                    continue
                if not self.db.table(table).exists():
                    self.db.execute(tables[table])
                rows = ro.execute(f'SELECT * FROM "{table}"').fetchall()
                if rows:
                    marks = ", ".join("?" * len(rows[0]))
                    self.db.conn.executemany(f'INSERT OR REPLACE INTO "{table}" VALUES ({marks})',
                                             rows)
        except sqlite3.Error as exc:
            log.error("buffer %s: could not read it while it is unwritable (%s); starting "
                      "from nothing", self.path, exc)
        finally:
            ro.close()
        return self

    def _read_only(self) -> sqlite3.Connection:
        """A read-only connection to the file on a full disk. SQLite reads a WAL database
        through its ``-shm`` index, which it may be unable to create or grow here; when the WAL
        holds nothing (a clean stop, or a start that failed), the file alone is the database
        and is read as immutable."""
        uri = self.path.resolve().as_uri()
        wal = Path(f"{self.path}-wal")
        if not wal.exists() or wal.stat().st_size == 0:
            return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True,
                                   isolation_level=None)
        con = sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None, timeout=2.0)
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            con.close()
            log.warning("buffer %s: its WAL cannot be read on the full disk; reading the file "
                        "without it (the last transactions may be missing)", self.path)
            return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True,
                                   isolation_level=None)
        return con

    in_memory_for: Path | None = None  # the file this buffer in memory stands in for
    memory_seed: dict[str, int]

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def atomic(self) -> Iterator[sqlite_utils.Database]:
        """One transaction (nested: a savepoint)."""
        with self.db.atomic() as db:
            yield db

    def has_table(self, name: str) -> bool:
        return bool(self.db.table(name).exists())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.db.close()
        finally:
            self._release_lock()

    def _create_schema(self) -> None:
        with self.db.atomic():
            if not self.db.table("outbox").exists():
                self.db.table("outbox").create(
                    {"stream": str, "seq": int, "ts": float, "body": str},
                    pk=("stream", "seq"), not_null=("stream", "seq", "ts", "body"), strict=True,
                )
            if not self.db.table("stream_state").exists():
                self.db.table("stream_state").create(
                    {"stream": str, "delivered_seq": int}, pk="stream",
                    not_null=("stream", "delivered_seq"), strict=True,
                )
            if "last_seq" not in self.db.table("stream_state").columns_dict:
                # the highest seq ever given: survives dropping every record of a stream
                self.db.table("stream_state").add_column("last_seq", int, not_null_default=0)
            for s in STREAMS:
                self.db.execute("INSERT OR IGNORE INTO stream_state(stream, delivered_seq) "
                                "VALUES (?, 0)", [s])
            if not self.db.table("drops").exists():
                self.db.table("drops").create(
                    {"id": int, "ts": float, "stream": str, "first_seq": int, "last_seq": int,
                     "count": int, "reason": str, "event_seq": int}, pk="id",
                    not_null=("ts", "stream", "first_seq", "last_seq", "count", "reason"),
                    strict=True,
                )
            if not self.db.table("seen_commands").exists():
                self.db.table("seen_commands").create(
                    {"id": str, "expires_at": float, "received_at": float}, pk="id",
                    not_null=("id", "expires_at", "received_at"), strict=True,
                )
            self.db.execute(_OPTOUT_DDL)
            if not self.db.table("state").exists():  # the state store: typed keys
                self.db.table("state").create(
                    {"key": str, "value": str, "saved_at": float}, pk="key",
                    not_null=("key", "value", "saved_at"), strict=True,
                )

    def _ensure_acked_table(self) -> None:
        if not self.db.table("acked").exists():
            self.db.table("acked").create({"stream": str, "first": int, "last": int},
                                    pk=("stream", "first"), not_null=("stream", "first", "last"),
                                    strict=True)


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
        self._lock_fd = fd  # held from here on: released on any failure below
        try:  # who holds it, for the message another agent gets (best effort: a full disk)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass

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

    def _no_space(self) -> bool:
        """The filesystem that holds the file has (next to) no room left."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 64 * 1024

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
        elif name.startswith("SQLITE_FULL") or code == errno.ENOSPC or (
                (name.startswith("SQLITE_IOERR") or code == errno.EIO) and self._no_space()):
            # (SQLite reports a WAL index it cannot grow on a full disk as an I/O error)
            what = "cannot be written: the disk is full"
            todo = ("Free space on the filesystem that holds it (buffer.max_mb caps the "
                    "buffer itself, not what else fills the disk).")
            err = self._refuse(what, todo, at_start)
            return BufferUnwritable(str(err))
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

