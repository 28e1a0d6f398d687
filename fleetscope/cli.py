"""The `fleetscope` command: run | agent | ingest | query | migrate.

Only this module turns errors into exit codes: 2 for bad configuration (the message
names the key and what is allowed), 1 for a component that cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fleetscope import __version__, config
from fleetscope.config import (
    AgentSettings,
    ConfigError,
    IngestSettings,
    MigrateSettings,
    QuerySettings,
    RunSettings,
)
from fleetscope.store import StoreError, connect, mask_dsn, migrate
from node_agent.errors import ProbeError

log = logging.getLogger("fleetscope")

COMMANDS: dict[str, tuple[type, str]] = {
    "run": (RunSettings, "single node: probes + ingester in one process, embedded ClickHouse"),
    "agent": (AgentSettings, "node agent: load probes, ship batches to Kafka"),
    "ingest": (IngestSettings, "ingester: consume batches from Kafka, load into ClickHouse"),
    "query": (QuerySettings, "run SQL against the store and print a table"),
    "migrate": (MigrateSettings, "apply ClickHouse migrations (idempotent)"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="fleetscope",
        description="Fleet telemetry from the kernel: eBPF -> Kafka -> ClickHouse. Every flag "
        "also reads the environment variable and config-file key shown in its help.",
    )
    top.add_argument("--version", action="version", version=f"fleetscope {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text}. {cls.__doc__ or ''}")
        config.add_arguments(p, cls)
        if name == "query":
            p.add_argument(
                "sql", metavar="SQL", help='the query, e.g. "SELECT count() FROM fleet.process_exec"'
            )
    return top


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def wait_stop(stop: asyncio.Event, duration: float) -> None:
    if duration > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
    else:
        await stop.wait()


# --- commands -------------------------------------------------------------------------


async def cmd_agent(s: AgentSettings) -> int:
    from node_agent.agent import Agent
    from node_agent.shipper import KafkaSink
    from node_agent.status import StatusReporter

    stop = asyncio.Event()
    install_stop_signals(stop)
    agent = Agent(s, KafkaSink(s.brokers, s.topic_prefix))
    await agent.start()
    reporter = StatusReporter(agent, None, "log", s.status_interval)
    try:
        async with reporter:
            await stop.wait()
    finally:
        log.info("stopping: detaching probes, draining rings, flushing batches")
        await agent.stop()
        reporter.report(final=True)
    return 0


async def cmd_ingest(s: IngestSettings) -> int:
    from ingester.app import Ingester

    stop = asyncio.Event()
    install_stop_signals(stop)
    ingester = Ingester(s)
    watcher = asyncio.create_task(_forward_stop(stop, ingester.request_stop))
    try:
        await ingester.start()
        await ingester.run()
    finally:
        watcher.cancel()
        await ingester.stop()
        counters = ("batches_inserted", "rows_inserted", "batches_duplicate", "batches_dead_lettered")
        totals = {c: ingester.stats.total(c) for c in counters}
        log.info("ingester stopped: %s %s", totals, dict(sorted(ingester.counters.items())))
    return 0


async def _forward_stop(stop: asyncio.Event, request: Any) -> None:
    await stop.wait()
    request()


async def cmd_run(s: RunSettings) -> int:
    from ingester.local import LocalIngest
    from node_agent.agent import Agent
    from node_agent.status import StatusReporter

    stop = asyncio.Event()
    install_stop_signals(stop)
    local = await LocalIngest.open(s.clickhouse, s.stats_interval)
    try:
        agent = Agent(s, local.sink())
        await agent.start()
        mode = s.status if s.status != "auto" else ("line" if sys.stderr.isatty() else "log")
        reporter = StatusReporter(agent, local, mode, 1.0 if mode == "line" else s.status_interval)
        try:
            async with reporter:
                await wait_stop(stop, s.duration)
        finally:
            await agent.stop()
            reporter.report(final=True)
    finally:
        local.close()
    print(f"data in {s.data_dir}; try: fleetscope query --data-dir {s.data_dir} "
          "\"SELECT comm, count() FROM fleet.process_exec GROUP BY comm ORDER BY 2 DESC LIMIT 10\"",
          file=sys.stderr)  # fmt: skip
    return 0


def cmd_migrate(s: MigrateSettings) -> int:
    client = connect(s.clickhouse)
    applied = migrate(client)
    print(f"{mask_dsn(s.clickhouse)}: applied {len(applied)} migration(s)"
          + "".join(f"\n  {m.version:04d}_{m.name}" for m in applied))  # fmt: skip
    return 0


def cmd_query(s: QuerySettings, sql: str) -> int:
    client = connect(s.dsn)
    res = client.query(sql)
    names, rows = list(res.column_names), res.result_rows
    if s.format == "json":
        for r in rows:
            print(json.dumps(dict(zip(names, r, strict=True)), default=str))
    elif s.format == "tsv":
        print("\t".join(names))
        for r in rows:
            print("\t".join(str(v) for v in r))
    else:
        print(render_table(names, rows))
    return 0


def render_table(names: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """A plain text table, numbers right-aligned, long cells cut with an ellipsis."""

    def cell(v: Any) -> str:
        text = str(v).replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cell(v) for v in r] for r in rows]
    numeric = [all(isinstance(r[i], int | float) for r in rows) and bool(rows) for i in range(len(names))]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        )

    out = [line(list(names)), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(s.rstrip() for s in out)


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    command = args.pop("command")
    sql = args.pop("sql", None)
    cls = COMMANDS[command][0]
    try:
        settings = config.build(cls, args, config.environ())
    except ConfigError as e:
        print(f"fleetscope {command}: configuration error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.Formatter.converter = time.gmtime
    try:
        if command == "query":
            return cmd_query(settings, sql)
        if command == "migrate":
            return cmd_migrate(settings)
        runners: dict[str, Callable[[Any], Coroutine[Any, Any, int]]] = {
            "run": cmd_run, "agent": cmd_agent, "ingest": cmd_ingest,
        }  # fmt: skip
        return asyncio.run(runners[command](settings))
    except ConfigError as e:
        print(f"fleetscope {command}: configuration error: {e}", file=sys.stderr)
        return 2
    except ProbeError as e:
        print(f"fleetscope {command}: {e}", file=sys.stderr)
        return 1
    except (StoreError, OSError) as e:
        print(f"fleetscope {command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
