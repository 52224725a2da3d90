"""TLS and authentication against a real mosquitto with certificates made by the test: the
agent's link and the platform tools connect with a CA and client certificates; a broker
certificate from another CA, a wrong name, a missing client certificate and a wrong password
are refused with a clear log line, retried with back-off, never a crash."""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmt.agent.broker import Broker, BrokerTls
from lmt.config.agent import Tls
from tests.agent.link_harness import LinkHarness, platform_client
from tests.certs import Pki, issue, make_pki
from tests.conftest import lmt_argv, wait_until


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(pki: Pki) -> Iterator[Broker]:
    with Broker(tls=BrokerTls(pki.ca_file, pki.server.cert_file, pki.server.key_file)) as b:
        yield b


def agent_tls(pki: Pki, **kw: object) -> dict[str, object]:
    return {"ca_file": pki.ca_file, "cert_file": pki.client.cert_file,
            "key_file": pki.client.key_file, **kw}


def platform_tls(pki: Pki, tmp_path: Path) -> Tls:
    own = issue(pki.ca, tmp_path, "platform", server=False)
    return Tls(ca_file=pki.ca_file, cert_file=own.cert_file, key_file=own.key_file)


def errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.name == "lmt.mqtt" and r.levelno >= logging.ERROR)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_link_over_tls_with_a_client_certificate(pki: Pki, tls_broker: Broker, tmp_path: Path,
                                                 protocol: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmt.mqtt")
    with LinkHarness(port=tls_broker.port, protocol=protocol, tls=agent_tls(pki)) as h:
        h.wait_connected()
        plat = platform_client(tls_broker.port, [h.topics.telemetry], tls=platform_tls(pki, tmp_path))
        try:
            h.wait_subscribed(plat)
            plat.publish(h.topics.cmd, '{"v": 1}')
            wait_until(lambda: h.commands == [b'{"v": 1}'], 10, "the command over TLS")
            info = h.link.publish(h.topics.telemetry, '{"records": []}')
            info.wait_for_publish(10)
            assert info.is_published()
            msg = plat.messages.get(timeout=10)
            assert msg.topic == h.topics.telemetry and msg.payload == b'{"records": []}'
        finally:
            plat.close()
    assert f"(MQTT {protocol}, TLS" in caplog.text
    assert "u'" not in tls_broker.log_text()  # no user name: the certificate did it


def test_a_broker_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    other = make_pki(tmp_path / "other", "other-ca")
    with Broker(tls=BrokerTls(other.ca_file, other.server.cert_file, other.server.key_file)) as b, \
            LinkHarness(port=b.port, tls=agent_tls(pki)) as h:
        wait_until(lambda: h.link.failures >= 3, 15, "three refused attempts")
        assert not h.link.connected and h.link.generation == 0
        text = errors(caplog)
        assert "TLS: the broker's certificate was refused" in text
        assert ("self-signed certificate in certificate chain" in text  # the chain came with its CA
                or "unable to get local issuer certificate" in text)
        assert "mqtt.tls.ca_file" in text
        n = h.link.failures
        wait_until(lambda: h.link.failures > n, 10, "it to keep trying")


def test_the_broker_name_is_checked_unless_insecure(pki: Pki, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    named = issue(pki.ca, tmp_path, "named-broker", server=True, hosts=("broker.example",))
    with Broker(tls=BrokerTls(pki.ca_file, named.cert_file, named.key_file)) as b:
        with LinkHarness(port=b.port, tls=agent_tls(pki)) as h:
            wait_until(lambda: h.link.failures >= 2, 15, "refused attempts")
            assert not h.link.connected
            assert "mismatch" in errors(caplog) and "mqtt.tls.insecure" in errors(caplog)
        with LinkHarness(port=b.port, tls=agent_tls(pki, insecure=True)) as h:
            h.wait_connected()


def test_a_terminal_without_a_client_certificate_is_refused(pki: Pki, tls_broker: Broker,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    with LinkHarness(port=tls_broker.port, tls={"ca_file": pki.ca_file}) as h:
        wait_until(lambda: h.link.failures >= 2, 15, "refused attempts")
        assert not h.link.connected and h.link.generation == 0
    assert "certificate" in errors(caplog).lower()


def test_user_name_and_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "mqtt-password").write_text("right horse battery\n")
    (tmp_path / "wrong-password").write_text("wrong\n")
    users = {"t-0001": "right horse battery", "platform": "console"}
    with Broker(users=users) as b:
        with LinkHarness(port=b.port, username="t-0001",
                         password_file=tmp_path / "mqtt-password") as h:
            h.wait_connected()
            plat = platform_client(b.port, [], username="platform", password="console")
            try:
                h.wait_subscribed(plat)
            finally:
                plat.close()
        with LinkHarness(port=b.port, username="t-0001",
                         password_file=tmp_path / "wrong-password") as h:
            wait_until(lambda: h.link.failures >= 3, 15, "refused attempts")
            assert not h.link.connected and h.link.generation == 0
        with LinkHarness(port=b.port) as h:  # anonymous
            wait_until(lambda: h.link.failures >= 2, 15, "refused attempts")
            assert not h.link.connected
    text = errors(caplog)
    assert "refused the connection: Not authorized" in text
    assert "check mqtt.username" in text


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out


def test_platform_send_and_watch_over_tls_with_a_password(pki: Pki, tmp_path: Path) -> None:
    own = issue(pki.ca, tmp_path, "console", server=False)
    (tmp_path / "console-password").write_text("console-pw\n")
    tls = BrokerTls(pki.ca_file, pki.server.cert_file, pki.server.key_file)
    users = {"t-0001": "agent-pw", "console": "console-pw"}
    (tmp_path / "agent-password").write_text("agent-pw\n")
    conn = ["--cafile", str(pki.ca_file), "--client-cert", str(own.cert_file),
            "--client-key", str(own.key_file), "--username", "console",
            "--password-file", str(tmp_path / "console-password")]
    with Broker(tls=tls, users=users) as b, \
            LinkHarness(port=b.port, tls=agent_tls(pki), username="t-0001",
                        password_file=tmp_path / "agent-password") as h:
        h.wait_connected()
        broker = ["--broker", f"127.0.0.1:{b.port}"]
        watch = subprocess.Popen(lmt_argv("platform", "watch", *broker, *conn, "--terminal",
                                          "t-0001", "--json", "--count", "1"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines = _lines(watch)
            status = json.loads(lines.get(timeout=20))  # the retained birth: watch is subscribed
            assert status["stream"] == "status" and status["status"]["online"] is True

            cmd = tmp_path / "cmd.json"
            cmd.write_text('{"v": 1, "body": "{\\"id\\": \\"c-1\\"}", "sig": "x"}')
            sent = subprocess.run(lmt_argv("platform", "send", *broker, *conn, "--terminal",
                                           "t-0001", "--raw", str(cmd), "--wait", "none"),
                                  capture_output=True, text=True, timeout=30)
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: h.commands == [cmd.read_bytes()], 10, "the command")

            rec = {"seq": 1, "ts": time.time(), "command_id": "c-1", "status": "accepted",
                   "reason": None, "detail": "", "data": {}}
            h.link.publish(h.topics.result, json.dumps(
                {"terminal": "t-0001", "stream": "results", "historical": False,
                 "records": [rec]}))
            got = json.loads(lines.get(timeout=20))
            assert got["record"]["command_id"] == "c-1" and got["stream"] == "results"
            assert watch.wait(20) == 0
        finally:
            if watch.poll() is None:
                watch.kill()
            watch.wait()

        bad = subprocess.run(lmt_argv("platform", "watch", *broker, "--cafile", str(pki.ca_file),
                                      "--duration", "5"), capture_output=True, text=True,
                             timeout=30)
        assert bad.returncode == 1 and "refused" in bad.stderr, bad.stderr


def _load(tmp_path: Path, **mqtt: object) -> str:
    """Load an agent file with these [mqtt] keys; '' when valid, else the error text."""
    import tomllib

    import tomli_w

    from lmt.config import ConfigError, load_agent_config
    from tests.agent.harness import write_agent_config

    path = tmp_path / "agent.toml"
    if not path.exists():
        write_agent_config(tmp_path, 5020, 1883)
    cfg = tomllib.loads(path.read_text())
    cfg["mqtt"] = {"port": 1883, **mqtt}
    path.write_text(tomli_w.dumps(cfg))
    try:
        load_agent_config(path)
    except ConfigError as exc:
        return str(exc)
    return ""


def test_mqtt_configuration_errors_name_the_key_and_the_file(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = str(pki.client.cert_file), str(pki.client.key_file)
    other = make_pki(tmp_path / "other", "other-ca")
    enc = tmp_path / "encrypted.key"
    enc.write_bytes(pki.client.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    (tmp_path / "pw").write_text("s3cret\n")
    assert _load(tmp_path, tls={"ca_file": str(pki.ca_file), "cert_file": cert, "key_file": key},
                 protocol=5, username="u", password_file="pw") == ""  # relative to the file

    got = _load(tmp_path, tls={"ca_file": "missing-ca.pem"})
    assert "mqtt.tls.ca_file: file " in got and "missing-ca.pem not found" in got
    got = _load(tmp_path, tls={"cert_file": cert})
    assert "mqtt.tls: cert_file is given without key_file" in got
    got = _load(tmp_path, tls={"cert_file": cert, "key_file": str(other.client.key_file)})
    assert "mqtt.tls: cert_file, key_file:" in got and "is not the key of" in got
    got = _load(tmp_path, tls={"cert_file": cert, "key_file": str(enc)})
    assert "encrypted.key is encrypted" in got
    got = _load(tmp_path, tls={"ca_file": key})
    assert "mqtt.tls: ca_file:" in got and "no usable PEM CA certificate" in got
    got = _load(tmp_path, username="u", password_file="no-such-file")
    assert "mqtt.password_file: file " in got and "no-such-file not found" in got
    assert "needs username" in _load(tmp_path, password_file="pw")
    assert "not both" in _load(tmp_path, username="u", password="x", password_file="pw")
    assert "mqtt.protocol" in _load(tmp_path, protocol="4")
    assert "reconnect_max_s" in _load(tmp_path, reconnect_min_s=5, reconnect_max_s=1)
