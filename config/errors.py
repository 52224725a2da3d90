"""Configuration errors that name the file, the key path and what was expected."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration file could not be read or did not validate.

    ``problems`` holds one ``(key_path, message)`` pair per problem found.
    """

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]) -> None:
        self.path = str(path)
        self.problems = problems
        lines = [f"{self.path}: {key}: {msg}" if key else f"{self.path}: {msg}"
                 for key, msg in problems]
        super().__init__("\n".join(lines))


def key_path(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as a TOML-style key path: ``devices[1].port``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: dict[str, Any]) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        return "missing (required)"
    if err["type"] == "extra_forbidden":
        return f"unknown key (got {err['input']!r}); check the spelling against docs/configuration.md"
    got = err.get("input")
    if isinstance(got, dict | list):
        return msg
    return f"{msg} (got {got!r})"


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        problems.append((key_path(loc), _describe(dict(err))))
    return problems


def read_toml(path: Path | str) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(p, [("", "file not found")]) from None
    except PermissionError:
        raise ConfigError(p, [("", "permission denied")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(p, [("", f"not valid TOML: {exc}")]) from None


def validate(path: Path | str, data: dict[str, Any], model: type[M],
             context: dict[str, Any] | None = None) -> M:
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(path, validation_problems(exc)) from None


def load_toml(path: Path | str, model: type[M], context: dict[str, Any] | None = None) -> M:
    """Read and validate a TOML file; raise :class:`ConfigError` naming file and key."""
    return validate(path, read_toml(path), model, context)
