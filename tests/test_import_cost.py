"""``import llm_otel_callbacks`` pulls in neither vLLM nor torch (a replica's start pays for
them once, in Ray's own code, not a second time because of us)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_pulls_in_neither_vllm_nor_torch() -> None:
    code = ("import json, sys, llm_otel_callbacks, llm_otel_callbacks.builtin, "
            "llm_otel_callbacks.telemetry; "
            "print(json.dumps({m: m in sys.modules for m in "
            "('vllm', 'torch', 'ray.serve.llm', 'llm_otel_callbacks')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"vllm": False, "torch": False, "ray.serve.llm": False,
                      "llm_otel_callbacks": True}
