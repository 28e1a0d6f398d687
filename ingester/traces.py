"""Where kernel-derived spans go: fleet.otel_traces (columnar Native insert) and OTLP.

The OTLP path hands the spans to the SDK as ReadableSpan objects, the type every SDK span
exporter takes. The SDK's Tracer cannot make these spans: it picks its own ids and start
times, and one TracerProvider has one resource, while a kernel span has ids derived from
its batch row, times from the kernel and the resource of its pod. ReadableSpan's
constructor is public and carries all of that; the SDK's BatchSpanProcessor queues the
spans (bounded, OTEL_BSP_MAX_QUEUE_SIZE) and exports them from its own thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from fleetscope import __version__
from fleetscope.codec import DecodedBatch
from fleetscope.config import Spans, Tracing
from fleetscope.native import Values
from fleetscope.otel import SCOPE, span_exporter
from ingester.load import BatchLoader
from ingester.spans import BUILDERS, SpanOptions, SpanSet, build, otel_columns, take

log = logging.getLogger(__name__)

TABLE = "otel_traces"
_SCOPE = InstrumentationScope(SCOPE, __version__)
_KINDS = tuple(trace_api.SpanKind)
_SAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)


def _present(attrs: Sequence[Any], rows: np.ndarray | None) -> list[tuple[str, list[Any], list[bool]]]:
    out = []
    for a in attrs:
        values = a.python()
        mask = a.mask(len(values))
        if rows is not None:
            values, mask = [values[i] for i in rows], mask[rows]
        out.append((a.key, values, mask.tolist()))
    return out


def readable_spans(spans: SpanSet) -> list[ReadableSpan]:
    """The spans as SDK ReadableSpans (one Python object per span: the OTLP path's cost)."""
    n = len(spans)
    resources: dict[tuple[Any, ...], Resource] = {}
    res_cols = _present(spans.resource, None)
    attr_cols = _present(spans.attributes, None)
    # per span, its events of every kind in time order: (time, kind, name, attributes)
    events_of: dict[int, list[tuple[int, int, str, dict[str, Any]]]] = {}
    for k, ev in enumerate(spans.events):
        rows = np.nonzero(ev.present)[0]
        cols = _present(ev.attributes, rows)
        ev_names = take(ev.name, rows).decoded().tolist()
        for j, (i, t) in enumerate(zip(rows.tolist(), ev.time_ns[rows].tolist(), strict=True)):
            events_of.setdefault(i, []).append((t, k, ev_names[j], {key: v[j] for key, v, m in cols if m[j]}))
    trace_hi = spans.trace_id[:, :8].copy().view(">u8").ravel().tolist()
    trace_lo = spans.trace_id[:, 8:].copy().view(">u8").ravel().tolist()
    span_id = spans.span_id.copy().view(">u8").ravel().tolist()
    names = spans.name.decoded().tolist()
    messages = spans.status_message.decoded().tolist()
    kinds, status = spans.kind.tolist(), spans.status.tolist()
    start, end = spans.start_ns.tolist(), spans.end_ns.tolist()
    out = []
    for i in range(n):
        key = tuple(v[i] if m[i] else None for _, v, m in res_cols)
        res = resources.get(key)
        if res is None:
            res = resources[key] = Resource({k: v[i] for k, v, m in res_cols if m[i]})
        events = tuple(Event(name, attrs, t) for t, _, name, attrs in sorted(events_of.get(i, ()), key=lambda e: e[:2]))
        code = trace_api.StatusCode(status[i])
        context = trace_api.SpanContext((trace_hi[i] << 64) | trace_lo[i], span_id[i], False, _SAMPLED)
        out.append(ReadableSpan(
            names[i], context=context, resource=res, kind=_KINDS[kinds[i]], events=events,
            attributes={k: v[i] for k, v, m in attr_cols if m[i]},
            status=trace_api.Status(code, messages[i] if code == trace_api.StatusCode.ERROR else None),
            start_time=start[i], end_time=end[i], instrumentation_scope=_SCOPE,
        ))  # fmt: skip
    return out


class SpanWriter:
    """Builds the spans of each batch and writes them to fleet.otel_traces; with an exporter,
    also queues them for OTLP once ClickHouse has them."""

    def __init__(self, loader: BatchLoader, options: SpanOptions, exporter: SpanExporter | None = None) -> None:
        self._loader = loader
        self.options = options
        self._processor = BatchSpanProcessor(exporter) if exporter is not None else None
        self.written = 0
        self.exported = 0

    def covers(self, stream: str) -> bool:
        """Whether batches of this stream make spans."""
        return stream in BUILDERS

    def write(self, batch: DecodedBatch, extra: Mapping[str, Values] | None = None) -> SpanSet | None:
        """Insert the batch's spans (deduplicated by "<batch id>:spans"); blocking. `extra`:
        the enrichment's columns for the batch, as BatchLoader.insert takes them."""
        spans = build(batch, self.options, extra)
        if spans is None or not len(spans):
            return None
        columns = otel_columns(spans, (SCOPE, __version__))
        self._loader.insert_columns(TABLE, columns, rows=len(spans), dedup_token=f"{batch.header.batch_id}:spans")
        self.written += len(spans)
        return spans

    def export(self, spans: SpanSet | None) -> None:
        """Queue the spans for OTLP export (the SDK drops, and logs, when its queue is full)."""
        if self._processor is None or spans is None:
            return
        for span in readable_spans(spans):
            self._processor.on_end(span)
        self.exported += len(spans)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout)."""
        if self._processor is not None:
            self._processor.shutdown()


def span_writer(loader: BatchLoader, spans: Spans, tracing: Tracing) -> SpanWriter:
    """The kernel-derived spans' writer for `ingest` and `run` settings."""
    exporter = span_exporter(tracing.otlp_protocol) if tracing.otlp_protocol != "off" else None
    return SpanWriter(loader, SpanOptions(int(spans.span_process_min_duration * 1e9)), exporter)
