"""Helpers for agent tests: an in-process agent on its own loop, and agent files."""

from __future__ import annotations

import asyncio
import threading
import tomllib
from pathlib import Path

import tomli_w

from lmt.agent.daemon import Agent
from lmt.agent.security import generate_keypair
from tests.conftest import EXAMPLES, wait_until


class AgentThread:
    """Runs an in-process Agent on its own event loop in a thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            await self.agent.run(self.stop_event)
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> AgentThread:
        self.thread.start()
        wait_until(lambda: self.stop_event is not None, 30, "the agent loop")
        return self

    def stop(self) -> None:
        assert self.loop is not None and self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(20)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error


def write_agent_config(tmp_path: Path, site_port: int, broker_port: int, **overrides: dict
                       ) -> tuple[Path, Path]:
    """The demo agent file bound to this test's site and broker; returns (file, private key)."""
    key, pub = generate_keypair(tmp_path / "keys")
    cfg = tomllib.loads((EXAMPLES / "demo-agent.toml").read_text())
    cfg["mqtt"]["port"] = broker_port
    cfg["security"]["platform_public_key"] = str(pub)
    cfg["buffer"]["path"] = str(tmp_path / "buffer.sqlite")
    for d in cfg["devices"]:
        d["port"] = site_port
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path, key
