"""fleetscope's ClickHouse HTTP interface, driven by real clients against `fleetscope serve-sql`.

clickhouse-connect over HTTP (migrations, columnar inserts with deduplication tokens,
parameters, result formats, compression, errors as its usual exceptions), curl for the raw
protocol, clickhouse-go in HTTP mode (the client family of Grafana's datasource), and
concurrency: many clients at once, and inserts that a slow SELECT does not hold up.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import brotli
import clickhouse_connect
import lz4.frame
import numpy as np
import pyarrow as pa
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from fleetscope.store import migrate, table_types
from tests.support.real import require_real
from tests.support.sql_http import ServeSql, wait_until

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
GO_CLIENT = REPO / "tests" / "go" / "chquery"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeSql]:
    d = tmp_path_factory.mktemp("sqlhttp")
    with ServeSql(d / "store", d / "serve.log") as s:
        yield s


def client(server: ServeSql, **kw: object) -> Client:
    return clickhouse_connect.get_client(dsn=server.url, **kw)


def curl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    if shutil.which("curl") is None:
        require_real("curl is not installed (apt-get install curl)")
    return subprocess.run(["curl", "-sS", *args], input=data, capture_output=True, timeout=60, check=False)


def test_migrations_and_deduplicated_columnar_inserts(server: ServeSql) -> None:
    c = client(server)
    applied = migrate(c)
    assert migrate(c) == [] and {m.name for m in applied} >= {"process_exec", "process_exit", "batches"}
    types = table_types(c, "process_exit")
    assert types["time"] == "DateTime64(9, 'UTC')"
    n = 100_000
    columns = [
        np.arange(n, dtype=np.int64) + time.time_ns(),  # inside the tables TTL
        np.full(n, "node-http", dtype=object),
        np.arange(n, dtype=np.uint32),
        np.ones(n, dtype=np.uint32),
        np.zeros(n, dtype=np.uint64),
        np.array(["sh", "python3"] * (n // 2), dtype=object),
        np.arange(n, dtype=np.int32) % 256,
        np.zeros(n, dtype=np.uint32),
        np.full(n, 1000, dtype=np.uint64),
    ]
    names = ["time", "node", "pid", "ppid", "cgroup_id", "comm", "exit_code", "signal", "duration_ns"]
    for token in ("batch-1", "batch-1", "batch-2"):  # batch-1 redelivered: stored once
        summary = c.insert("fleet.process_exit", columns, column_names=names, column_oriented=True,
                           column_type_names=[types[k] for k in names],
                           settings={"insert_deduplication_token": token})  # fmt: skip
        assert summary.written_rows == n
    rows = c.query("SELECT count(), uniqExact(pid), sum(exit_code) FROM fleet.process_exit WHERE node = 'node-http'")
    assert rows.result_rows == [(2 * n, n, 2 * int(columns[6].sum()))]


def test_parameters_and_types(server: ServeSql) -> None:
    c = client(server)
    r = c.query(
        "SELECT {a:UInt32} + 1 AS a, {s:String} AS s, {xs:Array(String)} AS xs, {t:DateTime64(3)} AS t",
        parameters={"a": 41, "s": "it's\ta 'tab'", "xs": ["x", "y'z"], "t": "2024-01-02 03:04:05.678"},
    )
    a, s, xs, t = r.result_rows[0]
    assert (a, s, xs) == (42, "it's\ta 'tab'", ["x", "y'z"]) and t.microsecond == 678000
    r = c.query("SELECT number, toString(number) AS s, [number] AS arr, toLowCardinality(toString(number % 3)) AS lc, "
                "if(number % 2 = 0, NULL, number) AS maybe FROM numbers(5)")  # fmt: skip
    assert r.result_rows[3] == (3, "3", [3], "0", 3) and r.result_rows[2][4] is None
    assert c.query_np("SELECT number FROM numbers(300000)").shape == (300000, 1)  # many blocks
    big = "x" * 20000  # long enough for clickhouse-connect to send a multipart form
    assert c.query("SELECT length({p:String})", parameters={"p": big}).result_rows == [(20000,)]


@pytest.mark.parametrize("compress", [True, False, "gzip", "zstd", "br", "lz4"])
def test_compression_both_ways(server: ServeSql, compress: object) -> None:
    c = client(server, compress=compress)
    c.command("CREATE TABLE IF NOT EXISTS default.comp (k String, n UInt64) ENGINE = MergeTree ORDER BY n")
    n = 300_000  # several insert blocks: several compressed frames in one body
    c.insert("default.comp", [[str(compress)] * n, list(range(n))], column_names=["k", "n"], column_oriented=True)
    r = c.query("SELECT count(), sum(n) FROM default.comp WHERE k = {k:String}", parameters={"k": str(compress)})
    assert r.result_rows == [(n, n * (n - 1) // 2)]
    assert len(c.query_np("SELECT n FROM default.comp WHERE k = {k:String}", parameters={"k": str(compress)})) == n


def test_result_formats_match_the_engine(server: ServeSql) -> None:
    c = client(server)
    q = "SELECT number AS n, toString(number) AS s FROM numbers(150000)"  # three blocks
    n = 150000
    body = c.raw_query(q, fmt="JSON")
    doc = json.loads(body)
    assert doc["rows"] == n == len(doc["data"]) and doc["meta"][1] == {"name": "s", "type": "String"}
    assert doc["data"][n - 1] == {"n": n - 1, "s": str(n - 1)}
    compact = json.loads(c.raw_query(q, fmt="JSONCompact"))
    assert compact["rows"] == n and compact["data"][70000] == [70000, "70000"]
    lines = c.raw_query(q, fmt="JSONEachRow").splitlines()
    assert len(lines) == n and json.loads(lines[-1]) == {"n": n - 1, "s": str(n - 1)}
    tsv = c.raw_query(q, fmt="TabSeparatedWithNames").decode().splitlines()
    assert tsv[0] == "n\ts" and len(tsv) == n + 1 and tsv[-1] == f"{n - 1}\t{n - 1}"
    assert c.raw_query(q, fmt="TabSeparated").decode().count("\n") == n
    rows = list(csv.reader(io.StringIO(c.raw_query(q, fmt="CSVWithNames").decode())))
    assert rows[0] == ["n", "s"] and len(rows) == n + 1 and rows[-1] == [str(n - 1)] * 2
    table = pa.ipc.open_file(c.raw_query(q, fmt="Arrow")).read_all()
    assert table.num_rows == n and table.column("n").to_pylist()[-1] == n - 1
    stream = pa.ipc.open_stream(c.raw_query(q, fmt="ArrowStream")).read_all()
    assert stream.num_rows == n
    rb = c.raw_query(q, fmt="RowBinaryWithNamesAndTypes")
    assert rb.startswith(b"\x02\x01n\x01s\x06UInt64\x06String") and rb.count(b"\x06UInt64") == 1
    assert len(c.raw_query(q, fmt="Native")) > 0 and c.query(q).row_count == n
    empty = json.loads(c.raw_query("SELECT 1 AS x WHERE 0", fmt="JSON"))
    assert empty["rows"] == 0 and empty["meta"] == [{"name": "x", "type": "UInt8"}]
    assert c.raw_query("SELECT 1 AS x WHERE 0", fmt="CSVWithNames") == b'"x"\n'
    totals = json.loads(c.raw_query("SELECT number % 2 AS k, count() AS c FROM numbers(10) GROUP BY k WITH TOTALS "
                                    "ORDER BY k", fmt="JSON"))  # fmt: skip
    assert totals["totals"]["c"] == 10 and totals["rows"] == 2


def test_errors_raise_the_clients_usual_exceptions(server: ServeSql) -> None:
    c = client(server)
    with pytest.raises(DatabaseError) as syntax:
        c.query("SELEC 1")
    assert syntax.value.code == 62 and "SYNTAX_ERROR" in str(syntax.value)
    with pytest.raises(DatabaseError) as missing:
        c.query("SELECT * FROM fleet.no_such_table")
    assert missing.value.code == 60 and "UNKNOWN_TABLE" in str(missing.value)
    with pytest.raises(DatabaseError) as multi:
        c.command("SELECT 1; SELECT 2")
    assert multi.value.code == 62
    with pytest.raises(DatabaseError) as late:  # a 500, or the tagged block after the first ones: raised either way
        c.query_np("SELECT throwIf(number = 200000, 'boom') FROM numbers(1000000)")
    assert "boom" in str(late.value)
    with pytest.raises(DatabaseError, match="INTO OUTFILE"):
        c.command("SELECT 1 INTO OUTFILE '/tmp/fleetscope-never'")
    assert c.query("SELECT 1").result_rows == [(1,)]  # the server is fine afterwards


def test_curl_speaks_the_raw_protocol(server: ServeSql, tmp_path: Path) -> None:
    url = server.url
    assert curl(f"{url}/ping").stdout == b"Ok.\n"
    assert curl(f"{url}/").stdout == b"Ok.\n"
    assert curl(f"{url}/?query=SELECT%201%2B1").stdout == b"2\n"
    assert curl(url, "--data-binary", "@-", data=b"SELECT 'post'").stdout == b"post\n"
    assert curl("-g", f"{url}/?query=SELECT%20{{x:UInt8}}*2&param_x=21").stdout == b"42\n"
    assert curl(f"{url}/?query=SELECT%201&default_format=JSONEachRow").stdout == b'{"1":1}\n'
    # the query's beginning in the URL, the rest in the body
    assert curl(f"{url}/?query=SELECT", "--data-binary", "@-", data=b" 3").stdout == b"3\n"
    out = curl("-i", f"{url}/?query=SELECT%20number%20FROM%20numbers(2)&query_id=q-curl-1").stdout.decode()
    assert "X-ClickHouse-Query-Id: q-curl-1" in out and "X-ClickHouse-Format: TabSeparated" in out
    assert "X-ClickHouse-Summary:" in out and "X-ClickHouse-Timezone:" in out
    # GET is read-only, as in ClickHouse
    ddl = "CREATE%20TABLE%20default.c1%20(a%20UInt8,%20s%20String)%20ENGINE%3DMergeTree%20ORDER%20BY%20a"
    refused = curl("-i", f"{url}/?query={ddl}").stdout.decode()
    assert " 500 " in refused.splitlines()[0] and "X-ClickHouse-Exception-Code: 164" in refused
    assert curl("-X", "POST", f"{url}/?query={ddl}").returncode == 0
    # compressed request bodies, and a whole INSERT in the body
    rows = b"".join(b"%d\tgz%d\n" % (i, i) for i in range(1000))
    for enc, packed in [("gzip", gzip.compress(rows)), ("deflate", zlib.compress(rows)), ("zstd", zstd.compress(rows)),
                        ("lz4", lz4.frame.compress(rows)), ("br", brotli.compress(rows))]:  # fmt: skip
        body = tmp_path / f"rows.{enc}"
        body.write_bytes(packed)
        r = curl("-H", f"Content-Encoding: {enc}", "--data-binary", f"@{body}",
                 f"{url}/?query=INSERT%20INTO%20default.c1%20FORMAT%20TabSeparated")  # fmt: skip
        assert r.returncode == 0 and r.stdout == b"", r.stdout
    whole = b'INSERT INTO default.c1 FORMAT JSONEachRow\n{"a": 7, "s": "json"}\n'
    assert curl(url, "--data-binary", "@-", data=whole).stdout == b""
    total = curl(url, "--data-binary", "@-", data=b"SELECT count(), countIf(s = 'json') FROM default.c1")
    assert total.stdout == b"5001\t1\n"
    # response compression when asked for
    r = curl("--compressed", "-i", f"{url}/?query=SELECT%20count()%20FROM%20numbers(10)&enable_http_compression=1")
    assert b"Content-Encoding: " in r.stdout and r.stdout.endswith(b"\r\n\r\n10\n")
    bad = curl("-i", "-H", "Content-Encoding: gzip", "--data-binary", "not gzip", url).stdout.decode()
    assert "X-ClickHouse-Exception-Code: 271" in bad
    # an error after the first block: in the body, tagged. The engine reads ahead a few blocks
    # and reports an error before blocks it made earlier, so the throw is 50M rows (hundreds of
    # blocks) in: the first block and the headers have gone out by then; the filter keeps the
    # body small
    mid = quote("SELECT number, throwIf(number = 50000000) FROM numbers(100000000) WHERE number % 1000000 = 0")
    failing = curl(f"{url}/?query={mid}").stdout
    assert failing.startswith(b"0\t0\n1000000\t0\n"), failing[:200]
    assert b"__exception__" in failing and b"FUNCTION_THROW_IF_VALUE_IS_NON_ZERO" in failing


def test_authentication(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    with ServeSql(tmp_path / "store", tmp_path / "serve.log", "--sql-user", "grafana",
                  "--sql-password-file", str(secret)) as s:  # fmt: skip
        ok = clickhouse_connect.get_client(dsn=s.url.replace("http://", "http://grafana:s3cret@"))
        assert ok.query("SELECT 1").result_rows == [(1,)]
        with pytest.raises(DatabaseError) as denied:
            clickhouse_connect.get_client(dsn=s.url.replace("http://", "http://grafana:wrong@"))
        assert denied.value.code == 516 and "AUTHENTICATION_FAILED" in str(denied.value)
        headers = curl("-H", "X-ClickHouse-User: grafana", "-H", "X-ClickHouse-Key: s3cret", f"{s.url}/?query=SELECT+7")
        assert headers.stdout == b"7\n"
        anonymous = curl("-i", f"{s.url}/?query=SELECT%201").stdout.decode()
        assert " 403 " in anonymous.splitlines()[0] and "X-ClickHouse-Exception-Code: 516" in anonymous
        assert curl(f"{s.url}/ping").stdout == b"Ok.\n"  # health checks need no password


def test_non_loopback_without_password_is_refused(tmp_path: Path) -> None:
    run = subprocess.run(
        ["python", "-m", "fleetscope", "serve-sql", "--data-dir", str(tmp_path), "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "FLEETSCOPE_SQL_PASSWORD": ""},
    )  # fmt: skip
    assert run.returncode == 2
    assert "listen: 0.0.0.0:0 is reachable from other machines and no password is set" in run.stderr


def test_read_only_mode(tmp_path: Path) -> None:
    with ServeSql(tmp_path / "store", tmp_path / "serve.log", "--sql-read-only", "true") as s:
        c = clickhouse_connect.get_client(dsn=s.url)
        assert c.query("SELECT count() FROM numbers(10)").result_rows == [(10,)]
        assert c.command("SHOW DATABASES")
        for sql in ("CREATE TABLE default.t (a UInt8) ENGINE = Memory", "INSERT INTO default.t VALUES (1)",
                    "SELECT * FROM file('/etc/hostname', 'LineAsString')"):  # fmt: skip
            with pytest.raises(DatabaseError) as refused:
                c.command(sql)
            assert refused.value.code == 164, sql
        r = curl("-i", f"{s.url}/?query=INSERT%20INTO%20default.t%20FORMAT%20CSV", "--data-binary", "1").stdout
        assert b"X-ClickHouse-Exception-Code: 164" in r


def test_many_clients_at_once(server: ServeSql) -> None:
    c = client(server)
    c.command("CREATE TABLE IF NOT EXISTS default.many (w UInt32, i UInt32) ENGINE = MergeTree ORDER BY (w, i)")

    def work(w: int) -> tuple[int, int]:
        mine = client(server)
        for b in range(5):
            mine.insert("default.many", [[w] * 1000, list(range(b * 1000, (b + 1) * 1000))], column_names=["w", "i"],
                        column_oriented=True)  # fmt: skip
        got = mine.query("SELECT count(), sum(i) FROM default.many WHERE w = {w:UInt32}", parameters={"w": w})
        return got.result_rows[0]

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(work, range(24)))
    assert results == [(5000, 5000 * 4999 // 2)] * 24


def test_a_slow_select_does_not_hold_up_inserts(server: ServeSql) -> None:
    """Inserts complete while a long SELECT keeps the engine busy. The SELECT (a sipHash64
    scan that would run for hours) is seen reading in system.processes before the first
    insert, is still there after the last one, and ends only when cancelled then: every
    insert finished while it ran. An insert held up by it would wait until the SELECT's
    max_execution_time (wall clock, so no estimate ends it early) stopped it with an error."""
    c = client(server)
    c.command("CREATE TABLE IF NOT EXISTS default.fast (i UInt64) ENGINE = MergeTree ORDER BY i")
    before = c.query("SELECT count() FROM default.fast").result_rows[0][0]
    select = f"SELECT sum(sipHash64(number)), '{uuid.uuid4().hex}' FROM numbers(1000000000000)"
    backstop = "max_execution_time = 60, timeout_before_checking_execution_speed = 0"
    # the process list shows the query as sent; matching its start leaves out the queries that look for it
    mine = "startsWith(query, {select:String})"
    slow_done = threading.Event()
    ended: list[DatabaseError] = []

    def slow() -> None:
        try:
            client(server).query(f"{select} SETTINGS {backstop}")
        except DatabaseError as e:
            ended.append(e)
        finally:
            slow_done.set()

    def rows_read() -> list[int]:
        """Rows the slow SELECT has read so far, if the engine lists it as running."""
        found = c.query(f"SELECT read_rows FROM system.processes WHERE {mine}", parameters={"select": select})
        return [r[0] for r in found.result_rows]

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    try:
        wait_until(lambda: any(n > 0 for n in rows_read()), 30, "the slow SELECT reading rows")
        overlapped: list[bool] = []
        for _ in range(20):
            c.insert("default.fast", [list(range(10000))], column_names=["i"], column_oriented=True)
            overlapped.append(not slow_done.is_set())
        still_listed = len(rows_read()) == 1
    finally:
        c.command(f"KILL QUERY WHERE {mine} SYNC", parameters={"select": select})
        t.join(60)
    assert overlapped == [True] * 20, f"inserts finished only once the SELECT ended: {overlapped}"
    assert still_listed and [e.code for e in ended] == [394]  # QUERY_WAS_CANCELLED: by the KILL, not by its timeout
    assert c.query("SELECT count() FROM default.fast").result_rows[0][0] == before + 20 * 10000


def test_clickhouse_go_in_http_mode(server: ServeSql, tmp_path: Path) -> None:
    go = shutil.which("go")
    if go is None:
        require_real("Go is not installed: clickhouse-go (Grafana's client family) cannot be built")
    binary = tmp_path / "chquery"
    build = subprocess.run([go, "build", "-o", str(binary), "."], cwd=GO_CLIENT, capture_output=True, text=True,
                           timeout=600, check=False)  # fmt: skip
    if build.returncode != 0:
        pytest.fail(f"building the clickhouse-go client failed (`make go-client` fetches it):\n{build.stderr}")
    for compression in ("none", "gzip"):
        run = subprocess.run([str(binary), "-addr", server.url.removeprefix("http://"), "-compression", compression],
                             capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert run.returncode == 0, run.stderr
        out = {d["check"]: d["value"] for d in map(json.loads, run.stdout.splitlines())}
        assert out["aggregate"] == [
            {"node": f"node-{k}", "n": 330, "s": sum(i for i in range(10, 1000) if i % 3 == k)} for k in range(3)
        ]
        assert out["row"] == {"time": "2026-01-02T03:04:05.042Z", "node": "node-0", "pid": 42,
                              "args": "/bin/sh -c exit 42", "tags": ["a", "42"], "code": 42}  # fmt: skip
        assert out["streamed_rows"] == 200000
        assert out["syntax_error"]["code"] == 62
