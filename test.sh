#!/usr/bin/env bash
# The full test suite: sets up .venv and mosquitto when missing, then lint, type check and pytest.
# Extra arguments go to pytest (e.g. ./test.sh -k e2e).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
ruff check .
mypy  # the packages in pyproject.toml's [tool.mypy]: lmt.config, lmt.drivers, lmt.firmware_sim
python -m pytest -q "$@"
