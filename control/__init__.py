"""lmt.control: the control decision layer — pure functions, time as an input.

Nothing here reads a clock, talks to a device, touches a file or keeps state between calls:
the agent measures, calls, persists what it is given back, and carries out the actions
(``tests/test_layers.py`` enforces it). The rooms:

* :mod:`lmt.control.supervisor` - every decision of a control cycle in one
  ``step(config, state, inputs) -> (state, actions, records)``: the active cap or shed
  command, demand-response events, the terminal control modes, which cap wins, staggered
  release, rotation, setpoint rewrites, the measured response of every switch, the
  two-minute records. Its state is one serialisable value.
* :mod:`lmt.control.cap` - one cycle of "cap site import at X kW" (:func:`decide_cap`) and
  the end of a command (:func:`decide_release`) over the loads' specs and states.
* :mod:`lmt.control.select` - which loads to shed or restore: knapsacks in numba kernels
  (:func:`select_shed`, :func:`select_restore`); :mod:`lmt.control.select_reference` holds
  their plain-Python twins (the benchmark's baseline and the tests' oracle).
* :mod:`lmt.control.dr` - demand-response events (:class:`~lmt.control.dr.DrScheduler`),
  baselines and the metered delivery (:class:`~lmt.control.dr.DeliveryMeter`).
* :mod:`lmt.control.modes` - the terminal control modes (负控终端控制模式), round by round.
* :mod:`lmt.control.learn` - a load's real kW learned from the metered steps of its switches
  (median, standard error, confidence, drift from the rating); not yet used by the selection.
* :mod:`lmt.control.flex` - what could be shed now, per load class (flexibility); not yet
  published by the agent.
* :mod:`lmt.control.jsonstate` - dataclass state to JSON types and back, strictly.

This package may import only numpy, numba and the standard library.
"""

from __future__ import annotations

from lmt.control.cap import (
    KINDS,
    CapParams,
    Decision,
    LoadSpec,
    LoadState,
    decide_cap,
    decide_release,
)
from lmt.control.select import Selection, select_restore, select_shed
from lmt.control.select import warmup as _warmup_select

__all__ = [
    "KINDS",
    "CapParams",
    "Decision",
    "LoadSpec",
    "LoadState",
    "Selection",
    "decide_cap",
    "decide_release",
    "select_restore",
    "select_shed",
    "warmup",
]


def warmup() -> None:
    """Compile the kernels (numba caches them on disk), so the first control cycle after a
    start does not wait for compilation."""
    _warmup_select()
