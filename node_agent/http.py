"""The agent's own HTTP endpoints: /status (JSON, what `fleetscope agent --status` prints)
and /healthz (200 ready / 503 degraded with the reason), on a loopback port by default."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

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
                "rows_shipped": sink[f"{stream}.rows_shipped"],
                "rows_dropped": sink[f"{stream}.rows_dropped"],
            }
        return {
            "node": agent.batcher.node.host_name,
            "uptime_s": time.monotonic() - self.started,
            "loader": agent.settings.loader,
            "probes": [
                {"name": p.name, "running": p.running, "reason": p.reason, "log": p.log, "streams": list(p.streams)}
                for p in agent.status.values()
            ],
            "streams": streams,
        }

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.document())

    async def _healthz(self, _: web.Request) -> web.Response:
        problems = [f"probe {p.name} disabled" for p in self.agent.status.values() if not p.running]
        if not getattr(self.agent.sink, "connected", True):
            problems.append("broker unreachable: batches are queued")
        if problems:
            return web.Response(status=503, text="degraded: " + "; ".join(problems) + "\n")
        return web.Response(text="ready\n")
