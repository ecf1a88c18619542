#!/usr/bin/env bash
# The demo in one command, on a fresh clone: sets up .venv (idempotent), then deploys a tiny
# model on Ray Serve LLM on this CPU and shows the replica's startup waterfall.
#   ./demo.sh                 # run it (writes into .demo/)
#   ./demo.sh --prometheus    # and start Debian's prometheus scraping it, to try the dashboards
# Arguments go to `python -m llm_otel_callbacks demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
# vLLM logs its import warnings at INFO/WARNING; the demo tells its own story.
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-ERROR}"
exec .venv/bin/python -m llm_otel_callbacks demo "$@"
