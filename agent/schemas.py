"""JSON Schemas of the MQTT payloads, generated from the pydantic models in messages.py."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import TypeAdapter

from .messages import SCHEMA_MODELS


def render_schemas() -> dict[str, str]:
    """File name -> JSON text, one schema per payload."""
    out = {}
    for name, model in SCHEMA_MODELS.items():
        schema = TypeAdapter(model).json_schema()  # a model, or a type such as Command
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "$id": f"lmt-edge/mqtt/{name}.schema.json", **schema}
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in render_schemas().items():
        p = directory / fname
        p.write_text(text)
        written.append(p)
    return written


def check_schemas(directory: Path) -> list[str]:
    """Names of schema files that are missing or differ from the models."""
    stale = []
    for fname, text in render_schemas().items():
        p = directory / fname
        if not p.exists() or p.read_text() != text:
            stale.append(fname)
    return stale
