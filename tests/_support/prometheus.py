"""Debian's prometheus for tests: installed with apt-get when missing (as root), else skipped."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from llm_otel_callbacks._prometheus import find_binary

PACKAGE = "prometheus"


def _apt_install() -> str:
    """Try to install the package; returns what went wrong ("" on success)."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available on this machine"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install it (run: sudo apt-get install prometheus)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", PACKAGE]
    attempts = (install, ["apt-get", "update"], install)
    last = ""
    for cmd in attempts:
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)} failed: {exc}"
        last = (proc.stdout + proc.stderr).strip()[-500:]
        if cmd is install and proc.returncode == 0 and find_binary("prometheus"):
            return ""
    return f"apt-get install {PACKAGE} failed: {last}"


def require_prometheus() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool``; installs Debian's package if needed, skips
    the test (with the reason) only when that is impossible."""
    prometheus, promtool = find_binary("prometheus"), find_binary("promtool")
    if prometheus and promtool:
        return prometheus, promtool
    problem = _apt_install()
    prometheus, promtool = find_binary("prometheus"), find_binary("promtool")
    if prometheus and promtool:
        return prometheus, promtool
    pytest.skip(f"Debian's prometheus package could not be installed: {problem}")
