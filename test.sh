#!/usr/bin/env bash
# The test command: sets up what the tests need, then runs the whole suite.
#   ./test.sh                 # everything
#   ./test.sh -m "not e2e"    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
# The dashboard test checks every panel against a real Prometheus server (Debian's package).
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing Debian's prometheus for the dashboard test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  # Only the binaries are needed; the package's own service is not.
  (command -v systemctl >/dev/null && systemctl stop prometheus prometheus-node-exporter) >/dev/null 2>&1 || true
  pkill -x prometheus >/dev/null 2>&1 || true
  pkill -x prometheus-node-exporter >/dev/null 2>&1 || true
fi
exec .venv/bin/python -m pytest -q "$@"
