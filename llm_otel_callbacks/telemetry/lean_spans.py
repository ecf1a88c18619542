"""A tracer whose spans cost a fraction of the SDK's, for the provider this package builds.

The SDK's ``Span`` cleans every attribute through ``BoundedAttributes`` (several ``isinstance``
checks against ABCs per value, one lock per attribute) and copies the span into a new
``ReadableSpan`` when it ends. In the replica that was the largest part of a request's
telemetry CPU (``docs/benchmarks.md``). The attributes this package sets are already plain
strings, numbers and booleans, and the processors it installs only queue the span.

:class:`LeanTracer` starts a :class:`LeanSpan` instead, with the same sampler, id generator,
resource, scope and limits, when all of this holds (checked per span, a few attribute reads):

* the provider is the one this package built (an installed provider is used as it is);
* every processor on it is a :class:`~.export.SpanQueueProcessor` (``on_start`` does nothing,
  ``on_end`` queues the span it is given), so a processor someone adds later gets SDK spans;
* no attribute value length limit is set (``OTEL_*ATTRIBUTE_VALUE_LENGTH_LIMIT``).

Otherwise it hands the call to the SDK tracer. A :class:`LeanSpan` is a ``ReadableSpan`` and a
full ``opentelemetry.trace.Span``: hooks can set attributes, add events and links, record
exceptions and set the status, with the SDK's rules (values of other types are cleaned by the
SDK's own ``BoundedAttributes``; the oldest attribute is dropped past the count limit; nothing
changes once the span has ended). Ending queues the span itself, which no longer changes.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

logger = logging.getLogger(__name__)

_PLAIN = frozenset((str, int, float, bool))
# Newer SDKs also flag trace ids that are random (W3C trace context level 2).
_RANDOM = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))
_FLAGS = {(sampled, random): TraceFlags((TraceFlags.SAMPLED if sampled else 0)
                                        | (_RANDOM if random else 0))
          for sampled in (False, True) for random in (False, True)}
_UNSET = Status(StatusCode.UNSET)


def _cleaned(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """``attributes`` as a plain dict; values of other types cleaned as the SDK cleans them."""
    if not attributes:
        return {}
    out = dict(attributes)
    for key, value in out.items():
        kind = type(value)
        if kind in _PLAIN and type(key) is str and key:
            continue
        if (kind is list or kind is tuple) and type(key) is str and key and _plain(value):
            out[key] = tuple(value)  # as the SDK stores a sequence (no key is added here)
            continue
        return dict(BoundedAttributes(None, attributes, immutable=False))
    return out


def _plain(values: Any) -> bool:
    """A sequence of one plain type (one that every supported SDK keeps as it is)."""
    if not values:
        return True
    first = type(values[0])
    return first in _PLAIN and all(type(v) is first for v in values)


class OwnTracerProvider(SdkTracerProvider):
    """The SDK provider this package builds; it knows whether lean spans may be used."""

    def __init__(self, *, span_limits: SpanLimits, **kwargs: Any) -> None:
        super().__init__(span_limits=span_limits, **kwargs)
        self.limits = span_limits
        self.lean_processors: tuple[Any, ...] = ()
        self.only_queue_processors = True

    def add_span_processor(self, span_processor: Any) -> None:
        from .export import SpanQueueProcessor

        super().add_span_processor(span_processor)
        if isinstance(span_processor, SpanQueueProcessor) and self.only_queue_processors:
            self.lean_processors = (*self.lean_processors, span_processor)
        else:  # someone else's processor may expect the SDK's spans: hand it those
            self.only_queue_processors = False


class LeanSpan(trace_api.Span, ReadableSpan):
    """A recording span of :class:`LeanTracer` (see the module docstring)."""

    def __init__(
        self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
        attributes: dict[str, Any], links: tuple[Link, ...], start_time: int, tracer: LeanTracer,
        record_exception: bool, set_status_on_exception: bool,
    ) -> None:
        # The provider's resource, read per span: the SDK replaces it in a forked child.
        ReadableSpan.__init__(
            self, name=name, context=context, parent=parent, resource=tracer.provider.resource,
            attributes=attributes, events=[], links=links, kind=kind, status=_UNSET,
            start_time=start_time, instrumentation_scope=tracer.scope,
        )
        self._tracer = tracer
        self._lock = threading.Lock()
        self._dropped_attributes = 0
        self._dropped_events = 0
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception

    # --- ReadableSpan ------------------------------------------------------------------------

    @property
    def dropped_attributes(self) -> int:
        return self._dropped_attributes

    @property
    def dropped_events(self) -> int:
        return self._dropped_events

    @property
    def dropped_links(self) -> int:
        return 0

    # --- Span --------------------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # always set for a LeanSpan

    def is_recording(self) -> bool:
        return self._end_time is None

    def _ended(self, what: str) -> bool:
        if self._end_time is not None:
            logger.warning("%s on ended span.", what)
            return True
        return False

    def _put(self, key: str, value: Any) -> None:
        attrs: dict[str, Any] = self._attributes  # type: ignore[assignment]  # ours: a dict
        if key in attrs:
            del attrs[key]  # as in the SDK, a set key moves to the end
        elif len(attrs) >= self._tracer.max_attributes:
            del attrs[next(iter(attrs))]  # the SDK drops the oldest
            self._dropped_attributes += 1
        attrs[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        with self._lock:
            if self._ended("Setting attribute"):
                return
            for key, value in _cleaned(attributes).items():
                self._put(key, value)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        self.set_attributes({key: value})

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        event = Event(name, _cleaned(attributes), timestamp)
        with self._lock:
            if self._ended("Adding event"):
                return
            events: list[Event] = self._events  # type: ignore[assignment]  # ours: a list
            if len(events) >= self._tracer.max_events:
                del events[0]  # BoundedList drops the oldest too
                self._dropped_events += 1
            events.append(event)

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if not (context.is_valid or attributes):
            return
        link = Link(context, _cleaned(attributes))
        with self._lock:
            if not self._ended("Adding link"):
                self._links = (*self._links, link)

    def update_name(self, name: str) -> None:
        with self._lock:
            if not self._ended("Updating name"):
                self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        with self._lock:
            if self._ended("Setting status"):
                return
            # The SDK's rules: OK is final, UNSET is never set.
            if self._status.status_code is StatusCode.OK:
                return
            if isinstance(status, Status):
                if status.status_code is StatusCode.UNSET:
                    return
                if description is not None:
                    logger.warning("Description %s ignored. Use either `Status` or "
                                   "`(StatusCode, Description)`", description)
                self._status = status
            elif status is not StatusCode.UNSET:
                self._status = Status(status, description)

    def record_exception(
        self, exception: BaseException, attributes: types.Attributes = None,
        timestamp: int | None = None, escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        attrs: dict[str, Any] = {
            "exception.type": (f"{module}.{qualname}" if module and module != "builtins"
                               else qualname),
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(
                type(exception), exception, exception.__traceback__)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            attrs.update(attributes)
        self.add_event("exception", attrs, timestamp)

    def end(self, end_time: int | None = None) -> None:
        with self._lock:
            if self._ended("Calling end()"):
                return
            self._end_time = end_time if end_time is not None else time_ns()
        for processor in self._tracer.provider.lean_processors:
            processor.on_end(self)  # the span no longer changes: it is its own snapshot

    def __exit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():
            if self._record_exception:
                self.record_exception(exc_val, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'


class LeanTracer(trace_api.Tracer):
    """Starts :class:`LeanSpan` s while the provider allows it, SDK spans otherwise."""

    def __init__(self, provider: OwnTracerProvider, sdk_tracer: Any) -> None:
        limits = provider.limits
        self.provider = provider
        self.sdk_tracer = sdk_tracer
        self.scope = getattr(sdk_tracer, "instrumentation_scope", None) or getattr(
            sdk_tracer, "_instrumentation_scope", None)
        self.max_attributes = _limit(limits.max_span_attributes)
        self.max_events = _limit(limits.max_events)
        # A length limit truncates strings: only the SDK's cleaning does that.
        self._limits_allow = (limits.max_span_attribute_length is None
                              and limits.max_attribute_length is None)
        self._follows_parent = _is_default_sampler(provider.sampler)

    @property
    def lean(self) -> bool:
        """Whether new spans are lean (see the module docstring)."""
        return self._limits_allow and self.provider.only_queue_processors

    def start_span(
        self, name: str, context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL, attributes: types.Attributes = None,
        links: Sequence[Link] | None = (), start_time: int | None = None,
        record_exception: bool = True, set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        if not self.lean:
            return self.sdk_tracer.start_span(  # type: ignore[no-any-return]
                name, context, kind, attributes, links, start_time, record_exception,
                set_status_on_exception)
        current = trace_api.get_current_span(context).get_span_context()
        provider = self.provider
        ids = provider.id_generator
        parent: SpanContext | None = None
        if current.is_valid:
            parent = current
            trace_id = current.trace_id
            random = bool(_RANDOM and current.trace_flags & _RANDOM)
        else:
            trace_id = ids.generate_trace_id()
            random = bool(_RANDOM and getattr(ids, "is_trace_id_random", bool)())
        links = tuple(link for link in links or () if link and link.context.is_valid)
        if self._follows_parent:
            # The default sampler's decision, without building its result: a root span and
            # a sampled parent's child record and sample, others do neither; the parent's
            # trace state and the given attributes pass through.
            sampled = parent is None or current.trace_flags.sampled
            recording = sampled
            trace_state = current.trace_state if parent is not None else None
            sampler_attributes = attributes
        else:
            result = provider.sampler.should_sample(context, trace_id, name, kind, attributes,
                                                    links)
            decision = result.decision
            sampled = decision.is_sampled()  # type: ignore[no-untyped-call]
            recording = decision.is_recording()  # type: ignore[no-untyped-call]
            trace_state = result.trace_state
            sampler_attributes = result.attributes
        span_context = SpanContext(
            trace_id, ids.generate_span_id(), is_remote=False,
            trace_flags=_FLAGS[sampled, random], trace_state=trace_state,
        )
        if not recording:
            return trace_api.NonRecordingSpan(span_context)
        # The sampler's attributes are the span's (the SDK's ParentBased samplers pass the
        # given ones through).
        attrs = _cleaned(sampler_attributes)
        dropped = len(attrs) - self.max_attributes
        if dropped > 0:  # the SDK keeps the newest
            attrs = dict(list(attrs.items())[dropped:])
        span = LeanSpan(name, span_context, parent, kind, attrs, links,
                        start_time if start_time is not None else time_ns(), self,
                        record_exception, set_status_on_exception)
        if dropped > 0:
            span._dropped_attributes = dropped
        return span

    @contextmanager
    def start_as_current_span(  # type: ignore[override]
        self, name: str, context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL, attributes: types.Attributes = None,
        links: Sequence[Link] | None = (), start_time: int | None = None,
        record_exception: bool = True, set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace_api.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time,
                               record_exception, set_status_on_exception)
        with trace_api.use_span(span, end_on_exit=end_on_exit,
                                record_exception=record_exception,
                                set_status_on_exception=set_status_on_exception) as current:
            yield current


def _is_default_sampler(sampler: Any) -> bool:
    """Whether ``sampler`` is the SDK's default, ``parentbased_always_on``: the root always
    on, every delegate for a parent the SDK's own (a sampled parent's child sampled, an
    unsampled parent's dropped). Read from the SDK's fields; anything else is asked."""
    from opentelemetry.sdk.trace import sampling

    if type(sampler) is not sampling.ParentBased:
        return False
    on, off = sampling.ALWAYS_ON, sampling.ALWAYS_OFF
    expected = {"_root": on, "_remote_parent_sampled": on, "_remote_parent_not_sampled": off,
                "_local_parent_sampled": on, "_local_parent_not_sampled": off}
    return all(getattr(sampler, name, None) is value for name, value in expected.items())


def _limit(value: int | None) -> int:
    return value if value is not None else 1 << 62
