"""lmt.agent: the daemon. Owns asyncio, SQLite and MQTT, and wires the other packages."""

from importlib.metadata import PackageNotFoundError, version


def lmt_version() -> str:
    """The installed lmt-edge version."""
    try:
        return version("lmt-edge")
    except PackageNotFoundError:
        return "0+unknown"
