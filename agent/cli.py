"""The `lmt` command line: one program, one subcommand per job."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

DEFAULT_PREFIX = "lmt/v1"


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '1h', '1h30m' -> seconds."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                     text)
    if not m or not any(m.groups()):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 90, 90s, 15m, 1h)")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    total = h * 3600 + mi * 60 + s
    if total <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return total


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 time ('2026-11-26T14:00:00+08:00'; local time if no zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    from datetime import datetime
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from None


def parse_day(text: str) -> date:
    """'2026-07-15' -> a date."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day: {text!r} (expected YYYY-MM-DD)") from None


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


# -- run -------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from lmt.config import ConfigError, load_agent_config

    _setup_logging(args.log_level)
    try:
        cfg = load_agent_config(args.config)
    except ConfigError as exc:
        print(f"lmt run: configuration error\n{exc}", file=sys.stderr)
        return 2
    if cfg.ledger_meters():  # the ledger's data files (tariff, holidays, factors) too
        from lmt.config.profiles import load_profile

        from .ledger import ledger_config

        try:
            ledger_config(cfg, {d.name: load_profile(d.profile) for d in cfg.devices})
        except ConfigError as exc:
            print(f"lmt run: configuration error\n{exc}", file=sys.stderr)
            return 2
    if args.check:
        print(f"{args.config}: configuration is valid ({len(cfg.devices)} devices, "
              f"{len(cfg.loads)} loads)")
        return 0
    from .buffer import BufferError
    from .daemon import Agent, AgentFailed

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(cfg, Path(args.config))
        await agent.run(stop)

    try:
        asyncio.run(main())
    except (BufferError, AgentFailed) as exc:
        print(f"lmt run: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"lmt run: {exc}", file=sys.stderr)
        return 1
    return 0


# -- sim -------------------------------------------------------------------------------------
def cmd_sim(args: argparse.Namespace) -> int:
    from lmt.firmware_sim.cli import run

    _setup_logging(args.log_level)
    return run(args)


# -- platform --------------------------------------------------------------------------------
def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give load names separated by commas")
    return names


def _command_body(args: argparse.Namespace) -> dict:
    from .platform import command_body

    common = {"command_id": args.id, "expires_in_s": args.expires_in,
              "issued_at": args.issued_at}
    if args.kind == "cap":
        return command_body("cap", args.terminal, cap_kw=args.kw, duration_s=args.duration,
                            until=args.until, loads=args.loads, **common)
    if args.kind == "shed":
        return command_body("shed", args.terminal, shed_kw=args.kw, duration_s=args.duration,
                            loads=args.loads, **common)
    if args.kind == "dr_event":
        from .platform import dr_event_body

        start = args.start if args.start is not None else time.time() + (args.start_in or 0.0)
        return dr_event_body(args.terminal, start=start, duration_s=args.duration,
                             signal=args.signal, value=args.value, randomize_s=args.randomize,
                             ramp_s=args.ramp, recovery_s=args.recovery, **common)
    if args.kind == "modes":
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise SystemExit(f"lmt platform {args.action}: --params is not JSON: {exc}") from None
        return command_body("modes", args.terminal, params=params, **common)
    if args.kind == "remote":
        return command_body("remote", args.terminal, round=args.round, action=args.remote_action,
                            alarm_delay_min=args.alarm_delay, limit_half_hours=args.limit,
                            **common)
    if args.kind == "guarantee":
        return command_body("guarantee", args.terminal, on=args.state == "on",
                            duration_half_hours=args.half_hours, auto_after_h=args.auto_after,
                            **common)
    if args.kind == "tariff":
        start = args.effective_from if args.effective_from is not None else time.time()
        return command_body("tariff", args.terminal, tariff=_tariff_payload(args),
                            effective_from=round(start, 3), **common)
    if args.kind == "carbon_curve":
        return command_body("carbon_curve", args.terminal, curve=_curve_payload(args), **common)
    return command_body("cancel", args.terminal, target=args.target, **common)


def _data_file(path: str, action: str) -> dict[str, Any]:
    """A TOML or JSON file's content."""
    import tomllib

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"lmt platform {action}: {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except ValueError as exc:
        raise SystemExit(f"lmt platform {action}: {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"lmt platform {action}: {path}: expected an object")
    return data


def _tariff_payload(args: argparse.Namespace) -> dict[str, Any]:
    """The tariff file as JSON, checked as the terminal will check it (a shipped id or a file);
    ``--unchecked`` sends it as it is (to test a terminal's refusal)."""
    from lmt.analytics.tariff import parse_tariff

    from .ledger import TARIFFS

    path = args.file if args.file.endswith((".toml", ".json")) else str(TARIFFS / f"{args.file}.toml")
    data = _data_file(path, args.action)
    if args.unchecked:
        return json.loads(json.dumps(data, default=str))
    try:
        return parse_tariff(data).to_dict()
    except ValueError as exc:
        raise SystemExit(f"lmt platform {args.action}: {path}: {exc}") from None


def _curve_payload(args: argparse.Namespace) -> dict[str, Any]:
    from lmt.analytics.carbon import parse_curve

    data = _data_file(args.file, args.action)
    try:
        parse_curve(data)
    except ValueError as exc:
        raise SystemExit(f"lmt platform {args.action}: {args.file}: {exc}") from None
    return data


_TLS_FLAGS = {"ca_file": "--cafile", "cert_file": "--client-cert", "key_file": "--client-key"}


def _broker_options(args: argparse.Namespace) -> Any:
    """TLS and credentials from --tls, --cafile, --client-cert, --client-key, --insecure,
    --username, --password-file. Raises ValueError naming the option at fault."""
    from pydantic import ValidationError

    from lmt.config.agent import Tls
    from lmt.config.errors import validation_problems

    from .platform import BrokerOptions

    tls = None
    if args.tls or args.cafile or args.client_cert or args.client_key or args.insecure:
        try:
            tls = Tls(ca_file=args.cafile, cert_file=args.client_cert, key_file=args.client_key,
                      insecure=args.insecure)
        except ValidationError as exc:
            raise ValueError("; ".join(
                f"{_TLS_FLAGS.get(k, 'TLS')}: {m}"
                for k, m in validation_problems(exc))) from None
    password = None
    if args.password_file:
        if not args.username:
            raise ValueError("--password-file needs --username")
        try:
            lines = Path(args.password_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"--password-file: cannot read {args.password_file}: "
                             f"{exc.strerror}") from None
        password = lines[0] if lines else ""
    return BrokerOptions(tls=tls, username=args.username, password=password)


def cmd_platform(args: argparse.Namespace) -> int:
    from .platform import send, sign_command_file, watch
    from .security import generate_keypair

    if args.action == "keygen":
        try:
            key, pub = generate_keypair(Path(args.out), args.name, overwrite=args.force)
        except FileExistsError as exc:
            print(f"lmt platform keygen: {exc} (use --force to replace)", file=sys.stderr)
            return 1
        print(f"private key: {key}  (keep it on the platform; never copy it to a terminal)")
        print(f"public key:  {pub}  (install on every terminal: security.platform_public_key)")
        return 0
    if args.action == "sign":
        print(sign_command_file(Path(args.key), _command_body(args)))
        return 0
    options = None
    if args.action in ("send", "watch"):
        try:
            options = _broker_options(args)
        except ValueError as exc:
            print(f"lmt platform {args.action}: {exc}", file=sys.stderr)
            return 2
    if args.action == "send":
        host, port = args.broker
        if args.raw:
            payload = Path(args.raw).read_text() if args.raw != "-" else sys.stdin.read()
        else:
            if not args.key or not args.kind:
                print("lmt platform send: give --key and a command (cap, shed, dr_event, cancel, "
                      "modes, remote, guarantee), "
                      "or --raw FILE", file=sys.stderr)
                return 2
            payload = sign_command_file(Path(args.key), _command_body(args))

        def show(rec: dict) -> None:
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                reason = f" ({rec['reason']})" if rec.get("reason") else ""
                print(f"{rec.get('command_id')}: {rec.get('status')}{reason} "
                      f"{rec.get('detail', '')}".rstrip(), flush=True)

        try:
            results = send(host, port, args.prefix, args.terminal, payload, wait=args.wait,
                           timeout_s=args.timeout, out=show, options=options)
        except (ConnectionError, TimeoutError) as exc:
            print(f"lmt platform send: {exc}", file=sys.stderr)
            return 1
        if args.wait == "none":
            print("sent")
            return 0
        return 3 if any(r.get("status") == "rejected" for r in results) else 0
    if args.action == "watch":
        host, port = args.broker
        try:
            tracker = watch(host, port, args.prefix, args.terminal, as_json=args.json,
                            duration_s=args.duration, count=args.count, options=options)
        except ConnectionError as exc:
            print(f"lmt platform watch: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        if not args.json:
            print(f"-- {tracker.duplicates} duplicates dropped, "
                  f"{len(tracker.open_gaps())} gaps open", file=sys.stderr)
        return 0
    return 2


# -- optout ----------------------------------------------------------------------------------
def cmd_optout(args: argparse.Namespace) -> int:
    from lmt.config import ConfigError, load_agent_config

    from .buffer import request_optout

    try:
        cfg = load_agent_config(args.config)
    except ConfigError as exc:
        print(f"lmt optout: configuration error\n{exc}", file=sys.stderr)
        return 2
    try:
        request_optout(cfg.buffer.path, args.event_id, args.reason, time.time())
    except FileNotFoundError as exc:
        print(f"lmt optout: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # sqlite3.Error, OSError: a locked or damaged file
        print(f"lmt optout: cannot write the request to the buffer {cfg.buffer.path}: {exc}",
              file=sys.stderr)
        return 1
    print(f"opt-out of DR event {args.event_id} requested; the agent applies it in its next "
          "control cycle and reports opted_out on the result topic")
    return 0


# -- ledger ----------------------------------------------------------------------------------
def cmd_ledger(args: argparse.Namespace) -> int:
    from .ledger_report import run_cli

    return run_cli(args)


# -- field tools -----------------------------------------------------------------------------
def _target(args: argparse.Namespace) -> Any:
    from .fieldtools import Target

    if args.tcp:
        host, _, port = args.tcp.rpartition(":") if ":" in args.tcp else (args.tcp, "", "502")
        if not port.isdigit():
            raise ValueError(f"--tcp expects HOST[:PORT], got {args.tcp!r}")
        return Target(tcp=(host, int(port)), timeout_s=args.timeout)
    port = args.serial or args.dlt645
    return Target(serial=port, protocol="dlt645" if args.dlt645 else "modbus", baud=args.baud,
                  parity=args.parity, stop_bits=args.stop_bits, byte_size=args.byte_size,
                  timeout_s=args.timeout)


def cmd_read(args: argparse.Namespace) -> int:
    from lmt.config.profiles import load_profile
    from lmt.drivers.errors import DriverError

    from . import fieldtools as ft

    try:
        target = _target(args)
        if target.protocol == "dlt645":
            return _read_dlt645(args, target)
        if not args.raw and not args.profile:
            raise ValueError("give --profile (decoded points) or --raw TABLE:ADDRESS[:COUNT]")
        raw = ft.RawRequest.parse(args.raw) if args.raw else None
        profile = load_profile(args.profile) if args.profile else None
        if profile is not None and profile.protocol != "modbus":
            raise ValueError(f"profile {profile.id!r} is {profile.protocol}; use --dlt645")
        for name in args.points:
            if profile is None or not profile.has_point(name):
                raise ValueError(f"profile {args.profile!r} has no point {name!r}")
    except (ValueError, KeyError) as exc:
        print(f"lmt read: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2

    async def go() -> Any:
        bus = ft.make_modbus_bus(target)
        try:
            await ft.open_target(target, bus)
            if raw is not None:
                return await ft.read_raw(bus, args.device_id, raw)
            assert profile is not None
            return await ft.read_points(bus, args.device_id, profile, args.points)
        finally:
            bus.close()

    try:
        got = ft.run(go())
    except DriverError as exc:
        return ft.report_error("read", target, exc, args.json)
    if raw is not None:
        if args.json:
            ft.dump_json({"table": raw.table.value, "address": raw.address, "values": got})
        else:
            for i, v in enumerate(got):
                shown = ("on" if v else "off") if isinstance(v, bool) else f"{v:5d}  0x{v:04X}"
                print(f"{raw.table.value} {raw.address + i:5d}  {shown}")
        return 0
    assert profile is not None
    if args.json:
        ft.dump_json({"device_id": args.device_id, "profile": profile.id, "values": got})
    else:
        for name, v in got.items():
            print(f"{name:24s} {ft.format_value(v, profile.point(name).unit)}")
    return 0


def _read_dlt645(args: argparse.Namespace, target: Any) -> int:
    from . import fieldtools as ft

    return ft.read_dlt645_cli(args, target)


def cmd_scan(args: argparse.Namespace) -> int:
    from lmt.drivers.errors import DriverError

    from . import fieldtools as ft

    try:
        target = _target(args)
        ids = ft.parse_ids(args.ids)
    except ValueError as exc:
        print(f"lmt scan: {exc}", file=sys.stderr)
        return 2
    if target.protocol == "dlt645":
        return ft.scan_dlt645_cli(args, target)

    async def go() -> list[Any]:
        bus = ft.make_modbus_bus(target)

        async def reopen() -> None:
            await ft.open_target(target, bus)

        try:
            await reopen()  # a port that cannot be used is an error, not "0 found"
            return await ft.scan_modbus(bus, ids, ft.Progress(), identify=not args.no_identify,
                                        reopen=reopen)
        finally:
            bus.close()

    try:
        found = ft.run(go())
    except DriverError as exc:
        return ft.report_error("scan", target, exc, args.json)
    if args.json:
        ft.dump_json({"target": target.describe(), "found": [
            {"device_id": f.device_id, "answered": f.answered, "profile": f.profile}
            for f in found]})
        return 0
    print(f"{target.describe()}: {len(found)} device(s) answered")
    for f in found:
        hint = f"  suggested profile: {f.profile}" if f.profile else "  no profile matches"
        print(f"  id {f.device_id:3d}  ({f.answered}){hint}")
    return 0


# -- misc ------------------------------------------------------------------------------------
def cmd_schemas(args: argparse.Namespace) -> int:
    from .schemas import check_schemas, write_schemas

    out = Path(args.out)
    if args.check:
        stale = check_schemas(out)
        for name in stale:
            print(f"stale: {out / name} (run: lmt schemas --out {out})", file=sys.stderr)
        return 1 if stale else 0
    for p in write_schemas(out):
        print(p)
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    from lmt.analytics import baseline, forecast
    from lmt.control import warmup

    t0 = time.perf_counter()
    warmup()
    baseline.warmup()
    forecast.warmup()
    print(f"control and analytics kernels ready in {time.perf_counter() - t0:.2f} s "
          "(numba on-disk cache)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(cap_for_s=args.cap_for, verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmt", description="lmt-edge: an electricity load-management terminal. Polls "
        "meters and relays, buffers every reading, syncs with the utility's platform over MQTT "
        "and carries out signed curtailment commands.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="run the terminal agent (the systemd service runs this)",
                       description="Run the agent: poll devices, buffer, sync to MQTT, and carry "
                       "out signed commands. Stops cleanly on SIGTERM/SIGINT.")
    r.add_argument("--config", required=True, help="agent configuration file (TOML)")
    r.add_argument("--check", action="store_true", help="validate the configuration and exit")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_run)

    from lmt.firmware_sim.cli import DESCRIPTION as SIM_DESCRIPTION
    from lmt.firmware_sim.cli import add_arguments as add_sim_arguments

    s = sub.add_parser("sim", help="serve a simulated site: Modbus TCP, RTU and DL/T 645 lines",
                       description=SIM_DESCRIPTION)

    add_sim_arguments(s)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_sim)

    pl = sub.add_parser("platform", help="the utility's reference client: keys, commands, watch",
                        description="The platform side: make the signing keys, send signed "
                        "commands to a terminal, and watch telemetry and command results.")
    pls = pl.add_subparsers(dest="action", metavar="ACTION", required=True)
    kg = pls.add_parser("keygen", help="make the platform's Ed25519 key pair",
                        description="Write NAME.key (private, keep on the platform) and NAME.pub "
                        "(public, install on terminals).")
    kg.add_argument("--out", default="keys", help="folder for the key files (default: keys)")
    kg.add_argument("--name", default="platform")
    kg.add_argument("--force", action="store_true", help="replace existing key files")

    def add_command_args(sp: argparse.ArgumentParser, required: bool) -> None:
        sp.add_argument("--terminal", required=True, help="target terminal id")
        sp.add_argument("--key", required=required, help="platform private key (PEM)")
        sp.add_argument("--id", help="command id (default: random)")
        sp.add_argument("--expires-in", type=float, default=60.0, metavar="S",
                        help="seconds after issue the command may still arrive (default 60)")
        sp.add_argument("--issued-at", type=parse_time, metavar="TIME",
                        help="issue time, unix or ISO 8601 (default: now)")
        kinds = sp.add_subparsers(dest="kind", metavar="COMMAND", required=required)
        c = kinds.add_parser("cap", help="cap the site's import at --kw until --until or --for")
        c.add_argument("--kw", type=float, required=True)
        end = c.add_mutually_exclusive_group(required=True)
        end.add_argument("--for", dest="duration", type=parse_duration, help="e.g. 30s, 15m")
        end.add_argument("--until", type=parse_time, help="unix time or ISO 8601")
        sh = kinds.add_parser("shed", help="reduce the site's import by --kw for --for")
        sh.add_argument("--kw", type=float, required=True)
        sh.add_argument("--for", dest="duration", type=parse_duration, required=True)
        for kp in (c, sh):
            kp.add_argument("--loads", type=_names, metavar="A,B",
                            help="shed only these loads (default: any that is not critical)")
        dr = kinds.add_parser("dr_event", help="a demand-response event: a signal over a window "
                              "(its id, --id, is the event id)")
        when = dr.add_mutually_exclusive_group(required=True)
        when.add_argument("--start", type=parse_time, help="start, unix time or ISO 8601")
        when.add_argument("--start-in", type=parse_duration, metavar="DURATION",
                          help="start this long from now, e.g. 10m")
        dr.add_argument("--for", dest="duration", type=parse_duration, required=True,
                        help="duration (at most 7 days), e.g. 2h")
        dr.add_argument("--signal", required=True,
                        choices=["level", "reduction_kw", "reduction_pct", "cap_kw"])
        dr.add_argument("--value", type=float, required=True,
                        help="level 0-3, kW, percent (0-100] or cap kW, by --signal")
        dr.add_argument("--randomize", type=parse_duration, default=0.0, metavar="DURATION",
                        help="spread the start over this long (default 0)")
        dr.add_argument("--ramp", type=parse_duration, default=0.0, metavar="DURATION",
                        help="reach the full signal over this long (default 0)")
        dr.add_argument("--recovery", type=parse_duration, default=0.0, metavar="DURATION",
                        help="bring loads back over this long after the end (default 0)")
        ca = kinds.add_parser("cancel", help="end an active command or DR event early")
        ca.add_argument("--target", required=True, help="id of the command or DR event to cancel")
        mo = kinds.add_parser("modes", help="set terminal control mode parameters (a partial "
                              "ModeParams as JSON, see docs/control.md)")
        mo.add_argument("--params", required=True, metavar="JSON",
                        help='e.g. \'{"floor_kw": 50, "power": {"slide_min": 5}}\'')
        rc = kinds.add_parser("remote", help="remote trip or allow-close of one trip round")
        rc.add_argument("remote_action", choices=["trip", "close"], metavar="trip|close")
        rc.add_argument("--round", type=int, required=True, help="trip round 1-8")
        rc.add_argument("--alarm-delay", type=int, default=0, metavar="MIN",
                        help="trip: alarm this many minutes first, 0-15 (default 0)")
        rc.add_argument("--limit", type=int, default=0, metavar="HALF_HOURS",
                        help="trip: close again after this many half-hours, 0-255 "
                             "(default 0: until an allow-close)")
        ta = kinds.add_parser("tariff", help="replace the terminal's tariff from a time on "
                              "(docs/tariffs.md)")
        ta.add_argument("--file", required=True, metavar="TARIFF",
                        help="a tariff file (.toml or .json) or a shipped tariff id, e.g. "
                             "jiangsu-2025-two-part")
        ta.add_argument("--from", dest="effective_from", metavar="TIME", type=parse_time,
                        help="price the intervals starting then or later: unix seconds or ISO "
                             "8601 (default: now)")
        ta.add_argument("--unchecked", action="store_true",
                        help="send the file as it is, without checking it first")
        cc = kinds.add_parser("carbon_curve", help="hourly grid emission factors for the "
                              "terminal's carbon (docs/carbon-and-losses.md)")
        cc.add_argument("--file", required=True, metavar="CURVE",
                        help="a .json or .toml file: id, source, start (unix s, on the hour), "
                             "kg_per_kwh (one per hour)")
        gu = kinds.add_parser("guarantee", help="power guarantee on or off: every round closed")
        gu.add_argument("state", choices=["on", "off"])
        gu.add_argument("--half-hours", type=int, default=0,
                        help="on: for this many half-hours, 0-255 (default 0: until off)")
        gu.add_argument("--auto-after", type=int, metavar="H",
                        help="guarantee automatically after H hours without platform contact "
                             "(0 = never; default: unchanged)")

    def add_broker_options(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("broker connection (as the agent's [mqtt] and [mqtt.tls])")
        g.add_argument("--tls", action="store_true",
                       help="TLS, trusting the system's CAs (implied by --cafile, --client-cert)")
        g.add_argument("--cafile", metavar="FILE", help="CA certificate(s) the broker's "
                       "certificate must chain to (PEM)")
        g.add_argument("--client-cert", metavar="FILE",
                       help="client certificate (PEM), with --client-key")
        g.add_argument("--client-key", metavar="FILE", help="its private key (PEM)")
        g.add_argument("--insecure", action="store_true",
                       help="skip the broker hostname check (the chain is still verified)")
        g.add_argument("--username", help="broker user name")
        g.add_argument("--password-file", metavar="FILE",
                       help="file whose first line is the broker password")

    sg = pls.add_parser("sign", help="print a signed command (JSON) without sending it")
    add_command_args(sg, required=True)
    sd = pls.add_parser("send", help="sign and publish a command; print the terminal's answers",
                        description="Sign a command and publish it to the terminal. Exit code: "
                        "0 accepted, 3 rejected, 1 no answer or broker unreachable.")
    sd.add_argument("--broker", type=parse_broker, default=("127.0.0.1", 1883),
                    metavar="HOST:PORT")
    sd.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix ({DEFAULT_PREFIX})")
    sd.add_argument("--wait", choices=["none", "answer", "final"], default="answer",
                    help="wait for nothing, the first answer (default), or the final result")
    sd.add_argument("--timeout", type=float, default=30.0)
    sd.add_argument("--json", action="store_true", help="print results as JSON lines")
    sd.add_argument("--raw", metavar="FILE", help="publish this signed command as it is "
                    "(from `lmt platform sign`; - for stdin)")
    add_broker_options(sd)
    add_command_args(sd, required=False)
    w = pls.add_parser("watch", help="print telemetry, events and results as they arrive",
                       description="Subscribe to terminals' topics; de-duplicate by (terminal, "
                       "stream, seq) and report gaps.")
    w.add_argument("--broker", type=parse_broker, default=("127.0.0.1", 1883), metavar="HOST:PORT")
    w.add_argument("--prefix", default=DEFAULT_PREFIX)
    w.add_argument("--terminal", default="+", help="terminal id (default: all)")
    w.add_argument("--json", action="store_true", help="one JSON object per record")
    w.add_argument("--duration", type=parse_duration, help="stop after this long")
    w.add_argument("--count", type=int, help="stop after this many records")
    add_broker_options(w)
    pl.set_defaults(func=cmd_platform)

    oo = sub.add_parser("optout", help="the customer's local override of a demand-response "
                        "event", description="Ask the running agent to opt this site out of a "
                        "DR event: its loads come back at once and the platform is told "
                        "(opted_out). Run on the terminal, as a user that can write the buffer.")
    oo.add_argument("--config", required=True, help="agent configuration file (TOML)")
    oo.add_argument("event_id", metavar="EVENT_ID", help="id of the DR event")
    oo.add_argument("--reason", default="local override (lmt optout)",
                    help="who overrode it, and how (reported to the platform)")
    oo.set_defaults(func=cmd_optout)

    lg = sub.add_parser(
        "ledger", help="what the energy ledger holds: intervals, bills, balance, carbon, events",
        description="Print what the energy ledger keeps in the buffer: a day's intervals per "
        "ledger meter (start, kWh, mean and max kW, tariff period, cost, kgCO2, quality), the "
        "day's and the month's bill so far (kWh and cost per period, demand charge, fixed "
        "charges, total, kgCO2), the prepaid balance, carbon and the factor used, the loss "
        "groups' figures, and the recent loss, theft and balance events. Reads the buffer "
        "read-only: safe while the agent runs (never takes its lock, never writes). Times are "
        "the terminal's local time (modes.utc_offset_s). Exit code: 0 shown, 1 no buffer or "
        "no ledger in it, 2 a wrong command line or configuration.")
    lg.add_argument("--config", required=True, help="agent configuration file (TOML)")
    lg.add_argument("--day", type=parse_day, metavar="YYYY-MM-DD",
                    help="the local day to show (default: today); the month is its month")
    lg.add_argument("--meter", metavar="NAME", help="only this ledger meter (default: all)")
    lg.add_argument("--events", type=_count, metavar="N",
                    help="show the last N loss, theft and balance events (default 10; 0: none)")
    lg.add_argument("--since", metavar="TIME",
                    help="only events since TIME: unix seconds or ISO 8601 (local time if no "
                         "zone), e.g. 2026-07-15 or 2026-07-15T08:00; then all of them unless "
                         "--events")
    lg.add_argument("--json", action="store_true",
                    help="one JSON document for scripts (keys: docs/field-tools.md)")
    lg.set_defaults(func=cmd_ledger)

    def add_target(sp: argparse.ArgumentParser) -> None:
        where = sp.add_mutually_exclusive_group(required=True)
        where.add_argument("--tcp", metavar="HOST[:PORT]", help="Modbus TCP (port 502)")
        where.add_argument("--serial", metavar="PORT", help="Modbus RTU on a serial port")
        where.add_argument("--dlt645", metavar="PORT", help="DL/T 645-2007 on a serial port")
        sp.add_argument("--baud", type=int, help="default 9600 (RTU), 2400 (DL/T 645)")
        sp.add_argument("--parity", choices=["N", "E", "O"], help="default N (RTU), E (DL/T 645)")
        sp.add_argument("--stop-bits", type=int, choices=[1, 2], default=1)
        sp.add_argument("--byte-size", type=int, choices=[7, 8], default=8)
        sp.add_argument("--timeout", type=float, default=1.0, metavar="S",
                        help="response timeout (default 1 s)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    rd = sub.add_parser("read", help="read a device once: named points or raw registers",
                        description="Read a device once. Modbus: --profile ID [POINT ...] decodes "
                        "points as the profile says; --raw TABLE:ADDRESS[:COUNT] (tables: coil, "
                        "discrete, holding, input; 0-based addresses) shows registers. "
                        "DL/T 645: --address METER --di DI [--format XXXXXX.XX], or --profile.")
    add_target(rd)
    rd.add_argument("--device-id", type=int, default=1, help="Modbus device id (default 1)")
    rd.add_argument("--address", help="DL/T 645 meter address (12 digits)")
    rd.add_argument("--profile", help="profile id, e.g. eastron-sdm630")
    rd.add_argument("--raw", metavar="TABLE:ADDRESS[:COUNT]", help="raw Modbus registers")
    rd.add_argument("--di", help="DL/T 645 data identifier, 8 hex digits, e.g. 02030000")
    rd.add_argument("--format", default=None, help="DL/T 645 BCD format, e.g. XX.XXXX")
    rd.add_argument("points", nargs="*", help="point names (default: all of the profile's)")
    rd.set_defaults(func=cmd_read)

    scn = sub.add_parser("scan", help="find the devices on a line and suggest profiles",
                         description="Modbus: probe device ids (any answer, even an exception, "
                         "means a device) and suggest the profile whose points read and look "
                         "real. DL/T 645: find the meters' addresses.")
    add_target(scn)
    scn.add_argument("--ids", default="1-247", help="Modbus ids to probe, e.g. 1-10,20")
    scn.add_argument("--no-identify", action="store_true", help="do not suggest profiles")
    scn.set_defaults(func=cmd_scan)

    d = sub.add_parser("demo", help="run the whole path on a simulated site and explain it",
                       description="Start a simulated site, a local mosquitto, the agent and the "
                       "platform console; send one signed cap command; show the site's power "
                       "before, during and after. Ends by itself.")
    d.add_argument("--cap-for", type=parse_duration, default=20.0, help="cap duration (20s)")
    d.add_argument("--verbose", action="store_true", help="also show the agent's log")
    d.set_defaults(func=cmd_demo)

    sc = sub.add_parser("schemas", help="write the MQTT payload JSON Schemas",
                        description="Generate JSON Schemas for every MQTT payload from the models.")
    sc.add_argument("--out", default="docs/schemas")
    sc.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    sc.set_defaults(func=cmd_schemas)

    wu = sub.add_parser("warmup", help="compile the control kernels into numba's disk cache",
                        description="Compile the numba control kernels so a service start is "
                        "warm. Run at install time and after upgrades.")
    wu.set_defaults(func=cmd_warmup)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # we report errors ourselves
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import lmt_version

        print(f"lmt-edge {lmt_version()}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
