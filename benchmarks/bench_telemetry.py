"""Telemetry latency: from a reading to the broker, at 1 meter and at 200.

Run: .venv/bin/python benchmarks/bench_telemetry.py [--seconds S]
Prints one JSON object per line: {"name", "value", "unit", "baseline", "ratio"}.

The set-up, all on loopback: a private mosquitto; the agent as a separate process (``lmt run``,
poll cycle 1 s); a subscriber on its telemetry topic that stamps each message's arrival
(``time.time()``, the same clock the agent stamps a reading's ``ts`` with when it starts the
read). The latency of a reading is arrival − ``ts``: the read itself, the buffer's commit and
the publish.

Two sites, measured one after the other in the same run:

* **1 meter**: the main meter (``eastron-sdm630``) alone, on its own simulated Modbus TCP
  server;
* **200 meters**: the same main meter on its own server, and 199 sub-meters (the same profile)
  behind one simulated gateway (one Modbus TCP server, device ids 1–199): two transports, the
  gateway's taking about as long as 199 reads one after the other.

A transport's readings go to the buffer and the broker as soon as that transport is done, so
the main meter's latency at 200 meters should be that at 1 meter (the baseline; ratio ≈ 1),
not the time of the slowest transport. Also printed: the latency of all 200 meters' readings
(they wait for their gateway's transport to finish).
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import tomli_w
from common import emit
from paho.mqtt.enums import CallbackAPIVersion

from lmt.agent.broker import Broker, free_port, wait_for_port
from lmt.agent.security import generate_keypair

PROFILE = "eastron-sdm630"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


def serve(work: Path, name: str, n: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    site = {"site": {"name": name, "seed": 3}, "server": {"host": "127.0.0.1", "port": port},
            "devices": [{"name": f"{name}-{i}", "profile": PROFILE, "device_id": i}
                        for i in range(1, n + 1)]}
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(site))
    p = subprocess.Popen([sys.executable, "-m", "lmt.agent.cli", "sim", str(path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port, 30, p)
    return p, port


def measure(work: Path, broker: Broker, sub_meters: int, seconds: float
            ) -> tuple[list[float], list[float]]:
    """(main-meter latencies, all latencies) in seconds."""
    work.mkdir()
    sims = []
    try:
        main, main_port = serve(work, "main", 1)
        sims.append(main)
        devices = [{"name": "main", "profile": PROFILE, "host": "127.0.0.1", "port": main_port,
                    "device_id": 1}]
        if sub_meters:
            gw, gw_port = serve(work, "gw", sub_meters)
            sims.append(gw)
            devices += [{"name": f"sub-{i}", "profile": PROFILE, "host": "127.0.0.1",
                         "port": gw_port, "device_id": i} for i in range(1, sub_meters + 1)]
        _, pub = generate_keypair(work / "keys")
        cfg = {"terminal": {"id": "bench"}, "mqtt": {"port": broker.port},
               "security": {"platform_public_key": str(pub)},
               "buffer": {"path": str(work / "buffer.sqlite")},
               "poll": {"interval_s": 1.0, "timeout_s": 2.0, "max_timeout_s": 5.0},
               "devices": devices, "control": {"main_meter": "main"}}
        (work / "agent.toml").write_text(tomli_w.dumps(cfg))
        got: queue.Queue[tuple[float, bytes]] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{work.name}",
                        protocol=mqtt.MQTTv311)
        c.on_message = lambda cl, u, m: got.put((time.time(), bytes(m.payload)))
        c.connect("127.0.0.1", broker.port)
        c.subscribe("lmt/v1/bench/telemetry", qos=1)
        c.loop_start()
        agent = subprocess.Popen([sys.executable, "-m", "lmt.agent.cli", "run", "--config",
                                  str(work / "agent.toml")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        main_lat: list[float] = []
        all_lat: list[float] = []
        try:
            t_end = time.time() + seconds + 5.0  # 5 s to start and settle, not counted
            while time.time() < t_end:
                try:
                    at, payload = got.get(timeout=0.5)
                except queue.Empty:
                    continue
                batch = json.loads(payload)
                if batch["historical"]:
                    continue
                for r in batch["records"]:
                    if r["ts"] < t_end - seconds:
                        continue
                    all_lat.append(at - r["ts"])
                    if r["device"] == "main":
                        main_lat.append(at - r["ts"])
        finally:
            agent.terminate()
            agent.wait(15)
            c.loop_stop()
            c.disconnect()
        return main_lat, all_lat
    finally:
        for p in sims:
            p.terminate()
            p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Broker() as broker:
        one_main, _ = measure(Path(tmp) / "one", broker, 0, args.seconds)
        many_main, many_all = measure(Path(tmp) / "many", broker, 199, args.seconds)
    ms = 1000.0
    emit("reading_to_broker_main_meter_p50_at_200_meters", pct(many_main, 0.5) * ms, "ms",
         pct(one_main, 0.5) * ms)
    emit("reading_to_broker_main_meter_p99_at_200_meters", pct(many_main, 0.99) * ms, "ms",
         pct(one_main, 0.99) * ms)
    emit("reading_to_broker_all_meters_p50_at_200_meters", pct(many_all, 0.5) * ms, "ms",
         pct(one_main, 0.5) * ms)
    emit("readings_per_second_at_200_meters", len(many_all) / args.seconds, "readings/s",
         200.0)


if __name__ == "__main__":
    main()
