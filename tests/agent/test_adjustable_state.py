"""How the agent keeps an adjustable load's state: unknown until read, held until it reads back
where it was, rewrites that do not count as switches; against the simulated Alfen charger over
Modbus TCP and a real buffer file."""

from __future__ import annotations

import asyncio
import math
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from lmt.agent.broker import free_port
from lmt.agent.daemon import Agent
from lmt.config import load_agent_config
from lmt.control import CapParams, decide_cap
from tests.agent.harness import write_agent_config
from tests.conftest import serve_site

EV = "ev-fleet"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with serve_site(tmp_path, [{"name": "charger", "profile": "alfen-ng9xx",
                                "device_id": 3}]) as port:
        path, _key = write_agent_config(tmp_path, port, free_port())
        cfg = tomllib.loads(path.read_text())
        cfg["devices"].append({"name": "charger", "profile": "alfen-ng9xx", "host": "127.0.0.1",
                               "port": port, "device_id": 3})
        cfg["loads"] = [{"name": EV, "device": "charger", "point": "ev_setpoint_a",
                         "class": "adjustable", "full_scale": 32.0, "rated_kw": 22.0,
                         "priority": 1, "min_off_s": 30.0, "rewrite_s": 1.0}]
        path.write_text(tomli_w.dumps(cfg))
        a = Agent(load_agent_config(path))
        try:
            yield a
        finally:
            a.buffer.close()


def _read(agent: Agent, amps: float) -> None:
    agent.latest["charger"] = (agent.mono(), {"ev_setpoint_a": amps})
    agent._sync_load_states({"charger"})


def test_unknown_until_read_then_held_until_back_where_it_was(agent: Agent) -> None:
    st = agent.load_states[0]
    assert math.isnan(st.setpoint_pct)
    # not read yet: a cap far below the site touches nothing (it could be idle at 0 A)
    params = CapParams(cap_kw=10.0, margin_kw=0.0)
    assert decide_cap(200.0, 0.0, agent.load_specs, agent.load_states, params).steps() == []
    _read(agent, 32.0)
    assert st.setpoint_pct == pytest.approx(100.0)
    assert decide_cap(200.0, 0.0, agent.load_specs, agent.load_states, params).setpoints
    # held at 99.7 % (a small step down): it stays held; only reading 100 % again ends it
    st.shed_by_us, st.restore_pct = True, 100.0
    _read(agent, 31.9)
    assert st.shed_by_us and st.setpoint_pct == pytest.approx(99.6875)
    _read(agent, 32.0)
    assert not st.shed_by_us


def test_a_rewrite_is_not_a_switch(agent: Agent) -> None:
    async def body() -> None:
        st = agent.load_states[0]
        _read(agent, 32.0)
        assert await agent._set(0, 50.0, 120.0, "cap", "c1")
        assert st.shed_by_us and st.restore_pct == pytest.approx(100.0)
        switched = st.last_switch_s
        assert await agent._set(0, 50.0, None, "rewrite", "c1", quiet=True)
        assert st.last_switch_s == switched  # min_off_s (30 s) still counts from the lowering
        await agent._rewrite_setpoints("c1")  # within rewrite_s: nothing to do
        assert agent._last_write[0] >= switched
        got = await agent.devices["charger"].read_points(["ev_setpoint_a"])
        assert got["ev_setpoint_a"] == pytest.approx(16.0)
        for t in agent.transports:
            t.close()
    asyncio.run(body())


def test_a_load_held_before_a_restart_keeps_its_off_time(tmp_path: Path) -> None:
    with serve_site(tmp_path) as port:
        path, _key = write_agent_config(tmp_path, port, free_port())
        first = Agent(load_agent_config(path))
        first.buffer.set_shed("water-heater", "c1", first.clock() - 600.0)  # shed 10 min ago
        first.buffer.close()
        again = Agent(load_agent_config(path))
        try:
            i = [ld.name for ld in again.cfg.loads].index("water-heater")
            st = again.load_states[i]
            assert st.shed_by_us
            assert again.mono() - st.last_switch_s == pytest.approx(600.0, abs=5.0)
        finally:
            again.buffer.close()
