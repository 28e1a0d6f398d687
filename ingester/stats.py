"""The ingester's counters per source node and event kind, written to fleet.pipeline_stats
as increases since the previous write (the same shape the agents ship their counters in)."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter

import numpy as np

from ingester.load import BatchLoader

STAGE = "ingester"


class IngestStats:
    """Counts (node, stream, counter) and writes the increases every interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.component = f"ingester-{socket.gethostname()}-{os.getpid()}"
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self._written: Counter[tuple[str, str, str]] = Counter()
        self._next = time.monotonic() + interval

    def add(self, node: str, stream: str, counter: str, n: int = 1) -> None:
        self.counts[node, stream, counter] += n

    def total(self, counter: str) -> int:
        return sum(v for (_, _, c), v in self.counts.items() if c == counter)

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def write(self, loader: BatchLoader) -> None:
        """Insert the increases since the last write (blocking: run it in a worker thread)."""
        self._next = time.monotonic() + self.interval
        # the values as of now: counting goes on (in the event loop) while this thread inserts
        now = [(k, v) for k, v in list(self.counts.items()) if v != self._written[k]]
        deltas = [(k, v - self._written[k]) for k, v in now]
        if not deltas:
            return
        keys = [k for k, _ in deltas]
        n = len(keys)
        columns = {
            "time": np.full(n, time.time_ns(), "<i8"),
            "node": np.array([k[0] for k in keys], dtype=object),
            "stage": np.full(n, STAGE, dtype=object),
            "component": np.full(n, self.component, dtype=object),
            "stream": np.array([k[1] for k in keys], dtype=object),
            "counter": np.array([k[2] for k in keys], dtype=object),
            "value": np.array([d for _, d in deltas], "<u8"),
        }
        loader.insert_columns("pipeline_stats", columns)
        for k, v in now:
            self._written[k] = v
