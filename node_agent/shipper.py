"""Hand-over of encoded batches: to Kafka (fleet mode) or in memory (single-node mode).

Both sinks take batches through a bounded queue. When it is full the oldest batch is
dropped and counted ("agent_dropped"): memory stays bounded whatever the broker does.
(A disk spool that survives outages replaces the drop in a later step; see DESIGN.md.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import importlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiokafka import AIOKafkaProducer

from fleetscope.codec import SCHEMA_MAJOR
from fleetscope.otel import PipelineTracer
from fleetscope.retry import Backoff, first_line
from node_agent.batcher import Batch

log = logging.getLogger(__name__)


class BatchSink(Protocol):
    """Where the agent puts finished batches."""

    counters: Counter[str]

    async def start(self) -> None: ...
    def submit(self, batch: Batch) -> None: ...
    async def stop(self, drain_timeout: float) -> None: ...


class QueueSink:
    """Bounded queue + one sender task; subclasses define how one batch is delivered."""

    def __init__(self, max_batches: int, tracer: PipelineTracer | None = None) -> None:
        self.tracer = tracer  # self-tracing: a span per delivered batch, its context in the headers
        self.counters: Counter[str] = Counter()
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
            self.counters[f"{lost.stream}.batches_dropped"] += 1
            self.counters[f"{lost.stream}.rows_dropped"] += lost.rows
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
            self.counters[f"{batch.stream}.batches_dropped"] += 1
            self.counters[f"{batch.stream}.rows_dropped"] += batch.rows
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


FAST_LZ4_LEVEL = 0  # LZ4 frame compressionLevel < 3: LZ4's fast mode; 3 and above: LZ4-HC


def fast_lz4() -> None:
    """Make aiokafka compress lz4 in LZ4's fast mode (idempotent).

    aiokafka 0.11+ compresses through cramjam at level 9, which is LZ4-HC: on fleetscope
    batches 4-15x the CPU of the fast mode for 2-13% smaller messages, the agent's largest
    single cost at high event rates (bench/agent_profile.py; upstream aio-libs/aiokafka#1028).
    The output is the same LZ4 frame format (independent blocks, no content checksum), so
    brokers and consumers read it unchanged. aiokafka offers no setting for the level, so
    the record builder's reference to its codec function is replaced.
    """
    from aiokafka.codec import lz4_encode

    for name in ("aiokafka.record._crecords.default_records", "aiokafka.record.default_records"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # the C extension is optional (AIOKAFKA_NO_EXTENSIONS)
            continue
        if getattr(module, "lz4_encode", None) is lz4_encode:
            module.lz4_encode = functools.partial(lz4_encode, level=FAST_LZ4_LEVEL)


class KafkaSink(QueueSink):
    """Fleet mode: one Kafka message per batch; idempotent producer, acks=all, lz4.

    The producer is (re)started in the background with backoff, so an unreachable broker
    at start-up costs a log line, not the agent; batches wait in the bounded queue.
    """

    def __init__(self, brokers: tuple[str, ...], topic_prefix: str, max_batches: int = 256,
                 max_message_bytes: int = 16 << 20, tracer: PipelineTracer | None = None) -> None:  # fmt: skip
        super().__init__(max_batches, tracer)
        fast_lz4()
        self.brokers, self.topic_prefix = brokers, topic_prefix
        self._max_message_bytes = max_message_bytes
        self._producer: AIOKafkaProducer | None = None
        self.connected = False

    async def _connect(self) -> AIOKafkaProducer:
        backoff = Backoff(cap=30.0)
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=list(self.brokers),
                enable_idempotence=True,
                acks="all",
                compression_type="lz4",
                linger_ms=5,
                max_request_size=self._max_message_bytes,
                request_timeout_ms=30000,
            )
            try:
                await producer.start()
            except Exception as e:
                await producer.stop()
                delay = backoff.next()
                self.counters["kafka_connect_retries"] += 1
                log.warning("kafka at %s unreachable (%s); retrying in %.1fs, batches are queued",
                            ",".join(self.brokers), first_line(e), delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            log.info("connected to kafka at %s", ",".join(self.brokers))
            self.connected = True
            return producer

    def span_attributes(self, batch: Batch) -> dict[str, str]:
        return {
            "messaging.system": "kafka", "messaging.operation.type": "send",
            "messaging.destination.name": self.topic(batch), "messaging.kafka.message.key": batch.key.decode(),
        }  # fmt: skip

    def topic(self, batch: Batch) -> str:
        return f"{self.topic_prefix}.{batch.stream}.v{SCHEMA_MAJOR}"

    async def deliver(self, batch: Batch) -> None:
        backoff = Backoff(cap=30.0)
        while True:
            if self._producer is None:
                self._producer = await self._connect()
            try:
                await self._producer.send_and_wait(
                    self.topic(batch), batch.payload, key=batch.key, headers=batch.headers()
                )
                return
            except Exception as e:
                self.counters["kafka_send_retries"] += 1
                delay = backoff.next()
                log.warning("sending %s failed (%s); retrying in %.1fs", batch.batch_id, first_line(e), delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
