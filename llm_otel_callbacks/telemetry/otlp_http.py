"""A lean OTLP/HTTP protobuf span exporter: what leaving the process costs, cut to its floor.

Profiling the replica (``benchmarks/profile_request_path.py``) showed span export as the largest
part of the request path's telemetry CPU, on the export thread but in the replica's process:

* the SDK's encoder groups spans by resource with a dict keyed by ``Resource``, whose hash is a
  JSON dump of all its attributes, once per span; then it encodes the resource again per batch;
* it builds one protobuf object per span, attribute and value, then serializes the tree;
* ``requests`` looks up ``.netrc``, proxy variables and ``no_proxy`` on every POST.

Here the resource and instrumentation scope are encoded once per process and reused as bytes;
a span is written straight into the protobuf wire format, and attributes whose key and value
repeat (hook, class, model, operation ...) are encoded once and reused from a bounded cache.
The session resolves proxies, ``.netrc`` and the CA bundle once, at construction.
Spans are grouped by resource and scope object identity, not by hashing.

The output is the same ``ExportTraceServiceRequest`` the SDK sends (tests/test_otlp_http.py
decodes both and compares them). Compression, certificates and client certificates follow the
``OTEL_EXPORTER_OTLP_[TRACES_]*`` variables, as the SDK's exporter does.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .export import OneShotSession

logger = logging.getLogger(__name__)

_Q = struct.Struct("<Q").pack
_I = struct.Struct("<I").pack
_D = struct.Struct("<d").pack
_SMALL = [bytes([n]) for n in range(128)]
_CACHE_LIMIT = 4096
_REMOTE_FLAGS = 0x100 | 0x200  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE | _IS_REMOTE
_LOCAL_FLAGS = 0x100


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n] if n >= 0 else _varint(n & 0xFFFFFFFFFFFFFFFF)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 0x80 else _varint(n)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message (its fields, without an outer tag)."""
    if isinstance(value, str):
        return _ld(b"\x0a", value.encode("utf-8"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _D(value)
    if isinstance(value, bytes):
        return _ld(b"\x3a", value)
    if isinstance(value, (tuple, list)):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _ld(b"\x32", b"".join(_ld(b"\x0a", _key_value(str(k), v))
                                     for k, v in value.items()))
    if value is None:
        return b""
    raise TypeError(f"invalid attribute value type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return _ld(b"\x0a", key.encode("utf-8")) + _ld(b"\x12", _any_value(value))


class SpanEncoder:
    """Encodes SDK spans into an ``ExportTraceServiceRequest`` (bytes), caching what repeats."""

    def __init__(self) -> None:
        # Keyed by the field tag too: a resource and a span encode the same attribute under
        # different tags (ray.node_id, process.pid are on both).
        self._attrs: dict[tuple[bytes, str, type, Any], bytes] = {}
        self._names: dict[tuple[bytes, str], bytes] = {}  # span, event and attribute names
        self._resources: dict[int, tuple[Any, bytes]] = {}
        self._scopes: dict[int, tuple[Any, bytes]] = {}

    def _attributes(self, tag: bytes, attributes: Any) -> bytes:
        if not attributes:
            return b""
        cache = self._attrs
        parts = []
        for key, value in attributes.items():
            kind = type(value)
            if kind is float:  # durations and the like: seldom the same twice; the key is
                field = _ld(tag, self._text(b"\x0a", key) + b"\x12\x09\x21" + _D(value))
            elif kind is str or kind is int or kind is bool:
                ck = (tag, key, kind, value)
                cached = cache.get(ck)
                if cached is None:
                    cached = _ld(tag, _key_value(key, value))
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()  # ids, times and the like: keep the cache bounded
                    cache[ck] = cached
                field = cached
            else:
                try:
                    field = _ld(tag, _key_value(key, value))
                except TypeError as exc:  # the SDK logs and skips such an attribute too
                    logger.debug("attribute %s not encoded: %s", key, exc)
                    continue
            parts.append(field)
        return b"".join(parts)

    def _text(self, tag: bytes, text: str) -> bytes:
        """A string field whose values repeat (span, event and attribute names), cached."""
        ck = (tag, text)
        field = self._names.get(ck)
        if field is None:
            if len(self._names) >= _CACHE_LIMIT:
                self._names.clear()
            field = self._names[ck] = _ld(tag, text.encode("utf-8"))
        return field

    def _resource(self, resource: Any) -> bytes:
        cached = self._resources.get(id(resource))
        if cached is not None and cached[0] is resource:
            return cached[1]
        body = self._attributes(b"\x0a", resource.attributes if resource is not None else None)
        field = _ld(b"\x0a", body)
        self._resources[id(resource)] = (resource, field)
        return field

    def _scope(self, scope: Any) -> bytes:
        cached = self._scopes.get(id(scope))
        if cached is not None and cached[0] is scope:
            return cached[1]
        body = b""
        if scope is not None:
            body = _ld(b"\x0a", scope.name.encode("utf-8"))
            if scope.version:
                body += _ld(b"\x12", scope.version.encode("utf-8"))
            body += self._attributes(b"\x1a", scope.attributes)
        field = _ld(b"\x0a", body)
        self._scopes[id(scope)] = (scope, field)
        return field

    def span(self, span: ReadableSpan) -> bytes:
        ctx = span.context
        assert ctx is not None
        parts = [
            b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"),
            b"\x12\x08", ctx.span_id.to_bytes(8, "big"),
        ]
        if ctx.trace_state:
            state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
            parts.append(_ld(b"\x1a", state.encode("utf-8")))
        parent = span.parent
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        parts.append(self._text(b"\x2a", span.name))
        parts += (b"\x30", _SMALL[span.kind.value + 1])
        parts += (b"\x39", _Q(span.start_time or 0), b"\x41", _Q(span.end_time or 0))
        parts.append(self._attributes(b"\x4a", span.attributes))
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        for event in span.events:
            body = b"\x09" + _Q(event.timestamp) + self._text(b"\x12", event.name)
            body += self._attributes(b"\x1a", event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_ld(b"\x5a", body))
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))
        for link in span.links:
            lctx = link.context
            body = (b"\x0a\x10" + lctx.trace_id.to_bytes(16, "big")
                    + b"\x12\x08" + lctx.span_id.to_bytes(8, "big"))
            body += self._attributes(b"\x22", link.attributes)
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            body += b"\x35" + _I(_REMOTE_FLAGS if lctx.is_remote else _LOCAL_FLAGS)
            parts.append(_ld(b"\x6a", body))
        if span.dropped_links:
            parts += (b"\x70", _varint(span.dropped_links))
        status = span.status
        code = status.status_code.value
        if code or status.description:
            body = b""
            if status.description:
                body += _ld(b"\x12", status.description.encode("utf-8"))
            if code:
                body += b"\x18" + _varint(code)
            parts.append(_ld(b"\x7a", body))
        else:
            parts.append(b"\x7a\x00")  # UNSET, no description: an empty status
        remote = parent is not None and parent.is_remote
        parts += (b"\x85\x01", _I(_REMOTE_FLAGS if remote else _LOCAL_FLAGS))
        return b"".join(parts)

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialized ``ExportTraceServiceRequest`` of ``spans``."""
        groups: dict[tuple[int, int], tuple[Any, Any, list[bytes]]] = {}
        for span in spans:
            resource, scope = span.resource, span.instrumentation_scope
            key = (id(resource), id(scope))
            group = groups.get(key)
            if group is None:
                group = groups[key] = (resource, scope, [])
            group[2].append(_ld(b"\x12", self.span(span)))
        by_resource: dict[int, tuple[Any, list[bytes]]] = {}
        for resource, scope, encoded in groups.values():
            scope_spans = self._scope(scope) + b"".join(encoded)
            if scope is not None and scope.schema_url:
                scope_spans += _ld(b"\x1a", scope.schema_url.encode("utf-8"))
            entry = by_resource.setdefault(id(resource), (resource, []))
            entry[1].append(_ld(b"\x12", scope_spans))
        out = []
        for resource, scopes in by_resource.values():
            body = self._resource(resource) + b"".join(scopes)
            schema = getattr(resource, "schema_url", "")
            if schema:
                body += _ld(b"\x1a", schema.encode("utf-8"))
            out.append(_ld(b"\x0a", body))
        return b"".join(out)


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value.strip()
    return None


class LeanOtlpHttpSpanExporter(SpanExporter):
    """OTLP/HTTP protobuf spans through :class:`SpanEncoder` and a one-attempt session.

    One attempt per export (the session raises on failures and 429/5xx); the caller
    (``GuardedSpanExporter``) backs off and counts drops.
    """

    def __init__(self, url: str, headers: Mapping[str, str], timeout_s: float,
                 session: OneShotSession) -> None:
        self._url = url
        self._timeout = timeout_s
        self._session = session
        self._encoder = SpanEncoder()
        compression = (_env("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
                            "OTEL_EXPORTER_OTLP_COMPRESSION") or "none").lower()
        self._compress: Any = {"gzip": gzip.compress, "deflate": zlib.compress}.get(compression)
        self._headers = {"Content-Type": "application/x-protobuf", **dict(headers)}
        if self._compress is not None:
            self._headers["Content-Encoding"] = compression
        session.bind(
            url,
            ca_file=_env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                         "OTEL_EXPORTER_OTLP_CERTIFICATE"),
            client_cert=_env("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                             "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
            client_key=_env("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                            "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
        )
        self._shutdown = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        body = self._encoder.encode(spans)
        if self._compress is not None:
            body = self._compress(body)
        try:
            response = self._session.post(self._url, data=body, headers=self._headers,
                                          timeout=self._timeout)
        except Exception as exc:
            logger.debug("span export failed: %s", type(exc).__name__)
            return SpanExportResult.FAILURE
        ok = 200 <= response.status_code < 300
        response.close()
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._shutdown = True
        self._session.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
