"""`fleetscope ingest`: a Kafka consumer-group member that loads batches into ClickHouse.

At-least-once consumption plus exactly-once storage: offsets are committed only after
ClickHouse acknowledged every batch up to them, so a crash or a rebalance redelivers, and
a redelivered batch is found in its table by its identity and left out (ingester/load.py).
The worker stores what has been fetched together, one insert per stream.

Two tasks: the poll loop fetches into a bounded in-flight queue (ingester/inflight.py) and
pauses the partitions when it is full, so it keeps polling (the group's liveness check,
max_poll_interval) however long ClickHouse fails; the worker decodes, inserts with retries
and commits. Bad input goes to the dead-letter topic (ingester/dlq.py) and the partition
moves on. Inserts failing for longer than max_poll_interval make the ingester give up its
partitions to the other members; it rejoins once ClickHouse answers. See
docs/failure-modes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from fleetscope import native, payload
from fleetscope.codec import SCHEMA_MAJOR, SCHEMAS, BatchDecodeError, DecodedBatch
from fleetscope.config import IngestSettings
from fleetscope.kafka_security import KafkaAuth
from fleetscope.metrics import LATENCY_BUCKETS, Histogram
from fleetscope.otel import NO_TRACE, BatchTrace, PipelineTracer
from fleetscope.retry import Backoff, first_line
from fleetscope.store import connect, mask_dsn, migrate
from ingester import dlq
from ingester.dlq import DeadLetters, RateLimitedLog
from ingester.enrich import Enricher
from ingester.health import Health, HealthServer
from ingester.inflight import InFlight
from ingester.load import BatchLoader, Loaded
from ingester.stats import IngestStats
from ingester.traces import SpanWriter, span_writer

log = logging.getLogger(__name__)


class KafkaUnavailable(RuntimeError):
    """The Kafka clients could not start; the message says why (fleetscope.kafka_security)."""

    retriable: ClassVar[bool] = True


def topic_for(prefix: str, stream: str) -> str:
    return f"{prefix}.{stream}.v{SCHEMA_MAJOR}"


# The agent's fs-schema header: "fleetscope.v<major>.<stream>;minor=<minor>" (node_agent/batcher.py).
_FS_SCHEMA = re.compile(r"fleetscope\.v(\d+)\.([a-z0-9_]+)(?:;minor=\d+)?")
COMMIT_INTERVAL = 0.5  # seconds between commits (the first after a quiet spell goes at once)
REVOKE_WAIT = 5.0  # how long a rebalance waits for the batch being inserted (the group waits for us)
# Errors of building a batch's insert from its columns (the driver's own errors are not among
# them): a batch that decoded but cannot be written goes to the dead-letter topic instead of
# being retried forever. Server-side errors are retried: they may be an outage or a missing
# migration an operator fixes.
UNSTORABLE = (ValueError, TypeError, OverflowError, IndexError, KeyError)
DLQ_NODES_MAX = 1024  # distinct message keys counted by name in dead-letter stats; more count as "(other)"


def screen(rec: ConsumerRecord, stream: str | None, max_bytes: int) -> tuple[str, str] | None:
    """Why a message cannot be a batch before decoding it: (dlq kind, reason), or None.

    The topic must be a v<SCHEMA_MAJOR> stream topic; an fs-schema header, when present,
    must name this major version and the topic's stream (a message without one is taken as
    the topic says: producers other than the agent may leave it out)."""
    if stream is None:
        return dlq.UNKNOWN_TOPIC, f"topic {rec.topic!r} is not a v{SCHEMA_MAJOR} stream topic"
    size = len(rec.value or b"")
    if size > max_bytes:
        return dlq.OVERSIZED, f"batch of {size} bytes exceeds max_batch_bytes {max_bytes}"
    for key, value in rec.headers or ():
        if key != "fs-schema":
            continue
        text = value.decode("utf-8", "replace")[:200]
        m = _FS_SCHEMA.fullmatch(text)
        if m is None:
            return dlq.MALFORMED, f"fs-schema header {text!r} is not fleetscope.v<major>.<stream>;minor=<n>"
        if int(m[1]) != SCHEMA_MAJOR:
            return dlq.UNKNOWN_VERSION, f"fs-schema {text!r}: major version {m[1]}, this ingester reads v{SCHEMA_MAJOR}"
        if m[2] != stream:
            return dlq.MALFORMED, f"fs-schema {text!r} names stream {m[2]!r}, the topic carries {stream!r}"
    return None


@dataclass
class _Fetched:
    """A decoded message waiting for its stream's insert."""

    rec: ConsumerRecord
    stream: str
    batch: DecodedBatch
    k8s: Mapping[str, native.Values] | None  # Kubernetes identity columns (ingester/enrich)
    trace: BatchTrace
    size: int  # bytes of the encoded batch (decompressed: up to max_batch_bytes from a small message)


class Ingester:
    """Owns the consumer, the DLQ producer and the ClickHouse loader."""

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.counters: Counter[str] = Counter()
        self.stats = IngestStats(settings.stats_interval)
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
        # delivery under faults: health, in-flight bound, offsets, dead letters
        self.health = Health()
        self.health.fail("start", "starting")
        self._http = HealthServer(self, settings.health_listen) if settings.health_listen != "off" else None
        self.in_flight = InFlight()
        self.assigned: set[TopicPartition] = set()
        self.paused: set[TopicPartition] = set()
        self._loaded: dict[TopicPartition, int] = {}  # next offset to commit: stored or dead-lettered below it
        self._committed: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()
        self._commit_lock = asyncio.Lock()
        self._work_ready = asyncio.Event()
        self._released = False  # partitions given up while ClickHouse fails (see _release)
        self._worker: asyncio.Task[None] | None = None
        self._generation = 0  # +1 at every revocation: work begun before it is not committed
        self._record_done = asyncio.Event()
        self.insert_latency = Histogram(LATENCY_BUCKETS)
        self.stream_names = sorted(SCHEMAS)
        self._dlq_nodes: set[str] = set()
        self._flow_log = RateLimitedLog(log, burst=2, interval=10.0, level=logging.INFO)  # pause, resume
        self.dead_letters = DeadLetters(settings.dlq_topic, self.stats.component, self._dead_lettered, self.health)

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
                self.health.fail("start", f"starting: {what} unreachable: {first_line(e)}")
                if await self._sleep_unless_stopped(delay):
                    return False

    async def start(self) -> None:
        s = self.settings
        if self._http is not None:
            await self._http.start()  # first, so a store or broker that is away shows as degraded
        await self.enricher.start()  # a bad kubeconfig is a ConfigError; an unreachable API is retried

        async def open_store() -> None:
            client = await asyncio.to_thread(connect, s.clickhouse, s.clickhouse_secret())
            await asyncio.to_thread(migrate, client)
            self._loader = BatchLoader(client)
            if s.spans and self.spans is None:
                self.spans = span_writer(self._loader, s, s)

        if not await self._retry("clickhouse", open_store):
            return
        log.info("clickhouse ready at %s", mask_dsn(s.clickhouse))

        auth = KafkaAuth(s)  # TLS and SASL of both clients

        async def open_kafka() -> None:
            # what the fetcher buffers besides the in-flight queue: at most one fetch response
            fetch_bytes = max(1 << 20, min(64 << 20, s.max_in_flight_bytes // 2))
            consumer = AIOKafkaConsumer(
                bootstrap_servers=list(s.brokers),
                group_id=s.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=min(16 << 20, fetch_bytes),
                fetch_max_bytes=fetch_bytes,
                max_poll_interval_ms=int(s.max_poll_interval * 1000),
                # a topic an agent creates after we subscribed is seen at the next metadata
                # refresh (default 5 min): refresh often so new streams are consumed at once
                metadata_max_age_ms=3000,
                **auth.options(),
            )
            # The dead-letter producer takes any message the broker gave us (cut if its topic refuses
            # it). Not idempotent: a refused message would leave an idempotent producer's sequence
            # numbers broken (OutOfOrderSequenceNumber on every later send); a dead letter sent
            # twice after a retry is harmless (fs-source tells them apart).
            producer = AIOKafkaProducer(
                bootstrap_servers=list(s.brokers), acks="all", enable_idempotence=False, linger_ms=5,
                max_request_size=max(16 << 20, s.max_batch_bytes + (1 << 20)), **auth.options(),
            )  # fmt: skip
            try:
                await consumer.start()
                await producer.start()
            except Exception as e:
                await consumer.stop()
                await producer.stop()
                raise KafkaUnavailable(await auth.explain(e)) from e
            except BaseException:
                await consumer.stop()
                await producer.stop()
                raise
            consumer.subscribe(list(self._topics), listener=_Rebalance(self))
            self._consumer, self._producer = consumer, producer
            self.dead_letters.producer = producer

        if not await self._retry("kafka", open_kafka):
            return
        log.info("consuming %s as group %s from %s (%s)", ", ".join(self._topics), s.group_id, ",".join(s.brokers),
                 auth.describe())  # fmt: skip
        self.health.ok("start")

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Poll into the in-flight queue while the worker stores and commits; until
        request_stop(). A worker that dies ends the run with its exception."""
        if self._consumer is None:
            return  # stopped before start completed
        worker = self._worker = asyncio.create_task(self._work(), name="ingest-worker")
        worker.add_done_callback(lambda _: self._stop.set())
        stats = asyncio.create_task(self._stats_loop(), name="ingest-stats")
        backoff = Backoff(self.settings.retry_backoff_max)
        try:
            while not self._stop.is_set():
                if self._released:
                    await self._rejoin_when_store_answers()
                    continue
                self._flow_control()
                try:
                    polled = await self._consumer.getmany(timeout_ms=200, max_records=self.settings.max_poll_records)
                except KafkaError as e:  # a fetch error (the consumer reconnects by itself)
                    self.counters["poll_errors"] += 1
                    delay = backoff.next()
                    log.warning("fetching from Kafka failed: %s; retrying in %.1fs", first_line(e), delay)
                    await self._sleep_unless_stopped(delay)
                    continue
                backoff = Backoff(self.settings.retry_backoff_max)
                for tp, records in polled.items():  # no await since getmany: still this member's partitions
                    self.in_flight.add(tp, records)
                if polled:
                    self._work_ready.set()
                failing = self.health.since("insert")
                if failing is not None and failing >= self.settings.max_poll_interval and self.assigned:
                    await self._release()
        finally:
            stats.cancel()
            await asyncio.gather(stats, return_exceptions=True)
        if worker.done() and not worker.cancelled() and worker.exception() is not None:
            raise worker.exception()  # type: ignore[misc]

    def _flow_control(self) -> None:
        """Pause fetching at max_in_flight_bytes, resume below half of it."""
        assert self._consumer is not None
        limit = self.settings.max_in_flight_bytes
        if self.in_flight.bytes >= limit:
            todo = self.assigned - self.paused
            if todo:
                if not self.paused:
                    self.counters["pauses"] += 1
                    self._flow_log.warning("in-flight bound reached (%d bytes in %d messages): fetching paused",
                                           self.in_flight.bytes, len(self.in_flight))  # fmt: skip
                self._consumer.pause(*todo)
                self.paused |= todo
        elif self.paused and self.in_flight.bytes <= limit // 2:
            self._consumer.resume(*(self.paused & self.assigned))
            self.paused.clear()
            self._flow_log.warning("in-flight messages below half the bound: fetching resumed")

    async def _release(self) -> None:
        """Give this member's partitions to the others: inserts have failed for longer than
        max_poll_interval, and a member that cannot store should not hold partitions."""
        assert self._consumer is not None
        self.counters["releases"] += 1
        owned, failing = sorted(f"{tp.topic}/{tp.partition}" for tp in self.assigned), self.health.since("insert")
        log.warning("inserts have failed for %.0fs (max_poll_interval): leaving the group so other members take "
                    "partitions %s; rejoining when ClickHouse answers", failing or 0, owned)  # fmt: skip
        await self._revoke(set(self.assigned))
        self._consumer.unsubscribe()
        self._released = True
        self.health.fail("released", "partitions given to other members: ClickHouse inserts failed for "
                         "max_poll_interval; rejoining when it answers")  # fmt: skip

    async def _rejoin_when_store_answers(self) -> None:
        assert self._consumer is not None and self._loader is not None
        backoff = Backoff(self.settings.retry_backoff_max)
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self._loader.ping)
                break
            except Exception as e:
                self.health.fail("insert", f"clickhouse inserts failing: {first_line(e)}")
                if await self._sleep_unless_stopped(backoff.next()):
                    return
        if self._stop.is_set():
            return
        log.info("clickhouse answers again: rejoining group %s", self.settings.group_id)
        self._consumer.subscribe(list(self._topics), listener=_Rebalance(self))
        self._released = False
        self.health.ok("released")
        self.health.ok("insert")

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval)
            await self._write_stats()

    async def _write_stats(self) -> None:
        """Counters to fleet.pipeline_stats; a failure is logged and retried next interval."""
        assert self._loader is not None
        try:
            await asyncio.to_thread(self.stats.write, self._loader)
        except Exception as e:
            log.warning("writing pipeline_stats failed: %s", first_line(e))

    async def _work(self) -> None:
        """Store or dead-letter the in-flight messages in fetch order; commit behind them."""
        while not self._stop.is_set():
            taken = self.in_flight.take(self.settings.insert_max_bytes)
            if not taken:
                # idle: commit now if the last commit is old enough, else when it is or more comes
                due = COMMIT_INTERVAL - (time.monotonic() - self._last_commit)
                if due <= 0 or not self._uncommitted():
                    await self._commit()
                    if not len(self.in_flight):  # nothing arrived during the commit: wait for the poll loop
                        self._work_ready.clear()
                        await self._work_ready.wait()
                else:
                    self._work_ready.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._work_ready.wait(), due)
                continue
            generation = self._generation
            self._record_done.clear()
            try:
                done = await self._load_records([rec for _, rec in taken], generation)
            finally:
                self.in_flight.done()
                self._record_done.set()
            # Messages abandoned (stop, or a partition revoked meanwhile) leave the offsets
            # where they are: nothing after them in a partition may be committed before them.
            if not done or generation != self._generation:
                continue
            for tp, rec in taken:  # fetch order: a partition's offsets ascend
                self._loaded[tp] = rec.offset + 1
            if time.monotonic() - self._last_commit >= COMMIT_INTERVAL:
                await self._commit()

    def _uncommitted(self) -> bool:
        loaded = any(off > self._committed.get(tp, -1) for tp, off in self._loaded.items())
        return loaded or self.dead_letters.pending > 0

    async def _commit(self, only: set[TopicPartition] | None = None) -> bool:
        """Commit the offsets below which every message is stored or dead-lettered (the
        dead letters acknowledged first); False if nothing could be committed."""
        assert self._consumer is not None
        async with self._commit_lock:
            self._last_commit = time.monotonic()
            if not await self.dead_letters.flush(self._stop.is_set):
                return False
            offsets = {
                tp: off for tp, off in self._loaded.items()
                if tp in self.assigned and (only is None or tp in only) and off > self._committed.get(tp, -1)
            }  # fmt: skip
            if not offsets:
                return True
            started, error = time.time_ns(), ""
            try:
                await self._consumer.commit(offsets)
                self.counters["commits"] += 1
                self._committed.update(offsets)
            except (CommitFailedError, KafkaError) as e:
                # A rebalance took the partition; its new owner gets the batches again and
                # ClickHouse deduplicates them on the batch id.
                self.counters["commit_failures"] += 1
                log.warning("commit of %s failed (%s); the batches will be redelivered",
                            sorted(f"{tp.topic}/{tp.partition}" for tp in offsets), first_line(e))  # fmt: skip
                error = f"commit failed: {first_line(e)}"
            for trace in self._traces:  # one commit covers every batch loaded since the last
                trace.record("commit", started, time.time_ns())
            self._end_traces(error)
            return not error

    def _assign(self, assigned: set[TopicPartition]) -> None:
        self.assigned |= assigned
        self.paused -= assigned  # a new assignment starts unpaused; _flow_control decides again
        for tp in assigned:
            self._committed.pop(tp, None)

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        """Partitions leave this member: drop their queued messages, let the batch being
        inserted finish (bounded: the group waits for us), commit what was stored so their
        next owner starts there, and abandon the rest (it is delivered again)."""
        if not revoked:
            return
        self.counters["rebalances"] += 1
        dropped = self.in_flight.drop(revoked)
        if self.in_flight.taken_from() & revoked:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._record_done.wait(), REVOKE_WAIT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._commit(only=revoked), REVOKE_WAIT)
        self._generation += 1  # whatever is still being worked on is abandoned
        self.dead_letters.drop(keep=lambda r: TopicPartition(r.topic, r.partition) not in revoked)
        self.assigned -= revoked
        self.paused -= revoked
        for tp in revoked:
            self._loaded.pop(tp, None)
        log.info("partitions %s revoked (%d fetched messages left to their next owner)",
                 sorted(f"{tp.topic}/{tp.partition}" for tp in revoked), dropped)  # fmt: skip

    async def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition: log end offset - committed offset (what /metrics shows)."""
        consumer, out = self._consumer, {}
        if consumer is None:
            return {}
        for tp in sorted(self.assigned):
            end = consumer.highwater(tp)
            if end is None:
                continue
            if tp not in self._committed:
                with contextlib.suppress(TimeoutError, KafkaError):
                    self._committed[tp] = await asyncio.wait_for(consumer.committed(tp), 1.0) or 0
            if tp in self._committed:
                out[tp] = max(0, end - self._committed[tp])
        return out

    def _end_traces(self, error: str = "") -> None:
        for trace in self._traces:
            trace.end(error)
        self._traces.clear()

    async def _load_records(self, records: list[ConsumerRecord], generation: int) -> bool:
        """Store these messages, one insert per stream (per insert_max_bytes of decoded
        batches), retrying ClickHouse until it acknowledges, or dead-letter them; False if
        abandoned (stopped, or a partition was revoked meanwhile)."""
        groups: dict[str, list[_Fetched]] = {}
        decoded = 0
        for i, rec in enumerate(records):
            fetched = await self._decode(rec)
            if fetched is None:
                continue
            groups.setdefault(fetched.stream, []).append(fetched)
            decoded += fetched.size
            # the messages were taken up to insert_max_bytes on the wire; LZ4-compressed ones
            # decode to several times that, so the decoded batches held at once are bounded too
            if decoded >= self.settings.insert_max_bytes and i + 1 < len(records):
                if not await self._store_groups(groups, generation):
                    return False
                groups, decoded = {}, 0
        return await self._store_groups(groups, generation)

    async def _store_groups(self, groups: dict[str, list[_Fetched]], generation: int) -> bool:
        for stream, group in groups.items():
            if not await self._store(stream, group, generation):
                return False
        return True

    async def _decode(self, rec: ConsumerRecord) -> _Fetched | None:
        """Check, decode and enrich a message; None when it went to the dead-letter topic."""
        assert self._loader is not None
        stream = self._topics.get(rec.topic, "")
        problem = screen(rec, self._topics.get(rec.topic), self.settings.max_batch_bytes)
        if problem is not None:
            await self.dead_letters.send(rec, *problem, self._stop.is_set)
            return None
        trace = NO_TRACE
        if self.tracer is not None:
            trace = self.tracer.batch(f"process {rec.topic}", rec.headers, {
                "messaging.system": "kafka", "messaging.operation.type": "process",
                "messaging.destination.name": rec.topic, "messaging.destination.partition.id": str(rec.partition),
                "messaging.kafka.offset": rec.offset,
            })  # fmt: skip
        try:
            # body size: the bytes on the wire; an fs-encoding: lz4 value is decompressed here, on
            # the event loop like the decode (about 1 ms per MiB), to at most max_batch_bytes
            with trace.stage("decode", **{"messaging.message.body.size": len(rec.value or b"")}) as span:
                data = payload.unpack_message(rec.value, rec.headers, self.settings.max_batch_bytes)
                if span is not None:
                    span.set_attribute("fleetscope.batch.decoded_bytes", len(data))
                batch = self._loader.decode(stream, data)
        except payload.PayloadTooLarge as e:
            await self.dead_letters.send(rec, dlq.OVERSIZED, str(e), self._stop.is_set)
            trace.end(f"dead-lettered: {e}")
            return None
        except BatchDecodeError as e:  # a malformed batch, or a value that does not unpack (payload.PayloadError)
            await self.dead_letters.send(rec, dlq.MALFORMED, str(e), self._stop.is_set)
            trace.end(f"dead-lettered: {e}")
            return None
        except Exception as e:  # the decoder promises BatchDecodeError only (fuzzed); a bug must not stall us
            log.exception("decoding %s/%d@%d failed unexpectedly", rec.topic, rec.partition, rec.offset)
            reason = f"decoder error {type(e).__name__}: {e}"
            await self.dead_letters.send(rec, dlq.MALFORMED, reason, self._stop.is_set)
            trace.end(f"dead-lettered: {e}")
            return None
        node = batch.header.node.host_name
        trace.set("fleetscope.batch_id", batch.header.batch_id)
        trace.set("fleetscope.rows", batch.rows)
        self.stats.add(node, stream, "batches_decoded")
        if batch.truncated:  # string values cut to codec.MAX_STRING_BYTES
            self.stats.add(node, stream, "values_truncated", batch.truncated)
        with trace.stage("enrich"):
            enrichment = await self.enricher.enrich(batch)
        if enrichment is not None and enrichment.unenriched:
            self.stats.add(node, stream, "rows_unenriched", enrichment.unenriched)
        return _Fetched(rec, stream, batch, enrichment.columns if enrichment is not None else None, trace, len(data))

    async def _store(self, stream: str, group: list[_Fetched], generation: int) -> bool:
        """Insert a stream's fetched batches together, then write their spans; False if abandoned."""
        assert self._loader is not None
        loader, backoff = self._loader, Backoff(self.settings.retry_backoff_max)
        items = [(f.batch, f.k8s) for f in group]
        while True:
            started, started_ns = time.monotonic(), time.time_ns()
            try:
                loaded: list[Loaded] = await asyncio.to_thread(loader.insert_group, stream, items)
                break
            except UNSTORABLE as e:  # raised before anything is sent: the same on every retry
                if len(group) > 1:  # find which: each alone
                    for f in group:
                        if not await self._store(stream, [f], generation):
                            return False
                    return True
                bad = group[0]
                log.exception("batch %s cannot be stored", bad.batch.header.batch_id)
                reason = f"cannot be stored: {type(e).__name__}: {e}"
                await self.dead_letters.send(bad.rec, dlq.MALFORMED, reason, self._stop.is_set)
                bad.trace.end(f"dead-lettered: {e}")
                return True
            except Exception as e:
                if not await self._failed(f"insert of {len(group)} {stream} batches", e, backoff, generation):
                    for f in group:
                        f.trace.end("stopped while retrying the insert")
                    return False
        self.insert_latency.observe(time.monotonic() - started)
        self.counters["insert_ms_total"] += int((time.monotonic() - started) * 1000)
        if self.health.ok("insert"):
            log.info("clickhouse inserts succeed again")
        for f, result in zip(group, loaded, strict=True):
            f.trace.record("insert", started_ns, time.time_ns(), **{"db.system.name": "clickhouse",
                                                                    "db.collection.name": stream})  # fmt: skip
            node = f.batch.header.node.host_name
            self.stats.add(node, stream, "batches_inserted")
            self.stats.add(node, stream, "rows_inserted", result.rows_written)
            self.stats.add(node, stream, "batches_duplicate", int(result.duplicate))
        if self.spans is not None and self.spans.covers(stream):
            for f in group:
                if not await self._write_spans(f, generation):
                    return False
        for f in group:
            if f.trace.recording:
                self._traces.append(f.trace)  # ended after the commit
        return True

    async def _write_spans(self, f: _Fetched, generation: int) -> bool:
        """The batch's kernel-derived spans into fleet.otel_traces (deduplicated), then OTLP."""
        assert self.spans is not None
        backoff = Backoff(self.settings.retry_backoff_max)
        while True:
            try:
                with f.trace.stage("spans", **{"db.system.name": "clickhouse", "db.collection.name": "otel_traces"}):
                    spans = await asyncio.to_thread(self.spans.write, f.batch, f.k8s)
                break
            except Exception as e:
                if not await self._failed(f"spans of {f.batch.header.batch_id}", e, backoff, generation):
                    f.trace.end("stopped while retrying the insert")
                    return False
        if spans is not None:
            self.stats.add(f.batch.header.node.host_name, f.stream, "spans_written", len(spans))
            await asyncio.to_thread(self.spans.export, spans)  # OTLP, once ClickHouse has them
        return True

    async def _failed(self, what: str, e: Exception, backoff: Backoff, generation: int) -> bool:
        """Report a failed insert and wait before the retry; False if the work is abandoned."""
        self.health.fail("insert", f"clickhouse inserts failing: {first_line(e)}")
        self.counters["insert_retries"] += 1
        delay = backoff.next()
        log.warning("%s failed: %s; retrying in %.1fs (offsets not committed)", what, first_line(e), delay)
        return not (await self._sleep_unless_stopped(delay) or generation != self._generation)

    def _dead_lettered(self, rec: ConsumerRecord, kind: str) -> None:
        """Count an acknowledged dead letter for its node (agents key messages by node) and
        stream; hostile keys cannot grow the counters without bound."""
        node = (rec.key or b"").decode("utf-8", "replace")[:253]
        if node not in self._dlq_nodes:
            if len(self._dlq_nodes) < DLQ_NODES_MAX:
                self._dlq_nodes.add(node)
            else:
                node = "(other)"
        self.stats.add(node, self._topics.get(rec.topic, "(unknown)"), "batches_dead_lettered")

    async def stop(self) -> None:
        self._stop.set()
        self._work_ready.set()
        if self._worker is not None:  # an insert thread it waits for finishes on its own
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        if self._consumer is not None and self.assigned:  # what is stored needs no redelivery
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._commit(), REVOKE_WAIT)
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
        if self._http is not None:
            await self._http.stop()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands the group's decisions to the ingester (aiokafka awaits these before rejoining)."""

    def __init__(self, ingester: Ingester) -> None:
        self.ingester = ingester

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.ingester._revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.ingester._assign(set(assigned))
