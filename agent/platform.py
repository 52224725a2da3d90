"""The utility's side, as a reference client: keys, signed commands, and a telemetry watcher.

``lmt platform keygen | sign | send | watch``. The watcher de-duplicates by
(terminal, stream, sequence) and reports gaps, as a platform ingest should.
"""

from __future__ import annotations

import bisect
import itertools
import json
import queue
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from lmt.config.agent import Tls

from .mqtt import Topics, describe_error
from .security import load_private_key, sign_body

FINAL_STATUSES = {"rejected", "completed", "cancelled", "superseded", "failed", "opted_out",
                  "expired"}


def command_body(kind: str, terminal: str, *, command_id: str | None = None,
                 issued_at: float | None = None, expires_in_s: float = 60.0,
                 **params: Any) -> dict[str, Any]:
    now = time.time() if issued_at is None else issued_at
    body: dict[str, Any] = {"id": command_id or uuid.uuid4().hex, "terminal": terminal,
                            "issued_at": round(now, 3), "expires_at": round(now + expires_in_s, 3),
                            "type": kind}
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def dr_event_body(terminal: str, *, start: float, duration_s: float, signal: str, value: float,
                  randomize_s: float = 0.0, ramp_s: float = 0.0, recovery_s: float = 0.0,
                  command_id: str | None = None, issued_at: float | None = None,
                  expires_in_s: float = 60.0) -> dict[str, Any]:
    """The body of a ``dr_event`` command (its id is the event id)."""
    return command_body("dr_event", terminal, command_id=command_id, issued_at=issued_at,
                        expires_in_s=expires_in_s, start=round(float(start), 3),
                        duration_s=float(duration_s), signal=signal, value=float(value),
                        randomize_s=float(randomize_s), ramp_s=float(ramp_s),
                        recovery_s=float(recovery_s))


def sign_command_file(key_path: Path, body: dict[str, Any]) -> str:
    return sign_body(load_private_key(key_path), body)


@dataclass
class BrokerOptions:
    """How the platform tools reach the broker: plain TCP and anonymous unless told."""

    tls: Tls | None = None  # TLS: the CA, and a client certificate if the broker wants one
    username: str | None = None
    password: str | None = None


class _Client:
    """A small blocking paho client: connect, subscribe, publish, receive into a queue."""

    def __init__(self, host: str, port: int, client_id: str = "",
                 options: BrokerOptions | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._ready = threading.Event()
        self._refused: str | None = None
        self._subs: list[str] = []
        self._suback = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or
                             f"lmt-platform-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
        if options is not None and options.tls is not None:
            self.c.tls_set_context(options.tls.ssl_context())
            if options.tls.insecure:
                self.c.tls_insecure_set(True)
        if options is not None and options.username:
            self.c.username_pw_set(options.username, options.password)
        self._error: str | None = None
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_log = self._on_log
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_subscribe = lambda *a: self._suback.set()
        self.host, self.port = host, port

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._ready.set()
            return
        for t in self._subs:
            client.subscribe(t, qos=1)
        self._ready.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if not self._ready.is_set():  # closed before accepting us (e.g. a TLS alert)
            self._refused = self._error or str(reason_code)
            self._ready.set()

    def _on_log(self, client, userdata, level, buf):
        if level == mqtt.MQTT_LOG_ERR:
            self._error = buf

    def connect(self, subscribe: list[str], timeout_s: float = 10.0) -> None:
        self._subs = subscribe
        try:
            self.c.connect(self.host, self.port, keepalive=30)
        except ssl.SSLError as exc:
            raise ConnectionError(f"broker {self.host}:{self.port}: {describe_error(exc)[0]}"
                                  ) from None
        except OSError as exc:
            raise ConnectionError(f"cannot reach the broker at {self.host}:{self.port}: {exc}"
                                  ) from None
        self.c.loop_start()
        if not self._ready.wait(timeout_s):
            self.close()
            raise ConnectionError(f"broker at {self.host}:{self.port} did not accept us")
        if self._refused is not None:
            self.close()
            raise ConnectionError(f"broker at {self.host}:{self.port} refused the connection: "
                                  f"{self._refused}")
        if subscribe and not self._suback.wait(timeout_s):
            raise ConnectionError("broker did not acknowledge the subscription")

    def publish(self, topic: str, payload: str, timeout_s: float = 10.0) -> None:
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise ConnectionError(f"broker did not acknowledge the publish within {timeout_s} s")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def send(host: str, port: int, prefix: str, terminal: str, payload: str, *,
         wait: str = "answer", timeout_s: float = 30.0,
         out: Callable[[dict[str, Any]], None] | None = None,
         options: BrokerOptions | None = None) -> list[dict[str, Any]]:
    """Publish a signed command; collect this command's results.

    ``wait``: "none" (return after the broker's acknowledgement), "answer" (until accepted or
    rejected) or "final" (until completed, cancelled, superseded, rejected or failed).
    """
    topics = Topics(prefix, terminal)
    try:
        cid = json.loads(json.loads(payload)["body"]).get("id")
    except (ValueError, KeyError, TypeError, AttributeError):
        cid = None
    client = _Client(host, port, options=options)
    client.connect([topics.result] if wait != "none" else [])
    results: list[dict[str, Any]] = []
    try:
        client.publish(topics.cmd, payload)
        if wait == "none":
            return results
        deadline = time.monotonic() + timeout_s
        seen: set[int] = set()
        while time.monotonic() < deadline:
            try:
                msg = client.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            for rec in _records(msg.payload):
                got = rec.get("data")
                data: dict[str, Any] = got if isinstance(got, dict) else {}
                ours = cid is None or rec.get("command_id") == cid or (
                    rec.get("command_id") is None and data.get("claimed_id") == cid)
                if rec.get("seq") in seen or not ours:
                    continue
                seen.add(rec.get("seq", -1))
                st = rec.get("status")
                if st == "rejected" and any(r.get("status") == "accepted" for r in results):
                    continue  # a duplicate delivery refused as replayed; the original stands
                results.append(rec)
                if out:
                    out(rec)
                if wait == "answer" and st in {"accepted", "rejected"}:
                    return results
                if st in FINAL_STATUSES:
                    return results
        raise TimeoutError(f"no {'answer' if wait == 'answer' else 'final result'} from "
                           f"{terminal} within {timeout_s:g} s")
    finally:
        client.close()


def _records(payload: bytes | bytearray) -> list[dict[str, Any]]:
    try:
        msg = json.loads(payload)
    except ValueError:
        return []
    recs = msg.get("records") if isinstance(msg, dict) else None
    return [r for r in recs if isinstance(r, dict)] if isinstance(recs, list) else []


@dataclass
class StreamTracker:
    """Per (terminal, stream): de-duplicate by sequence number and detect gaps.

    The sequence numbers received are kept as merged ranges, so records may arrive in any
    order: live data ahead of the backlog after an outage, resends after a reconnect. A gap is
    reported when a record arrives more than one past the highest seen; it is open until
    records fill it. Nothing below the first record seen is a gap: a watcher that starts late
    cannot know what came before."""

    ranges: dict[tuple[str, str], list[list[int]]] = field(default_factory=dict)
    duplicates: int = 0
    gaps: list[tuple[str, str, int, int]] = field(default_factory=list)

    def accept(self, terminal: str, stream: str, seq: int) -> bool:
        """True for a record seen for the first time; records gaps as they appear."""
        key = (terminal, stream)
        rs = self.ranges.setdefault(key, [])
        i = bisect.bisect_right(rs, seq, key=lambda r: r[0])  # rs[i-1] starts at or below seq
        if i and rs[i - 1][1] >= seq:
            self.duplicates += 1
            return False
        if rs and seq > rs[-1][1] + 1:
            self.gaps.append((terminal, stream, rs[-1][1] + 1, seq - 1))
        joins_prev = i > 0 and rs[i - 1][1] == seq - 1
        joins_next = i < len(rs) and rs[i][0] == seq + 1
        if joins_prev and joins_next:
            rs[i - 1][1] = rs[i][1]
            del rs[i]
        elif joins_prev:
            rs[i - 1][1] = seq
        elif joins_next:
            rs[i][0] = seq
        else:
            rs.insert(i, [seq, seq])
        return True

    def excuse(self, terminal: str, stream: str, first: int, last: int) -> None:
        """The terminal dropped ``first..last`` on purpose (its disk cap; a
        ``telemetry_dropped`` event says so): not a gap, and nothing there will come."""
        rs = self.ranges.setdefault((terminal, stream), [])
        merged: list[list[int]] = []
        for a, b in sorted([*rs, [first, last]]):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.ranges[(terminal, stream)] = merged

    @property
    def delivered(self) -> dict[tuple[str, str], int]:
        """Per (terminal, stream): the highest sequence number received with none missing
        between it and the first one received."""
        return {k: rs[0][1] for k, rs in self.ranges.items() if rs}

    def open_gaps(self) -> list[tuple[str, str, int, int]]:
        """Ranges still missing now (sequence numbers never received)."""
        return [(term, stream, a[1] + 1, b[0] - 1) for (term, stream), rs in self.ranges.items()
                for a, b in itertools.pairwise(rs)]


def _fmt_values(values: dict[str, Any]) -> str:
    if "power_w" in values:
        v = values
        return (f"P={v['power_w'] / 1000:.1f} kW"
                + (f" f={v['frequency_hz']:.2f} Hz" if "frequency_hz" in v else "")
                + (f" E={v['import_energy_kwh']:.2f} kWh" if "import_energy_kwh" in v else ""))
    bits = [k for k, x in values.items() if isinstance(x, bool)]
    if bits and len(bits) == len(values):
        return "relays " + "".join("1" if values[k] else "0" for k in bits)
    return " ".join(f"{k}={x:g}" if isinstance(x, float) else f"{k}={x}"
                    for k, x in list(values.items())[:6])


def _fmt_interval(rec: dict[str, Any]) -> str:
    start = time.strftime("%H:%M", time.localtime(float(rec.get("start", 0))))
    end = time.strftime("%H:%M", time.localtime(float(rec.get("end", 0))))
    if rec.get("kind") == "loss":
        return (f"loss {rec.get('group')} {start}-{end}: main {rec.get('main_kwh')} kWh, subs "
                f"{rec.get('sub_kwh')} kWh, loss {rec.get('loss_kwh')} kWh "
                f"({rec.get('loss_pct')} %) {rec.get('status')}")
    cost = f" {rec['period']} {rec['cost']:.2f}" if rec.get("cost") is not None else ""
    co2 = f" {rec['kgco2']:.1f} kgCO2" if rec.get("kgco2") is not None else ""
    return (f"interval {rec.get('meter')} {start}-{end}: {rec.get('import_kwh')} kWh{cost}{co2} "
            f"{rec.get('quality')}")


def format_record(terminal: str, stream: str, rec: dict[str, Any], historical: bool) -> str:
    ts = time.strftime("%H:%M:%S", time.localtime(float(rec.get("ts", 0))))
    hist = " (historical)" if historical else ""
    head = f"{ts} {terminal} {stream}#{rec.get('seq')}{hist}"
    if stream == "telemetry":
        return f"{head} {rec.get('device')}: {_fmt_values(rec.get('values', {}))}"
    if stream == "intervals":
        return f"{head} {_fmt_interval(rec)}"
    if stream == "bills":
        b = rec.get("bill", {})
        return (f"{head} {rec.get('kind')} bill {rec.get('label')} {rec.get('meter')}"
                f"{' (final)' if rec.get('final') else ''}: {b.get('energy_kwh')} kWh, total "
                f"{b.get('total')} {b.get('currency', '')} (energy {b.get('energy_cost')}, "
                f"demand {b.get('demand_charge')}), {b.get('kgco2')} kgCO2")
    if stream == "events":
        data = rec.get("data", {})
        if rec.get("type") in ("load_shed", "load_restored"):
            return f"{head} {rec['type']} {data.get('load')}: {data.get('reason')}"
        return f"{head} {rec.get('type')} " + " ".join(f"{k}={v}" for k, v in data.items())
    reason = f" ({rec.get('reason')})" if rec.get("reason") else ""
    return f"{head} command {rec.get('command_id')}: {rec.get('status')}{reason} {rec.get('detail', '')}"


def watch(host: str, port: int, prefix: str, terminal: str = "+", *, as_json: bool = False,
          duration_s: float | None = None, count: int | None = None,
          stream: TextIO = sys.stdout, options: BrokerOptions | None = None) -> StreamTracker:
    """Print telemetry, events, results and status as they arrive; return the tracker."""
    tracker = StreamTracker()
    announced: list[tuple[str, str, int, int]] = []  # gaps printed and not yet filled
    client = _Client(host, port, options=options)
    client.connect([f"{prefix}/{terminal}/#"])
    n = 0
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        for msg in _iter_messages(client, deadline):
            parts = msg.topic[len(prefix) + 1:].split("/")
            if len(parts) != 2:
                continue
            term, kind = parts
            if kind == "status":
                try:
                    st = json.loads(msg.payload)
                except ValueError:
                    continue
                if as_json:
                    print(json.dumps({"terminal": term, "stream": "status", "status": st}),
                          file=stream, flush=True)
                else:
                    state = "online" if st.get("online") else "OFFLINE"
                    print(f"{term} status: {state} (lmt-edge {st.get('version')}, devices "
                          f"{', '.join(st.get('devices', []))})", file=stream, flush=True)
                continue
            if kind == "cmd":
                continue
            try:
                batch = json.loads(msg.payload)
            except ValueError:
                continue
            sname = batch.get("stream", kind)
            for rec in _records(msg.payload):
                seq = rec.get("seq")
                if not isinstance(seq, int):
                    continue
                gaps_before = len(tracker.gaps)
                if not tracker.accept(term, sname, seq):
                    continue
                data = rec.get("data")
                if sname == "events" and rec.get("type") == "telemetry_dropped" \
                        and isinstance(data, dict):
                    first, last = data.get("first_seq"), data.get("last_seq")
                    if isinstance(first, int) and isinstance(last, int):
                        tracker.excuse(term, str(data.get("stream", "telemetry")), first, last)
                for g in tracker.gaps[gaps_before:]:
                    announced.append(g)
                    line = (json.dumps({"gap": {"terminal": g[0], "stream": g[1],
                                                "first": g[2], "last": g[3]}})
                            if as_json else f"GAP {g[0]} {g[1]} #{g[2]}..#{g[3]} missing "
                                            "(a backlog after an outage fills it)")
                    print(line, file=stream, flush=True)
                inside = [g for g in announced
                          if g[0] == term and g[1] == sname and g[2] <= seq <= g[3]]
                if inside:  # this record fell into a reported gap: is the gap whole now?
                    still = tracker.open_gaps()
                    for g in [g for g in inside if not any(
                            o[:2] == g[:2] and o[2] <= g[3] and o[3] >= g[2] for o in still)]:
                        announced.remove(g)
                        line = (json.dumps({"filled": {"terminal": g[0], "stream": g[1],
                                                       "first": g[2], "last": g[3]}})
                                if as_json else f"FILLED {g[0]} {g[1]} #{g[2]}..#{g[3]}")
                        print(line, file=stream, flush=True)
                if as_json:
                    print(json.dumps({"terminal": term, "stream": sname,
                                      "historical": batch.get("historical", False),
                                      "record": rec}), file=stream, flush=True)
                else:
                    print(format_record(term, sname, rec, bool(batch.get("historical"))),
                          file=stream, flush=True)
                n += 1
                if count is not None and n >= count:
                    return tracker
    except KeyboardInterrupt:  # Ctrl-C ends a watch: the caller still gets the summary
        pass
    finally:
        client.close()
    return tracker


def _iter_messages(client: _Client, deadline: float | None) -> Iterator[mqtt.MQTTMessage]:
    while True:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            return
        try:
            yield client.messages.get(timeout=0.5 if timeout is None else min(timeout, 0.5))
        except queue.Empty:
            continue
