"""DownloadPolicy: choose what each node downloads (Ray's ``NodeModelDownloadable``).

Ray reads ``ctx.worker_node_download_model`` in each per-node download task *before* the
download hook runs there (``initialize_remote_node``), so the policy is decided in two steps:

1. in the replica, in ``on_before_node_init`` (before the pickle): the environment variable if
   set there, else the ``worker_node`` kwarg, else Ray's own choice;
2. on each node, when the callback is unpickled there (:meth:`after_unpickle`, before Ray reads
   the ctx): the environment variable if set on that node, else the local-cache rule (a
   complete copy of the weights on that node: download everything but the ``.safetensors``),
   else the replica's choice.

Each node's decision is counted (``llm_callback_download_policy_decisions``, labels policy,
rule, node) and put on that node's download-hook span.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from opentelemetry import trace
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .. import CallbackConfigError, RayServeLLMCallback, catalog
from .._ray import cloud_file_system, node_model_downloadable
from ._common import short_id, this_node_id, upper_name

logger = logging.getLogger(__name__)

Policy = Literal["MODEL_AND_TOKENIZER", "TOKENIZER_ONLY", "EXCLUDE_SAFETENSORS", "NONE"]
POLICIES: tuple[str, ...] = get_args(Policy)
DEFAULT_ENV_VAR = "LLM_OTEL_DOWNLOAD_POLICY"
#: What Ray writes to ``refs/main`` when the mirror has no ``hash`` file.
RAY_DEFAULT_HASH = "0" * 40
_NODE_DECISION = "download.decision"  # process_cache key


class DownloadPolicyOptions(BaseModel):
    """``callback_kwargs`` of :class:`DownloadPolicy`."""

    model_config = ConfigDict(defer_build=True, extra="forbid")

    worker_node: Annotated[Policy, BeforeValidator(upper_name)] | None = None
    """Fixed policy for every node (any case); None keeps Ray's choice."""
    env_var: str | None = Field(default=DEFAULT_ENV_VAR, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Environment variable that overrides the policy where it is set (None: no override)."""
    skip_weights_if_cached: bool = False
    """On a node whose local model cache holds a complete copy, download all but the weights."""
    verify_mirror_hash: bool = True
    """With a cloud mirror, count the cached copy only if it is the mirror's current snapshot
    (reads the mirror's ``hash`` file, as Ray's download does)."""


@dataclass(frozen=True)
class DownloadDecision:
    """A policy (a ``NodeModelDownloadable`` name), the rule that chose it, and why."""

    policy: str
    rule: str
    reason: str
    cache_path: str | None = None


@dataclass(frozen=True)
class CacheCheck:
    """Whether a node's local cache holds a complete copy of the model, and why (not)."""

    complete: bool
    reason: str
    path: str | None = None


class DownloadPolicy(RayServeLLMCallback):
    """Sets ``ctx.worker_node_download_model`` per replica and per node.

    Override points:

    * :meth:`decide_for_replica` -- the replica-wide choice, made before the pickle;
    * :meth:`decide_for_node` -- the per-node refinement, made on each node before Ray reads
      the ctx there (runs in the download task's process: only node-local facts);
    * :meth:`check_local_copy` -- what counts as a complete local copy.

    Return a :class:`DownloadDecision` whose ``rule`` is a short fixed word (it is a metric
    label).
    """

    kwargs_model: ClassVar[type[BaseModel] | None] = DownloadPolicyOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set in the replica, travel with the pickle to every node.
        self.replica_decision: DownloadDecision | None = None
        self.download_model_id: str | None = None
        self.download_bucket_uri: str | None = None

    # --- override points ----------------------------------------------------------------------

    def decide_for_replica(self, current: str) -> DownloadDecision:
        """The replica-wide policy. ``current`` is the policy on the ctx now (Ray's choice,
        or an earlier callback's). An invalid environment value fails the replica here."""
        env = self._env_decision(strict=True)
        if env is not None:
            return env
        fixed = self.options.worker_node
        if fixed is not None:
            return DownloadDecision(fixed, catalog.RULE_FIXED, "worker_node kwarg")
        return DownloadDecision(current, catalog.RULE_RAY_DEFAULT, "Ray's choice kept")

    def decide_for_node(self, replica: DownloadDecision) -> DownloadDecision:
        """This node's policy, given the replica's. Runs in the per-node task process."""
        env = self._env_decision(strict=False)
        if env is not None:
            return env
        cacheable = replica.rule != catalog.RULE_ENV and replica.policy == "MODEL_AND_TOKENIZER"
        if self.options.skip_weights_if_cached and cacheable:
            check = self.check_local_copy()
            if check.complete:
                return DownloadDecision(
                    "EXCLUDE_SAFETENSORS", catalog.RULE_LOCAL_CACHE, check.reason, check.path
                )
            return replace(replica, reason=f"{replica.reason}; cache: {check.reason}",
                           cache_path=check.path)
        return replica

    def check_local_copy(self) -> CacheCheck:
        """Does this node's model cache (where Ray's downloader writes) hold a complete copy?"""
        if not self.download_model_id:
            return CacheCheck(False, "model id unknown")
        bucket = self.download_bucket_uri if self.options.verify_mirror_hash else None
        return check_cached_model(model_cache_dir(self.download_model_id), bucket)

    # --- replica ------------------------------------------------------------------------------

    def on_before_node_init(self) -> None:
        decision = self.decide_for_replica(_policy_name(self.ctx.worker_node_download_model))
        self._apply(decision)
        self.replica_decision = decision
        self.download_model_id, self.download_bucket_uri = _download_source(self.llm_config)
        _annotate(trace.get_current_span(), decision)
        logger.info(
            "DownloadPolicy: model '%s': replica policy %s (rule %s: %s)",
            self.model_id, decision.policy, decision.rule, decision.reason,
        )

    # --- node -----------------------------------------------------------------------------------

    def after_unpickle(self) -> None:
        super().after_unpickle()
        if self.replica_decision is None:
            return  # unpickled before the replica decided: nothing to refine
        try:
            decision = self.decide_for_node(self.replica_decision)
        except Exception as exc:  # keep the replica's choice rather than fail the download
            logger.warning("DownloadPolicy: node rule failed, keeping %s: %s",
                           self.replica_decision.policy, exc)
            decision = replace(self.replica_decision,
                               reason=f"node rule failed: {type(exc).__name__}")
        self._apply(decision)
        self.process_cache[_NODE_DECISION] = decision

    def on_before_download_model_files_distributed(self) -> None:
        decision: DownloadDecision | None = self.process_cache.get(_NODE_DECISION)
        if decision is None:
            decision = self.replica_decision or DownloadDecision(
                _policy_name(self.ctx.worker_node_download_model), catalog.RULE_RAY_DEFAULT,
                "Ray's choice kept",
            )
        # Ray has already read the ctx: what it holds now is what this download uses.
        actual = _policy_name(self.ctx.worker_node_download_model)
        if actual != decision.policy:
            decision = DownloadDecision(actual, catalog.RULE_EXTERNAL,
                                        f"changed after DownloadPolicy chose {decision.policy}")
        node = this_node_id()
        self.metric(catalog.DOWNLOAD_DECISIONS).add(
            (self.model_id, decision.policy, decision.rule, node)
        )
        span = trace.get_current_span()
        _annotate(span, decision)
        if self.replica_decision is not None and span.is_recording():
            span.set_attribute(catalog.A_DOWNLOAD_REPLICA_POLICY, self.replica_decision.policy)
        logger.info(
            "DownloadPolicy: model '%s': node %s downloads %s (rule %s: %s)",
            self.model_id, short_id(node), decision.policy, decision.rule, decision.reason,
        )

    # --- helpers --------------------------------------------------------------------------------

    def _apply(self, decision: DownloadDecision) -> None:
        self.ctx.worker_node_download_model = node_model_downloadable()[decision.policy]

    def _env_decision(self, *, strict: bool) -> DownloadDecision | None:
        name = self.options.env_var
        raw = os.environ.get(name, "").strip() if name else ""
        if not raw:
            return None
        value = raw.upper()
        if value not in POLICIES:
            message = (
                f"DownloadPolicy: environment variable {name}={raw!r} is not a download "
                f"policy; allowed (any case): {', '.join(POLICIES)}"
            )
            if strict:
                raise CallbackConfigError(message)
            logger.warning("%s; ignored on this node", message)
            return None
        return DownloadDecision(value, catalog.RULE_ENV, f"{name}={value}")


# --- the local model cache (Ray's layout) -------------------------------------------------------


def model_cache_dir(model_id: str) -> Path:
    """Where Ray's ``CloudModelDownloader`` puts ``model_id`` on this node: the path itself when
    it exists, else ``<HF_HUB_CACHE>/models--<org>--<name>`` (HF_HUB_CACHE / HF_HOME apply)."""
    if Path(model_id).exists():
        return Path(model_id)
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE, f"models--{model_id.replace('/', '--')}").expanduser()


def check_cached_model(model_dir: Path, bucket_uri: str | None = None) -> CacheCheck:
    """A complete copy, in the layout Ray's downloader writes and reads:

    * ``refs/main`` names a snapshot (with a mirror: the hash Ray would write for it now);
    * ``snapshots/<hash>/`` has a ``*config.json`` (what Ray looks for to use the snapshot);
    * every weight shard is there and whole: the shards listed by
      ``model.safetensors.index.json``, or else the ``*.safetensors`` files (at least one), each
      as long as its own safetensors header says (a cut-off download fails this).
    """
    refs = model_dir / "refs" / "main"
    if not refs.is_file():
        return CacheCheck(False, f"no snapshot recorded ({refs} missing)")
    snapshot_hash = refs.read_text().strip()
    snapshot = model_dir / "snapshots" / snapshot_hash
    where = str(snapshot)
    if bucket_uri:
        try:
            expected = mirror_snapshot_hash(bucket_uri)
        except Exception as exc:
            return CacheCheck(False, f"mirror hash unreadable ({type(exc).__name__})", where)
        if expected != snapshot_hash:
            return CacheCheck(
                False, f"cached snapshot {snapshot_hash[:12]} is not the mirror's {expected[:12]}",
                where,
            )
    if not snapshot.is_dir():
        return CacheCheck(False, "snapshot directory missing", where)
    if not any(snapshot.glob("*config.json")):
        return CacheCheck(False, "no config.json in the snapshot", where)
    shards, problem = _weight_shards(snapshot)
    if problem:
        return CacheCheck(False, problem, where)
    for shard in shards:
        problem = _safetensors_problem(snapshot / shard)
        if problem:
            return CacheCheck(False, f"{shard}: {problem}", where)
    return CacheCheck(True, f"complete snapshot ({len(shards)} weight file(s))", where)


def mirror_snapshot_hash(bucket_uri: str) -> str:
    """The snapshot hash Ray's downloader will use for ``bucket_uri``: the mirror's ``hash``
    file, or Ray's all-zero default when it has none."""
    content = cloud_file_system().get_file(bucket_uri.rstrip("/") + "/hash", decode_as_utf_8=True)
    text = content.strip() if isinstance(content, str) else ""
    return text or RAY_DEFAULT_HASH


def _weight_shards(snapshot: Path) -> tuple[list[str], str | None]:
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted(set(weight_map.values())), None
        except (ValueError, KeyError, TypeError) as exc:
            return [], f"unreadable {index.name} ({type(exc).__name__})"
    shards = sorted(p.name for p in snapshot.glob("*.safetensors"))
    return shards, None if shards else "no .safetensors weights"


def _safetensors_problem(path: Path) -> str | None:
    """None when the file is as long as its header says; else what is wrong."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "truncated header"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                return "truncated header"
            header = json.loads(fh.read(header_len))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__})"
    data_end = 0
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict):
            data_end = max(data_end, int(entry.get("data_offsets", (0, 0))[1]))
    expected = 8 + header_len + data_end
    return None if size == expected else f"size {size} != {expected} (incomplete)"


def _download_source(llm_config: Any) -> tuple[str | None, str | None]:
    """(model id Ray downloads under, mirror bucket URI or None), read in the replica."""
    try:
        engine_config = llm_config.get_engine_config()
        model_id = str(engine_config.actual_hf_model_id)
        mirror = getattr(engine_config, "mirror_config", None)
        bucket = getattr(mirror, "bucket_uri", None) if mirror is not None else None
        return model_id, (str(bucket) if bucket else None)
    except Exception as exc:
        logger.warning("DownloadPolicy: model source unknown: %s", exc)
        return None, None


def _policy_name(value: Any) -> str:
    # Ray treats a missing value like a full download (anything but NONE downloads all).
    if value is None:
        return "MODEL_AND_TOKENIZER"
    return str(getattr(value, "name", value))


def _annotate(span: Any, decision: DownloadDecision) -> None:
    if not span.is_recording():
        return
    span.set_attribute(catalog.A_POLICY, decision.policy)
    span.set_attribute(catalog.A_RULE, decision.rule)
    span.set_attribute(catalog.A_DOWNLOAD_REASON, decision.reason)
    if decision.cache_path:
        span.set_attribute(catalog.A_DOWNLOAD_CACHE_PATH, decision.cache_path)
