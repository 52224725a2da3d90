"""`lmt scan` and `lmt read` report a port that cannot be used — missing, not permitted, held by
another program, a TCP port nobody listens on — as an error (exit 1, one sentence naming the
port; with --json a JSON error object), never as "0 devices answered"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from lmt.agent.broker import free_port
from tests.conftest import lmt_argv

NOBODY = 65534


def lmt(*args: str, argv: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv or lmt_argv(*args), capture_output=True, text=True, timeout=120)


@pytest.fixture
def pty_path() -> Iterator[str]:
    """A pseudo-terminal nobody answers on (the test holds the other end)."""
    master, slave = os.openpty()
    tty.setraw(slave, termios.TCSANOW)
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def assert_port_error(res: subprocess.CompletedProcess[str], command: str, *needles: str) -> None:
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stderr.startswith(f"lmt {command}: ") and res.stderr.count("\n") == 1, res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr
    assert "answered" not in res.stdout and "Traceback" not in res.stderr


#: What `lmt read` needs besides the port, by protocol flag.
READ_ARGS = {"--serial": ["--raw", "holding:0:1"], "--dlt645": ["--address", "123456789012"]}


@pytest.mark.parametrize("flag", ["--serial", "--dlt645"])
def test_missing_serial_port(tmp_path: Path, flag: str) -> None:
    port = str(tmp_path / "ttyUSB9")
    for command in ("scan", "read"):
        extra = READ_ARGS[flag] if command == "read" else ["--ids", "1-3"]
        res = lmt(command, flag, port, *extra)
        assert_port_error(res, command, f"no such serial port {port}", "/dev/serial/by-id/")
        res = lmt(command, flag, port, *extra, "--json")
        assert res.returncode == 1
        got = json.loads(res.stdout)
        assert got["error"]["kind"] == "no-such-port" and port in got["error"]["message"]
        assert port in got["target"]


def test_scan_tcp_connection_refused() -> None:
    port = free_port()  # nothing listens there
    res = lmt("scan", "--tcp", f"127.0.0.1:{port}", "--ids", "1-3")
    assert_port_error(res, "scan", "connection refused", f"127.0.0.1 port {port}")
    res = lmt("scan", "--tcp", f"127.0.0.1:{port}", "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout) == {
        "target": f"Modbus TCP 127.0.0.1:{port}",
        "error": {"kind": "connection-refused", "device": f"127.0.0.1:{port}",
                  "message": f"connection refused: nothing listens on 127.0.0.1 port {port} "
                             "(wrong port, or the device's Modbus TCP server is off)"}}
    res = lmt("read", "--tcp", f"127.0.0.1:{port}", "--profile", "eastron-sdm630")
    assert_port_error(res, "read", "connection refused")


@pytest.mark.parametrize("flag", ["--serial", "--dlt645"])
def test_port_held_by_another_program(pty_path: str, flag: str) -> None:
    holder = serial.Serial(pty_path, exclusive=True)
    try:
        res = lmt("scan", flag, pty_path, "--ids", "1-3", "--json")
        assert res.returncode == 1
        assert json.loads(res.stdout)["error"]["kind"] == "port-busy"
        assert f"serial port {pty_path} is busy: another program holds it" in res.stderr
        res = lmt("read", flag, pty_path, *READ_ARGS[flag])
        assert_port_error(res, "read", f"fuser -v {pty_path}")
    finally:
        holder.close()


def test_a_free_port_with_nobody_on_it_is_not_an_error(pty_path: str) -> None:
    """The other side of the coin: an openable line where nobody answers is "0 found"."""
    res = lmt("scan", "--serial", pty_path, "--ids", "1-2", "--timeout", "0.1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["found"] == []


def _as_nobody() -> list[str] | None:
    """A command prefix that runs a program as an ordinary user, or None if there is none."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    try:
        ok = subprocess.run([*prefix, sys.executable, "-c", "import lmt.agent.fieldtools"],
                            capture_output=True, timeout=60).returncode == 0
    except OSError:
        return None
    return prefix if ok else None


@pytest.mark.parametrize("flag", ["--serial", "--dlt645"])
def test_permission_denied_names_the_dialout_group(pty_path: str, flag: str) -> None:
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("running as root and cannot switch to an ordinary user (setpriv)")
    if not prefix:
        os.chmod(pty_path, 0)  # our own pty: take the permission away
    res = lmt(argv=[*prefix, *lmt_argv("scan", flag, pty_path, "--ids", "1-3", "--json")])
    assert res.returncode == 1, res.stderr
    assert json.loads(res.stdout)["error"]["kind"] == "permission-denied"
    assert f"permission denied on {pty_path}: add the agent's user to the 'dialout' group" \
        in res.stderr
