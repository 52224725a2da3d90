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


def test_live_ahead_of_the_backlog_is_not_a_duplicate() -> None:
    """After an outage the terminal sends live records first and the backlog behind them."""
    t = StreamTracker()
    order = [101, 102, 103, 1, 2, 3, 104, *range(4, 101), 105]
    assert all(t.accept("a", "telemetry", s) for s in order)
    assert t.duplicates == 0 and t.gaps == [] and t.open_gaps() == []
    assert t.delivered[("a", "telemetry")] == 105
    assert not t.accept("a", "telemetry", 50) and t.duplicates == 1


def test_a_hole_between_backlog_and_live_stays_open_until_filled() -> None:
    t = StreamTracker()
    for s in (201, 202, 1, 2, 3, 210):
        t.accept("a", "telemetry", s)
    assert t.gaps == [("a", "telemetry", 203, 209)]
    assert t.open_gaps() == [("a", "telemetry", 4, 200), ("a", "telemetry", 203, 209)]
    for s in range(4, 201):
        t.accept("a", "telemetry", s)
    assert t.open_gaps() == [("a", "telemetry", 203, 209)]


def test_a_dropped_range_is_excused_not_a_gap() -> None:
    t = StreamTracker()
    for s in (1, 2, 3, 40, 41):
        t.accept("a", "telemetry", s)
    assert t.open_gaps() == [("a", "telemetry", 4, 39)]
    t.excuse("a", "telemetry", 4, 39)  # a telemetry_dropped event named it
    assert t.open_gaps() == []
    assert t.delivered[("a", "telemetry")] == 41


def test_watch_reports_a_gap_and_its_filling(broker) -> None:  # type: ignore[no-untyped-def]
    """`lmt platform watch` over a real broker: live records ahead of the backlog print a GAP,
    the backlog arriving prints FILLED, and a repeat is dropped."""
    import io
    import json
    import threading

    from lmt.agent.platform import _Client, watch
    from tests.conftest import wait_until

    out = io.StringIO()
    done: list[StreamTracker] = []
    th = threading.Thread(target=lambda: done.append(
        watch("127.0.0.1", broker.port, "lmt/v1", "w-1", count=6, duration_s=30, stream=out)),
        daemon=True)
    th.start()
    pub = _Client("127.0.0.1", broker.port)
    pub.connect([])

    def send(seqs: list[int], historical: bool) -> None:
        pub.c.publish("lmt/v1/w-1/telemetry", json.dumps(
            {"terminal": "w-1", "stream": "telemetry", "historical": historical,
             "records": [{"seq": s, "ts": 1.0, "device": "m", "values": {}} for s in seqs]}),
            qos=1).wait_for_publish(5)

    def sent_until(seqs: list[int], historical: bool, text: str) -> bool:
        send(seqs, historical)  # repeated until the watcher shows it: repeats are dropped
        return text in out.getvalue()

    try:
        wait_until(lambda: sent_until([1, 2], False, "#2"), 15, "the first records")
        wait_until(lambda: sent_until([5, 6], False, "GAP"), 15, "live records ahead")
        send([3, 4], True)
        th.join(15)
    finally:
        pub.close()
    text = out.getvalue()
    assert "GAP w-1 telemetry #3..#4 missing" in text
    assert "FILLED w-1 telemetry #3..#4" in text
    assert done and done[0].open_gaps() == []
