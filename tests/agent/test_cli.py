"""`lmt --help` and every `lmt <sub> --help` explain themselves; bad input gets a clear error."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lmt.agent.cli import build_parser, main, parse_duration
from tests.conftest import EXAMPLES, lmt_argv

SUBCOMMANDS = [["run"], ["sim"], ["platform"], ["platform", "keygen"], ["platform", "sign"],
               ["platform", "send"], ["platform", "watch"], ["demo"], ["schemas"], ["warmup"]]


def test_top_level_help_lists_every_subcommand() -> None:
    res = subprocess.run(lmt_argv("--help"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for sub in ("run", "sim", "platform", "demo", "schemas", "warmup"):
        assert f"    {sub}" in res.stdout


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=" ".join)
def test_each_subcommand_explains_itself(sub: list[str], capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args([*sub, "--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: lmt " + " ".join(sub))
    assert len(text.splitlines()) > 4


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("1h30m") == 5400
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("soon")


def test_run_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text((EXAMPLES / "demo-agent.toml").read_text().replace("port = 5020", 'port = "x"'))
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: devices[0].port:" in err and "valid integer" in err


def test_run_check_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text((EXAMPLES / "demo-agent.toml").read_text())
    assert main(["platform", "keygen", "--out", str(tmp_path)]) == 0
    assert main(["run", "--config", str(cfg), "--check"]) == 0
    assert "configuration is valid" in capsys.readouterr().out


def test_run_refuses_a_missing_public_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text((EXAMPLES / "demo-agent.toml").read_text())
    for args in (["--check"], []):  # exit 2: systemd does not restart on it
        assert main(["run", "--config", str(cfg), *args]) == 2
        err = capsys.readouterr().err
        assert "security.platform_public_key" in err and "platform.pub not found" in err


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["platform", "keygen", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "platform.key").exists() and (tmp_path / "platform.pub").exists()
    assert main(["platform", "keygen", "--out", str(tmp_path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_send_to_a_dead_broker_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    from lmt.agent.broker import free_port

    main(["platform", "keygen", "--out", str(tmp_path)])
    rc = main(["platform", "send", "--broker", f"127.0.0.1:{free_port()}", "--terminal", "t1",
               "--key", str(tmp_path / "platform.key"), "cap", "--kw", "5", "--for", "1m"])
    assert rc == 1
    assert "cannot reach the broker" in capsys.readouterr().err
