"""Single-node hand-over: the agent's batches go straight to the ingester's loader.

The encoded bytes still go through decode and the same columnar insert as in fleet
mode; only Kafka is left out.
"""

from __future__ import annotations

import asyncio
import logging

from fleetscope.store import connect, migrate
from ingester.load import BatchLoader
from ingester.stats import IngestStats
from node_agent.batcher import Batch
from node_agent.shipper import LocalSink

log = logging.getLogger(__name__)


class LocalIngest:
    """Owns the embedded store's client for `fleetscope run`."""

    def __init__(self, loader: BatchLoader, stats_interval: float) -> None:
        self.loader = loader
        self.stats = IngestStats(stats_interval)

    @classmethod
    async def open(cls, dsn: str, stats_interval: float) -> LocalIngest:
        client = await asyncio.to_thread(connect, dsn)
        await asyncio.to_thread(migrate, client)
        return cls(BatchLoader(client), stats_interval)

    async def load(self, batch: Batch) -> None:
        decoded = self.loader.decode(batch.stream, batch.payload)
        node = decoded.header.node.host_name
        self.stats.add(node, batch.stream, "batches_decoded")
        loaded = await asyncio.to_thread(self.loader.insert, decoded)
        self.stats.add(node, batch.stream, "batches_inserted")
        self.stats.add(node, batch.stream, "rows_inserted", loaded.rows_written)
        self.stats.add(node, batch.stream, "batches_duplicate", int(loaded.duplicate))
        if self.stats.due():
            await asyncio.to_thread(self.stats.write, self.loader)

    def sink(self) -> LocalSink:
        return LocalSink(self.load)

    def close(self) -> None:
        """Write the last counters, then release the store."""
        self.stats.write(self.loader)
        self.loader.close()
