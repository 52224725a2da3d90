"""The energy ledger end to end, every part real: `lmt sim` (and its control channel), mosquitto,
`lmt run` as a process, the agent's SQLite file; one-minute intervals.

Three rigs run side by side from the start of the module, each on a timeline of its own
(tests/agent/ledger_rig.py); the tests check what each one recorded:

- ``flow``: the demo site, its chiller off for 23, 11, 37, 17, 29 s of each minute in turn so
  that no two intervals hold the same energy, priced by the Jiangsu tariff with Jiangsu's
  carbon factor. The broker is stopped right after the first interval was acknowledged and
  started again once an interval was made meanwhile; later the agent is SIGKILLed in the
  middle of an interval and started again.
- ``tamper``: the demo site with a sub-meter that sees all of it (a loss group: main meter
  against sub-meter), clean until a first whole interval was judged; then a CT shunt on L2 of
  the main meter (ct_bypass delay 3 s) and, once it was raised and the shunt removed, 30 kW of
  unmetered load.
- ``demo``: the shipped demo site and agent with a ``[ledger]`` section, for two minutes.

The simulator's import registers are read over Modbus every 0.1 s (the tests' own reads), so
every interval's energy is compared with the register's difference across its boundaries.
"""

from __future__ import annotations

import itertools
import json
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lmt.agent.broker import Broker
from lmt.agent.messages import BillBatch, EventBatch, IntervalBatch
from lmt.analytics.tariff import parse_calendar, parse_tariff, period_at, price_of
from tests.agent.ledger_rig import (
    DEMO_LOADS,
    AgentProcess,
    Consumer,
    Registers,
    Sim,
    Timeline,
    agent_config,
    demo_site,
    kept_intervals,
    new_port,
    read_db,
    serve,
    stream_seqs,
    until_wall,
)
from tests.conftest import EXAMPLES, ROOT, wait_until

MAIN, SUB = "main-meter", "sub-meter"
MINUTE = 60.0
TOL_KWH = 0.01  # 10 Wh: a DL/T 645 register's digit; the agent's boundaries come within 2 Wh
TARIFF = "jiangsu-2025-two-part"
FACTOR_ID, KG_PER_KWH = "mee-2022/provincial/jiangsu", 0.5978  # emission_factors.toml, Jiangsu
UTC_OFFSET_S = 28800  # demo-agent.toml [modes]
LEDGER: dict[str, Any] = {"interval_minutes": 1, "tariff": TARIFF,
                          "carbon": {"year": 2022, "scope": "provincial", "region": "jiangsu"}}
CT_DELAY_S = 3.0
UNMETERED_KW = 30.0
LEDGER_EVENTS = ("theft_indicator", "theft_indicator_cleared", "loss_exceeded", "loss_cleared",
                 "ledger_fault")
TIMELINE_S = 300.0  # the longest a timeline may take (each is about three minutes)


@dataclass
class Rig:
    name: str
    terminal: str
    folder: Path
    sim: Sim
    broker: Broker
    consumer: Consumer
    agent: AgentProcess
    regs: Registers | None = None
    timeline: Timeline = field(init=False)

    @property
    def db(self) -> Path:
        return self.folder / "buffer.sqlite"

    def registers(self) -> Registers:
        assert self.regs is not None
        return self.regs

    def result(self) -> dict[str, Any]:
        got: dict[str, Any] = self.timeline.result(TIMELINE_S)
        return got


@dataclass
class Rigs:
    flow: Rig
    tamper: Rig
    demo: Rig


def _rig(stack: ExitStack, folder: Path, name: str, terminal: str, site: dict[str, Any],
         broker: Broker, ledger: dict[str, Any], meters: dict[str, int] | None,
         devices: tuple[dict[str, Any], ...] = ()) -> Rig:
    sim = stack.enter_context(serve(folder / "sim", site))
    regs = None
    if meters is not None:
        regs = Registers(sim.port, meters, toggle_s=(23.0, 11.0, 37.0, 17.0, 29.0))
        stack.callback(regs.close)
    consumer = Consumer(broker.port, terminal)
    stack.callback(consumer.close)
    agent = AgentProcess(agent_config(folder, terminal, sim.port, broker.port, ledger, devices))
    stack.callback(agent.stop)
    return Rig(name, terminal, folder, sim, broker, consumer, agent, regs)


def _acked(db: Path, stream: str = "intervals") -> bool:
    delivered, last = stream_seqs(db, stream)
    return last > 0 and delivered >= last


def _flow(rig: Rig) -> dict[str, Any]:
    """Outage across a boundary, then a SIGKILL mid-interval."""
    c, tl = rig.consumer, rig.timeline
    rig.agent.start()
    tl.mark("started")
    wait_until(lambda: c.events("agent_started"), 30, "the agent")
    first = wait_until(lambda: c.intervals(MAIN), 90, "the first interval")
    assert isinstance(first, list)
    b1 = first[0]["end"] + MINUTE
    wait_until(lambda: _acked(rig.db), 15, "the first interval acknowledged")
    rig.broker.stop()
    tl.mark("outage")
    wait_until(lambda: any(end == b1 for _, end, _, _ in kept_intervals(rig.db, MAIN))
               and not _acked(rig.db), 90, "an interval made during the outage")
    during = stream_seqs(rig.db, "intervals")
    rig.broker.start()
    tl.mark("broker back")
    wait_until(lambda: any(r["end"] == b1 for r in c.intervals(MAIN)), 30,
               "the outage's interval delivered")
    wait_until(lambda: _acked(rig.db), 15, "the outage's interval acknowledged")
    until_wall(b1 + 25.0, "the middle of the next interval")
    rig.agent.kill()
    tl.mark("killed")
    rig.agent.start()
    tl.mark("restarted")
    wait_until(lambda: len(c.events("agent_started")) >= 2, 30, "the agent started again")
    wait_until(lambda: any(r["start"] == b1 for r in c.intervals(MAIN)), 90,
               "the interval the agent was killed in")
    wait_until(lambda: _acked(rig.db), 15, "it acknowledged")
    tl.mark("done")
    return {"outage_seqs": during, "killed_in": b1}


def _tamper(rig: Rig) -> dict[str, Any]:
    """Clean until a whole interval was judged; a CT shunt; then an unmetered load."""
    c, tl = rig.consumer, rig.timeline
    rig.agent.start()
    tl.mark("started")
    wait_until(lambda: [x for x in c.losses() if x["status"] == "within"], 150,
               "a whole clean interval judged")
    tl.mark("shunt")
    rig.sim.send({"device": MAIN, "tamper": {"ct_shunt": {"phase": "l2", "seen": 0.0}}})
    wait_until(lambda: c.events("theft_indicator"), 30, "a theft indicator")
    rig.sim.send({"device": MAIN, "tamper": {}})
    tl.mark("shunt removed")
    rig.sim.send({"site": {"unmetered_kw": UNMETERED_KW}})
    tl.mark("unmetered")
    wait_until(lambda: c.events("loss_exceeded"), 150, "loss_exceeded")
    tl.mark("done")
    return {}


def _demo(rig: Rig) -> dict[str, Any]:
    """The demo as shipped, with the ledger on, for two minutes."""
    c, tl = rig.consumer, rig.timeline
    rig.agent.start()
    t0 = tl.mark("started")
    wait_until(lambda: time.time() >= t0 + 125.0 and len(c.intervals(MAIN)) >= 2, 200,
               "two minutes and two intervals")
    wait_until(lambda: _acked(rig.db, "events"), 15, "the events acknowledged")
    tl.mark("done")
    return {}


@pytest.fixture(scope="module")
def rigs(tmp_path_factory: pytest.TempPathFactory, broker: Broker) -> Iterator[Rigs]:
    with ExitStack() as stack:
        # the flow rig's own broker (stopped mid-test), persistent: the platform's session
        # and what is queued for it survive the restart
        own = stack.enter_context(Broker(persistence=True))
        flow = _rig(stack, tmp_path_factory.mktemp("flow"), "flow", "ledger-0001",
                    demo_site(new_port()), own, LEDGER, {MAIN: 1})
        sub = {"name": SUB, "profile": "eastron-sdm630", "device_id": 3,
               "metering": {"loads": DEMO_LOADS, "base_share": 1.0, "ev": True}}
        tamper_site = demo_site(new_port())
        tamper_site["devices"].append(sub)
        tamper = _rig(stack, tmp_path_factory.mktemp("tamper"), "tamper", "ledger-0002",
                      tamper_site, broker, {
                          **LEDGER, "meters": [MAIN, SUB],
                          "loss_groups": [{"name": "site", "main": MAIN, "subs": [SUB],
                                           "raise_after": 1, "clear_after": 1}],
                          "theft": {"detectors": {"ct_bypass": {"delay_s": CT_DELAY_S,
                                                                "clear_delay_s": CT_DELAY_S}}}},
                      {MAIN: 1, SUB: 3},
                      ({"name": SUB, "profile": "eastron-sdm630", "host": "127.0.0.1",
                        "device_id": 3},))
        site = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
        site["server"]["port"] = new_port()
        demo = _rig(stack, tmp_path_factory.mktemp("demo"), "demo", "demo-0001", site, broker,
                    LEDGER, None)
        for rig, run in ((flow, _flow), (tamper, _tamper), (demo, _demo)):
            rig.timeline = Timeline(rig.name, lambda rig=rig, run=run: run(rig))
            rig.timeline.start()
        try:
            yield Rigs(flow, tamper, demo)
        finally:
            for rig in (flow, tamper, demo):  # before anything they use is closed
                try:
                    rig.timeline.result(TIMELINE_S)
                except AssertionError:
                    pass


# -- checks shared by the tests -------------------------------------------------------------------

def _valid_batches(rig: Rig) -> None:
    """Every message on the ledger's topics matches its schema (agent/messages)."""
    for kind, model in (("intervals", IntervalBatch), ("events", EventBatch), ("bills", BillBatch)):
        for b in rig.consumer.batches(kind):
            got = model.model_validate_json(b.payload)
            assert got.terminal == rig.terminal


def _seqs_contiguous(rig: Rig) -> list[int]:
    """The intervals stream's sequence numbers: 1, 2, 3, ... each once, and all the file has."""
    seqs = [r["seq"] for r in rig.consumer.records("intervals")]
    twice = [s for s, n in Counter(seqs).items() if n > 1]
    assert not twice, f"{rig.name}: seqs delivered more than once: {twice}"
    assert sorted(seqs) == list(range(1, len(seqs) + 1)), f"{rig.name}: gaps in {sorted(seqs)}"
    assert stream_seqs(rig.db, "intervals")[1] == len(seqs), "written but not delivered"
    return seqs


def _once_per_start(rig: Rig, meter: str) -> list[dict[str, Any]]:
    """The meter's intervals, each (meter, start) delivered once, one after the other."""
    got = rig.consumer.intervals(meter)
    starts = [r["start"] for r in got]
    twice = [s for s, n in Counter(starts).items() if n > 1]
    assert not twice, f"{rig.name}: {meter}'s intervals delivered twice: {twice}"
    ordered = sorted(got, key=lambda r: r["start"])
    assert len(ordered) >= 2
    for a, b in itertools.pairwise(ordered):
        assert b["start"] == a["end"] == a["start"] + MINUTE, f"{meter}: not contiguous"
    return ordered


def _energy_matches_register(rig: Rig, meter: str, intervals: list[dict[str, Any]]
                             ) -> list[dict[str, Any]]:
    """Each whole interval's import (those after the one of the agent's first reading) is the
    register's difference across its boundaries, within a digit; so is their sum. The first,
    partial interval is flagged gap."""
    regs = rig.registers()
    # the first interval is the one of the agent's first reading (which comes a moment after
    # the process starts, maybe after a boundary): read only from then on
    first, whole = intervals[0], intervals[1:]
    assert first["end"] > rig.timeline.marks["started"]
    assert "gap" in first["flags"] and first["coverage"] < 1
    assert len(whole) >= 2, whole
    for r in whole:
        expected = regs.at(meter, r["end"]) - regs.at(meter, r["start"])
        assert r["source"]["import"] == "register"
        assert r["import_kwh"] == pytest.approx(expected, abs=TOL_KWH), (meter, r["start"])
    total = sum(r["import_kwh"] for r in whole)
    assert total == pytest.approx(regs.at(meter, whole[-1]["end"])
                                  - regs.at(meter, whole[0]["start"]), abs=TOL_KWH)
    energies = [round(r["import_kwh"], 2) for r in whole]
    assert len(set(energies)) > 1, "every interval holds the same energy: the test sees nothing"
    return whole


def _priced(intervals: list[dict[str, Any]]) -> None:
    """Each interval has its tariff period, cost and carbon."""
    tariff = parse_tariff(tomllib.loads((ROOT / "config" / "tariffs" / f"{TARIFF}.toml")
                                        .read_text()))
    calendar = parse_calendar(tomllib.loads((ROOT / "config" / "ledger_data" /
                                             "holidays-cn.toml").read_text()))
    for r in intervals:
        period = period_at(tariff, calendar, r["start"], UTC_OFFSET_S)
        kwh = r["import_kwh"]
        assert r["tariff"] == TARIFF and r["period"] == period, r
        assert [p["period"] for p in r["pieces"]] == [period]
        assert r["cost"] == pytest.approx(kwh * price_of(tariff, period), abs=1e-5)
        assert r["factor"] == FACTOR_ID
        assert r["kgco2"] == pytest.approx(kwh * KG_PER_KWH, abs=1e-5)


def _local_day(t: float) -> str:
    return datetime.fromtimestamp(t + UTC_OFFSET_S, tz=UTC).date().isoformat()


def _no_ledger_events(events: list[dict[str, Any]], where: str) -> None:
    bad = [(e["type"], e["data"].get("indicator")) for e in events if e["type"] in LEDGER_EVENTS]
    assert not bad, f"{where}: {bad}"


# -- the tests ---------------------------------------------------------------------------------------

def test_intervals_are_contiguous_valid_priced_and_match_the_register(rigs: Rigs) -> None:
    for rig, meters in ((rigs.flow, (MAIN,)), (rigs.tamper, (MAIN, SUB))):
        rig.result()
        assert rig.consumer.batches("intervals"), f"{rig.name}: no intervals"
        _valid_batches(rig)
        _seqs_contiguous(rig)
        for meter in meters:
            intervals = _once_per_start(rig, meter)
            whole = _energy_matches_register(rig, meter, intervals)
            assert {r["quality"] for r in whole[:1]} == {"complete"}
            _priced(intervals)


def test_intervals_made_during_a_broker_outage_are_delivered_after_it_once(rigs: Rigs) -> None:
    rig = rigs.flow
    got = rig.result()
    delivered, last = got["outage_seqs"]
    assert last > delivered, "no interval was made during the outage"
    back = rig.timeline.marks["broker back"]
    records = rig.consumer.records("intervals")
    by_seq = {r["seq"]: r for r in records}
    for seq in range(1, delivered + 1):  # before the outage: sent once, not again
        assert by_seq[seq]["_arrived"] < rig.timeline.marks["outage"]
    kept = {start: (quality, kwh) for start, _, quality, kwh in kept_intervals(rig.db, MAIN)}
    for seq in range(delivered + 1, last + 1):  # made meanwhile: after it, from the backlog
        r = by_seq[seq]
        assert r["_arrived"] >= back and r["_historical"] is True
        assert r["import_kwh"] is not None and r["quality"] == "complete", r  # filled
        assert kept[r["start"]] == (r["quality"], r["import_kwh"])
        regs = rig.registers()
        assert r["import_kwh"] == pytest.approx(regs.at(MAIN, r["end"]) - regs.at(MAIN, r["start"]),
                                                abs=TOL_KWH)
    _seqs_contiguous(rig)
    _once_per_start(rig, MAIN)


def test_after_a_sigkill_mid_interval_nothing_is_published_or_counted_twice(rigs: Rigs) -> None:
    rig = rigs.flow
    got = rig.result()
    killed, restarted = rig.timeline.marks["killed"], rig.timeline.marks["restarted"]
    assert rig.agent.starts == 2 and len(rig.consumer.events("agent_started")) == 2
    start = got["killed_in"]
    assert start + 20 < killed < start + MINUTE, "not killed mid-interval"
    intervals = _once_per_start(rig, MAIN)
    resumed = [r for r in intervals if r["start"] == start]
    assert len(resumed) == 1, "the interval the agent was killed in, once"
    r = resumed[0]
    assert r["_arrived"] > restarted
    # its energy is the register's across it: what the killed run counted is not counted again
    regs = rig.registers()
    assert r["source"]["import"] == "register"
    assert r["import_kwh"] == pytest.approx(regs.at(MAIN, r["end"]) - regs.at(MAIN, start),
                                            abs=TOL_KWH)
    assert r["coverage"] < 1.0  # the seconds nobody read are not claimed as measured
    # the file keeps each interval once, the very ones published
    kept = kept_intervals(rig.db, MAIN)
    assert [k[0] for k in kept] == [x["start"] for x in intervals]
    assert [k[3] for k in kept] == [x["import_kwh"] for x in intervals]
    # the day's bill so far has every interval of the day once, those before the kill too
    day = _local_day(intervals[-1]["start"])
    of_day = [x for x in intervals if _local_day(x["start"]) == day]
    (body,), = read_db(rig.db, "SELECT body FROM ledger_bills WHERE meter = ? AND kind = 'day' "
                               "AND label = ?", [MAIN, day])
    bill = json.loads(body)["bill"]
    assert bill["intervals"] == len(of_day), (bill["intervals"], len(of_day))
    assert bill["energy_kwh"] == pytest.approx(sum(x["import_kwh"] for x in of_day), abs=0.002)
    _seqs_contiguous(rig)
    # nothing the first run published came again after the restart
    again = [x["seq"] for x in rig.consumer.records("intervals") if x["_arrived"] > restarted
             and x["end"] <= killed]
    assert not again, again


def test_a_ct_shunt_and_an_unmetered_load_raise_their_events_and_nothing_before(rigs: Rigs
                                                                                 ) -> None:
    rig = rigs.tamper
    rig.result()
    marks = rig.timeline.marks
    c = rig.consumer
    _valid_batches(rig)
    events = [e for e in c.events() if e["type"] != "agent_started"]
    # the clean site: not a single event until the shunt, and a whole interval judged within
    assert [e["type"] for e in events if e["ts"] < marks["shunt"]] == []
    clean = [x for x in c.losses() if x["end"] <= marks["shunt"]]
    assert "within" in {x["status"] for x in clean} and "over" not in {x["status"] for x in clean}
    # the shunt: ct_bypass on L2 of the main meter once its delay has passed, nothing before
    raised = c.events("theft_indicator")
    assert len(raised) == 1, raised
    ev = raised[0]
    assert (ev["data"]["meter"], ev["data"]["indicator"], ev["data"]["phase"]) == \
        (MAIN, "ct_bypass", "l2")
    assert ev["data"]["since"] >= marks["shunt"]
    assert marks["shunt"] + CT_DELAY_S - 0.05 <= ev["ts"] <= marks["shunt"] + CT_DELAY_S + 3.0, \
        (ev["ts"] - marks["shunt"])
    assert ev["data"]["readings"]["current_a"]["l2"] == pytest.approx(0.0, abs=0.01)
    cleared = c.events("theft_indicator_cleared")
    assert [(e["data"]["indicator"], e["data"]["phase"]) for e in cleared] == [("ct_bypass", "l2")]
    assert cleared[0]["ts"] >= marks["shunt removed"] + CT_DELAY_S - 0.05
    # the unmetered load: the loss group is over the limit in the interval it started in
    assert [e for e in c.events("loss_exceeded") if e["ts"] < marks["unmetered"]] == []
    exceeded = c.events("loss_exceeded")
    assert len(exceeded) == 1
    data = exceeded[0]["data"]
    assert data["start"] <= marks["unmetered"] < data["end"] == exceeded[0]["ts"]
    assert data["loss_kwh"] > 0 and data["loss_pct"] > 5.0
    regs = rig.registers()
    main = regs.at(MAIN, data["end"]) - regs.at(MAIN, data["start"])
    sub = regs.at(SUB, data["end"]) - regs.at(SUB, data["start"])
    assert data["main_kwh"] == pytest.approx(main, abs=TOL_KWH)
    assert data["sub_kwh"] == pytest.approx(sub, abs=TOL_KWH)
    assert data["loss_kwh"] == pytest.approx(main - sub, abs=2 * TOL_KWH)
    over = [x for x in c.losses() if x["start"] == data["start"]]
    assert [x["status"] for x in over] == ["over"]
    # no other ledger event on the way
    others = [(e["type"], e["data"].get("indicator")) for e in events
              if e["type"] not in ("theft_indicator", "theft_indicator_cleared", "loss_exceeded")]
    assert others == [], others


def test_the_demo_site_raises_no_theft_or_loss_events(rigs: Rigs) -> None:
    rig = rigs.demo
    rig.result()
    c = rig.consumer
    _valid_batches(rig)
    _seqs_contiguous(rig)
    intervals = _once_per_start(rig, MAIN)
    assert time.time() - rig.timeline.marks["started"] >= 120.0
    assert any(r["quality"] == "complete" for r in intervals), intervals
    _priced(intervals)
    events = c.events()
    assert {e["type"] for e in events} == {"agent_started"}, json.dumps(
        [(e["type"], e["data"].get("indicator")) for e in events])
    _no_ledger_events(events, "the demo site")
