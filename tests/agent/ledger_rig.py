"""The rig of the ledger's end-to-end tests (tests/agent/test_ledger_flow.py): `lmt sim` with its
control channel, `lmt run` as a process, a platform consumer with a persistent MQTT session, the
simulator's energy registers sampled over Modbus TCP, and the agent's SQLite file read on the
side. Every part is real; nothing here decides what the tests assert.

Timelines run in background threads (:class:`Timeline`) from the start of the module, so that
rigs that each need a few one-minute intervals make them at the same time; the tests then
assert on what each timeline recorded.
"""

from __future__ import annotations

import json
import math
import sqlite3
import struct
import subprocess
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion
from pymodbus.client import ModbusTcpClient

from lmt.agent.broker import free_port
from lmt.agent.security import generate_keypair
from lmt.firmware_sim.control import request
from lmt.firmware_sim.server import ready_info_path
from tests.conftest import EXAMPLES, lmt_argv, wait_until

PREFIX = "lmt/v1"
IMPORT_REGISTER = 0x48  # the SDM630's import_energy_kwh (float32, high word first)
#: The demo site's loads (relay_1 .. relay_7)
DEMO_LOADS = ["chiller-1", "chiller-2", "air-compressor", "ev-chargers", "water-heater",
              "hall-b-lighting", "server-room"]


def demo_site(port: int, **site: Any) -> dict[str, Any]:
    """The demo site (config/examples/demo-site.toml) on ``port``, ``[site]`` keys changed."""
    cfg = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
    cfg["server"]["port"] = port
    cfg["site"].update(site)
    return cfg


@dataclass
class Sim:
    proc: subprocess.Popen[bytes]
    port: int
    control: int | None

    def send(self, message: dict[str, Any]) -> dict[str, Any]:
        """One control-channel request; fails the test unless the simulator took it."""
        assert self.control is not None, "started without a control channel"
        got = request(self.control, message)
        assert got.get("ok"), got
        return got


@contextmanager
def serve(folder: Path, site: dict[str, Any], control: bool = True) -> Iterator[Sim]:
    """``lmt sim`` for this site (a dict of the site file), with its control channel."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    path.write_text(tomli_w.dumps(site))
    ready = folder / "sim.port"
    argv = lmt_argv("sim", str(path), "--ready-file", str(ready))
    if control:
        argv += ["--control-port", "0"]
    log = open(folder / "sim.log", "wb")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        wait_until(lambda: ready.exists() or p.poll() is not None, 30, "the simulator")
        assert p.poll() is None, (folder / "sim.log").read_text()
        info = json.loads(ready_info_path(ready).read_text())
        yield Sim(p, int(info["port"]), info.get("control_port"))
    finally:
        p.terminate()
        p.wait(10)


def agent_config(folder: Path, terminal: str, site_port: int, broker_port: int,
                 ledger: dict[str, Any], devices: Sequence[dict[str, Any]] = (),
                 **sections: dict[str, Any]) -> Path:
    """The demo agent file (config/examples/demo-agent.toml) for this terminal, site and broker,
    with ``devices`` added on the site's gateway, its ``[ledger]`` keys and other sections
    changed."""
    _key, pub = generate_keypair(folder / "keys")
    cfg = tomllib.loads((EXAMPLES / "demo-agent.toml").read_text())
    cfg["terminal"]["id"] = terminal
    cfg["mqtt"].update(port=broker_port, reconnect_min_s=0.5, reconnect_max_s=1.0)
    cfg["security"]["platform_public_key"] = str(pub)
    cfg["buffer"]["path"] = str(folder / "buffer.sqlite")
    cfg["devices"] += [dict(d) for d in devices]
    for d in cfg["devices"]:
        d["port"] = site_port
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    cfg["ledger"] = {**cfg.get("ledger", {}), **ledger}
    path = folder / "agent.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


class AgentProcess:
    """``lmt run`` as a process (what the service runs), its log in the rig's folder."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.parent / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(lmt_argv("run", "--config", str(self.config)),
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        """SIGKILL, as a power cut: nothing is saved, nothing is flushed."""
        assert self.proc is not None and self.proc.poll() is None, self.tail()
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@dataclass
class Batch:
    """One message as the platform received it."""

    topic: str
    payload: bytes
    arrived: float

    @property
    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.payload)
        return data


class Consumer:
    """The platform's ingest for one terminal: a persistent session (clean_session false,
    QoS 1), so nothing the agent publishes while it reconnects after a broker restart is lost;
    every message kept as it arrived, duplicates included (the tests count them)."""

    def __init__(self, port: int, terminal: str) -> None:
        self.terminal = terminal
        self._lock = threading.Lock()
        self._got: list[Batch] = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"ledger-ingest-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv311, clean_session=False)
        self.c.reconnect_delay_set(0.2, 0.5)
        subscribed = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/{terminal}/+", qos=1)
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = self._message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        wait_until(subscribed.is_set, 10, "the platform's subscription")

    def _message(self, client: Any, userdata: Any, m: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._got.append(Batch(m.topic, bytes(m.payload), time.time()))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()

    def batches(self, kind: str) -> list[Batch]:
        """The messages on ``<prefix>/<terminal>/<kind>``, in arrival order."""
        topic = f"{PREFIX}/{self.terminal}/{kind}"
        with self._lock:
            return [b for b in self._got if b.topic == topic]

    def records(self, kind: str) -> list[dict[str, Any]]:
        """Every record received on that topic, duplicates included, with ``_arrived`` and
        ``_historical`` added."""
        out = []
        for b in self.batches(kind):
            body = b.body
            out += [{**r, "_arrived": b.arrived, "_historical": body["historical"]}
                    for r in body["records"]]
        return out

    def intervals(self, meter: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records("intervals")
                if r["kind"] == "meter" and (meter is None or r["meter"] == meter)]

    def losses(self) -> list[dict[str, Any]]:
        return [r for r in self.records("intervals") if r["kind"] == "loss"]

    def events(self, *types: str) -> list[dict[str, Any]]:
        return [e for e in self.records("events") if not types or e["type"] in types]


class Registers:
    """The simulator's import registers, read over Modbus TCP every 0.1 s and stamped with the
    wall clock (the simulator's own clock: same machine), so the register at any boundary is
    known to a few watt-hours. Optionally switches relay_1 (chiller-1, 30 kW) off in every
    minute, for the next of ``toggle_s`` seconds in turn (each under 60 − the quiet times), so
    that consecutive intervals differ in energy (a boundary put at the
    wrong moment then shows); never in the seconds around a minute boundary, where the agent
    reads the registers that close an interval (a step the power readings see only a second
    later would move that boundary by a few Wh)."""

    QUIET_S = (3.0, 8.0)  # no switching this long before and after a minute boundary

    PERIOD_S = 0.1

    def __init__(self, port: int, meters: dict[str, int],
                 toggle_s: tuple[float, ...] | None = None) -> None:
        self.meters = meters  # name -> Modbus device id (an SDM630 profile)
        self.toggle_s = toggle_s
        self.samples: dict[str, list[tuple[float, float]]] = {m: [] for m in meters}
        self.toggles: list[tuple[float, bool]] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = ModbusTcpClient("127.0.0.1", port=port, timeout=1)
        assert self._client.connect()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: all(self.samples[m] for m in meters), 10, "the first register reads")

    def _read(self, device_id: int) -> tuple[float, float] | None:
        t0 = time.time()
        rr = self._client.read_input_registers(IMPORT_REGISTER, count=2, device_id=device_id)
        t1 = time.time()
        if rr.isError() or t1 - t0 > 0.05:  # only reads whose moment is known
            return None
        return (t0 + t1) / 2, struct.unpack(">f", struct.pack(">2H", *rr.registers))[0]

    def _run(self) -> None:
        on = True
        minute = 0
        next_toggle = math.inf if self.toggle_s is None else self._off_at(time.time())
        while not self._stop.wait(self.PERIOD_S):
            try:
                for name, unit in self.meters.items():
                    got = self._read(unit)
                    if got is None:
                        self.errors += 1
                        continue
                    with self._lock:
                        self.samples[name].append(got)
                if time.time() >= next_toggle and self.toggle_s is not None:
                    on = not on
                    assert not self._client.write_coil(0, on, device_id=2).isError()
                    self.toggles.append((time.time(), on))
                    if on:  # back on: off again in the next minute, for its own time
                        minute += 1
                        next_toggle = self._off_at(next_toggle)
                    else:
                        next_toggle += self.toggle_s[minute % len(self.toggle_s)]
            except Exception:  # a hiccup of the connection: the next read tries again
                self.errors += 1

    def _off_at(self, t: float) -> float:
        """When the chiller goes off next: the end of the quiet time after the next minute
        boundary after ``t`` (each minute is off for the next of ``toggle_s``, within it)."""
        return (math.floor(t / 60.0) + 1) * 60.0 + self.QUIET_S[1]

    def at(self, meter: str, t: float, within_s: float = 1.0) -> float:
        """The register at ``t``: between the reads on either side (at most ``within_s``
        apart), linearly."""
        with self._lock:
            s = list(self.samples[meter])
        after = next((i for i, (ts, _) in enumerate(s) if ts >= t), None)
        assert after is not None and after > 0, f"no register reads of {meter} around {t}"
        (t0, r0), (t1, r1) = s[after - 1], s[after]
        assert t1 - t0 <= within_s, f"no register reads of {meter} within {within_s} s of {t}"
        return r0 + (r1 - r0) * (t - t0) / (t1 - t0) if t1 > t0 else r1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()


def read_db(path: Path, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """The agent's buffer file, read through a connection of its own (read-only)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return con.execute(sql, list(args)).fetchall()
    except sqlite3.OperationalError:  # before the agent made its tables
        return []
    finally:
        con.close()


def stream_seqs(db: Path, stream: str) -> tuple[int, int]:
    """(delivered watermark, last sequence number written) of a stream."""
    delivered = read_db(db, "SELECT delivered_seq FROM stream_state WHERE stream = ?", [stream])
    last = read_db(db, "SELECT COALESCE(MAX(seq), 0) FROM outbox WHERE stream = ?", [stream])
    return (int(delivered[0][0]) if delivered else 0), (int(last[0][0]) if last else 0)


def kept_intervals(db: Path, meter: str) -> list[tuple[float, float, str, float | None]]:
    """The ledger_intervals rows of a meter: (start, end, quality, import_kwh)."""
    return [(float(a), float(b), str(q), k) for a, b, q, k in read_db(
        db, "SELECT start, end, quality, import_kwh FROM ledger_intervals WHERE meter = ? "
            "ORDER BY start", [meter])]


def until_wall(t: float, what: str) -> None:
    """Until the wall clock has passed ``t`` (an action due at a moment of the interval)."""
    wait_until(lambda: time.time() >= t, max(1.0, t - time.time() + 5.0), what, interval_s=0.02)


@dataclass
class Timeline:
    """A rig's scenario, run in a thread of its own; what it returns (or raises) is the test's."""

    name: str
    run: Callable[[], Any]
    _thread: threading.Thread | None = None
    _result: Any = None
    _error: BaseException | None = None
    marks: dict[str, float] = field(default_factory=dict)  # what happened when (wall clock)

    def start(self) -> Timeline:
        def main() -> None:
            try:
                self._result = self.run()
            except BaseException as exc:
                self._error = exc
        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        return self

    def mark(self, what: str) -> float:
        self.marks[what] = t = time.time()
        return t

    def result(self, timeout_s: float) -> Any:
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the {self.name} timeline did not end within {timeout_s} s")
        if self._error is not None:
            raise AssertionError(f"the {self.name} timeline failed: {self._error}") from self._error
        return self._result


def new_port() -> int:
    return free_port()
