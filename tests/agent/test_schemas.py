"""docs/schemas/ must match the payload models."""

from __future__ import annotations

from pathlib import Path

from lmt.agent.schemas import check_schemas, render_schemas

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_schemas_are_current() -> None:
    stale = check_schemas(DOCS)
    assert not stale, f"stale schemas {stale}: run `lmt schemas --out docs/schemas`"


def test_every_payload_has_a_schema() -> None:
    assert set(render_schemas()) == {f"{n}.schema.json" for n in
                                     ("status", "telemetry", "events", "result", "cmd",
                                      "command-body")}


def test_check_detects_staleness(tmp_path: Path) -> None:
    from lmt.agent.schemas import write_schemas

    write_schemas(tmp_path)
    assert check_schemas(tmp_path) == []
    (tmp_path / "status.schema.json").write_text("{}")
    assert check_schemas(tmp_path) == ["status.schema.json"]
