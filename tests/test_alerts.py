"""The Prometheus alerting rules: generated from the catalog (the committed files are what the
generator makes), accepted by ``promtool check rules``, unit-tested with ``promtool test rules``
(every alert fires on its series with exact labels and annotations, and stays quiet on
others), overridable at generation time. The real-run check (a real Prometheus loading the
rules while scraping a real Serve deployment whose callback fails) is in test_dashboards.py,
on the deployment that test already runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_otel_callbacks import _alert_specs, alerts, catalog
from llm_otel_callbacks.__main__ import main
from tests._support.prometheus import require_prometheus
from tests._support.ray_env import REPO_ROOT

UNIT_TESTS = REPO_ROOT / "tests" / "promtool" / "alerts.test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_prometheus()[1]


def _promtool(binary: str, *args: str) -> tuple[int, str]:
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=300,
                          check=False, cwd=REPO_ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def _rules(text: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load(text)
    groups = doc["spec"]["groups"] if doc.get("kind") == "PrometheusRule" else doc["groups"]
    return [rule for group in groups for rule in group["rules"]]


# --- generated, not hand-written -----------------------------------------------------------


def test_committed_rules_manifest_and_docs_are_what_the_catalog_generates() -> None:
    diffs = alerts.differences()
    assert not diffs, "run python -m llm_otel_callbacks alerts\n" + "\n".join(diffs)[:4000]


def test_check_command_reports_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alerts", "--check"]) == 0
    stale = tmp_path / "alerts.yaml"
    stale.write_text(alerts.RULES_FILE.read_text().replace("for: 15m", "for: 16m"))
    monkeypatch.setattr(alerts, "RULES_FILE", stale)
    assert main(["alerts", "--check"]) == 1
    out = capsys.readouterr()
    assert "-    for: 16m" in out.out and "+    for: 15m" in out.out
    assert "alerting rules are stale" in out.err


def test_every_rule_has_for_severity_annotations_and_a_runbook_section() -> None:
    rules = _rules(alerts.RULES_FILE.read_text())
    assert {r["alert"] for r in rules} == set(_alert_specs.DEFAULT_FOR)
    docs = alerts.DOCS_FILE.read_text()
    headings = {h.lower() for h in re.findall(r"^### (\w+)$", docs, re.M)}
    for rule in rules:
        assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule
        page, anchor = notes["runbook_url"].split("#")
        assert page == "docs/alerts.md" and anchor in headings, rule
    # The annotations name what locates the problem.
    by_name = {r["alert"]: r["annotations"]["description"] for r in rules}
    assert "$labels.callback" in by_name["LLMCallbackHookFailing"]
    assert "$labels.hook" in by_name["LLMCallbackHookFailing"]
    assert "$labels.phase" in by_name["LLMStartupPhaseSlowerThanUsual"]
    assert "$labels.node" in by_name["LLMStartupPhaseSlowerThanUsual"]
    assert all("$labels.model" in d for n, d in by_name.items()
               if n != "LLMTelemetryDroppingSpans")


def test_manifest_holds_the_same_rules_as_the_rule_file() -> None:
    manifest = yaml.safe_load(alerts.MANIFEST_FILE.read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["name"]
    assert _rules(alerts.MANIFEST_FILE.read_text()) == _rules(alerts.RULES_FILE.read_text())


def test_rules_read_catalog_names_as_ray_exports_them() -> None:
    text = alerts.RULES_FILE.read_text()
    for spec in (catalog.STARTUP_PHASE_DURATION, catalog.REPLICAS_STARTING, catalog.HOOK_CALLS,
                 catalog.EXPORT_FAILURES, catalog.REQUESTS_REJECTED,
                 catalog.GENAI_REQUEST_DURATION, catalog.DOWNLOAD_DECISIONS):
        assert spec.exposed_name(ray=True) in text, spec.name
    plain = alerts.rule_file(alerts.AlertSettings(ray=False))
    assert "ray_" not in plain.replace("ray=", "")
    assert catalog.HOOK_CALLS.exposed_name(ray=False) in plain
    assert "NodeAddress" not in plain and "instance" in plain


def test_phase_alert_watches_every_phase_the_catalog_names() -> None:
    named = {v for k, v in vars(catalog).items() if k.startswith("PHASE_") and isinstance(v, str)}
    phases = set(_alert_specs.startup_phases())
    assert phases == named - {catalog.PHASE_TOTAL}
    assert set(catalog.TIMING_PHASES) - {catalog.PHASE_TOTAL} <= phases
    rule = next(r for r in alerts.alert_rules() if r.name == "LLMStartupPhaseSlowerThanUsual")
    regex = re.search(r'phase=~"([^"]+)"', rule.expr)
    assert regex is not None and set(regex.group(1).split("|")) == phases


# --- promtool -----------------------------------------------------------------------------------


def test_promtool_check_rules_accepts_the_rule_file(promtool: str, tmp_path: Path) -> None:
    code, out = _promtool(promtool, "check", "rules", str(alerts.RULES_FILE))
    assert code == 0, out
    assert f"SUCCESS: {len(_alert_specs.DEFAULT_FOR)} rules found" in out
    # The manifest's groups, as the Operator hands them to Prometheus.
    spec = yaml.safe_load(alerts.MANIFEST_FILE.read_text())["spec"]
    (tmp_path / "from-manifest.yaml").write_text(yaml.safe_dump(spec))
    code, out = _promtool(promtool, "check", "rules", str(tmp_path / "from-manifest.yaml"))
    assert code == 0, out


def test_promtool_unit_tests_fire_and_stay_quiet(promtool: str) -> None:
    code, out = _promtool(promtool, "test", "rules", str(UNIT_TESTS))
    assert code == 0, out
    assert "SUCCESS" in out


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    doc = yaml.safe_load(UNIT_TESTS.read_text())
    firing: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            name = check["alertname"]
            expected = check.get("exp_alerts") or []
            for alert in expected:
                assert set(alert["exp_annotations"]) == {"summary", "description",
                                                         "runbook_url"}, name
                assert alert["exp_labels"]["severity"], name
            (firing if expected else quiet)[name] = (firing if expected else quiet).get(name,
                                                                                         0) + 1
    assert set(firing) == set(_alert_specs.DEFAULT_FOR), set(_alert_specs.DEFAULT_FOR) - set(
        firing)
    assert set(quiet) == set(_alert_specs.DEFAULT_FOR), set(_alert_specs.DEFAULT_FOR) - set(quiet)


def test_promtool_unit_tests_fail_when_a_rule_is_broken(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: the same tests against rules with a higher threshold."""
    rules = tmp_path / "alerts.yaml"
    rules.write_text(alerts.rule_file(alerts.AlertSettings().with_overrides(
        {"hook_failures": "5"})))
    tests = tmp_path / "alerts.test.yaml"
    tests.write_text(UNIT_TESTS.read_text().replace("../../dashboards/alerts.yaml",
                                                    str(rules)))
    code, out = _promtool(promtool, "test", "rules", str(tests))
    assert code != 0
    assert "alertname: LLMCallbackHookFailing" in out and "FAILED" in out


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_reach_the_rules(promtool: str, tmp_path: Path) -> None:
    out = tmp_path / "custom.yaml"
    assert main(["alerts", "--out", str(out), "--set", "startup_slow_s=900",
                 "--set", "for.LLMReplicaStuckStarting=30m", "--set", "hook_window=5m",
                 "--set", "rejected_share=0.5", "--set", "docs_url=https://x.example/a.md"]) == 0
    rules = {r["alert"]: r for r in _rules(out.read_text())}
    assert rules["LLMReplicaStuckStarting"]["for"] == "30m"
    assert rules["LLMReplicaStartupSlow"]["for"] == "1m"
    assert 'le=~"900(\\\\.0)?"' in rules["LLMReplicaStartupSlow"]["expr"]
    assert "took over 900s" in rules["LLMReplicaStartupSlow"]["annotations"]["summary"]
    assert "[5m]" in rules["LLMCallbackHookFailing"]["expr"]
    assert "> 0.5\n" in rules["LLMRequestsRejected"]["expr"]
    assert rules["LLMRequestsRejected"]["annotations"]["runbook_url"] == (
        "https://x.example/a.md#llmrequestsrejected")
    assert "--set startup_slow_s=900" in out.read_text().splitlines()[0]
    code, output = _promtool(promtool, "check", "rules", str(out))
    assert code == 0, output
    manifest = tmp_path / "rule.yaml"
    assert main(["alerts", "--format", "prometheusrule", "--out", str(manifest),
                 "--set", "for.LLMCallbackHookFailing=5s"]) == 0
    assert {r["alert"]: r["for"] for r in _rules(manifest.read_text())}[
        "LLMCallbackHookFailing"] == "5s"


@pytest.mark.parametrize(("pair", "message"), [
    ("startup_slow_s=700", "startup_slow_s: 700 is not a bucket bound"),
    ("hook_window=10 minutes", "hook_window: '10 minutes' is not a duration"),
    ("for.NoSuchAlert=1m", "for.NoSuchAlert: no such alert"),
    ("for.LLMCallbackHookFailing=soon", "for.LLMCallbackHookFailing: 'soon' is not a duration"),
    ("threshold=3", "threshold: no such setting"),
    ("rejected_share=2", "rejected_share: 2 is above 1"),
    ("hook_failures=-1", "hook_failures: -1.0 is not a number >= 0"),
    ("slower_ratio=nan", "slower_ratio: nan is not a number >= 0"),
    ("baseline_min=2.5", "baseline_min: '2.5' is not a whole number"),
    ("ray=maybe", "ray: 'maybe' is not true or false"),
    ("no-equals-sign", "expected NAME=VALUE"),
])
def test_bad_override_fails_naming_it(pair: str, message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alerts", "--out", str(tmp_path / "x.yaml"), "--set", pair]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_overrides_never_rewrite_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    before = alerts.RULES_FILE.read_text()
    assert main(["alerts", "--set", "startup_slow_s=900"]) == 2
    assert "--set needs --out" in capsys.readouterr().err
    assert alerts.RULES_FILE.read_text() == before


def test_durations_round_trip() -> None:
    assert _alert_specs.parse_duration("1h30m", "x") == 5400
    assert _alert_specs.format_duration(7 * 86400 + 1800) == "7d30m"
    assert _alert_specs.window_increase("x", "10m", "5m") == (
        "(max_over_time(x[10m] offset 5m) - x offset 15m) or max_over_time(x[10m] offset 5m)")
