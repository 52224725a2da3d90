"""``lmt sim <site.toml> [--port N] [--ready-file F] [--control-port N]``: serve a simulated site.

The site's Modbus TCP devices on one TCP server, and each serial line of the site file (Modbus
RTU or DL/T 645) on its own pseudo-terminal. Also runnable as ``python -m lmt.firmware_sim``.
Exit status: 0 after a clean stop (SIGTERM, SIGINT), 1 when the server cannot listen, 2 for a
bad command line or site file. ``--help`` summarises the site file (:data:`SITE_FILE_HELP`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from lmt.config.errors import ConfigError

DESCRIPTION = ("Serve a simulated site: its Modbus TCP devices on one TCP server, and each "
               "serial line of the site file — Modbus RTU or DL/T 645-2007 meters — on its own "
               "pseudo-terminal. See docs/simulator.md.")

#: The site file in short, shown after the options by ``--help`` (docs/simulator.md has it all).
SITE_FILE_HELP = """\
site file (TOML; unknown keys are errors; examples in config/examples/):
  [site]         name, seed, base_load_kw, daily_swing, peak_hour, noise_kw,
                 voltage_v, power_factor, frequency_hz, import_energy_kwh,
                 unmetered_kw (a load the main meter sees and no sub-meter does)
  [server]       host (127.0.0.1), port (5020): the Modbus TCP server
  [[lines]]      a serial line on its own pseudo-terminal: name, protocol
                 ("modbus-rtu" or "dlt645"), baud (9600; dlt645: 2400), parity
                 (N; dlt645: E), stop_bits (1), byte_size (8) set its timing;
                 link: a path made a symlink to the pty. A pty carries no
                 parity bit: open it as 8N1. The paths are logged and in F.json
                 (--ready-file). A dlt645 line without meters is not opened.
  [[devices]]    name, profile, line (default: the TCP server), faults, and
                 device_id (Modbus, 1-247) or address (DL/T 645: 12 digits; a
                 dlt645 profile, exactly on a dlt645 line); meters also
                 metering, tamper, events (below)
  [[loads]]      name, relay ("<device>.<coil point>"), kw, on

DL/T 645 meters answer on their address (and the AA wildcards): read data 11
(the profile's points, status word 3, date, time, address), follow-up reads 12,
read address 13, broadcast time sync 08, and 1C control (trip, allow close,
alarm, power guarantee; password 000000, level 02) with the relay state in
status word 3. Values come from the site model, like every meter's. Meters
that answer one request together collide: the byte-wise AND of their answers.

faults ([devices.faults], per device, Modbus and DL/T 645 alike; a rate is the
share of requests, the first fault that fires decides, in this order):
  offline          never answers
  no_answer_rate   the request is lost (a write or a 1C does not happen)
  drop_rate        TCP only: the connection is closed instead of an answer
  exception_code   a Modbus exception code (DL/T 645: an abnormal reply with
  exception_rate     this error byte, e.g. 4 = password) for this share (1.0)
  crc_error_rate   serial lines only: the answer's CRC / checksum is wrong
  garbage_rate     random bytes instead of the answer
  delay_s          answer this many seconds late
  frozen           decides nothing, changes what answers carry: every read
                   (Modbus registers and coils, every DL/T 645 data identifier)
                   answers the values of the moment it was switched on, while
                   the model goes on; writes still act (a frozen relay module
                   switches its load, but reads back its old state)
Change them while running (--control-port N):
  python -m lmt.firmware_sim.control N '{"device": "meter-b", "faults": {"offline": true}}'

meters ([devices.metering]; left out, every meter measures the whole site):
  loads            the [[loads]] behind a sub-meter (by name)
  base_share       its share of the base load (0-1; default 0)
  ev               the EV charging point is behind it (false)
  whole_site       a main meter (the default scope); import_energy_kwh: its
                   own register at start (default: site.import_energy_kwh)
signatures ([devices.tamper]; each meter's registers count what it shows):
  ct_shunt         {phase = "l2", seen = 0.02}: it sees 2 % of that phase
  ct_reversed      "l3": that phase's power and current read negative (its
                   energy goes to the phase's export register; the totals
                   count the algebraic sum of the phases)
  pt_loss          {phase = "l1", seen = 0.0}: its voltage input on that phase
                   lost (seen 0-1, default 0): that phase's voltage and power
                   read x seen, its current as it is (a loss-of-voltage event)
  phase_break      "l2": that phase lost at the meter: 0 V, 0 A, 0 W on it
                   (the site's load is unchanged: the other meters see it)
  registers        "counting" (default), "stopped" or "decreasing"
events ([devices.events], DL/T 645 event counts at start, 0-999999):
  cover_open, terminal_cover_open, magnetic_field, voltage_loss,
  current_loss_l1..l3, reverse_flow_l1..l3 (a reversed CT, a shunt under
  5 % or a pt_loss under 78 % that starts adds one)
While running:
  python -m lmt.firmware_sim.control N '{"device": "meter-b", "tamper": {"ct_reversed": "l3"}}'
  python -m lmt.firmware_sim.control N '{"device": "meter-b", "tamper": {"phase_break": "l2"}}'
  python -m lmt.firmware_sim.control N '{"device": "meter-b", "event": "cover_open"}'
  python -m lmt.firmware_sim.control N '{"device": "meter-a", "register_jump_kwh": -500}'
  python -m lmt.firmware_sim.control N '{"site": {"unmetered_kw": 5.0}}'
"""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts as usual; keeps texts with line breaks as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sim`` arguments, for embedding in another command line (``lmt sim``); also puts
    the site file's summary (:data:`SITE_FILE_HELP`) after the options in ``--help``."""
    parser.epilog = SITE_FILE_HELP
    parser.formatter_class = _HelpFormatter
    parser.add_argument("site", type=Path, help="simulated site file (TOML), see below")
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port to listen on, overriding [server].port; 0 = pick a free one")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="once listening, write the bound port into this file (and details "
                             "as JSON into F.json: control port, serial line paths)")
    parser.add_argument("--control-port", type=int, default=None,
                        help="serve the control channel (JSON lines: change faults and signatures "
                             "at runtime) on "
                             "127.0.0.1:N; 0 = pick a free one")


def run(args: argparse.Namespace) -> int:
    """Run with parsed arguments; returns the exit status."""
    if args.port is not None and not 0 <= args.port <= 65535:
        print(f"lmt sim: --port must be 0-65535 (got {args.port})", file=sys.stderr)
        return 2
    control = getattr(args, "control_port", None)
    if control is not None and not 0 <= control <= 65535:
        print(f"lmt sim: --control-port must be 0-65535 (got {control})", file=sys.stderr)
        return 2
    from .server import run_site  # the simulators: loaded only to serve a site

    try:
        asyncio.run(run_site(args.site, args.port, args.ready_file, control))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lmt sim: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmt sim", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
