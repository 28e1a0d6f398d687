"""Kafka messages an ingester fetched and has not yet stored or dead-lettered: the bound on
its memory. The poll loop pauses fetching when `bytes` reaches max_in_flight_bytes and
resumes below half of it; a rebalance drops the messages of partitions given up (their
offsets were not committed, so their new owner fetches them again)."""

from __future__ import annotations

import collections
from collections.abc import Collection

from aiokafka import ConsumerRecord, TopicPartition


def message_bytes(rec: ConsumerRecord) -> int:
    """What a fetched message holds in memory, near enough: value, key and headers."""
    return len(rec.value or b"") + len(rec.key or b"") + sum(len(k) + len(v) for k, v in rec.headers or ())


class InFlight:
    """A FIFO of fetched messages across partitions (fetch order), with their total size."""

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[TopicPartition, ConsumerRecord, int]] = collections.deque()
        self.bytes = 0
        self.current: tuple[TopicPartition, ConsumerRecord, int] | None = None  # taken, not yet done

    def __len__(self) -> int:
        return len(self._queue) + (self.current is not None)

    def add(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        for rec in records:
            size = message_bytes(rec)
            self._queue.append((tp, rec, size))
            self.bytes += size

    def take(self) -> tuple[TopicPartition, ConsumerRecord] | None:
        """The oldest message, which stays counted until done()."""
        if not self._queue:
            return None
        self.current = self._queue.popleft()
        return self.current[0], self.current[1]

    def done(self) -> None:
        if self.current is not None:
            self.bytes -= self.current[2]
            self.current = None

    def drop(self, partitions: Collection[TopicPartition]) -> int:
        """Forget the queued messages of these partitions; returns how many."""
        kept = collections.deque(e for e in self._queue if e[0] not in partitions)
        dropped = len(self._queue) - len(kept)
        self.bytes -= sum(e[2] for e in self._queue if e[0] in partitions)
        self._queue = kept
        return dropped
