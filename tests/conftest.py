"""Shared fixtures: a real mosquitto on a free loopback port, and the `lmt` program."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
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


@contextlib.contextmanager
def serve_site(tmp_path: Path, more_devices: Sequence[dict[str, object]] = ()) -> Iterator[int]:
    """The demo site, with ``more_devices`` on its gateway, served by `lmt sim` on a free port;
    yields the port."""
    port = free_port()
    cfg = tomllib.loads((EXAMPLES / "demo-site.toml").read_text())
    cfg["server"]["port"] = port
    cfg["devices"] += list(more_devices)
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


@pytest.fixture
def site(tmp_path: Path) -> Iterator[int]:
    """The demo site served by `lmt sim` on a free port; yields the port."""
    with serve_site(tmp_path) as port:
        yield port


class SiteThread:
    """A SimulatedSite served from its own event loop in a background thread."""

    def __init__(self, config: object, **kw: object) -> None:
        import asyncio
        import threading

        from lmt.firmware_sim import SimulatedSite

        self._asyncio = asyncio
        self.site = SimulatedSite(config, port=0, **kw)  # type: ignore[arg-type]
        self.port = 0
        self.paths: dict[str, str] = {}
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = self._asyncio.get_running_loop()
            self._stop = self._asyncio.Event()
            try:
                self.port = await self.site.start()
                self.paths = dict(self.site.line_paths())
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                raise
            self._ready.set()
            await self._stop.wait()
            await self.site.stop()
        try:
            self._asyncio.run(main())
        except BaseException:
            pass

    def __enter__(self) -> SiteThread:
        self._thread.start()
        wait_until(self._ready.is_set, 30, "the simulated site")
        if self._error:
            raise self._error
        return self

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the site's loop (e.g. set_faults)."""
        self._loop.call_soon_threadsafe(fn)

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
