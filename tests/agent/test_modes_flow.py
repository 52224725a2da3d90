"""Terminal control modes in the agent, end to end: signed ``remote``, ``guarantee`` and
``modes`` commands over a real broker, the simulated demo site over Modbus TCP (rounds 1-6 are
relay_1..relay_6), mode parameters and state in the real SQLite buffer, and a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

import lmt.agent.daemon as daemon
from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.config import load_agent_config
from tests.agent.harness import AgentThread
from tests.agent.test_control_flow import Rig
from tests.conftest import wait_until


class ModesRig(Rig):
    def mode_events(self, kind: str, rnd: int | None = None) -> list[dict]:
        self.pump()
        return [e["data"] for e in self.events if e["type"] == f"mode_{kind}"
                and (rnd is None or e["data"]["round"] == rnd)]

    def answer(self, kind: str, **params: object) -> tuple[str, dict]:
        cid, answers = self.command(kind, **params)
        return cid, answers[-1]


def _start(rig: Rig) -> AgentThread:
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
    return runner


def test_remote_guarantee_restart_and_invalid(tmp_path: Path, site: int, broker: Broker,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "MODE_RECORD_AFTER_S", 2.0)  # the 2-minute record, sooner
    rig = ModesRig(tmp_path, site, broker)
    runner = _start(rig)
    try:
        assert all(rig.coils()[:7])
        # remote trip of round 1 (chiller-1, relay_1) at once
        _cid, ans = rig.answer("remote", round=1, action="trip")
        assert ans["status"] == "accepted", ans
        wait_until(lambda: not rig.coils()[0], 10, "round 1 tripped")
        trip = wait_until(lambda: rig.mode_events("trip", 1), 10, "a mode_trip event")
        assert isinstance(trip, list) and trip[0]["mode"] == "remote" and trip[0]["power_kw"] > 0
        rec = wait_until(lambda: [r for r in rig.mode_events("record", 1) if r["kind"] == "trip"],
                         15, "the trip's record with the power after")
        assert isinstance(rec, list) and rec[0]["power_kw_after_2min"] > 0
        assert rec[0]["power_kw"] == trip[0]["power_kw"]
        assert all(rig.coils()[1:7]), "only round 1 is tripped"
        # allow close: back on
        _cid, ans = rig.answer("remote", round=1, action="close")
        assert ans["status"] == "accepted"
        wait_until(lambda: rig.coils()[0], 10, "round 1 closed again")
        restore = wait_until(lambda: rig.mode_events("restore", 1), 10, "a mode_restore event")
        assert isinstance(restore, list) and restore[0]["reason"] == "remote allow close"

        # a guarantee closes a tripped round
        rig.answer("remote", round=2, action="trip")
        wait_until(lambda: not rig.coils()[1], 10, "round 2 tripped")
        _cid, ans = rig.answer("guarantee", on=True)
        assert ans["status"] == "accepted"
        wait_until(lambda: rig.coils()[1], 10, "round 2 closed by the guarantee")
        wait_until(lambda: rig.mode_events("guarantee_on"), 10, "guarantee on")
        assert rig.mode_events("restore", 2)[0]["mode"] == "guarantee"
        rig.answer("guarantee", on=False)
        wait_until(lambda: rig.mode_events("guarantee_off"), 10, "guarantee off")
        assert rig.coils()[1], "the old trip is not repeated after the guarantee"

        # a trip that survives a restart, not repeated
        rig.answer("remote", round=3, action="trip")
        wait_until(lambda: not rig.coils()[2], 10, "round 3 tripped")
        wait_until(lambda: len(rig.mode_events("trip", 3)) == 1, 10, "its trip event")
        runner.stop()
        assert not rig.coils()[2], "a tripped round stays open while the agent is down"
        runner = _start(rig)
        wait_until(lambda: runner.agent.mode_state is not None
                   and 3 in runner.agent.mode_state.tripped and runner.agent._mode_held, 10,
                   "the persisted state in force")
        assert runner.agent.mode_params.remote[-1].round == 3
        assert not rig.coils()[2] and all(rig.coils()[:2])
        n_ignored = len(rig.mode_events("ignored", 1))
        rig.answer("remote", round=1, action="close")  # not tripped: an "ignored" record after
        wait_until(lambda: len(rig.mode_events("ignored", 1)) > n_ignored, 10, "the ignored close")
        assert len(rig.mode_events("trip", 3)) == 1, "the trip is not repeated"
        assert not rig.coils()[2]

        # an invalid parameter: refused with the reason, nothing switched, nothing stored
        before = rig.coils()
        _cid, ans = rig.answer("modes", params={"power": {"slide_min": 99}})
        assert ans["status"] == "rejected" and ans["reason"] == "invalid"
        assert "PowerParams.slide_min" in ans["detail"]
        _cid, ans = rig.answer("modes", params={"no_such": 1})
        assert ans["reason"] == "invalid" and "no_such" in ans["detail"]
        _cid, ans = rig.answer("remote", round=8, action="trip")
        assert ans["reason"] == "invalid" and "round 8" in ans["detail"]
        assert runner.agent.mode_params.power.slide_min == 1
        assert rig.coils() == before
        # a valid partial update is stored and keeps the rest
        _cid, ans = rig.answer("modes", params={"floor_kw": 5, "power": {"slide_min": 2}})
        assert ans["status"] == "accepted"
        p = runner.agent.buffer.load_mode("params")
        assert p["floor_kw"] == 5 and p["power"]["slide_min"] == 2 and p["remote"]
        rig.answer("remote", round=3, action="close")
        wait_until(lambda: rig.coils()[2], 10, "round 3 closed")
    finally:
        runner.stop()
        rig.close()


def test_critical_load_cannot_have_a_round(tmp_path: Path) -> None:
    from lmt.config.agent import Load

    with pytest.raises(ValueError, match="critical"):
        Load(name="server-room", device="relays", point="relay_7", rated_kw=6, critical=True,
             round=1)


def test_platform_sign_mode_commands(tmp_path: Path) -> None:
    import json
    import subprocess

    from lmt.agent.security import generate_keypair
    from tests.conftest import lmt_argv

    key, _pub = generate_keypair(tmp_path / "keys")
    cases = [
        (["modes", "--params", '{"floor_kw": 5}'], {"type": "modes", "params": {"floor_kw": 5}}),
        (["remote", "trip", "--round", "2", "--alarm-delay", "1", "--limit", "4"],
         {"type": "remote", "round": 2, "action": "trip", "alarm_delay_min": 1, "limit_half_hours": 4}),
        (["guarantee", "on", "--half-hours", "4"],
         {"type": "guarantee", "on": True, "duration_half_hours": 4}),
    ]
    for args, want in cases:
        out = subprocess.run(lmt_argv("platform", "sign", "--terminal", "t1", "--key", str(key), *args),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        body = json.loads(json.loads(out.stdout)["body"])
        assert want.items() <= body.items()
        assert "auto_after_h" not in body
