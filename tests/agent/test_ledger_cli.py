"""`lmt ledger`: what the energy ledger keeps, read from a real buffer file by a real `lmt`
process — while an agent holds the buffer (its lock stays held, nothing is written) and after
it stopped (no side files appear, the file's bytes are unchanged).

The buffer is made by the agent's own ledger (:class:`lmt.agent.ledger.LedgerRunner` on a real
BufferFile, Outbox and StateStore) from a synthetic day and a half of one-minute readings of two
meters: the main (billing) meter and a sub-meter of a loss group that reads half of it (a loss
alarm) until noon, with its l3 current reversed for ten minutes (a theft indicator)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from lmt.agent.buffer import BufferError, BufferFile
from lmt.agent.ledger import LedgerRunner
from lmt.agent.ledger_report import day_bounds
from lmt.agent.messages import validate_body
from lmt.agent.outbox import Outbox
from lmt.agent.security import generate_keypair
from lmt.agent.state_store import StateStore
from lmt.config import load_agent_config
from lmt.config.profiles import load_profile
from tests.conftest import EXAMPLES, lmt_argv

OFFSET = 8 * 3600
DAY = date(2026, 7, 15)  # a Wednesday, no holiday
NEXT = date(2026, 7, 16)
D0, D1 = day_bounds(DAY, OFFSET)
STEP_S = 60.0


def write_config(tmp: Path, **ledger: Any) -> Path:
    _, pub = generate_keypair(tmp / "keys")
    cfg = tomllib.loads((EXAMPLES / "demo-agent.toml").read_text())
    cfg["security"]["platform_public_key"] = str(pub)
    cfg["buffer"]["path"] = str(tmp / "buffer.sqlite")
    cfg["poll"]["interval_s"] = 30.0  # one-minute readings are then no gaps (3 cycles)
    cfg["devices"].append({"name": "sub-meter", "profile": "eastron-sdm630", "host": "127.0.0.1",
                           "port": 5020, "device_id": 3})
    lg = {"meters": ["main-meter", "sub-meter"], "tariff": "jiangsu-2025-two-part",
          "loss_groups": [{"name": "site", "main": "main-meter", "subs": ["sub-meter"],
                           "raise_after": 2, "clear_after": 2}], **ledger}
    cfg["ledger"] = {k: v for k, v in lg.items() if v is not None}
    path = tmp / "agent.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def decoded(x: float) -> float:
    """A value as a read decodes it: a new object every time (the agent's ledger tells an
    energy register not read again in a reading from one that was by identity)."""
    return float(repr(x))


def values(kw: float, kwh: float, reversed_l3: bool = False) -> dict[str, float]:
    phase_w = kw * 1000.0 / 3
    amps = phase_w / 230.0 / 0.95
    l3 = -phase_w if reversed_l3 else phase_w
    return {"voltage_l1_v": 230.0, "voltage_l2_v": 230.0, "voltage_l3_v": 230.0,
            "current_l1_a": amps, "current_l2_a": amps, "current_l3_a": amps,
            "power_l1_w": phase_w, "power_l2_w": phase_w, "power_l3_w": l3,
            "power_factor_l1": 0.95, "power_factor_l2": 0.95,
            "power_factor_l3": -0.95 if reversed_l3 else 0.95,
            "power_w": 2 * phase_w + l3, "frequency_hz": 50.0,
            "import_energy_kwh": decoded(kwh), "export_energy_kwh": decoded(0.0)}


def main_kw(t: float) -> float:
    hour = (t - D0) / 3600.0 % 24
    return 40.0 + 20.0 * (8 <= hour < 20)  # 40 kW at night, 60 kW by day


@dataclass
class Site:
    config: Path
    buffer: Path
    runner: LedgerRunner
    file: BufferFile
    outbox: Outbox
    store: StateStore
    now: float
    mono: float
    kwh: dict[str, float]

    def feed_until(self, end: float) -> None:
        while self.now < end:
            self.now += STEP_S
            self.mono += STEP_S
            hour = (self.now - D0) / 3600.0
            kw = main_kw(self.now)
            share = 0.5 if hour < 12 else 0.99  # half the energy unmetered until noon
            sub = kw * share
            self.kwh["main-meter"] += kw * STEP_S / 3600.0
            self.kwh["sub-meter"] += sub * STEP_S / 3600.0
            theft = 10.0 <= hour < 10.0 + 10 / 60
            latest = {"main-meter": (self.mono, values(kw, self.kwh["main-meter"])),
                      "sub-meter": (self.mono, values(sub, self.kwh["sub-meter"], theft))}
            self.runner.on_cycle(latest, self.now, self.mono)

    def event(self, body: dict[str, Any]) -> None:
        with self.outbox.transaction():
            self.outbox.append("events", [validate_body("events", body)])

    def close(self) -> None:
        self.outbox.close()
        self.file.close()


def open_site(config: Path) -> Site:
    cfg = load_agent_config(config)
    file = BufferFile(cfg.buffer.path)
    outbox = Outbox(file, max_mb=cfg.buffer.max_mb)
    store = StateStore(file)
    profiles = {n: load_profile(cfg.device(n).profile) for n in cfg.ledger_meters()}

    def append(stream: str, bodies: list[dict[str, Any]]) -> None:  # as the agent's
        outbox.append(stream, bodies)

    runner = LedgerRunner(cfg, profiles, file, outbox, store, "test-session", append)
    return Site(config, Path(cfg.buffer.path), runner, file, outbox, store, D0 - 2 * STEP_S, 1000.0,
                {"main-meter": 1000.0, "sub-meter": 500.0})


def supervisor_state(now: float) -> dict[str, Any]:
    """A supervisor's saved state with a prepaid order in yuan (what control keeps)."""
    from lmt.control import modes
    from lmt.control.supervisor import SupervisorState

    st = SupervisorState(mode_state=modes.ModeState(order_no=7, order_unit="yuan",
                                                    order_left_kwh=5000.0, order_at_kwh=0.0))
    d = st.to_dict()
    d["mode_params"]["purchase"].update(enabled=True, order_no=7, unit="yuan",
                                        amount_yuan=5000.0, alarm_yuan=500.0, trip_yuan=100.0)
    d["mode_params"]["monthly"].update(enabled=True, limit_kwh=40000.0)
    d["report"]["modes"] = {"purchase_left_kwh": 4321.456, "purchase_unit": "yuan",
                            "month_used_kwh": 1500.1234}
    return d


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The agent's ledger fed from 00:00 on DAY to 00:31 on NEXT, its buffer held open."""
    tmp = tmp_path_factory.mktemp("ledger")
    s = open_site(write_config(tmp))
    s.event({"ts": D0 + 60, "type": "agent_started", "data": {}})
    s.feed_until(D0 + 9 * 3600)
    s.event({"ts": s.now, "type": "balance_low",
             "data": {"unit": "yuan", "left": 480.5, "alarm": 500.0, "trip": 100.0,
                      "order_no": 7, "month_used_kwh": 1500.123, "detail": "below the alarm"}})
    s.feed_until(D1 + 31 * 60)
    s.store.save("supervisor", supervisor_state(s.now), s.now)
    yield s
    s.close()


def lmt_ledger(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lmt_argv("ledger", "--config", str(site.config), *args),
                          capture_output=True, text=True, timeout=120)


def ledger_json(site: Site, *args: str) -> dict[str, Any]:
    res = lmt_ledger(site, "--json", *args)
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def test_json_report_of_a_day(site: Site) -> None:
    r = ledger_json(site, "--day", DAY.isoformat())
    assert r["version"] == 1 and r["terminal"] == "demo-0001"
    assert (r["day"], r["month"], r["utc_offset_s"]) == ("2026-07-15", "2026-07", OFFSET)
    assert (r["day_start"], r["day_end"]) == (D0, D1)
    assert r["billing_meter"] == "main-meter" and r["interval_minutes"] == 15
    main, sub = r["meters"]
    assert (main["meter"], main["billing"], sub["meter"], sub["billing"]) == \
        ("main-meter", True, "sub-meter", False)
    rows = main["intervals"]
    assert len(rows) == 96
    assert rows[0]["local_start"] == "2026-07-15T00:00:00+08:00"
    assert [r["start"] for r in rows] == [D0 + 900 * i for i in range(96)]
    first = rows[0]
    assert first["import_kwh"] == pytest.approx(10.0, abs=1e-6)  # 40 kW for 15 min
    assert first["mean_kw"] == pytest.approx(40.0, abs=1e-3)
    assert first["period"] == "valley" and first["quality"] in ("complete", "estimated")
    assert first["cost"] > 0 and first["kgco2"] > 0
    noon = rows[48]
    assert noon["mean_kw"] == pytest.approx(60.0, abs=1e-3)
    assert set(first) == {"start", "end", "local_start", "minutes", "import_kwh", "export_kwh",
                          "mean_kw", "max_kw", "period", "cost", "kgco2", "quality", "flags",
                          "coverage"}
    day = main["day"]
    assert day["intervals"] == 96
    assert day["import_kwh"] == pytest.approx(40 * 12 + 60 * 12, abs=0.01)
    assert day["max_kw"] == pytest.approx(60.0, abs=0.5)
    assert main["month"]["intervals"] == 1 + 96 + 2  # the day before's last, the next's first two
    assert main["month"]["max_demand"]["kw"] == pytest.approx(60.0, abs=0.5)
    # half until noon, 99 % after (give or take the minutes at 08:00, 12:00 and 20:00)
    assert sub["day"]["import_kwh"] == pytest.approx((40 * 8 + 60 * 4) * 0.5
                                                     + (60 * 8 + 40 * 4) * 0.99, abs=0.5)

    bills = r["bills"]
    assert bills["meter"] == "main-meter" and bills["tariff"] == "jiangsu-2025-two-part"
    d, m = bills["day"], bills["month"]
    assert (d["period"], d["final"], d["source"], d["kind"]) == ("2026-07-15", True,
                                                                 "ledger_bills", "day")
    assert (m["period"], m["final"], m["kind"]) == ("2026-07", False, "month")
    assert d["energy_kwh"] == pytest.approx(day["import_kwh"], abs=0.01)
    assert d["energy_cost"] == pytest.approx(day["cost"], abs=0.02)
    assert d["kgco2"] == pytest.approx(day["kgco2"], abs=0.01)
    assert sum(d["period_kwh"].values()) == pytest.approx(d["energy_kwh"], abs=0.01)
    assert d["intervals"] == 96 and d["complete"] is True
    assert d["total"] == pytest.approx(d["energy_cost"] + d["demand_charge"]
                                       + d["fixed_charges"], abs=0.02)
    assert d["demand_charge"] > 0 and d["max_demand_kw"] == pytest.approx(60.0, abs=0.5)
    assert m["energy_kwh"] == pytest.approx(main["month"]["import_kwh"], abs=0.01)

    bal = r["balance"]
    assert bal == {"enabled": True, "unit": "yuan", "left": 4321.46, "order_no": 7,
                   "alarm_at": 500.0, "trip_at": 100.0, "alarm": False,
                   "month_used_kwh": 1500.123, "month_limit_kwh": 40000.0,
                   "spent_yuan": bal["spent_yuan"], "as_of": bal["as_of"],
                   "source": "supervisor"}
    assert bal["spent_yuan"] > d["energy_cost"] and bal["as_of"] == pytest.approx(site.now)

    c = r["carbon"]
    assert c["meter"] == "main-meter" and c["day_kgco2"] == day["kgco2"]
    assert c["month_kgco2"] == main["month"]["kgco2"]
    f = c["factor"]
    assert f["id"] and f["kg_per_kwh"] > 0 and c["factors_used"] == [f["id"]]
    assert c["day_kg_per_kwh"] == pytest.approx(f["kg_per_kwh"], rel=1e-3)
    assert c["curve"] is False and c["factor_problem"] is None

    (loss,) = r["losses"]
    assert (loss["group"], loss["main"], loss["subs"]) == ("site", "main-meter", ["sub-meter"])
    assert loss["intervals"] == 96 and loss["over"] == 48 and loss["active"] is False

    ev = r["events"]
    assert ev["types"] == ["loss_exceeded", "loss_cleared", "theft_indicator",
                           "theft_indicator_cleared", "balance_low"]
    types = [e["type"] for e in ev["records"]]
    assert types == ["loss_exceeded", "balance_low", "theft_indicator",
                     "theft_indicator_cleared", "loss_cleared"]  # no agent_started
    seqs = [e["seq"] for e in ev["records"]]
    assert seqs == sorted(seqs)
    theft = ev["records"][2]
    assert theft["data"]["meter"] == "sub-meter" and theft["data"]["phase"] == "l3"
    assert theft["local"].startswith("2026-07-15T10:0")


def test_text_report(site: Site) -> None:
    res = lmt_ledger(site, "--day", DAY.isoformat())
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("demo-0001: ledger of 2026-07-15 (UTC+08:00), buffer ")
    assert "main-meter (billing meter): 96 interval(s) of 15 min on 2026-07-15" in out
    assert "sub-meter: 96 interval(s) of 15 min on 2026-07-15" in out
    lines = out.splitlines()
    first = next(ln for ln in lines if ln.startswith("  00:00"))
    assert first.split()[1:4] == ["10.000", "40.00", "40.00"] and "valley" in first
    assert "bill so far, main-meter (tariff jiangsu-2025-two-part, money in 元):" in out
    assert "2026-07-15 final" in out and "2026-07 so far" in out
    for label in ("peak", "valley", "energy", "demand charge", "fixed charges", "total",
                  "kgCO2"):
        assert any(ln.startswith(f"  {label} ") for ln in lines), label
    assert "prepaid balance: 4321.46 元 left (order 7, alarm at 500.00, trip at 100.00)" in out
    assert "month used 1500.123 of 40000.000 kWh" in out
    assert "carbon, main-meter: day " in out and "kgCO2/kWh" in out
    assert "losses, group site (main-meter against sub-meter)" in out
    assert "loss, theft and balance events (the last 5):" in out
    assert "sub-meter: reverse_power on l3" in out
    assert "balance_low" in out and "480.50 元 left" in out


def test_the_next_day_so_far_and_options(site: Site) -> None:
    r = ledger_json(site, "--day", NEXT.isoformat(), "--meter", "main-meter", "--events", "2")
    (main,) = r["meters"]
    assert len(main["intervals"]) == 2
    assert r["bills"]["day"]["final"] is False and r["bills"]["day"]["intervals"] == 2
    # the main meter's: its loss group's and the balance's, not the sub-meter's theft
    assert [e["type"] for e in r["events"]["records"]] == ["balance_low", "loss_cleared"]
    # a sub-meter: its intervals and carbon, the loss group it is in, its own theft events
    r = ledger_json(site, "--day", DAY.isoformat(), "--meter", "sub-meter", "--events", "0")
    assert [p["meter"] for p in r["meters"]] == ["sub-meter"]
    assert r["carbon"]["meter"] == "sub-meter" and r["events"]["records"] == []
    assert r["losses"][0]["group"] == "site"
    # events since a local time: the afternoon's only
    r = ledger_json(site, "--day", DAY.isoformat(), "--since", "2026-07-15T11:00")
    assert [e["type"] for e in r["events"]["records"]] == ["loss_cleared"]
    # today (no data in this buffer's days): an empty, well-formed report
    r = ledger_json(site)
    assert r["meters"][0]["intervals"] == [] and r["meters"][0]["day"]["import_kwh"] is None


def test_a_running_agent_is_not_disturbed(tmp_path: Path) -> None:
    """The agent's BufferFile is open (its lock held) while `lmt ledger` runs: the command
    reads, the lock stays held, and the agent goes on writing, also while the command runs
    inside one of its transactions."""
    site = open_site(write_config(tmp_path))
    try:
        site.feed_until(D0 + 3600 + 60)
        r = ledger_json(site, "--day", DAY.isoformat(), "--meter", "main-meter")
        assert len(r["meters"][0]["intervals"]) == 4
        with pytest.raises(BufferError, match="in use by another lmt agent"):
            BufferFile(site.buffer)
        site.feed_until(site.now + 15 * 60)  # the agent still writes: the next interval closes
        r = ledger_json(site, "--day", DAY.isoformat(), "--meter", "main-meter")
        assert len(r["meters"][0]["intervals"]) == 5
        # in the middle of the agent's write transaction: not blocked, and what is not
        # committed is not seen
        low = {"ts": site.now, "type": "balance_low", "data": {"unit": "yuan", "left": 90.0}}
        with site.outbox.transaction():
            site.outbox.append("events", [validate_body("events", low)])
            r = ledger_json(site, "--day", DAY.isoformat())
            assert [e["type"] for e in r["events"]["records"]] == ["loss_exceeded"]
        r = ledger_json(site, "--day", DAY.isoformat())
        assert r["events"]["records"][-1]["data"] == low["data"]
    finally:
        site.close()


def test_a_stopped_agents_buffer_is_left_as_it_is(tmp_path: Path) -> None:
    s = open_site(write_config(tmp_path))
    s.feed_until(D0 + 3600)
    s.close()
    folder = s.buffer.parent
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
              if p.is_file()}
    assert s.buffer.name + "-wal" not in before
    res = lmt_ledger(s, "--day", DAY.isoformat(), "--json")
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["meters"][0]["intervals"]) == 4
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
             if p.is_file()}
    assert after == before


def test_a_bill_missing_from_the_table_is_recomputed_from_the_state(tmp_path: Path) -> None:
    s = open_site(write_config(tmp_path))
    s.feed_until(D0 + 5 * 3600)
    s.close()
    stored = ledger_json(s, "--day", DAY.isoformat())["bills"]
    con = sqlite3.connect(s.buffer)
    con.execute("DELETE FROM ledger_bills")
    con.commit()
    con.close()
    again = ledger_json(s, "--day", DAY.isoformat())["bills"]
    for kind in ("day", "month"):
        assert again[kind]["source"] == "state" and stored[kind]["source"] == "ledger_bills"
        for k, v in stored[kind].items():
            if k not in ("source", "as_of", "final"):  # (the stored demand is rounded)
                assert again[kind][k] == (pytest.approx(v) if isinstance(v, float) else v), k


def test_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    site = Site(cfg, tmp_path / "buffer.sqlite", None, None, None, None, 0, 0, {})  # type: ignore[arg-type]

    res = lmt_ledger(site)
    assert res.returncode == 1
    assert res.stderr.startswith(f"lmt ledger: no buffer file at {tmp_path / 'buffer.sqlite'} "
                                 "yet")
    res = lmt_ledger(site, "--json")
    assert json.loads(res.stdout)["error"]["kind"] == "no-buffer"
    assert not (tmp_path / "buffer.sqlite").exists()

    # a buffer from an agent before the ledger: outbox and state, no ledger tables
    from lmt.agent.buffer import BufferFile as Plain

    Plain(tmp_path / "buffer.sqlite").close()
    res = lmt_ledger(site, "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"]["kind"] == "no-ledger"
    assert "older than the energy ledger" in res.stderr

    res = lmt_ledger(site, "--meter", "relays")
    assert res.returncode == 2 and "--meter 'relays' is not one of the ledger's meters " \
        "(main-meter, sub-meter" in res.stderr
    for bad in (["--day", "15.07.2026"], ["--day", "2026-02-30"], ["--events", "-1"]):
        res = lmt_ledger(site, *bad)
        assert res.returncode == 2 and "usage: lmt ledger" in res.stderr, bad
    res = lmt_ledger(site, "--since", "yesterday")
    assert res.returncode == 2 and "--since: not a time: 'yesterday'" in res.stderr

    off = tmp_path / "off"
    off.mkdir()
    cfg_off = write_config(off, enabled=False, meters=None, loss_groups=[])
    res = subprocess.run(lmt_argv("ledger", "--config", str(cfg_off)), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "the ledger is off" in res.stderr


def test_help_explains_the_command() -> None:
    res = subprocess.run(lmt_argv("ledger", "--help"), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("usage: lmt ledger")
    for option in ("--config", "--day", "--meter", "--events", "--since", "--json"):
        assert option in res.stdout
    assert "read-only" in res.stdout
