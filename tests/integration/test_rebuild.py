"""Rebuilding event tables with a new sorting key (fleetscope/rebuild.py, migrations 0060-0067), on the
real engine through `fleetscope serve-sql`: fresh installs, stores with rows, rebuilds stopped at
every step and resumed, inserts between the steps, two migrators at once. Rows are compared as
a multiset (count and sum of row hashes), so a lost or a doubled row shows."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client

from fleetscope.rebuild import Rebuild, RebuildSpec
from fleetscope.store import MIGRATIONS_DIR, load_migrations, migrate
from tests.support.sql_http import ServeSql

pytestmark = [pytest.mark.integration]

EVENT_KEY = "k8s_namespace, k8s_workload, node, time"
NEW_KEYS = {
    "process_exec": EVENT_KEY,
    "process_exit": EVENT_KEY,
    "tcp_connections": EVENT_KEY,
    "file_open": EVENT_KEY,
    "oom_kills": EVENT_KEY,
    "fatal_signals": EVENT_KEY,
    "syscall_latency": "k8s_namespace, k8s_workload, node, cgroup_id, syscall, time",
    "runqueue_latency": "k8s_namespace, k8s_workload, node, cgroup_id, time",
}
SPEC_KEY = ("k8s_namespace", "k8s_workload", "node", "time")


class Stop(Exception):
    """Raised by a step hook: the rebuild stops there, as if its process had died."""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeSql]:
    with ServeSql(tmp_path / "store", tmp_path / "serve.log") as s:
        yield s


def connect(server: ServeSql) -> Client:
    return clickhouse_connect.get_client(dsn=server.url, autogenerate_session_id=False)


def migrate_until(client: Client, tmp_path: Path, last: int) -> None:
    """The store as a release that had migrations up to `last` left it."""
    old = tmp_path / f"migrations_{last}"
    old.mkdir()
    for path in MIGRATIONS_DIR.iterdir():
        if path.name[:4].isdigit() and int(path.name[:4]) <= last:
            shutil.copy(path, old / path.name)
    migrate(client, old)


def add_rows(client: Client, table: str, first: int, n: int, token: str = "") -> None:
    """n rows over three daily partitions (pid first..first+n-1), as an ingester would insert them."""
    cols = "time, node, pid, cgroup_id, comm, k8s_namespace, k8s_workload, k8s_labels"
    client.command(
        f"INSERT INTO fleet.{table} ({cols}) SELECT now64(9) - toIntervalDay(number % 3) - toIntervalSecond(number), "
        f"concat('node-', toString(number % 4)), {first} + number, number % 7, 'sh', "
        f"['shop', 'kube-system', ''][number % 3 + 1], concat('web-', toString(number % 5)), map('app', 'x') "
        f"FROM numbers({n})",
        settings={"insert_deduplication_token": token} if token else None,
    )


def fingerprint(client: Client, table: str, columns: list[str] | None = None) -> tuple[int, int]:
    """Row count and the sum of the rows' hashes (over `columns`, default all): equal for the same
    multiset of rows."""
    cols = ", ".join(f"`{c}`" for c in columns) if columns else "*"
    row = client.query(f"SELECT count(), sum(cityHash64({cols})) FROM fleet.{table}").result_rows[0]
    return int(row[0]), int(row[1])


def columns(client: Client, table: str) -> list[str]:
    return [r[0] for r in client.query(f"DESCRIBE TABLE fleet.{table}").result_rows]


def keys(client: Client) -> dict[str, str]:
    rows = client.query("SELECT name, sorting_key FROM system.tables WHERE database = 'fleet'").result_rows
    return {n: k for n, k in rows}


def leftovers(client: Client) -> list[str]:
    return [n for n in keys(client) if "__rebuild" in n]


def old_table(client: Client, name: str) -> None:
    """A table shaped as process_exec was after 0020 (sorting key node, time), named `name`."""
    client.command("CREATE DATABASE IF NOT EXISTS fleet")
    for f in ("0001_process_exec.sql", "0020_process_exec_k8s.sql"):
        client.command((MIGRATIONS_DIR / f).read_text().replace("fleet.process_exec", f"fleet.{name}"))


def test_migrations_load_rebuilds_in_version_order() -> None:
    migs = load_migrations()
    rebuilds = {m.rebuild.table: m.rebuild.sorting_key for m in migs if m.rebuild is not None}
    assert rebuilds == NEW_KEYS
    assert all(60 <= m.version <= 69 for m in migs if m.rebuild is not None)
    assert [m.version for m in migs] == sorted({m.version for m in migs})


def test_fresh_install_has_the_new_keys_and_no_helper_tables(server: ServeSql) -> None:
    client = connect(server)
    started = time.monotonic()
    migrate(client)
    logging.getLogger(__name__).info("fresh install: all migrations in %.2fs", time.monotonic() - started)
    assert {t: keys(client)[t] for t in NEW_KEYS} == NEW_KEYS
    assert keys(client)["block_io_latency"] == "node, device, operation, time"  # no k8s columns: unchanged
    assert leftovers(client) == []
    assert migrate(client) == []  # recorded: nothing to do again


def test_an_existing_store_keeps_every_row_once(server: ServeSql, tmp_path: Path) -> None:
    client = connect(server)
    migrate_until(client, tmp_path, 45)
    for i, table in enumerate(("process_exec", "process_exit", "tcp_connections", "file_open")):
        add_rows(client, table, 0, 3000 + i)
    client.command(
        "INSERT INTO fleet.syscall_latency (time, node, cgroup_id, syscall, count, buckets, k8s_namespace) "
        "SELECT now64(9) - toIntervalDay(number % 2), 'n', number, 'read', 1, [1], 'shop' FROM numbers(500)"
    )
    # later migrations add columns: the rows are compared on those they had
    cols = {t: columns(client, t) for t in NEW_KEYS}
    before = {t: fingerprint(client, t, cols[t]) for t in NEW_KEYS}
    migrate(client)
    assert {t: fingerprint(client, t, cols[t]) for t in NEW_KEYS} == before
    assert {t: keys(client)[t] for t in NEW_KEYS} == NEW_KEYS
    assert leftovers(client) == []
    # the settings, TTL and skip indexes came along
    ddl = client.query("SHOW CREATE TABLE fleet.process_exec").result_rows[0][0]
    assert "non_replicated_deduplication_window = 10000" in ddl and "ttl_only_drop_parts = 1" in ddl
    assert "TTL toDateTime(time) + toIntervalDay(30)" in ddl and "idx_k8s_workload" in ddl
    assert "INDEX idx_node node TYPE bloom_filter(0.01) GRANULARITY 1" in ddl
    assert client.command("SELECT count() FROM fleet.process_exec WHERE k8s_namespace = 'shop'") == 1000


def run_steps(client: Client, table: str, stop_at: int | None, chunk_rows: int, log: list[str]) -> None:
    """Rebuild `table`, inserting 5 rows into it after every step, and 3 into the old table after
    the swap and after the first stage step (as inserts begun before the swap would land there);
    stop after step number stop_at. `log` collects the steps, "+late" marking those inserts."""
    count = 0

    def after(step: str) -> None:
        nonlocal count
        count += 1
        log.append(step)
        add_rows(client, table, 10_000_000 + 1000 * len(log), 5, token=f"between-{len(log)}")
        if step in ("swap", "stage") and log.count("+late") < 2:
            log.append("+late")
            add_rows(client, f"{table}__rebuild", 20_000_000 + 1000 * len(log), 3, token=f"late-{len(log)}")
        if count == stop_at:
            raise Stop(step)

    rb = Rebuild(client, "fleet", RebuildSpec(table, SPEC_KEY), chunk_rows=chunk_rows, after_step=after)
    rb.run()


def test_a_rebuild_stopped_at_any_step_completes_on_a_rerun(server: ServeSql) -> None:
    client = connect(server)
    old_table(client, "rb_full")
    add_rows(client, "rb_full", 0, 3000)
    full: list[str] = []
    run_steps(client, "rb_full", None, 700, full)
    # 3 partitions of 1000 rows in chunks of 700: create, swap, 3 x stage, 6 x copy, 3 x unstage,
    # 3 x publish, then again for the rows the hook put into the old table, and the drop
    assert full[:3] == ["create", "swap", "+late"] and full[-1] == "drop" and full.count("copy") >= 6
    assert keys(client)["rb_full"] == ", ".join(SPEC_KEY)
    done = [step for step in full if step != "+late"]
    # stop after the first and the last step of each kind (every step, first or last, of a
    # partition and a chunk), and resume
    stops = sorted({done.index(step) + 1 for step in done} | {len(done) - done[::-1].index(step) for step in done})
    for k in stops:
        table = f"rb_{k}"
        old_table(client, table)
        add_rows(client, table, 0, 3000)
        steps: list[str] = []
        with pytest.raises(Stop):
            run_steps(client, table, k, 700, steps)
        run_steps(client, table, None, 700, steps)
        # the rows that were in the table, the ones put into it after each step and those
        # that landed in the old table after the swap: each exactly once after the rerun
        assert keys(client)[table] == ", ".join(SPEC_KEY), steps
        assert not [n for n in leftovers(client) if n.startswith(f"{table}__")], steps
        late = steps.count("+late")
        expected = 3000 + 5 * (len(steps) - late) + 3 * late
        stored = client.query(f"SELECT count(), uniqExact(pid) FROM fleet.{table}").result_rows[0]
        assert tuple(stored) == (expected, expected), (k, steps)


def test_two_migrators_at_once_with_inserts_running(server: ServeSql) -> None:
    main = connect(server)
    old_table(main, "rb_race")
    add_rows(main, "rb_race", 0, 30_000)
    errors: list[BaseException] = []
    stop = threading.Event()
    inserted = 0

    def insert() -> None:
        nonlocal inserted
        c = connect(server)
        while not stop.is_set():
            add_rows(c, "rb_race", 1_000_000 + inserted, 10, token=f"live-{inserted}")
            inserted += 10

    def rebuild(holder: str) -> None:
        try:
            spec = RebuildSpec("rb_race", SPEC_KEY)
            Rebuild(connect(server), "fleet", spec, holder=holder, chunk_rows=4000).run()
        except BaseException as e:
            errors.append(e)

    writer = threading.Thread(target=insert)
    writer.start()
    time.sleep(0.3)
    migrators = [threading.Thread(target=rebuild, args=(f"migrator-{i}",)) for i in range(2)]
    for t in migrators:
        t.start()
    for t in migrators:
        t.join(120)
    time.sleep(0.3)
    stop.set()
    writer.join(120)
    assert not writer.is_alive(), "the writer did not stop: the counts below would move"
    assert not errors, errors
    assert keys(main)["rb_race"] == ", ".join(SPEC_KEY)
    assert not [n for n in leftovers(main) if n.startswith("rb_race__")]
    assert inserted > 0
    total = 30_000 + inserted
    assert tuple(main.query("SELECT count(), uniqExact(pid) FROM fleet.rb_race").result_rows[0]) == (total, total)


def test_a_stale_lock_is_taken_over_and_a_live_one_waited_for(server: ServeSql) -> None:
    client = connect(server)
    old_table(client, "rb_lock")
    add_rows(client, "rb_lock", 0, 100)
    spec = RebuildSpec("rb_lock", SPEC_KEY)
    client.command("CREATE TABLE fleet.rb_lock__rebuild_lock (`holder` String) ENGINE = Memory COMMENT 'gone:1'")
    released = threading.Timer(1.0, lambda: connect(server).command("DROP TABLE fleet.rb_lock__rebuild_lock"))
    released.start()
    started = time.monotonic()
    Rebuild(client, "fleet", spec, holder="me:2").run()  # waits for the live lock, then rebuilds
    assert time.monotonic() - started >= 0.9
    released.join()
    # a lock whose holder stopped refreshing it for longer than the lease is taken over
    old_table(client, "rb_lock2")
    add_rows(client, "rb_lock2", 0, 100)
    client.command("CREATE TABLE fleet.rb_lock2__rebuild_lock (`holder` String) ENGINE = Memory COMMENT 'gone:1'")
    time.sleep(1.1)
    Rebuild(client, "fleet", RebuildSpec("rb_lock2", SPEC_KEY), holder="me:2", lease_s=0.5).run()
    assert keys(client)["rb_lock2"] == keys(client)["rb_lock"] == ", ".join(SPEC_KEY)
    assert fingerprint(client, "rb_lock2")[0] == fingerprint(client, "rb_lock")[0] == 100


def test_a_batch_delivered_again_after_the_swap_is_kept_once(server: ServeSql) -> None:
    """The ingester leaves out batches already in the table, but cannot see those still in the old
    one: with batch identity in the rows (0070), the rebuild leaves out their old copy."""
    client = connect(server)
    old_table(client, "rb_redo")
    client.command((MIGRATIONS_DIR / "0070_process_exec_batch_identity.sql").read_text().replace(
        "fleet.process_exec", "fleet.rb_redo"))  # fmt: skip

    def batch(seq: int) -> None:
        client.command(
            "INSERT INTO fleet.rb_redo (time, node, pid, batch_epoch, batch_sequence, batch_rows) "
            f"SELECT toStartOfDay(now64(9)) - toIntervalDay({seq} % 3) + toIntervalSecond(number), "
            f"'n', {seq} * 1000 + number, 1, {seq}, 100 FROM numbers(100)",
            settings={"insert_deduplication_token": f"n-1-{seq}"},
        )

    for seq in range(6):
        batch(seq)

    def after(step: str) -> None:
        if step == "swap":  # redelivered to an ingester after the swap: lands in the new table
            for seq in (0, 1, 2):
                batch(seq)

    Rebuild(client, "fleet", RebuildSpec("rb_redo", SPEC_KEY), after_step=after).run()
    stored = client.query("SELECT count(), uniqExact(pid), uniqExact(batch_sequence) FROM fleet.rb_redo").result_rows
    assert tuple(stored[0]) == (600, 600, 6)
