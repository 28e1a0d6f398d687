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
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetscope import __version__, config, malloc
from fleetscope.config import (
    AgentSettings,
    CheckSettings,
    ConfigError,
    IngestSettings,
    MigrateSettings,
    QuerySettings,
    RunSettings,
    ServeSqlSettings,
)
from fleetscope.errors import StoreError
from node_agent.errors import ProbeError

if TYPE_CHECKING:
    from fleetscope.sqlserver import SqlServer

log = logging.getLogger("fleetscope")

COMMANDS: dict[str, tuple[type, str]] = {
    "run": (RunSettings, "single node: probes + ingester in one process, embedded ClickHouse"),
    "agent": (AgentSettings, "node agent: load probes, ship batches to Kafka"),
    "ingest": (IngestSettings, "ingester: consume batches from Kafka, load into ClickHouse"),
    "query": (QuerySettings, "run SQL against the store and print a table"),
    "migrate": (MigrateSettings, "apply ClickHouse migrations (idempotent)"),
    "serve-sql": (ServeSqlSettings, "serve the ClickHouse HTTP interface over an embedded store"),
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
        if name == "agent":
            actions = p.add_mutually_exclusive_group()
            actions.add_argument(
                "--check", dest="action_check", action="store_true", default=argparse.SUPPRESS,
                help="print which probes can load on this kernel with which loader, and why not; then exit",
            )  # fmt: skip
            actions.add_argument(
                "--status", dest="action_status", action="store_true", default=argparse.SUPPRESS,
                help="print the status of the agent running on this machine (from its status_listen); then exit",
            )  # fmt: skip
        if name == "query":
            p.add_argument("sql", metavar="SQL", help='the query, e.g. "SELECT count() FROM fleet.process_exec"')
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
    from fleetscope.kafka_security import KafkaAuth
    from fleetscope.otel import PipelineTracer
    from node_agent.agent import Agent
    from node_agent.shipper import KafkaSink
    from node_agent.status import StatusReporter

    stop = asyncio.Event()
    install_stop_signals(stop)
    tracer = PipelineTracer.from_settings("fleetscope-agent", s.otlp_protocol, s.trace_sample_ratio)
    sink = KafkaSink(s.brokers, s.topic_prefix, s.spool_dir, s.spool_max_bytes, tracer=tracer, auth=KafkaAuth(s))
    agent = Agent(s, sink)
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
        counters = ("batches_inserted", "rows_inserted", "batches_duplicate", "batches_dead_lettered",
                    "rows_unenriched")  # fmt: skip
        totals = {c: ingester.stats.total(c) for c in counters}
        log.info("ingester stopped: %s %s", totals, dict(sorted(ingester.counters.items())))
    return 0


async def _forward_stop(stop: asyncio.Event, request: Any) -> None:
    await stop.wait()
    request()


async def cmd_run(s: RunSettings) -> int:
    from fleetscope.otel import PipelineTracer
    from ingester.local import LocalIngest
    from node_agent.agent import Agent
    from node_agent.status import StatusReporter

    stop = asyncio.Event()
    install_stop_signals(stop)
    local = await LocalIngest.open(s.clickhouse, s.stats_interval, s, spans=s, tracing=s)
    sql_server = None
    try:
        if s.sql_listen != "off":
            from fleetscope.sqlserver import SqlServerError

            sql_server = sql_server_for(s, s.data_dir, s.sql_listen)
            try:
                await sql_server.start()
            except SqlServerError as e:
                print(f"fleetscope run: {e}, or turn it off with --sql-listen off", file=sys.stderr)
                return 1
        agent = Agent(s, local.sink(PipelineTracer.from_settings("fleetscope-agent", s.otlp_protocol,
                                                                 s.trace_sample_ratio)))  # fmt: skip
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
        if sql_server is not None:
            await sql_server.stop()
        await local.stop()
        local.close()
    print(f"data in {s.data_dir}; try: fleetscope query --data-dir {s.data_dir} "
          "\"SELECT comm, count() FROM fleet.process_exec GROUP BY comm ORDER BY 2 DESC LIMIT 10\"",
          file=sys.stderr)  # fmt: skip
    return 0


def sql_server_for(s: config.SqlAccess, data_dir: Path, listen: str) -> SqlServer:
    """The ClickHouse HTTP interface for `run` or `serve-sql`, from their settings."""
    from fleetscope.sqlserver import ServerOptions, SqlServer

    host, _, port = listen.rpartition(":")
    options = ServerOptions(host.strip("[]"), int(port), s.sql_user, s.sql_secret(), s.sql_read_only,
                            s.sql_max_queries)  # fmt: skip
    return SqlServer(str(data_dir), options)


async def cmd_serve_sql(s: ServeSqlSettings) -> int:
    from fleetscope.sqlserver import SqlServerError

    stop = asyncio.Event()
    install_stop_signals(stop)
    server = sql_server_for(s, s.data_dir, s.listen)
    try:
        await server.start()
    except SqlServerError as e:
        print(f"fleetscope serve-sql: {e}", file=sys.stderr)
        return 1
    try:
        await stop.wait()
    finally:
        log.info("stopping the SQL interface: %s", dict(sorted(server.counters.items())))
        await server.stop()
    return 0


def cmd_agent_check(s: CheckSettings) -> int:
    from node_agent.check import check

    lines, code = check(s)
    print("\n".join(lines))
    return code


def cmd_agent_status(s: CheckSettings) -> int:
    """Fetch and print a running agent's /status: probes running or disabled, with reasons."""
    if s.status_listen == "off":
        raise ConfigError("status_listen: is off, so no agent status can be read; set it to HOST:PORT")
    url = f"http://{s.status_listen}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = json.load(resp)
    except OSError as e:
        print(f"fleetscope agent: no agent answers at {url} ({e}); is `fleetscope agent` running?", file=sys.stderr)
        return 1
    print(render_status(status))
    return 0 if all(p["running"] for p in status["probes"]) else 1


def render_status(status: dict[str, Any]) -> str:
    """The agent's /status document as text, verifier logs indented under their probe."""
    out = [f"agent {status['node']} up {status['uptime_s']:.0f}s, loader {status['loader']}"]
    for p in status["probes"]:
        state = "running" if p["running"] else "DISABLED"
        out.append(f"  {p['name']:<20} {state:<9} {', '.join(p['streams']) if p['running'] else p['reason']}")
        out += [f"      | {line}" for line in p.get("log", "").splitlines()[-20:]]
    for stream, c in sorted(status["streams"].items()):
        out.append(f"  {stream:<20} " + " ".join(f"{k}={v}" for k, v in sorted(c.items())))
    if "spool" in status:
        out.append("  spool                " + " ".join(f"{k}={v}" for k, v in sorted(status["spool"].items())))
    return "\n".join(out)


def cmd_migrate(s: MigrateSettings) -> int:
    from fleetscope.store import connect, mask_dsn, migrate

    client = connect(s.clickhouse, s.clickhouse_secret())
    applied = migrate(client)
    print(f"{mask_dsn(s.clickhouse)}: applied {len(applied)} migration(s)"
          + "".join(f"\n  {m.version:04d}_{m.name}" for m in applied))  # fmt: skip
    return 0


def cmd_query(s: QuerySettings, sql: str) -> int:
    from fleetscope.store import connect

    for noisy in ("urllib3", "clickhouse_connect"):  # their retry warnings repeat our error
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        client = connect(s.dsn, s.clickhouse_secret())
    except StoreError as e:
        if s.data_dir and "EmbeddedServer" in str(e):
            raise StoreError(f"{s.data_dir} is open in another process (fleetscope run or serve-sql); query "
                             f"it through its SQL interface: --clickhouse {config.DEFAULT_SQL_DSN}") from e  # fmt: skip
        if not (s.data_dir or s.clickhouse) and "refused" in str(e).lower():
            raise StoreError(f"nothing answers at {s.dsn}: start `fleetscope run` or `fleetscope serve-sql "
                             "--data-dir DIR`, or query a closed store with --data-dir DIR") from e  # fmt: skip
        raise
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
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    out = [line(list(names)), "  ".join("-" * w for w in widths), *(line(r) for r in cells)]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(s.rstrip() for s in out)


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    command = args.pop("command")
    sql = args.pop("sql", None)
    action = "check" if args.pop("action_check", False) else "status" if args.pop("action_status", False) else ""
    cls = CheckSettings if action else COMMANDS[command][0]
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
        if action == "check":
            return cmd_agent_check(settings)
        if action == "status":
            return cmd_agent_status(settings)
        if command == "query":
            return cmd_query(settings, sql)
        if command == "migrate":
            return cmd_migrate(settings)
        runners: dict[str, Callable[[Any], Coroutine[Any, Any, int]]] = {
            "run": cmd_run, "agent": cmd_agent, "ingest": cmd_ingest, "serve-sql": cmd_serve_sql,
        }  # fmt: skip
        malloc.keep_heap()  # large per-batch buffers reuse warm heap memory (fleetscope/malloc.py)
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
