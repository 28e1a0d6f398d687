"""The agent's own HTTP endpoints: /status (JSON, what `fleetscope agent --status` prints),
/healthz (200 ready / 503 degraded with the reason) and /metrics (Prometheus text), on a
loopback port by default."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from fleetscope.metrics import CONTENT_TYPE, Exposition
from node_agent.shipper import LOSS_REASONS, NODE_LOSS_COUNTERS

if TYPE_CHECKING:
    from node_agent.agent import Agent

log = logging.getLogger(__name__)


class StatusServer:
    """Serves the agent's status; a port already taken is logged, never fatal to the agent."""

    def __init__(self, agent: Agent, listen: str) -> None:
        self.agent, self.listen = agent, listen
        self.started = time.monotonic()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self.listen.rpartition(":")
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
        except OSError as e:
            log.error("status endpoint not served: cannot listen on %s (%s); set status_listen", self.listen, e)
            await runner.cleanup()
            return
        self._runner = runner
        log.info("agent status at http://%s/status", self.listen)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def document(self) -> dict[str, Any]:
        """Probes (running, or disabled with reason and verifier log) and per-stream counters."""
        agent = self.agent
        agent.read_kernel_counters()
        st, sink = agent.stats, agent.sink.counters
        streams: dict[str, dict[str, int]] = {}
        for stream in sorted({*st.records_read, *st.kernel_emitted}):
            streams[stream] = {
                "kernel_emitted": st.kernel_emitted[stream],
                "kernel_dropped": st.kernel_dropped[stream],
                "records_read": st.records_read[stream],
                "rows_redacted": st.rows_redacted[stream],
                "rows_batching": agent.batcher.batching(stream),  # read, in a batch not yet cut
                "rows_shipped": sink[f"{stream}.rows_shipped"],
                "rows_dropped": sink[f"{stream}.rows_dropped"],
            }
            # rows_dropped by reason (rows_spool_evicted, ...), where there were any
            streams[stream].update({f"rows_{r}": sink[f"{stream}.rows_{r}"] for r in LOSS_REASONS
                                    if sink[f"{stream}.rows_{r}"]})  # fmt: skip
        extra: dict[str, Any] = {}
        spool_status = getattr(agent.sink, "status", None)
        if spool_status is not None:  # KafkaSink: the disk spool and the producer
            extra["spool"] = {**spool_status(), **{c: sink[c] for c in NODE_LOSS_COUNTERS}}
        return {
            "node": agent.batcher.node.host_name,
            "uptime_s": time.monotonic() - self.started,
            "loader": agent.settings.loader,
            "probes": [
                {"name": p.name, "running": p.running, "reason": p.reason, "log": p.log, "streams": list(p.streams)}
                for p in agent.status.values()
            ],
            "streams": streams,
            **extra,
        }

    def metrics(self) -> str:
        """Prometheus text: the kernel's and the agent's counters per stream, every counter of
        the sink (shipped, and the losses by reason: <stream>.rows_<reason>), the node-wide
        loss counters, and the spool's and producer's gauges where the sink has them."""
        agent = self.agent
        agent.read_kernel_counters()
        st, sink = agent.stats, agent.sink.counters
        m = Exposition("fleetscope_agent")
        m.gauge("probes_running", "probes loaded and attached", sum(p.running for p in agent.status.values()))
        m.gauge("probes_disabled", "probes that failed to load or attach (see /status)",
                sum(not p.running for p in agent.status.values()))  # fmt: skip
        for name, counts, help_text in (
            ("kernel_emitted", st.kernel_emitted, "records the probe produced in the kernel"),
            ("kernel_dropped", st.kernel_dropped, "records lost in the kernel: ring buffer or map full (loss)"),
            ("records_read", st.records_read, "records the agent read from the ring buffers"),
            ("rows_redacted", st.rows_redacted, "rows whose argument values were redacted"),
        ):
            for stream in sorted(counts):
                m.counter(name, help_text, counts[stream], {"stream": stream})
        for key in sorted(sink):  # "<stream>.<counter>" per stream, plain names node-wide
            stream, _, counter = key.rpartition(".")
            loss = counter.startswith(("rows_", "batches_")) and not counter.endswith("shipped")
            help_text = "sink counter" + (" (loss, by reason)" if loss else "")
            m.counter(counter, help_text, sink[key], {"stream": stream} if stream else None)
        spool_status = getattr(agent.sink, "status", None)
        if spool_status is not None:  # KafkaSink: the disk spool and the producer
            for key, value in sorted(spool_status().items()):
                if isinstance(value, bool | int | float):
                    m.gauge(f"spool_{key}", f"spool and producer: {key} (see /status)", float(value))
        return m.render()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.document())

    async def _healthz(self, _: web.Request) -> web.Response:
        problems = [f"probe {p.name} disabled" for p in self.agent.status.values() if not p.running]
        if not getattr(self.agent.sink, "connected", True):
            problems.append("broker unreachable: batches are spooled")
        spool_status = getattr(self.agent.sink, "status", None)
        if spool_status is not None and spool_status()["evicting"]:
            problems.append("spool full: the oldest batches are evicted (rows_spool_evicted)")
        if problems:
            return web.Response(status=503, text="degraded: " + "; ".join(problems) + "\n")
        return web.Response(text="ready\n")
