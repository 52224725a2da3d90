"""docs/schemas/ must match the payload models, and take the bodies the platform signs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import TypeAdapter, ValidationError

from lmt.agent.messages import Command
from lmt.agent.platform import command_body, dr_event_body
from lmt.agent.schemas import check_schemas, render_schemas
from lmt.agent.security import sign_body

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_schemas_are_current() -> None:
    stale = check_schemas(DOCS)
    assert not stale, f"stale schemas {stale}: run `lmt schemas --out docs/schemas`"


def test_every_payload_has_a_schema() -> None:
    assert set(render_schemas()) == {f"{n}.schema.json" for n in
                                     ("status", "telemetry", "events", "result", "intervals", "bills", "cmd",
                                      "command-body")}


def test_check_detects_staleness(tmp_path: Path) -> None:
    from lmt.agent.schemas import write_schemas

    write_schemas(tmp_path)
    assert check_schemas(tmp_path) == []
    (tmp_path / "status.schema.json").write_text("{}")
    assert check_schemas(tmp_path) == ["status.schema.json"]


# -- the command-body schema takes the bodies the platform signs, and refuses bad ones ------
T = "demo-0001"
NOW = time.time()
_command = TypeAdapter(Command)  # what the agent validates a body with (security.py)


def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((DOCS / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _good_bodies() -> dict[str, dict[str, Any]]:
    return {
        "cap": command_body("cap", T, cap_kw=130.0, duration_s=20.0),
        "cap until, loads": command_body("cap", T, cap_kw=130, until=NOW + 3600,
                                         loads=["chiller-1", "ev-chargers"], issued_at=NOW),
        "shed": command_body("shed", T, shed_kw=40.0, duration_s=1800.0),
        "shed loads": command_body("shed", T, shed_kw=40.0, duration_s=1800.0,
                                   loads=["chiller-1"]),
        **{f"dr_event {sig}": dr_event_body(T, start=NOW + 60, duration_s=7200, signal=sig,
                                            value=val, randomize_s=300, ramp_s=600,
                                            recovery_s=900)
           for sig, val in (("level", 2), ("reduction_kw", 25), ("reduction_pct", 20),
                            ("cap_kw", 150))},
        "cancel": command_body("cancel", T, target="7d1e-42"),
        "modes": command_body("modes", T, params={"floor_kw": 50, "power": {"slide_min": 5}}),
        "remote trip": command_body("remote", T, round=2, action="trip", alarm_delay_min=3,
                                    limit_half_hours=4),
        "remote close": command_body("remote", T, round=8, action="close"),
        "guarantee on": command_body("guarantee", T, on=True, duration_half_hours=6,
                                     auto_after_h=48),
        "guarantee off": command_body("guarantee", T, on=False),
    }


@pytest.mark.parametrize("name", list(_good_bodies()))
def test_real_command_bodies_match_the_schemas(name: str) -> None:
    body = _good_bodies()[name]
    msg = json.loads(sign_body(Ed25519PrivateKey.generate(), body))  # as the platform sends it
    assert not list(_validator("cmd").iter_errors(msg))
    errors = [e.message for e in _validator("command-body").iter_errors(json.loads(msg["body"]))]
    assert not errors, errors
    _command.validate_json(msg["body"])  # and the agent takes it


def _bad(name: str, base: str, **change: Any) -> tuple[str, dict[str, Any]]:
    body = dict(_good_bodies()[base])
    for k, v in change.items():
        if v is ...:
            del body[k]
        else:
            body[k] = v
    return name, body


BAD = dict([
    ("wrapped in an envelope", {"command": _good_bodies()["cap"]}),
    _bad("unknown type", "cap", type="boost"),
    _bad("no type", "cap", type=...),
    _bad("unknown field", "cap", priority=1),
    _bad("no id", "cap", id=...),
    _bad("bad id", "cap", id="a b"),
    _bad("bad terminal", "cap", terminal="-x"),
    _bad("issued_at a string", "cap", issued_at="1796000000"),
    _bad("cap_kw a string", "cap", cap_kw="130"),
    _bad("cap_kw a boolean", "cap", cap_kw=True),
    _bad("cap_kw zero", "cap", cap_kw=0),
    _bad("cap without an end", "cap", duration_s=...),
    _bad("cap with both ends", "cap", until=NOW + 60),
    _bad("cap with a null end only", "cap", duration_s=None, until=None),
    _bad("loads empty", "cap", loads=[]),
    _bad("load twice", "shed loads", loads=["chiller-1", "chiller-1"]),
    _bad("load name", "shed loads", loads=["Chiller 1"]),
    _bad("shed without duration", "shed", duration_s=...),
    _bad("shed longer than 7 days", "shed", duration_s=8 * 86400.0),
    _bad("level 5", "dr_event level", value=5.0),
    _bad("level 1.5", "dr_event level", value=1.5),
    _bad("reduction_kw 0", "dr_event reduction_kw", value=0.0),
    _bad("cap_kw signal 0", "dr_event cap_kw", value=0.0),
    _bad("reduction_pct 150", "dr_event reduction_pct", value=150.0),
    _bad("unknown signal", "dr_event level", signal="price"),
    _bad("cancel without target", "cancel", target=...),
    _bad("modes without params", "modes", params={}),
    _bad("round 9", "remote trip", round=9),
    _bad("round 2.5", "remote trip", round=2.5),
    _bad("unknown action", "remote trip", action="open"),
    _bad("alarm delay 16", "remote trip", alarm_delay_min=16),
    _bad("guarantee on a string", "guarantee on", on="yes"),
    _bad("auto_after_h 256", "guarantee on", auto_after_h=256),
])


@pytest.mark.parametrize("name", list(BAD))
def test_bad_command_bodies_fail_the_schema_and_the_agent(name: str) -> None:
    body = BAD[name]
    assert list(_validator("command-body").iter_errors(body)), "the schema takes it"
    with pytest.raises(ValidationError):
        _command.validate_json(json.dumps(body))
