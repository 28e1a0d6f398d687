"""The agent's pipeline_stats reports against a full spool: the loss a report's own spooling
causes is reported too, so the last report before a stop leaves nothing untold."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from fleetscope import payload
from fleetscope.codec import SCHEMAS, StringColumn, decode_batch
from fleetscope.config import AgentOptions
from node_agent.agent import STATS_STREAM, Agent
from node_agent.shipper import KafkaSink

SPOOL_MAX = 64 << 10  # 4 KiB segments


def spooled_reports(sink: KafkaSink) -> Counter[tuple[str, str]]:
    """(stream, counter) -> the sum of every pipeline_stats row still in the spool."""
    told: Counter[tuple[str, str]] = Counter()
    while (rec := sink.spool.next()) is not None:
        if rec.stream == STATS_STREAM:
            batch = decode_batch(SCHEMAS[STATS_STREAM], payload.unpack_message(rec.payload, rec.headers, 1 << 20))
            stream, counter, value = (batch.columns[name] for name in ("stream", "counter", "value"))
            assert isinstance(stream, StringColumn) and isinstance(counter, StringColumn)
            for s, c, v in zip(stream.decoded(), counter.decoded(), np.asarray(value).tolist(), strict=True):
                told[s, c] += v
    return told


def test_the_loss_a_report_causes_is_reported(tmp_path: Path) -> None:
    sink = KafkaSink(("127.0.0.1:9",), "t", tmp_path / "spool", SPOOL_MAX)
    sink.spool.open()
    agent = Agent(AgentOptions(), sink)
    rng = np.random.default_rng(1)
    seq = 0

    def put(size: int) -> None:  # an incompressible exec batch of 100 rows
        nonlocal seq
        seq += 1
        sink.spool.append("process_exec", f"b-{seq}", seq, 100, 0, b"k", [("fs-encoding", b"lz4")], 1,
                          rng.bytes(size))  # fmt: skip

    for _ in range(3):  # a broker that is away: the spool overflows, reports in between
        for _ in range(50):
            put(1500)
        agent.report_stats()
    # one more loss to report, then the spool full to the last few bytes: the final report
    # itself must evict exec batches
    evicted_before = sink.counters["process_exec.rows_spool_evicted"]
    while sink.counters["process_exec.rows_spool_evicted"] == evicted_before:
        put(1500)
    while sink.spool.bytes + 400 < SPOOL_MAX:  # a report takes about 700 bytes
        put(60)
    evicted_before = sink.counters["process_exec.rows_spool_evicted"]
    agent.report_stats()
    assert sink.counters["process_exec.rows_spool_evicted"] > evicted_before
    told = spooled_reports(sink)
    for unit in ("rows", "batches"):
        assert told["process_exec", f"{unit}_spool_evicted"] == sink.counters[f"process_exec.{unit}_spool_evicted"]
    sink.spool.close()
