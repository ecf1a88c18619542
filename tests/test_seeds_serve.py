"""The seed designs in a real Ray Serve LLM app on the CPU (one app, deployed once per module):

* ``seeds-a``: the eight-hook class, sync and async phase functions, a seed-000 class whose
  ``on_before_download`` returns False, and a probe of what Ray's download task received;
  and seed 004's request callbacks: a CostTracker passing each request's ``cost`` to the
  seed's ContextAwareCallbacks after it, and a CostLimiter with a tiny budget per ``user``;
* ``seeds-b``: the original ``initialize()`` full replacement.

Both use ``ObservedLLMServer`` (the engine points). Every hook appends an event line to a file
(tests/seed_callbacks.py), read here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks.demo.serve_app import tiny_llm_config, wait_ready
from tests._support.ray_env import free_port, start_local_ray

pytestmark = pytest.mark.e2e

S = "tests.seed_callbacks."
SERVER = "llm_otel_callbacks.serve.ObservedLLMServer"


def _composite(callbacks: list[Any]) -> dict[str, Any]:
    return {"callback_class": "llm_otel_callbacks.Composite",
            "callback_kwargs": {"callbacks": callbacks}}


#: Prices per million tokens in seeds-a, and its CostLimiter's budget per user: the first
#: request of a user spends more than this, so the user's next request is refused.
PRICE = {"input": 1000.0, "output": 2000.0}
BUDGET = 1e-6


class SeedApp(dict[str, list[dict[str, Any]]]):
    """Each model's events as they were once both replicas were up, and the running app."""

    def __init__(self, events: dict[str, list[dict[str, Any]]], base: str,
                 files: dict[str, Path]) -> None:
        super().__init__(events)
        self.base = base
        self.files = files

    def read(self, name: str) -> list[dict[str, Any]]:
        text = self.files[name].read_text()
        return [json.loads(line) for line in text.splitlines() if line]


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[SeedApp]:
    from ray import serve
    from ray.serve.llm import build_openai_app

    from tests.conftest import VLLM_CPU_ENV, _ensure_ray_down

    _ensure_ray_down()
    tmp = tmp_path_factory.mktemp("seeds-serve")
    files = {name: tmp / f"{name}.jsonl" for name in ("seeds-a", "seeds-b")}
    # Two LLM replicas (one CPU each), the group initialize() makes, and the ingress.
    run = start_local_ray(tmp / "ray", num_cpus=8, env=dict(VLLM_CPU_ENV))
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        configs = [
            tiny_llm_config(
                tiny_model_dir, model_id="seeds-a", server_cls=SERVER,
                env={**VLLM_CPU_ENV, "SEED_EVENTS": str(files["seeds-a"])},
                callback_config=_composite([
                    S + "EightHooks", S + "tracking_callback", S + "async_tracking_callback",
                    S + "SkipDownload", S + "PolicyProbe", S + "EngineProbe",
                    {"callback_class": "llm_otel_callbacks.builtin.CostTracker",
                     "callback_kwargs": {"prices": {"seeds-a": PRICE}}},
                    {"callback_class": "llm_otel_callbacks.builtin.CostLimiter",
                     "callback_kwargs": {"max_cost": BUDGET, "key": "user",
                                         "anonymous": "exempt", "window_s": 3600}},
                    S + "ContextAwareCallbacks",
                ]),
            ),
            tiny_llm_config(
                tiny_model_dir, model_id="seeds-b", server_cls=SERVER,
                env={**VLLM_CPU_ENV, "SEED_EVENTS": str(files["seeds-b"])},
                callback_config=_composite([
                    S + "MyInit", S + "tracking_callback", S + "PolicyProbe", S + "EngineProbe",
                ]),
            ),
        ]
        # Our ingress: a refusal reaches the client as an OpenAI-style body with Retry-After.
        serve.run(build_openai_app({
            "llm_configs": configs,
            "ingress_cls_config": {"ingress_cls": "llm_otel_callbacks.serve.ObservedOpenAiIngress"},
        }), blocking=False)
        base = f"http://127.0.0.1:{port}"
        for model in ("seeds-a", "seeds-b"):
            wait_ready(base, 420, chat_model=model)
        yield SeedApp({
            name: [json.loads(line) for line in path.read_text().splitlines() if line]
            for name, path in files.items()
        }, base, files)
    finally:
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            run.shutdown()


def _phases(evs: list[dict[str, Any]], fn: str) -> list[str]:
    return [e["phase"] for e in evs if e["event"] == "phase" and e["fn"] == fn]


def test_eight_hooks_fire_in_order_in_a_real_replica(
    events: dict[str, list[dict[str, Any]]]
) -> None:
    evs = events["seeds-a"]
    assert [e["event"] for e in evs if e["event"].startswith("on_")] == [
        "on_pre_initialization", "on_pre_download", "on_post_download",
        "on_pre_placement_group", "on_post_placement_group", "on_pre_engine_init",
        "on_post_engine_init", "on_post_initialization",
    ]
    by = {e["event"]: e for e in evs}
    # on_pre_download ran in Ray's download task, not in the replica.
    assert by["on_pre_download"]["pid"] != by["on_pre_initialization"]["pid"]
    # extra_init_kwargs from on_pre_engine_init reached the engine kwargs before the build.
    assert by["engine_up"]["max_num_seqs"] == 3


def test_sync_and_async_phase_functions_see_every_phase_post_initialization_last(
    events: dict[str, list[dict[str, Any]]]
) -> None:
    expected = [
        "pre_initialization", "pre_download", "post_download", "post_placement_group",
        "pre_engine_init", "post_engine_init", "post_initialization",
    ]
    evs = events["seeds-a"]
    assert _phases(evs, "sync") == expected
    assert _phases(evs, "async") == expected
    # post_initialization came after the engine was up (after every other event).
    last = [e for e in evs if e["event"] == "phase"][-2:]
    assert [e["phase"] for e in last] == ["post_initialization"] * 2
    assert evs.index(last[0]) > evs.index(next(e for e in evs if e["event"] == "engine_up"))


def test_on_before_download_false_means_the_node_downloads_nothing(
    events: dict[str, list[dict[str, Any]]]
) -> None:
    evs = events["seeds-a"]
    by = {e["event"]: e for e in evs}
    # EightHooks' on_pre_download saw Ray's default before it; SkipDownload's False won.
    assert by["on_pre_download"]["policy"] == "NodeModelDownloadable.MODEL_AND_TOKENIZER"
    assert [e["download_model"] for e in evs if e["event"] == "ray_download_argument"] == [
        "NONE"
    ]


def test_initialize_replaces_node_init_with_its_placement_group_and_runtime_env(
    events: dict[str, list[dict[str, Any]]]
) -> None:
    evs = events["seeds-b"]
    up = next(e for e in evs if e["event"] == "engine_up")
    assert up["run_init_node"] is False
    assert up["pg_name"] == "seed-initialize"
    assert up["runtime_env"] == {"env_vars": {"FROM_INITIALIZE": "1"}}
    assert up["max_num_seqs"] == 2
    assert not [e for e in evs if e["event"] == "ray_download_argument"]  # no download task
    assert _phases(evs, "sync") == [
        "pre_initialization", "custom_initialization", "post_download", "post_placement_group",
        "pre_engine_init", "post_engine_init", "post_initialization",
    ]


def _chat(app: SeedApp, user: str) -> Any:
    import httpx

    body = {"model": "seeds-a", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4, "user": user}
    return httpx.post(app.base + "/v1/chat/completions", json=body, timeout=60)


def test_seed_request_callback_gets_cost_and_cost_limiter_refuses_a_spent_user(
    events: SeedApp,
) -> None:
    first = _chat(events, "alice")
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    # alice's first request spent more than the budget: her next one is refused, clearly.
    refused = _chat(events, "alice")
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "cost_limit_exceeded" and error["type"] == "cost"
    assert 0 < int(refused.headers["retry-after"]) <= 3600
    assert f"Cost limit reached: {BUDGET:g} USD per 3600s window" in error["message"]
    # Budgets are per user: bob still gets an answer.
    assert _chat(events, "bob").status_code == 200

    # (wait_ready's requests, without a user, came before.)
    ends = [e for e in events.read("seeds-a") if e["event"] == "llm_end" and e["user_id"]]
    assert [e["user_id"] for e in ends] == ["alice", "bob"]  # the refused one never ended
    alice = ends[0]
    expected = (usage["prompt_tokens"] * PRICE["input"]
                + usage["completion_tokens"] * PRICE["output"]) / 1e6
    # The cost CostTracker computed reached the seed class after it, as seed 004 reads it.
    assert alice["cost"] == pytest.approx(expected)
    assert alice["cost"] > BUDGET
    assert alice["tokens"] == usage["total_tokens"]
    assert alice["text"].endswith(f"{usage['total_tokens']} tokens, ${expected:.4f}")
    starts = [e for e in events.read("seeds-a") if e["event"] == "llm_start"]
    assert {e["provider"] for e in starts} == {"vllm"}
    # The refused request was stopped by the CostLimiter before the seed class's start.
    assert [e["user_id"] for e in starts if e["user_id"]] == ["alice", "bob"]
