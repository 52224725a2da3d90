"""The ledger in the buffer file: its interval table is sized by its own retention
(``ledger.keep_days``), not by the outbox's disk cap: a site with many ledger meters never has
its telemetry dropped for the ledger's sake; pruning goes meter by meter along the key."""

from __future__ import annotations

import json
from pathlib import Path

from lmt.agent.buffer import BufferFile
from lmt.agent.ledger import LEDGER_DDL, LedgerSize
from lmt.agent.outbox import Outbox

MB = 1024 * 1024


def _fill_ledger(file: BufferFile, mb: float) -> None:
    body = json.dumps({"pad": "x" * 900})
    with file.atomic():
        for ddl in LEDGER_DDL:
            file.db.execute(ddl)
        n = int(mb * MB / 1000)
        file.db.conn.executemany(
            "INSERT INTO ledger_intervals(meter, start, end, quality, import_kwh, body) "
            "VALUES (?, ?, ?, 'complete', 1.0, ?)",
            [("m", 900.0 * i, 900.0 * (i + 1), body) for i in range(n)])


def test_the_disk_cap_leaves_the_ledgers_intervals_out(tmp_path: Path) -> None:
    path = tmp_path / "buffer.sqlite"
    file = BufferFile(path)
    _fill_ledger(file, 6.0)  # a ledger of 6 MB under a 4 MB cap
    size = LedgerSize(file)
    assert 6 * MB <= size() <= 9 * MB
    out = Outbox(file, max_mb=4, exempt_bytes=size)
    for i in range(300):  # about 0.6 MB of telemetry: far under the cap without the ledger
        out.append("telemetry", [{"ts": float(i), "device": "m", "values": {"p": "y" * 2000}}])
    assert out.drops() == []
    assert out.undelivered_count("telemetry") == 300
    out.close()
    file.close()

    # the same without the exemption: the ledger's pages count, telemetry is dropped
    file = BufferFile(path)
    out = Outbox(file, max_mb=4)
    out.append("telemetry", [{"ts": 1.0, "device": "m", "values": {"p": "z" * 2000}}])
    assert out.drops(), "the test must show the difference"
    out.close()
    file.close()
