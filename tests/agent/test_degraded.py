"""A full disk at start does not keep the terminal down: it starts degraded, in memory, and takes
the buffer file up again once the disk has room (agent/degraded.py).

1. The buffer in memory and the take-up, on real files: the state and the seen ids are read
   from the unwritable file, the sequence numbers continue after it, and what waited in memory
   — records, what the broker acknowledged, the drops beyond the memory cap — moves into the
   file, with nothing numbered twice.
2. End to end, as root in a private mount namespace: `lmt run` with its buffer on a full
   tmpfs polls, publishes, carries out a cap command and says it is degraded
   (``buffer_unwritable``, the status flag); once the disk has room it takes the file up
   (``buffer_writable``) and every reading reaches the platform, with no gap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmt.agent.broker import Broker
from lmt.agent.buffer import BufferFile
from lmt.agent.degraded import take_up
from lmt.agent.outbox import Outbox
from lmt.agent.platform import _Client
from lmt.agent.state_store import StateStore
from tests.agent.test_control_flow import TERMINAL
from tests.agent.test_crash_flow import Watch
from tests.conftest import wait_until


def test_the_buffer_in_memory_continues_the_file_and_is_taken_up(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    f = BufferFile(path)
    out, store = Outbox(f), StateStore(f)
    out.append("telemetry", [{"ts": 1.0, "i": i} for i in range(10)])
    out.append("events", [{"ts": 1.0, "type": "agent_started", "data": {}}])
    out.mark_acked([("telemetry", 1, 4)])
    store.save("supervisor", {"v": 1, "held": ["ev"]}, now=1.0)
    store.remember_command("c1", expires_at=1e12, now=1.0)
    f.close()
    before = path.read_bytes()

    mem = BufferFile.in_memory(path)
    assert mem.memory_seed == {"results": 0, "events": 1, "bills": 0, "intervals": 0,
                               "telemetry": 10}
    mout, mstore = Outbox(mem, max_mb=1.0), StateStore(mem)
    assert mstore.load("supervisor") == {"v": 1, "held": ["ev"]}
    assert mstore.command_seen("c1")
    recs = mout.append("telemetry", [{"ts": 2.0, "i": i} for i in range(20)])
    assert [r.seq for r in recs][:2] == [11, 12]  # after the file's, never again from 1
    assert mout.unacked_ranges("telemetry") == [(11, 30)]  # the file's backlog waits there
    mout.mark_acked([("telemetry", 11, 15)])  # published live and acknowledged meanwhile
    mstore.save("supervisor", {"v": 1, "held": []}, now=3.0)
    mstore.remember_command("c2", expires_at=1e12, now=3.0)
    assert path.read_bytes() == before, "the unwritable file is never touched"

    got = take_up(mem, mout, max_mb=64.0, now=4.0)
    assert got is not None
    f2, out2 = got
    store2 = StateStore(f2)
    assert store2.load("supervisor") == {"v": 1, "held": []}
    assert store2.command_seen("c1") and store2.command_seen("c2")
    assert out2.last_seq("telemetry") == 30
    assert out2.unacked_ranges("telemetry") == [(5, 10), (16, 30)]
    assert [r.body["i"] for r in out2.pending("telemetry", 15, 100)][:2] == [5, 6]
    writable = [r.body for r in out2.pending("events", 0, 10) if r.body["type"] ==
                "buffer_writable"]
    assert writable and writable[0]["data"]["flushed"] == 20
    assert [r.seq for r in out2.append("telemetry", [{"ts": 5.0}])] == [31]
    f2.close()


def test_readings_beyond_the_memory_cap_are_dropped_and_reported(tmp_path: Path) -> None:
    mem = BufferFile.in_memory(tmp_path / "missing.sqlite")
    mout = Outbox(mem, max_mb=1.0)
    for k in range(40):
        mout.append("telemetry", [{"ts": float(k), "v": "x" * 200, "i": i} for i in range(100)])
    drops = mout.drops()
    assert drops and drops[0]["first_seq"] == 1
    got = take_up(mem, mout, max_mb=64.0, now=1.0)
    assert got is not None
    f, out = got
    assert out.drops() and sum(d["count"] for d in out.drops()) == sum(d["count"] for d in drops)
    kinds = [r.body["type"] for r in out.pending("events", 0, 1000)]
    assert "telemetry_dropped" in kinds and kinds[-1] == "buffer_writable"
    f.close()


SCRIPT = r'''
set -e
mount -t tmpfs -o size=1m tmpfs "$DISK"
cp "$SRC" "$DISK/buffer.sqlite"
dd if=/dev/zero of="$DISK/filler" bs=4k 2>/dev/null || true
"$PY" -m lmt.agent.cli run --config "$CFG" &
pid=$!
while [ ! -e "$T/free" ]; do sleep 0.05; done
rm -f "$DISK/filler"
while [ ! -e "$T/stop" ]; do
    kill -0 $pid 2>/dev/null || { echo "AGENT EXITED"; exit 3; }
    sleep 0.05
done
kill -TERM $pid
wait $pid
'''


def test_lmt_run_on_a_full_disk_starts_degraded_and_recovers(tmp_path: Path, site: int,
                                                            broker: Broker) -> None:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare to mount a filesystem")
    disk = tmp_path / "disk"
    disk.mkdir()
    rig = Watch(tmp_path, site, broker, buffer={"path": str(disk / "buffer.sqlite")})
    src = tmp_path / "src.sqlite"
    out = Outbox.open(src)  # a buffer from before the disk filled: 50 readings undelivered
    out.append("telemetry", [{"ts": time.time() - 60 + i, "device": "main-meter",
                              "values": {"power_w": 1.0}} for i in range(50)])
    out.close()
    status = _Client("127.0.0.1", broker.port)
    status.connect([f"lmt/v1/{TERMINAL}/status"])
    env = {**os.environ, "DISK": str(disk), "SRC": str(src), "PY": sys.executable,
           "CFG": str(rig.cfg_path), "T": str(tmp_path)}
    ns = subprocess.Popen([unshare, "--mount", "sh", "-c", SCRIPT], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = wait_until(lambda: rig.of("agent_started") or ns.poll() is not None, 30,
                             "the agent")
        if ns.poll() is not None:
            err = ns.stderr.read() if ns.stderr else ""
            if "mount:" in err or "unshare:" in err:
                pytest.skip(f"cannot mount here: {err.strip()}")
            raise AssertionError(f"the agent did not start: {err}")
        assert started
        unwritable = wait_until(lambda: rig.of("buffer_unwritable"), 10, "buffer_unwritable")
        assert isinstance(unwritable, list) and "disk is full" in unwritable[0]["data"]["error"]

        def flags() -> list[str] | None:
            while not status.messages.empty():
                msg = json.loads(status.messages.get().payload)
                if msg.get("online"):
                    status.last = msg["flags"]  # type: ignore[attr-defined]
            return getattr(status, "last", None)
        wait_until(lambda: flags() == ["buffer_unwritable"], 10, "the status flag")
        # degraded, it still controls
        cid, answers = rig.command("cap", cap_kw=round(rig.power_kw() - 40), duration_s=4)
        assert answers[-1]["status"] == "accepted"
        wait_until(lambda: "executed" in rig.statuses(cid), 10, "executed while degraded")
        wait_until(lambda: rig.pump() or len(rig.readings) > 5, 10, "telemetry while degraded")
        (tmp_path / "free").touch()  # the disk has room again
        writable = wait_until(lambda: rig.of("buffer_writable"), 30, "buffer_writable")
        assert isinstance(writable, list) and writable[0]["data"]["flushed"] > 5
        wait_until(lambda: flags() == [], 10, "the flag cleared")
        wait_until(lambda: "completed" in rig.statuses(cid), 15, "the command completed")
        # every reading reaches the platform: the 50 from before the disk filled, and all since
        seqs: set[int] = set()

        def all_there() -> bool:
            rig.pump()
            seqs.update(_telemetry_seqs(rig))
            return bool(seqs) and seqs >= set(range(1, max(seqs) + 1)) and max(seqs) > 60
        wait_until(all_there, 30, "every telemetry record, no gap")
    finally:
        (tmp_path / "free").touch()
        (tmp_path / "stop").touch()
        try:
            ns.wait(20)
        finally:
            if ns.poll() is None:
                ns.kill()
        status.close()
        rig.close()


def _telemetry_seqs(rig: Watch) -> set[int]:
    return {r["seq"] for r in rig.all_readings}
