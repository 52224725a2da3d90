"""An adjustable load in the agent, against the simulated Alfen charger over Modbus TCP and a
real buffer file: the actuator writes its setpoint register (verified), and a buffer an older
agent wrote keeps its held loads and their off time. (The rules — unknown until read, held
until it reads back where it was, rewrites that are no switches — are cycle tables of the
supervisor: tests/control/test_supervisor.py.)"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from lmt.agent.broker import free_port
from lmt.agent.daemon import Agent
from lmt.config import load_agent_config
from lmt.control.supervisor import Action
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
            a.close()


def test_the_actuator_writes_the_setpoint_register(agent: Agent) -> None:
    async def body() -> None:
        done = await agent.actuator.carry_out([
            Action("set", 0, "cap", "c1", 120.0, pct=50.0, value=16.0),
            Action("set", 0, "rewrite", "c1", None, pct=50.0, value=16.0, quiet=True)])
        assert [d.error for d in done] == [None, None]
        got = await agent.devices["charger"].read_points(["ev_setpoint_a"])
        assert got["ev_setpoint_a"] == pytest.approx(16.0)
        for t in agent.transports:
            t.close()
    asyncio.run(body())


def test_an_older_agents_held_load_keeps_its_off_time(tmp_path: Path) -> None:
    """A buffer written before the supervisor: its shed_loads table is migrated once."""
    with serve_site(tmp_path) as port:
        path, _key = write_agent_config(tmp_path, port, free_port())
        Agent(load_agent_config(path)).close()  # makes the buffer file
        cfg = load_agent_config(path)
        con = sqlite3.connect(cfg.buffer.path)
        con.execute("CREATE TABLE shed_loads (load TEXT PRIMARY KEY, command_id TEXT, "
                    "since REAL NOT NULL)")
        con.execute("INSERT INTO shed_loads VALUES ('water-heater', 'c1', ?)",
                    [time.time() - 600.0])  # shed 10 min ago
        con.commit()
        con.close()
        again = Agent(load_agent_config(path))
        try:
            ld = again.state.loads["water-heater"]
            assert ld.held and ld.owner == "c1" and not ld.on
            assert ld.switched_t == pytest.approx(-600.0, abs=5.0)  # the clock starts at 0
            # taken over once: saved as the supervisor's state, the old table gone
            assert again.store.load("supervisor") is not None
            assert not again.file.has_table("shed_loads")
        finally:
            again.close()
