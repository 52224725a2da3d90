"""`lmt demo`: the whole path on one machine, explained as it happens.

A simulated site (`lmt sim`), a private mosquitto, the agent (`lmt run`) and the platform
console, each a separate process; one signed cap command; the site's measured power before,
during and after, which relays opened and why.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import tomli_w

from .broker import Broker, free_port, wait_for_port
from .platform import _Client, command_body, send, sign_command_file
from .security import generate_keypair

PREFIX = "lmt/v1"


def example_file(name: str) -> Path:
    return Path(str(files("lmt.config.examples").joinpath(name)))


def lmt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmt.agent.cli", *args]


@dataclass
class Observed:
    power: list[tuple[float, float]] = field(default_factory=list)  # (ts, kW)
    relays: dict[str, bool] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    last_shown: float = 0.0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def prepare(workdir: Path, broker_port: int, site_port: int) -> tuple[Path, Path, Path, str]:
    """Write the demo's site file, keys and agent file into ``workdir``."""
    site = tomllib.loads(example_file("demo-site.toml").read_text())
    site["server"]["port"] = site_port
    site_path = workdir / "site.toml"
    site_path.write_text(tomli_w.dumps(site))
    key, pub = generate_keypair(workdir / "keys")
    agent = tomllib.loads(example_file("demo-agent.toml").read_text())
    agent["mqtt"]["port"] = broker_port
    agent["security"]["platform_public_key"] = str(pub)
    agent["buffer"]["path"] = str(workdir / "buffer.sqlite")
    for d in agent["devices"]:
        d["port"] = site_port
    agent_path = workdir / "agent.toml"
    agent_path.write_text(tomli_w.dumps(agent))
    return site_path, agent_path, key, agent["terminal"]["id"]


def run_demo(cap_for_s: float = 20.0, verbose: bool = False) -> int:
    out = print
    with tempfile.TemporaryDirectory(prefix="lmt-demo-") as tmp, Broker() as broker:
        work = Path(tmp)
        site_port = free_port()
        site_path, agent_path, key, terminal = prepare(work, broker.port, site_port)
        out(f"== lmt-edge demo: terminal {terminal}")
        out(f"   broker   mosquitto on 127.0.0.1:{broker.port}")
        out(f"   site     {site_path.name}: Modbus TCP on 127.0.0.1:{site_port} "
            "(SDM630 meter id 1, 8-relay module id 2)")
        procs: list[subprocess.Popen[bytes]] = []
        agent_log = open(work / "agent.log", "wb")
        sim_log = open(work / "sim.log", "wb")
        try:
            procs.append(subprocess.Popen(lmt_cmd("sim", str(site_path)), stdout=sim_log,
                                          stderr=subprocess.STDOUT))
            wait_for_port("127.0.0.1", site_port, 20.0, procs[0])
            console = _Client("127.0.0.1", broker.port)
            console.connect([f"{PREFIX}/{terminal}/#"])
            agent = subprocess.Popen(lmt_cmd("run", "--config", str(agent_path)),
                                     stdout=agent_log, stderr=subprocess.STDOUT)
            procs.append(agent)
            out(f"   agent    lmt run --config {agent_path.name} (pid {agent.pid})")
            obs = Observed()
            start = time.monotonic()

            def pump(seconds: float, show_power: bool = True) -> None:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    try:
                        msg = console.messages.get(timeout=0.1)
                    except queue.Empty:
                        msg = None
                    if msg is not None:
                        _absorb(msg, obs, out)
                    if agent.poll() is not None:
                        raise RuntimeError(f"the agent exited with code {agent.returncode}")
                    if show_power:
                        for ts, kw in obs.power:
                            if ts > obs.last_shown:
                                obs.last_shown = ts
                                out(f"   {time.strftime('%H:%M:%S', time.localtime(ts))}  "
                                    f"site {kw:7.1f} kW   relays {_relay_str(obs.relays)}")

            out("\n-- waiting for the first telemetry")
            while not obs.power:
                pump(0.5, show_power=False)
                if time.monotonic() - start > 90:
                    raise RuntimeError("no telemetry within 90 s")
            out("\n-- before: normal operation")
            n0 = len(obs.power)
            obs.last_shown = obs.power[-1][0]
            pump(4.0)
            before = _mean([p for _, p in obs.power[n0:]]) if len(obs.power) > n0 \
                else obs.power[-1][1]
            cap = float(round(before - 45.0))
            out(f"\n-- platform: signed command 'cap import at {cap:.0f} kW for {cap_for_s:.0f} s' "
                f"(site averages {before:.1f} kW)")
            body = command_body("cap", terminal, cap_kw=cap, duration_s=cap_for_s)
            payload = sign_command_file(key, body)
            sent_at = time.monotonic()
            answers = send("127.0.0.1", broker.port, PREFIX, terminal, payload, wait="answer",
                           timeout_s=15.0)
            for a in answers:
                obs.results.append(a)
                out(f"   result: {a['status']} {a.get('detail', '')}")
            if answers[-1]["status"] != "accepted":
                raise RuntimeError("the agent refused the command")
            t_start = float(answers[-1]["ts"])
            t_end = float(answers[-1]["data"]["end_at"])
            while time.monotonic() - sent_at < cap_for_s + 1.0:
                pump(0.25)
            during = [(ts, p) for ts, p in obs.power if t_start <= ts < t_end]
            first_under = next((ts for ts, p in during if p <= cap), None)
            under_at = None if first_under is None else first_under - t_start
            out("\n-- after: the cap has ended")
            deadline = time.monotonic() + 15
            while not any(r.get("status") in ("completed", "cancelled") for r in obs.results):
                pump(0.25)
                if time.monotonic() > deadline:
                    raise RuntimeError("the command did not complete")
            n2 = len(obs.power)
            pump(5.0)
            after = _mean([p for _, p in obs.power[n2:]])
            settled = [p for ts, p in during if first_under is not None and ts >= first_under]
            shed = [e for e in obs.events if e.get("type") == "load_shed"]
            restored = [e for e in obs.events if e.get("type") == "load_restored"]
            out("\n== summary")
            out(f"   before  {before:7.1f} kW (mean)")
            out(f"   cap     {cap:7.1f} kW for {cap_for_s:.0f} s")
            if under_at is not None:
                out(f"   under the cap {under_at:.1f} s after the agent accepted the command")
            if settled:
                out(f"   during  {max(settled):7.1f} kW (highest reading once under the cap), "
                    f"{_mean(settled):.1f} kW mean")
            out(f"   after   {after:7.1f} kW (mean)")
            out(f"   relays opened: {len(shed)}")
            for e in shed:
                d = e["data"]
                out(f"     - {d['load']} ({d['device']}.{d['point']}, {d['rated_kw']:g} kW): "
                    f"{d['reason']}")
            out(f"   loads restored: {', '.join(e['data']['load'] for e in restored) or 'none'}")
            out("   results: " + ", ".join(r["status"] for r in obs.results))
            ok = (under_at is not None and bool(settled) and max(settled) <= cap
                  and {e["data"]["load"] for e in shed} <= {e["data"]["load"] for e in restored})
            console.close()
            agent.terminate()
            agent.wait(10)
            out(f"   agent stopped cleanly (exit {agent.returncode})")
            if verbose:
                out("\n-- agent log\n" + (work / "agent.log").read_text())
            out("\nDemo " + ("passed: the site stayed under the cap and every load came back."
                             if ok else "FAILED: see the figures above."))
            return 0 if ok and agent.returncode == 0 else 1
        except (RuntimeError, TimeoutError, ConnectionError) as exc:
            out(f"\nDemo failed: {exc}")
            agent_log.flush()
            out("-- agent log (last lines)\n" + "\n".join(
                (work / "agent.log").read_text(errors="replace").splitlines()[-30:]))
            out("-- simulator log (last lines)\n" + "\n".join(
                (work / "sim.log").read_text(errors="replace").splitlines()[-10:]))
            return 1
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
            agent_log.close()
            sim_log.close()


def _relay_str(relays: dict[str, bool]) -> str:
    return "".join("1" if relays[k] else "0" for k in sorted(relays)) if relays else "?"


def _absorb(msg: Any, obs: Observed, out: Any) -> None:
    try:
        batch = json.loads(msg.payload)
    except ValueError:
        return
    if not isinstance(batch, dict) or "records" not in batch:
        return
    stream = batch.get("stream")
    for rec in batch["records"]:
        if stream == "telemetry":
            vals = rec.get("values", {})
            if "power_w" in vals:
                obs.power.append((rec["ts"], vals["power_w"] / 1000.0))
            elif all(isinstance(v, bool) for v in vals.values()):
                obs.relays = dict(vals)
        elif stream == "events":
            obs.events.append(rec)
            d = rec.get("data", {})
            if rec.get("type") == "load_shed":
                out(f"   >> relay {d['device']}.{d['point']} OPENED: {d['load']} "
                    f"({d['rated_kw']:g} kW) - {d['reason']}")
            elif rec.get("type") == "load_restored":
                out(f"   >> relay {d['device']}.{d['point']} CLOSED: {d['load']} "
                    f"({d['rated_kw']:g} kW) - {d['reason']}")
        elif stream == "results":
            if not any(r.get("seq") == rec.get("seq") for r in obs.results):
                obs.results.append(rec)
                if rec.get("status") not in ("accepted",):
                    out(f"   result: {rec['status']} {rec.get('detail', '')}")
