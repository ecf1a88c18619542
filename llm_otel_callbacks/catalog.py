"""Every metric, span and span attribute this package emits, with a sentence each.

Code, docs/catalog.md and the Grafana dashboards are all derived from this module, so a
name is typed once. Metric names here are *base* names; what a Prometheus scrape shows
depends on the backend that exported it (see :meth:`MetricSpec.exposed_name`):

* inside a Ray worker the metric goes through Ray's metrics agent, which adds the ``ray_``
  prefix (``ray_llm_callback_hook_calls_total``);
* outside Ray it goes to a ``prometheus_client`` registry with no prefix
  (``llm_callback_hook_calls_total``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["counter", "histogram", "gauge"]

#: Prefix Ray's metrics agent puts in front of every application metric.
RAY_PREFIX = "ray_"

# Buckets: hooks range from microseconds to many minutes (a download hook can wait for a
# mirror); startup phases from a second to an hour.
HOOK_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900,
)
PHASE_BUCKETS: tuple[float, ...] = (
    0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800, 3600,
)
REQUEST_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)
TOKEN_COUNT_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576,
)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its base name, kind, unit, labels and (for histograms) buckets."""

    name: str
    kind: MetricKind
    unit: str
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None
    otel_name: str | None = None
    """Name on the OTLP backend when it differs (OTel semconv names have dots)."""
    otel_labels: tuple[str, ...] | None = None
    """Attribute keys on the OTLP backend, in ``labels`` order, when they differ."""

    def exposed_name(self, *, ray: bool) -> str:
        """The family name a Prometheus scrape shows (histograms add _bucket/_sum/_count)."""
        base = (RAY_PREFIX if ray else "") + self.name
        return base + "_total" if self.kind == "counter" else base

    def series_names(self, *, ray: bool) -> tuple[str, ...]:
        """Every sample name this metric produces in the exposition format."""
        base = self.exposed_name(ray=ray)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


# --- label names (bounded cardinality only: ids of requests and paths go in spans) ---
L_MODEL = "model"
L_HOOK = "hook"
L_CALLBACK = "callback"
L_OUTCOME = "outcome"
L_PHASE = "phase"
L_NODE = "node"
L_POLICY = "policy"
L_RULE = "rule"
L_STRATEGY = "strategy"
L_FIELD = "field"
L_SIGNAL = "signal"
L_REASON = "reason"

# --- outcomes of a hook call ---
OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
OUTCOME_TIMEOUT = "timeout"
OUTCOMES = (OUTCOME_OK, OUTCOME_ERROR, OUTCOME_TIMEOUT)

# --- metrics ---
HOOK_DURATION = MetricSpec(
    "llm_callback_hook_duration_seconds", "histogram", "s",
    "Wall time of one callback hook call, by hook, callback and outcome "
    "(on_llm_stream_chunk: one observation per stream, the summed time of its calls).",
    (L_MODEL, L_HOOK, L_CALLBACK, L_OUTCOME), HOOK_BUCKETS,
)
HOOK_CALLS = MetricSpec(
    "llm_callback_hook_calls", "counter", "1",
    "Callback hook calls, by hook, callback and outcome (ok, error, timeout).",
    (L_MODEL, L_HOOK, L_CALLBACK, L_OUTCOME),
)
CTX_CHANGES = MetricSpec(
    "llm_callback_ctx_changes", "counter", "1",
    "Changes a composite child made to a CallbackCtx field, by child and field.",
    (L_MODEL, L_CALLBACK, L_FIELD),
)
STARTUP_PHASE_DURATION = MetricSpec(
    "llm_callback_startup_phase_duration_seconds", "histogram", "s",
    "Duration of one phase of a replica's startup (Timing), by phase, node and outcome.",
    (L_MODEL, L_PHASE, L_NODE, L_OUTCOME), PHASE_BUCKETS,
)
REPLICAS_STARTING = MetricSpec(
    "llm_callback_replicas_starting", "gauge", "1",
    "Replicas between on_before_node_init and the end of their startup (Timing).",
    (L_MODEL,),
)
DOWNLOAD_DECISIONS = MetricSpec(
    "llm_callback_download_policy_decisions", "counter", "1",
    "Download-policy decisions (DownloadPolicy), by chosen policy, deciding rule and node.",
    (L_MODEL, L_POLICY, L_RULE, L_NODE),
)
PLACEMENT_GROUP_WAIT = MetricSpec(
    "llm_callback_placement_group_wait_seconds", "histogram", "s",
    "Time waited for a placement group to become ready (CustomPlacementGroup).",
    (L_MODEL, L_STRATEGY, L_OUTCOME), PHASE_BUCKETS,
)
EXPORT_FAILURES = MetricSpec(
    "llm_callback_telemetry_export_failures", "counter", "1",
    "Spans dropped, by reason: export_failed (the collector refused, failed or timed out), "
    "backoff (skipped while backing off from a failing collector), queue_full (the export "
    "queue was full: a slow or hanging collector), shutdown (left at exit); sink_failed "
    "counts sinks that could not be set up (an unwritable traces_file, a taken "
    "prometheus_port), each once, with signal traces or metrics: the others still work.",
    (L_SIGNAL, L_REASON),
)

#: EXPORT_FAILURES reason: a sink (exporter or metrics backend) that could not be set up.
REASON_SINK_FAILED = "sink_failed"

CORE_METRICS: tuple[MetricSpec, ...] = (HOOK_DURATION, HOOK_CALLS, EXPORT_FAILURES)
BUILTIN_METRICS: tuple[MetricSpec, ...] = (
    CTX_CHANGES, STARTUP_PHASE_DURATION, REPLICAS_STARTING, DOWNLOAD_DECISIONS,
    PLACEMENT_GROUP_WAIT,
)
ALL_METRICS: tuple[MetricSpec, ...] = CORE_METRICS + BUILTIN_METRICS

# --- span names ---
SPAN_STARTUP = "ray_serve_llm.replica.startup"
"""Root span of one replica's startup; every hook span (in every process) is under it."""
SPAN_HOOK_PREFIX = "llm_callback "
"""A hook span is ``llm_callback <hook>``; a composite child's, ``llm_callback <hook> <child>``."""
SPAN_PHASE_PREFIX = "startup_phase "
"""A Timing phase span is named ``startup_phase <phase>``."""

# --- span attributes ---
A_HOOK = "llm_callback.hook"
"""Name of the hook (``on_before_node_init`` ...)."""
A_CLASS = "llm_callback.class"
"""Qualified class name of the callback that ran the hook."""
A_CALLBACK = "llm_callback.name"
"""Name of the callback (a composite child's configured name)."""
A_OUTCOME = "llm_callback.outcome"
"""``ok``, ``error`` or ``timeout``."""
A_MODEL = "gen_ai.request.model"
"""The model id of the LLMConfig (OTel GenAI convention name)."""
A_RAISE = "llm_callback.raise_error_on_callback"
"""The raise policy in force for the call."""
A_TIMEOUT = "llm_callback.timeout_s"
"""The timeout in force for the call, when one is set."""
A_PID = "process.pid"
"""Process id of the process that ran the hook (also a resource attribute)."""
A_NODE_ID = "ray.node_id"
"""Ray node id (resource attribute, and on per-node spans)."""
A_PHASE = "llm_callback.phase"
"""Startup phase name (Timing)."""
A_FIELD = "llm_callback.ctx.field"
"""CallbackCtx field a child changed (change-log events)."""
A_OLD = "llm_callback.ctx.old"
"""Summary of the value before the change."""
A_NEW = "llm_callback.ctx.new"
"""Summary of the value after the change."""
A_POLICY = "llm_callback.download.policy"
"""Download policy chosen (DownloadPolicy)."""
A_RULE = "llm_callback.download.rule"
"""Rule that chose the policy (DownloadPolicy)."""
A_PG_ID = "ray.placement_group.id"
"""Placement group id chosen by CustomPlacementGroup."""
A_PG_STRATEGY = "ray.placement_group.strategy"
"""Placement group strategy."""
A_PG_BUNDLES = "ray.placement_group.bundles"
"""Placement group bundles (JSON)."""
A_VETOED_BY = "llm_callback.vetoed_by"
"""Every composite child that has turned Ray's node initialization off, in order."""

# --- span events ---
EVENT_CTX_CHANGE = "ctx_change"
"""A composite child changed a CallbackCtx field."""
EVENT_VETO = "node_init_vetoed"
"""A composite child turned Ray's node initialization off."""
EVENT_VETO_KEPT = "node_init_veto_kept"
"""A later child set ``run_init_node`` back to True after a veto: refused, the veto stays."""

# Resource attribute keys set when the process runs in Ray / Serve.
R_RAY_NODE = "ray.node_id"
R_RAY_JOB = "ray.job_id"
R_RAY_ACTOR = "ray.actor_id"
R_SERVE_APP = "ray.serve.app"
R_SERVE_DEPLOYMENT = "ray.serve.deployment"
R_SERVE_REPLICA = "ray.serve.replica_id"

# --- built-in callbacks (builtin/: Timing, DownloadPolicy, CustomPlacementGroup) ---------------
# Label values and span attributes of the built-ins. Metrics are declared above.

# Timing phases (values of the ``phase`` label and of ``A_PHASE``).
PHASE_BEFORE_NODE_INIT = "before_node_init"
"""Callback creation -> ``on_before_node_init`` (replica actor start, engine config, PG)."""
PHASE_NODE_INIT = "node_init"
"""``on_before_node_init`` -> ``on_after_node_init`` (Ray's initialize_node, all nodes)."""
PHASE_DOWNLOAD_TASK_START = "download_task_start"
"""``on_before_node_init`` -> the download hook starting on one node (task scheduling, worker
start, imports, unpickling); labelled with that node."""
PHASE_DOWNLOAD_TASK_SCHEDULING = "download_task_scheduling"
"""Part of ``download_task_start``: ``on_before_node_init`` -> the raylet launches a worker
process for the download task (scheduling the task). Only when the task got a new worker."""
PHASE_DOWNLOAD_TASK_WORKER_START = "download_task_worker_start"
"""Part of ``download_task_start``: the worker process launched -> Ray's worker main imported
``ray`` (interpreter and Ray imports). Only when the task got a new worker."""
PHASE_DOWNLOAD_TASK_IMPORTS = "download_task_imports"
"""Part of ``download_task_start``: Ray's worker main running -> the download hook (connecting,
receiving the task, importing its function with vLLM, unpickling the LLMConfig). Only when the
task got a new worker."""
DOWNLOAD_TASK_PHASES = (
    PHASE_DOWNLOAD_TASK_SCHEDULING, PHASE_DOWNLOAD_TASK_WORKER_START, PHASE_DOWNLOAD_TASK_IMPORTS,
)
PHASE_ENGINE_START = "engine_start"
"""``on_before_engine_start`` -> ``on_after_engine_start``, when a server wrapper calls them."""
PHASE_TOTAL = "total"
"""Callback creation -> end of the startup, ok or error: counts every attempt (metric only;
the startup span is its span)."""
TIMING_PHASES = (
    PHASE_BEFORE_NODE_INIT, PHASE_NODE_INIT, PHASE_DOWNLOAD_TASK_START, PHASE_ENGINE_START,
    PHASE_TOTAL,
)

# DownloadPolicy rules (values of the ``rule`` label and of ``A_RULE``).
RULE_ENV = "env"
"""An environment variable on the node (or replica) set the policy."""
RULE_LOCAL_CACHE = "local_cache"
"""The node's local model cache holds a complete copy: the weights download is skipped."""
RULE_FIXED = "fixed"
"""The ``worker_node`` kwarg set the policy."""
RULE_RAY_DEFAULT = "ray_default"
"""Nothing applied: Ray's own choice was kept."""
RULE_EXTERNAL = "external"
"""Something after DownloadPolicy changed the value Ray used (e.g. a later composite child)."""
DOWNLOAD_RULES = (RULE_ENV, RULE_LOCAL_CACHE, RULE_FIXED, RULE_RAY_DEFAULT, RULE_EXTERNAL)

A_DOWNLOAD_REASON = "llm_callback.download.reason"
"""Why the rule chose the policy, in words (e.g. the cache snapshot checked)."""
A_DOWNLOAD_REPLICA_POLICY = "llm_callback.download.replica_policy"
"""Policy chosen in the replica before the pickle (nodes may refine it)."""
A_DOWNLOAD_CACHE_PATH = "llm_callback.download.cache_path"
"""Snapshot directory of the local model cache that was checked."""

A_PG_NAME = "ray.placement_group.name"
"""Name of the placement group, when it has one."""
A_PG_CREATED = "llm_callback.placement_group.created"
"""True when CustomPlacementGroup created the group (and so will remove it)."""
A_PG_REPLACED = "llm_callback.placement_group.replaced_id"
"""Id of the group that was on the ctx before (the replica's own; never removed)."""
A_PG_WAIT = "llm_callback.placement_group.wait_s"
"""Seconds waited for the group to be ready."""

# --- requests (serve/: ObservedLLMServer, request hooks, builtin tokens/cost/rate_limit/progress)
# GenAI request telemetry follows the OTel GenAI semantic conventions for model servers. Metric
# and label names with dots exist only on the OTLP backend (``otel_name`` / ``otel_labels``);
# Prometheus-style backends get what the OTel -> Prometheus translation makes of them (dots to
# underscores, unit suffix), so a Ray scrape and an OTLP pipeline ending in Prometheus agree:
#
#   gen_ai.server.request.duration (OTLP)
#     -> ray_gen_ai_server_request_duration_seconds (Ray: in a replica, ray_ prefix)
#     -> gen_ai_server_request_duration_seconds (prometheus_client, outside Ray)
#   gen_ai.server.time_to_first_token -> [ray_]gen_ai_server_time_to_first_token_seconds
#   gen_ai.server.time_per_output_token -> [ray_]gen_ai_server_time_per_output_token_seconds
#   gen_ai.server.token.usage -> [ray_]gen_ai_server_token_usage
#
# (histograms add _bucket/_sum/_count). Semconv defines token usage only for clients
# (gen_ai.client.token.usage); gen_ai.server.token.usage mirrors it (unit, buckets,
# gen_ai.token.type) for the server side. Request ids are span attributes, never labels.

L_GENAI_OPERATION = "gen_ai_operation_name"
L_GENAI_PROVIDER = "gen_ai_provider_name"
L_GENAI_MODEL = "gen_ai_request_model"
L_ERROR_TYPE = "error_type"
L_GENAI_TOKEN_TYPE = "gen_ai_token_type"
L_TOKEN_TYPE = "token_type"
L_CURRENCY = "currency"

_GENAI_LABELS = (L_GENAI_OPERATION, L_GENAI_PROVIDER, L_GENAI_MODEL)
_GENAI_OTEL_LABELS = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model")
TPOT_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)

GENAI_REQUEST_DURATION = MetricSpec(
    "gen_ai_server_request_duration_seconds", "histogram", "s",
    "GenAI server request duration (to the last output token or byte), by operation, model "
    "and error type (empty on success).",
    (*_GENAI_LABELS, L_ERROR_TYPE), REQUEST_BUCKETS,
    otel_name="gen_ai.server.request.duration",
    otel_labels=(*_GENAI_OTEL_LABELS, "error.type"),
)
GENAI_TIME_TO_FIRST_TOKEN = MetricSpec(
    "gen_ai_server_time_to_first_token_seconds", "histogram", "s",
    "Time to the first output token of successful streamed responses.",
    _GENAI_LABELS, TOKEN_LATENCY_BUCKETS,
    otel_name="gen_ai.server.time_to_first_token", otel_labels=_GENAI_OTEL_LABELS,
)
GENAI_TIME_PER_OUTPUT_TOKEN = MetricSpec(
    "gen_ai_server_time_per_output_token_seconds", "histogram", "s",
    "Time per output token after the first, for successful streamed responses.",
    _GENAI_LABELS, TPOT_BUCKETS,
    otel_name="gen_ai.server.time_per_output_token", otel_labels=_GENAI_OTEL_LABELS,
)
GENAI_TOKEN_USAGE = MetricSpec(
    "gen_ai_server_token_usage", "histogram", "{token}",
    "Input and output tokens per successful request (the response's usage), by token type.",
    (*_GENAI_LABELS, L_GENAI_TOKEN_TYPE), TOKEN_COUNT_BUCKETS,
    otel_name="gen_ai.server.token.usage",
    otel_labels=(*_GENAI_OTEL_LABELS, "gen_ai.token.type"),
)
REQUESTS_REJECTED = MetricSpec(
    "llm_callback_requests_rejected", "counter", "1",
    "Requests a request hook rejected (e.g. RateLimiter: HTTP 429), by callback and reason.",
    (L_MODEL, L_CALLBACK, L_REASON),
)
TOKENS = MetricSpec(
    "llm_callback_tokens", "counter", "{token}",
    "Tokens counted by TokenCounter, by model and token type (input, output).",
    (L_MODEL, L_TOKEN_TYPE),
)
COST = MetricSpec(
    "llm_callback_cost", "counter", "1",
    "Cost of requests computed by CostTracker from its per-model prices, in its currency.",
    (L_MODEL, L_CURRENCY),
)
COST_UNPRICED = MetricSpec(
    "llm_callback_cost_unpriced_requests", "counter", "1",
    "Requests CostTracker could not price (no price for the model and no default).",
    (L_MODEL,),
)
STREAM_CHUNKS = MetricSpec(
    "llm_callback_stream_chunks", "histogram", "{chunk}",
    "Chunks per streamed response (StreamingProgress).",
    (L_MODEL, L_OUTCOME), TOKEN_COUNT_BUCKETS,
)
STREAMS_ACTIVE = MetricSpec(
    "llm_callback_streams_active", "gauge", "1",
    "Streamed responses in progress in this replica (StreamingProgress).",
    (L_MODEL,),
)

REQUEST_METRICS: tuple[MetricSpec, ...] = (
    GENAI_REQUEST_DURATION, GENAI_TIME_TO_FIRST_TOKEN, GENAI_TIME_PER_OUTPUT_TOKEN,
    GENAI_TOKEN_USAGE, REQUESTS_REJECTED, TOKENS, COST, COST_UNPRICED, STREAM_CHUNKS,
    STREAMS_ACTIVE,
)
ALL_METRICS = ALL_METRICS + REQUEST_METRICS

# Values of the GenAI labels/attributes.
OPERATION_CHAT = "chat"
OPERATION_TEXT_COMPLETION = "text_completion"
OPERATION_EMBEDDINGS = "embeddings"
TOKEN_TYPE_INPUT = "input"
TOKEN_TYPE_OUTPUT = "output"
ERROR_CANCELLED = "cancelled"
"""error.type of a request whose client went away (the stream was closed early)."""

SPAN_ENGINE_START = "ray_serve_llm.engine.start"
"""Building the inference engine after node init (ObservedLLMServer), under the startup span."""
# A request span is named "{gen_ai.operation.name} {gen_ai.request.model}" (semconv), kind SERVER.

A_GENAI_OPERATION = "gen_ai.operation.name"
"""``chat``, ``text_completion`` or ``embeddings``."""
A_GENAI_PROVIDER = "gen_ai.provider.name"
"""The engine serving the model (``vllm``)."""
A_GENAI_RESPONSE_MODEL = "gen_ai.response.model"
"""Model name in the response."""
A_GENAI_RESPONSE_ID = "gen_ai.response.id"
"""Id of the completion in the response."""
A_GENAI_FINISH_REASONS = "gen_ai.response.finish_reasons"
"""Finish reason of each choice."""
A_GENAI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
"""Prompt tokens (the response's usage)."""
A_GENAI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
"""Completion tokens (the response's usage)."""
A_GENAI_MAX_TOKENS = "gen_ai.request.max_tokens"
"""max_tokens (or max_completion_tokens) of the request."""
A_GENAI_TEMPERATURE = "gen_ai.request.temperature"
"""temperature of the request."""
A_GENAI_TOP_P = "gen_ai.request.top_p"
"""top_p of the request."""
A_ERROR_TYPE = "error.type"
"""Class of the error that ended the request (semconv)."""
A_REQUEST_ID = "ray.serve.request_id"
"""Serve request id (also the engine request id): in spans only, never a metric label."""
A_STREAM = "llm_callback.request.stream"
"""True for a streamed response."""
A_TTFT = "llm_callback.request.time_to_first_token_s"
"""Seconds to the first streamed chunk."""
A_CHUNKS = "llm_callback.request.chunks"
"""Chunks streamed to the client."""
A_REJECTED_BY = "llm_callback.request.rejected_by"
"""Callback that rejected the request (e.g. a RateLimiter)."""
A_REJECT_REASON = "llm_callback.request.reject_reason"
"""Why it was rejected (RateLimiter: ``requests`` or ``tokens``)."""
A_RETRY_AFTER = "llm_callback.request.retry_after_s"
"""Seconds the client was told to wait (Retry-After)."""
A_COST = "llm_callback.cost"
"""Cost of the request (CostTracker), in ``llm_callback.cost.currency``."""
A_CURRENCY = "llm_callback.cost.currency"
"""Currency of ``llm_callback.cost``."""
A_PROGRESS_CHUNKS = "llm_callback.stream.chunks"
"""Chunks so far (StreamingProgress events)."""
A_PROGRESS_TOKENS = "llm_callback.stream.completion_tokens"
"""Completion tokens so far (StreamingProgress events)."""
A_PROGRESS_ELAPSED = "llm_callback.stream.elapsed_s"
"""Seconds since the request started (StreamingProgress events)."""

EVENT_HOOK_ERROR = "llm_callback.hook_error"
"""A request hook failed under the log policy; the request went on."""
EVENT_HOOK_CALL = "llm_callback.hook_call"
"""One request-hook call of one callback (stream chunks: one event per callback and stream)."""
A_HOOK_SECONDS = "llm_callback.hook.duration_s"
"""Wall time of the request-hook call (stream chunks: summed over the stream's calls)."""
A_HOOK_CALLS = "llm_callback.hook.calls"
"""Stream-chunk hook calls of one callback in the stream (``llm_callback.hook_call`` events)."""
EVENT_STREAM_PROGRESS = "llm_callback.stream_progress"
"""StreamingProgress: progress of one streamed response."""

# --- engine start, inside vLLM (vllm_plugin/: the vllm.general_plugins entry point) ------------
# Phases of ``engine_start`` recorded in vLLM's own processes (and two on the replica side), as
# spans under the replica's engine-start span and points of STARTUP_PHASE_DURATION. Which of
# them a given vLLM gives is pinned by tests/test_engine_phases.py.
PHASE_ENGINE_CONFIG = "engine_config"
"""Replica: engine start -> the engine-core process exists (engine args, vLLM config, tokenizer
and input processor, spawning the engine core)."""
PHASE_ENGINE_CORE_BOOT = "engine_core_boot"
"""Engine core: process start -> vLLM's plugins load (interpreter, torch and vLLM imports,
handshake with the replica)."""
PHASE_ENGINE_WORKERS_START = "engine_workers_start"
"""Engine core: building the executor (start the worker processes and wait until each has its
device and weights)."""
PHASE_ENGINE_KV_CACHE = "engine_kv_cache"
"""Engine core: KV-cache setup on all workers (memory profiling, allocation, compile and
warm-up)."""
PHASE_ENGINE_CORE_SETUP = "engine_core_setup"
"""Engine core: KV cache set up -> serving loop (scheduler, I/O threads, ready handshake)."""
PHASE_ENGINE_FRONTEND_READY = "engine_frontend_ready"
"""Replica: engine core ready -> engine start done (handshake, Ray's OpenAI serving setup)."""
PHASE_WORKER_BOOT = "worker_boot"
"""Worker: process start -> vLLM's plugins load (interpreter, torch and vLLM imports)."""
PHASE_WORKER_INIT = "worker_init"
"""Worker: vLLM's plugins loaded -> device init begins (importing and building the worker class
and its model runner)."""
PHASE_WORKER_DEVICE_INIT = "worker_device_init"
"""Worker: device and distributed init (``init_device``)."""
PHASE_WORKER_WEIGHTS_LOAD = "worker_weights_load"
"""Worker: building the model and loading its weights (``load_model``); size in bytes."""
PHASE_WORKER_KV_PROFILE = "worker_kv_cache_profile"
"""Worker: profiling memory for the KV cache (``determine_available_memory``)."""
PHASE_WORKER_KV_ALLOCATE = "worker_kv_cache_allocate"
"""Worker: allocating the KV cache (``initialize_from_config``)."""
PHASE_WORKER_WARMUP = "worker_compile_warmup"
"""Worker: torch.compile, CUDA-graph capture and warm-up (``compile_or_warm_up_model``)."""
PHASE_WORKER_TORCH_COMPILE = "worker_torch_compile"
"""Worker: torch.compile of the model graph, when it runs (inside a profile or warm-up)."""
PHASE_WORKER_CUDA_GRAPHS = "worker_cuda_graph_capture"
"""Worker: CUDA-graph capture, when it runs (inside warm-up)."""
ENGINE_PHASES = (
    PHASE_ENGINE_CONFIG, PHASE_ENGINE_CORE_BOOT, PHASE_ENGINE_WORKERS_START,
    PHASE_ENGINE_KV_CACHE, PHASE_ENGINE_CORE_SETUP, PHASE_ENGINE_FRONTEND_READY,
    PHASE_WORKER_BOOT, PHASE_WORKER_INIT, PHASE_WORKER_DEVICE_INIT, PHASE_WORKER_WEIGHTS_LOAD,
    PHASE_WORKER_KV_PROFILE, PHASE_WORKER_KV_ALLOCATE, PHASE_WORKER_WARMUP,
    PHASE_WORKER_TORCH_COMPILE, PHASE_WORKER_CUDA_GRAPHS,
)

ROLE_REPLICA = "replica"
ROLE_ENGINE_CORE = "engine_core"
ROLE_WORKER = "worker"
ENGINE_ROLES = (ROLE_REPLICA, ROLE_ENGINE_CORE, ROLE_WORKER)

A_ENGINE_ROLE = "llm_callback.engine.role"
"""Which process recorded an engine phase: ``replica``, ``engine_core`` or ``worker``."""
A_ENGINE_RANK = "llm_callback.engine.rank"
"""Global rank of the worker that recorded an engine phase."""
A_WEIGHTS_BYTES = "llm_callback.engine.weights_bytes"
"""Bytes of model weights a worker loaded (its shard), on ``worker_weights_load``."""
A_FAILED_PHASE = "llm_callback.engine.failed_phase"
"""The engine phase that failed, on a failed engine-start span."""
A_PHASE_COVERAGE = "llm_callback.engine.phase_coverage"
"""Share of the engine-start span the phase spans explain (union of their intervals), 0..1."""
