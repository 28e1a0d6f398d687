"""Hand-over of encoded batches: to Kafka (fleet mode) or in memory (single-node mode).

LocalSink takes batches through a bounded queue; when it is full the oldest batch is
dropped and counted ("agent_dropped"). KafkaSink takes every batch compressed once (an LZ4
frame, header ``fs-encoding: lz4``, fleetscope/payload.py: the agent's batcher compresses
for a sink that ``compresses``, submit does it for a batch that comes raw), appends it to a disk spool
(node_agent/spool.py) and sends it from there as it is, with Kafka's compression off, so a
broker outage fills the disk, bounded and counted, not memory, and an agent restart loses
nothing that was spooled. LocalSink hands the uncompressed batch over in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from fleetscope import payload
from fleetscope.codec import SCHEMA_MAJOR
from fleetscope.kafka_security import KafkaAuth
from fleetscope.otel import PipelineTracer
from fleetscope.retry import Backoff, first_line
from node_agent.batcher import Batch
from node_agent.spool import Spool, SpoolRecord, SpoolWriteError

log = logging.getLogger(__name__)


# Why an agent lost batches: <stream>.rows_<reason> and batches_<reason> beside the totals
# <stream>.rows_dropped and batches_dropped (fleet.pipeline_stats, stage agent).
LOSS_REASONS = ("queue_full", "shutdown", "spool_evicted", "spool_corrupt", "spool_error", "rejected")
# losses that belong to no stream (a spool file too damaged to tell what it held)
NODE_LOSS_COUNTERS = ("spool_files_quarantined", "spool_bytes_unreadable")


class BatchSink(Protocol):
    """Where the agent puts finished batches."""

    counters: Counter[str]
    compresses: bool  # whether batches travel compressed: the batcher then bounds their compressed size

    async def start(self) -> None: ...
    def submit(self, batch: Batch) -> None: ...
    async def stop(self, drain_timeout: float) -> None: ...


class QueueSink:
    """Bounded queue + one sender task; subclasses define how one batch is delivered."""

    def __init__(self, max_batches: int, tracer: PipelineTracer | None = None) -> None:
        self.tracer = tracer  # self-tracing: a span per delivered batch, its context in the headers
        self.counters: Counter[str] = Counter()
        self.compresses = False  # in memory: the ingester decodes the batch as it is
        self._queue: collections.deque[Batch] = collections.deque()
        self._max = max_batches
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inflight: Batch | None = None
        self.failure: BaseException | None = None

    def submit(self, batch: Batch) -> None:
        if len(self._queue) >= self._max:
            lost = self._queue.popleft()
            for reason in ("dropped", "queue_full"):
                self.counters[f"{lost.stream}.batches_{reason}"] += 1
                self.counters[f"{lost.stream}.rows_{reason}"] += lost.rows
            log.warning("hand-over queue full (%d batches): dropped %s", self._max, lost.batch_id)
        self._queue.append(batch)
        self._idle.clear()
        self._ready.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=type(self).__name__)
        self._task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            log.error("%s failed: %r", type(self).__name__, self.failure)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._ready.clear()
                await self._ready.wait()
                continue
            # the batch being delivered leaves the queue, so a drop-oldest never takes it
            batch = self._inflight = self._queue.popleft()
            if self.tracer is None:
                await self.deliver(batch)
            else:
                attrs = {"fleetscope.batch_id": batch.batch_id, "fleetscope.stream": batch.stream,
                         "fleetscope.rows": batch.rows, **self.span_attributes(batch)}  # fmt: skip
                with self.tracer.publish(f"send {batch.stream}", batch.created_ns, attrs) as headers:
                    batch = self._inflight = dataclasses.replace(batch, trace_headers=tuple(headers))
                    await self.deliver(batch)
            self._inflight = None
            self.counters[f"{batch.stream}.batches_shipped"] += 1
            self.counters[f"{batch.stream}.rows_shipped"] += batch.rows

    async def deliver(self, batch: Batch) -> None:
        raise NotImplementedError

    def span_attributes(self, batch: Batch) -> dict[str, str]:
        """Attributes of the batch's send span particular to the transport."""
        return {}

    async def stop(self, drain_timeout: float) -> None:
        """Deliver what is queued within drain_timeout; count what had to be abandoned."""
        if self._task is None:
            return
        if self._queue and self.failure is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
        if self._inflight is not None:
            self._queue.appendleft(self._inflight)
        for batch in self._queue:
            for reason in ("dropped", "shutdown"):
                self.counters[f"{batch.stream}.batches_{reason}"] += 1
                self.counters[f"{batch.stream}.rows_{reason}"] += batch.rows
        if self._queue:
            log.warning("shutdown abandoned %d undelivered batches", len(self._queue))
        self._queue.clear()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        await self.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # exports the last spans

    async def close(self) -> None:
        """Release the transport after the sender stopped."""


class LocalSink(QueueSink):
    """Single-node mode: hand the encoded bytes straight to the ingester's loader."""

    def __init__(self, deliver: Callable[[Batch], Awaitable[None]], max_batches: int = 256,
                 tracer: PipelineTracer | None = None) -> None:  # fmt: skip
        super().__init__(max_batches, tracer)
        self._deliver = deliver

    async def deliver(self, batch: Batch) -> None:
        await self._deliver(batch)


MAX_IN_FLIGHT = 8  # batches handed to the producer at once; see KafkaSink
RECONNECT_CAP = 5.0  # seconds: the longest wait between two connection attempts
SYNC_INTERVAL = 1.0  # seconds between spool checkpoints (cursor, fdatasync of unacknowledged data)
STALL_SECONDS = 10.0  # a send unanswered this long means the broker is unreachable or too slow
# per-message errors: the broker will never take this batch; it is counted as lost ("rejected")
_REJECTED = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError, CorruptRecordException)


@dataclasses.dataclass
class _InFlight:
    record: SpoolRecord
    future: asyncio.Future[Any] | None  # None: send() itself failed
    sent: float = dataclasses.field(default_factory=time.monotonic)
    span: contextlib.AbstractContextManager[list[tuple[str, bytes]]] | None = None
    error: BaseException | None = None


class KafkaSink:
    """Fleet mode: every batch is compressed (LZ4 frame, ``fs-encoding: lz4``), appended to
    the disk spool, then sent from it to Kafka; idempotent producer, acks=all, one message per
    batch, Kafka's own compression off.

    Compressing once in ``submit`` makes everything after it (spool CRC and writes, the
    producer's copies and CRC-32C) work on about an eighth of the bytes (tcp_connections), and Kafka would only
    spend CPU compressing LZ4 frames again. Records spooled by an older agent (raw payload, no
    fs-encoding header) are sent as they are; the ingester reads both.

    Backpressure runs ring buffer -> batcher -> spool -> producer: ``submit`` only appends
    to the spool (a write into the page cache), a sender task reads the spool in order and
    keeps at most ``max_in_flight`` batches in the producer, and a batch leaves the spool
    when Kafka acknowledged it. So memory holds at most ``max_in_flight`` batches (and the
    producer's compressed copies of them, and the spool's 4 MiB of latest appends) whatever
    the broker does; an outage fills the disk spool (``spool_max_bytes``), whose oldest
    segments are evicted and counted (``rows_spool_evicted``). The spool survives restarts:
    what a stopped or killed agent did not deliver is sent first by the next one, under its
    original batch id.

    Order: aiokafka sends one request per broker at a time and mutes a partition while a
    batch of it is in flight, so batches handed over in spool order reach each partition in
    that order. After a failure the sender settles every batch in flight, restarts the
    producer and resends the failed ones first, in spool order. Duplicates (a batch whose
    acknowledgement was lost, or acknowledged batches after the cursor when the agent was
    killed) keep their batch id, which ClickHouse deduplicates on insert.
    """

    def __init__(self, brokers: tuple[str, ...], topic_prefix: str, spool_dir: Path, spool_max_bytes: int,
                 max_in_flight: int = MAX_IN_FLIGHT, max_message_bytes: int = 16 << 20,
                 tracer: PipelineTracer | None = None, auth: KafkaAuth | None = None) -> None:  # fmt: skip
        self.tracer = tracer  # self-tracing: a span per send, its context in the headers
        self.counters: Counter[str] = Counter()
        self.compresses = True  # every batch goes to the spool and Kafka as an LZ4 frame
        self.brokers, self.topic_prefix = brokers, topic_prefix
        self.auth = auth  # TLS and SASL (None: PLAINTEXT)
        self.spool = Spool(spool_dir, spool_max_bytes, self.counters)
        self.max_in_flight = max_in_flight
        self._max_message_bytes = max_message_bytes
        self._producer: AIOKafkaProducer | None = None
        self._started = False  # the producer connected; see connected
        self.failure: BaseException | None = None
        self._inflight: collections.deque[_InFlight] = collections.deque()
        self._retry: collections.deque[SpoolRecord] = collections.deque()  # failed sends, resent first
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_warning = 0.0

    async def _connect(self) -> AIOKafkaProducer:
        backoff = Backoff(cap=RECONNECT_CAP)
        while True:
            producer = None
            try:
                producer = AIOKafkaProducer(
                    bootstrap_servers=list(self.brokers),
                    enable_idempotence=True,
                    acks="all",
                    compression_type=None,  # the values are LZ4 frames already (submit)
                    linger_ms=5,
                    max_request_size=self._max_message_bytes,
                    request_timeout_ms=30000,
                    **(self.auth.options() if self.auth else {}),  # a fresh TLS context and password
                )
                await producer.start()
            except BaseException as e:
                if producer is not None:
                    await producer.stop()  # also when stop() cancels a start: no unclosed producer
                if not isinstance(e, Exception):
                    raise
                delay = backoff.next()
                self.counters["kafka_connect_retries"] += 1
                reason = await self.auth.explain(e) if self.auth else first_line(e)
                self._warn("kafka at %s unreachable (%s); retrying in %.1fs, batches are spooled",
                           ",".join(self.brokers), reason, delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            log.info("connected to kafka at %s%s", ",".join(self.brokers),
                     f" ({self.auth.describe()})" if self.auth else "")  # fmt: skip
            self.connected = True
            return producer

    @property
    def connected(self) -> bool:
        """Whether the broker takes batches: the producer is up and no send waits for an
        answer longer than STALL_SECONDS (aiokafka keeps retrying a send while the broker
        is away, so a stopped broker shows as a stalled send, not as an error)."""
        if not self._started:  # before the first connection, and from a failed send to the next one
            return False
        return not self._inflight or time.monotonic() - self._inflight[0].sent < STALL_SECONDS

    @connected.setter
    def connected(self, value: bool) -> None:
        self._started = value

    def topic(self, stream: str, major: int = SCHEMA_MAJOR) -> str:
        return f"{self.topic_prefix}.{stream}.v{major}"

    # -- the agent's side --------------------------------------------------------------------

    def submit(self, batch: Batch) -> None:
        """Append the batch to the spool, compressed (the agent's batcher compresses already,
        see compresses); the sender takes it from there."""
        if not batch.encoding:
            batch = dataclasses.replace(batch, payload=payload.compress(batch.payload), encoding=payload.LZ4)
        try:
            self.spool.append(batch.stream, batch.batch_id, batch.sequence, batch.rows, batch.created_ns, batch.key,
                              batch.headers(), SCHEMA_MAJOR, batch.payload)  # fmt: skip
        except SpoolWriteError as e:
            for reason in ("dropped", "spool_error"):
                self.counters[f"{batch.stream}.rows_{reason}"] += batch.rows
                self.counters[f"{batch.stream}.batches_{reason}"] += 1
            self._warn("batch %s (%d rows) lost: %s (counted as spool_error)", batch.batch_id, batch.rows, e)
        self._drained.clear()
        self._wake.set()

    async def start(self) -> None:
        """Open the spool (check what a previous agent left), then start sending."""
        report = await asyncio.to_thread(self.spool.open)
        if report.batches:
            log.info("spool %s holds %d batches (%d bytes) not yet delivered; sending them first",
                     self.spool.dir, report.batches, report.bytes)  # fmt: skip
        if report.quarantined:
            log.error("spool %s: damaged segments quarantined: %s", self.spool.dir, ", ".join(report.quarantined))
        self._tasks = [asyncio.create_task(self._run(), name="kafka-sender"),
                       asyncio.create_task(self._checkpoints(), name="spool-sync")]  # fmt: skip
        for task in self._tasks:
            task.add_done_callback(self._died)

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()
            log.error("%s failed: %r", task.get_name(), self.failure)

    def _warn(self, msg: str, *args: object) -> None:
        """A warning at most every 10 s (the counters count every occurrence)."""
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning(msg, *args)

    def status(self) -> dict[str, Any]:
        """The spool and the producer, for /status and /healthz."""
        return {
            "dir": str(self.spool.dir), "bytes": self.spool.bytes, "max_bytes": self.spool.max_bytes,
            "batches": self.spool.pending_batches, "segments": self.spool.segments,
            "in_flight": len(self._inflight) + len(self._retry), "max_in_flight": self.max_in_flight,
            "connected": self.connected,
            "evicting": bool(self.spool.evicting_since) and time.monotonic() - self.spool.evicting_since < 60,
            "last_error": self.spool.last_error,
        }  # fmt: skip

    async def wait_drained(self) -> None:
        """Until every spooled batch was acknowledged by Kafka."""
        await self._drained.wait()

    # -- the sender ------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(cap=RECONNECT_CAP)
        while True:
            if self._producer is None:
                self._producer = await self._connect()
            await self._fill(self._producer)
            if not self._inflight:
                if not self._retry and not self.spool.unread:
                    self._drained.set()
                    self._wake.clear()
                    await self._wake.wait()
                continue
            head = self._inflight[0]
            if head.future is not None and not head.future.done():
                await self._wait(head)
            if self._settle(head):
                self._inflight.popleft()
                backoff = Backoff(cap=RECONNECT_CAP)
                continue
            # a send failed: settle the rest, restart the producer, resend the failures first
            await asyncio.gather(*(f.future for f in self._inflight if f.future is not None), return_exceptions=True)
            failed = [f for f in self._inflight if not self._settle(f)]
            self._inflight.clear()
            self._retry.extendleft(reversed([f.record for f in failed]))
            self.counters["kafka_send_retries"] += len(failed)
            self.connected = False
            producer, self._producer = self._producer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)
            delay = backoff.next()
            error = first_line(failed[0].error or Exception())
            self._warn("sending %s failed (%s); %d batches to resend, reconnecting in %.1fs",
                       failed[0].record.batch_id, error, len(failed), delay)  # fmt: skip
            await asyncio.sleep(delay)

    async def _wait(self, head: _InFlight) -> None:
        """Wait for the oldest send; say so when the broker has not answered for a while."""
        assert head.future is not None
        stalled = False
        while not head.future.done():
            await asyncio.wait([head.future], timeout=STALL_SECONDS)
            if not head.future.done() and not stalled:
                stalled = True
                log.warning("kafka has not acknowledged batch %s for %.0fs (broker unreachable or slow); "
                            "batches are spooled (%d, %d bytes)", head.record.batch_id, time.monotonic() - head.sent,
                            self.spool.pending_batches, self.spool.bytes)  # fmt: skip
        if stalled and head.future.exception() is None:
            log.info("kafka acknowledged %s after %.0fs; sending the %d spooled batches",
                     head.record.batch_id, time.monotonic() - head.sent, self.spool.pending_batches)  # fmt: skip

    async def _fill(self, producer: AIOKafkaProducer) -> None:
        """Hand records to the producer, in spool order, until max_in_flight are out."""
        while len(self._inflight) < self.max_in_flight:
            if any(f.future is None for f in self._inflight):
                return  # a send failed: no more until it is resolved
            rec = self._retry.popleft() if self._retry else self.spool.next()
            if rec is None:
                return
            entry = _InFlight(rec, None)
            headers = list(rec.headers)
            if self.tracer is not None:
                attrs = {"fleetscope.batch_id": rec.batch_id, "fleetscope.stream": rec.stream,
                         "fleetscope.rows": rec.rows, "messaging.system": "kafka", "messaging.operation.type": "send",
                         "messaging.destination.name": self.topic(rec.stream, rec.major),
                         "messaging.kafka.message.key": rec.key.decode(errors="replace")}  # fmt: skip
                entry.span = self.tracer.publish(f"send {rec.stream}", rec.created_ns, attrs)
                headers += entry.span.__enter__()
            try:
                entry.future = await producer.send(self.topic(rec.stream, rec.major), rec.payload, key=rec.key,
                                                   headers=headers)  # fmt: skip
            except Exception as e:  # no metadata in time, a closed producer, a message it refuses
                entry.error = e
            self._inflight.append(entry)

    def _settle(self, entry: _InFlight) -> bool:
        """Account for a finished send: True when done with it (delivered, or refused for good)."""
        error = entry.error
        if error is None and entry.future is not None:
            error = entry.future.exception() if entry.future.done() else TimeoutError("not sent")
        entry.error = error
        rec = entry.record
        if entry.span is not None:
            span, entry.span = entry.span, None
            span.__exit__(type(error) if error else None, error, None)
        if error is None:
            self.spool.ack(rec)
            self.counters[f"{rec.stream}.batches_shipped"] += 1
            self.counters[f"{rec.stream}.rows_shipped"] += rec.rows
            return True
        if isinstance(error, _REJECTED):
            self.spool.ack(rec)
            for reason in ("dropped", "rejected"):
                self.counters[f"{rec.stream}.rows_{reason}"] += rec.rows
                self.counters[f"{rec.stream}.batches_{reason}"] += 1
            log.error("kafka refused batch %s (%d rows) for good: %s; counted as lost (rejected)",
                      rec.batch_id, rec.rows, first_line(error))  # fmt: skip
            return True
        return False

    async def _checkpoints(self) -> None:
        """Every SYNC_INTERVAL: record the spool cursor and fdatasync unacknowledged data."""
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            fds = self.spool.checkpoint()
            if fds:
                await asyncio.to_thread(_sync_fds, fds)

    async def stop(self, drain_timeout: float) -> None:
        """Deliver what the spool holds within drain_timeout while the broker is reachable;
        what is left stays in the spool for the next start (nothing is dropped)."""
        if not self._tasks:
            return
        pending = self.spool.pending_batches or self._inflight or self._retry
        if pending and self.connected and self.failure is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), drain_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for entry in self._inflight:
            if not self._settle(entry):
                self.spool.release(entry.record)
        for rec in self._retry:
            self.spool.release(rec)
        self._inflight.clear()
        self._retry.clear()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 5)
            self._producer = None
        left, size = self.spool.pending_batches, self.spool.bytes
        await asyncio.to_thread(self.spool.close)
        if left:
            log.warning("%d batches (%d bytes) not yet delivered stay in the spool %s; the next start sends them",
                        left, size, self.spool.dir)  # fmt: skip
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # exports the last spans


def _sync_fds(fds: list[int]) -> None:
    """fdatasync and close duplicated segment fds (in a worker thread)."""
    for fd in fds:
        try:
            os.fdatasync(fd)
        except OSError as e:
            log.error("spool: fdatasync failed: %s", e)
        finally:
            os.close(fd)
