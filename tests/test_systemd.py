"""The service unit runs `lmt run` as an unprivileged user and restarts on failure."""

from __future__ import annotations

import configparser

from tests.conftest import ROOT


def test_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "systemd" / "lmt-edge.service")
    svc = unit["Service"]
    assert svc["User"] not in ("", "root")
    assert svc["Restart"] == "on-failure"
    assert svc["ExecStart"].split()[1:3] == ["run", "--config"]
    assert svc["ExecStart"].split()[0].endswith("/lmt")
    assert "2" in svc["RestartPreventExitStatus"].split()  # a config error does not loop
    text = (ROOT / "systemd" / "lmt-edge.service").read_text()
    assert "\nEnvironment=NUMBA_CACHE_DIR=" in text  # the warm kernel cache
    assert unit["Install"]["WantedBy"] == "multi-user.target"
