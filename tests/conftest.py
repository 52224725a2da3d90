"""Shared fixtures: a real mosquitto on a free loopback port, and the `lmt` program."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w

from lmt.agent.broker import MOSQUITTO_HINT, Broker, find_mosquitto, free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "config" / "examples"


def lmt_argv(*args: str) -> list[str]:
    """The installed `lmt` program, run with this interpreter."""
    return [sys.executable, "-m", "lmt.agent.cli", *args]


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    if find_mosquitto() is None:
        pytest.fail(MOSQUITTO_HINT + " (./test.sh installs it when it can)")
    with Broker() as b:
        yield b


def wait_until(cond: Callable[[], object], timeout_s: float, what: str,
               interval_s: float = 0.05) -> object:
    """Poll ``cond`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[int]:
    """The demo site served by `lmt sim` on a free port; yields the port."""
    port = free_port()
    cfg = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
    cfg["server"]["port"] = port
    (tmp_path / "site.toml").write_text(tomli_w.dumps(cfg))
    ready = tmp_path / "sim.port"
    p = subprocess.Popen(lmt_argv("sim", str(tmp_path / "site.toml"), "--ready-file", str(ready)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(ready.exists, 30, "the simulator")
        yield port
    finally:
        p.terminate()
        p.wait(10)
