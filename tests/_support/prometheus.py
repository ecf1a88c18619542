"""Debian's prometheus for tests: found on PATH, never installed here.

Missing, a test that needs it skips with the install hint; with ``LLM_OTEL_REQUIRE_PROMETHEUS=1``
(``.ci/run`` sets it, after installing the package) it fails instead, so CI cannot skip it.
"""

from __future__ import annotations

import os

import pytest

from llm_otel_callbacks.demo.prometheus import INSTALL_HINT, find_binary

REQUIRE_ENV = "LLM_OTEL_REQUIRE_PROMETHEUS"


def require_prometheus() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``; skip (or, in CI, fail) when either is missing."""
    prometheus, promtool = find_binary("prometheus"), find_binary("promtool")
    if prometheus and promtool:
        return prometheus, promtool
    missing = " and ".join(n for n, p in (("prometheus", prometheus), ("promtool", promtool))
                           if not p)
    message = f"{missing} not found on PATH; install with: {INSTALL_HINT}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1: CI must run the Prometheus tests)")
    pytest.skip(message)
