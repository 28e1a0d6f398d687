"""ClickHouse access shared by every command: connect by DSN, migrate, insert columns.

One code path for both modes: ``chdb:///path`` is the embedded engine and
``http(s)://...`` a ClickHouse server, both through clickhouse-connect.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect
from clickhouse_connect.datatypes.format import set_write_format
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, OperationalError

from fleetscope.config import REPO_ROOT
from fleetscope.credentials import mask_dsn, scrub
from fleetscope.errors import MigrationError, StoreError
from fleetscope.rebuild import RebuildSpec, rebuild_table
from fleetscope.retry import first_line

log = logging.getLogger(__name__)

MIGRATIONS_DIR = REPO_ROOT / "infra" / "clickhouse" / "migrations"
DATABASE = "fleet"

# clickhouse-connect writes numpy DateTime64 columns without per-element conversion only
# when their write format is "int" (nanosecond ticks); fleetscope only ever inserts ticks.
set_write_format("DateTime64", "int")


def qualified(table: str) -> str:
    """`fleet`.`<table>`, quoted: SQL names tables only through quoted identifiers."""
    return f"{quote_identifier(DATABASE)}.{quote_identifier(table)}"


def connect(dsn: str, password: str = "") -> Client:
    """Open a clickhouse-connect client for a DSN, with password (from clickhouse_password or
    its file) instead of the DSN's; raises StoreError with the DSN masked and no password."""
    if dsn.startswith("chdb://"):
        path = urlsplit(dsn).path
        if path:
            Path(path).mkdir(parents=True, exist_ok=True)
    try:
        if dsn.startswith("chdb://"):
            return clickhouse_connect.get_client(dsn=dsn)
        # no HTTP session: inserts from concurrent threads must not collide on one
        return clickhouse_connect.get_client(dsn=dsn, password=str(password), autogenerate_session_id=False)
    except (ClickHouseError, OSError, RuntimeError) as e:
        secrets = [password, unquote(urlsplit(dsn).password or "")]
        raise StoreError(f"cannot connect to ClickHouse at {mask_dsn(dsn)}: {scrub(first_line(e), secrets)}") from e


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str  # the file's text: one SQL statement, or the YAML of a rebuild
    rebuild: RebuildSpec | None = None

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Numbered files in version order: NNNN_<what>.sql, one statement each, or
    NNNN_<what>.rebuild.yaml, a table's new sorting key (fleetscope/rebuild.py)."""
    out = []
    for path in sorted([*directory.glob("*.sql"), *directory.glob("*.yaml")]):
        m = re.fullmatch(r"(\d{4})_(\w+)\.(sql|rebuild\.yaml)", path.name)
        if not m:
            raise MigrationError(f"{path}: migration files are named NNNN_<what>.sql or NNNN_<what>.rebuild.yaml")
        text = path.read_text()
        spec = RebuildSpec.parse(text, str(path)) if m.group(3) != "sql" else None
        out.append(Migration(int(m.group(1)), m.group(2), text, spec))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migration files share a number")
    return sorted(out, key=lambda m: m.version)


def migrate(client: Client, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply the migrations not yet recorded in fleet.schema_migrations; returns those applied.

    Idempotent and safe to run from several ingesters at once: every statement is
    IF NOT EXISTS and schema_migrations collapses duplicate versions. A rebuild (new
    sorting key) runs under a lock in ClickHouse and resumes where a crashed run stopped;
    other migrators wait for it. A migration is recorded only once it has completed.
    """
    client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(DATABASE)}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {qualified('schema_migrations')} ("
        "`version` UInt32, `name` String, `checksum` String, "
        "`applied_at` DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    rows = client.query(f"SELECT version, checksum FROM {qualified('schema_migrations')} FINAL").result_rows
    applied = {int(v): c for v, c in rows}
    done = []
    for mig in load_migrations(directory):
        if mig.version in applied:
            if applied[mig.version] != mig.checksum:
                raise MigrationError(
                    f"migration {mig.version:04d}_{mig.name} changed after it was applied; "
                    "add a new numbered migration instead of editing an applied one"
                )
            continue
        try:
            if mig.rebuild is not None:
                rebuild_table(client, DATABASE, mig.rebuild)
            else:
                client.command(mig.sql)
        except OperationalError as e:  # connection trouble: retriable, and a rebuild resumes
            raise StoreError(f"migration {mig.version:04d}_{mig.name} interrupted: {first_line(e)}") from e
        except DatabaseError as e:
            raise MigrationError(f"migration {mig.version:04d}_{mig.name} failed: {first_line(e)}") from e
        client.insert(
            qualified("schema_migrations"),
            [[mig.version, mig.name, mig.checksum]],
            column_names=["version", "name", "checksum"],
        )
        log.info("applied migration %04d_%s", mig.version, mig.name)
        done.append(mig)
    return done


def table_types(client: Client, table: str) -> dict[str, str]:
    """Column name -> ClickHouse type of fleet.<table>, for inserts without a DESCRIBE each."""
    res = client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": DATABASE, "t": table},
    )
    return {n: t for n, t in res.result_rows}


def is_retriable(e: BaseException) -> bool:
    """Connection trouble and server-side failures are retried; bad data is not."""
    return isinstance(e, OperationalError | OSError | StoreError) and getattr(e, "retriable", True)


def query_table(client: Client, sql: str, parameters: dict[str, Any] | None = None) -> tuple[list[str], list[tuple]]:
    res = client.query(sql, parameters=parameters)
    return list(res.column_names), [tuple(r) for r in res.result_rows]
