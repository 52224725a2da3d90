"""End to end, every part a separate process: simulated site (`lmt sim`), real mosquitto, the
agent (`lmt run`), and the platform CLI (`lmt platform keygen | sign | send | watch`).

A signed cap opens the right relays and brings the measured site power under the cap within a
few control cycles; the loads come back when it ends. Tampered, expired, replayed and wrongly
addressed commands are refused with their reason and change nothing on the site. Telemetry
reaches a subscriber with contiguous sequence numbers. Every message on the terminal's topics,
both ways, matches the published JSON Schemas (docs/schemas/).
"""

from __future__ import annotations

import itertools
import json
import queue
import struct
import subprocess
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest
import tomli_w
from pymodbus.client import ModbusTcpClient

from lmt.agent.broker import Broker, free_port
from lmt.agent.platform import _Client
from tests.conftest import EXAMPLES, lmt_argv, wait_until

TERMINAL = "demo-0001"
PREFIX = "lmt/v1"
RELAYS = [f"relay_{i}" for i in range(1, 9)]
SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


@dataclass
class Site:
    port: int
    client: ModbusTcpClient

    def power_kw(self) -> float:
        rr = self.client.read_input_registers(0x34, count=2, device_id=1)
        assert not rr.isError()
        return struct.unpack(">f", struct.pack(">2H", *rr.registers))[0] / 1000.0

    def coils(self) -> dict[str, bool]:
        rr = self.client.read_coils(0, count=8, device_id=2)
        assert not rr.isError()
        return dict(zip(RELAYS, rr.bits[:8], strict=True))


@dataclass
class Recorder:
    """Every MQTT message on the terminal's topics, both ways, as (topic, payload), from
    before the agent starts."""

    client: _Client
    got: list[tuple[str, bytes]] = field(default_factory=list)

    def messages(self) -> list[tuple[str, bytes]]:
        while True:
            try:
                m = self.client.messages.get_nowait()
            except queue.Empty:
                return list(self.got)
            self.got.append((m.topic, bytes(m.payload)))


@dataclass
class Terminal:
    site: Site
    broker: Broker
    work: Path
    key: Path
    watch_out: Path
    agent: subprocess.Popen[bytes]
    mqtt: Recorder

    def watched(self) -> list[dict]:
        lines = self.watch_out.read_text().splitlines()
        return [json.loads(x) for x in lines if x.strip()]

    def records(self, stream: str) -> list[dict]:
        return [x["record"] for x in self.watched() if x.get("stream") == stream]

    def sign(self, name: str, *args: str, terminal: str = TERMINAL, expires_in: str = "30",
             issued_at: float | None = None) -> Path:
        when = ["--issued-at", str(issued_at)] if issued_at is not None else []
        out = subprocess.run(lmt_argv("platform", "sign", "--terminal", terminal, "--key",
                                      str(self.key), "--expires-in", expires_in, *when, *args),
                             check=True, capture_output=True, text=True, timeout=60)
        path = self.work / f"{name}.json"
        path.write_text(out.stdout.strip())
        return path

    def send_raw(self, path: Path, wait: str = "answer") -> tuple[int, list[dict]]:
        res = subprocess.run(lmt_argv("platform", "send", "--broker",
                                      f"127.0.0.1:{self.broker.port}", "--terminal", TERMINAL,
                                      "--json", "--wait", wait, "--timeout", "20",
                                      "--raw", str(path)),
                             capture_output=True, text=True, timeout=60)
        results = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
        return res.returncode, results


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")
    try:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    finally:
        fh.close()


def _stop(p: subprocess.Popen[bytes]) -> int:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


@pytest.fixture(scope="module")
def terminal(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Terminal]:
    work = tmp_path_factory.mktemp("e2e")
    site_port = free_port()
    site = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
    site["server"]["port"] = site_port
    (work / "site.toml").write_text(tomli_w.dumps(site))
    procs: list[subprocess.Popen[bytes]] = []
    ready = work / "sim.port"
    # the simulator starts while the keys are made
    procs.append(_spawn(lmt_argv("sim", str(work / "site.toml"), "--ready-file", str(ready)),
                        work / "sim.log"))
    try:
        subprocess.run(lmt_argv("platform", "keygen", "--out", str(work / "keys")), check=True,
                       capture_output=True, timeout=60)
    except BaseException:
        _stop(procs[0])
        raise
    agent_cfg = tomllib.loads((EXAMPLES / "demo-agent.toml").read_text())
    agent_cfg["mqtt"]["port"] = broker.port
    agent_cfg["security"]["platform_public_key"] = "keys/platform.pub"
    agent_cfg["buffer"]["path"] = "buffer.sqlite"
    for d in agent_cfg["devices"]:
        d["port"] = site_port
    (work / "agent.toml").write_text(tomli_w.dumps(agent_cfg))

    wait_until(ready.exists, 30, "the simulator to listen")
    client = ModbusTcpClient("127.0.0.1", port=site_port, timeout=2)
    assert client.connect()
    recorder = Recorder(_Client("127.0.0.1", broker.port))
    recorder.client.connect([f"{PREFIX}/{TERMINAL}/#"])
    watch_out = work / "watch.jsonl"
    wfh = open(watch_out, "wb")
    procs.append(subprocess.Popen(lmt_argv("platform", "watch", "--broker",
                                           f"127.0.0.1:{broker.port}", "--terminal", TERMINAL,
                                           "--json"), stdout=wfh, stderr=subprocess.DEVNULL))
    wfh.close()
    agent = _spawn(lmt_argv("run", "--config", str(work / "agent.toml")), work / "agent.log")
    t = Terminal(Site(site_port, client), broker, work, work / "keys" / "platform.key",
                 watch_out, agent, recorder)
    try:
        wait_until(lambda: any(r.get("device") == "main-meter" for r in t.records("telemetry")),
                   90, "telemetry from the agent")
        yield t
    finally:
        client.close()
        recorder.client.close()
        agent_rc = _stop(agent)
        for p in procs:
            _stop(p)
        print((work / "agent.log").read_text()[-4000:])
        assert agent_rc == 0, "the agent did not stop cleanly on SIGTERM"


def _no_sheds(t: Terminal) -> bool:
    return not [e for e in t.records("events") if e["type"] == "load_shed"]


def test_bad_commands_are_refused_and_change_nothing(terminal: Terminal) -> None:
    t = terminal
    before = t.site.coils()
    assert all(before[r] for r in RELAYS[:7])

    with ThreadPoolExecutor(3) as pool:  # the three `lmt platform sign` runs side by side
        signing = [pool.submit(t.sign, "good", "cap", "--kw", "10", "--for", "30s"),
                   pool.submit(t.sign, "expired", "cap", "--kw", "10", "--for", "30s",
                               expires_in="60", issued_at=time.time() - 120),
                   pool.submit(t.sign, "other", "cap", "--kw", "10", "--for", "30s",
                               terminal="demo-0002")]
    good, expired, other = (f.result() for f in signing)
    env = json.loads(good.read_text())
    tampered = t.work / "tampered.json"
    tampered.write_text(json.dumps(dict(env, body=env["body"].replace('"cap_kw":10.0',
                                                                      '"cap_kw":11.0'))))
    cases = {"bad_signature": tampered, "expired": expired, "wrong_terminal": other}
    for reason, path in cases.items():
        rc, results = t.send_raw(path)
        assert rc == 3, (reason, results)
        assert results[-1]["status"] == "rejected" and results[-1]["reason"] == reason, results
    malformed = t.work / "malformed.json"
    malformed.write_text('{"v": 1, "body": "{}"}')
    rc, results = t.send_raw(malformed)
    assert (rc, results[-1]["reason"], results[-1]["command_id"]) == (3, "malformed", None)
    # an unauthenticated id is never used to answer: it is only quoted, for diagnosis
    rejected = [r for r in t.records("results") if r["reason"] == "bad_signature"]
    assert rejected and rejected[-1]["command_id"] is None
    assert rejected[-1]["data"]["claimed_id"] == json.loads(env["body"])["id"]
    # a couple of control cycles later, nothing has moved
    n = len(t.records("telemetry"))
    wait_until(lambda: len(t.records("telemetry")) > n + 4, 20, "more telemetry")
    assert t.site.coils() == before
    assert _no_sheds(t)


def test_signed_cap_sheds_then_restores(terminal: Terminal) -> None:
    t = terminal
    site_kw = sum(t.site.power_kw() for _ in range(5)) / 5
    cap = round(site_kw - 45.0)
    # long enough to be under the cap for a while (< 8 s to get there, then > 10 reads before
    # the last 3 s): the shed, the hold and the restore at the end are what is checked
    duration = 12.0
    cap_file = t.sign("cap", "cap", "--kw", str(cap), "--for", f"{duration:g}s")
    cid = json.loads(json.loads(cap_file.read_text())["body"])["id"]
    rc, results = t.send_raw(cap_file)
    assert rc == 0 and results[-1]["status"] == "accepted", results
    accepted = time.monotonic()  # within a moment of the agent's acceptance

    # under the cap within a few control cycles (1 s each), measured at the site's own meter
    wait_until(lambda: t.site.power_kw() < cap, 8, f"site power under the {cap} kW cap")
    under_after = time.monotonic() - accepted
    # the agent shed, in its first cycle, the cheapest set of loads that covers the excess it
    # measured: least total priority, then least overshoot; the critical server room never.
    # The excess is ~47 kW (site - (cap - margin 2)) give or take the site's noise: ev-chargers
    # (22 kW, p10) + chiller-1 (30 kW, p40) = 52 kW, cost 50, where the priority order would
    # shed ev-chargers, water-heater and chiller-1 (64 kW, cost 70). So the expectation is
    # computed from the site power logged with the decision.
    executed = wait_until(lambda: next((r for r in t.records("results") if r["command_id"] == cid
                                        and r["status"] == "executed"), None),
                          10, "the command to be executed")
    cfg = tomllib.loads((t.work / "agent.toml").read_text())
    loads = {ld["name"]: ld for ld in cfg["loads"]}
    need = executed["data"]["site_kw"] - (cap - cfg["control"]["margin_kw"])
    pool = [n for n, ld in loads.items()
            if not ld.get("critical", False) and ld.get("class") != "critical"]
    best = min((sum(loads[n]["priority"] for n in c), sum(loads[n]["rated_kw"] for n in c) - need,
                sorted(c))
               for r in range(1, len(pool) + 1) for c in itertools.combinations(pool, r)
               if sum(loads[n]["rated_kw"] for n in c) >= need)
    sheds = executed["data"]["shed"]
    assert sorted(sheds) == best[2], (need, sheds, best)
    assert [loads[n]["priority"] for n in sheds] == sorted(loads[n]["priority"] for n in sheds)
    coils = t.site.coils()
    for name, ld in loads.items():
        assert coils[ld["point"]] == (name not in sheds), (name, coils)
    for e in t.records("events"):
        if e["type"] == "load_shed":
            assert e["data"]["command_id"] == cid and "cap" in e["data"]["reason"]
    # it stays under the cap while the command lasts (reads as fast as the meter answers)
    reads = 0
    while time.monotonic() < accepted + duration - 3:
        assert t.site.power_kw() < cap
        reads += 1
        time.sleep(0.1)  # sampling rate, not synchronisation
    assert reads > 10
    statuses = lambda: [r["status"] for r in t.records("results") if r["command_id"] == cid]  # noqa: E731
    wait_until(lambda: "completed" in statuses(), 30, "the command to complete by itself")
    assert statuses() == ["accepted", "executed", "completed"]
    wait_until(lambda: all(t.site.coils()[r] for r in RELAYS[:7]), 10, "every load back on")
    assert t.site.power_kw() > cap
    assert under_after < 8

    # the same signed command again is a replay: refused, nothing moves
    before = t.site.coils()
    rc, results = t.send_raw(cap_file)
    assert rc == 3 and results[-1]["reason"] == "replayed", results
    n = len(t.records("telemetry"))
    wait_until(lambda: len(t.records("telemetry")) > n + 4, 20, "more telemetry")
    assert t.site.coils() == before


def test_telemetry_sequence_is_contiguous(terminal: Terminal) -> None:
    seqs = [r["seq"] for r in terminal.records("telemetry")]
    assert len(seqs) > 20
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap or duplicate in telemetry"
    assert not [x for x in terminal.watched() if "gap" in x]
    for stream in ("events", "results"):
        s = [r["seq"] for r in terminal.records(stream)]
        assert s == list(range(s[0], s[0] + len(s)))


# -- the contract: what goes over the wire is what docs/schemas/ publishes --------------------
_SCHEMA_OF_TOPIC = {"status": "status", "telemetry": "telemetry", "events": "events",
                    "result": "result", "cmd": "cmd"}


def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)  # the draft the schema declares
    cls.check_schema(schema)
    return cls(schema)


def _problems(v: jsonschema.protocols.Validator, doc: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in v.iter_errors(doc)]


def test_every_message_matches_the_published_schemas(terminal: Terminal) -> None:
    """Runs last: it checks what the tests above made go over the broker. Every message on
    the terminal's topics matches its schema: status, telemetry, events and result from the
    agent, and the signed commands sent to it (envelope and body) — all but the one
    deliberately malformed envelope, which must not."""
    t = terminal
    # a command and its answer of its own, so that every topic is seen even when run alone
    probe = t.sign("contract-probe", "cancel", "--target", "no-such-command")
    rc, results = t.send_raw(probe)
    assert rc == 3 and results[-1]["reason"] == "unknown_target", results
    seq = results[-1]["seq"]
    wait_until(lambda: any(topic.endswith("/result") and any(
        r["seq"] == seq for r in json.loads(p)["records"]) for topic, p in t.mqtt.messages()),
        10, "the recorder to get the probe's result")

    validators = {name: _validator(name) for name in (*_SCHEMA_OF_TOPIC.values(), "command-body")}
    deliberate = t.work / "malformed.json"  # test_bad_commands_are_refused_and_change_nothing
    malformed = deliberate.read_bytes() if deliberate.exists() else None
    seen: dict[str, int] = dict.fromkeys(_SCHEMA_OF_TOPIC, 0)
    received: set[tuple[str, int]] = set()
    bad = []
    for topic, payload in t.mqtt.messages():
        kind = topic.rsplit("/", 1)[-1]
        assert kind in _SCHEMA_OF_TOPIC, f"a message on an unpublished topic {topic}"
        doc = json.loads(payload)
        if kind == "cmd" and payload == malformed:
            assert _problems(validators["cmd"], doc), "the malformed envelope matches cmd"
            continue
        problems = _problems(validators[_SCHEMA_OF_TOPIC[kind]], doc)
        if kind == "cmd" and not problems:
            problems = [f"body: {p}" for p in
                        _problems(validators["command-body"], json.loads(doc["body"]))]
        if problems:
            bad.append((topic, payload[:400], problems[:5]))
        if kind in ("telemetry", "events", "result") and isinstance(doc, dict):
            received |= {(doc.get("stream"), r.get("seq")) for r in doc.get("records", [])}
        seen[kind] += 1
    assert not bad, f"{len(bad)} messages break the published schemas: {bad[:5]}"
    assert all(seen.values()), f"not every topic was seen: {seen}"
    assert seen["cmd"] >= 2 and seen["telemetry"] > 20, seen
    # the recorder got everything the tests above received (the watcher's records)
    watched = {(x["stream"], x["record"]["seq"]) for x in t.watched() if "record" in x}
    assert watched and watched <= received, sorted(watched - received)[:10]
