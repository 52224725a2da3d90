"""`lmt read` and `lmt scan` against the simulated site, as an installer runs them."""

from __future__ import annotations

import json
import subprocess

import pytest

from lmt.agent.broker import free_port
from lmt.agent.fieldtools import RawRequest, parse_ids, plausibility
from lmt.config.profiles import Table
from tests.conftest import lmt_argv


def lmt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lmt_argv(*args), capture_output=True, text=True, timeout=120)


def test_read_points_json(site: int) -> None:
    res = lmt("read", "--tcp", f"127.0.0.1:{site}", "--profile", "eastron-sdm630", "--json",
              "power_w", "frequency_hz")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["profile"] == "eastron-sdm630" and set(got["values"]) == {"power_w", "frequency_hz"}
    assert 100_000 < got["values"]["power_w"] < 300_000
    assert 49 < got["values"]["frequency_hz"] < 51


def test_read_raw_and_human_output(site: int) -> None:
    res = lmt("read", "--tcp", f"127.0.0.1:{site}", "--device-id", "2", "--raw", "coil:0:8")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 8 and lines[0].split() == ["coil", "0", "on"]
    assert lines[7].split() == ["coil", "7", "off"]
    res = lmt("read", "--tcp", f"127.0.0.1:{site}", "--profile", "eastron-sdm630")
    assert "voltage_l1_v" in res.stdout and " V" in res.stdout


def test_read_errors_are_specific(site: int) -> None:
    res = lmt("read", "--tcp", f"127.0.0.1:{site}", "--device-id", "2", "--raw", "holding:0:1")
    assert res.returncode == 1
    assert "exception 2 (illegal data address)" in res.stderr
    res = lmt("read", "--tcp", f"127.0.0.1:{site}", "--device-id", "2", "--raw", "holding:0:1",
              "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"] == {
        "kind": "exception", "function": 3, "code": 2, "meaning": "illegal data address",
        "device": "id 2", "message": "id 2: function 3 answered exception 2 (illegal data address)"}
    res = lmt("read", "--tcp", f"127.0.0.1:{free_port()}", "--raw", "holding:0:1")
    assert res.returncode == 1 and "connection refused" in res.stderr
    assert "Traceback" not in res.stderr
    res = lmt("read", "--tcp", f"127.0.0.1:{site}", "--raw", "holding:0:999")
    assert res.returncode == 2 and "count 1-125" in res.stderr
    res = lmt("read", "--tcp", f"127.0.0.1:{site}", "--profile", "eastron-sdm630", "nope")
    assert res.returncode == 2 and "no point 'nope'" in res.stderr


def test_scan_finds_devices_and_suggests_profiles(site: int) -> None:
    res = lmt("scan", "--tcp", f"127.0.0.1:{site}", "--ids", "1-4", "--timeout", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    found = {f["device_id"]: f["profile"] for f in json.loads(res.stdout)["found"]}
    assert found == {1: "eastron-sdm630", 2: "generic-relay-8"}


def test_parsers() -> None:
    assert parse_ids("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="1-247"):
        parse_ids("0-5")
    req = RawRequest.parse("input:0x34:2")
    assert (req.table, req.address, req.count) == (Table.INPUT, 0x34, 2)
    with pytest.raises(ValueError, match="table must be one of"):
        RawRequest.parse("registers:1")
    assert plausibility({"voltage_l1_v": 230.0, "frequency_hz": 50.0}) == 1.0
    assert plausibility({"voltage_l1_v": 1e9}) == 0.0
