"""The scripts change nothing on the machine they were not asked to: ./test.sh installs nothing
outside .venv, nothing kills processes by name, and CI's prometheus install starts no service."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests._support import prometheus as prometheus_support

ROOT = Path(__file__).resolve().parent.parent
KILL_BY_NAME = re.compile(r"\b(pkill|killall)\b")


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return [ROOT / name for name in out if (ROOT / name).is_file()]


def test_nothing_kills_processes_by_name() -> None:
    this = Path(__file__).resolve()
    offenders = []
    for path in _tracked_files():
        if path == this or path.suffix not in {"", ".sh", ".py", ".yaml", ".yml", ".toml"}:
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(ROOT)}:{n}" for n, line in
                      enumerate(text.splitlines(), 1) if KILL_BY_NAME.search(line)]
    assert not offenders, offenders


def test_the_test_command_installs_nothing_outside_its_venv() -> None:
    # Quoted text (an install hint) aside, neither mentions a package manager.
    for script in (ROOT / "test.sh", ROOT / "tests/_support/prometheus.py"):
        code = re.sub(r'"[^"\n]*"|\'[^\'\n]*\'', '""', script.read_text())
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"\b(apt-get|apt|dpkg|subprocess)\b", code), script


def _fake_bin(tmp_path: Path, policy: Path) -> tuple[Path, Path]:
    """A PATH with the tools the install script needs, an apt-get that records whether the
    policy file forbade service starts while it ran, and no prometheus."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("bash", "sh", "id", "chmod", "rm", "cat", "printf"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True,
                               text=True).stdout.strip()
        if found.startswith("/"):
            (fake / tool).symlink_to(found)
    log = tmp_path / "apt.log"
    (fake / "apt-get").write_text(
        "#!/bin/bash\n"
        f'if [ -x "{policy}" ]; then "{policy}" prometheus start; '
        f'echo "$* policy=$?" >>"{log}"; else echo "$* policy=none" >>"{log}"; fi\n'
    )
    (fake / "apt-get").chmod(0o755)
    return fake, log


@pytest.mark.skipif(os.geteuid() != 0, reason="the script installs only as root")
@pytest.mark.parametrize("policy_existed", [False, True])
def test_ci_installs_prometheus_with_service_starts_forbidden(
    tmp_path: Path, policy_existed: bool
) -> None:
    policy = tmp_path / "policy-rc.d"
    if policy_existed:
        policy.write_text("#!/bin/sh\nexit 101\n# the machine's own\n")
        policy.chmod(0o755)
    fake, log = _fake_bin(tmp_path, policy)
    proc = subprocess.run(
        [str(fake / "bash"), str(ROOT / ".ci/install_prometheus.sh")],
        env={"PATH": str(fake), "POLICY_RC_D": str(policy)},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    install = [c for c in calls if " install " in f" {c} "]
    assert install and all(c.endswith("policy=101") for c in install), calls
    if policy_existed:  # the machine's own file is left as it was
        assert policy.read_text().endswith("# the machine's own\n")
    else:  # the one the script made is gone
        assert not policy.exists()


def test_missing_prometheus_skips_with_a_hint(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(prometheus_support.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install prometheus"):
        prometheus_support.require_prometheus()


def test_missing_prometheus_fails_where_ci_requires_it(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(prometheus_support.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="CI must run"):
        prometheus_support.require_prometheus()


def test_the_demo_removes_only_what_it_created(tmp_path: Path) -> None:
    """``demo --dir DIR`` used to remove DIR/ray, DIR/auth_token and DIR/prometheus even
    when they were there before it ran."""
    from llm_otel_callbacks.demo.local_ray import RayRun, make_sandbox
    from llm_otel_callbacks.demo.report import prometheus_workdir

    mine = {"ray/keep.txt": "a", "auth_token": "users-own-token", "prometheus/data": "b"}
    for name, text in mine.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    sandbox = make_sandbox(tmp_path, "token", None)
    assert sandbox.root != tmp_path and sandbox.root.parent == tmp_path  # a private subfolder
    assert Path(sandbox.env["RAY_AUTH_TOKEN_PATH"]).read_text() != "users-own-token"
    sandbox.ray_temp.mkdir(parents=True)  # what Ray would make
    (sandbox.ray_temp / "session").write_text("x")
    workdir = prometheus_workdir(tmp_path)
    assert workdir != tmp_path / "prometheus"
    RayRun(sandbox=sandbox, runtime_env={}, clean=True)._drop_files()
    for name, text in mine.items():
        assert (tmp_path / name).read_text() == text, name
    assert not sandbox.root.exists()
    # In an empty folder it makes (and so removes) the usual names.
    fresh = make_sandbox(tmp_path / "fresh", "token", None)
    assert fresh.root == (tmp_path / "fresh").resolve()
    fresh.ray_temp.mkdir(parents=True)
    RayRun(sandbox=fresh, runtime_env={}, clean=True)._drop_files()
    assert sorted(p.name for p in fresh.root.iterdir()) == []
