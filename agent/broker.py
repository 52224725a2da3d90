"""A private mosquitto broker on a free loopback port, for the demo and the tests.

Optionally with a TLS listener (CA, certificate, key; client certificates required or not)
and a password file, so the agent's TLS and authentication are tested against a real broker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
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


def password_hash(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """A mosquitto 2.x password file hash (PBKDF2-SHA512, the ``$7$`` format of
    ``mosquitto_passwd``), so no mosquitto_passwd program is needed."""
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass
class BrokerTls:
    """The broker's TLS listener: its certificate and key, and the CA its clients' certificates
    must chain to (required unless ``require_certificate`` is false)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True


class Broker:
    """``with Broker() as b:`` runs mosquitto on ``b.port`` until the block ends.

    ``tls``: the listener speaks TLS only. ``users``: user name -> password; anonymous clients
    are then refused. ``persistence``: sessions and queued messages survive ``stop()`` and
    ``start()`` again (same port, same folder).
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", *,
                 tls: BrokerTls | None = None, users: dict[str, str] | None = None,
                 persistence: bool = False) -> None:
        exe = find_mosquitto()
        if exe is None:
            raise FileNotFoundError(MOSQUITTO_HINT)
        self.exe = exe
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self.users = dict(users) if users else None
        self.persistence = persistence  # sessions and queued messages kept across a restart
        self._dir = tempfile.TemporaryDirectory(prefix="lmt-broker-")
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        folder = Path(self._dir.name)
        lines = [f"listener {self.port} {self.host}"]
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}",
                      f"keyfile {self.tls.key_file}",
                      f"require_certificate {str(self.tls.require_certificate).lower()}"]
        if self.users is not None:
            pw = folder / "passwd"
            pw.write_text("".join(f"{u}:{password_hash(p)}\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            lines += [f"password_file {pw}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot read our files
        if self.persistence:  # written on a clean stop (SIGTERM), read at the next start
            lines += ["persistence true", f"persistence_location {folder}/"]
        else:
            lines.append("persistence false")
        lines += ["max_inflight_messages 1000", "max_queued_messages 100000"]
        return "\n".join(lines) + "\n"

    def start(self) -> Broker:
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(self._config())
        log = open(Path(self._dir.name) / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        try:
            wait_for_port(self.host, self.port, 10.0, self.proc)
        except RuntimeError as exc:  # mosquitto refused its configuration: say why
            raise RuntimeError(f"mosquitto: {exc}\n{self.log_text()}") from None
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
