"""Record bodies built through the models: what the agent stores is what the contract says."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel, ValidationError

from lmt.agent.messages import (
    Event,
    EventBody,
    EventType,
    Reading,
    ReadingBody,
    Result,
    ResultBody,
    event_body,
    reading_body,
    result_body,
)
from lmt.control.modes import KINDS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _published(stream: str, body: dict[str, Any], seq: int = 7) -> dict[str, Any]:
    """The record as the buffer publishes it: the stored JSON text with ``seq`` put first
    (agent/buffer.py, ``pending_batch``)."""
    text = json.dumps(body, separators=(",", ":"))
    return json.loads('{"seq":' + str(seq) + "," + text[1:])


def _batch_problems(schema: str, stream: str, rec: dict[str, Any]) -> list[str]:
    doc = json.loads((DOCS / "schemas" / f"{schema}.schema.json").read_text())
    batch = {"terminal": "demo-0001", "stream": stream, "historical": False, "records": [rec]}
    return [e.message for e in jsonschema.validators.validator_for(doc)(doc).iter_errors(batch)]


def test_reading_body_is_what_the_agent_stored() -> None:
    values = {f"p{i}": 1.5 * i for i in range(17)} | {"count": 3, "relay_1": True, "bad": None}
    body = reading_body(1796000001.25, "main-meter", values)
    assert list(body) == ["ts", "device", "values"]
    # the same JSON, byte for byte, as the dict the agent builds by hand
    assert json.dumps(body) == json.dumps({"ts": 1796000001.25, "device": "main-meter",
                                           "values": values})
    assert body["values"]["count"] == 3 and type(body["values"]["count"]) is int
    rec = _published("telemetry", body)
    assert Reading.model_validate(rec).seq == 7
    assert not _batch_problems("telemetry", "telemetry", rec)


@pytest.mark.parametrize("ts, device, values", [
    ("1796000001", "m", {}),                 # a string is not a time
    (True, "m", {}),
    (math.nan, "m", {}),                      # JSON has no NaN
    (1.0, 7, {}),
    (1.0, "m", {"power_w": "12"}),
    (1.0, "m", {"power_w": math.inf}),
    (1.0, "m", [("power_w", 1.0)]),
])
def test_reading_body_refuses_what_breaks_the_contract(ts: Any, device: Any, values: Any) -> None:
    with pytest.raises(ValidationError):
        reading_body(ts, device, values)


def test_event_body() -> None:
    body = event_body("load_shed", 1796000002.0, {"load": "chiller-1", "site_kw": 180.2,
                                                  "command_id": None})
    assert body == {"ts": 1796000002.0, "type": "load_shed",
                    "data": {"load": "chiller-1", "site_kw": 180.2, "command_id": None}}
    assert list(body) == ["ts", "type", "data"]
    assert event_body("agent_started", 5.0) == {"ts": 5.0, "type": "agent_started", "data": {}}
    rec = _published("events", body, seq=3)
    assert Event.model_validate(rec).type == "load_shed"
    assert not _batch_problems("events", "events", rec)
    for bad in ({"type": "load_dropped"}, {"data": ["x"]}, {"ts": "now"}):
        kw = {"type_": "load_shed", "ts": 1.0, "data": {}}
        kw.update({("type_" if k == "type" else k): v for k, v in bad.items()})
        with pytest.raises(ValidationError):
            event_body(**kw)
    assert _batch_problems("events", "events", _published(
        "events", {"ts": 1.0, "type": "load_dropped", "data": {}}))


def test_result_body() -> None:
    body = result_body("7d1e", "accepted", 1796000003.0, detail="cap 130 kW for 20 s")
    assert body == {"ts": 1796000003.0, "command_id": "7d1e", "status": "accepted",
                    "reason": None, "detail": "cap 130 kW for 20 s", "data": {}}
    assert list(body) == ["ts", "command_id", "status", "reason", "detail", "data"]
    refused = result_body(None, "rejected", 1.0, reason="bad_signature",
                          detail="signature does not verify", data={"claimed_id": "7d1e"})
    for b in (body, refused):
        rec = _published("results", b)
        Result.model_validate(rec)
        assert not _batch_problems("result", "results", rec)
    with pytest.raises(ValidationError):
        result_body("7d1e", "done", 1.0)
    with pytest.raises(ValidationError):
        result_body("7d1e", "rejected", 1.0, reason="nope")
    with pytest.raises(ValidationError):
        result_body(7, "accepted", 1.0)


@pytest.mark.parametrize("body, published", [(ReadingBody, Reading), (EventBody, Event),
                                             (ResultBody, Result)])
def test_published_records_are_the_bodies_plus_seq(body: type[BaseModel],
                                                   published: type[BaseModel]) -> None:
    assert issubclass(published, body)
    assert list(published.model_fields) == ["seq", *body.model_fields]
    assert "seq" not in body.model_fields


def test_event_types() -> None:
    types = set(typing.get_args(EventType))
    assert {f"mode_{k}" for k in KINDS} <= types  # every terminal control mode decision
    doc = (DOCS / "mqtt.md").read_text()
    events = doc[doc.index("### Events"):doc.index("### Command results")]
    undocumented = [t for t in sorted(types) if f"`{t}`" not in events
                    and not (t.startswith("mode_") and f"`{t[5:]}`" in events)]
    assert not undocumented, f"event types missing from docs/mqtt.md, Events: {undocumented}"
