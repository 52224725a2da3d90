"""A private mosquitto broker on a free loopback port, for the demo and the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MOSQUITTO_HINT = ("mosquitto is not installed: on Debian or Raspberry Pi OS run "
                  "'sudo apt-get install mosquitto'")


def find_mosquitto() -> str | None:
    env = os.environ.get("LMT_MOSQUITTO")
    if env and Path(env).is_file():
        return env
    found = shutil.which("mosquitto")
    if found:
        return found
    for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if Path(p).is_file():
            return p
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None
                  ) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s"
                                   ) from None
            time.sleep(0.02)


class Broker:
    """``with Broker() as b:`` runs mosquitto on ``b.port`` until the block ends."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        exe = find_mosquitto()
        if exe is None:
            raise FileNotFoundError(MOSQUITTO_HINT)
        self.exe = exe
        self.host = host
        self.port = port or free_port(host)
        self._dir = tempfile.TemporaryDirectory(prefix="lmt-broker-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\n"
                        "persistence false\nmax_inflight_messages 1000\n"
                        "max_queued_messages 100000\n")
        log = open(Path(self._dir.name) / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_for_port(self.host, self.port, 10.0, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        p = Path(self._dir.name) / "mosquitto.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
