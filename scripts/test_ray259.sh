#!/usr/bin/env bash
# The real-Ray tests on the oldest supported Ray (2.59, vLLM 0.27.0), in .venv-ray259:
# the Ray boundary, the core and composite tests on real Ray, the built-ins, and one real
# Serve deployment (ObservedLLMServer + ObservedOpenAiIngress). Extra arguments go to pytest.
#   scripts/test_ray259.sh            # sets up .venv-ray259 (a few minutes the first time)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_ray259.sh
exec .venv-ray259/bin/python -m pytest -q \
  tests/test_ray_boundary.py \
  tests/test_core_ray.py \
  tests/test_composite_ray.py \
  tests/test_builtin_timing.py \
  tests/test_builtin_download_policy.py \
  tests/test_builtin_placement_group.py \
  tests/test_serve_e2e.py \
  "$@"
