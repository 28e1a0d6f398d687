"""The ingester's guards without a broker: what is dead-lettered before decoding and why, the
dead-letter headers, the in-flight bound's accounting, health and the Prometheus text."""

from __future__ import annotations

from aiokafka import ConsumerRecord, TopicPartition

from fleetscope import metrics
from ingester import dlq
from ingester.app import screen
from ingester.dlq import DeadLetters
from ingester.health import Health
from ingester.inflight import InFlight

TOPIC = "fleetscope.process_exit.v1"


def record(value: bytes | None = b"x" * 10, headers: list[tuple[str, bytes]] | None = None, topic: str = TOPIC,
           offset: int = 7, partition: int = 2, key: bytes | None = b"node-a") -> ConsumerRecord:  # fmt: skip
    return ConsumerRecord(topic, partition, offset, 0, 0, key, value, None, len(key or b""), len(value or b""),
                          headers or [])  # fmt: skip


def test_screen_passes_batches_of_this_major_and_stream() -> None:
    assert screen(record(), "process_exit", 1 << 20) is None
    newer_minor = record(headers=[("fs-schema", b"fleetscope.v1.process_exit;minor=9")])
    assert screen(newer_minor, "process_exit", 1 << 20) is None


def test_screen_dead_letters_other_majors_streams_sizes_and_topics() -> None:
    v2 = record(headers=[("fs-schema", b"fleetscope.v2.process_exit;minor=0")])
    assert screen(v2, "process_exit", 1 << 20)[0] == dlq.UNKNOWN_VERSION  # type: ignore[index]
    other = record(headers=[("fs-schema", b"fleetscope.v1.process_exec;minor=1")])
    kind, reason = screen(other, "process_exit", 1 << 20)  # type: ignore[misc]
    assert kind == dlq.MALFORMED and "process_exec" in reason
    junk = record(headers=[("fs-schema", b"\xff\xfe" * 500)])
    assert screen(junk, "process_exit", 1 << 20)[0] == dlq.MALFORMED  # type: ignore[index]
    assert screen(record(value=b"x" * 101), "process_exit", 100)[0] == dlq.OVERSIZED  # type: ignore[index]
    assert screen(record(topic="fleetscope.process_exit.v2"), None, 100)[0] == dlq.UNKNOWN_TOPIC  # type: ignore[index]


def test_dead_letter_headers_say_why_and_where_and_cannot_be_spoofed() -> None:
    letters = DeadLetters("dlq", "ingester-h-1", lambda rec, kind: None)
    rec = record(headers=[("fs-batch-id", b"b-1"), ("fs-dlq-reason", b"forged"), ("fs-source", b"forged")])
    headers = letters.headers(rec, dlq.MALFORMED, "r" * 5000)
    assert headers[:4] == [("fs-dlq-kind", b"malformed"), ("fs-dlq-reason", b"r" * 1024),
                           ("fs-source", f"{TOPIC}/2@7".encode()), ("fs-dlq-ingester", b"ingester-h-1")]  # fmt: skip
    assert headers[4:] == [("fs-batch-id", b"b-1")]


def test_in_flight_counts_bytes_until_done_and_drops_revoked_partitions() -> None:
    a, b = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    fl = InFlight()
    fl.add(a, [record(b"x" * 100, offset=1), record(b"x" * 100, offset=2)])
    fl.add(b, [record(b"x" * 50, offset=1)])
    per = 100 + len(b"node-a")
    assert (len(fl), fl.bytes) == (3, 2 * per + 50 + 6)
    [(tp, rec)] = fl.take(per)  # as many as fit in the bytes given (the second does not)
    assert (tp, rec.offset) == (a, 1) and fl.bytes == 2 * per + 56  # counted until done
    assert fl.taken_from() == {a}
    assert fl.drop({a}) == 1 and fl.bytes == per + 56
    fl.done()
    assert (len(fl), fl.bytes) == (1, 56)
    assert [r.offset for _, r in fl.take(1)] == [1]  # at least one, whatever its size
    fl.done()
    fl.add(a, [record(b"x" * 100, offset=3), record(b"x" * 100, offset=4)])
    assert [r.offset for _, r in fl.take(10 * per)] == [3, 4] and len(fl) == 2


def test_health_reports_problems_with_their_age() -> None:
    h = Health()
    assert h.ready
    h.fail("insert", "clickhouse inserts failing: refused")
    h.fail("insert", "clickhouse inserts failing: timeout")  # same problem, newer text
    assert not h.ready and h.reasons()[0].startswith("clickhouse inserts failing: timeout (for 0s)")
    assert h.ok("insert") and not h.ok("insert") and h.ready


def test_exposition_renders_and_parses_back() -> None:
    m = metrics.Exposition("fs")
    m.counter("rows", "rows", 5, {"stream": 'a"b\\c'})
    m.gauge("lag", "lag", 3.5)
    hist = metrics.Histogram([0.1, 1.0])
    for v in (0.05, 0.5, 5.0):
        hist.observe(v)
    m.histogram("insert_seconds", "latency", hist)
    text = m.render()
    assert "# TYPE fs_rows_total counter" in text and "# TYPE fs_insert_seconds histogram" in text
    samples = metrics.parse(text)
    assert samples["fs_rows_total", frozenset({("stream", 'a"b\\c')})] == 5
    assert samples["fs_lag", frozenset()] == 3.5
    assert samples["fs_insert_seconds_bucket", frozenset({("le", "1")})] == 2
    assert samples["fs_insert_seconds_bucket", frozenset({("le", "+Inf")})] == 3
    assert samples["fs_insert_seconds_count", frozenset()] == 3
