"""The node agent: probes -> ring buffers -> batcher -> sink.

Ring buffers are drained in bulk when the kernel wakes their reader (the BPF side forces a
wakeup only once `wakeup_bytes`, half the ring, are waiting) and on a short tick, so low
event rates still ship within the batch age bound.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetscope.codec import pack_strings, string_dictionary
from fleetscope.config import AgentOptions
from node_agent import capabilities
from node_agent.batcher import Batcher, node_identity
from node_agent.bcc_loader import BccProbe, load_selected, resolve_loader
from node_agent.cgroups import CgroupResolver
from node_agent.columns import ColumnBuilder, Records
from node_agent.errors import ProbeError
from node_agent.histogram import HistogramReader, collect, take
from node_agent.http import StatusServer
from node_agent.loader import LoadedProbe, cgroup2_mount, lent_maps, mark_joined
from node_agent.probes import Stream, all_probes
from node_agent.redact import Redactor
from node_agent.shipper import LOSS_REASONS, NODE_LOSS_COUNTERS, BatchSink

log = logging.getLogger(__name__)

TICK_SECONDS = 0.1
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")


def check_host(loader: str = "libbpf") -> None:
    """Say in one line what this machine lacks for the probes, before trying to load."""
    if resolve_loader(loader) == "libbpf" and not VMLINUX_BTF.exists():
        raise ProbeError(
            f"this kernel has no BTF ({VMLINUX_BTF} is missing): the CO-RE probes need a kernel "
            "built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.4 are); "
            "or load them through bcc: --loader=bcc (or auto)"
        )
    lacking = capabilities.missing()
    if lacking:
        raise ProbeError(
            f"missing capabilities {', '.join(lacking)} (the agent needs CAP_BPF and CAP_PERFMON, nothing else; "
            "CAP_SYS_ADMIN on kernels before 5.8): run the agent as root, or grant them (systemd "
            "AmbientCapabilities=CAP_BPF CAP_PERFMON, or setcap cap_bpf,cap_perfmon+ep on the interpreter)"
        )


STATS_STREAM = "pipeline_stats"
REPORT_ROUNDS = 4  # report, then the loss its own spooling caused (see report_stats)
# One row per (stage, stream, counter) of a report; strings are bounded fixed fields.
STATS_DTYPE = np.dtype(
    [("time", "<u8"), ("value", "<u8"), ("stage", "S16"), ("component", "S48"), ("stream", "S48"),
     ("counter", "S48")]
)  # fmt: skip


def stats_columns(records: Records, offset_ns: int) -> dict[str, np.ndarray]:
    """pipeline_stats rows are built in user space with wall-clock times already."""
    return {name: records[name] for name in ("time", "stage", "component", "stream", "counter", "value")}


@dataclass
class ProbeStatus:
    """What the agent reports per probe: running, or disabled with the reason."""

    name: str
    running: bool
    reason: str = ""
    streams: tuple[str, ...] = ()
    log: str = ""  # libbpf's output (the verifier log) when it failed to load


@dataclass
class AgentStats:
    """Counters for the status line and the logs, per stream."""

    records_read: Counter[str] = field(default_factory=Counter)
    kernel_emitted: Counter[str] = field(default_factory=Counter)
    kernel_dropped: Counter[str] = field(default_factory=Counter)
    rows_redacted: Counter[str] = field(default_factory=Counter)  # rows whose secrets were masked


class Agent:
    """Owns the loaded probes, the batcher and the drain loop; hands batches to a sink."""

    def __init__(self, settings: AgentOptions, sink: BatchSink) -> None:
        self.settings = settings
        self.sink = sink
        self._builders: dict[str, ColumnBuilder] = {STATS_STREAM: stats_columns}
        self._narrow: dict[str, tuple[tuple[str, str], ...]] = {}  # Stream.narrow of each stream that has one
        self._reported: dict[tuple[str, str, str], int] = {}
        # container id, pod UID and runtime of each event's cgroup (node_agent/cgroups.py)
        self.cgroups = CgroupResolver(cgroup2_mount(), settings.cgroup_cache_entries)
        self.batcher = Batcher(
            node_identity(settings.node), self._builders,
            settings.batch_max_rows, settings.batch_max_bytes, settings.batch_max_age, self.cgroups,
            compress=sink.compresses,
        )  # fmt: skip
        self.stats = AgentStats()
        self.redactor = Redactor(settings.redact_patterns)  # secrets in command lines (redact.py)
        self.status: dict[str, ProbeStatus] = {}
        self._probes: list[LoadedProbe | BccProbe] = []
        self._tick: asyncio.Task[None] | None = None
        self._hist_tick: asyncio.Task[None] | None = None
        self._http: StatusServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeups: select.epoll | None = None  # the rings' fds, edge-triggered (_watch)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load every configured probe; one that fails is disabled alone, with its reason."""
        check_host(self.settings.loader)
        self._loop = asyncio.get_running_loop()
        await self.sink.start()
        # a probe that borrows maps (Probe.borrows: the process probe's exit reads oom_kills'
        # and fatal_signals' maps) loads after the configured probes that lend them
        known = {n: p for n, p in all_probes().items() if n in self.settings.probes}
        lent = {m for p in known.values() for m, _ in p.lends}
        borrowers = {n for n, p in known.items() if any(m in lent for m, _ in p.borrows)}
        for name in sorted(self.settings.probes, key=lambda n: n in borrowers):
            try:
                probe = load_selected(name, self.settings, reuse=lent_maps(self._probes))
                if isinstance(probe, LoadedProbe) and probe.borrowed:
                    mark_joined(probe, self._probes)
            except ProbeError as e:
                self.status[name] = ProbeStatus(name, False, str(e).splitlines()[0], log=getattr(e, "log", ""))
                log.error("probe %s disabled: %s", name, e)
                continue
            self._probes.append(probe)
            self._builders.update({s.name: self._redacting(s) for s in probe.probe.streams})
            self._narrow.update({s.name: s.narrow for s in probe.probe.streams if s.narrow})
            self._builders.update({h.name: h.columns for h in probe.probe.histograms})
            streams = (*probe.rings, *(h.name for h in probe.probe.histograms))
            self.status[name] = ProbeStatus(name, True, streams=streams)
            for ring in probe.rings.values():
                self._watch(ring.fileno())
            loader = "bcc" if isinstance(probe, BccProbe) else "libbpf"
            log.info("probe %s running (%s): %s", name, loader, ", ".join(streams))
        if not self._probes:
            self._unwatch()
            await self.sink.stop(0)
            reasons = "; ".join(f"{s.name}: {s.reason}" for s in self.status.values())
            raise ProbeError(f"no probe could be loaded ({reasons})")
        self._tick = asyncio.create_task(self._ticker(), name="agent-tick")
        self._tick.add_done_callback(self._died)
        if self.settings.status_listen != "off":
            self._http = StatusServer(self, self.settings.status_listen)
            await self._http.start()
        if self._histogram_readers():
            self._hist_tick = asyncio.create_task(self._histogram_ticker(), name="agent-histograms")
            self._hist_tick.add_done_callback(self._died)

    def _watch(self, ring_fd: int) -> None:
        """Drain when the kernel wakes the ring's reader. A ring fd polls readable whenever
        a record is waiting, so the event loop watching it directly drained a few records
        per loop iteration under load (~50 of a storm's exec records: numpy's per-call cost
        per drain outweighed the copying); edge-triggered in an epoll of their own, the fds
        report only the wakeups the BPF side forces past wakeup_bytes, and the tick does the rest.
        wakeup_bytes is half the ring: a drain costs ~100 us whatever it takes (the per-field
        copies and their set-up), so it takes thousands of records, and the other half leaves
        the reader ~100 ms at a storm's rate before the ring is full."""
        assert self._loop is not None
        if self._wakeups is None:
            self._wakeups = select.epoll()
            self._loop.add_reader(self._wakeups.fileno(), self._woken)
        self._wakeups.register(ring_fd, select.EPOLLIN | select.EPOLLET)

    def _woken(self) -> None:
        """A ring's reader was woken: take the (edge-triggered) wakeups, then drain all rings."""
        if self._wakeups is not None:
            self._wakeups.poll(0)
        self.drain()

    def _unwatch(self) -> None:
        if self._wakeups is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._wakeups.fileno())
            self._wakeups.close()
            self._wakeups = None

    def _redacting(self, stream: Stream) -> ColumnBuilder:
        """The stream's column builder, masking secrets in its command-line columns."""
        if not stream.redact or not self.redactor.patterns:
            return stream.columns

        def build(records: Records, offset_ns: int) -> dict[str, np.ndarray]:
            columns: dict[str, Any] = stream.columns(records, offset_ns)
            for name in stream.redact:
                # dictionary-encoded first, so redaction runs once per distinct value; the
                # column goes to encode_batch pre-encoded (data, offsets, index)
                entries, index = string_dictionary(columns[name])
                entries, index, redacted = self.redactor.redact_dictionary(entries, index)
                columns[name] = (*pack_strings(entries), index)
                self.stats.rows_redacted[stream.name] += redacted
            return columns

        return build

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("agent drain loop failed: %r", task.exception())

    async def _ticker(self) -> None:
        next_stats = time.monotonic() + self.settings.stats_interval
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.drain()
            for batch in self.batcher.due():
                self.sink.submit(batch)
            if time.monotonic() >= next_stats:
                next_stats += self.settings.stats_interval
                self.report_stats()

    def report_stats(self) -> None:
        """Ship the counters' increase since the last report as pipeline_stats batches.
        Spooling a report can evict older batches; that loss is reported at once (a report
        stays far smaller than a spool segment, so this ends), so the last report before a
        stop leaves no loss untold."""
        self.read_kernel_counters()
        for _ in range(REPORT_ROUNDS):
            if not self._report_increase():
                return

    def _report_increase(self) -> bool:
        """One pipeline_stats batch of what changed since the last; False if nothing did."""
        sink = self.sink.counters
        now: dict[tuple[str, str, str], int] = {}
        # losses with their reason (rows_dropped counts them all); the stats stream's own
        # too, and streams only a replayed spool knows (probes of an earlier run)
        for stream in {k.partition(".")[0] for k in sink if "." in k} | set(self._builders):
            for reason in LOSS_REASONS:
                for unit in ("rows", "batches"):
                    now["agent", stream, f"{unit}_{reason}"] = sink[f"{stream}.{unit}_{reason}"]
            if stream == STATS_STREAM:
                now["agent", stream, "rows_dropped"] = sink[f"{stream}.rows_dropped"]
                now["agent", stream, "batches_dropped"] = sink[f"{stream}.batches_dropped"]
        for counter in NODE_LOSS_COUNTERS:  # not of one stream: stream ''
            now["agent", "", counter] = sink[counter]
        for stream in self._builders:
            if stream == STATS_STREAM:
                continue
            now["kernel", stream, "emitted"] = self.stats.kernel_emitted[stream]
            now["kernel", stream, "dropped"] = self.stats.kernel_dropped[stream]
            now["agent", stream, "records_read"] = self.stats.records_read[stream]
            now["agent", stream, "rows_redacted"] = self.stats.rows_redacted[stream]
            for counter in ("rows_shipped", "batches_shipped", "rows_dropped", "batches_dropped"):
                now["agent", stream, counter] = sink[f"{stream}.{counter}"]
        deltas = [(key, value - self._reported.get(key, 0)) for key, value in now.items()]
        deltas = [(key, d) for key, d in deltas if d]
        self._reported = now
        if not deltas:
            return False
        records = np.zeros(len(deltas), STATS_DTYPE)
        records["time"] = time.time_ns()
        records["component"] = f"agent-{self.batcher.epoch:x}"
        records["stage"], records["stream"], records["counter"] = zip(*(k for k, _ in deltas), strict=True)
        records["value"] = [d for _, d in deltas]
        for batch in self.batcher.cut_now(STATS_STREAM, records):
            self.sink.submit(batch)
        return True

    def _histogram_readers(self) -> list[HistogramReader]:
        return [p.histograms for p in self._probes if isinstance(p, LoadedProbe) and p.histograms]

    async def _histogram_ticker(self) -> None:
        """Every histogram_interval, end the in-kernel histograms' interval and batch their
        rows. The read waits for an RCU grace period, so it runs in a thread."""
        deadline = time.monotonic()
        while True:
            deadline = max(deadline + self.settings.histogram_interval, time.monotonic())
            await asyncio.sleep(deadline - time.monotonic())
            await asyncio.to_thread(collect, self._histogram_readers())
            self.take_histograms()

    def take_histograms(self) -> None:
        """Move the histogram rows read so far into the batcher (one row per key and interval)."""
        for stream, rows in take(self._histogram_readers()):
            self.stats.records_read[stream] += len(rows)
            for batch in self.batcher.add(stream, rows):
                self.sink.submit(batch)

    def drain(self) -> None:
        """Move every committed record from the ring buffers into the batcher."""
        for probe in self._probes:
            for stream, ring in probe.rings.items():
                if not ring.pending_bytes():  # the tick finds most rings empty: nothing to set up
                    continue
                # straight from the ring into the batch's columns, only the bytes its char[N]
                # fields use: one copy per field
                read, batches = self.batcher.add_from(stream, ring.dtype, ring.drain_with, self._narrow.get(stream, ()))
                self.stats.records_read[stream] += read
                for batch in batches:
                    self.sink.submit(batch)

    def read_kernel_counters(self) -> None:
        for probe in self._probes:
            for stream, c in probe.stats().items():
                self.stats.kernel_emitted[stream] = c["emitted"]
                self.stats.kernel_dropped[stream] = c["dropped"]

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Detach probes, drain the rings, flush batches, then let the sink deliver them."""
        if self._tick is None and not self._probes:
            return
        started = time.monotonic()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        for task in (self._tick, self._hist_tick):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._tick = self._hist_tick = None
        for probe in self._probes:
            probe.detach()  # no new events; what is in the rings is still read below
        self.drain()
        if readers := self._histogram_readers():
            collect(readers)  # the last, partial interval (after a cancelled read's rows)
            self.take_histograms()
        self.read_kernel_counters()
        for batch in self.batcher.flush():
            self.sink.submit(batch)
        self.report_stats()
        self._unwatch()
        for probe in self._probes:
            probe.close()
        self._probes = []
        await self.sink.stop(max(0.0, drain_timeout - (time.monotonic() - started)))
