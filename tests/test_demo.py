"""The README's first command, `./demo.sh`, as written: it ends by itself with exit code 0 and
says what happened."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import ROOT


def test_demo_script_runs_to_a_passing_summary() -> None:
    env = dict(os.environ)
    res = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-2000:]
    for expected in ("-- before: normal operation", "-- platform: signed command 'cap import",
                     "result: accepted", "OPENED: ev-chargers", "== summary",
                     "results: accepted, executed, completed", "agent stopped cleanly (exit 0)",
                     "Demo passed"):
        assert expected in out, expected
