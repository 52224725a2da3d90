#!/usr/bin/env bash
# The demo: a simulated site, a local broker, the agent and the platform console; one signed
# cap command; the site's power before, during and after. Ends by itself.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec lmt demo "$@"
