#!/usr/bin/env bash
# The full test suite: sets up .venv and mosquitto when missing, then lint, type check and pytest.
# Extra arguments go to pytest (e.g. ./test.sh -k e2e).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
ruff check .
mypy  # every package (pyproject.toml, [tool.mypy]), default mode, with the pyserial stubs
# three workers, a test file each at a time: most tests wait on sockets and timers, not the CPU
python -m pytest -q -n 3 --dist loadfile "$@"
