"""The MQTT link to the platform (paho-mqtt 2.x, network loop in paho's own thread).

paho keeps nothing on disk: the SQLite buffer is the record of what was delivered. This module
connects (TLS, user name and password, MQTT 3.1.1 or 5, persistent session), keeps the retained
status and last will, hands received commands to the asyncio loop, and publishes at QoS 1
returning paho's message info so the caller can check the broker's acknowledgement per message.

Reconnecting is ours, not paho's: paho's reconnect delay has no jitter, and ten thousand
terminals losing one broker node together must not come back together. Every connection
attempt goes through :meth:`_Paho.reconnect`, which first waits the delay chosen here (a random
initial delay for the first, ``mqtt.connect_jitter_s``; exponential back-off with full jitter
after a failure) and registers a last will numbered for that attempt. Failures (unreachable,
TLS, refused credentials) are logged with their reason and retried; nothing here raises into
the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from lmt.config.agent import Mqtt

log = logging.getLogger("lmt.mqtt")

# CONNACK reason codes (MQTT 5 numbering; paho maps MQTT 3.1.1 return codes onto them)
_AUTH_CODES = {0x86, 0x87, 0x8C}  # bad user name or password, not authorized, bad auth method
_HINTS = {0x84: "check mqtt.protocol", 0x85: "check mqtt.client_id",
          0x86: "check mqtt.username and the password", 0x87: "check mqtt.username, the "
          "password and the broker's access rules for this terminal",
          0x88: "the broker is unavailable", 0x89: "the broker is busy",
          0x9F: "the broker limits the connection rate"}


class Topics:
    """All topics of one terminal live under ``<prefix>/<terminal>/``."""

    def __init__(self, prefix: str, terminal: str) -> None:
        self.base = f"{prefix}/{terminal}"
        self.status = f"{self.base}/status"
        self.telemetry = f"{self.base}/telemetry"
        self.events = f"{self.base}/events"
        self.result = f"{self.base}/result"
        self.intervals = f"{self.base}/intervals"
        self.bills = f"{self.base}/bills"
        self.cmd = f"{self.base}/cmd"

    def for_stream(self, stream: str) -> str:
        return {"telemetry": self.telemetry, "events": self.events, "results": self.result,
                "intervals": self.intervals, "bills": self.bills}[stream]


def backoff_delay(failures: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive failed connections: "full jitter", uniform
    between ``min_s`` and ``min(max_s, min_s * 2**failures)``. The ceiling doubles per failure;
    the randomness spreads a fleet that lost its broker at the same moment."""
    if failures <= 0:
        return 0.0
    ceiling = min(max_s, min_s * 2.0 ** min(failures, 60))
    return rng.uniform(min_s, max(min_s, ceiling))


def describe_error(exc: BaseException) -> tuple[str, int]:
    """A log line's text and level for a failed connection attempt."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = str(exc.verify_message or exc).rstrip(".")
        hint = ("it must name mqtt.host (mqtt.tls.insecure = true skips this check)"
                if "mismatch" in why.lower() else "is it signed by the CA in mqtt.tls.ca_file?")
        return f"TLS: the broker's certificate was refused: {why}; {hint}", logging.ERROR
    if isinstance(exc, ssl.SSLError):
        why = _clean(str(exc))
        return f"TLS handshake failed: {why}{_alert_hint(why)}", logging.ERROR
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)", logging.WARNING
    if isinstance(exc, OSError):
        return f"cannot connect: {exc.strerror or exc}", logging.WARNING
    return f"connection attempt failed: {exc!r}", logging.ERROR


def _clean(text: str) -> str:
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", text.removeprefix("failed to receive on socket: "))


def _alert_hint(text: str) -> str:
    t = text.lower()
    if "alert" in t and "certificate required" in t:
        return "; the broker requires a client certificate (mqtt.tls.cert_file, key_file)"
    if "alert" in t and ("certificate" in t or "unknown ca" in t):
        return "; the broker refused this terminal's client certificate (mqtt.tls.cert_file)"
    return ""


def _value(reason_code: object) -> int:
    return reason_code.value if isinstance(reason_code, ReasonCode) else -1


class _Paho(mqtt.Client):
    """paho's client, every connection attempt of which (paho's loop calls ``reconnect`` for the
    first one and for every reconnect) is paced and numbered by the link."""

    link: MqttLink

    def reconnect(self) -> MQTTErrorCode:
        try:
            self.link._before_attempt()
            return super().reconnect()
        except OSError as exc:
            self.link._attempt_failed(exc)
            raise
        except Exception as exc:  # anything else would end paho's thread
            self.link._attempt_failed(exc)
            raise ConnectionError(str(exc)) from exc


class MqttLink:
    def __init__(self, cfg: Mqtt, terminal: str, topics: Topics, loop: asyncio.AbstractEventLoop,
                 on_command: Callable[[bytes], None], status_payload: Callable[[bool], str],
                 *, rng: random.Random | None = None, inflight_window: int = 1000) -> None:
        """``inflight_window``: at most this many QoS 1 messages on the wire awaiting their
        PUBACK; paho queues the rest of what it is handed and sends each as soon as an
        acknowledgement frees a slot (paho allows setting it only before connecting)."""
        self.cfg = cfg
        self.topics = topics
        self._loop = loop
        self._on_command = on_command
        self._status_payload = status_payload
        self._rng = rng or random.Random()
        self.generation = 0  # increments on every successful connect
        self.connected = False
        self.changed = asyncio.Event()  # set on connect and disconnect
        # called on the loop on every acknowledgement, connect and disconnect (the sync task's
        # wake-up: it sends the next message as soon as the window has room)
        self.on_ack: Callable[[], None] | None = None
        self.ack_wake_every = 1  # call on_ack once per this many acknowledgements
        self._acks = 0
        self.connection = 0  # connection attempts so far; numbers the birth and the will
        self.failures = 0  # consecutive failed connections (the back-off exponent)
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._next_delay: float | None = 0.0
        self._up_since = 0.0
        self._refused = False  # CONNACK refused: on_connect logged it, on_disconnect stays quiet
        self._paho_error: str | None = None
        self._v5 = cfg.protocol == "5"
        client_id = cfg.client_id or f"lmt-{terminal}"
        if self._v5:
            self.client = _Paho(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=mqtt.MQTTv5)
        else:
            self.client = _Paho(CallbackAPIVersion.VERSION2, client_id=client_id,
                                protocol=mqtt.MQTTv311, clean_session=False)
        self.client.link = self
        self.client.suppress_exceptions = True  # a failing callback is logged, never fatal
        self.client.reconnect_delay_set(min_delay=0, max_delay=0)  # the delay is ours
        if cfg.tls is not None:
            self.client.tls_set_context(cfg.tls.ssl_context())
            if cfg.tls.insecure:
                self.client.tls_insecure_set(True)
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.secret())
        self.client.max_inflight_messages_set(inflight_window)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_publish = self._handle_publish
        self.client.on_log = self._handle_log

    @property
    def where(self) -> str:
        return f"broker {self.cfg.host}:{self.cfg.port}"

    def _status(self, online: bool) -> str:
        """The status payload, numbered with this connection (the will matches its birth)."""
        payload = self._status_payload(online)
        try:
            data = json.loads(payload)
        except ValueError:
            return payload
        if not isinstance(data, dict):
            return payload
        data["connection"] = self.connection
        return json.dumps(data, separators=(",", ":"))

    # -- paho thread ---------------------------------------------------------------------------
    def _notify(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self.changed.set)
            if self.on_ack is not None:
                self._loop.call_soon_threadsafe(self.on_ack)
        except RuntimeError:  # the agent's loop is closed: nobody is waiting
            pass

    def _handle_publish(self, client, userdata, mid, reason_code, properties):
        self._acks += 1
        if self._acks < self.ack_wake_every:
            return
        self._acks = 0
        if self.on_ack is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_ack)
            except RuntimeError:
                pass

    def _before_attempt(self) -> None:
        delay = self._next_delay
        if delay is None:  # a path that recorded no failure: still never hammer the broker
            delay = backoff_delay(max(1, self.failures), self.cfg.reconnect_min_s,
                                  self.cfg.reconnect_max_s, self._rng)
        self._next_delay = None
        if delay > 0:
            self._stopping.wait(delay)
        if self._stopping.is_set():
            time.sleep(0.01)  # paho's loop retries at once until it sees the stop
            raise ConnectionAbortedError("the MQTT link is stopping")
        self.connection += 1
        self._paho_error = None
        self._refused = False
        self.client.will_set(self.topics.status, self._status(False), qos=1, retain=True)
        log.debug("connecting to %s (attempt %d)", self.where, self.connection)

    def _failed(self, reason: str, level: int) -> None:
        if self._stopping.is_set():
            return
        self.failures += 1
        self.last_error = reason
        delay = backoff_delay(self.failures, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s,
                              self._rng)
        self._next_delay = delay
        log.log(level, "%s: %s; next attempt in %.2f s", self.where, reason, delay)

    def _attempt_failed(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionAbortedError) and self._stopping.is_set():
            return
        text, level = describe_error(exc)
        self._failed(text, level)

    def _handle_log(self, client, userdata, level, buf):
        if level == mqtt.MQTT_LOG_ERR and not buf.startswith("Client is not connected"):
            self._paho_error = buf
            if buf.startswith("Caught exception"):
                log.error("paho: %s", buf)
                return
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING):
            log.debug("paho: %s", buf)

    def _handle_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = True
            value = _value(reason_code)
            hint = f" ({_HINTS[value]})" if value in _HINTS else ""
            self._failed(f"the broker refused the connection: {reason_code}{hint}",
                         logging.ERROR if value in _AUTH_CODES else logging.WARNING)
            return
        if self._stopping.is_set():
            client.disconnect()
            return
        client.publish(self.topics.status, self._status(True), qos=1, retain=True)
        client.subscribe(self.topics.cmd, qos=1)
        self._up_since = time.monotonic()
        with self._lock:
            self.generation += 1
            self.connected = True
        session = "resumed session" if flags.session_present else "new session"
        if self._v5 and properties is not None and hasattr(properties, "SessionExpiryInterval") \
                and properties.SessionExpiryInterval != self.cfg.session_expiry_s:
            session += f", kept {properties.SessionExpiryInterval} s by the broker"
        log.info("connected to %s (MQTT %s%s, %s, connection %d)", self.where, self.cfg.protocol,
                 ", TLS" if self.cfg.tls is not None else "", session, self.connection)
        self._notify()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._lock:
            was = self.connected
            self.connected = False
        if self._refused or self._stopping.is_set():
            self._refused = False
        elif was:
            if time.monotonic() - self._up_since >= self.cfg.reconnect_max_s:
                self.failures = 0  # a connection that held resets the back-off
            why = [str(reason_code)] if _value(reason_code) not in (0, 0x80) else []
            why += [self._paho_error] if self._paho_error else []  # "Unspecified error" says nothing
            detail = f": {'; '.join(why)}" if why else ""
            self._failed(f"lost the connection{detail}", logging.WARNING)
        else:  # closed before the CONNACK: a TLS alert (client certificate refused), or dropped
            detail = _clean(self._paho_error or str(reason_code))
            self._failed(f"closed the connection before accepting it: {detail}"
                         f"{_alert_hint(detail)}", logging.ERROR)
        self._notify()

    def _handle_message(self, client, userdata, msg):
        if msg.topic == self.topics.cmd:
            self._loop.call_soon_threadsafe(self._on_command, bytes(msg.payload))

    # -- used from the asyncio loop ----------------------------------------------------------
    def start(self) -> None:
        jitter = self.cfg.connect_jitter_s
        self._next_delay = self._rng.uniform(0.0, jitter) if jitter > 0 else 0.0
        if self._next_delay > 0:
            log.info("first connection to %s in %.1f s (mqtt.connect_jitter_s)", self.where,
                     self._next_delay)
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry_s
            self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s,
                                      clean_start=False, properties=props)
        else:
            self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def unsubscribe_commands(self) -> None:
        if self.connected:
            self.client.unsubscribe(self.topics.cmd)

    def publish(self, topic: str, payload: str) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=1)

    def publish_status(self) -> None:
        """Publish the (retained) status again: something in it changed."""
        if self.connected:
            self.client.publish(self.topics.status, self._status(True), qos=1, retain=True)

    def stop(self, timeout_s: float = 3.0) -> None:
        """Publish the offline status (retained), then disconnect cleanly."""
        self._stopping.set()
        if self.connected:
            info = self.client.publish(self.topics.status, self._status(False), qos=1,
                                       retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
