"""Single-node hand-over: the agent's batches go straight to the ingester's loader.

The encoded bytes still go through decode and the same columnar insert as in fleet
mode; only Kafka is left out.
"""

from __future__ import annotations

import asyncio
import logging

from fleetscope.config import Kubernetes, Spans, Tracing
from fleetscope.otel import NO_TRACE, PipelineTracer
from fleetscope.store import connect, migrate
from ingester.enrich import Enricher
from ingester.load import BatchLoader
from ingester.stats import IngestStats
from ingester.traces import SpanWriter, span_writer
from node_agent.batcher import Batch
from node_agent.shipper import LocalSink

log = logging.getLogger(__name__)


class LocalIngest:
    """Owns the embedded store's client for `fleetscope run`."""

    def __init__(self, loader: BatchLoader, stats_interval: float, enricher: Enricher | None = None,
                 spans: SpanWriter | None = None, tracer: PipelineTracer | None = None) -> None:  # fmt: skip
        self.loader = loader
        self.stats = IngestStats(stats_interval)
        self.enricher = enricher
        self.spans = spans  # kernel-derived spans (None: spans off)
        self.tracer = tracer  # self-tracing of the ingester side (None: no OTLP)

    @classmethod
    async def open(cls, dsn: str, stats_interval: float, k8s: Kubernetes | None = None,
                   spans: Spans | None = None, tracing: Tracing | None = None) -> LocalIngest:  # fmt: skip
        """Open and migrate the store; with k8s settings (k8s_api not off), rows get pod identity;
        with spans settings (spans on), kernel events become spans; with tracing settings
        (otlp_protocol not off), spans go out over OTLP and the batches' trips are traced."""
        enricher = Enricher(k8s) if k8s is not None and k8s.k8s_api != "off" else None
        if enricher is not None:
            await enricher.start()
        client = await asyncio.to_thread(connect, dsn)
        await asyncio.to_thread(migrate, client)
        loader = BatchLoader(client)
        tracing = tracing or Tracing()
        writer = span_writer(loader, spans, tracing) if spans is not None and spans.spans else None
        tracer = PipelineTracer.from_settings("fleetscope-ingester", tracing.otlp_protocol, tracing.trace_sample_ratio)
        return cls(loader, stats_interval, enricher, writer, tracer)

    async def load(self, batch: Batch) -> None:
        trace = NO_TRACE
        if self.tracer is not None:
            attributes = {"fleetscope.batch_id": batch.batch_id, "fleetscope.rows": batch.rows}
            trace = self.tracer.batch(f"process {batch.stream}", batch.headers(), attributes)
        try:
            with trace.stage("decode"):
                decoded = self.loader.decode(batch.stream, batch.payload)
            node = decoded.header.node.host_name
            self.stats.add(node, batch.stream, "batches_decoded")
            if decoded.truncated:  # string values cut to codec.MAX_STRING_BYTES
                self.stats.add(node, batch.stream, "values_truncated", decoded.truncated)
            with trace.stage("enrich"):
                enrichment = await self.enricher.enrich(decoded) if self.enricher is not None else None
            if enrichment is not None and enrichment.unenriched:
                self.stats.add(node, batch.stream, "rows_unenriched", enrichment.unenriched)
            k8s_columns = enrichment.columns if enrichment is not None else None
            with trace.stage("insert", **{"db.system.name": "clickhouse", "db.collection.name": batch.stream}):
                # handed over once, in memory: no redelivery to look for
                loaded = await asyncio.to_thread(self.loader.insert, decoded, k8s_columns, False)
            if self.spans is not None and self.spans.covers(batch.stream):
                with trace.stage("spans", **{"db.system.name": "clickhouse", "db.collection.name": "otel_traces"}):
                    spans = await asyncio.to_thread(self.spans.write, decoded, k8s_columns)
                if spans is not None:
                    self.stats.add(node, batch.stream, "spans_written", len(spans))
                    await asyncio.to_thread(self.spans.export, spans)
        except BaseException as e:
            trace.end(f"{type(e).__name__}: {e}")
            raise
        trace.end()
        self.stats.add(node, batch.stream, "batches_inserted")
        self.stats.add(node, batch.stream, "rows_inserted", loaded.rows_written)
        self.stats.add(node, batch.stream, "batches_duplicate", int(loaded.duplicate))
        if self.stats.due():
            await asyncio.to_thread(self.stats.write, self.loader)

    def sink(self, tracer: PipelineTracer | None = None) -> LocalSink:
        """The agent's hand-over into this ingester; with a tracer, a span per batch whose
        context travels in the batch's headers, as through Kafka."""
        return LocalSink(self.load, tracer=tracer)

    async def stop(self) -> None:
        """Stop the Kubernetes watch (when there is one)."""
        if self.enricher is not None:
            await self.enricher.stop()

    def close(self) -> None:
        """Export the queued spans, write the last counters, then release the store."""
        for flush in (self.spans, self.tracer):  # bounded by the exporter's timeout
            if flush is not None:
                flush.shutdown()
        self.spans = self.tracer = None
        self.stats.write(self.loader)
        self.loader.close()
