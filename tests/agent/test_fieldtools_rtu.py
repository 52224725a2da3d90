"""`lmt scan --serial` and `lmt read --serial` against a simulated Modbus RTU line (pty)."""

from __future__ import annotations

import json
import subprocess

from lmt.config.site import SiteConfig
from tests.conftest import SiteThread, lmt_argv

SITE = SiteConfig.model_validate({
    "site": {"seed": 5},
    "lines": [{"name": "rs485", "protocol": "modbus-rtu", "baud": 19200}],
    "devices": [
        {"name": "main", "profile": "eastron-sdm630", "device_id": 1},
        {"name": "sub", "profile": "eastron-sdm120", "device_id": 3, "line": "rs485"},
        {"name": "relays", "profile": "generic-relay-8", "device_id": 5, "line": "rs485"},
    ],
})


def test_scan_and_read_an_rtu_line() -> None:
    with SiteThread(SITE) as st:
        port = st.paths["rs485"]
        # 0.5 s: the devices present must answer within it on a loaded machine (a few ms here)
        res = subprocess.run(lmt_argv("scan", "--serial", port, "--baud", "19200", "--ids", "1-6",
                                      "--timeout", "0.5", "--json"),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        found = {f["device_id"]: f["profile"] for f in json.loads(res.stdout)["found"]}
        assert found == {3: "eastron-sdm120", 5: "generic-relay-8"}
        res = subprocess.run(lmt_argv("read", "--serial", port, "--baud", "19200", "--device-id",
                                      "3", "--profile", "eastron-sdm120", "--json",
                                      "voltage_l1_v"), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert 200 < json.loads(res.stdout)["values"]["voltage_l1_v"] < 260
        res = subprocess.run(lmt_argv("read", "--serial", port, "--baud", "19200", "--device-id",
                                      "9", "--raw", "holding:0:1", "--timeout", "0.2"),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and "no answer" in res.stderr.lower(), res.stderr
