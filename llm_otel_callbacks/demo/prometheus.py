"""Run Debian's ``prometheus`` on 127.0.0.1 against a metrics endpoint, and check PromQL.

Used by the demo (``--prometheus``) and the dashboard tests. Nothing here installs anything:
``prometheus`` and ``promtool`` come from the Debian package ``prometheus``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ports import free_port

INSTALL_HINT = "sudo apt-get install prometheus   (Debian/Ubuntu; it brings promtool too)"


def find_binary(name: str = "prometheus") -> str | None:
    """Path of ``prometheus`` / ``promtool`` on PATH (Debian puts both in /usr/bin)."""
    return shutil.which(name)


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error."""


@dataclass
class PrometheusServer:
    """A running ``prometheus`` we started; ``stop()`` ends it (idempotent)."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    targets: tuple[str, ...]
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- HTTP API -------------------------------------------------------------------------

    def api(self, path: str, params: Mapping[str, str | float] | None = None,
            timeout: float = 30.0) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` or raises :class:`PrometheusError`."""
        query = urllib.parse.urlencode({k: str(v) for k, v in (params or {}).items()})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise PrometheusError(f"{path}: HTTP {exc.code}: {detail[:500]}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the result list (vector or matrix)."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        return list(self.api("query", params)["result"])

    def query_range(self, expr: str, start: float, end: float,
                    step: float = 5.0) -> list[dict[str, Any]]:
        data = self.api("query_range", {"query": expr, "start": start, "end": end, "step": step})
        return list(data["result"])

    def query_exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return list(self.api("query_exemplars", {"query": expr, "start": start, "end": end}))

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing now (``/api/v1/alerts``)."""
        return list(self.api("alerts")["alerts"])

    def active_targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def wait_until_scraped(self, timeout: float = 60.0) -> None:
        """Wait until every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(PrometheusError, OSError):
                last = self.active_targets()
                if last and all(t.get("health") == "up" for t in last):
                    return
            time.sleep(0.5)
        states = [(t.get("scrapeUrl"), t.get("health"), t.get("lastError")) for t in last]
        raise PrometheusError(f"targets not scraped within {timeout:.0f}s: {states}")

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(path: Path, targets: Sequence[str], scrape_interval_s: float,
                 job: str = "ray", rule_files: Sequence[Path] = ()) -> None:
    """A scrape config for ``host:port`` targets (JSON is valid YAML for Prometheus), with
    ``rule_files`` evaluated at the scrape interval."""
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]},
        ],
    }
    if rule_files:
        config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
    path.write_text(json.dumps(config, indent=2) + "\n")


def start_prometheus(
    targets: Sequence[str],
    workdir: Path,
    *,
    scrape_interval_s: float = 1.0,
    port: int | None = None,
    binary: str | None = None,
    ready_timeout_s: float = 30.0,
    rule_files: Sequence[Path] = (),
) -> PrometheusServer:
    """Start ``prometheus`` on 127.0.0.1 scraping ``targets`` (``host:port``), with its data,
    config and log under ``workdir``, exemplar storage on, ``rule_files`` loaded; returns once
    it is ready."""
    exe = binary or find_binary("prometheus")
    if exe is None:
        raise PrometheusError(f"prometheus is not installed; install it with: {INSTALL_HINT}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    write_config(config, targets, scrape_interval_s, rule_files=rule_files)
    port = port or free_port()
    log_path = workdir / "prometheus.log"
    log = log_path.open("ab")
    cmd = [
        exe,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
        "--enable-feature=exemplar-storage",
        "--log.level=warn",
    ]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = PrometheusServer(process, port, workdir, log_path, tuple(targets), log)
    try:
        _wait_ready(server, ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise PrometheusError(f"prometheus exited with {server.process.returncode}: {tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(
            f"{server.url}/-/ready", timeout=2
        ) as resp:
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise PrometheusError(f"prometheus not ready on port {server.port} after {timeout:.0f}s")


# --- promtool -------------------------------------------------------------------------------


def promtool_check(expressions: Mapping[str, str], workdir: Path,
                   binary: str | None = None) -> tuple[bool, str]:
    """Validate PromQL with ``promtool check rules``: each expression becomes a recording
    rule. Returns (ok, promtool's output). Keys name the expressions in the rule names."""
    exe = binary or find_binary("promtool")
    if exe is None:
        raise PrometheusError(f"promtool is not installed; install it with: {INSTALL_HINT}")
    rules = [
        {"record": f"dashboard_check:{_rule_name(key)}", "expr": expr}
        for key, expr in expressions.items()
    ]
    path = Path(workdir) / "dashboard-expressions.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}, indent=1))
    proc = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True,
                          check=False, timeout=120)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def _rule_name(key: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key) or "expr"
