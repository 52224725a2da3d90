"""The agent on a mixed site — Modbus TCP gateway plus an RS-485 Modbus RTU line — with field
faults injected while it runs: a device that vanishes is declared offline after
poll.offline_after_s (an event on MQTT), retried with back-off, and back online when it
returns; the rest of the site is read throughout; energy totals are polled by age."""

from __future__ import annotations

import json
import time
from pathlib import Path

import tomli_w

from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.platform import _Client
from lmt.agent.security import generate_keypair
from lmt.config import load_agent_config
from lmt.config.site import Faults, SiteConfig
from tests.agent.harness import AgentThread
from tests.conftest import SiteThread, wait_until

SITE = SiteConfig.model_validate({
    "site": {"seed": 9},
    "lines": [{"name": "rs485", "protocol": "modbus-rtu", "baud": 19200}],
    "devices": [
        {"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1},
        {"name": "relays", "profile": "generic-relay-8", "device_id": 2},
        {"name": "sub", "profile": "eastron-sdm120", "device_id": 3, "line": "rs485"},
        {"name": "em24", "profile": "carlo-gavazzi-em24", "device_id": 4, "line": "rs485"},
    ],
})


def poll_by_age(rows: list[dict], slow_s: float = 1.0, point: str = "import_energy_l1_kwh",
                margin_s: float = 0.05) -> tuple[int, int]:
    """Check that ``point`` (slow) is in a reading exactly when its last reading is at least
    ``slow_s`` old, by the readings' timestamps (the agent stamps a reading with the time its
    read started and ages points from that same moment). Readings within ``margin_s`` of the
    boundary may go either way. Returns (readings with the point, readings without it)."""
    rows = sorted({r["seq"]: r for r in rows}.values(), key=lambda r: r["seq"])
    last: float | None = None
    with_point = 0
    for r in rows:
        has = point in r["values"]
        if last is None:
            assert has, f"the first reading has every point: {r}"
        else:
            age = r["ts"] - last
            if age < slow_s - margin_s:
                assert not has, f"{point} read again after {age:.3f} s: {r}"
            elif age >= slow_s + margin_s:
                assert has, f"{point} not read although {age:.3f} s old: {r}"
        if has:
            last = r["ts"]
            with_point += 1
    return with_point, len(rows) - with_point


def test_vanishing_device_goes_offline_and_comes_back(tmp_path: Path, broker: Broker) -> None:
    with SiteThread(SITE) as st:
        _, pub = generate_keypair(tmp_path / "keys")
        cfg = {
            "terminal": {"id": "field-1"}, "mqtt": {"port": broker.port},
            "security": {"platform_public_key": str(pub)},
            "buffer": {"path": str(tmp_path / "b.sqlite"), "flush_interval_s": 0.2},
            "poll": {"interval_s": 0.2, "slow_interval_s": 1.0, "timeout_s": 0.3,
                     "offline_after_s": 0.8, "backoff_max_s": 1.0},
            "lines": [{"name": "rs485", "port": st.paths["rs485"], "protocol": "modbus-rtu",
                       "baud": 19200}],
            "devices": [
                {"name": "main-meter", "profile": "eastron-sdm630", "host": "127.0.0.1",
                 "port": st.port, "device_id": 1},
                {"name": "relays", "profile": "generic-relay-8", "host": "127.0.0.1",
                 "port": st.port, "device_id": 2},
                {"name": "sub", "profile": "eastron-sdm120", "line": "rs485", "device_id": 3},
                {"name": "em24", "profile": "carlo-gavazzi-em24", "line": "rs485",
                 "device_id": 4},
            ],
            "control": {"main_meter": "main-meter"},
        }
        (tmp_path / "agent.toml").write_text(tomli_w.dumps(cfg))
        sub = _Client("127.0.0.1", broker.port)
        sub.connect(["lmt/v1/field-1/events", "lmt/v1/field-1/telemetry"])
        events: list[dict] = []
        readings: list[dict] = []

        def pump() -> None:
            while not sub.messages.empty():
                batch = json.loads(sub.messages.get().payload)
                (events if batch["stream"] == "events" else readings).extend(batch["records"])

        def of(device: str) -> list[dict]:
            pump()
            return [r for r in readings if r["device"] == device]

        runner = AgentThread(Agent(load_agent_config(tmp_path / "agent.toml"))).start()
        try:
            wait_until(lambda: len(of("sub")) >= 8 and len(of("em24")) >= 8, 30,
                       "readings from the RTU line")
            # poll by age, judged on the readings' own timestamps (cycles may stretch on a
            # busy machine): power in every reading, energy totals exactly when 1 s old
            def both_seen() -> bool:
                with_energy, without = poll_by_age(of("sub"))
                return with_energy >= 3 and without >= 3
            wait_until(both_seen, 30, "energy totals read again, and readings without them")
            assert all("power_l1_w" in r["values"] for r in of("sub"))

            st.call(lambda: st.site.set_faults("sub", Faults(offline=True)))
            t_fault = time.monotonic()
            wait_until(lambda: [e for e in (pump() or events) if e["type"] == "device_offline"],
                       15, "device_offline")
            offline = next(e for e in events if e["type"] == "device_offline")
            assert offline["data"]["device"] == "sub"
            assert offline["data"]["failing_s"] >= 0.8  # not on the first error
            assert time.monotonic() - t_fault >= 0.8
            # the rest of the site is read all along
            n = len(of("em24")), len(of("main-meter"))
            wait_until(lambda: len(of("em24")) > n[0] + 5 and len(of("main-meter")) > n[1] + 5,
                       10, "the other devices still read")

            st.call(lambda: st.site.set_faults("sub", Faults()))
            wait_until(lambda: [e for e in (pump() or events) if e["type"] == "device_online"],
                       15, "device_online after the back-off")
            assert next(e for e in events if e["type"] == "device_online")["data"] == {
                "device": "sub"}
            n_sub = len(of("sub"))
            wait_until(lambda: len(of("sub")) > n_sub + 3, 10, "sub read again")

            # garbage and exceptions: errors, not crashes; the device stays online if it
            # recovers within offline_after_s
            st.call(lambda: st.site.set_faults("em24", Faults(garbage_rate=0.2)))
            n_em = len(of("em24"))
            wait_until(lambda: len(of("em24")) > n_em + 5, 20, "em24 read despite garbage")
            st.call(lambda: st.site.set_faults("em24", Faults()))
        finally:
            runner.stop()
            sub.close()
