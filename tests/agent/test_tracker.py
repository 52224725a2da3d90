"""The platform-side de-duplication and gap detection (`lmt platform watch`)."""

from __future__ import annotations

from lmt.agent.platform import StreamTracker


def test_duplicates_dropped_gaps_reported_and_filled() -> None:
    t = StreamTracker()
    got = [s for s in (5, 6, 6, 7, 10, 8, 9, 9, 11) if t.accept("a", "telemetry", s)]
    assert got == [5, 6, 7, 10, 8, 9, 11]
    assert t.duplicates == 2
    assert t.gaps == [("a", "telemetry", 8, 9)]
    assert t.open_gaps() == []
    assert t.delivered[("a", "telemetry")] == 11


def test_streams_and_terminals_are_independent() -> None:
    t = StreamTracker()
    assert t.accept("a", "events", 1) and t.accept("b", "events", 1)
    assert t.accept("a", "telemetry", 1)
    assert t.accept("a", "events", 4)
    assert t.open_gaps() == [("a", "events", 2, 3)]
