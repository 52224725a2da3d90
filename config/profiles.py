"""Device profiles: what a device holds (register maps), never where it is.

A profile is a TOML file in ``config/profiles/<vendor>-<model>.toml``, one entry per point.
Connection settings (host, port, device id) live in the site configuration that binds a
profile to a bus and an address.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ConfigError, load_toml

PROFILE_DIR = Path(__file__).parent / "profiles"


class Table(StrEnum):
    COIL = "coil"
    DISCRETE = "discrete"
    HOLDING = "holding"
    INPUT = "input"

    @property
    def is_bit(self) -> bool:
        return self in (Table.COIL, Table.DISCRETE)


class DataType(StrEnum):
    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def registers(self) -> int:
        """How many 16-bit registers (or bits, for bool) one value occupies."""
        return {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4,
                "uint64": 4, "float32": 2, "float64": 4}[self.value]


class Point(BaseModel):
    """One named value of a device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$",
                      description="point name, unit in the name: power_w, energy_kwh")
    table: Table
    address: int = Field(ge=0, le=0xFFFF, description="0-based protocol address")
    type: DataType
    word_order: Literal["big", "little"] = "big"
    multiplier: float = 1.0
    unit: str = ""
    writable: bool = False
    description: str = ""

    @model_validator(mode="after")
    def _check_type_table(self) -> Point:
        if self.table.is_bit and self.type is not DataType.BOOL:
            raise ValueError(f"a {self.table.value} point must have type 'bool'")
        if not self.table.is_bit and self.type is DataType.BOOL:
            raise ValueError(f"a {self.table.value} register point cannot have type 'bool'")
        if self.address + self.type.registers - 1 > 0xFFFF:
            raise ValueError("point runs past address 65535")
        return self

    @property
    def size(self) -> int:
        return self.type.registers


class Profile(BaseModel):
    """A device's register map, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", description="kebab-case profile id")
    vendor: str
    model: str
    kind: Literal["meter", "relay", "load"]
    source: str = Field(min_length=1, description="where the register map comes from")
    max_gap: int = Field(default=8, ge=0, le=100,
                         description="unused registers a block read may bridge")
    points: tuple[Point, ...] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        """Fill each point from the optional ``[defaults]`` table."""
        if isinstance(data, dict) and "defaults" in data:
            data = dict(data)
            defaults = data.pop("defaults")
            if not isinstance(defaults, dict):
                raise ValueError("[defaults] must be a table")
            points = data.get("points")
            if isinstance(points, list):
                data["points"] = [{**defaults, **p} if isinstance(p, dict) else p
                                  for p in points]
        return data

    @field_validator("points")
    @classmethod
    def _unique_names(cls, points: tuple[Point, ...]) -> tuple[Point, ...]:
        seen: set[str] = set()
        for p in points:
            if p.name in seen:
                raise ValueError(f"point name {p.name!r} is used twice")
            seen.add(p.name)
        return points

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"profile {self.id!r} has no point {name!r}")

    def has_point(self, name: str) -> bool:
        return any(p.name == name for p in self.points)


def load_profile_file(path: Path | str) -> Profile:
    profile = load_toml(path, Profile)
    stem = Path(path).stem
    if profile.id != stem:
        raise ConfigError(path, [("id", f"must match the file name {stem!r} (got {profile.id!r})")])
    return profile


def available_profiles(extra_dirs: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Profile id -> file, from the shipped library and any extra directories (later wins)."""
    found: dict[str, Path] = {}
    for d in (PROFILE_DIR, *extra_dirs):
        for f in sorted(Path(d).glob("*.toml")):
            found[f.stem] = f
    return found


@cache
def _load_cached(path: str, mtime: float) -> Profile:
    return load_profile_file(path)


def load_profile(profile_id: str, extra_dirs: tuple[Path, ...] = ()) -> Profile:
    """Load a profile by id from the library (and ``extra_dirs``)."""
    files = available_profiles(extra_dirs)
    if profile_id not in files:
        known = ", ".join(sorted(files)) or "none"
        raise KeyError(f"unknown profile {profile_id!r} (known: {known})")
    f = files[profile_id]
    return _load_cached(str(f), f.stat().st_mtime)
