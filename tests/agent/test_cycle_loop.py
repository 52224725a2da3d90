"""The daemon's cycle loop on its own (agent/daemon.py): a verified command starts a cycle at
once, and the regular cycles go on from there — commands faster than the poll interval never
push the next cycle into the future. The agent's parts around the loop are stand-ins."""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import pytest

import lmt.agent.daemon as daemon
from lmt.agent.daemon import Agent


class Intake:
    def __init__(self) -> None:
        self.queue: list[str] = []
        self.requests: list[str] = []
        self.answer_due = None

    def new_cycle(self) -> None:
        pass

    def verify_pending(self) -> None:
        self.requests += self.queue
        self.queue = []

    def take(self) -> list[str]:
        self.verify_pending()
        out, self.requests = self.requests, []
        return out


def test_command_wakes_do_not_push_the_next_cycle_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon.supervisor, "controlling", lambda st: False)
    interval = 0.2

    async def main() -> tuple[int, float]:
        cycles: list[float] = []
        ag: Any = types.SimpleNamespace(mono=time.monotonic, state=None, intake=Intake())
        ag.wake = asyncio.Event()
        ag.cfg = types.SimpleNamespace(poll=types.SimpleNamespace(interval_s=interval),
                                       control=types.SimpleNamespace(main_meter="m",
                                                                     power_point="p"))

        async def poll(deadline: float) -> None:
            return None

        async def control_cycle(result: Any, requests: Any) -> None:
            cycles.append(time.monotonic())

        ag.poller = types.SimpleNamespace(force=lambda *a: None, urgent=False, poll=poll)
        ag.control_cycle = control_cycle
        ag._housekeeping = lambda: None
        ag.ledger = None
        ag.ledger_cycle = lambda: None
        ag.ledger_commands = lambda requests: None
        ag._wait = types.MethodType(Agent._wait, ag)
        stop = asyncio.Event()
        task = asyncio.create_task(Agent.cycle_loop(ag, stop))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # a verified command every 50 ms for 2 s
            ag.intake.queue.append("cmd")
            ag.wake.set()
            await asyncio.sleep(0.05)
        quiet = time.monotonic()
        n = len(cycles)
        deadline = quiet + 3.0
        while len(cycles) < n + 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        ag.wake.set()
        await task
        after = [c for c in cycles if c > quiet]
        return len(after), (after[0] - quiet) if after else 99.0

    n_after, first = asyncio.run(main())
    assert n_after >= 10, f"only {n_after} regular cycles in 3 s after the commands stopped"
    assert first <= 1.5 * interval, f"the first regular cycle came {first:.2f} s after them"
