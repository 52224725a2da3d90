"""`lmt sim --help` describes the site file as the code reads it: every key of every table, the
DL/T 645 lines and every fault (so a key added to the site model without its help fails here)."""

from __future__ import annotations

import subprocess

from lmt.config.site import (
    CtShunt,
    Events,
    Faults,
    Metering,
    PtLoss,
    SimDevice,
    SimLine,
    SimLoad,
    SimServer,
    SiteInfo,
    Tamper,
)
from lmt.firmware_sim.cli import SITE_FILE_HELP
from tests.conftest import lmt_argv


def test_every_site_file_key_and_fault_is_in_the_help() -> None:
    for model in (SiteInfo, SimServer, SimLine, SimDevice, SimLoad, Faults, Metering, Tamper,
                  CtShunt, PtLoss, Events):
        for key in model.model_fields:
            # per-phase keys may be given as a range: current_loss_l1…l3
            shown = key in SITE_FILE_HELP or (key[-3:] in ("_l2", "_l3")
                                              and f"{key[:-3]}_l1" in SITE_FILE_HELP)
            assert shown, f"{model.__name__}.{key} is not in lmt sim --help"
    for text in ('"modbus-rtu" or "dlt645"', "address (DL/T 645: 12 digits", "1C control",
                 "abnormal reply", "--control-port"):
        assert text in SITE_FILE_HELP


def test_both_ways_of_running_the_simulator_show_it() -> None:
    for argv in (lmt_argv("sim", "--help"),
                 [lmt_argv()[0], "-m", "lmt.firmware_sim", "--help"]):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "faults ([devices.faults]" in res.stdout and "dlt645" in res.stdout
        # kept as written, not re-wrapped into one paragraph
        assert "\n  offline          never answers\n" in res.stdout
    assert all(len(line) <= 100 for line in SITE_FILE_HELP.splitlines())
