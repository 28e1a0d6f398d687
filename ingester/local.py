"""Single-node hand-over: the agent's batches go straight to the ingester's loader.

The encoded bytes still go through decode and the same columnar insert as in fleet
mode; only Kafka is left out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from fleetscope.store import connect, migrate
from ingester.load import BatchLoader
from node_agent.batcher import Batch
from node_agent.shipper import LocalSink

log = logging.getLogger(__name__)


class LocalIngest:
    """Owns the embedded store's client for `fleetscope run`."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.counters: Counter[str] = Counter()

    @classmethod
    async def open(cls, dsn: str) -> LocalIngest:
        client = await asyncio.to_thread(connect, dsn)
        await asyncio.to_thread(migrate, client)
        return cls(BatchLoader(client))

    async def load(self, batch: Batch) -> None:
        decoded = self.loader.decode(batch.stream, batch.payload)
        loaded = await asyncio.to_thread(self.loader.insert, decoded)
        self.counters["batches_inserted"] += 1
        self.counters["rows_inserted"] += loaded.rows_written

    def sink(self) -> LocalSink:
        return LocalSink(self.load)

    def close(self) -> None:
        self.loader.close()
