"""The ingester's health and its HTTP endpoints: /healthz (200 ready, 503 degraded with the
reasons) and /metrics (Prometheus text: every loss counter, consumer lag, in-flight bytes,
paused partitions, insert latency), on a loopback port by default (`health_listen`)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from fleetscope.metrics import CONTENT_TYPE, Exposition

if TYPE_CHECKING:
    from ingester.app import Ingester

log = logging.getLogger(__name__)


class Health:
    """Named problems with the time each started; the ingester is ready when there are none."""

    def __init__(self) -> None:
        self._problems: dict[str, tuple[float, str]] = {}

    def fail(self, key: str, text: str) -> None:
        """Record (or update the text of) a problem; its start time stays the first one's."""
        since = self._problems.get(key, (time.monotonic(), ""))[0]
        self._problems[key] = (since, text)

    def ok(self, key: str) -> bool:
        """Clear a problem; True if there was one."""
        return self._problems.pop(key, None) is not None

    def since(self, key: str) -> float | None:
        """Seconds the problem has lasted (None: not a problem now)."""
        entry = self._problems.get(key)
        return None if entry is None else time.monotonic() - entry[0]

    @property
    def ready(self) -> bool:
        return not self._problems

    def reasons(self) -> list[str]:
        now = time.monotonic()
        return [f"{text} (for {now - since:.0f}s)" for since, text in self._problems.values()]


# (counter in IngestStats, help) rendered per stream; the loss counters among them are what
# pipeline_loss sums (dead-lettered) or what an operator alerts on (duplicates, unenriched).
_STREAM_COUNTERS = (
    ("batches_decoded", "batches decoded"),
    ("batches_inserted", "batches whose rows ClickHouse acknowledged"),
    ("rows_inserted", "rows ClickHouse wrote (deduplicated batches write none)"),
    ("batches_duplicate", "batches ClickHouse deduplicated (redelivered after a crash or rebalance)"),
    ("batches_dead_lettered", "batches sent to the dead-letter topic (lost to the tables, counted)"),
    ("rows_unenriched", "rows stored without their pod metadata"),
    ("values_truncated", "string values cut to 64 KiB (codec.MAX_STRING_BYTES) before they were stored"),
    ("spans_written", "spans written to otel_traces"),
)


class HealthServer:
    """Serves /healthz and /metrics; a port already taken is logged, never fatal."""

    def __init__(self, ingester: Ingester, listen: str) -> None:
        self.ingester, self.listen = ingester, listen
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self.listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as e:
            log.error("health endpoint not served: cannot listen on %s (%s); set health_listen", self.listen, e)
            await runner.cleanup()
            return
        self._runner = runner
        self.port = site.port  # the bound one, for port 0
        log.info("ingester health at http://%s:%d/healthz and /metrics", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        health = self.ingester.health
        if health.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="degraded: " + "; ".join(health.reasons()) + "\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=(await self.render()).encode(), headers={"Content-Type": CONTENT_TYPE})

    async def render(self) -> str:
        ing = self.ingester
        m = Exposition("fleetscope_ingester")
        m.gauge("ready", "1 when /healthz says ready, 0 when degraded", int(ing.health.ready))
        per_stream: dict[tuple[str, str], int] = {}
        for (_, stream, counter), value in ing.stats.counts.items():
            per_stream[stream, counter] = per_stream.get((stream, counter), 0) + value
        streams = sorted({s for s, _ in per_stream} | set(ing.stream_names))
        for counter, help_text in _STREAM_COUNTERS:
            for stream in streams:
                m.counter(counter, help_text, per_stream.get((stream, counter), 0), {"stream": stream})
        for kind, value in sorted(ing.dead_letters.by_kind.items()):
            m.counter("dead_lettered_by_kind", "batches dead-lettered, by why (malformed, oversized, "
                      "unknown-version, unknown-topic)", value, {"kind": kind})  # fmt: skip
        for name, help_text in (
            ("insert_retries", "failed ClickHouse inserts that were retried (offsets not committed meanwhile)"),
            ("clickhouse_retries", "failed attempts to open the store at start"),
            ("kafka_retries", "failed attempts to connect to Kafka at start"),
            ("poll_errors", "errors fetching from Kafka (retried)"),
            ("commits", "offset commits"),
            ("commit_failures", "offset commits refused (partition moved in a rebalance: its batches come again)"),
            ("pauses", "times fetching paused at the in-flight bound"),
            ("releases", "times the partitions were given up after inserts failed for max_poll_interval"),
            ("rebalances", "partition revocations"),
        ):
            m.counter(name, help_text, ing.counters[name])
        m.counter("dlq_retries", "failed sends to the dead-letter topic (retried)", ing.dead_letters.retries)
        m.counter("k8s_batches_waited", "batches held back (at most k8s_resolve_wait) for pods the Kubernetes "
                  "watch was about to deliver; never while the watch is down", ing.enricher.waited_batches)  # fmt: skip
        m.gauge("in_flight_bytes", "bytes of Kafka messages fetched and not yet stored or dead-lettered",
                ing.in_flight.bytes)  # fmt: skip
        m.gauge("in_flight_messages", "Kafka messages fetched and not yet stored or dead-lettered", len(ing.in_flight))
        limit = ing.settings.max_in_flight_bytes
        m.gauge("in_flight_limit_bytes", "max_in_flight_bytes: fetching pauses at this bound", limit)
        m.gauge("partitions_assigned", "partitions this member owns", len(ing.assigned))
        m.gauge("partitions_paused", "assigned partitions whose fetching is paused", len(ing.paused))
        m.gauge("dead_letters_pending", "dead-letter sends not yet acknowledged", ing.dead_letters.pending)
        failing = ing.health.since("insert")
        m.gauge("insert_failing_seconds", "how long inserts have been failing (0: they succeed)", failing or 0)
        m.histogram("insert_seconds", "time ClickHouse took to acknowledge a batch (rows, batch record, spans)",
                    ing.insert_latency)  # fmt: skip
        for tp, lag in sorted((await ing.lag()).items()):
            labels = {"topic": tp.topic, "partition": str(tp.partition)}
            m.gauge("consumer_lag", "messages of the partition not yet committed by the group (log end - committed)",
                    lag, labels)  # fmt: skip
        return m.render()
