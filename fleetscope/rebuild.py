"""Give a MergeTree table a new sorting key while ingesters keep inserting into it.

ClickHouse can only append new columns to a sorting key, so the table is rebuilt: swap
first, then move the old rows across. One migrator at a time holds the table's lock
(``<t>__rebuild_lock``, a lease; several ingesters run `migrate` at once), the others wait.
Every step is crash-safe, and a later run (this process or another) resumes where one stopped:

1. swap: create ``<t>__rebuild`` with the new key from the table's current
   DDL and ``EXCHANGE TABLES`` it with ``<t>``. From then on inserts land in the new table;
   ``<t>__rebuild`` holds the old rows. Done when system.tables says ``<t>`` has the new key.
2. stage: ``MOVE PARTITION`` each partition of ``<t>__rebuild`` to ``<t>__rebuild_stage``
   (same structure, merges off). The move is atomic and takes exactly the parts present, so
   a late insert into the old table (one that began before the swap) is never lost: it is
   moved on the next pass. Stage parts never change, so they can be copied by row offset.
3. sort: copy each stage part in chunks of rows into ``<t>__rebuild_sorted`` (new key, no
   one else writes to it) with a deduplication token per part and chunk, so a re-run copies
   nothing twice, leaving out batches that the new table holds whole already (delivered
   again after the swap; rows with batch identity only); then drop the stage part.
4. publish: ``MOVE PARTITION`` each partition of ``<t>__rebuild_sorted`` into ``<t>`` once
   none of its rows are left in the stage (atomic: the old rows of a day appear at once).
5. finish: when ``<t>__rebuild`` is empty and no insert that began before now is running,
   drop it and the empty helper tables.

The copy goes by column name over the columns the old table has, so columns added to the
table by other migrations before the rebuild are kept.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from fleetscope.errors import MigrationError, StoreError

log = logging.getLogger(__name__)

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# partition ids, part names and lock holders (host:pid): checked before they are quoted into
# DDL and ALTER statements, which take no bound parameters
LITERAL = re.compile(r"[\w.:@-]+")
NO_MERGES = {"max_bytes_to_merge_at_max_space_in_pool": "1", "max_bytes_to_merge_at_min_space_in_pool": "1"}
TABLE_ALREADY_EXISTS = 57
UNKNOWN_TABLE = 60
NO_SUCH_DATA_PART = 232


class RebuildLockLost(StoreError):
    """Another migrator took over this rebuild (this one stalled past the lease)."""


@dataclass(frozen=True)
class RebuildSpec:
    """What a ``NNNN_<what>.rebuild.yaml`` migration asks for: a table, its new sorting key, and
    skip indexes the new table gets (name -> ``expr TYPE ... GRANULARITY n``) if it lacks them."""

    table: str
    order_by: tuple[str, ...]
    indexes: tuple[tuple[str, str], ...] = ()

    @property
    def sorting_key(self) -> str:
        """The key as system.tables.sorting_key spells it."""
        return ", ".join(self.order_by)

    @classmethod
    def parse(cls, text: str, where: str) -> RebuildSpec:
        """From the YAML text of a rebuild migration; MigrationError names the file and the fix."""
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MigrationError(f"{where}: not valid YAML: {e}") from e
        if not isinstance(doc, dict) or not {"table", "order_by"} <= set(doc) <= {"table", "order_by", "indexes"}:
            raise MigrationError(f"{where}: a rebuild migration has the keys `table`, `order_by` and maybe `indexes`")
        table, order_by, indexes = doc["table"], doc["order_by"], doc.get("indexes") or {}
        names = [table, *order_by] if isinstance(order_by, list) and order_by else []
        if not names or not all(isinstance(n, str) and IDENT.fullmatch(n) for n in names):
            raise MigrationError(f"{where}: `table` is a table name and `order_by` a non-empty list of column names")
        if not isinstance(indexes, dict) or not all(
            isinstance(n, str)
            and IDENT.fullmatch(n)
            and isinstance(d, str)
            and " TYPE " in d
            and not set(d) & set(";\n")
            for n, d in indexes.items()
        ):
            raise MigrationError(f"{where}: `indexes` maps index names to `<expression> TYPE <type> GRANULARITY <n>`")
        return cls(table, tuple(order_by), tuple(indexes.items()))


@dataclass
class Rebuild:
    """One table's rebuild to a new sorting key; `run()` resumes wherever an earlier run stopped."""

    client: Client
    database: str
    spec: RebuildSpec
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    lease_s: float = 60.0  # a lock not refreshed for this long belongs to a crashed migrator
    inserts_wait_s: float = 300.0
    chunk_rows: int = 1 << 20
    # called after each step with its name: tests stop a rebuild there to resume it later
    after_step: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        t = self.spec.table
        self.old, self.stage, self.sorted, self.lock = (f"{t}__rebuild", f"{t}__rebuild_stage",
                                                        f"{t}__rebuild_sorted", f"{t}__rebuild_lock")  # fmt: skip
        self._settings: set[str] | None = None

    # -- the steps ---------------------------------------------------------------------

    def run(self) -> None:
        """Bring the table to the new key with every row it had and every row inserted meanwhile."""
        if self._done():
            return
        self._acquire()
        try:
            self._swap()
            self._move()
        finally:
            self._release()

    def _done(self) -> bool:
        key = self._sorting_key(self.spec.table)
        if key is None:
            raise MigrationError(f"rebuild of {self.spec.table}: the table does not exist")
        return key == self.spec.sorting_key and not any(
            self._exists(n) for n in (self.old, self.stage, self.sorted, self.lock)
        )

    def _swap(self) -> None:
        t, key = self.spec.table, self.spec.sorting_key
        if self._sorting_key(t) == key:
            return
        engine = self._one("SELECT engine FROM system.tables WHERE database = {db:String} AND name = {t:String}", t)
        if not str(engine).endswith("MergeTree") or str(engine).startswith("Replicated"):
            # a replicated copy would claim the same Keeper path as the table itself
            raise MigrationError(f"rebuild of {t}: only non-replicated MergeTree tables, not {engine}")
        # a materialized view reading from the table would keep feeding from the old one
        deps = self.client.query(
            "SELECT name FROM system.tables WHERE engine = 'MaterializedView' AND database = {db:String} "
            "AND name IN (SELECT arrayJoin(dependencies_table) FROM system.tables "
            "WHERE database = {db:String} AND name = {t:String})",
            parameters={"db": self.database, "t": t},
        ).result_rows
        if deps:
            raise MigrationError(
                f"rebuild of {t}: materialized views read from it ({', '.join(r[0] for r in deps)}); not supported"
            )
        columns = self._columns(t)
        missing = [c for c in self.spec.order_by if c not in columns]
        if missing:
            raise MigrationError(f"rebuild of {t}: the new sorting key names unknown columns {missing}")
        if self._exists(self.old):
            # left by a migrator that stopped between creating it and the swap: the new key, no rows
            if self._sorting_key(self.old) != key or self._count(self.old):
                raise MigrationError(
                    f"rebuild of {t}: {self.old} exists with rows or another key while {t} still has its old "
                    f"key; look at both tables and drop {self.old} if it holds nothing of value"
                )
            self._command(f"DROP TABLE {self._q(self.old)} SYNC")
        self._command(self._ddl(t, self.old, order_by=self.spec.order_by, indexes=self.spec.indexes))
        self._step("create")
        self._check_lock()
        self._command(f"EXCHANGE TABLES {self._q(t)} AND {self._q(self.old)}")
        log.info("rebuild of %s: swapped in the table ordered by (%s)", t, key)
        self._step("swap")

    def _move(self) -> None:
        t = self.spec.table
        while True:
            for pid in self._partitions(self.old):
                if not self._exists(self.stage):
                    self._command(self._ddl(self.old, self.stage, settings=NO_MERGES))
                self._check_lock()
                self._command(f"ALTER TABLE {self._q(self.old)} MOVE PARTITION ID {self._lit(pid)} "
                              f"TO TABLE {self._q(self.stage)}")  # fmt: skip
                self._step("stage")
            staged = self._partitions(self.stage)
            # a day is published once none of its rows are left in the stage: before, a copied
            # chunk may be copied again, and only the sorted table's window makes that a no-op
            for pid in [p for p in self._partitions(self.sorted) if p not in staged] + staged:
                if pid in staged:
                    self._sort_partition(pid)
                self._check_lock()
                self._command(f"ALTER TABLE {self._q(self.sorted)} MOVE PARTITION ID {self._lit(pid)} "
                              f"TO TABLE {self._q(t)}")  # fmt: skip
                self._step("publish")
            if self._exists(self.old):
                if self._partitions(self.old):
                    continue
                self._wait_for_inserts()
                if self._partitions(self.old):
                    continue
                self._check_lock()
                self._command(f"DROP TABLE {self._q(self.old)} SYNC")
                self._step("drop")
            for name in (self.sorted, self.stage):
                if self._exists(name):
                    if self._partitions(name):
                        break  # cannot happen with the lock held; go round again rather than drop rows
                    self._command(f"DROP TABLE {self._q(name)} SYNC")
            else:
                log.info("rebuild of %s: done", t)
                return

    def _sort_partition(self, pid: str) -> None:
        """Copy the stage's parts of one partition into the sorted table, then drop them."""
        t = self.spec.table
        if not self._exists(self.sorted):
            # only rebuild chunks land here: a window of 100000 blocks covers any partition's chunks
            window = {"non_replicated_deduplication_window": "100000"}
            self._command(self._ddl(self.spec.table, self.sorted, settings=window))
        stage_id = self._one("SELECT toString(uuid) FROM system.tables WHERE database = {db:String} "
                             "AND name = {t:String}", self.stage)  # fmt: skip
        columns = [c for c in self._columns(self.stage) if c in self._columns(self.sorted)]
        names = ", ".join(quote_identifier(c) for c in columns)
        parts = self._parts(self.stage, pid)
        settings = self._copy_settings()
        identity = {"node", "batch_epoch", "batch_sequence", "batch_rows"} <= set(columns)
        for part, rows in parts:
            for lo in range(0, rows, self.chunk_rows):
                self._check_lock()
                # a stage part never changes (merges are off), so its row offsets name the same rows
                # on every run, and the token makes a re-run of a copied chunk a no-op
                chunk = f"_part = {self._lit(part)} AND _part_offset >= {lo} AND _part_offset < {lo + self.chunk_rows}"
                where = chunk
                if identity:
                    # a batch stored in the old table and delivered again after the swap is whole in
                    # the new table already (the ingester could not see the old copy): keep one
                    batch = "(node, batch_epoch, batch_sequence)"
                    where += (
                        f" AND (batch_rows = 0 OR {batch} NOT IN (SELECT {batch} FROM {self._q(t)} "
                        f"WHERE batch_rows > 0 AND {batch} IN (SELECT {batch} FROM {self._q(self.stage)} "
                        f"WHERE {chunk}) GROUP BY {batch} HAVING count() >= max(batch_rows)))"
                    )
                self._command(
                    f"INSERT INTO {self._q(self.sorted)} ({names}) SELECT {names} FROM {self._q(self.stage)} "
                    f"WHERE {where}",
                    settings={**settings, "insert_deduplication_token": f"rebuild:{stage_id}:{part}:{lo}"},
                )
                self._step("copy")
        for part, _ in parts:
            try:
                self._command(f"ALTER TABLE {self._q(self.stage)} DROP PART {self._lit(part)}")
            except DatabaseError as e:
                if getattr(e, "code", None) != NO_SUCH_DATA_PART:
                    raise
            self._step("unstage")

    def _wait_for_inserts(self) -> None:
        """Wait for the inserts running now: one into the old table began before the swap."""
        sql = "SELECT query_id FROM system.processes WHERE query_kind = 'Insert'"
        running = {r[0] for r in self.client.query(sql).result_rows}
        deadline = time.monotonic() + self.inserts_wait_s
        while running:
            if time.monotonic() > deadline:
                raise StoreError(f"rebuild of {self.spec.table}: inserts still running after "
                                 f"{self.inserts_wait_s:.0f}s; will retry")  # fmt: skip
            time.sleep(0.1)
            self._check_lock()
            running &= {r[0] for r in self.client.query(sql).result_rows}

    # -- the lock ----------------------------------------------------------------------

    def _acquire(self) -> None:
        """Create the lock table (exactly one creator wins); take over a stale or own lock."""
        logged = 0.0
        while True:
            try:
                self._command(f"CREATE TABLE {self._q(self.lock)} (`holder` String) ENGINE = Memory "
                              f"COMMENT {self._lit(self.holder)}")  # fmt: skip
                return
            except DatabaseError as e:
                if getattr(e, "code", None) != TABLE_ALREADY_EXISTS:
                    raise
            row = self.client.query(
                "SELECT comment, dateDiff('second', metadata_modification_time, now()) FROM system.tables "
                "WHERE database = {db:String} AND name = {t:String}",
                parameters={"db": self.database, "t": self.lock},
            ).result_rows
            if not row:
                continue
            holder, age = row[0]
            if holder == self.holder or age > self.lease_s:
                log.warning("rebuild of %s: taking over the lock of %s (%ss old)", self.spec.table, holder, age)
                stale = f"{self.lock}_stale_{uuid.uuid4().hex[:12]}"
                try:  # one renamer wins; the others see the lock gone and try again
                    self._command(f"RENAME TABLE {self._q(self.lock)} TO {self._q(stale)}")
                    self._command(f"DROP TABLE {self._q(stale)} SYNC")
                except DatabaseError as e:
                    if getattr(e, "code", None) != UNKNOWN_TABLE:
                        raise
                continue
            if time.monotonic() - logged > 30:
                log.info("rebuild of %s: waiting for %s, which is rebuilding it", self.spec.table, holder)
                logged = time.monotonic()
            time.sleep(0.25)

    def _check_lock(self) -> None:
        """Refresh the lease, and stop if another migrator has taken the lock over."""
        holder = self._one("SELECT comment FROM system.tables WHERE database = {db:String} AND name = {t:String}",
                           self.lock)  # fmt: skip
        if holder != self.holder:
            raise RebuildLockLost(f"rebuild of {self.spec.table}: lock taken over by {holder or 'nobody'}; will retry")
        self._command(f"ALTER TABLE {self._q(self.lock)} MODIFY COMMENT {self._lit(self.holder)}")

    def _release(self) -> None:
        try:
            holder = self._one("SELECT comment FROM system.tables WHERE database = {db:String} "
                               "AND name = {t:String}", self.lock)  # fmt: skip
            if holder == self.holder:
                self._command(f"DROP TABLE IF EXISTS {self._q(self.lock)} SYNC")
        except DatabaseError as e:  # the lease frees it in the end
            log.warning("rebuild of %s: could not release the lock: %s", self.spec.table, e)

    # -- helpers -----------------------------------------------------------------------

    def _step(self, name: str) -> None:
        if self.after_step is not None:
            self.after_step(name)

    def _q(self, table: str) -> str:
        return f"{quote_identifier(self.database)}.{quote_identifier(table)}"

    @staticmethod
    def _lit(value: str) -> str:
        if not LITERAL.fullmatch(value):
            raise MigrationError(f"unexpected name {value!r}")
        return f"'{value}'"

    def _command(self, sql: str, settings: dict[str, Any] | None = None) -> None:
        self.client.command(sql, settings=settings)

    def _one(self, sql: str, table: str) -> Any:
        rows = self.client.query(sql, parameters={"db": self.database, "t": table}).result_rows
        return rows[0][0] if rows else None

    def _exists(self, table: str) -> bool:
        return self._one("SELECT 1 FROM system.tables WHERE database = {db:String} AND name = {t:String}",
                         table) is not None  # fmt: skip

    def _sorting_key(self, table: str) -> str | None:
        key = self._one("SELECT sorting_key FROM system.tables WHERE database = {db:String} AND name = {t:String}",
                        table)  # fmt: skip
        return None if key is None else str(key)

    def _count(self, table: str) -> int:
        return int(self.client.command(f"SELECT count() FROM {self._q(table)}"))  # type: ignore[arg-type]

    def _columns(self, table: str) -> list[str]:
        """Stored columns a copy writes (not MATERIALIZED, ALIAS or EPHEMERAL), in table order."""
        rows = self.client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} "
            "AND default_kind IN ('', 'DEFAULT') ORDER BY position",
            parameters={"db": self.database, "t": table},
        ).result_rows
        return [r[0] for r in rows]

    def _partitions(self, table: str) -> list[str]:
        rows = self.client.query(
            # MOVE and DROP PARTITION leave empty parts behind for a while: they hold no rows to move
            "SELECT DISTINCT partition_id FROM system.parts WHERE database = {db:String} AND table = {t:String} "
            "AND active AND rows > 0 ORDER BY partition_id",
            parameters={"db": self.database, "t": table},
        ).result_rows
        return [r[0] for r in rows]

    def _parts(self, table: str, partition_id: str) -> list[tuple[str, int]]:
        rows = self.client.query(
            "SELECT name, rows FROM system.parts WHERE database = {db:String} AND table = {t:String} "
            "AND partition_id = {p:String} AND active AND rows > 0 ORDER BY name",
            parameters={"db": self.database, "t": table, "p": partition_id},
        ).result_rows
        return [(r[0], int(r[1])) for r in rows]

    def _copy_settings(self) -> dict[str, Any]:
        """One thread and no squashing: the same chunk always makes the same blocks, so its token
        deduplicates a repeat; insert deduplication on even where INSERT SELECT would skip it."""
        if self._settings is None:
            rows = self.client.query("SELECT name FROM system.settings WHERE name = 'deduplicate_insert_select'")
            self._settings = {r[0] for r in rows.result_rows}
        out: dict[str, Any] = {
            "insert_deduplicate": 1,
            "max_threads": 1,
            "max_insert_threads": 1,
            "max_block_size": self.chunk_rows,
            "preferred_block_size_bytes": 1 << 30,
            "min_insert_block_size_rows": 0,
            "min_insert_block_size_bytes": 0,
        }
        if "deduplicate_insert_select" in self._settings:
            out["deduplicate_insert_select"] = "force_enable"
        return out

    def _ddl(
        self,
        source: str,
        target: str,
        order_by: tuple[str, ...] = (),
        settings: dict[str, str] | None = None,
        indexes: tuple[tuple[str, str], ...] = (),
    ) -> str:
        """CREATE TABLE <target> as <source> is now, with another sorting key, more settings or indexes."""
        sql = str(self.client.query(f"SHOW CREATE TABLE {self._q(source)}").result_rows[0][0])
        head, sep, rest = sql.partition("\n")
        if not head.startswith("CREATE TABLE ") or not sep:
            raise MigrationError(f"rebuild of {self.spec.table}: unexpected DDL of {source}: {head}")
        lines = rest.split("\n")
        for name, definition in indexes:
            if not any(ln.strip().startswith((f"INDEX {name} ", f"INDEX `{name}` ")) for ln in lines):
                end = next((i for i, ln in enumerate(lines) if ln.startswith("ENGINE = ")), 0) - 1
                if end < 1 or lines[end] != ")":
                    raise MigrationError(f"rebuild of {self.spec.table}: unexpected DDL of {source}")
                lines[end - 1] += ","
                lines.insert(end, f"    INDEX {quote_identifier(name)} {definition}")
        if order_by:
            lines = [ln for ln in lines if not ln.startswith("PRIMARY KEY ")]  # the key is the new sorting key
            at = [i for i, ln in enumerate(lines) if ln.startswith("ORDER BY ")]
            if len(at) != 1:
                raise MigrationError(f"rebuild of {self.spec.table}: no ORDER BY line in the DDL of {source}")
            lines[at[0]] = "ORDER BY (" + ", ".join(quote_identifier(c) for c in order_by) + ")"
        for name, value in (settings or {}).items():
            at = [i for i, ln in enumerate(lines) if ln.startswith("SETTINGS ")]
            if not at:
                lines.append(f"SETTINGS {name} = {value}")
            elif re.search(rf"\b{name} = ", lines[at[0]]):
                lines[at[0]] = re.sub(rf"\b{name} = [^,]+", f"{name} = {value}", lines[at[0]])
            else:
                lines[at[0]] += f", {name} = {value}"
        return f"CREATE TABLE {self._q(target)}\n" + "\n".join(lines)


def rebuild_table(client: Client, database: str, spec: RebuildSpec) -> None:
    """Run (or resume) the rebuild of one table; see the module docstring."""
    Rebuild(client, database, spec).run()
