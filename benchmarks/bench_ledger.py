"""Ledger: its cost per cycle against the poll it rides on; a simulated month of 50 meters.

Run: .venv/bin/python benchmarks/bench_ledger.py [--quick] [--cycles N] [--days D] [--sizes 1,10,50]
     [--dir DIR]
Prints one JSON object per line: {"name", "value", "unit", "baseline", "ratio"}.

1. **Per cycle, against the poll** (1, 10 and 50 meters, ``eastron-sdm630``, all behind one
   simulated Modbus TCP gateway served by ``lmt.firmware_sim`` in its own process). The
   agent's own parts (:class:`lmt.agent.daemon.Agent`: its poller, its buffer file, its
   :class:`~lmt.agent.ledger.LedgerRunner` with every meter in the ledger, the Jiangsu
   two-part tariff, the default carbon factor and every theft detector) run the daemon's
   cycle without control: the ledger's energy registers asked for after a boundary, the poll
   (``Poller.poll``: reads over TCP, decoding, the telemetry commit), then
   ``Agent.ledger_cycle`` (every meter's reading into the ledger, its SQLite transaction when
   intervals close, the state saved once a minute). Both are timed in the same cycle, so drift
   hits them alike. The clock is synthetic: 1 s per cycle (``poll.interval_s = 1``), shared
   with the simulator through a memory-mapped file so the site's physics and registers follow
   it, and ``ledger.interval_minutes = 1``: every meter closes an interval every 60 cycles, at
   the boundary's real time (15 times as often as 15-minute intervals would: the mean is an
   upper bound); the counted cycles are whole minutes. Printed: the ledger's mean per
   cycle (closes amortised) against the poll's mean (goal: ratio <= 0.1), the medians, and
   the cycles that closed intervals on their own against the poll's median.
2. **A simulated month** (``--days 30``; the default run simulates 7 days to stay within about
   3 minutes, ``--quick`` 3): 50 meters (one main meter and 49 sub-meters, each a share of
   the simulator's site physics sampled once a minute), 15-minute intervals, every meter read
   every 60 s (``poll.interval_s = 60``, so readings 60 s apart count as covering the time
   between them), on a synthetic clock from 2026-04-01 00:00 (UTC+8), through
   ``LedgerRunner.on_cycle`` (tariff, carbon, theft, the billing meter's bills, its SQLite
   writes, the state saved every minute, its hourly prune) into a real buffer file whose
   outbox records are marked delivered every hour and pruned after a day, as a connected
   agent's sync does. Printed: the ledger's compute time against the intervals alone (the
   same Sample conversion and ``lmt.analytics.intervals.feed`` for the same readings, timed
   in the same cycles), in total and per reading; the buffer file against its
   ``ledger_intervals`` table, that table against the JSON bodies it holds, its rows against
   the expected count, and ``ledger.keep_days`` of such rows against the outbox's high-water
   mark (the ledger's table is kept out of the buffer's cap: it must fit beside it); the RSS
   after day 1 against before the first reading, and in the middle and at the end against
   after day 1 (flat: the rows are in the file, not in memory); the saved state's JSON at the
   end against after day 1; the bytes the process wrote to storage over the run
   (``/proc/self/io``) against the file; one ``LedgerRunner.prune`` at the end (meter by meter
   along the table's key).

``--dir`` puts the buffer files on a given disk (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import mmap
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w
from common import emit

from lmt.agent.broker import free_port, wait_for_port
from lmt.agent.buffer import STREAMS, BufferFile
from lmt.agent.daemon import Agent
from lmt.agent.ledger import LedgerRunner, to_sample
from lmt.agent.outbox import Outbox
from lmt.agent.security import generate_keypair
from lmt.agent.state_store import StateStore, dumps
from lmt.analytics.intervals import MeterLedger
from lmt.analytics.intervals import feed as feed_intervals
from lmt.config import load_profile
from lmt.config.agent import AgentConfig
from lmt.config.site import SiteConfig
from lmt.firmware_sim import SimulatedSite
from lmt.firmware_sim.physics import SitePhysics

PROFILE = "eastron-sdm630"
TARIFF = "jiangsu-2025-two-part"
UTC_OFFSET_S = 28800
# 2026-04-01 00:00 local (UTC+8): a 30-day month with the Qingming holiday in it
MONTH_START = datetime(2026, 3, 31, 16, 0, tzinfo=UTC).timestamp()
CYCLE_START = MONTH_START + 8 * 3600.0 + 40.0  # 08:00:40 local, mid-minute
# what a sub-meter sees of the site's power and energy: quantities scaled, the rest as is
SCALED = ("current_l1_a", "current_l2_a", "current_l3_a", "power_l1_w", "power_l2_w",
          "power_l3_w", "power_w", "import_energy_kwh", "export_energy_kwh")


def written_bytes() -> int:
    """Bytes this process has sent to storage so far (``write_bytes`` of /proc/self/io)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# -- the simulator in its own process, on the benchmark's clock --------------------------------

class SharedClock:
    """One float (unix seconds) in a memory-mapped file: written by the benchmark, read by the
    simulator for every request it answers."""

    def __init__(self, path: Path, create: bool = False) -> None:
        if create:
            path.write_bytes(b"\0" * 8)
        self._f = open(path, "r+b")  # kept open with the map
        self._map = mmap.mmap(self._f.fileno(), 8)

    def set(self, t: float) -> None:
        struct.pack_into("d", self._map, 0, t)

    def __call__(self) -> float:
        return float(struct.unpack_from("d", self._map, 0)[0])

    def close(self) -> None:
        self._map.close()
        self._f.close()


def serve_sim(site_path: Path, clock_path: Path) -> None:
    """The ``--serve-sim`` mode: the site served until SIGTERM, its time from the shared clock."""
    clock = SharedClock(clock_path)
    cfg = SiteConfig.model_validate(tomllib.loads(site_path.read_text()))

    async def run() -> None:
        site = SimulatedSite(cfg, clock=clock)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await site.stop()

    asyncio.run(run())


def agent_config(work: Path, n: int, port: int, interval_minutes: int, poll_s: float
                 ) -> dict[str, Any]:
    keys = work / "keys"
    pub = keys / "platform.pub"
    if not pub.exists():
        _, pub = generate_keypair(keys)
    devices = [{"name": f"m{i}", "profile": PROFILE, "host": "127.0.0.1", "port": port,
                "device_id": i + 1} for i in range(n)]
    return {"terminal": {"id": "bench"}, "mqtt": {"port": free_port()},
            "security": {"platform_public_key": str(pub)},
            "buffer": {"path": str(work / f"buffer-{n}.sqlite"), "flush_interval_s": poll_s},
            "poll": {"interval_s": poll_s, "timeout_s": 2.0, "max_timeout_s": 5.0},
            "devices": devices, "control": {"main_meter": "m0"},
            "modes": {"utc_offset_s": UTC_OFFSET_S},
            "ledger": {"meters": [d["name"] for d in devices], "tariff": TARIFF,
                       "interval_minutes": interval_minutes}}


# -- 1. per cycle, against the poll -----------------------------------------------------------

def per_cycle(work: Path, n: int, cycles: int, warmup: int) -> dict[str, list[float]]:
    """Per counted cycle: the poll's and the ledger's wall and CPU seconds, and whether the
    ledger wrote interval records."""
    work.mkdir()
    port = free_port()
    site = {"site": {"name": "bench", "seed": 3}, "server": {"host": "127.0.0.1", "port": port},
            "devices": [{"name": f"m{i}", "profile": PROFILE, "device_id": i + 1}
                        for i in range(n)]}
    (work / "site.toml").write_text(tomli_w.dumps(site))
    clock = SharedClock(work / "clock", create=True)
    now = [CYCLE_START, 1000.0]  # wall, monotonic: the agent's and the simulator's time
    clock.set(now[0])
    sim = subprocess.Popen([sys.executable, __file__, "--serve-sim", str(work / "site.toml"),
                            str(work / "clock")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 30, sim)
        cfg = AgentConfig.model_validate(agent_config(work, n, port, 1, 1.0))
        out: dict[str, list[float]] = {k: [] for k in ("poll", "ledger", "poll_cpu",
                                                       "ledger_cpu", "closed")}

        async def run() -> None:
            agent = Agent(cfg, clock=lambda: now[0], mono=lambda: now[1])
            ledger = agent.ledger
            assert ledger is not None and len(ledger.meters) == n
            try:
                for i in range(warmup + cycles):
                    now[0] += 1.0
                    now[1] += 1.0
                    clock.set(now[0])
                    for device, points in ledger.energy_points().items():
                        agent.poller.read_soon(device, points)
                    c0, p0 = time.perf_counter(), time.process_time()
                    got = await agent.poller.poll(now[1] + 1.0)
                    c1, p1 = time.perf_counter(), time.process_time()
                    seq = agent.outbox.last_seq("intervals")
                    agent.ledger_cycle()
                    c2, p2 = time.perf_counter(), time.process_time()
                    assert len(got.fresh) == n, f"{n - len(got.fresh)} meters did not answer"
                    assert agent._ledger_failed is None, agent._ledger_failed
                    if i >= warmup:
                        out["poll"].append(c1 - c0)
                        out["ledger"].append(c2 - c1)
                        out["poll_cpu"].append(p1 - p0)
                        out["ledger_cpu"].append(p2 - p1)
                        out["closed"].append(float(agent.outbox.last_seq("intervals") > seq))
                got_n = agent.outbox.last_seq("intervals")
                assert got_n >= n * (cycles // 60), f"only {got_n} intervals closed"
            finally:
                agent.close()

        asyncio.run(run())
    finally:
        sim.terminate()
        sim.wait(10)
        clock.close()
    return out


def report_cycles(n: int, r: dict[str, list[float]]) -> None:
    ms = 1000.0
    poll, ledger = r["poll"], r["ledger"]
    emit(f"ledger_per_cycle_mean_{n}_meters", statistics.fmean(ledger) * ms, "ms",
         statistics.fmean(poll) * ms)
    emit(f"ledger_per_cycle_median_{n}_meters", statistics.median(ledger) * ms, "ms",
         statistics.median(poll) * ms)
    emit(f"ledger_per_cycle_cpu_mean_{n}_meters", statistics.fmean(r["ledger_cpu"]) * ms, "ms",
         statistics.fmean(r["poll_cpu"]) * ms)
    closing = [t for t, c in zip(ledger, r["closed"], strict=True) if c]
    if closing:
        emit(f"ledger_closing_cycle_mean_{n}_meters", statistics.fmean(closing) * ms, "ms",
             statistics.median(poll) * ms)
        emit(f"ledger_closing_cycle_max_{n}_meters", max(closing) * ms, "ms",
             statistics.median(poll) * ms)


# -- 2. a simulated month ---------------------------------------------------------------------

def table_bytes(db: Any, name: str) -> tuple[int, int, int]:
    """(bytes of the table's pages, rows, bytes of the rows' JSON bodies)."""
    pages = db.execute("SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = ?",
                       [name]).fetchone()[0]
    rows, body = db.execute(f"SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM {name}"
                            ).fetchone()
    return int(pages), int(rows), int(body)


def month(work: Path, meters: int, days: int) -> None:
    work.mkdir()
    cfg = AgentConfig.model_validate(agent_config(work, meters, 5020, 15, 60.0))
    profile = load_profile(PROFILE)
    names = [p.name for p in profile.points]
    physics = SitePhysics(SiteConfig.model_validate({
        "site": {"name": "month", "seed": 3, "base_load_kw": 400.0, "noise_kw": 4.0},
        "devices": [{"name": "site", "profile": PROFILE}]}))
    # the main meter sees the site; the sub-meters a share each (together 95 % of it)
    weights = [1 + i % 7 for i in range(meters - 1)]
    shares = [1.0] + [0.95 * w / sum(weights) for w in weights]
    file = BufferFile(cfg.buffer.path)
    outbox = Outbox(file, max_mb=cfg.buffer.max_mb)
    store = StateStore(file)

    def append(stream: str, bodies: list[dict[str, Any]]) -> None:
        outbox.append(stream, bodies)

    runner = LedgerRunner(cfg, {f"m{i}": profile for i in range(meters)}, file, outbox, store,
                          "bench", append)
    config = runner.config
    specs = {m.name: m for m in config.meters}
    points = runner.points
    base: dict[str, MeterLedger] = {}
    t, mono = MONTH_START, 1000.0
    steps = days * 1440
    marks = {1: "first", 1440: "day1", steps // 2: "middle", steps: "end"}
    ledger_s = base_s = 0.0
    rss: dict[str, float] = {}
    state_bytes: dict[str, int] = {}
    gc.collect()
    written = written_bytes()
    for k in range(steps + 1):  # readings at 00:00 ... 24:00 of each day: every interval closes
        q = physics.sample(t, "site")
        latest = {f"m{i}": (mono, {n: q[n] * share if n in SCALED else q[n] for n in names})
                  for i, share in enumerate(shares)}
        c0 = time.perf_counter()
        for name, (read_at, vals) in latest.items():  # the intervals alone, same conversion
            sample = to_sample(points[name], vals, t, read_at)
            base[name] = feed_intervals(config.intervals, specs[name],
                                        base.get(name) or MeterLedger(), sample, "bench")[0]
        c1 = time.perf_counter()
        runner.on_cycle(latest, t, mono)
        c2 = time.perf_counter()
        base_s += c1 - c0
        ledger_s += c2 - c1
        if k % 60 == 0:  # the sync: every record acknowledged, delivered ones kept a day
            for stream in STREAMS:
                outbox.mark_delivered(stream, outbox.last_seq(stream))
            outbox.prune_delivered(t - cfg.buffer.keep_delivered_h * 3600.0)
        if k in marks:
            gc.collect()
            rss[marks[k]] = rss_mb()
            state_bytes[marks[k]] = len(dumps(runner.state.to_dict()))
        t += 60.0
        mono += 60.0
    c0 = time.perf_counter()
    runner.prune(t)
    prune_s = time.perf_counter() - c0
    db = file.db
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    os.sync()
    written = written_bytes() - written
    size = os.path.getsize(cfg.buffer.path)
    tbl, rows, body = table_bytes(db, "ledger_intervals")
    bills = db.execute("SELECT COUNT(*) FROM ledger_bills").fetchone()[0]
    cap_high = outbox.high_water
    outbox.close()
    file.close()

    readings = (steps + 1) * meters
    emit(f"ledger_month_compute_{meters}_meters_{days}_days", ledger_s, "s", base_s)
    emit("ledger_month_compute_per_reading", ledger_s / readings * 1e6, "us",
         base_s / readings * 1e6)
    emit("ledger_month_buffer_file_bytes", size, "bytes", tbl)
    emit("ledger_month_disk_bytes_written", written, "bytes", size)
    emit("ledger_month_intervals_table_bytes", tbl, "bytes", body)
    emit("ledger_month_interval_rows", rows, "rows", meters * days * 96)
    emit("ledger_month_bill_rows", bills, "rows", days + 1)
    keep = cfg.ledger.keep_days
    emit(f"ledger_intervals_bytes_for_keep_days_{keep}", tbl / days * keep, "bytes", cap_high)
    emit("ledger_month_rss_after_day_1", rss["day1"], "MB", rss["first"])
    emit("ledger_month_rss_middle", rss["middle"], "MB", rss["day1"])
    emit("ledger_month_rss_end", rss["end"], "MB", rss["day1"])
    emit("ledger_month_state_bytes_end", state_bytes["end"], "bytes", state_bytes["day1"])
    emit("ledger_month_prune_at_end", prune_s * 1000.0, "ms", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="a shorter run: 240 cycles per size, 3 simulated days")
    ap.add_argument("--cycles", type=int, default=None,
                    help="counted cycles per size, in whole minutes (default 600)")
    ap.add_argument("--days", type=int, default=None,
                    help="simulated days of part 2 (default 7; 30 for the month; 0: none)")
    ap.add_argument("--sizes", default="1,10,50", help="meters of part 1, comma-separated")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the buffer files go (default: a temporary folder)")
    ap.add_argument("--serve-sim", nargs=2, metavar=("SITE", "CLOCK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_sim:
        serve_sim(Path(args.serve_sim[0]), Path(args.serve_sim[1]))
        return
    cycles = args.cycles or (240 if args.quick else 600)
    cycles = max(60, cycles // 60 * 60)
    days = args.days if args.days is not None else (3 if args.quick else 7)
    if 0 < days < 3:
        ap.error("--days: 0, or at least 3")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in (int(x) for x in args.sizes.split(",") if x.strip()):
            report_cycles(n, per_cycle(Path(tmp) / f"cycle-{n}", n, cycles, warmup=70))
        if days:
            month(Path(tmp) / "month", 50, days)


if __name__ == "__main__":
    main()
