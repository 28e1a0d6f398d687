// chquery exercises fleetscope's ClickHouse HTTP interface with clickhouse-go in HTTP mode,
// the client family Grafana's ClickHouse datasource uses. It prints one JSON object per
// check on stdout; tests/integration/test_sql_http.py runs it and checks the values.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
)

func emit(check string, value any) {
	out, _ := json.Marshal(map[string]any{"check": check, "value": value})
	fmt.Println(string(out))
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
	os.Exit(1)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8123", "host:port of the HTTP interface")
	user := flag.String("user", "default", "user")
	password := flag.String("password", "", "password")
	compression := flag.String("compression", "none", "none or gzip")
	flag.Parse()

	opts := &clickhouse.Options{
		Addr:        []string{*addr},
		Protocol:    clickhouse.HTTP,
		Auth:        clickhouse.Auth{Database: "default", Username: *user, Password: *password},
		DialTimeout: 10 * time.Second,
	}
	if *compression == "gzip" {
		opts.Compression = &clickhouse.Compression{Method: clickhouse.CompressionGZIP}
	}
	ctx := context.Background()

	// database/sql, as Grafana's datasource uses it
	db := clickhouse.OpenDB(opts)
	defer db.Close()
	if err := db.PingContext(ctx); err != nil {
		fail("ping", err)
	}
	var version string
	if err := db.QueryRowContext(ctx, "SELECT version()").Scan(&version); err != nil {
		fail("version", err)
	}
	emit("version", version)

	conn, err := clickhouse.Open(opts)
	if err != nil {
		fail("open", err)
	}
	defer conn.Close()
	if err := conn.Exec(ctx, "DROP TABLE IF EXISTS default.go_events"); err != nil {
		fail("drop", err)
	}
	ddl := `CREATE TABLE default.go_events (
		time DateTime64(9, 'UTC'), node LowCardinality(String), pid UInt32, args String,
		tags Array(String), code Nullable(Int32)) ENGINE = MergeTree ORDER BY (node, time)`
	if err := conn.Exec(ctx, ddl); err != nil {
		fail("create", err)
	}
	batch, err := conn.PrepareBatch(ctx, "INSERT INTO default.go_events")
	if err != nil {
		fail("prepare batch", err)
	}
	base := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for i := 0; i < 1000; i++ {
		var code *int32
		if i%2 == 0 {
			c := int32(i)
			code = &c
		}
		node := fmt.Sprintf("node-%d", i%3)
		args := fmt.Sprintf("/bin/sh -c exit %d", i)
		if err := batch.Append(base.Add(time.Duration(i)*time.Millisecond), node, uint32(i), args,
			[]string{"a", fmt.Sprint(i)}, code); err != nil {
			fail("append", err)
		}
	}
	if err := batch.Send(); err != nil {
		fail("send", err)
	}

	// an aggregate with a bound parameter, over database/sql
	rows, err := db.QueryContext(ctx,
		"SELECT node, count() AS n, sum(pid) AS s FROM default.go_events WHERE pid >= {min:UInt32} GROUP BY node ORDER BY node",
		clickhouse.Named("min", "10"))
	if err != nil {
		fail("aggregate", err)
	}
	agg := []map[string]any{}
	for rows.Next() {
		var node string
		var n, s uint64
		if err := rows.Scan(&node, &n, &s); err != nil {
			fail("scan aggregate", err)
		}
		agg = append(agg, map[string]any{"node": node, "n": n, "s": s})
	}
	if err := rows.Err(); err != nil {
		fail("aggregate rows", err)
	}
	emit("aggregate", agg)

	// every column type of the table, one row back
	var (
		t    time.Time
		node string
		pid  uint32
		args string
		tags []string
		code *int32
	)
	row := conn.QueryRow(ctx, "SELECT time, node, pid, args, tags, code FROM default.go_events WHERE pid = 42")
	if err := row.Scan(&t, &node, &pid, &args, &tags, &code); err != nil {
		fail("scan row", err)
	}
	emit("row", map[string]any{"time": t.Format(time.RFC3339Nano), "node": node, "pid": pid, "args": args,
		"tags": tags, "code": code})

	// a result of many blocks streams through
	var total uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM (SELECT number FROM numbers(300000))").Scan(&total); err != nil {
		fail("count", err)
	}
	many, err := conn.Query(ctx, "SELECT number, toString(number) FROM numbers(200000)")
	if err != nil {
		fail("many", err)
	}
	var seen uint64
	for many.Next() {
		var n uint64
		var s string
		if err := many.Scan(&n, &s); err != nil {
			fail("scan many", err)
		}
		seen++
	}
	if err := many.Err(); err != nil {
		fail("many rows", err)
	}
	emit("streamed_rows", seen)

	// a server error reaches the client as a ClickHouse exception with its code
	_, err = conn.Query(ctx, "SELEC 1")
	var ex *clickhouse.Exception
	if errors.As(err, &ex) {
		emit("syntax_error", map[string]any{"code": ex.Code, "name": ex.Name})
	} else {
		emit("syntax_error", map[string]any{"error": fmt.Sprint(err)})
	}
}
