"""A corpus of bad commands, sent over real MQTT to one running agent on the simulated demo site:
each is refused with its reason on the result topic and none actuates anything.

The corpus is generated with hypothesis (positions of altered bytes, garbage, wrong types,
out-of-range values, foreign terminals, time windows) plus hand-written cases. Hypothesis only
*draws* the variations here: one shared agent answers them all, so the drawing runs first
(``_draw``: deterministic, no example database) and the payloads are sent in one go.

Every refused command gets exactly one ``rejected`` record with the reason the code gives:
``malformed``, ``bad_signature``, ``invalid``, ``wrong_terminal``, ``expired``,
``not_yet_valid``, ``replayed`` and ``unknown_target``. Records are matched to commands by
(command_id, reason, data.claimed_id); unauthenticated answers carry command_id null and quote
the body's id, when readable, as claimed_id.

Before any parse the terminal bounds a message (size, UTF-8, nesting of ``[``/``{`` in the
envelope and in the body text): breaking a bound is ``malformed``, even for a validly signed
body, and brackets inside JSON strings do not count.

NaN and infinite times in a validly signed body are refused as invalid (test at the end).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pymodbus.client import ModbusTcpClient

from lmt.agent import messages
from lmt.agent.broker import Broker
from lmt.agent.daemon import Agent
from lmt.agent.messages import MAX_DURATION_S
from lmt.agent.platform import _Client
from lmt.agent.security import (
    MAX_NESTING,
    MAX_PAYLOAD_BYTES,
    Refusal,
    load_private_key,
    verify_command,
)
from lmt.config import load_agent_config
from tests.agent.harness import AgentThread, write_agent_config
from tests.conftest import wait_until

TERMINAL = "badcmd-0001"  # its own id (and MQTT session) on the shared broker
PREFIX = "lmt/v1"
CMD, RESULT, EVENTS = (f"{PREFIX}/{TERMINAL}/{t}" for t in ("cmd", "result", "events"))
SKEW_S = 30.0  # demo-agent.toml
MAX_LIFETIME_S = 86400.0  # the security.max_lifetime_s default
HARMLESS_KW = 100_000.0  # a cap far above the demo site's import: accepted, sheds nothing
TYPES = {"cap", "shed", "cancel", "dr_event"}  # dr_event: being added; never "unknown" here
FIELDS = {"id", "terminal", "issued_at", "expires_at", "type", "cap_kw", "duration_s", "until",
          "shed_kw", "target"}
TERMINAL_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
ID_RE = r"[A-Za-z0-9_.:-]{1,64}"

DR_EVENTS = hasattr(messages, "DrEventCommand")  # the dr_event command type, when present
DR_SIGNALS = {"level", "reduction_kw", "reduction_pct", "cap_kw"}

T = TypeVar("T")


# -- the corpus ---------------------------------------------------------------------------
@dataclass
class Case:
    label: str  # category: what is wrong
    payload: bytes
    reason: str  # the expected refusal
    command_id: str | None  # the expected command_id of the answer
    claimed_id: str | None = None  # malformed/bad_signature: the id quoted in data


def _draw(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    """``n`` examples of ``strategy``, reproducibly (no database, derandomized)."""
    out: list[T] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(x: T) -> None:
        out.append(x)

    collect()
    return out


def _peek_id(body: str) -> str | None:
    """The id the terminal can read from a body, as it quotes it (independent of the agent)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    cid = obj.get("id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and 0 < len(cid) <= 64 else None


def _json_values() -> st.SearchStrategy[Any]:
    return st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                        | st.text(max_size=20),
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                             max_size=4),
                        max_leaves=8)


def _not_a_number() -> st.SearchStrategy[Any]:
    """JSON values pydantic's lax float never takes (no bools, no numeric strings)."""
    return (st.none() | st.lists(st.integers(), max_size=3)
            | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
            | st.text(alphabet="xyz!? ", min_size=1, max_size=10))


def _not_a_string() -> st.SearchStrategy[Any]:
    return (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
            | st.lists(st.text(max_size=3), max_size=3))


def _nested(depth: int, kind: str) -> str:
    """``depth`` nested arrays (``"[]"``) or objects (``"{}"``) as JSON text."""
    return "[" * depth + "]" * depth if kind == "[]" else '{"a":' * depth + "1" + "}" * depth


def _invalid_utf8() -> st.SearchStrategy[bytes]:
    """A byte sequence that is not UTF-8 wherever it stands: a lone continuation byte, a byte
    UTF-8 never uses, a surrogate or an overlong form, a lead byte with no continuation."""
    return st.one_of(st.integers(0x80, 0xBF).map(lambda b: bytes([b])),
                     st.sampled_from([b"\xc0", b"\xc1", b"\xf5", b"\xff", b"\xed\xa0\x80",
                                      b"\xc0\xaf", b"\xe0\x80\xaf"]),
                     st.integers(0xC2, 0xF4).map(lambda b: bytes([b, 0x41])))


class Corpus:
    def __init__(self, key: Ed25519PrivateKey, now: float) -> None:
        self.key, self.now = key, now
        self.other_key = Ed25519PrivateKey.generate()
        self.cases: list[Case] = []
        self.n = 0

    # building blocks
    def new_id(self, label: str) -> str:
        self.n += 1
        return f"{label}-{self.n}"

    def body(self, kind: str = "cap", cid: str | None = None, **kw: Any) -> dict[str, Any]:
        b: dict[str, Any] = {"id": self.new_id(kind) if cid is None else cid, "terminal": TERMINAL,
                             "issued_at": round(self.now, 3),
                             "expires_at": round(self.now + 3600, 3), "type": kind}
        b.update({"cap": {"cap_kw": HARMLESS_KW, "duration_s": 600.0},
                  "shed": {"shed_kw": 10.0, "duration_s": 600.0},
                  "cancel": {"target": "no-such-command"},
                  "dr_event": {"start": round(self.now + 600, 3), "duration_s": 600.0,
                               "signal": "reduction_kw", "value": 10.0},
                  "remote": {"round": 1, "action": "trip"},
                  "guarantee": {"on": True},
                  "modes": {"params": {"floor_kw": 5.0}}}.get(kind, {}))
        b.update(kw)
        return {k: v for k, v in b.items() if v is not ...}

    @staticmethod
    def text(body: dict[str, Any]) -> str:
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    def sig(self, text: str, key: Ed25519PrivateKey | None = None) -> str:
        return base64.b64encode((key or self.key).sign(text.encode())).decode()

    def envelope(self, text: str, sig: str | None = None, **extra: Any) -> bytes:
        env: dict[str, Any] = {"v": 1, "body": text, "sig": self.sig(text) if sig is None else sig}
        env.update(extra)
        return json.dumps({k: v for k, v in env.items() if v is not ...}).encode()

    def signed(self, body: dict[str, Any]) -> bytes:
        return self.envelope(self.text(body))

    # adding cases
    def add(self, label: str, payload: bytes | str, reason: str, command_id: str | None = None,
            claimed_id: str | None = None) -> None:
        raw = payload.encode() if isinstance(payload, str) else payload
        self.cases.append(Case(label, raw, reason, command_id, claimed_id))

    def malformed(self, label: str, payload: bytes | str) -> None:
        self.add(label, payload, "malformed")

    def bad_sig(self, label: str, text: str, sig: str) -> None:
        self.add(label, self.envelope(text, sig), "bad_signature", None, _peek_id(text))

    def refused(self, label: str, body: dict[str, Any], reason: str) -> None:
        """A validly signed body refused with ``reason`` (answered under its readable id)."""
        text = self.text(body)
        self.add(label, self.envelope(text), reason, _peek_id(text))


def generated(c: Corpus, site_kw: float) -> None:
    """The hypothesis-drawn part of the corpus."""
    now = c.now
    template = c.signed(c.body(cid="template-1")).decode()

    for i in _draw(st.integers(0, len(template) - 1), 12):
        c.malformed("truncated", template[:i])

    def not_an_envelope(raw: bytes) -> bool:
        try:
            obj = json.loads(raw)
        except ValueError:
            return True
        return not isinstance(obj, dict)

    for raw in _draw(st.binary(max_size=300).filter(not_an_envelope), 12):
        c.malformed("garbage", raw)
    for value in _draw(_json_values().filter(
            lambda x: not (isinstance(x, dict) and "body" in x and "sig" in x)), 14):
        c.malformed("not-an-envelope", json.dumps(value))

    # envelope schema: a missing member, an extra one, a wrong version or member type
    env_errors = st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(["body", "sig"])),
        st.tuples(st.just("extra"), st.text(max_size=10).filter(lambda k: k not in {"v", "body",
                                                                                      "sig"})),
        st.tuples(st.just("v"), st.integers().filter(lambda v: v != 1) | st.text(max_size=5)
                  | st.none() | st.lists(st.integers(), max_size=2)),
        st.tuples(st.just("body"), _not_a_string() | st.dictionaries(st.text(max_size=3),
                                                                     st.integers())),
        st.tuples(st.just("sig"), _not_a_string()),
    )
    for what, value in _draw(env_errors, 20):
        text = c.text(c.body())
        if what == "drop":
            c.malformed("envelope-missing", c.envelope(text, **{value: ...}))
        elif what == "extra":
            c.malformed("envelope-extra-key", c.envelope(text, **{value: 1}))
        else:
            env = json.loads(c.envelope(text))
            env[what] = value
            c.malformed(f"envelope-bad-{what}", json.dumps(env))

    # bad signatures: random bytes, another key, other bytes signed, not base64, a flipped bit
    sigs = st.one_of(
        st.tuples(st.just("random"), st.binary(max_size=140)),
        st.tuples(st.just("other-key"), st.none()),
        st.tuples(st.just("other-bytes"), st.text(max_size=50)),
        st.tuples(st.just("not-base64"), st.text(min_size=1, max_size=100).filter(_not_b64)),
        st.tuples(st.just("bit-flip"), st.integers(0, 511)),
    )
    for what, value in _draw(sigs, 25):
        text = c.text(c.body())
        if what == "random":
            sig = base64.b64encode(value).decode()
        elif what == "other-key":
            sig = c.sig(text, c.other_key)
        elif what == "other-bytes":
            sig = c.sig(text + (value or " "))  # a valid signature of other bytes
        elif what == "not-base64":
            sig = value
        else:
            raw = bytearray(c.key.sign(text.encode()))
            raw[value // 8] ^= 1 << (value % 8)
            sig = base64.b64encode(bytes(raw)).decode()
        c.bad_sig(f"sig-{what}", text, sig)

    # the body altered after signing: one character anywhere replaced by another
    for pos, ch in _draw(st.tuples(st.integers(0, 10_000), st.characters(codec="utf-8")), 30):
        text = c.text(c.body(["cap", "shed", "cancel"][pos % 3]))
        i = pos % len(text)
        new = ch if ch != text[i] else ("x" if text[i] != "x" else "y")
        c.bad_sig("altered-body", text[:i] + new + text[i + 1:], c.sig(text))

    # time windows
    for age in _draw(st.floats(1.0, 1e8), 12):
        c.refused("expired", c.body(issued_at=now - age - 60, expires_at=now - age), "expired")
    for ahead in _draw(st.floats(SKEW_S + 60, 1e8), 10):
        c.refused("issued-in-future", c.body(issued_at=now + ahead, expires_at=now + ahead + 60),
                  "not_yet_valid")
    for extra in _draw(st.floats(1.0, 1e8), 8):
        c.refused("lifetime-too-long", c.body(issued_at=now - 1,
                                              expires_at=now - 1 + MAX_LIFETIME_S + extra),
                  "invalid")
    for ago in _draw(st.floats(1.0, 1e6), 5):  # a cap whose `until` has passed
        c.refused("until-passed", c.body(duration_s=..., until=now - ago), "expired")

    for other in _draw(st.from_regex(TERMINAL_RE, fullmatch=True).filter(lambda t: t != TERMINAL),
                       15):
        c.refused("other-terminal", c.body(["cap", "shed", "cancel"][len(other) % 3],
                                           terminal=other), "wrong_terminal")

    # validly signed, but the body breaks the schema
    float_fields = {"cap": ["issued_at", "expires_at", "cap_kw", "duration_s"],
                    "shed": ["issued_at", "expires_at", "shed_kw", "duration_s"],
                    "cancel": ["issued_at", "expires_at"]}
    str_fields = {"cap": ["id", "terminal"], "shed": ["id", "terminal"],
                  "cancel": ["id", "terminal", "target"]}
    kinds = st.sampled_from(["cap", "shed", "cancel"])
    schema = st.one_of(
        st.tuples(st.just("unknown-type"), kinds, st.text(max_size=12).filter(
            lambda t: t not in TYPES)),
        st.tuples(st.just("missing-field"), kinds, st.integers(0, 5)),
        st.tuples(st.just("wrong-type-number"), kinds, st.tuples(st.integers(0, 3),
                                                                  _not_a_number())),
        st.tuples(st.just("wrong-type-string"), kinds, st.tuples(st.integers(0, 2),
                                                                  _not_a_string())),
        st.tuples(st.just("extra-field"), kinds, st.tuples(
            st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS), _json_values())),
        st.tuples(st.just("bad-id"), kinds, st.one_of(
            st.text(min_size=1, max_size=20).filter(lambda s: not _matches(ID_RE, s)),
            st.text(alphabet="ab", min_size=65, max_size=80))),
        st.tuples(st.just("window-reversed"), kinds, st.floats(0, 1e6)),
    )
    for what, kind, value in _draw(schema, 45):
        body = c.body(kind)
        if what == "unknown-type":
            body["type"] = value
        elif what == "missing-field":
            del body[sorted(body)[value % len(body)]]
        elif what == "wrong-type-number":
            fields = float_fields[kind]
            body[fields[value[0] % len(fields)]] = value[1]
        elif what == "wrong-type-string":
            fields = str_fields[kind]
            body[fields[value[0] % len(fields)]] = value[1]
        elif what == "extra-field":
            body[value[0]] = value[1]
        elif what == "bad-id":
            body["id"] = value
        else:
            body["expires_at"] = body["issued_at"] - value
        c.refused(f"schema-{what}", body, "invalid")

    # out-of-range values
    nonfinite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
    not_positive = st.floats(max_value=0.0, allow_nan=False) | nonfinite
    too_big_kw = st.floats(min_value=1_000_000, exclude_min=True)
    too_long = st.floats(min_value=MAX_DURATION_S, exclude_min=True)
    ranges = st.one_of(
        st.tuples(st.just("cap_kw"), st.just("cap"), not_positive | too_big_kw),
        st.tuples(st.just("duration_s"), kinds.filter(lambda k: k != "cancel"),
                  not_positive | too_long),
        st.tuples(st.just("shed_kw"), st.just("shed"), not_positive | too_big_kw),
        st.tuples(st.just("until"), st.just("cap"), st.floats(MAX_DURATION_S + 1, 1e9)),
    )
    for field, kind, value in _draw(ranges, 35):
        if field == "until":
            body = c.body(kind, duration_s=..., until=now + value)
        else:
            body = c.body(kind, **{field: value})
        c.refused(f"range-{field}", body, "invalid")
    # a shed larger than the site's import: refused by the agent, not the schema
    for shed in _draw(st.floats(max(site_kw, 0) + 1000, 1_000_000), 6):
        c.refused("shed-above-site", c.body("shed", shed_kw=shed), "invalid")

    for target in _draw(st.from_regex(ID_RE, fullmatch=True), 12):
        c.refused("unknown-target", c.body("cancel", target=target), "unknown_target")

    # bounds before any parse: nesting in the envelope or the body (signed or not), size, UTF-8
    nesting = st.tuples(st.sampled_from(["envelope", "body-unsigned", "body-signed"]),
                        st.sampled_from(["[]", "{}"]), st.integers(MAX_NESTING + 1, 2000))
    for where, kind, depth in _draw(nesting, 15):
        deep = _nested(depth, kind)
        if where == "envelope":
            env = c.envelope(c.text(c.body())).decode()
            c.malformed("deep-envelope", env[:-1] + f', "x": {deep}}}')
        elif where == "body-unsigned":
            c.malformed("deep-body-unsigned", c.envelope('{"id":"deep-x","x":' + deep + "}",
                                                         sig="..."))
        else:
            c.malformed("deep-body-signed", c.envelope(deep))
    for size in _draw(st.integers(MAX_PAYLOAD_BYTES + 1, 4 * MAX_PAYLOAD_BYTES), 5):
        valid = c.signed(c.body())  # a valid command, padded (JSON whitespace) past the bound
        c.malformed("oversized", valid + b" " * (size - len(valid)))
    for at, bad in _draw(st.tuples(st.integers(0, 10_000), _invalid_utf8()), 10):
        valid = c.signed(c.body())
        i = at % (len(valid) + 1)
        c.malformed("not-utf8", valid[:i] + bad + valid[i:])

    if DR_EVENTS:  # demand-response events whose signal, value or timing break the schema
        floats = st.floats(allow_nan=True)
        dr = st.one_of(
            st.tuples(st.just("signal"), st.text(max_size=12).filter(lambda x: x not in DR_SIGNALS)),
            st.tuples(st.just("level"), floats.filter(lambda v: v not in (0, 1, 2, 3))),
            st.tuples(st.just("reduction_pct"), floats.filter(lambda v: not 0 < v <= 100)),
            st.tuples(st.sampled_from(["reduction_kw", "cap_kw"]),
                      st.floats(max_value=0) | st.floats(min_value=1_000_000, exclude_min=True)),
            st.tuples(st.just("ramp_s"), st.floats(0.001, 1e7)),
            st.tuples(st.just("randomize_s"), st.floats(max_value=-0.001)
                      | st.floats(min_value=86400, exclude_min=True)),
            st.tuples(st.just("missing"), st.sampled_from(["start", "duration_s", "signal",
                                                           "value"])),
        )
        for what, value in _draw(dr, 20):
            body = c.body("dr_event")
            if what == "signal":
                body["signal"] = value
            elif what == "missing":
                del body[value]
            elif what == "ramp_s":
                body["ramp_s"] = body["duration_s"] + value
            elif what == "randomize_s":
                body["randomize_s"] = value
            else:
                body["signal"], body["value"] = what, value
            c.refused(f"dr-{what}", body, "invalid")


def _not_b64(s: str) -> bool:
    try:
        base64.b64decode(s, validate=True)
    except ValueError:
        return True
    return False


def _matches(pattern: str, s: str) -> bool:
    return re.fullmatch(pattern, s) is not None


def hand_written(c: Corpus, harmless: bytes, harmless_id: str) -> list[bytes]:
    """The hand-written part; returns the replays to send last (after their originals)."""
    now = c.now
    good = c.text(c.body(cid="hand-good"))
    env = json.loads(c.envelope(good))
    for label, payload in [
        ("empty", b""), ("null", "null"), ("true", "true"), ("number", "1"), ("string", '"cmd"'),
        ("list", "[]"), ("empty-object", "{}"), ("not-utf8", b"\xff\xfe\x00{"),
        ("utf16", json.dumps(env).encode("utf-16")), ("nul-bytes", b"\x00" * 64),
        ("trailing-garbage", json.dumps(env) + "}"), ("two-envelopes", json.dumps(env) * 2),
        ("single-quotes", json.dumps(env).replace('"', "'")),
        ("nested-lists", "[" * 100_000 + "]" * 100_000),
        ("nested-objects", '{"a":' * 50_000 + "1" + "}" * 50_000),
        ("nested-in-body", json.dumps(dict(env, body={"x": [[[[[]]]]]}))),
        ("huge-body", json.dumps(dict(env, body=good + " " * 20_000))),
        ("huge-garbage", b"\x8f" * 1_000_000),
        ("huge-json", json.dumps({"v": 1, "body": "x" * 1_000_000, "sig": env["sig"]})),
        ("sig-too-long", json.dumps(dict(env, sig="A" * 400))),
        ("v-2", json.dumps(dict(env, v=2))), ("v-string", json.dumps(dict(env, v="1"))),
        ("v-0", json.dumps(dict(env, v=0))), ("no-body", json.dumps({"v": 1, "sig": env["sig"]})),
        ("no-sig", json.dumps({"v": 1, "body": good})), ("body-object", json.dumps(
            dict(env, body=json.loads(good)))), ("extra-key", json.dumps(dict(env, alg="none"))),
        ("bare-body", good),
        # bounds before any parse (3,000 levels: deeper than Python's recursion limit)
        ("deep-envelope", json.dumps(env)[:-1] + ', "x": ' + _nested(3000, "[]") + "}"),
        ("deep-envelope-objects", json.dumps(dict(env, x=0))[:-2] + _nested(2000, "{}") + "}"),
        ("deep-body-unsigned", '{"v":1,"body":"' + "[" * 3000 + "]" * 3000 + '","sig":"..."}'),
        ("deep-body-unsigned-objects", c.envelope(_nested(2000, "{}"), sig="...")),
        ("deep-body-signed", c.envelope("[" * 3000 + "]" * 3000)),
        ("deep-body-signed-with-id", c.envelope('{"id":"hand-deep","x":' + _nested(3000, "[]")
                                                + "}")),
        ("deep-body-escaped", '{"v":1,"body":"' + "\\u005b" * 2000 + "\\u005d" * 2000
         + '","sig":"..."}'),  # the body's brackets written as JSON escapes in the envelope
        ("deep-body-33", c.envelope('{"id":"hand-33","x":' + _nested(MAX_NESTING, "[]") + "}")),
        ("oversized-valid", c.signed(c.body(cid="hand-oversized")) + b" " * MAX_PAYLOAD_BYTES),
        ("not-utf8-in-body", json.dumps(env).encode().replace(b"hand-good", b"hand-\xff\xfe")),
        ("not-utf8-end", json.dumps(env).encode() + b"\xc3"),
        ("not-utf8-surrogate", json.dumps(env).encode().replace(b"hand-good",
                                                                b"hand-\xed\xa0\x80")),
    ]:
        c.malformed(f"hand-{label}", payload)

    for label, sig in [("empty", ""), ("not-base64", "!!not base64!!"),
                       ("short", base64.b64encode(b"\x00" * 63).decode()),
                       ("zeros", base64.b64encode(b"\x00" * 64).decode()),
                       ("other-key", c.sig(good, c.other_key)),
                       ("of-other-body", c.sig(c.text(c.body()))),
                       ("of-body-plus-space", c.sig(good + " "))]:
        c.bad_sig(f"hand-sig-{label}", good, sig)
    sig = env["sig"]
    for label, text in [("cap-changed", good.replace(f'"cap_kw":{HARMLESS_KW}', '"cap_kw":1.0')),
                        ("terminal-changed", good.replace(TERMINAL, "badcmd-0002")),
                        ("id-changed", good.replace("hand-good", "hand-evil")),
                        ("whitespace-added", good.replace(",", ", ")),
                        ("type-changed", good.replace('"cap"', '"shed"'))]:
        assert text != good, label
        c.bad_sig(f"hand-altered-{label}", text, sig)

    b = c.body
    for label, body, reason in [
        ("expired-1s", b(issued_at=now - 61, expires_at=now - 1), "expired"),
        ("expired-1d", b(issued_at=now - 86_460, expires_at=now - 86_400), "expired"),
        ("future-2min", b(issued_at=now + 120, expires_at=now + 180), "not_yet_valid"),
        ("lifetime-over", b(issued_at=now - 1, expires_at=now + MAX_LIFETIME_S + 1), "invalid"),
        ("terminal-other", b(terminal="badcmd-0002"), "wrong_terminal"),
        ("terminal-case", b(terminal=TERMINAL.upper()), "wrong_terminal"),
        ("terminal-expired", b(terminal="x", expires_at=now - 10, issued_at=now - 20),
         "wrong_terminal"),
        ("terminal-space", b(terminal=TERMINAL + " "), "invalid"),
        ("type-unknown", b(type="boost"), "invalid"),
        ("type-missing", b(type=...), "invalid"),
        ("cap-0", b(cap_kw=0), "invalid"), ("cap-negative", b(cap_kw=-1.0), "invalid"),
        ("cap-too-big", b(cap_kw=1_000_001), "invalid"),
        ("cap-string", b(cap_kw="lots"), "invalid"), ("cap-null", b(cap_kw=None), "invalid"),
        ("cap-both-ends", b(until=now + 60), "invalid"),
        ("cap-no-end", b(duration_s=...), "invalid"),
        ("duration-0", b(duration_s=0), "invalid"), ("duration-negative", b(duration_s=-5),
                                                     "invalid"),
        ("duration-too-long", b(duration_s=MAX_DURATION_S + 1), "invalid"),
        ("shed-0", b("shed", shed_kw=0), "invalid"),
        ("shed-no-duration", b("shed", duration_s=...), "invalid"),
        ("shed-above-site", b("shed", shed_kw=999_999), "invalid"),
        ("cancel-no-target", b("cancel", target=...), "invalid"),
        ("cancel-cap-field", b("cancel", cap_kw=10), "invalid"),
        ("id-empty", b(cid=""), "invalid"), ("id-too-long", b(cid="a" * 65), "invalid"),
        # loads: only names of this terminal's loads that may be shed
        ("cap-load-unknown", b(loads=["no-such-load"]), "invalid"),
        ("cap-load-one-unknown", b(loads=["chiller-1", "ghost"]), "invalid"),
        ("cap-load-critical", b(loads=["server-room"]), "invalid"),
        ("cap-load-twice", b(loads=["chiller-1", "chiller-1"]), "invalid"),
        ("cap-loads-empty", b(loads=[]), "invalid"),
        ("cap-loads-string", b(loads="chiller-1"), "invalid"),
        ("cap-load-bad-name", b(loads=["Chiller 1"]), "invalid"),
        ("cap-load-number", b(loads=[1]), "invalid"),
        ("shed-load-unknown", b("shed", loads=["ghost"]), "invalid"),
        ("shed-load-critical", b("shed", loads=["server-room"]), "invalid"),
        # rounds: 1-8, and one with a load on this terminal (the demo uses rounds 1-6)
        ("remote-round-empty", b("remote", round=8), "invalid"),
        ("remote-round-7", b("remote", round=7, action="close"), "invalid"),
        ("remote-round-0", b("remote", round=0), "invalid"),
        ("remote-round-9", b("remote", round=9), "invalid"),
        ("remote-round-string", b("remote", round="1"), "invalid"),
        ("remote-action", b("remote", action="open"), "invalid"),
        ("remote-delay-16", b("remote", alarm_delay_min=16), "invalid"),
        ("remote-limit-256", b("remote", limit_half_hours=256), "invalid"),
        ("remote-no-round", b("remote", round=...), "invalid"),
        ("guarantee-on-string", b("guarantee", on="yes"), "invalid"),
        ("guarantee-duration", b("guarantee", duration_half_hours=-1), "invalid"),
        ("guarantee-auto", b("guarantee", auto_after_h=256), "invalid"),
        ("modes-empty", b("modes", params={}), "invalid"),
        ("modes-unknown-key", b("modes", params={"boost": 1}), "invalid"),
        ("modes-floor-negative", b("modes", params={"floor_kw": -5.0}), "invalid"),
        ("modes-floor-string", b("modes", params={"floor_kw": "high"}), "invalid"),
        ("modes-remote-twice", b("modes", params={"remote": [
            {"round": 1, "action": "trip", "issued_s": 0.0},
            {"round": 1, "action": "close", "issued_s": 0.0}]}), "invalid"),
        ("modes-params-list", b("modes", params=[1]), "invalid"),
        # brackets, quotes and backslashes inside strings are not nesting: the extra field is
        # what is wrong; and nesting up to the bound is read
        ("brackets-in-string", b(note="[" * 3000 + "{" * 3000), "invalid"),
        ("brackets-escaped-in-string", b(note='\\"[' * 1000 + "\\"), "invalid"),
        ("nested-32", b(note=json.loads(_nested(MAX_NESTING - 1, "[]"))), "invalid"),
        ("cancel-unknown", b("cancel", target="nothing-active"), "unknown_target"),
        ("cancel-refused-one", b("cancel", target="hand-good"), "unknown_target"),
    ]:
        c.refused(f"hand-{label}", body, reason)
    # NaN and Infinity as JSON tokens in a signed body
    for label, field in [("cap-nan", "cap_kw"), ("duration-inf", "duration_s")]:
        text = c.text(c.body(cid=f"hand-{label}")).replace(
            f'"{field}":{HARMLESS_KW if field == "cap_kw" else 600.0}',
            f'"{field}":{"NaN" if "nan" in label else "Infinity"}')
        assert "NaN" in text or "Infinity" in text
        c.add(f"hand-{label}", c.envelope(text), "invalid", f"hand-{label}")

    # replays, sent after everything else: the accepted harmless cap (three times), the same id
    # in a new validly signed body, and commands that were refused after being remembered
    same_id_new_body = c.signed(c.body(cid=harmless_id, cap_kw=HARMLESS_KW + 1))
    refused_late = [x for x in c.cases if x.label in ("hand-shed-above-site", "hand-cancel-unknown",
                                                      "until-passed")]
    replays = [harmless] * 3 + [same_id_new_body] + [x.payload for x in refused_late]
    for x in [harmless_id] * 4 + [x.command_id for x in refused_late]:
        c.add("replayed", b"(sent last)", "replayed", x)
    return replays


# -- the rig ------------------------------------------------------------------------------
class Listener:
    """Results and events of the terminal, de-duplicated by (stream, seq)."""

    def __init__(self, broker: Broker) -> None:
        self.client = _Client("127.0.0.1", broker.port)
        self.client.connect([RESULT, EVENTS])
        self.results: dict[int, dict[str, Any]] = {}
        self.events: dict[int, dict[str, Any]] = {}

    def pump(self) -> None:
        while not self.client.messages.empty():
            batch = json.loads(self.client.messages.get().payload)
            into = self.results if batch["stream"] == "results" else self.events
            for rec in batch["records"]:
                into[rec["seq"]] = rec

    def answers(self, where: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        self.pump()
        return [r for _, r in sorted(self.results.items()) if where(r)]

    def statuses(self, cid: str) -> list[str]:
        return [r["status"] for r in self.answers(lambda r: r["command_id"] == cid)]


def _coils(modbus: ModbusTcpClient) -> list[bool]:
    rr = modbus.read_coils(0, count=8, device_id=2)
    assert not rr.isError()
    return list(rr.bits[:8])


@pytest.fixture
def rig(tmp_path: Path, site: int, broker: Broker) -> Iterator[tuple[AgentThread, Listener, Path]]:
    cfg_path, key = write_agent_config(tmp_path, site, broker.port, terminal={"id": TERMINAL})
    listener = Listener(broker)
    runner = AgentThread(Agent(load_agent_config(cfg_path))).start()
    try:
        yield runner, listener, key
    finally:
        runner.stop()
        listener.client.close()


def test_bad_command_corpus_is_refused_and_actuates_nothing(
        rig: tuple[AgentThread, Listener, Path], site: int, broker: Broker) -> None:
    runner, listener, key_path = rig
    agent = runner.agent
    modbus = ModbusTcpClient("127.0.0.1", port=site)
    assert modbus.connect()
    pub = _Client("127.0.0.1", broker.port)
    pub.connect([])
    try:
        wait_until(lambda: agent.site_kw() is not None and agent.link is not None
                   and agent.link.connected, 30, "a meter reading and the broker")
        site_kw = agent.site_kw()
        assert site_kw is not None and site_kw < HARMLESS_KW / 10
        coils_before = _coils(modbus)
        params_before = agent.mode_params
        assert all(coils_before[:7])

        # the subscription to cmd is live once a probe is answered (probes are left out below)
        probes = iter(range(1000))
        def probe_answered() -> bool:
            pub.publish(CMD, json.dumps({"v": 1, "body": json.dumps({"id": f"probe-{next(probes)}"}),
                                         "sig": ""}))
            return bool(listener.answers(lambda r: str((r["data"] or {}).get("claimed_id"))
                                         .startswith("probe-")))
        wait_until(probe_answered, 20, "the agent to answer on the result topic", interval_s=0.2)

        key = load_private_key(key_path)
        c = Corpus(key, time.time())
        harmless_id = "ok-harmless-1"
        harmless = c.signed(c.body(cid=harmless_id))
        pub.publish(CMD, harmless.decode())
        wait_until(lambda: "accepted" in listener.statuses(harmless_id), 10,
                   "the harmless cap to be accepted")

        t0 = time.monotonic()
        generated(c, site_kw)
        n_generated = len(c.cases)
        replays = hand_written(c, harmless, harmless_id)
        drawn_s = time.monotonic() - t0
        corpus = c.cases
        assert len(corpus) >= 200 and n_generated >= 150 and len(corpus) - n_generated >= 40

        infos = [pub.c.publish(CMD, x.payload, qos=1) for x in corpus if x.label != "replayed"]
        infos += [pub.c.publish(CMD, p, qos=1) for p in replays]
        for info in infos:
            info.wait_for_publish(20)
            assert info.is_published()

        # exactly one `rejected` per command, with the expected reason and ids
        def is_corpus(r: dict[str, Any]) -> bool:
            claimed = (r["data"] or {}).get("claimed_id")
            return r["status"] == "rejected" and not str(claimed).startswith("probe-")
        wait_until(lambda: len(listener.answers(is_corpus)) >= len(corpus), 45,
                   f"{len(corpus)} refusals")
        got = Counter((r["command_id"], r["reason"], (r["data"] or {}).get("claimed_id"))
                      for r in listener.answers(is_corpus))
        want = Counter((x.command_id, x.reason, x.claimed_id) for x in corpus)
        labels = {(x.command_id, x.reason, x.claimed_id): x.label for x in corpus}
        missing = {labels[k]: (k, n) for k, n in (want - got).items()}
        unexpected = dict(got - want)
        assert not missing and not unexpected, (missing, unexpected)
        for r in listener.answers(is_corpus):  # every refusal says why
            assert r["detail"], r
            if r["reason"] in ("malformed", "bad_signature"):
                assert r["command_id"] is None, r
        # and says it in words that name the fault
        said = {"hand-cap-load-unknown": "unknown load 'no-such-load'",
                "hand-cap-load-one-unknown": "unknown load 'ghost'",
                "hand-cap-load-critical": "'server-room' is critical",
                "hand-shed-load-critical": "'server-room' is critical",
                "hand-cap-load-twice": "names a load twice",
                "hand-remote-round-empty": "round 8 has no load",
                "hand-modes-remote-twice": "more than one order for a round"}
        for x in corpus:
            if x.label in said:
                details = [r["detail"] for r in listener.answers(
                    lambda r, cid=x.command_id: r["command_id"] == cid)]
                assert any(said[x.label] in d for d in details), (x.label, details)

        # still healthy: a valid cap (above the site's import) is accepted and executed, then
        # cancelled; the harmless cap is superseded
        final = c.body(cid="ok-final-1")
        pub.publish(CMD, c.signed(final).decode())
        wait_until(lambda: "executed" in listener.statuses("ok-final-1"), 15,
                   "the final cap to execute")
        pub.publish(CMD, c.signed(c.body("cancel", cid="ok-cancel-1", target="ok-final-1")).decode())
        wait_until(lambda: "completed" in listener.statuses("ok-cancel-1"), 15, "the cancel")
        assert listener.statuses("ok-final-1") == ["accepted", "executed", "cancelled"]
        assert [s for s in listener.statuses(harmless_id) if s != "rejected"] == [
            "accepted", "executed", "superseded"]

        # nothing actuated: the relays as before, no load shed, control only for the valid ones
        assert _coils(modbus) == coils_before
        def started() -> set[str]:
            listener.pump()
            return {e["data"]["command_id"] for e in listener.events.values()
                    if e["type"] == "control_started"}
        wait_until(lambda: "ok-final-1" in started(), 10, "the final cap's control_started")
        assert started() == {harmless_id, "ok-final-1"}, started()
        events = list(listener.events.values())
        assert not [e for e in events if e["type"] in ("load_shed", "load_restored",
                                                       "load_adjusted", "switch_failed")
                    or e["type"].startswith("mode_")], events
        # no refused modes/remote/guarantee command changed a mode parameter
        assert agent.mode_params == params_before, agent.mode_params
        # nothing else answered: only the valid commands' life cycles besides the refusals
        others = listener.answers(lambda r: r["status"] != "rejected")
        assert {r["command_id"] for r in others} == {harmless_id, "ok-final-1", "ok-cancel-1"}
        counts = Counter(x.label.split("-")[0] if x.label.startswith("hand") else x.label
                         for x in corpus)
        print(f"corpus {len(corpus)} ({n_generated} generated, drawn in {drawn_s:.1f} s): "
              f"{dict(counts)}")
        print(f"reasons: {dict(Counter(x.reason for x in corpus))}")
    finally:
        pub.close()
        modbus.close()


# -- known hole: non-finite times in a validly signed body ----------------------------------
@pytest.mark.parametrize("field", ["expires_at", "issued_at", "until"])
def test_non_finite_times_are_refused(field: str) -> None:
    key = Ed25519PrivateKey.generate()
    c = Corpus(key, time.time())
    body = c.body(cid="nan-1", **({"duration_s": ..., "until": float("nan")} if field == "until"
                                  else {field: float("nan")}))
    with pytest.raises(Refusal) as refused:
        verify_command(c.signed(body), key.public_key(), TERMINAL, c.now, SKEW_S, MAX_LIFETIME_S)
    assert refused.value.reason == "invalid"
