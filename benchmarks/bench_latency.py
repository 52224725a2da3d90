"""Command latency: from a signed cap published on MQTT to the coil writes the site receives.

Run: .venv/bin/python benchmarks/bench_latency.py [--commands N] [--interval S]
Prints one JSON object per line: {"name", "value", "unit", "baseline", "ratio"}.

The set-up, all on loopback:

* a private mosquitto (``lmt.agent.broker.Broker``);
* the simulated site in this process (``SimulatedSite`` on its own event loop in a thread): a
  main meter (``eastron-sdm630``) and 4 relay modules of 32 coils, 25 loads on each, 100 loads
  in all, all on, on one Modbus TCP server;
* the agent as a separate process (``lmt run``, the real CLI entry point), so the MQTT hop and
  the process boundary are in the measurement; its poll cycle is ``--interval`` (default 1 s,
  the shipped default), every load configured with its own priority.

The library has no 32-coil relay profile (its contract test fixes the number of profiles), so
this script writes one (``generic-relay-8``'s layout carried on to 32 coils) into a temporary
copy of the profile library, and points both the site (in this process) and the agent process
at that copy (``lmt.config.profiles.PROFILE_DIR``) before anything loads a profile.

For each of ``--commands`` commands (after two warm-up ones): this process publishes a signed
``cap`` whose cap (1 kW) is below the site's non-sheddable base load, so every one of the 100
loads must go; t0 is ``time.monotonic()`` just before ``publish``. The site records the
``time.monotonic()`` of each coil write it executes (a coil-change listener, called in the
request path as the write is applied; same process, same clock as t0). Measured: t0 to the
first coil write and to the last (100th). Then a signed ``cancel`` and, before the next
command, every load back on (restore latency measured the same way). A random wait of 0 to
one cycle before each command spreads its arrival over the agent's cycle.

Baseline, side by side in the same run (before each command, on the same site, while the agent
is running): a bare pymodbus client writing the same 100 coils off, one write (function 05)
after the other with no read-back; t0 just before its first request, the same timestamps.

Percentiles are nearest-rank; with fewer than 100 commands p99 is the largest sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import tomli_w
from common import emit
from paho.mqtt.enums import CallbackAPIVersion
from pymodbus.client import ModbusTcpClient

import lmt.config.profiles as profiles_mod
from lmt.agent.broker import Broker
from lmt.agent.platform import command_body
from lmt.agent.security import generate_keypair, load_private_key, sign_body
from lmt.config.site import SiteConfig
from lmt.firmware_sim import SimulatedSite
from lmt.firmware_sim.server import CoilChange

TERMINAL = "bench-latency"
PREFIX = "lmt/v1"
DEVICES = 4
LOADS_PER_DEVICE = 25
COILS = 32
RELAY_PROFILE = f"generic-relay-{COILS}"
N_LOADS = DEVICES * LOADS_PER_DEVICE
CAP_KW = 1.0  # below the base load (about 50 kW): every load must go

#: The agent, run as ``lmt run`` with the profile library pointed at the temporary copy.
LAUNCH = ("import sys; from pathlib import Path; import lmt.config.profiles as p; "
          "p.PROFILE_DIR = Path(sys.argv[1]); from lmt.agent.cli import main; "
          "sys.exit(main(sys.argv[2:]))")


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def profile_library(work: Path) -> Path:
    """A copy of the shipped profile library plus a 32-coil relay module."""
    lib = work / "profiles"
    lib.mkdir()
    for f in sorted(profiles_mod.PROFILE_DIR.glob("*.toml")):
        (lib / f.name).write_text(f.read_text())
    head = (f'id = "{RELAY_PROFILE}"\nvendor = "Generic"\nmodel = "{COILS}-channel Modbus relay '
            'module"\nkind = "relay"\nsource = "generic-relay-8 layout carried on to '
            f'{COILS} coils"\nmax_gap = 0\n\n[defaults]\ntable = "coil"\ntype = "bool"\n'
            'writable = true\n')
    points = "".join(f'\n[[points]]\nname = "relay_{i + 1}"\naddress = {i}\n'
                     for i in range(COILS))
    (lib / f"{RELAY_PROFILE}.toml").write_text(head + points)
    return lib


def loads() -> list[tuple[str, str, str, float, int]]:
    """(name, device, point, kW, priority) of the 100 loads."""
    rng = random.Random(5)
    return [(f"load-{d * LOADS_PER_DEVICE + j + 1:03d}", f"relays-{d + 1}", f"relay_{j + 1}",
             rng.randint(10, 50) / 10, rng.randint(1, 100))
            for d in range(DEVICES) for j in range(LOADS_PER_DEVICE)]


def site_config() -> SiteConfig:
    return SiteConfig.model_validate({
        "site": {"name": "bench-latency", "seed": 11, "base_load_kw": 50.0},
        "server": {"host": "127.0.0.1", "port": 0},
        "devices": [{"name": "main-meter", "profile": "eastron-sdm630", "device_id": 1}]
        + [{"name": f"relays-{d + 1}", "profile": RELAY_PROFILE, "device_id": d + 2}
           for d in range(DEVICES)],
        "loads": [{"name": n, "relay": f"{dev}.{pt}", "kw": kw, "on": True}
                  for n, dev, pt, kw, _ in loads()]})


def agent_config(work: Path, site_port: int, broker_port: int, interval_s: float) -> Path:
    _, pub = generate_keypair(work / "keys")
    cfg = {"terminal": {"id": TERMINAL},
           "mqtt": {"port": broker_port, "topic_prefix": PREFIX},
           "security": {"platform_public_key": str(pub)},
           "buffer": {"path": str(work / "buffer.sqlite"), "flush_interval_s": 0.2},
           "poll": {"interval_s": interval_s},
           "devices": [{"name": "main-meter", "profile": "eastron-sdm630", "host": "127.0.0.1",
                        "port": site_port, "device_id": 1}]
           + [{"name": f"relays-{d + 1}", "profile": RELAY_PROFILE, "host": "127.0.0.1",
               "port": site_port, "device_id": d + 2} for d in range(DEVICES)],
           # no minimum on time: the next command may shed a load restored a moment ago
           "control": {"main_meter": "main-meter", "min_on_s": 0.0, "min_off_s": 0.0},
           "loads": [{"name": n, "device": dev, "point": pt, "rated_kw": kw, "priority": p}
                     for n, dev, pt, kw, p in loads()]}
    path = work / "agent.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


class SiteThread:
    """The simulated site on its own event loop; every coil change timestamped (monotonic)."""

    def __init__(self, config: SiteConfig) -> None:
        self.site = SimulatedSite(config, host="127.0.0.1", port=0)
        self.changes: list[tuple[float, str, str, bool]] = []  # (monotonic, device, point, on)
        self.site.add_listener(self._changed)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _changed(self, c: CoilChange) -> None:
        self.changes.append((time.monotonic(), c.device, c.point, c.value))

    def start(self) -> int:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self.site.start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.site.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def all_on(self) -> bool:
        return all(self.site.loads_on().values())

    def wait_changes(self, start: int, n: int, value: bool, timeout: float) -> list[float]:
        """Times of the first ``n`` changes to ``value`` at or after index ``start``."""
        deadline = time.monotonic() + timeout
        while True:
            got = [t for t, _, _, v in self.changes[start:] if v is value]
            if len(got) >= n:
                return got[:n]
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(got)} of {n} coil writes ({value}) within {timeout} s")
            time.sleep(0.002)


class Platform:
    """The utility's side: signs and publishes commands, collects the terminal's results."""

    def __init__(self, port: int, key: Path, terminal: str = TERMINAL) -> None:
        self.terminal = terminal
        self.key = load_private_key(key)
        self.results: queue.Queue[dict[str, Any]] = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-platform")
        self.c.on_message = self._message
        connected = threading.Event()
        self.c.on_connect = lambda *a: connected.set()  # type: ignore[assignment]
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        if not connected.wait(10):
            raise SystemExit("the platform client cannot reach the broker")
        self.c.subscribe(f"{PREFIX}/{terminal}/result", qos=1)
        time.sleep(0.2)

    def _message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for rec in json.loads(msg.payload).get("records", []):
            self.results.put(rec)

    def sign(self, kind: str, **params: Any) -> tuple[str, str]:
        body = command_body(kind, self.terminal, expires_in_s=60.0, **params)
        return body["id"], sign_body(self.key, body)

    def publish(self, payload: str) -> float:
        t0 = time.monotonic()
        self.c.publish(f"{PREFIX}/{self.terminal}/cmd", payload, qos=1)
        return t0

    def wait_result(self, command_id: str, statuses: set[str], timeout: float = 30.0
                    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                rec = self.results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"no {statuses} result for {command_id}") from None
            if rec.get("command_id") == command_id and rec.get("status") in statuses:
                return rec
            if rec.get("status") == "rejected":
                raise SystemExit(f"command refused: {rec}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the agent answers a command (a cancel of nothing, refused)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, payload = self.sign("cancel", target="0" * 32)
            self.publish(payload)
            try:
                if self.results.get(timeout=2).get("status") == "rejected":
                    time.sleep(1.0)  # late answers to earlier tries
                    while not self.results.empty():
                        self.results.get()
                    return
            except queue.Empty:
                continue
        raise SystemExit("the agent did not answer within a minute")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def bare_write_all(client: ModbusTcpClient, site: SiteThread, value: bool) -> tuple[float, float]:
    """A bare pymodbus loop writing the 100 load coils: (t0 -> first, t0 -> last write), s."""
    start = len(site.changes)
    t0 = time.monotonic()
    for _, dev, pt, _, _ in loads():
        rr = client.write_coil(int(pt.split("_")[1]) - 1, value, device_id=int(dev.split("-")[1]) + 1)
        assert not rr.isError(), rr
    times = site.wait_changes(start, N_LOADS, value, 10)
    return times[0] - t0, times[-1] - t0


def run_command(platform: Platform, site: SiteThread) -> dict[str, float]:
    """One cap that sheds everything, then its cancel: latencies (s) and the first cycle's count."""
    cid, payload = platform.sign("cap", cap_kw=CAP_KW, duration_s=300.0)
    start = len(site.changes)
    t0 = platform.publish(payload)
    off = site.wait_changes(start, N_LOADS, False, 30)
    executed = platform.wait_result(cid, {"executed"})
    start = len(site.changes)
    _, cancel = platform.sign("cancel", target=cid)
    t1 = platform.publish(cancel)
    on = site.wait_changes(start, N_LOADS, True, 30)
    platform.wait_result(cid, {"cancelled"})
    return {"first": off[0] - t0, "last": off[-1] - t0, "spread": off[-1] - off[0],
            "first_cycle": float(len(executed["data"].get("shed", []))),
            "restore_first": on[0] - t1, "restore_last": on[-1] - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", type=int, default=50, help="measured commands (>= 50 for p99)")
    ap.add_argument("--interval", type=float, default=1.0, help="the agent's poll cycle, s")
    ap.add_argument("--agent-log", type=Path, help="keep the agent's log in this file")
    args = ap.parse_args()
    rng = random.Random(1)

    with tempfile.TemporaryDirectory() as tmp, Broker() as broker:
        work = Path(tmp)
        profiles_mod.PROFILE_DIR = lib = profile_library(work)  # before any profile is loaded
        site = SiteThread(site_config())
        site_port = site.start()
        cfg = agent_config(work, site_port, broker.port, args.interval)
        log = open(work / "agent.log", "wb")
        agent = subprocess.Popen([sys.executable, "-c", LAUNCH, str(lib), "run", "--config",
                                  str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        platform = Platform(broker.port, work / "keys" / "platform.key")
        client = ModbusTcpClient("127.0.0.1", port=site_port, timeout=2)
        client.connect()
        runs: list[dict[str, float]] = []
        bare: list[tuple[float, float]] = []
        try:
            platform.wait_ready()
            time.sleep(2 * args.interval)  # a couple of polls: the agent knows the coils
            for i in range(args.commands + 2):
                b = bare_write_all(client, site, False)
                bare_write_all(client, site, True)
                time.sleep(rng.uniform(0, args.interval))
                r = run_command(platform, site)
                if i >= 2:  # two warm-up commands
                    runs.append(r)
                    bare.append(b)
        finally:
            client.close()
            platform.close()
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
            log.close()
            site.stop()
            if args.agent_log is not None:
                args.agent_log.write_text((work / "agent.log").read_text())
            if agent.returncode != 0 or len(runs) < args.commands:
                print((work / "agent.log").read_text()[-3000:], file=sys.stderr)

    def col(key: str) -> list[float]:
        return [r[key] for r in runs]

    bare_first, bare_last = [b[0] for b in bare], [b[1] for b in bare]
    for q in (50, 99):
        emit(f"cmd_to_first_coil_write_p{q}", pct(col("first"), q) * 1000, "ms",
             pct(bare_first, q) * 1000)
    for q in (50, 99):
        emit(f"cmd_to_last_coil_write_{N_LOADS}_loads_{DEVICES}_devices_p{q}",
             pct(col("last"), q) * 1000, "ms", pct(bare_last, q) * 1000)
    emit("first_to_last_coil_write_spread_median", statistics.median(col("spread")) * 1000, "ms",
         statistics.median(b - a for a, b in bare) * 1000)
    emit("loads_shed_in_the_first_control_cycle_min", min(col("first_cycle")), "loads",
         float(N_LOADS))
    for q in (50, 99):
        emit(f"cancel_to_last_restore_write_p{q}", pct(col("restore_last"), q) * 1000, "ms",
             pct(bare_last, q) * 1000)


if __name__ == "__main__":
    main()
