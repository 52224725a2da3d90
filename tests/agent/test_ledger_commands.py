"""The energy ledger's commands and the prepaid balance in money, end to end: signed ``tariff``
and ``carbon_curve`` commands over a real broker to an agent reading the simulated demo site,
and a purchase order in yuan counted down by what the site's energy costs under the tariff."""

from __future__ import annotations

import json
import math
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.security import generate_keypair
from lmt.analytics.tariff import parse_tariff, period_at, price_of
from lmt.config import load_agent_config
from tests.agent.harness import AgentThread
from tests.agent.test_control_flow import Rig
from tests.conftest import EXAMPLES, lmt_argv, wait_until

ROOT = Path(__file__).resolve().parents[2]
TARIFFS = ROOT / "config" / "tariffs"
LEDGER = {"tariff": "jiangsu-2025-two-part", "interval_minutes": 1}


def _tariff(name: str) -> dict[str, Any]:
    """A shipped tariff as the platform sends it: the file's content as JSON."""
    return parse_tariff(tomllib.loads((TARIFFS / f"{name}.toml").read_text(encoding="utf-8"))
                        ).to_dict()


def _events(rig: Rig, type_: str) -> list[dict[str, Any]]:
    rig.pump()
    return [e for e in rig.events if e["type"] == type_]


def test_a_tariff_command_replaces_the_tariff_from_its_time(tmp_path: Path, site: int,
                                                            broker: Broker) -> None:
    rig = Rig(tmp_path, site, broker, ledger=LEDGER)
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        body = _tariff("yunnan-2026-two-part")
        at = math.floor(time.time() / 60) * 60 + 60.0  # from the next minute's interval
        cid, answers = rig.command("tariff", tariff=body, effective_from=at)
        assert answers[-1]["status"] == "accepted", answers
        assert "yunnan-2026-two-part" in answers[-1]["detail"]
        wait_until(lambda: rig.statuses(cid) == ["accepted", "completed"], 10, "completed")
        wait_until(lambda: _events(rig, "tariff_changed"), 10, "tariff_changed")
        changed = _events(rig, "tariff_changed")
        assert changed[0]["data"]["tariff"] == "yunnan-2026-two-part"
        assert changed[0]["data"]["effective_from"] == at
        agent = runner.agent
        assert agent.ledger is not None
        from lmt.analytics.ledger import tariff_book
        book = tariff_book(agent.ledger.config, agent.ledger.state)
        assert book is not None
        before, after = book.tariff_at(at - 1), book.tariff_at(at)
        assert before is not None and before.id == "jiangsu-2025-two-part"
        assert after is not None and after.id == "yunnan-2026-two-part"

        # malformed: refused with the key that is wrong; nothing changes
        bad = json.loads(json.dumps(body))
        bad["seasons"][0]["grid"] = bad["seasons"][0]["grid"][:-1]
        _kid, answers = rig.command("tariff", tariff=bad, effective_from=at)
        assert answers[-1]["status"] == "rejected" and answers[-1]["reason"] == "invalid"
        assert "seasons[0]" in answers[-1]["detail"], answers[-1]
        book2 = tariff_book(agent.ledger.config, agent.ledger.state)
        assert book2 is not None and book2.to_dict() == book.to_dict()

        # a curve of hourly factors: accepted; a negative factor is refused, naming it
        hour = math.floor(time.time() / 3600) * 3600
        cid, answers = rig.command("carbon_curve", curve={
            "id": "grid-x", "source": "the platform", "start": hour,
            "kg_per_kwh": [0.42, 0.40, 0.38]})
        assert answers[-1]["status"] == "accepted", answers
        wait_until(lambda: rig.statuses(cid) == ["accepted", "completed"], 10, "completed")
        _kid, answers = rig.command("carbon_curve", curve={
            "id": "grid-y", "source": "the platform", "start": hour,
            "kg_per_kwh": [0.42, -1.0]})
        assert answers[-1]["status"] == "rejected" and "kg_per_kwh" in answers[-1]["detail"]
        assert agent.ledger.state.curve["id"] == "grid-x"
    finally:
        runner.stop()
        rig.close()


def test_a_prepaid_order_in_yuan_counts_down_with_the_tariff(tmp_path: Path, site: int,
                                                             broker: Broker) -> None:
    """The demo site draws about 180 kW: at Jiangsu's prices a yuan lasts some seconds. An
    order of 1.5 yuan alarms at 1.2 (``balance_low``) and trips round 1 at 0.9 left."""
    rig = Rig(tmp_path, site, broker, ledger=LEDGER)
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        agent = runner.agent
        assert agent.ledger is not None
        wait_until(lambda: (agent.ledger.spent_yuan or 0) > 0, 30, "a running cost")
        _cid, answers = rig.command("modes", params={
            "energy": {"rounds": [1], "interval_s": 1.0},
            "purchase": {"enabled": True, "order_no": 1, "append": False, "unit": "yuan",
                         "amount_yuan": 1.5, "alarm_yuan": 1.2, "trip_yuan": 0.9}})
        assert answers[-1]["status"] == "accepted", answers
        t0, spent0 = time.time(), agent.ledger.spent_yuan
        wait_until(lambda: _events(rig, "balance_low"), 60, "balance_low")
        low = _events(rig, "balance_low")[0]["data"]
        assert low["unit"] == "yuan" and low["alarm"] == 1.2 and low["trip"] == 0.9
        assert 0.9 < low["left"] <= 1.2
        wait_until(lambda: any(e["data"]["mode"] == "purchase" and e["data"]["round"] == 1
                               for e in _events(rig, "mode_trip")), 60, "the purchase trip")
        assert "chiller-1" in rig.off_loads()  # round 1
        # the money went as fast as the energy at the tariff's price: about kW × price
        elapsed = time.time() - t0
        spent = (agent.ledger.spent_yuan or 0) - (spent0 or 0)
        cfg = agent.ledger.config
        assert cfg.tariff is not None and cfg.calendar is not None
        price = price_of(cfg.tariff, period_at(cfg.tariff, cfg.calendar, time.time(),
                                               cfg.utc_offset_s))
        kw = agent.site_kw() or 0.0
        assert spent == pytest.approx(kw * price * elapsed / 3600, rel=0.5)
        report = agent.state.report["modes"]
        assert report["purchase_unit"] == "yuan" and report["purchase_left_kwh"] <= 0.9
    finally:
        runner.stop()
        rig.close()


def test_a_terminal_without_a_ledger_refuses_ledger_commands(tmp_path: Path, site: int,
                                                            broker: Broker) -> None:
    rig = Rig(tmp_path, site, broker, ledger={"enabled": False})
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        assert runner.agent.ledger is None
        _cid, answers = rig.command("tariff", tariff=_tariff("jiangsu-2025-two-part"),
                                    effective_from=time.time())
        assert answers[-1]["status"] == "rejected" and answers[-1]["reason"] == "invalid"
        assert "no energy ledger" in answers[-1]["detail"]
    finally:
        runner.stop()
        rig.close()


def test_shipped_tariffs_are_valid_command_bodies() -> None:
    """What the platform sends is a tariff file's content: every shipped file parses."""
    for f in sorted(TARIFFS.glob("*.toml")):
        t = parse_tariff(tomllib.loads(f.read_text(encoding="utf-8")))
        assert parse_tariff(json.loads(json.dumps(t.to_dict()))) == t


# -- the platform's side and the agent's checks, without a broker ----------------------------

def _lmt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lmt_argv(*args), capture_output=True, text=True, timeout=60)


def test_lmt_platform_signs_a_tariff_and_refuses_a_bad_one(tmp_path: Path) -> None:
    key, _pub = generate_keypair(tmp_path / "keys")
    out = _lmt("platform", "sign", "--key", str(key), "--terminal", "t-1", "tariff",
               "--file", "yunnan-2026-two-part", "--from", "2026-07-01T00:00+08:00")
    assert out.returncode == 0, out.stderr
    body = json.loads(json.loads(out.stdout)["body"])
    assert body["type"] == "tariff" and body["tariff"]["id"] == "yunnan-2026-two-part"
    assert body["effective_from"] == 1782835200.0  # 2026-06-30 16:00 UTC
    assert parse_tariff(body["tariff"]).id == "yunnan-2026-two-part"
    bad = tmp_path / "bad.toml"
    bad.write_text((TARIFFS / "yunnan-2026-two-part.toml").read_text(encoding="utf-8")
                   .replace('id = "yunnan-2026-two-part"', 'id = "Bad Id"'))
    out = _lmt("platform", "sign", "--key", str(key), "--terminal", "t-1", "tariff",
               "--file", str(bad))
    assert out.returncode != 0 and "bad.toml" in out.stderr and "id" in out.stderr
    out = _lmt("platform", "sign", "--key", str(key), "--terminal", "t-1", "tariff",
               "--file", str(bad), "--unchecked")
    assert out.returncode == 0, out.stderr  # to test a terminal's refusal
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps({"id": "c1", "source": "test", "start": 1782835200,
                                 "kg_per_kwh": [0.5, 0.4]}))
    out = _lmt("platform", "sign", "--key", str(key), "--terminal", "t-1", "carbon_curve",
               "--file", str(curve))
    assert out.returncode == 0, out.stderr
    assert json.loads(json.loads(out.stdout)["body"])["curve"]["kg_per_kwh"] == [0.5, 0.4]


def test_lmt_run_check_names_a_bad_tariff_file_and_key(tmp_path: Path) -> None:
    _key, pub = generate_keypair(tmp_path / "keys")
    cfg = tomllib.loads((EXAMPLES / "demo-agent.toml").read_text(encoding="utf-8"))
    cfg["security"]["platform_public_key"] = str(pub)
    bad = tmp_path / "my-tariff.toml"
    bad.write_text((TARIFFS / "jiangsu-2025-two-part.toml").read_text(encoding="utf-8")
                   .replace("valley = 0.35", "valley = -0.35"))
    cfg["ledger"]["tariff"] = "my-tariff.toml"  # relative to the agent file
    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps(cfg))
    out = _lmt("run", "--config", str(path), "--check")
    assert out.returncode == 2, out
    assert str(bad) in out.stderr and "valley" in out.stderr, out.stderr
    cfg["ledger"]["tariff"] = "no-such-tariff"
    path.write_text(tomli_w.dumps(cfg))
    out = _lmt("run", "--config", str(path), "--check")
    assert out.returncode == 2 and "ledger.tariff" in out.stderr
    assert "jiangsu-2025-two-part" in out.stderr  # the shipped ones are named
    cfg["ledger"]["tariff"] = "jiangsu-2025-two-part"
    cfg["ledger"]["theft"]["detectors"] = {"ct_bypas": {"delay_s": 5}}
    path.write_text(tomli_w.dumps(cfg))
    out = _lmt("run", "--config", str(path), "--check")
    assert out.returncode == 2 and "ledger.theft.detectors.ct_bypas" in out.stderr, out.stderr
    assert "ct_bypass" in out.stderr
