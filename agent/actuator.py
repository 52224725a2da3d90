"""Carrying out the supervisor's actions: switch coils, write setpoints, say what took.

The actions come in the order to carry them out (:func:`lmt.control.supervisor.step`); the
state that records them is already on disk ("persist, then actuate"). Consecutive switches of
the same kind (sheds, or restores) are carried out together: per device one write per run of
adjacent coils (function 15; function 05 for a module that does not know 15) and one read-back,
devices side by side. Setpoints are written one at a time, each verified by a read-back. Every
action gets a :class:`~lmt.control.supervisor.Done`: ``error`` None when the write took.
Nothing a device does stops the cycle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from lmt.config.agent import AgentConfig
from lmt.control.supervisor import Action, Done
from lmt.drivers.errors import DriverError

log = logging.getLogger("lmt.agent")


class Writable(Protocol):
    """What the actuator needs of a device (Modbus devices have it)."""

    async def write_coils(self, values: dict[str, bool], verify: bool = True
                          ) -> dict[str, Exception | None]: ...

    async def write_point(self, point_name: str, value: float | bool,
                          verify: bool = True) -> None: ...


def _describe(exc: Exception) -> str:
    if isinstance(exc, DriverError):
        return str(exc)
    # a bug or a configuration the validation missed: say so, carry on
    return f"{type(exc).__name__}: {exc}"


class Actuator:
    def __init__(self, cfg: AgentConfig, devices: Mapping[str, Writable]) -> None:
        self.devices = devices
        self.where = [(ld.device, ld.point, ld.name) for ld in cfg.loads]

    async def carry_out(self, actions: Sequence[Action]) -> list[Done]:
        done: list[Done] = []
        i = 0
        while i < len(actions):
            a = actions[i]
            if a.kind == "set":
                done.append(await self._set(a))
                i += 1
                continue
            j = i
            while j < len(actions) and actions[j].kind == a.kind:
                j += 1
            done += await self._switch(actions[i:j])
            i = j
        return done

    async def _switch(self, batch: Sequence[Action]) -> list[Done]:
        by_device: dict[str, dict[str, bool]] = {}
        for a in batch:
            device, point, _ = self.where[a.load]
            by_device.setdefault(device, {})[point] = a.kind == "restore"

        async def write(device: str, values: dict[str, bool]) -> dict[str, Exception | None]:
            try:
                return await self.devices[device].write_coils(values)
            except Exception as exc:  # a failed switch must never stop the cycle
                return dict.fromkeys(values, exc)

        answers = await asyncio.gather(*(write(d, v) for d, v in by_device.items()))
        errors = dict(zip(by_device, answers, strict=True))
        out = []
        for a in batch:
            device, point, name = self.where[a.load]
            exc = errors[device].get(point)
            if exc is None:
                log.info("%s %s: %s", "restored" if a.kind == "restore" else "shed", name,
                         a.reason)
                out.append(Done(a))
            else:
                self._failed(name, "on" if a.kind == "restore" else "off", exc)
                out.append(Done(a, _describe(exc)))
        return out

    async def _set(self, a: Action) -> Done:
        device, point, name = self.where[a.load]
        assert a.value is not None
        try:
            await self.devices[device].write_point(point, a.value)
        except Exception as exc:  # a failed write must never stop the cycle
            self._failed(name, f"to {a.pct or 0.0:.1f} %", exc)
            return Done(a, _describe(exc))
        if a.quiet:
            log.debug("%s setpoint rewritten: %.1f %%", name, a.pct or 0.0)
        else:
            log.info("%s set to %.1f %%: %s", name, a.pct or 0.0, a.reason)
        return Done(a)

    @staticmethod
    def _failed(name: str, what: str, exc: Exception) -> None:
        if isinstance(exc, DriverError):
            log.warning("switching %s %s failed: %s", name, what, exc)
        else:
            log.error("switching %s %s failed unexpectedly", name, what, exc_info=exc)
