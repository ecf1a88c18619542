"""Every accessor of the Ray boundary (llm_otel_callbacks/_ray.py) resolves against the Ray
installed here, and the supported-range check says one clear thing outside the range.

CI runs this module on Ray 2.60 (the main venv) and on Ray 2.59 (scripts/test_ray259.sh).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks import _ray

REPO = Path(__file__).resolve().parents[1]


# --- the supported range ------------------------------------------------------------------------


def test_installed_ray_is_inside_the_declared_range_and_tested() -> None:
    version = _ray.installed_ray_version()
    assert version is not None
    assert _ray.ray_version_conflict(version) is None
    assert version in _ray.TESTED_RAY_VERSIONS


def test_pyproject_declares_the_same_ray_range_as_the_boundary() -> None:
    text = (REPO / "pyproject.toml").read_text()
    (declared,) = _ray._instruments
    assert declared.replace(" ", "") + '",' in text.replace(" ", "")


@pytest.mark.parametrize("version", ["2.50.0", "2.58.1", "3.0.0", "3.0.0.dev0", None])
def test_ray_outside_the_range_is_a_conflict_naming_requirement_and_found(
    version: str | None,
) -> None:
    conflict = _ray.ray_version_conflict(version)
    assert conflict is not None
    assert conflict.required == _ray._instruments[0]
    assert str(conflict).startswith(f'requested "{_ray._instruments[0]}" but found ')
    assert ("no ray installed" if version is None else f"ray {version}") in str(conflict)


@pytest.mark.parametrize("version", ["2.59.0", "2.60.0", "2.61.2"])
def test_ray_inside_the_range_is_no_conflict(version: str) -> None:
    assert _ray.ray_version_conflict(version) is None


def test_unsupported_ray_raises_one_message_with_range_and_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(_ray.SKIP_CHECK_ENV, raising=False)
    with pytest.raises(_ray.UnsupportedRayError) as info:
        _ray.check_ray_version("2.55.0")
    message = str(info.value)
    assert "ray[serve] >= 2.59, < 3" in message
    assert "found ray 2.55.0" in message
    assert _ray.SKIP_CHECK_ENV in message
    assert isinstance(info.value, ImportError)


def test_skip_check_env_turns_the_error_into_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_ray.SKIP_CHECK_ENV, "1")
    with pytest.warns(RuntimeWarning, match="found ray 2.55.0"):
        _ray.check_ray_version("2.55.0")


def _import_with_ray_version(version: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A real import of the package's Ray-facing names in a fresh interpreter, where the
    # installed distribution metadata reports another Ray version (read the way pip does).
    code = textwrap.dedent(f"""
        import importlib.metadata as md
        real = md.version
        md.version = lambda name: {version!r} if name == "ray" else real(name)
        import llm_otel_callbacks  # light: loads no Ray (the vLLM plugin imports it too)
        from llm_otel_callbacks import RayServeLLMCallback  # the first Ray-facing name
        print("imported")
    """)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        cwd=REPO, env={**os.environ, **env},
    )


def test_importing_the_package_with_an_unsupported_ray_fails_with_the_range() -> None:
    done = _import_with_ray_version("2.52.0", {_ray.SKIP_CHECK_ENV: ""})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "llm_otel_callbacks._ray.UnsupportedRayError: llm-otel-callbacks supports ray[serve]"
    ), done.stderr[-2000:]
    assert "found ray 2.52.0" in last
    assert "imported" not in done.stdout


def test_importing_with_skip_check_warns_and_imports() -> None:
    done = _import_with_ray_version("2.52.0", {_ray.SKIP_CHECK_ENV: "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "imported"
    assert "found ray 2.52.0" in done.stderr


# --- the callback API -----------------------------------------------------------------------------


def test_callback_api_classes_resolve_with_the_ctx_fields_we_use() -> None:
    assert inspect.isclass(_ray.CallbackBase)
    fields = {f.name for f in dataclasses.fields(_ray.CallbackCtx)}
    assert {"worker_node_download_model", "placement_group", "runtime_env", "custom_data",
            "run_init_node"} <= fields
    config_fields = {f.name for f in dataclasses.fields(_ray.CallbackConfig)}
    assert {"callback_class", "callback_kwargs", "raise_error_on_callback"} <= config_fields
    for hook in ("on_before_node_init", "on_after_node_init",
                 "on_before_download_model_files_distributed", "run_callback",
                 "run_callback_sync"):
        assert callable(getattr(_ray.CallbackBase, hook))


class _RayStyle(_ray.CallbackBase):  # type: ignore[misc]
    async def on_before_node_init(self) -> None:
        return None

    def on_after_node_init(self) -> None:
        return None


class _NoRayBase:
    """Like a Ray callback, without Ray's private helpers: the fallback path."""

    raise_error_on_callback = True

    async def on_before_node_init(self) -> None:
        return None

    def on_after_node_init(self) -> None:
        return None


def test_hook_method_uses_rays_lookup_and_the_fallback_agrees() -> None:
    ray_cb = _RayStyle(llm_config=None)
    plain = _NoRayBase()
    assert callable(ray_cb._get_method)  # Ray's private name is there
    for hook, is_async in (("on_before_node_init", True), ("on_after_node_init", False)):
        assert _ray.hook_method(ray_cb, hook)[1] is is_async
        assert _ray.hook_method(plain, hook)[1] is is_async
    with pytest.raises(AttributeError) as ray_err:
        _ray.hook_method(ray_cb, "on_missing")
    with pytest.raises(AttributeError) as our_err:
        _ray.hook_method(plain, "on_missing")
    assert str(ray_err.value).replace("_RayStyle", "X") == str(our_err.value).replace(
        "_NoRayBase", "X")


@pytest.mark.parametrize("raise_policy", [True, False])
def test_handle_callback_error_is_rays_raise_or_log_and_the_fallback_agrees(
    raise_policy: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    ray_cb = _RayStyle(llm_config=None, raise_error_on_callback=raise_policy)
    plain = _NoRayBase()
    plain.raise_error_on_callback = raise_policy
    assert callable(ray_cb._handle_callback_error)
    error = ValueError("boom")
    texts = []
    for cb in (ray_cb, plain):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            if raise_policy:
                with pytest.raises(Exception) as info:
                    _ray.handle_callback_error(cb, "on_after_node_init", error)
                assert info.value.__cause__ is error
                texts.append(str(info.value))
            else:
                _ray.handle_callback_error(cb, "on_after_node_init", error)
                (record,) = [r for r in caplog.records if "on_after_node_init" in r.getMessage()]
                texts.append(record.getMessage())
    assert texts[0].replace("_RayStyle", "X") == texts[1].replace("_NoRayBase", "X")
    assert "Error running callback method 'on_after_node_init'" in texts[0]


# --- downloads, server, ingress, errors ---------------------------------------------------------


def test_node_model_downloadable_has_the_policies_download_policy_sets() -> None:
    enum = _ray.node_model_downloadable()
    for name in ("MODEL_AND_TOKENIZER", "TOKENIZER_ONLY", "EXCLUDE_SAFETENSORS", "NONE"):
        assert enum[name].name == name


def test_cloud_file_system_has_get_file() -> None:
    assert callable(_ray.cloud_file_system().get_file)


# Ray's LLMServer has an async __del__; an unstarted one warns when collected.
@pytest.mark.filterwarnings("ignore:coroutine 'LLMServer.__del__' was never awaited")
def test_llm_server_class_is_public_and_gives_its_llm_config(tiny_model_dir: Path) -> None:
    from ray.serve.llm import LLMConfig, LLMServer

    cls = _ray.llm_server_class()
    assert cls is LLMServer
    assert inspect.iscoroutinefunction(cls.start)
    config = LLMConfig(model_loading_config={"model_id": "tiny",
                                             "model_source": str(tiny_model_dir)})
    server = cls.sync_init(config)  # unstarted: no engine
    assert _ray.llm_server_config(server) is config
    assert _ray.llm_server_config(object()) is None  # the fallback: unobserved start


def test_openai_ingress_is_public_with_the_response_generator_we_wrap() -> None:
    from ray.serve.llm.ingress import OpenAiIngress

    cls, has_hook = _ray.openai_ingress_class()
    assert cls is OpenAiIngress
    assert has_hook is True
    for endpoint in ("chat", "completions", "embeddings"):
        assert inspect.iscoroutinefunction(getattr(cls, endpoint))


def test_observed_ingress_subclasses_the_public_ingress() -> None:
    from ray.serve.llm.ingress import OpenAiIngress

    from llm_otel_callbacks.serve import ObservedOpenAiIngress

    assert issubclass(ObservedOpenAiIngress, OpenAiIngress)
    assert "_get_response" in vars(ObservedOpenAiIngress)


def test_error_response_is_public_and_what_the_engine_yields_is_recognised() -> None:
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ErrorResponse as InternalErrorResponse,
    )
    from ray.serve.llm.openai_api_models import ErrorResponse

    from llm_otel_callbacks.serve._engine import engine_error_types, make_error_response

    cls, info = _ray.error_response_classes()
    assert cls is ErrorResponse
    made = make_error_response(429, "slow down", "RateLimited", {"retry_after_s": 2.0})
    assert made.error.code == 429
    assert made.error.model_extra["retry_after_s"] == 2.0
    assert isinstance(made.error, info)
    # The engine yields Ray's internal (and vLLM's) ErrorResponse: both are recognised.
    types = engine_error_types()
    assert InternalErrorResponse in types
    assert isinstance(InternalErrorResponse(error=info(message="x", type="y", code=500)), types)


def test_raw_request_info_carries_headers() -> None:
    cls = _ray.raw_request_info_class()
    assert cls is not None
    info = cls(headers={"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    assert dataclasses.replace(info, headers={"x": "y"}).headers == {"x": "y"}


def test_replica_info_is_none_outside_a_replica() -> None:
    assert _ray.replica_info() is None


def test_sigterm_chaining_resolves_rays_worker_exit_and_declines_in_a_driver() -> None:
    from ray._private import worker as ray_worker

    ray_exit = getattr(ray_worker, _ray._RAY_EXIT_NAME)
    assert callable(ray_exit)
    assert ray_worker.WORKER_MODE != ray_worker.SCRIPT_MODE
    called: list[Any] = []
    assert _ray.chain_worker_sigterm_exit(lambda: called.append(1)) is False
    assert getattr(ray_worker, _ray._RAY_EXIT_NAME) is ray_exit  # untouched in a driver
    assert called == []


def test_refresh_auth_cache_resolves() -> None:
    from ray._raylet import AuthenticationTokenLoader, Config  # noqa: F401

    _ray.refresh_auth_cache()


def test_ray_backed_accessors_resolve_on_a_running_ray(ray_local: Any) -> None:
    import ray
    from ray.experimental.internal_kv import _internal_kv_exists
    from ray.llm._internal.serve.utils import registry

    per_node = _ray.resources_per_node()
    assert per_node is not None
    avail, total = per_node
    assert list(total) == [ray_local.node_id]
    assert total[ray_local.node_id]["CPU"] == 4.0
    assert set(avail) <= set(total)

    _ray.seed_llm_registries()
    keys = [registry._make_key(reg.category, name)
            for reg in registry._registries.values() for name in reg._loader_cache]
    assert keys  # importing Ray's LLMConfig registered the KV-connector backends
    assert all(_internal_kv_exists(key) for key in keys)

    @ray.remote
    def in_a_task() -> Any:
        return _ray.replica_info()

    assert ray.get(in_a_task.remote()) is None
    # Inside a replica it is a _ray.ReplicaInfo: tests/test_e2e_startup.py checks the Serve
    # resource attributes it fills on the startup spans.


def test_every_accessor_of_the_boundary_is_resolved_by_a_test_here() -> None:
    source = Path(__file__).read_text()
    untested = [name for name in _ray.__all__ if f"_ray.{name}" not in source]
    assert untested == []


def test_callback_bases_include_rays_callback_base_without_importing_vllm() -> None:
    from ray.llm._internal.common.callbacks.base import CallbackBase as Internal

    assert Internal in _ray.CALLBACK_BASES
    assert _ray.CallbackBase in _ray.CALLBACK_BASES
    # The Ray-facing part of the package loads no vLLM (a download task unpickling a callback
    # would pay ~10 s for it): checked in a fresh interpreter.
    code = ("import json, sys; from llm_otel_callbacks import RayServeLLMCallback, Composite; "
            "import llm_otel_callbacks.builtin.timing; "
            "print(json.dumps([m in sys.modules for m in ('vllm', 'torch', 'ray.serve.llm')]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[false, false, false]"
