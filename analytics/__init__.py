"""lmt.analytics: the energy ledger — pure functions, time as an input.

What a utility's marketing side needs from a terminal beyond raw readings: interval records,
tariffs and bills, a prepaid balance, carbon, losses and theft indicators. The same rules as
:mod:`lmt.control`: nothing here reads a clock, touches a file or keeps state between calls
(``tests/test_layers.py`` enforces it); the agent feeds it readings (:class:`Sample`) and
persists what it returns.

This package may import only numpy, numba, the standard library and :mod:`lmt.control`'s
types (never the reverse).
"""

from __future__ import annotations

from lmt.analytics.sample import PHASES, Sample

__all__ = ["PHASES", "Sample"]
