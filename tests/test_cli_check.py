"""``python -m llm_otel_callbacks check`` is offline and never ends in a traceback."""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks import RayServeLLMCallback, cli_check
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.otlp_receiver import OtlpHttpReceiver

SECRET = "Bearer check-must-not-send-this"


class FailsInInit(RayServeLLMCallback):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        raise RuntimeError("license server unreachable")


def test_check_exports_nothing_and_writes_no_traces_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A child failing under the log policy used to build telemetry: the traces_file folder
    was created and the error span POSTed, with the Authorization header, to the endpoint."""
    spans_dir = tmp_path / "made-by-telemetry"
    config = tmp_path / "serve.yaml"
    with OtlpHttpReceiver() as receiver:
        config.write_text(textwrap.dedent(f"""\
            callback_class: llm_otel_callbacks.Composite
            callback_kwargs:
              callbacks:
                - {{callback_class: tests.test_cli_check.FailsInInit, name: licensed,
                    raise_error_on_callback: false}}
                - llm_otel_callbacks.builtin.Timing
              telemetry:
                endpoint: {receiver.endpoint}
                headers: {{Authorization: "{SECRET}"}}
                traces_file: {spans_dir}/spans.jsonl
                schedule_delay_ms: 10
            """))
        reset_telemetry()
        code, out = _run(config, capsys)
        reset_telemetry()  # shuts down, so flushes, whatever telemetry the check built
        requests = receiver.requests()
    assert code == 1, out
    assert "callback 'licensed' failed in hook '__init__'" in out
    assert requests == [], [r.path for r in requests]
    assert not spans_dir.exists()
    assert SECRET not in out


def _run(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli_check.run(argparse.Namespace(config=path))
    return code, capsys.readouterr().out


def _serve_config(tmp_path: Path, entry: str) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(textwrap.dedent(f"""\
        applications:
          - name: llm
            args:
              llm_configs: [{entry}]
        """))
    return path


@pytest.mark.parametrize("case", [
    "not_utf8", "yaml_error", "nested_not_utf8", "nested_yaml_error", "nested_python_tag",
    "python_tag", "directory", "fifo", "nested_fifo", "oversized", "llm_configs_not_a_list",
])
def test_bad_files_fail_with_a_message_not_a_traceback(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    expected = {
        "not_utf8": "not UTF-8", "yaml_error": "not valid YAML", "python_tag": "not valid YAML",
        "directory": "not a regular file", "fifo": "not a regular file",
        "oversized": "larger than 4 MiB", "llm_configs_not_a_list": "must be a list",
    }
    if case.endswith("not_utf8"):
        bad.write_bytes(b"callback_class: \xff\xfe\n")
    elif case.endswith("yaml_error"):
        bad.write_text("callback_class: [unclosed\n")
    elif case.endswith("python_tag"):
        bad.write_text("callback_class: !!python/object/apply:os.system ['true']\n")
    elif case.endswith("fifo"):
        bad = tmp_path / "pipe.yaml"
        os.mkfifo(bad)  # no writer: a plain open() would wait forever
    elif case == "directory":
        bad = tmp_path
    elif case == "oversized":
        bad.write_text("# padding\n" * (cli_check.MAX_FILE_BYTES // 10 + 1))
    elif case == "llm_configs_not_a_list":
        bad.write_text("applications: [{name: llm, args: {llm_configs: 3}}]\n")
    target = _serve_config(tmp_path, bad.name) if case.startswith("nested_") else bad
    code, out = _run(target, capsys)
    assert code in (1, 2), out
    assert out.startswith("FAIL "), out
    want = expected.get(case.removeprefix("nested_"), "")
    assert want in out, out
    # Inside a Serve config, the message also names where the LLMConfig sits.
    nested = "applications[llm].args.llm_configs[0]" in out
    assert nested == case.startswith("nested_"), out


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_dev_zero_is_refused_without_reading_it(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(Path("/dev/zero"), capsys)
    assert code == 2 and "not a regular file" in out, out
