"""The agent's live status: one line on a terminal, or a log line every interval."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Protocol

from node_agent.agent import Agent

if TYPE_CHECKING:
    from ingester.stats import IngestStats

log = logging.getLogger("fleetscope.status")


class HasStats(Protocol):
    stats: IngestStats


class StatusReporter:
    """Events/s per kind, rows written, drops (kernel ring buffer and agent queue)."""

    def __init__(self, agent: Agent, ingest: HasStats | None, mode: str, interval: float) -> None:
        self.agent, self.ingest, self.mode, self.interval = agent, ingest, mode, interval
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[float, Counter[str]] = (time.monotonic(), Counter())

    async def __aenter__(self) -> StatusReporter:
        if self.mode != "off":
            self._task = asyncio.create_task(self._run(), name="status")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.report()

    def line(self) -> str:
        self.agent.read_kernel_counters()
        st = self.agent.stats
        now = time.monotonic()
        then, before = self._last
        rates = (
            " ".join(f"{s}={(n - before[s]) / max(now - then, 1e-9):.0f}/s" for s, n in sorted(st.records_read.items()))
            or "no events yet"
        )
        self._last = (now, Counter(st.records_read))
        sink = self.agent.sink.counters
        shipped = sum(v for k, v in sink.items() if k.endswith(".rows_shipped"))
        agent_drop = sum(v for k, v in sink.items() if k.endswith(".rows_dropped"))
        kernel_drop = sum(st.kernel_dropped.values())
        written = f" | rows written {self.ingest.stats.total('rows_inserted')}" if self.ingest else ""
        disabled = [p.name for p in self.agent.status.values() if not p.running]
        off = f" | disabled: {','.join(disabled)}" if disabled else ""
        spool = ""
        status = getattr(self.agent.sink, "status", None)
        if status is not None:
            sp = status()
            evicted = sum(v for k, v in sink.items() if k.endswith(".rows_spool_evicted"))
            spool = (f" | spool {sp['batches']} batches {sp['bytes'] / 2**20:.1f} MiB"
                     f"{'' if sp['connected'] else ' (broker unreachable)'} evicted rows {evicted}")  # fmt: skip
        return (f"{rates} | rows shipped {shipped}{written} | drops kernel {kernel_drop} "
                f"agent {agent_drop}{spool}{off}")  # fmt: skip

    def report(self, final: bool = False) -> None:
        text = self.line()
        if self.mode == "line" and not final:
            sys.stderr.write("\r\x1b[2K" + text)
            sys.stderr.flush()
        elif self.mode != "off":
            if self.mode == "line":
                sys.stderr.write("\n")
            log.info("%s%s", "final: " if final else "", text)
