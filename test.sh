#!/usr/bin/env bash
# The test command: sets up the virtual environment, then runs the whole suite. It installs
# nothing outside .venv and stops no process: the dashboard tests that need Debian's
# prometheus skip, with a hint, when it is missing (CI installs it in .ci/run).
#   ./test.sh                 # everything
#   ./test.sh -m "not e2e"    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "==> prometheus/promtool not found: the dashboard tests will be skipped" \
       "(install with: sudo apt-get install prometheus)"
fi
exec .venv/bin/python -m pytest -q "$@"
