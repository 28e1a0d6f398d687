"""`fleetscope ingest`: a Kafka consumer-group member that loads batches into ClickHouse.

At-least-once consumption plus insert deduplication on the batch id: offsets are
committed only after ClickHouse acknowledged every batch up to them, so a crash or a
rebalance redelivers, and the redelivered batch is deduplicated by ClickHouse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from fleetscope.codec import SCHEMA_MAJOR, SCHEMAS, BatchDecodeError
from fleetscope.config import IngestSettings
from fleetscope.otel import NO_TRACE, BatchTrace, PipelineTracer
from fleetscope.retry import Backoff, first_line
from fleetscope.store import connect, mask_dsn, migrate
from ingester.enrich import Enricher
from ingester.load import BatchLoader, Loaded
from ingester.stats import IngestStats
from ingester.traces import SpanWriter, span_writer

log = logging.getLogger(__name__)


def topic_for(prefix: str, stream: str) -> str:
    return f"{prefix}.{stream}.v{SCHEMA_MAJOR}"


class Ingester:
    """Owns the consumer, the DLQ producer and the ClickHouse loader."""

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.counters: Counter[str] = Counter()
        self.stats = IngestStats(settings.stats_interval)
        self.healthy = False
        self._stop = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._loader: BatchLoader | None = None
        self._topics = {topic_for(settings.topic_prefix, s): s for s in SCHEMAS}
        self.enricher = Enricher(settings)  # Kubernetes identity of the rows (k8s_api)
        # self-tracing (None without OTLP) and the kernel-derived spans (None with spans off)
        self.tracer = PipelineTracer.from_settings("fleetscope-ingester", settings.otlp_protocol,
                                                   settings.trace_sample_ratio)  # fmt: skip
        self.spans: SpanWriter | None = None
        self._traces: list[BatchTrace] = []  # sampled batches loaded but not yet committed

    async def __aenter__(self) -> Ingester:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _sleep_unless_stopped(self, delay: float) -> bool:
        """Wait delay seconds; True if a stop was requested meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), delay)
            return True
        except TimeoutError:
            return False

    async def _retry(self, what: str, fn: Callable[[], Awaitable[None]]) -> bool:
        """Run fn until it succeeds (True) or a stop is requested (False), with backoff."""
        backoff = Backoff(self.settings.retry_backoff_max)
        while True:
            try:
                await fn()
                return True
            except Exception as e:
                delay = backoff.next()
                log.warning("%s failed: %s; retrying in %.1fs", what, first_line(e), delay)
                self.counters[f"{what}_retries"] += 1
                if await self._sleep_unless_stopped(delay):
                    return False

    async def start(self) -> None:
        s = self.settings
        await self.enricher.start()  # a bad kubeconfig is a ConfigError; an unreachable API is retried

        async def open_store() -> None:
            client = await asyncio.to_thread(connect, s.clickhouse)
            await asyncio.to_thread(migrate, client)
            self._loader = BatchLoader(client)
            if s.spans and self.spans is None:
                self.spans = span_writer(self._loader, s, s)

        if not await self._retry("clickhouse", open_store):
            return
        log.info("clickhouse ready at %s", mask_dsn(s.clickhouse))

        async def open_kafka() -> None:
            consumer = AIOKafkaConsumer(
                *self._topics,
                bootstrap_servers=list(s.brokers),
                group_id=s.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=16 << 20,
                fetch_max_bytes=64 << 20,
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=list(s.brokers), acks="all", enable_idempotence=True
            )
            try:
                await consumer.start()
                await producer.start()
            except BaseException:
                await consumer.stop()
                await producer.stop()
                raise
            self._consumer, self._producer = consumer, producer

        if not await self._retry("kafka", open_kafka):
            return
        log.info("consuming %s as group %s from %s", ", ".join(self._topics), s.group_id, ",".join(s.brokers))
        self.healthy = True

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Poll, load, commit; until request_stop()."""
        if self._consumer is None:
            return  # stopped before start completed
        while not self._stop.is_set():
            polled = await self._consumer.getmany(timeout_ms=200, max_records=self.settings.max_poll_records)
            for tp, records in polled.items():
                if not await self._load_partition(tp, records):
                    return  # stopped in the middle of retrying: nothing more is committed
            if self.stats.due():
                await self._write_stats()

    async def _write_stats(self) -> None:
        """Counters to fleet.pipeline_stats; a failure is logged and retried next interval."""
        assert self._loader is not None
        try:
            await asyncio.to_thread(self.stats.write, self._loader)
        except Exception as e:
            log.warning("writing pipeline_stats failed: %s", first_line(e))

    async def _load_partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> bool:
        assert self._consumer is not None
        for rec in records:
            if not await self._load_record(rec):
                self._end_traces("stopped before the commit")
                return False
        started, error = time.time_ns(), ""
        try:
            await self._consumer.commit({tp: records[-1].offset + 1})
            self.counters["commits"] += 1
        except (CommitFailedError, KafkaError) as e:
            # A rebalance took the partition; its new owner gets the batches again and
            # ClickHouse deduplicates them on the batch id.
            log.warning("commit of %s failed (%s); the batches will be redelivered", tp, first_line(e))
            error = f"commit failed: {first_line(e)}"
        for trace in self._traces:  # one commit covers every batch of the partition's poll
            trace.record("commit", started, time.time_ns(), **{"messaging.kafka.offset": records[-1].offset})
        self._end_traces(error)
        return True

    def _end_traces(self, error: str = "") -> None:
        for trace in self._traces:
            trace.end(error)
        self._traces.clear()

    async def _load_record(self, rec: ConsumerRecord) -> bool:
        """Load one batch, retrying ClickHouse until it acknowledges; False if stopped."""
        assert self._loader is not None
        stream = self._topics.get(rec.topic, "")
        trace = NO_TRACE
        if self.tracer is not None:
            trace = self.tracer.batch(f"process {rec.topic}", rec.headers, {
                "messaging.system": "kafka", "messaging.operation.type": "process",
                "messaging.destination.name": rec.topic, "messaging.destination.partition.id": str(rec.partition),
                "messaging.kafka.offset": rec.offset,
            })  # fmt: skip
        try:
            with trace.stage("decode", **{"messaging.message.body.size": len(rec.value or b"")}):
                batch = self._loader.decode(stream, rec.value or b"")
        except BatchDecodeError as e:
            await self._dead_letter(rec, str(e))
            trace.end(f"dead-lettered: {e}")
            return True
        node = batch.header.node.host_name
        trace.set("fleetscope.batch_id", batch.header.batch_id)
        trace.set("fleetscope.rows", batch.rows)
        self.stats.add(node, stream, "batches_decoded")
        with trace.stage("enrich"):
            enrichment = await self.enricher.enrich(batch)
        if enrichment is not None and enrichment.unenriched:
            self.stats.add(node, stream, "rows_unenriched", enrichment.unenriched)
        k8s_columns = enrichment.columns if enrichment is not None else None
        backoff = Backoff(self.settings.retry_backoff_max)
        spans = None
        while True:
            started = time.monotonic()
            try:
                with trace.stage("insert", **{"db.system.name": "clickhouse", "db.collection.name": stream}):
                    loaded: Loaded = await asyncio.to_thread(self._loader.insert, batch, k8s_columns)
                if self.spans is not None and self.spans.covers(stream):
                    with trace.stage("spans", **{"db.system.name": "clickhouse", "db.collection.name": "otel_traces"}):
                        spans = await asyncio.to_thread(self.spans.write, batch, k8s_columns)
                break
            except Exception as e:
                self.healthy = False
                self.counters["insert_retries"] += 1
                delay = backoff.next()
                log.warning("insert of %s failed: %s; retrying in %.1fs (offsets not committed)",
                            batch.header.batch_id, first_line(e), delay)  # fmt: skip
                if await self._sleep_unless_stopped(delay):
                    return False
        if not self.healthy:
            log.info("clickhouse inserts succeed again")
        self.healthy = True
        self.stats.add(node, stream, "batches_inserted")
        self.stats.add(node, stream, "rows_inserted", loaded.rows_written)
        self.stats.add(node, stream, "batches_duplicate", int(loaded.duplicate))
        self.counters["insert_ms_total"] += int((time.monotonic() - started) * 1000)
        if self.spans is not None and spans is not None:
            self.stats.add(node, stream, "spans_written", len(spans))
            await asyncio.to_thread(self.spans.export, spans)  # OTLP, once ClickHouse has them
        if trace.recording:
            self._traces.append(trace)  # ended after the commit
        return True

    async def _dead_letter(self, rec: ConsumerRecord, reason: str) -> None:
        assert self._producer is not None
        headers = [
            ("fs-dlq-reason", reason.encode()[:1024]),
            ("fs-source", f"{rec.topic}/{rec.partition}@{rec.offset}".encode()),
            *[(k, v) for k, v in (rec.headers or ())],
        ]
        await self._producer.send_and_wait(self.settings.dlq_topic, rec.value, key=rec.key, headers=headers)
        node = (rec.key or b"").decode("utf-8", "replace")  # agents key messages by node
        self.stats.add(node, self._topics.get(rec.topic, rec.topic), "batches_dead_lettered")
        log.warning("batch at %s/%d@%d dead-lettered: %s", rec.topic, rec.partition, rec.offset, reason)

    async def stop(self) -> None:
        self._stop.set()
        await self.enricher.stop()
        if self._loader is not None:
            await self._write_stats()
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()
        self._end_traces("stopped before the commit")
        for flush in (self.spans, self.tracer):  # export what is queued, bounded by the exporter's timeout
            if flush is not None:
                await asyncio.to_thread(flush.shutdown)
        self.spans = self.tracer = None
