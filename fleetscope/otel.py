"""OpenTelemetry SDK wiring shared by the agent and the ingester.

- ``span_exporter``: the SDK's OTLP span exporter for a protocol. The SDK itself reads the
  standard variables (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, _TIMEOUT,
  _COMPRESSION, _CERTIFICATE, ...; OTEL_BSP_* for its batch processor); fleetscope's config
  module reads only fleetscope's own settings.
- ``PipelineTracer``: the pipeline's own spans (self-tracing). A TracerProvider sampling
  ParentBased(TraceIdRatioBased(ratio)): the agent decides per batch, the ingester follows
  the decision the batch's W3C trace context carries.
- ``BatchTrace``: one batch's trip through the ingester (decode, enrich, insert, spans,
  commit), a no-op when the batch is not sampled.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fleetscope import __version__

log = logging.getLogger(__name__)

OTLP_PROTOCOLS = ("off", "http/protobuf", "grpc")
SCOPE = "fleetscope"
_PROPAGATOR = TraceContextTextMapPropagator()


def span_exporter(protocol: str) -> SpanExporter:
    """The SDK's OTLP span exporter for "http/protobuf" or "grpc", configured by the SDK from
    the OTEL_EXPORTER_OTLP_* variables (default endpoints localhost:4318 and localhost:4317)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"no OTLP exporter for protocol {protocol!r}")


def inject(span: trace_api.Span) -> list[tuple[str, bytes]]:
    """W3C trace context headers (traceparent, tracestate) naming span, as Kafka headers."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace_api.set_span_in_context(span))
    return [(k, v.encode()) for k, v in carrier.items()]


def extract(headers: Sequence[tuple[str, bytes]] | None) -> Context:
    """The trace context carried by Kafka headers (an empty context when there is none)."""
    carrier = {k: v.decode("latin-1") for k, v in headers or () if k in ("traceparent", "tracestate")}
    return _PROPAGATOR.extract(carrier)


class PipelineTracer:
    """The pipeline's own tracer: service `service`, spans sampled at `ratio` unless the
    parent decided, exported over OTLP by a batch processor (off the event loop)."""

    def __init__(self, service: str, ratio: float, exporter: SpanExporter) -> None:
        resource = Resource.create({"service.name": service, "service.version": __version__})
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer(SCOPE, __version__)

    @classmethod
    def from_settings(cls, service: str, protocol: str, ratio: float) -> PipelineTracer | None:
        """None when OTLP export is off: self-tracing has nowhere to go then."""
        return None if protocol == "off" else cls(service, ratio, span_exporter(protocol))

    @contextlib.contextmanager
    def publish(self, name: str, start_ns: int, attributes: Mapping[str, Any]) -> Iterator[list[tuple[str, bytes]]]:
        """A PRODUCER span from start_ns until the block ends; yields the headers carrying its
        context (with the sampled flag cleared when the batch is not sampled)."""
        span = self.tracer.start_span(name, kind=trace_api.SpanKind.PRODUCER, start_time=start_ns,
                                      attributes=attributes)  # fmt: skip
        try:
            yield inject(span)
        except BaseException as e:
            span.set_status(trace_api.Status(trace_api.StatusCode.ERROR, type(e).__name__))
            raise
        finally:
            span.end()

    def batch(
        self, name: str, headers: Sequence[tuple[str, bytes]] | None, attributes: Mapping[str, Any]
    ) -> BatchTrace:
        """The trace of one batch, continuing the context its headers carry."""
        return BatchTrace(self.tracer, name, extract(headers), attributes)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        self.provider.shutdown()


class BatchTrace:
    """A CONSUMER span for one batch in the ingester and child spans per stage."""

    def __init__(self, tracer: trace_api.Tracer | None, name: str, parent: Context,
                 attributes: Mapping[str, Any]) -> None:  # fmt: skip
        self._tracer = tracer
        self._root: trace_api.Span | None = None
        if tracer is not None:
            span = tracer.start_span(name, context=parent, kind=trace_api.SpanKind.CONSUMER, attributes=attributes)
            self._root = span if span.is_recording() else None

    @property
    def recording(self) -> bool:
        return self._root is not None

    @contextlib.contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[trace_api.Span | None]:
        """A child span around one stage; an exception marks it (and is re-raised)."""
        if self._root is None or self._tracer is None:
            yield None
            return
        ctx = trace_api.set_span_in_context(self._root)
        with self._tracer.start_as_current_span(name, context=ctx, attributes=attributes) as span:
            yield span

    def record(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A child span for a stage that ran already (e.g. one commit covering many batches)."""
        if self._root is None or self._tracer is None:
            return
        ctx = trace_api.set_span_in_context(self._root)
        span = self._tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attributes)
        span.end(end_time=end_ns)

    def set(self, key: str, value: Any) -> None:
        if self._root is not None:
            self._root.set_attribute(key, value)

    def end(self, error: str = "") -> None:
        if self._root is None:
            return
        if error:
            self._root.set_status(trace_api.Status(trace_api.StatusCode.ERROR, error))
        self._root.end()
        self._root = None


NO_TRACE = BatchTrace(None, "", Context(), {})


def now_ns() -> int:
    return time.time_ns()
