"""Signed commands: every way a command can be wrong is refused with its reason."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from lmt.agent import security
from lmt.agent.messages import CapCommand, SignedCommand
from lmt.agent.platform import command_body
from lmt.agent.security import (
    Refusal,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_body,
    verify_command,
)

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def verify(payload: str | bytes, pub: Path, now: float = NOW):  # type: ignore[no-untyped-def]
    raw = payload.encode() if isinstance(payload, str) else payload
    return verify_command(raw, load_public_key(pub), "t1", now, clock_skew_s=30,
                          max_lifetime_s=3600)


def body(**kw: object) -> dict:
    return command_body("cap", kw.pop("terminal", "t1"), issued_at=NOW, cap_kw=100.0,  # type: ignore[arg-type]
                        duration_s=60.0, **kw)


def test_valid_command(keys: tuple[Path, Path]) -> None:
    key, pub = keys
    cmd = verify(sign_body(load_private_key(key), body(command_id="c1")), pub)
    assert isinstance(cmd, CapCommand) and cmd.id == "c1" and cmd.cap_kw == 100.0


def test_private_key_mode(keys: tuple[Path, Path]) -> None:
    assert keys[0].stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        generate_keypair(keys[0].parent)


def reason(payload: str | bytes, pub: Path, now: float = NOW) -> str:
    with pytest.raises(Refusal) as ei:
        verify(payload, pub, now)
    return ei.value.reason


def test_refusals(keys: tuple[Path, Path], tmp_path: Path) -> None:
    key, pub = keys
    k = load_private_key(key)
    good = json.loads(sign_body(k, body(command_id="c2")))
    # altered payload, signature kept
    tampered = dict(good, body=good["body"].replace('"cap_kw":100.0', '"cap_kw":900.0'))
    assert tampered["body"] != good["body"]
    assert reason(json.dumps(tampered), pub) == "bad_signature"
    # signed by another key
    other_key, _ = generate_keypair(tmp_path / "other")
    assert reason(sign_body(load_private_key(other_key), body()), pub) == "bad_signature"
    # signature missing or not base64
    assert reason(json.dumps({"v": 1, "body": good["body"]}), pub) == "malformed"
    assert reason(json.dumps(dict(good, sig="***")), pub) == "bad_signature"
    assert reason(b"not json", pub) == "malformed"
    assert reason(b"\xff\xfe", pub) == "malformed"
    # another terminal
    assert reason(sign_body(k, body(terminal="t2")), pub) == "wrong_terminal"
    # expired, from the future, too long a lifetime
    assert reason(sign_body(k, body()), pub, now=NOW + 61) == "expired"
    assert reason(sign_body(k, body()), pub, now=NOW - 31) == "not_yet_valid"
    assert reason(sign_body(k, body(expires_in_s=7200)), pub) == "invalid"
    # schema violations, correctly signed
    bad = body()
    bad["cap_kw"] = -5
    assert reason(sign_body(k, bad), pub) == "invalid"
    bad = body()
    bad["type"] = "explode"
    assert reason(sign_body(k, bad), pub) == "invalid"
    both = body(until=NOW + 30)
    assert reason(sign_body(k, both), pub) == "invalid"


def test_refusal_carries_id_when_readable(keys: tuple[Path, Path]) -> None:
    key, pub = keys
    good = json.loads(sign_body(load_private_key(key), body(command_id="c3")))
    good["sig"] = base64.b64encode(b"\0" * 64).decode()
    with pytest.raises(Refusal) as ei:
        verify(json.dumps(good), pub)
    assert ei.value.command_id == "c3"


# -- bounds before any parse: size, nesting, encoding ------------------------------------------

def signed_text(key: Path, text: str) -> str:
    """An envelope around ``text`` signed as it is (any text, not only a command body)."""
    sig = base64.b64encode(load_private_key(key).sign(text.encode())).decode()
    return json.dumps({"v": 1, "body": text, "sig": sig})


def nested(depth: int, kind: str = "[]") -> str:
    return "[" * depth + "]" * depth if kind == "[]" else '{"a":' * depth + "1" + "}" * depth


def refusal(payload: str | bytes, pub: Path) -> Refusal:
    with pytest.raises(Refusal) as ei:
        verify(payload, pub)
    return ei.value


def deep_payload(key: Path, where: str, kind: str) -> str:
    deep = nested(2000, kind)  # > the recursion limit; a {} body stays under 16384 chars
    good = sign_body(load_private_key(key), body(command_id="deep-1"))
    return {
        # the nesting in the envelope itself, and as the whole message
        "envelope": good[:-1] + f', "x": {deep}}}',
        "message": deep,
        # in the body text: unsigned (the id peek used to recurse) and validly signed
        "body-unsigned": '{"v":1,"body":' + json.dumps(deep) + ',"sig":"..."}',
        "body-signed": signed_text(key, deep),
        "body-signed-with-id": signed_text(key, '{"id":"deep-2","x":' + deep + "}"),
    }[where]


@pytest.mark.parametrize("kind", ["[]", "{}"])
@pytest.mark.parametrize("where", ["envelope", "message", "body-unsigned", "body-signed",
                                   "body-signed-with-id"])
def test_deep_nesting_is_refused_before_any_parse(keys: tuple[Path, Path], where: str,
                                                  kind: str) -> None:
    key, pub = keys
    payload = deep_payload(key, where, kind)
    assert len(payload) < security.MAX_PAYLOAD_BYTES
    r = refusal(payload, pub)
    assert r.reason == "malformed", r
    assert f"deeper than {security.MAX_NESTING} levels" in r.detail, r
    assert r.command_id is None


@pytest.mark.parametrize(("text", "deep"), [
    ("[" * 33, True), ("[" * 32, False), ("[]" * 1000, False), ('{"a":' * 33, True),
    ('"' + "[" * 40 + '"', False),  # inside a string
    ('"\\"' + "[" * 40 + '"', False),  # \" does not end the string
    ('"\\\\"' + "[" * 40, True),  # \\ is one backslash: the quote after it ends the string
    ('"' + "[" * 40, False),  # an unterminated string runs to the end
    ("]" * 40 + "[" * 32, False), ("]" * 40 + "[" * 33, True),  # closers with nothing open
    ("[" * 20 + "]" * 20 + "{" * 20 + "}" * 20, False),
])
def test_too_deep(text: str, deep: bool) -> None:
    assert security.too_deep(text) is deep


def test_nesting_is_counted_outside_strings_only(keys: tuple[Path, Path]) -> None:
    key, pub = keys
    k = load_private_key(key)
    # brackets, quotes and backslashes inside strings are text: the extra field is what is wrong
    for text in ["[" * 3000, "{" * 3000, '\\"[' * 1000, '"[\\' * 1000 + "\\", "\\\\[" * 1000]:
        r = refusal(sign_body(k, body(command_id="str-1", note=text)), pub)
        assert (r.reason, r.command_id) == ("invalid", "str-1"), (text[:6], r)
    # exactly the bound is read; one more level is not
    inner = security.MAX_NESTING - 1  # the body's own object is the first level
    r = refusal(sign_body(k, body(command_id="lvl-1", note=json.loads(nested(inner)))), pub)
    assert (r.reason, r.command_id) == ("invalid", "lvl-1")
    r = refusal(sign_body(k, body(command_id="lvl-2", note=json.loads(nested(inner + 1)))), pub)
    assert r.reason == "malformed" and "deeper than" in r.detail


def test_oversized_payload_is_refused(keys: tuple[Path, Path]) -> None:
    key, pub = keys
    good = sign_body(load_private_key(key), body(command_id="big-1"))
    at_limit = good + " " * (security.MAX_PAYLOAD_BYTES - len(good))
    assert verify(at_limit, pub).id == "big-1"  # whitespace is JSON: the bound itself is fine
    r = refusal(at_limit + " ", pub)
    assert r.reason == "malformed" and f"{security.MAX_PAYLOAD_BYTES}" in r.detail
    assert refusal(b"[" * 1_000_000, pub).reason == "malformed"


def test_the_largest_body_fits_the_payload_bound() -> None:
    # every character of a body of the largest size escaped (\" or \\), plus the envelope
    largest = json.dumps({"v": 1, "body": '"' * security.MAX_BODY_CHARS, "sig": "A" * 200})
    assert len(largest) <= security.MAX_PAYLOAD_BYTES
    SignedCommand(body=" " * security.MAX_BODY_CHARS, sig="")  # the model's own bound, exactly
    with pytest.raises(ValueError):
        SignedCommand(body=" " * (security.MAX_BODY_CHARS + 1), sig="")


def test_invalid_utf8_is_refused(keys: tuple[Path, Path]) -> None:
    key, pub = keys
    good = sign_body(load_private_key(key), body(command_id="utf-1")).encode()
    for payload in [b"\xff\xfe", good.replace(b"utf-1", b"utf-\xff"), good[:-1] + b"\xc3",
                    good.replace(b'\\"cap\\"', b'\\"\xed\xa0\x80\\"')]:  # a surrogate, in UTF-8
        r = refusal(payload, pub)
        assert r.reason == "malformed" and "UTF-8" in r.detail, (payload[-20:], r)


def test_the_id_peek_never_raises() -> None:
    for text in [nested(3000), nested(3000, "{}"), '{"id":' + nested(5000) + "}", "\ud800",
                 "", "[" * 100_000, "\xff" * 20_000]:
        assert security._peek_id(text) is None


_JSONISH = st.text(alphabet='[]{}"\\,:01 a\x00\u00e9', max_size=400)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=600),
    _JSONISH.map(str.encode),
    _JSONISH.map(lambda t: json.dumps({"v": 1, "body": t, "sig": ""}).encode()),
    st.integers(0, 5000).map(lambda n: ('{"v":1,"body":"' + "[" * n + "]" * n
                                        + '","sig":"..."}').encode()),
))
def test_any_bytes_are_refused_with_a_refusal(payload: bytes) -> None:
    pub = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(Refusal) as ei:
        verify_command(payload, pub, "t1", NOW, clock_skew_s=30, max_lifetime_s=3600)
    assert ei.value.reason in ("malformed", "bad_signature") and ei.value.detail
