"""What a demand-response event delivered, reported with its end: the baseline, the metered
energy over the active window and the delivered reduction (baseline energy − metered energy) /
duration, on the simulated demo site over real MQTT and Modbus TCP."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.config import load_agent_config
from tests.agent.harness import AgentThread
from tests.agent.test_dr_flow import DrRig
from tests.conftest import wait_until


def test_completed_event_reports_what_it_delivered(tmp_path: Path, site: int,
                                                   broker: Broker) -> None:
    rig = DrRig(tmp_path, site, broker)
    runner = AgentThread(Agent(load_agent_config(rig.cfg_path))).start()
    try:
        wait_until(lambda: runner.agent.site_kw() is not None, 30, "a meter reading")
        wait_until(lambda: sum(b[2] for b in runner.agent.state.history.buckets) >= 3, 10,
                   "a few readings of baseline")
        p0 = rig.power_kw()
        eid, start, _answers = rig.dr_event(round(p0 - 50), start_in_s=1, duration_s=5)
        done = wait_until(lambda: rig.record(eid, "completed"), 20, "completed")
        assert isinstance(done, dict)
        got = done["data"]["delivery"]
        assert got["method"] == "power samples" and got["coverage"] >= 0.9, got
        assert got["start"] == pytest.approx(rig.record(eid, "active")["data"]["at"])
        assert got["end"] == pytest.approx(start + 5) and got["duration_s"] == pytest.approx(
            got["end"] - got["start"], abs=0.1)
        base = got["baseline_kw"]
        assert base == pytest.approx(p0, abs=5.0)  # the demo's load before the event
        assert got["baseline_kwh"] == pytest.approx(base * got["duration_s"] / 3600, rel=1e-3)
        assert got["mean_kw"] == pytest.approx(got["metered_kwh"] * 3600 / got["duration_s"],
                                               rel=1e-3)
        # the cap is 50 kW below the site: the loads shed within a cycle or two, so most of the
        # 50 kW (and, with the loads' sizes, up to about 60) is delivered on average
        assert 30.0 < got["delivered_reduction_kw"] < 65.0, got
        assert got["delivered_reduction_kw"] == pytest.approx(base - got["mean_kw"], abs=0.01)
        assert not runner.agent.state.delivery.events  # nothing left counting
    finally:
        runner.stop()
        rig.close()
