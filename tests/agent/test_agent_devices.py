"""The agent reading devices that are slow or partly broken, over real MQTT, TCP and
pseudo-terminals: a DL/T 645 meter at 2400 bit/s comes online with the default timeouts (they
are per request), a block or a data identifier that fails leaves the rest of the device read
and is reported once, and an unexpected error while switching a load does not stop the cycle."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.platform import _Client, command_body, send, sign_command_file
from lmt.agent.security import generate_keypair
from lmt.config import load_agent_config, load_profile
from lmt.config.site import SiteConfig
from tests.agent.harness import AgentThread, write_agent_config
from tests.conftest import SiteThread, wait_until

METER_ADDRESS = "110000000001"
DLT645 = load_profile("dlt645-2007-3phase")


class Streams:
    """What a terminal publishes: events, telemetry and results, as they arrive."""

    def __init__(self, broker: Broker, terminal: str) -> None:
        self.sub = _Client("127.0.0.1", broker.port)
        self.sub.connect([f"lmt/v1/{terminal}/{s}" for s in ("events", "telemetry", "result")])
        self.events: list[dict[str, Any]] = []
        self.readings: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def pump(self) -> None:
        while not self.sub.messages.empty():
            batch = json.loads(self.sub.messages.get().payload)
            {"events": self.events, "telemetry": self.readings,
             "results": self.results}[batch["stream"]].extend(batch["records"])

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        self.pump()
        return [e for e in self.events if e["type"] == type_]

    def of_device(self, device: str) -> list[dict[str, Any]]:
        self.pump()
        return [r for r in self.readings if r["device"] == device]

    def close(self) -> None:
        self.sub.close()


def agent_file(tmp_path: Path, broker: Broker, **sections: Any) -> Path:
    _, pub = generate_keypair(tmp_path / "keys")
    cfg = {"terminal": {"id": "t-dev"}, "mqtt": {"port": broker.port},
           "security": {"platform_public_key": str(pub)},
           "buffer": {"path": str(tmp_path / "b.sqlite"), "flush_interval_s": 0.2}, **sections}
    (tmp_path / "agent.toml").write_text(tomli_w.dumps(cfg))
    return tmp_path / "agent.toml"


def dlt645_site(baud: int) -> SiteConfig:
    return SiteConfig.model_validate({
        "site": {"seed": 5},
        "lines": [{"name": "meters", "protocol": "dlt645", "baud": baud}],
        "devices": [{"name": "utility", "profile": "dlt645-2007-3phase", "line": "meters",
                     "address": METER_ADDRESS}]})


def dlt645_agent(tmp_path: Path, broker: Broker, port: str, baud: int, **poll: Any) -> Path:
    return agent_file(
        tmp_path, broker, poll=poll,
        lines=[{"name": "meters", "port": port, "protocol": "dlt645", "baud": baud}],
        devices=[{"name": "utility", "profile": "dlt645-2007-3phase", "line": "meters",
                  "address": METER_ADDRESS}],
        control={"main_meter": "utility", "power_point": "power_kw"})


def test_dlt645_meter_at_2400_baud_comes_online_with_the_default_timeouts(
        tmp_path: Path, broker: Broker) -> None:
    """16 data identifiers, one request each, ~0.15 s apiece on a 2400 bit/s line: a read
    takes ~2.5 s, more than the 1 s default timeout — which is per request, not per read."""
    with SiteThread(dlt645_site(2400)) as st:
        cfg = load_agent_config(dlt645_agent(tmp_path, broker, st.paths["meters"], 2400))
        assert cfg.poll.timeout_s == 1.0 and cfg.poll.interval_s == 1.0  # the defaults
        streams = Streams(broker, "t-dev")
        runner = AgentThread(Agent(cfg)).start()
        try:
            wait_until(lambda: len(streams.of_device("utility")) >= 2, 40,
                       "two readings of the DL/T 645 meter")
            first = streams.of_device("utility")[0]["values"]
            assert set(first) == {p.name for p in DLT645.points}  # every point, all due
            assert all(v is not None for v in first.values())
            assert first["voltage_l1_v"] == pytest.approx(230, rel=0.1)
            assert runner.agent.site_kw() == pytest.approx(first["power_kw"], rel=0.5)
            assert not streams.of_type("device_offline")
            # the latency is learned per request: the next read's deadline fits ~13 requests
            h = runner.agent.health["utility"]
            assert h.latency_s is not None and h.latency_s < 0.2
            assert h.timeout_s < 1.0
        finally:
            runner.stop()
            streams.close()


def test_a_bad_data_identifier_is_reported_once_and_the_meter_stays_online(
        tmp_path: Path, broker: Broker) -> None:
    di = DLT645.point("voltage_l1_v").di
    assert di is not None
    # 115200 bit/s: the baud rate is not the point here, and a read of the meter's 16 data
    # identifiers takes half the time it takes at 9600
    with SiteThread(dlt645_site(115200)) as st:
        line = st.site.dlt645_lines["meters"]
        path = dlt645_agent(tmp_path, broker, st.paths["meters"], 115200, interval_s=0.3,
                            offline_after_s=1.0)
        streams = Streams(broker, "t-dev")
        runner = AgentThread(Agent(load_agent_config(path))).start()
        try:
            wait_until(lambda: streams.of_device("utility"), 20, "a reading")
            st.call(lambda: line.set_raw(METER_ADDRESS, di, b"\xab\xcd"))  # not BCD
            failed = wait_until(lambda: streams.of_type("points_failed"), 10, "points_failed")
            assert failed[0]["data"]["device"] == "utility"  # type: ignore[index]
            assert failed[0]["data"]["points"] == ["voltage_l1_v"]  # type: ignore[index]
            assert f"DI {di}" in failed[0]["data"]["error"]  # type: ignore[index]
            # the rest of the meter is read every cycle; the bad point is left out, once only
            n = len(streams.of_device("utility"))
            wait_until(lambda: len(streams.of_device("utility")) >= n + 5, 10, "more readings")
            later = streams.of_device("utility")[n:]
            assert all("voltage_l1_v" not in r["values"] and "power_kw" in r["values"]
                       for r in later)
            assert len(streams.of_type("points_failed")) == 1
            assert not streams.of_type("device_offline")
            st.call(lambda: line.set_raw(METER_ADDRESS, di, bytes.fromhex("4323")))  # 234.3 V
            back = wait_until(lambda: streams.of_type("points_recovered"), 10, "points_recovered")
            assert back[0]["data"] == {"device": "utility", "points": ["voltage_l1_v"]}  # type: ignore[index]
            wait_until(lambda: any(r["values"].get("voltage_l1_v") == pytest.approx(234.3)
                                   for r in streams.of_device("utility")), 10, "the point again")
        finally:
            runner.stop()
            streams.close()


ADL400 = load_profile("acrel-adl400")
PF_BLOCK = ["frequency_hz", "power_factor", "power_factor_l1", "power_factor_l2",
            "power_factor_l3"]


def test_a_failing_block_is_reported_once_and_the_device_stays_online(
        tmp_path: Path, broker: Broker) -> None:
    """The sub-meter's firmware lacks one register group of its profile: that block answers
    exception 2 (illegal data address) over real TCP; the other blocks are read."""
    site = SiteConfig.model_validate({"site": {"seed": 6}, "devices": [
        {"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
        {"name": "sub", "profile": "acrel-adl400", "device_id": 3}]})
    served = ADL400.model_copy(update={"points": tuple(p for p in ADL400.points
                                                        if p.name not in PF_BLOCK)})
    with SiteThread(site, profiles={"acrel-adl400": served}) as st:
        path = agent_file(
            tmp_path, broker,
            poll={"interval_s": 0.2, "offline_after_s": 0.5},
            devices=[{"name": "main-meter", "profile": "eastron-sdm630", "host": "127.0.0.1",
                      "port": st.port, "device_id": 1},
                     {"name": "sub", "profile": "acrel-adl400", "host": "127.0.0.1",
                      "port": st.port, "device_id": 3}],
            control={"main_meter": "main-meter"})
        streams = Streams(broker, "t-dev")
        runner = AgentThread(Agent(load_agent_config(path))).start()
        try:
            wait_until(lambda: len(streams.of_device("sub")) >= 10, 20, "ten sub readings")
            rows = streams.of_device("sub")
            assert all(set(r["values"]).isdisjoint(PF_BLOCK) and "power_w" in r["values"]
                       and "voltage_l1_v" in r["values"] for r in rows)
            assert "import_energy_kwh" in rows[0]["values"]  # the slow block too
            [failed] = streams.of_type("points_failed")  # once, not every cycle
            assert failed["data"]["device"] == "sub" and failed["data"]["points"] == PF_BLOCK
            assert "exception 2 (illegal data address)" in failed["data"]["error"]
            assert not streams.of_type("device_offline")
            assert runner.agent.health["sub"].online
            assert "frequency_hz" not in runner.agent.latest["sub"][1]
            assert len(streams.of_device("main-meter")) >= 10
        finally:
            runner.stop()
            streams.close()


def test_an_unexpected_error_while_switching_does_not_stop_the_cycle(
        tmp_path: Path, site: int, broker: Broker) -> None:
    # cycles of 0.3 s (the demo's are 1 s): "still polling" below is a few cycles
    cfg_path, key = write_agent_config(tmp_path, site, broker.port, poll={"interval_s": 0.3})
    agent = Agent(load_agent_config(cfg_path))
    relays = agent.devices["relays"]
    write_coils = relays.write_coils

    async def buggy(values: dict[str, bool], verify: bool = True) -> dict:
        if "relay_4" in values:  # ev-chargers, priority 10: shed first
            raise RuntimeError("driver bug")
        return await write_coils(values, verify)
    relays.write_coils = buggy
    streams = Streams(broker, "demo-0001")
    runner = AgentThread(agent).start()
    try:
        wait_until(lambda: agent.site_kw() is not None, 30, "a meter reading")
        p0 = agent.site_kw()
        assert p0 is not None
        body = command_body("cap", "demo-0001", cap_kw=round(p0 - 25), duration_s=600)
        cid = body["id"]
        answers = send("127.0.0.1", broker.port, "lmt/v1", "demo-0001",
                       sign_command_file(key, body), timeout_s=20)
        assert answers[-1]["status"] == "accepted"
        failed = wait_until(lambda: streams.of_type("switch_failed"), 15, "switch_failed")
        assert failed[0]["data"]["load"] == "ev-chargers"  # type: ignore[index]
        assert "RuntimeError: driver bug" in failed[0]["data"]["error"]  # type: ignore[index]
        # the cycle carried on: other loads shed instead, the command executed
        wait_until(lambda: [e for e in streams.of_type("load_shed")], 15, "another load shed")
        wait_until(lambda: any(r["command_id"] == cid and r["status"] == "executed"
                               for r in (streams.pump() or streams.results)), 15, "executed")
        assert "ev-chargers" not in [e["data"]["load"] for e in streams.of_type("load_shed")]
        assert runner.thread.is_alive() and runner.error is None
        n = len(streams.of_device("main-meter"))
        wait_until(lambda: len(streams.of_device("main-meter")) > n + 3, 10, "still polling")
    finally:
        runner.stop()
        streams.close()


def test_a_lines_own_timeout_is_the_per_request_timeout(tmp_path: Path, broker: Broker) -> None:
    """Nothing is opened here: the agent's deadline for a read of every point of each device."""
    path = agent_file(
        tmp_path, broker, poll={"timeout_s": 0.5, "max_timeout_s": 4.0},
        lines=[{"name": "slow", "port": str(tmp_path / "tty-slow"), "protocol": "dlt645",
                "timeout_s": 6.0},
               {"name": "fast", "port": str(tmp_path / "tty-fast"), "protocol": "modbus-rtu",
                "baud": 19200}],
        devices=[{"name": "utility", "profile": "dlt645-2007-3phase", "line": "slow",
                  "address": METER_ADDRESS},
                 {"name": "sub", "profile": "acrel-adl400", "line": "fast", "device_id": 3}],
        control={"main_meter": "utility", "power_point": "power_kw"})
    agent = Agent(load_agent_config(path))
    try:
        utility, sub = agent.health["utility"], agent.health["sub"]
        # the line's 6 s, above poll.max_timeout_s: the ceiling follows it
        assert utility.timeout_s == 6.0 and utility.policy.max_timeout_s == 6.0
        assert sub.timeout_s == 0.5 and sub.policy.max_timeout_s == 4.0
        meter = agent.devices["utility"]
        wire = meter.wire_time_s()
        assert 26 * 0.2 < wire < 26 * 0.25  # 2400 bit/s 8E1, the DL/T 645 default
        assert utility.deadline_s(meter.transactions(), wire) == pytest.approx(26 * 6.0 + wire)
        dev = agent.devices["sub"]
        assert sub.deadline_s(dev.transactions(), dev.wire_time_s()) == pytest.approx(
            4 * 0.5 + dev.wire_time_s())
    finally:
        agent.close()


def test_a_slow_line_does_not_hold_up_the_main_meter(tmp_path: Path, broker: Broker) -> None:
    """A DL/T 645 meter at 2400 bit/s takes seconds to read; the main meter on its own TCP
    connection is still read every cycle."""
    site = SiteConfig.model_validate({
        "site": {"seed": 5},
        "lines": [{"name": "meters", "protocol": "dlt645", "baud": 2400}],
        "devices": [{"name": "main", "profile": "eastron-sdm630", "device_id": 1},
                    {"name": "utility", "profile": "dlt645-2007-3phase", "line": "meters",
                     "address": METER_ADDRESS}]})
    with SiteThread(site) as st:
        path = agent_file(
            tmp_path, broker, poll={"interval_s": 0.5},
            lines=[{"name": "meters", "port": st.paths["meters"], "protocol": "dlt645",
                    "baud": 2400}],
            devices=[{"name": "main", "profile": "eastron-sdm630", "host": "127.0.0.1",
                      "port": st.port, "device_id": 1},
                     {"name": "utility", "profile": "dlt645-2007-3phase", "line": "meters",
                      "address": METER_ADDRESS}],
            control={"main_meter": "main"})
        streams = Streams(broker, "t-dev")
        runner = AgentThread(Agent(load_agent_config(path))).start()
        try:
            wait_until(lambda: len(streams.of_device("utility")) >= 2, 40,
                       "two readings of the slow meter")
            slow = [r["ts"] for r in streams.of_device("utility")]
            assert slow[1] - slow[0] > 1.0, "the 2400-baud meter was not slow: test proves nothing"
            main = [r["ts"] for r in streams.of_device("main") if slow[0] <= r["ts"] <= slow[1]]
            gaps = [b - a for a, b in itertools.pairwise(main)]
            assert len(main) >= 3 and max(gaps) < 1.2, (main, slow)
        finally:
            runner.stop()
            streams.close()


def test_a_device_slower_than_the_timeout_is_found(tmp_path: Path, broker: Broker) -> None:
    """It answers after 0.8 s; the configured timeout is 0.5 s. Each unanswered request makes
    the next timeout longer (1.5 times, up to poll.max_timeout_s: 0.5, 0.75, then 1.125 s), so
    it is read, never declared offline."""
    site = SiteConfig.model_validate({
        "site": {"seed": 5},
        "devices": [{"name": "main", "profile": "eastron-sdm630", "device_id": 1,
                     "faults": {"delay_s": 0.8}}]})
    with SiteThread(site) as st:
        path = agent_file(
            tmp_path, broker, poll={"timeout_s": 0.5, "max_timeout_s": 5.0,
                                    "offline_after_s": 30.0},
            devices=[{"name": "main", "profile": "eastron-sdm630", "host": "127.0.0.1",
                      "port": st.port, "device_id": 1}],
            control={"main_meter": "main"})
        streams = Streams(broker, "t-dev")
        runner = AgentThread(Agent(load_agent_config(path))).start()
        try:
            wait_until(lambda: streams.of_device("main"), 40, "a reading of the slow device")
            h = runner.agent.health["main"]
            assert h.latency_s is not None and h.latency_s > 0.5 and h.timeout_s > 0.8
            assert not streams.of_type("device_offline")
        finally:
            runner.stop()
            streams.close()
