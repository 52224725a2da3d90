"""Configuration: the shipped examples validate; a bad file names file, key and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmt.config import ConfigError, load_agent_config, load_profile, load_site
from lmt.config.profiles import PROFILE_DIR, DataType, Table, available_profiles

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"


def test_every_shipped_profile_validates() -> None:
    ids = available_profiles()
    assert {"eastron-sdm630", "generic-relay-8"} <= set(ids)
    for pid in ids:
        prof = load_profile(pid)
        assert prof.source
        assert prof.points


def test_profile_defaults_fill_points() -> None:
    sdm = load_profile("eastron-sdm630")
    p = sdm.point("power_w")
    assert (p.table, p.type, p.address, p.unit) == (Table.INPUT, DataType.FLOAT32, 0x34, "W")
    relay = load_profile("generic-relay-8").point("relay_8")
    assert relay.table is Table.COIL and relay.writable and relay.address == 7


PUBLIC_PEM = ("-----BEGIN PUBLIC KEY-----\n"
              "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
              "-----END PUBLIC KEY-----\n")


def test_examples_validate(tmp_path: Path) -> None:
    site = load_site(EXAMPLES / "demo-site.toml")
    assert len(site.loads) == 7
    (tmp_path / "demo-agent.toml").write_text((EXAMPLES / "demo-agent.toml").read_text())
    (tmp_path / "platform.pub").write_text(PUBLIC_PEM)
    agent = load_agent_config(tmp_path / "demo-agent.toml")
    assert agent.terminal.id == "demo-0001"
    # relative paths resolve against the config file's folder
    assert agent.security.platform_public_key == tmp_path / "platform.pub"
    assert agent.buffer.path == tmp_path / "lmt-buffer.sqlite"


def test_public_key_file_is_checked(tmp_path: Path) -> None:
    text = (EXAMPLES / "demo-agent.toml").read_text()
    (tmp_path / "agent.toml").write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_agent_config(tmp_path / "agent.toml")
    assert "security.platform_public_key" in str(ei.value) and "not found" in str(ei.value)
    (tmp_path / "platform.pub").write_text("-----BEGIN PRIVATE KEY-----\nxx\n")
    with pytest.raises(ConfigError, match="a terminal holds only the public key"):
        load_agent_config(tmp_path / "agent.toml")


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    (tmp_path / "p.pub").write_text(PUBLIC_PEM)
    return p


BASE = """
[terminal]
id = "t1"
[security]
platform_public_key = "p.pub"
[[devices]]
name = "m"
profile = "eastron-sdm630"
host = "127.0.0.1"
port = {port}
[control]
main_meter = "m"
"""


def test_wrong_type_names_file_key_and_expectation(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE.format(port='"abc"'))
    with pytest.raises(ConfigError) as ei:
        load_agent_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "devices[0].port" in msg
    assert "valid integer" in msg and "'abc'" in msg


def test_out_of_range_and_unknown_key(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE.format(port=70000) + "\n[poll]\nintervall_s = 1\n")
    with pytest.raises(ConfigError) as ei:
        load_agent_config(p)
    keys = [k for k, _ in ei.value.problems]
    assert "devices[0].port" in keys
    assert "poll.intervall_s" in keys
    assert "unknown key" in str(ei.value)


def test_missing_required_key(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE.format(port=502).replace('[terminal]\nid = "t1"\n', ""))
    with pytest.raises(ConfigError) as ei:
        load_agent_config(p)
    assert ("terminal", "missing (required)") in ei.value.problems


def test_reference_errors_are_explained(tmp_path: Path) -> None:
    text = BASE.format(port=502) + '\n[[loads]]\nname = "x"\ndevice = "m"\npoint = "power_w"\n' \
        'rated_kw = 5\n'
    with pytest.raises(ConfigError) as ei:
        load_agent_config(_write(tmp_path, text))
    assert "loads[0].point" in str(ei.value) and "writable" in str(ei.value)
    bad_profile = BASE.format(port=502).replace("eastron-sdm630", "no-such-meter")
    with pytest.raises(ConfigError) as ei:
        load_agent_config(_write(tmp_path, bad_profile))
    assert "unknown profile 'no-such-meter'" in str(ei.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_agent_config(_write(tmp_path, "[terminal\n"))
    assert "not valid TOML" in str(ei.value) and "line 1" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        load_agent_config(tmp_path / "nope.toml")
    assert "file not found" in str(ei.value)


def test_profile_checks(tmp_path: Path) -> None:
    from lmt.config.profiles import load_profile_file

    p = tmp_path / "acme-x.toml"
    p.write_text('id = "acme-x"\nvendor = "a"\nmodel = "b"\nkind = "meter"\nsource = "s"\n'
                 '[[points]]\nname = "p"\ntable = "coil"\naddress = 1\ntype = "float32"\n')
    with pytest.raises(ConfigError) as ei:
        load_profile_file(p)
    assert "points[0]" in str(ei.value) and "must have type 'bool'" in str(ei.value)
    assert PROFILE_DIR.is_dir()


def test_a_load_must_be_a_writable_coil(tmp_path: Path) -> None:
    # the EV charger's current setpoint is writable, but a holding register: write_coil would
    # refuse it in the middle of a command
    text = BASE.format(port=502) + (
        '\n[[devices]]\nname = "ev"\nprofile = "alfen-ng9xx"\nhost = "127.0.0.1"\n'
        '\n[[devices]]\nname = "relays"\nprofile = "generic-relay-8"\nhost = "127.0.0.1"\n'
        '\n[[loads]]\nname = "pump"\ndevice = "relays"\npoint = "relay_1"\nrated_kw = 5\n'
        '\n[[loads]]\nname = "ev"\ndevice = "ev"\npoint = "ev_setpoint_a"\nrated_kw = 11\n')
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_agent_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "loads[1].point" in msg and "loads[0]" not in msg
    assert "ev.ev_setpoint_a (alfen-ng9xx) is a holding register point" in msg
    assert "writable coil" in msg and 'class = "adjustable"' in msg
    # the coil alone is fine
    load_agent_config(_write(tmp_path, text[:text.rindex("[[loads]]")]))


def test_load_classes(tmp_path: Path) -> None:
    head = BASE.format(port=502) + (
        '\n[[devices]]\nname = "ev"\nprofile = "alfen-ng9xx"\nhost = "127.0.0.1"\n'
        '\n[[devices]]\nname = "relays"\nprofile = "generic-relay-8"\nhost = "127.0.0.1"\n')
    ev = '\n[[loads]]\nname = "ev"\ndevice = "ev"\npoint = "ev_setpoint_a"\nrated_kw = 22\n'
    relay = '\n[[loads]]\nname = "boiler"\ndevice = "relays"\npoint = "relay_1"\nrated_kw = 5\n'
    ok = load_agent_config(_write(tmp_path, head + ev + 'class = "adjustable"\nfull_scale = 32\n'
                                  'min_pct = 20\nrewrite_s = 30\n' + relay
                                  + 'class = "deferrable"\nmax_off_s = 900\nmin_on_s = 600\n'))
    assert [ld.kind for ld in ok.loads] == ["adjustable", "deferrable"]
    assert ok.loads[1].min_on_s == 600 and ok.loads[0].full_scale == 32
    crit = load_agent_config(_write(tmp_path, head + relay + "critical = true\n"))
    assert crit.loads[0].kind == "critical" and crit.loads[0].critical
    bad = [
        (ev + 'class = "adjustable"\n', "loads[0].full_scale", "in A, not %"),
        (relay + 'class = "adjustable"\nfull_scale = 1\n', "loads[0].point",
         "not a setpoint"),
        (relay + 'class = "deferrable"\n', "loads[0]", "give max_off_s"),
        (relay + 'class = "boost"\n', "loads[0].class", "'critical', 'interruptible'"),
        (relay + 'class = "adjustable"\ncritical = true\n', "loads[0]", "contradicts"),
        (relay + "min_pct = 10\n", "loads[0]", "are for class = \"adjustable\""),
        (ev + 'class = "adjustable"\nfull_scale = 32\nround = 2\n', "loads[0]",
         "trip rounds open breakers"),
        (ev + 'class = "adjustable"\nfull_scale = 32\nmax_off_s = 60\n', "loads[0]",
         "never switched off"),
        (relay + "min_on_s = -1\n", "loads[0].min_on_s", "greater than or equal to 0"),
    ]
    for body, key, what in bad:
        p = _write(tmp_path, head + body)
        with pytest.raises(ConfigError) as ei:
            load_agent_config(p)
        msg = str(ei.value)
        assert str(p) in msg and key in msg and what in msg, (body, msg)


LINES = """
[[lines]]
name = "{a}"
port = "{port_a}"
protocol = "modbus-rtu"

[[lines]]
name = "{b}"
port = "{port_b}"
protocol = "dlt645"
"""


def test_lines_have_unique_names_and_ports(tmp_path: Path) -> None:
    def check(**kw: str) -> str:
        p = _write(tmp_path, BASE.format(port=502) + LINES.format(**kw))
        with pytest.raises(ConfigError) as ei:
            load_agent_config(p)
        assert str(p) in str(ei.value)
        return str(ei.value)

    msg = check(a="rs485", port_a="/dev/ttyUSB0", b="meters", port_b="/dev/ttyUSB0")
    assert "lines[1].port" in msg and "'meters'" in msg and "'rs485'" in msg
    assert "cannot share a serial port" in msg
    # the same port through a link (as /dev/serial/by-id/ names adapters)
    (tmp_path / "tty-real").touch()
    (tmp_path / "by-id-link").symlink_to(tmp_path / "tty-real")
    msg = check(a="rs485", port_a=str(tmp_path / "tty-real"), b="meters",
                port_b=str(tmp_path / "by-id-link"))
    assert "lines[1].port" in msg and "the same port as" in msg
    msg = check(a="rs485", port_a="/dev/ttyUSB0", b="rs485", port_b="/dev/ttyUSB1")
    assert "lines[1].name" in msg and "'rs485' is used twice" in msg
    # distinct names and ports validate
    ok = _write(tmp_path, BASE.format(port=502) + LINES.format(
        a="rs485", port_a="/dev/ttyUSB0", b="meters", port_b="/dev/ttyUSB1"))
    assert [ln.name for ln in load_agent_config(ok).lines] == ["rs485", "meters"]
