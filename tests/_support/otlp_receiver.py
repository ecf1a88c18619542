"""The OTLP/HTTP receiver of the package's toolkit (:mod:`llm_otel_callbacks.demo.otlp_receiver`),
under the name the tests import."""

from llm_otel_callbacks.demo.otlp_receiver import (
    OtlpHttpReceiver,
    ReceivedMetric,
    ReceivedRequest,
    ReceivedSpan,
    any_value,
    attrs,
)

__all__ = [
    "OtlpHttpReceiver",
    "ReceivedMetric",
    "ReceivedRequest",
    "ReceivedSpan",
    "any_value",
    "attrs",
]
