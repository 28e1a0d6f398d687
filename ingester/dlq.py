"""The dead-letter topic: where batches go that can never be stored, with why and from where.

Sends are pipelined (a burst of hostile messages is not one round trip each) and flushed
before the consumer commits past them, so a bad message is either acknowledged by the
dead-letter topic or delivered again; it is never skipped silently. A message too big for
the dead-letter topic goes there cut, with its original size in a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from fleetscope.retry import Backoff, first_line

log = logging.getLogger(__name__)

# Why a batch was dead-lettered (header fs-dlq-kind, metric label kind).
MALFORMED = "malformed"  # not a batch of its topic's stream: undecodable, inconsistent, hostile
OVERSIZED = "oversized"  # more than max_batch_bytes
UNKNOWN_VERSION = "unknown-version"  # fs-schema names a major version this ingester does not read
UNKNOWN_TOPIC = "unknown-topic"  # the topic is not <prefix>.<stream>.v<major> of a known stream

TRUNCATED_VALUE_BYTES = 64 << 10  # what is kept of a value the dead-letter topic refuses whole
MAX_REASON_BYTES = 1024
FLUSH_AT = 1024  # unacknowledged sends before the sender waits for them
_OWN_HEADERS = ("fs-dlq-", "fs-source")  # never copied from the incoming message: ours are the truth


@dataclass
class _Pending:
    rec: ConsumerRecord
    headers: list[tuple[str, bytes]]
    delivery: asyncio.Future[object] | None


class RateLimitedLog:
    """At most `burst` lines per `interval` seconds, then one line saying how many were held back."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 10.0) -> None:
        self.logger, self.burst, self.interval = logger, burst, interval
        self._window, self._used, self._held = 0.0, 0, 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window >= self.interval:
            if self._held:
                self.logger.warning("... and %d more like it in the last %.0fs", self._held, self.interval)
            self._window, self._used, self._held = now, 0, 0
        if self._used < self.burst:
            self._used += 1
            self.logger.warning(msg, *args)
        else:
            self._held += 1


class DeadLetters:
    """Sends undecodable batches to the dead-letter topic; `flush()` before committing."""

    def __init__(self, topic: str, component: str, on_sent: Callable[[ConsumerRecord, str], None]) -> None:
        self.topic, self.component = topic, component
        self._on_sent = on_sent  # per acknowledged message: counts it (pipeline_stats, metrics)
        self.producer: AIOKafkaProducer | None = None
        self.by_kind: Counter[str] = Counter()
        self.retries = 0
        self._pending: list[_Pending] = []
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
        if len(self._pending) >= FLUSH_AT:
            await self.flush(stopped)

    async def _start_send(self, rec: ConsumerRecord, headers: list[tuple[str, bytes]]) -> asyncio.Future[object] | None:
        """The delivery future, or None when the send could not even be queued (retried in flush)."""
        assert self.producer is not None
        try:
            return await self.producer.send(self.topic, rec.value, key=rec.key, headers=headers)
        except MessageSizeTooLargeError:
            return await self._send_cut(rec, headers)
        except KafkaError:
            return None

    async def _send_cut(self, rec: ConsumerRecord, headers: list[tuple[str, bytes]]) -> asyncio.Future[object]:
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
                if entry.delivery is None:
                    entry.delivery = await self._start_send(entry.rec, entry.headers)
                    if entry.delivery is None:
                        raise KafkaError("cannot queue the send")
                await entry.delivery
            except MessageSizeTooLargeError:
                entry.delivery = None
                with contextlib.suppress(KafkaError):
                    entry.delivery = await self._send_cut(entry.rec, entry.headers)
                continue
            except KafkaError as e:
                self.retries += 1
                entry.delivery = None
                delay = backoff.next()
                log.warning("dead-letter send failed: %s; retrying in %.1fs (offsets not committed)",
                            first_line(e), delay)  # fmt: skip
                if stopped():
                    return False
                await asyncio.sleep(delay)
                continue
            self._pending.pop(0)
            kind = next((v.decode() for k, v in entry.headers if k == "fs-dlq-kind"), MALFORMED)
            self.by_kind[kind] += 1
            self._on_sent(entry.rec, kind)
        return True

    def drop(self, keep: Callable[[ConsumerRecord], bool]) -> None:
        """Forget queued dead letters of partitions given up (their new owner sends them again)."""
        self._pending = [p for p in self._pending if keep(p.rec)]

