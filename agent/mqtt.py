"""The MQTT link to the platform (paho-mqtt 2.x, network loop in paho's own thread).

paho keeps nothing on disk: the SQLite buffer is the record of what was delivered. This module
only connects, keeps the retained status and last will, hands received commands to the asyncio
loop, and publishes at QoS 1 returning paho's message info so the caller can check the
broker's acknowledgement per message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from lmt.config.agent import Mqtt

log = logging.getLogger("lmt.mqtt")


class Topics:
    """All topics of one terminal live under ``<prefix>/<terminal>/``."""

    def __init__(self, prefix: str, terminal: str) -> None:
        self.base = f"{prefix}/{terminal}"
        self.status = f"{self.base}/status"
        self.telemetry = f"{self.base}/telemetry"
        self.events = f"{self.base}/events"
        self.result = f"{self.base}/result"
        self.cmd = f"{self.base}/cmd"

    def for_stream(self, stream: str) -> str:
        return {"telemetry": self.telemetry, "events": self.events, "results": self.result}[stream]


class MqttLink:
    def __init__(self, cfg: Mqtt, terminal: str, topics: Topics, loop: asyncio.AbstractEventLoop,
                 on_command: Callable[[bytes], None], status_payload: Callable[[bool], str]) -> None:
        self.cfg = cfg
        self.topics = topics
        self._loop = loop
        self._on_command = on_command
        self._status_payload = status_payload
        self.generation = 0  # increments on every successful connect
        self.connected = False
        self.changed = asyncio.Event()  # set on connect and disconnect
        self._lock = threading.Lock()
        client_id = cfg.client_id or f"lmt-{terminal}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=False)
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password)
        self.client.reconnect_delay_set(min_delay=max(1, round(cfg.reconnect_min_s)),
                                        max_delay=max(1, round(cfg.reconnect_max_s)))
        self.client.max_inflight_messages_set(1000)
        self.client.will_set(topics.status, status_payload(False), qos=1, retain=True)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message

    # -- paho thread callbacks ---------------------------------------------------------------
    def _notify(self) -> None:
        self._loop.call_soon_threadsafe(self.changed.set)

    def _handle_connect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        client.publish(self.topics.status, self._status_payload(True), qos=1, retain=True)
        client.subscribe(self.topics.cmd, qos=1)
        with self._lock:
            self.generation += 1
            self.connected = True
        log.info("connected to %s:%d", self.cfg.host, self.cfg.port)
        self._notify()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        with self._lock:
            was = self.connected
            self.connected = False
        if was:
            log.warning("disconnected from broker: %s", reason_code)
        self._notify()

    def _handle_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        if msg.topic == self.topics.cmd:
            self._loop.call_soon_threadsafe(self._on_command, bytes(msg.payload))

    # -- used from the asyncio loop ----------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def unsubscribe_commands(self) -> None:
        if self.connected:
            self.client.unsubscribe(self.topics.cmd)

    def publish(self, topic: str, payload: str) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1)

    def stop(self, timeout_s: float = 3.0) -> None:
        """Publish the offline status (retained), then disconnect cleanly."""
        if self.connected:
            info = self.client.publish(self.topics.status, self._status_payload(False), qos=1,
                                       retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
