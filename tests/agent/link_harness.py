"""An MqttLink on its own asyncio loop in a thread, recording the commands it receives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
import time
from typing import Any

from lmt.agent.messages import Status
from lmt.agent.mqtt import MqttLink, Topics
from lmt.agent.platform import BrokerOptions, _Client
from lmt.config.agent import Mqtt, Tls
from tests.conftest import wait_until

TERMINAL = "t-0001"


class LinkHarness:
    def __init__(self, terminal: str = TERMINAL, rng: random.Random | None = None,
                 **mqtt: Any) -> None:
        self.cfg = Mqtt(**{"reconnect_min_s": 0.1, "reconnect_max_s": 0.4, **mqtt})
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.commands: list[bytes] = []
        self.topics = Topics(self.cfg.topic_prefix, terminal)
        self.terminal = terminal
        self.link = MqttLink(self.cfg, terminal, self.topics, self.loop, self.commands.append,
                             self._status, rng=rng)

    def _status(self, online: bool) -> str:
        return Status(terminal=self.terminal, online=online, ts=time.time(), version="test",
                      config_hash="0" * 64, devices=["main-meter"], session=1).model_dump_json()

    def start(self) -> LinkHarness:
        self._thread.start()
        self.link.start()
        return self

    def wait_connected(self, timeout_s: float = 15.0) -> None:
        wait_until(lambda: self.link.connected, timeout_s, "the link to connect")

    def wait_subscribed(self, plat: _Client, timeout_s: float = 10.0) -> None:
        """Until a command published now reaches the link (its subscription is in place at the
        broker); the probes are then forgotten."""
        def probe() -> bool:
            plat.publish(self.topics.cmd, "probe")
            return b"probe" in self.commands

        wait_until(probe, timeout_s, "the link's command subscription", interval_s=0.2)
        plat.publish(self.topics.cmd, "probe-last")  # after every probe, in order
        wait_until(lambda: b"probe-last" in self.commands, timeout_s, "the last probe")
        self.commands[:] = [c for c in self.commands if c not in (b"probe", b"probe-last")]

    def stop(self) -> None:
        self.link.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> LinkHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def platform_client(port: int, subscribe: list[str], tls: Tls | None = None,
                    username: str | None = None, password: str | None = None) -> _Client:
    """The reference platform client, connected and subscribed."""
    c = _Client("127.0.0.1", port, options=BrokerOptions(tls=tls, username=username,
                                                         password=password))
    c.connect(subscribe)
    return c


class Relay:
    """A TCP relay in front of the broker that a test can cut (every connection dropped, new
    ones closed at once, as a network outage looks to both ends) and restore."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._server.accept()
            except OSError:
                return
            if not self._up.is_set():
                down.close()
                continue
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.cut()
        self._server.close()


def received(client: _Client, into: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move what the platform client received so far into ``into`` (decoded JSON with the
    topic under "_topic"); return ``into``."""
    while not client.messages.empty():
        m = client.messages.get_nowait()
        into.append({**json.loads(m.payload), "_topic": m.topic})
    return into
