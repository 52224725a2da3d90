"""A buffer the agent cannot use at start-up — damaged, foreign, locked, unwritable, on a full
disk — is refused with a message naming the file and what to do, and the file is kept exactly
as it was (real SQLite files, real `lmt run` processes)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmt.agent.broker import free_port
from lmt.agent.buffer import SCHEMA_VERSION, BufferError
from lmt.agent.outbox import Outbox
from tests.agent.harness import write_agent_config
from tests.conftest import ROOT, lmt_argv, wait_until

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def real_buffer(path: Path, n: int = 500) -> None:
    buf = Outbox.open(path)
    buf.append("telemetry", [{"ts": 1.8e9 + i, "device": "m", "values": {"power_w": i * 1.5}}
                             for i in range(n)])
    buf.append("events", [{"ts": 1.8e9, "type": "agent_started", "data": {}}])
    buf.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in the folder but the agent's lock file, with its bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and not p.name.endswith(".lock")}


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not an sqlite database\n" * 300)


def truncated(path: Path) -> None:
    real_buffer(path, 3000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def scribbled(path: Path) -> None:
    """A page in the middle overwritten (a torn write on a failing card)."""
    real_buffer(path, 3000)
    data = bytearray(path.read_bytes())
    data[8 * 4096: 9 * 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


def other_schema(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, value REAL)")
    con.execute("INSERT INTO readings (value) VALUES (1.5)")
    con.commit()
    con.close()


def other_application(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA application_id = 1234")
    con.execute("CREATE TABLE outbox (stream TEXT, seq INT, ts REAL, body TEXT)")
    con.execute("CREATE TABLE stream_state (stream TEXT, delivered_seq INT)")
    con.commit()
    con.close()


def newer_schema(path: Path) -> None:
    real_buffer(path, 10)
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()


BAD_FILES = {
    "garbage": (garbage, "not an SQLite database"),
    "truncated": (truncated, "damaged"),
    "scribbled": (scribbled, "damaged"),
    "other_schema": (other_schema, "not an lmt-edge buffer (tables: readings)"),
    "other_application": (other_application, "belongs to another application"),
    "newer_schema": (newer_schema, "newer lmt-edge"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_an_unusable_file_is_refused_and_kept(tmp_path: Path, kind: str) -> None:
    make, expected = BAD_FILES[kind]
    path = tmp_path / "buffer.sqlite"
    make(path)
    before = snapshot(tmp_path)
    with pytest.raises(BufferError) as ei:
        Outbox.open(path)
    msg = str(ei.value)
    assert str(path) in msg and expected in msg and "left as it is for inspection" in msg
    assert snapshot(tmp_path) == before, "the file (or its WAL) was changed"
    if kind in ("garbage", "truncated", "scribbled"):
        assert ".recover" in msg and "Move it aside" in msg
    with pytest.raises(BufferError):  # and again: refusing twice changes nothing either
        Outbox.open(path)
    assert snapshot(tmp_path) == before


def test_a_buffer_cut_off_by_a_power_failure_opens_with_its_records(tmp_path: Path) -> None:
    """A copy taken while the agent had the file open (database, WAL and index, as after a
    power cut) is a good buffer: nothing is refused and nothing committed is lost."""
    live = tmp_path / "live"
    live.mkdir()
    buf = Outbox.open(live / "b.sqlite")
    buf.append("telemetry", [{"ts": 1.0, "v": i} for i in range(100)])
    buf.mark_delivered("telemetry", 40)
    cut = tmp_path / "cut"
    cut.mkdir()
    for p in live.iterdir():
        shutil.copy(p, cut / p.name)
    buf.close()
    assert (cut / "b.sqlite-wal").stat().st_size > 0
    again = Outbox.open(cut / "b.sqlite")
    assert again.delivered_seq("telemetry") == 40 and again.last_seq("telemetry") == 100
    assert [r.seq for r in again.append("telemetry", [{"ts": 2.0}])] == [101]
    again.close()


def test_a_buffer_from_before_the_cap_is_upgraded(tmp_path: Path) -> None:
    """Schema 1 (no drops table, no last_seq, no application id) opens and keeps counting."""
    path = tmp_path / "b.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE outbox (stream TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
                             body TEXT NOT NULL, PRIMARY KEY (stream, seq)) STRICT;
        CREATE TABLE stream_state (stream TEXT PRIMARY KEY NOT NULL,
                                   delivered_seq INTEGER NOT NULL) STRICT;
        INSERT INTO stream_state VALUES ('telemetry', 7), ('events', 0), ('results', 0);
        INSERT INTO outbox VALUES ('telemetry', 8, 1.0, '{"ts":1.0}');
    """)
    con.close()
    buf = Outbox.open(path)
    assert [r.seq for r in buf.append("telemetry", [{"ts": 2.0}])] == [9]
    assert buf.drops() == []
    buf.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def test_a_second_agent_is_kept_out(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    first = Outbox.open(path)
    with pytest.raises(BufferError, match=rf"in use by another lmt agent \(process {os.getpid()}"):
        Outbox.open(path)
    first.append("events", [{"ts": 1.0}])
    first.close()
    Outbox.open(path).close()  # free again once the first one closed


HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_a_file_locked_by_another_program_is_refused(tmp_path: Path, journal: str) -> None:
    path = tmp_path / "b.sqlite"
    real_buffer(path, 10)
    if journal == "delete":
        con = sqlite3.connect(path)
        con.execute("PRAGMA journal_mode = DELETE")
        con.close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        with pytest.raises(BufferError, match="locked by another process") as ei:
            Outbox.open(path)
        assert "left as it is" in str(ei.value)
        assert snapshot(tmp_path) == before
    finally:
        holder.communicate("", timeout=10)


def test_a_folder_that_cannot_exist_is_refused(tmp_path: Path) -> None:
    """Unwritable even for root: a path whose folder is a regular file."""
    blocker = tmp_path / "state"
    blocker.write_text("a file, not a folder")
    with pytest.raises(BufferError, match=r"that name is taken by a file|a part of its folder"):
        Outbox.open(blocker / "b.sqlite")
    with pytest.raises(BufferError, match="a part of its folder"):
        Outbox.open(blocker / "deeper" / "b.sqlite")
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(ROOT_USER, reason="root writes read-only files")
def test_a_read_only_file_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    real_buffer(path, 10)
    path.chmod(0o444)
    before = snapshot(tmp_path)
    try:
        with pytest.raises(BufferError, match="cannot be written") as ei:
            Outbox.open(path)
        assert "its folder" in str(ei.value)
        assert snapshot(tmp_path) == before
    finally:
        path.chmod(0o644)


@pytest.mark.skipif(ROOT_USER, reason="root writes in read-only folders")
def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(BufferError, match="cannot be written"):
            Outbox.open(folder / "b.sqlite")
    finally:
        folder.chmod(0o755)


PRIVATE_DISK = textwrap.dedent("""
    import hashlib, os, shutil, sys
    from lmt.agent.buffer import BufferError
    from lmt.agent.outbox import Outbox
    disk = sys.argv[1]
    before = hashlib.sha256(open(disk + "/b.sqlite", "rb").read()).hexdigest()
    try:
        filler = open(disk + "/filler", "wb", buffering=0)
        while True:
            filler.write(b"x" * 4096)
    except OSError:
        pass
    for name in ("b.sqlite", "new.sqlite"):
        try:
            Outbox.open(disk + "/" + name).close()
            print("OPENED", name)
        except BufferError as exc:
            print("REFUSED", exc)
    after = hashlib.sha256(open(disk + "/b.sqlite", "rb").read()).hexdigest()
    print("UNCHANGED" if after == before else "CHANGED")
""")

MOUNTS = {
    # no space left: a tiny tmpfs, filled up
    "full": 'mount -t tmpfs -o size=256k tmpfs "$1" && cp "$5" "$1/b.sqlite"',
    # mounted read-only: not even root can write there
    "read-only": 'cp "$5" "$1/b.sqlite" && mount --bind "$1" "$1" && '
                 'mount -o remount,bind,ro "$1"',
}


@pytest.mark.parametrize("how,expected", [("full", "cannot be written: the disk is full"),
                                          ("read-only", "Read-only file system")])
def test_a_full_or_read_only_filesystem_is_refused(tmp_path: Path, how: str,
                                                   expected: str) -> None:
    """In a private mount namespace (root only), so nothing outside the test sees it."""
    unshare = shutil.which("unshare")
    if not ROOT_USER or unshare is None:
        pytest.skip("needs root and unshare to mount a filesystem")
    src = tmp_path / "src.sqlite"
    real_buffer(src, 50)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(PRIVATE_DISK)
    res = subprocess.run(
        [unshare, "--mount", "sh", "-c", MOUNTS[how] + ' && exec "$2" "$3" "$1"', "sh",
         str(disk), sys.executable, str(script), "-", str(src)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    if res.returncode != 0 and ("mount:" in res.stderr or "unshare:" in res.stderr):
        pytest.skip(f"cannot mount here: {res.stderr.strip()}")
    lines = res.stdout.splitlines()
    assert res.returncode == 0, res.stderr
    assert len(lines) == 3 and lines[-1] == "UNCHANGED", res.stdout + res.stderr
    for line in lines[:2]:
        assert line.startswith("REFUSED") and expected in line, line


# -- reliability: `lmt run` --------------------------------------------------------------------
def test_lmt_run_refuses_a_corrupt_buffer_and_keeps_it(tmp_path: Path) -> None:
    cfg, _ = write_agent_config(tmp_path, free_port(), free_port())
    path = tmp_path / "buffer.sqlite"
    garbage(path)
    before = path.read_bytes()
    res = subprocess.run(lmt_argv("run", "--config", str(cfg)), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert f"lmt run: {path}: cannot open the buffer: it is not an SQLite database" in res.stderr
    assert "left as it is for inspection" in res.stderr
    assert "Traceback" not in res.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("buffer")) == \
        ["buffer.sqlite", "buffer.sqlite.lock"]


def test_lmt_run_twice_on_one_buffer(tmp_path: Path) -> None:
    """A second agent with the same buffer (a unit started twice) stops at once; the first
    one carries on."""
    cfg, _ = write_agent_config(tmp_path, free_port(), free_port())
    path = tmp_path / "buffer.sqlite"
    first = subprocess.Popen(lmt_argv("run", "--config", str(cfg)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        def started() -> bool:
            try:
                con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
                try:
                    return bool(con.execute("SELECT 1 FROM outbox WHERE stream = 'events'")
                                .fetchone())
                finally:
                    con.close()
            except sqlite3.Error:
                return False

        wait_until(started, 30, "the first agent to start")
        res = subprocess.run(lmt_argv("run", "--config", str(cfg)), capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 1
        assert f"in use by another lmt agent (process {first.pid}" in res.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        assert first.wait(20) == 0
