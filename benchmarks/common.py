"""What every benchmark script shares: the output line (scripts run as
``.venv/bin/python benchmarks/bench_<topic>.py``, so this folder is on ``sys.path``)."""

from __future__ import annotations

import json


def emit(name: str, value: float, unit: str, baseline: float | None) -> None:
    """One result: ``{"name", "value", "unit", "baseline", "ratio"}`` (ratio = value / baseline)."""
    ratio = None if baseline in (None, 0) else round(value / baseline, 3)
    print(json.dumps({"name": name, "value": round(value, 6), "unit": unit,
                      "baseline": None if baseline is None else round(baseline, 6),
                      "ratio": ratio}), flush=True)
