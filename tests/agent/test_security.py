"""Signed commands: every way a command can be wrong is refused with its reason."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from lmt.agent.messages import CapCommand
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
