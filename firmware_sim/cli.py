"""``lmt sim <site.toml> [--port N] [--ready-file F] [--control-port N]``: serve a simulated site.

Also runnable as ``python -m lmt.firmware_sim``. Exit status: 0 after a clean stop (SIGTERM,
SIGINT), 1 when the server cannot listen, 2 for a bad command line or site file.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from lmt.config.errors import ConfigError

from .server import run_site


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sim`` arguments, for embedding in another command line (``lmt sim``)."""
    parser.add_argument("site", type=Path, help="simulated site file (TOML)")
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port to listen on, overriding [server].port; 0 = pick a free one")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="once listening, write the bound port into this file (and details "
                             "as JSON into F.json: control port, serial line paths)")
    parser.add_argument("--control-port", type=int, default=None,
                        help="serve the control channel (JSON lines: change faults at runtime) on "
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
    parser = argparse.ArgumentParser(prog="lmt sim",
                                     description="Serve a simulated site over Modbus TCP and RTU.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
