"""Acknowledgements in any order: the watermark moves over contiguous ranges, the others are
kept (and survive reopening the file)."""

from __future__ import annotations

from pathlib import Path

from lmt.agent.outbox import Outbox


def test_ranges_merge_and_move_the_watermark(tmp_path: Path) -> None:
    buf = Outbox.open(tmp_path / "b.sqlite")
    buf.append("telemetry", [{"ts": 1.0, "i": i} for i in range(100)])
    assert buf.unacked_ranges("telemetry") == [(1, 100)]
    buf.mark_acked([("telemetry", 81, 90), ("telemetry", 91, 100)])  # live, ahead of backlog
    assert buf.delivered_seq("telemetry") == 0
    assert buf.acked_ranges("telemetry") == [(81, 100)]
    assert buf.unacked_ranges("telemetry") == [(1, 80)]
    buf.mark_acked([("telemetry", 21, 40), ("telemetry", 1, 20)])
    assert buf.delivered_seq("telemetry") == 40
    assert buf.unacked_ranges("telemetry") == [(41, 80)]
    buf.close()

    buf = Outbox.open(tmp_path / "b.sqlite")  # kept across a restart
    assert buf.unacked_ranges("telemetry") == [(41, 80)]
    assert [r.seq for r in buf.pending("telemetry", 40, 5, upto_seq=80)] == [41, 42, 43, 44, 45]
    assert [r.seq for r in buf.pending("telemetry", 78, 5, upto_seq=80)] == [79, 80]
    buf.mark_acked([("telemetry", 41, 80)])
    assert buf.delivered_seq("telemetry") == 100
    assert buf.acked_ranges("telemetry") == [] and buf.unacked_ranges("telemetry") == []
    assert buf.unacked_ranges("events") == []
    buf.close()
