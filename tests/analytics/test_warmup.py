"""`lmt warmup` compiles the analytics kernels too (install time: no compile on the gateway later)."""

from __future__ import annotations

import subprocess

from tests.conftest import lmt_argv


def test_lmt_warmup_compiles_the_control_and_analytics_kernels() -> None:
    out = subprocess.run(lmt_argv("warmup"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "control and analytics kernels ready" in out.stdout
