"""Device profiles: what a device holds (register maps), never where it is.

A profile is a TOML file in ``config/profile_library/<vendor>-<model>.toml`` (the shipped
library, installed as the data package ``lmt.config.profile_library``), one entry per point.
Connection settings (host, port, device id) live in the site configuration that binds a
profile to a bus and an address.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ConfigError, load_toml

# The shipped library, beside this module (and not named like it).
PROFILE_DIR = Path(__file__).parent / "profile_library"


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
        return _REGISTERS[self]


_REGISTERS = {DataType.BOOL: 1, DataType.INT16: 1, DataType.UINT16: 1, DataType.INT32: 2,
              DataType.UINT32: 2, DataType.INT64: 4, DataType.UINT64: 4, DataType.FLOAT32: 2,
              DataType.FLOAT64: 4}


class Point(BaseModel):
    """One named value of a device.

    A Modbus point has ``table``, ``address`` and ``type``; a DL/T 645 point has ``di`` and
    ``format`` (and ``byte_offset`` when several points share a block DI). Engineering value =
    raw × ``multiplier`` + ``offset``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$",
                      description="point name, unit in the name: power_w, energy_kwh")
    unit: str = ""
    description: str = ""
    multiplier: float = 1.0
    offset: float = 0.0
    poll: Literal["fast", "slow"] = Field(
        default="fast", description="fast: every cycle (power); slow: slow_interval_s (energy)")
    writable: bool = False
    # -- Modbus --
    table: Table | None = None
    address: int | None = Field(default=None, ge=0, le=0xFFFF,
                                description="0-based protocol address")
    type: DataType | None = None
    word_order: Literal["big", "little"] = Field(
        default="big", description="big: high word first (Modbus convention)")
    byte_order: Literal["big", "little"] = Field(
        default="big", description="byte order inside each 16-bit register")
    bit: int | None = Field(default=None, ge=0, le=63,
                            description="a bit field: the value is this bit of the integer")
    invalid: tuple[int, ...] = Field(
        default=(), description="raw values that mean 'not available' (decoded as null)")
    barrier: bool = Field(default=False,
                          description="a block read never spans into this point from below")
    # -- DL/T 645-2007 --
    di: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f]{8}$",
                           description="data identifier DI3 DI2 DI1 DI0 as 8 hex digits")
    format: str | None = Field(default=None, pattern=r"^X+(\.X+)?$",
                               description="BCD layout, e.g. XXXXXX.XX (4 bytes, 2 decimals)")
    signed: bool = Field(default=False, description="bit 7 of the top byte is the sign")
    byte_offset: int = Field(default=0, ge=0, le=0xFFFF,
                             description="where the point's bytes start in its DI's data (points "
                                         "sharing a block DI such as 0201FF00)")

    @model_validator(mode="after")
    def _check_kind(self) -> Point:
        if self.di is not None:
            if self.format is None:
                raise ValueError("a DL/T 645 point (di) needs a format, e.g. 'XXXXXX.XX'")
            if len(self.format.replace(".", "")) % 2:
                raise ValueError("format must have an even number of digits (whole bytes)")
            if self.table is not None or self.address is not None or self.type is not None:
                raise ValueError("a DL/T 645 point (di) has no table, address or type")
            return self
        if self.byte_offset:
            raise ValueError("byte_offset applies to DL/T 645 points (di) only")
        missing = [k for k in ("table", "address", "type") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a Modbus point needs {', '.join(missing)} "
                             "(or di and format for DL/T 645)")
        assert self.table is not None and self.type is not None and self.address is not None
        if self.table.is_bit and self.type is not DataType.BOOL:
            raise ValueError(f"a {self.table.value} point must have type 'bool'")
        if not self.table.is_bit and self.type is DataType.BOOL:
            raise ValueError(f"a {self.table.value} register point cannot have type 'bool' "
                             "(use an integer type with bit = N for a bit field)")
        if self.bit is not None and self.type in (DataType.BOOL, DataType.FLOAT32,
                                                  DataType.FLOAT64):
            raise ValueError("bit applies to integer register types only")
        if self.bit is not None and self.bit >= 16 * self.type.registers:
            raise ValueError(f"bit {self.bit} is outside a {self.type.value}")
        if self.address + self.type.registers - 1 > 0xFFFF:
            raise ValueError("point runs past address 65535")
        return self

    @property
    def size(self) -> int:
        """Registers (or bits) a Modbus point occupies."""
        assert self.type is not None
        return self.type.registers

    @property
    def is_bool(self) -> bool:
        return self.type is DataType.BOOL or self.bit is not None

    @property
    def dlt_bytes(self) -> int:
        assert self.format is not None
        return len(self.format.replace(".", "")) // 2

    @property
    def dlt_decimals(self) -> int:
        assert self.format is not None
        return len(self.format.split(".")[1]) if "." in self.format else 0


class Profile(BaseModel):
    """A device's register map, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", description="kebab-case profile id")
    vendor: str
    model: str
    kind: Literal["meter", "relay", "load"]
    protocol: Literal["modbus", "dlt645"] = "modbus"
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

    @model_validator(mode="after")
    def _points_match_protocol(self) -> Profile:
        for i, p in enumerate(self.points):
            if (p.di is not None) != (self.protocol == "dlt645"):
                want = "di and format" if self.protocol == "dlt645" else "table, address, type"
                raise ValueError(f"points[{i}] ({p.name}): a {self.protocol} profile's points "
                                 f"have {want}")
        return self

    @model_validator(mode="after")
    def _di_slices_apart(self) -> Profile:
        """Points sharing a DI (a block DI) each decode their own bytes: no two overlap."""
        by_di: dict[str, list[Point]] = {}
        for p in self.points:
            if p.di is not None:
                by_di.setdefault(p.di.upper(), []).append(p)
        for di, points in by_di.items():
            points.sort(key=lambda p: p.byte_offset)
            for a, b in pairwise(points):
                if b.byte_offset < a.byte_offset + a.dlt_bytes:
                    raise ValueError(
                        f"points {a.name} and {b.name} share DI {di} and overlap (bytes from "
                        f"{a.byte_offset} and {b.byte_offset}, {a.name} takes {a.dlt_bytes}): "
                        "give each its own byte_offset")
        return self

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
