"""The dead-letter topic: where batches go that can never be stored, with why and from where.

Sends are pipelined (a burst of hostile messages is not one round trip each) and flushed
before the consumer commits past them, so a bad message is either acknowledged by the
dead-letter topic or delivered again; it is never skipped silently. A message too big for
the dead-letter topic goes there cut, with its original size in a header.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from fleetscope.retry import Backoff, first_line
from ingester.health import Health

log = logging.getLogger(__name__)

# Why a batch was dead-lettered (header fs-dlq-kind, metric label kind).
MALFORMED = "malformed"  # not a batch of its topic's stream: undecodable, inconsistent, hostile
OVERSIZED = "oversized"  # more than max_batch_bytes
UNKNOWN_VERSION = "unknown-version"  # fs-schema names a major version this ingester does not read
UNKNOWN_TOPIC = "unknown-topic"  # the topic is not <prefix>.<stream>.v<major> of a known stream

TRUNCATED_VALUE_BYTES = 16 << 10  # what is kept of a value the dead-letter topic refuses whole
MAX_REASON_BYTES = 1024
# unacknowledged sends (count, bytes) before the sender waits for them: a bound on what the
# producer holds, which the in-flight bound no longer counts
FLUSH_AT = 10_000
FLUSH_AT_BYTES = 16 << 20
_OWN_HEADERS = ("fs-dlq-", "fs-source")  # never copied from the incoming message: ours are the truth


@dataclass
class _Pending:
    rec: ConsumerRecord
    headers: list[tuple[str, bytes]]
    delivery: asyncio.Future[object] | None
    cut: bool = False  # sent cut to TRUNCATED_VALUE_BYTES after the topic refused it whole
    refused: int = 0  # times the topic refused it as too large


class RateLimitedLog:
    """At most `burst` lines per `interval` seconds, then one line saying how many were held back."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 10.0,
                 level: int = logging.WARNING) -> None:  # fmt: skip
        self.logger, self.burst, self.interval, self.level = logger, burst, interval, level
        self._window, self._used, self._held = 0.0, 0, 0

    def warning(self, msg: str, *args: object) -> None:
        """Log at the limiter's level (WARNING unless given), within the rate."""
        now = time.monotonic()
        if now - self._window >= self.interval:
            if self._held:
                self.logger.log(self.level, "... and %d more like it in the last %.0fs", self._held, self.interval)
            self._window, self._used, self._held = now, 0, 0
        if self._used < self.burst:
            self._used += 1
            self.logger.log(self.level, msg, *args)
        else:
            self._held += 1


class DeadLetters:
    """Sends undecodable batches to the dead-letter topic; `flush()` before committing."""

    def __init__(self, topic: str, component: str, on_sent: Callable[[ConsumerRecord, str], None],
                 health: Health | None = None) -> None:  # fmt: skip
        self.topic, self.component = topic, component
        self._on_sent = on_sent  # per acknowledged message: counts it (pipeline_stats, metrics)
        self._health = health or Health()
        self.producer: AIOKafkaProducer | None = None
        self.by_kind: Counter[str] = Counter()
        self.retries = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._pending_bytes = 0
        self._partitions = 0  # of the dead-letter topic, looked up at the first send
        self._log = RateLimitedLog(log)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def headers(self, rec: ConsumerRecord, kind: str, reason: str) -> list[tuple[str, bytes]]:
        """Why (kind, reason), where from (topic/partition@offset) and who, then the original headers."""
        own = [
            ("fs-dlq-kind", kind.encode()),
            ("fs-dlq-reason", reason.encode()[:MAX_REASON_BYTES]),
            ("fs-source", f"{rec.topic}/{rec.partition}@{rec.offset}".encode()),
            ("fs-dlq-ingester", self.component.encode()),
        ]
        return own + [(k, v) for k, v in (rec.headers or ()) if not k.startswith(_OWN_HEADERS)]

    async def send(self, rec: ConsumerRecord, kind: str, reason: str, stopped: Callable[[], bool]) -> None:
        """Queue one dead letter; waits only when FLUSH_AT are unacknowledged."""
        self._log.warning("batch at %s/%d@%d dead-lettered (%s): %s", rec.topic, rec.partition, rec.offset, kind,
                          reason)  # fmt: skip
        headers = self.headers(rec, kind, reason)
        self._pending.append(_Pending(rec, headers, await self._start_send(rec, headers)))
        self._pending_bytes += len(rec.value or b"")
        if len(self._pending) >= FLUSH_AT or self._pending_bytes >= FLUSH_AT_BYTES:
            await self.flush(stopped)

    async def _start_send(self, rec: ConsumerRecord, headers: list[tuple[str, bytes]]) -> asyncio.Future[object] | None:
        """The delivery future, or None when the send could not even be queued (retried in flush)."""
        assert self.producer is not None
        try:
            if not self._partitions:
                self._partitions = len(await self.producer.partitions_for(self.topic))
            # the source partition picks the dead-letter partition: no key hashing per message
            partition = rec.partition % self._partitions
            return await self.producer.send(self.topic, rec.value, key=rec.key, headers=headers, partition=partition)
        except MessageSizeTooLargeError:  # more than the producer's max_request_size
            with contextlib.suppress(KafkaError):
                return await self._send_cut(rec, headers)
            return None
        except KafkaError:
            return None

    async def _send_cut(self, rec: ConsumerRecord, headers: list[tuple[str, bytes]]) -> asyncio.Future[object]:
        """The message with its value cut to TRUNCATED_VALUE_BYTES and its original size in a header."""
        assert self.producer is not None
        value = (rec.value or b"")[:TRUNCATED_VALUE_BYTES]
        cut = [*headers, ("fs-dlq-truncated-from", str(len(rec.value or b"")).encode())]
        return await self.producer.send(self.topic, value, key=(rec.key or b"")[:1024], headers=cut)

    async def flush(self, stopped: Callable[[], bool]) -> bool:
        """Wait until every queued dead letter is acknowledged, re-sending failed ones with
        backoff; False if a stop was requested first (nothing past them may be committed)."""
        backoff = Backoff(30.0)
        while self._pending:
            entry = self._pending[0]
            try:
                if entry.delivery is None or entry.delivery.cancelled():  # cancelled: by a stop or a revoke timeout
                    send = self._send_cut if entry.cut else self._start_send
                    entry.delivery = await send(entry.rec, entry.headers)
                    if entry.delivery is None:
                        raise KafkaError("cannot queue the send")
                # shielded: a caller's timeout must not cancel the producer's delivery
                await asyncio.shield(entry.delivery)
            except MessageSizeTooLargeError as e:
                # The topic refused the record batch this message was in. The first time, a big
                # message is sent again cut and a small one (maybe refused for a neighbour's
                # sake) as it is; the second time it is cut whatever its size; then backoff.
                entry.refused += 1
                if entry.refused <= 2 and not entry.cut:
                    entry.cut = entry.refused == 2 or len(entry.rec.value or b"") > TRUNCATED_VALUE_BYTES
                    entry.delivery = None
                    continue
                if not await self._failed(e, backoff, stopped):
                    return False
                continue
            except KafkaError as e:
                if not await self._failed(e, backoff, stopped):
                    return False
                continue
            if self._health.ok("dead-letters"):
                log.info("the dead-letter topic takes messages again")
            self._pending.popleft()
            self._pending_bytes -= len(entry.rec.value or b"")
            kind = next((v.decode() for k, v in entry.headers if k == "fs-dlq-kind"), MALFORMED)
            self.by_kind[kind] += 1
            self._on_sent(entry.rec, kind)
        return True

    async def _failed(self, e: KafkaError, backoff: Backoff, stopped: Callable[[], bool]) -> bool:
        """Note a failed send of the oldest dead letter and wait to retry it; False if stopped."""
        self.retries += 1
        self._pending[0].delivery = None
        delay = backoff.next()
        log.warning("dead-letter send failed: %s; retrying in %.1fs (offsets not committed)", first_line(e), delay)
        self._health.fail("dead-letters", f"dead-letter topic {self.topic} refuses messages: {first_line(e)}")
        if stopped():
            return False
        await asyncio.sleep(delay)
        return True

    def drop(self, keep: Callable[[ConsumerRecord], bool]) -> None:
        """Forget queued dead letters of partitions given up (their new owner sends them again)."""
        self._pending = collections.deque(p for p in self._pending if keep(p.rec))
        self._pending_bytes = sum(len(p.rec.value or b"") for p in self._pending)
