"""``python -m lmt.firmware_sim <site.toml> [--port N] [--ready-file F]``."""

import sys

from .cli import main

sys.exit(main())
