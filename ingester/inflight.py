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
        self.current: list[tuple[TopicPartition, ConsumerRecord, int]] = []  # taken, not yet done

    def __len__(self) -> int:
        return len(self._queue) + len(self.current)

    def add(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        for rec in records:
            size = message_bytes(rec)
            self._queue.append((tp, rec, size))
            self.bytes += size

    def take(self, max_bytes: int) -> list[tuple[TopicPartition, ConsumerRecord]]:
        """The oldest messages, at least one and up to max_bytes; they stay counted until done()."""
        taken = 0
        while self._queue and (not self.current or taken + self._queue[0][2] <= max_bytes):
            entry = self._queue.popleft()
            self.current.append(entry)
            taken += entry[2]
        return [(tp, rec) for tp, rec, _ in self.current]

    def taken_from(self) -> set[TopicPartition]:
        """The partitions of the messages taken and not yet done."""
        return {tp for tp, _, _ in self.current}

    def done(self) -> None:
        self.bytes -= sum(size for _, _, size in self.current)
        self.current = []

    def drop(self, partitions: Collection[TopicPartition]) -> int:
        """Forget the queued messages of these partitions; returns how many."""
        kept = collections.deque(e for e in self._queue if e[0] not in partitions)
        dropped = len(self._queue) - len(kept)
        self.bytes -= sum(e[2] for e in self._queue if e[0] in partitions)
        self._queue = kept
        return dropped
