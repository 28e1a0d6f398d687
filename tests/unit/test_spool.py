"""The agent's disk spool: order, restart, crash, damage, eviction, and the memory bound of
the Kafka sink in front of it while no broker answers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetscope.config import ConfigError
from node_agent.batcher import Batch
from node_agent.shipper import KafkaSink
from node_agent.spool import HEAD, Spool, SpoolError, SpoolRecord, scan


def put(spool: Spool, seq: int, rows: int = 10, size: int = 1000, stream: str = "process_exec") -> None:
    payload = bytes([seq % 251]) * size
    spool.append(stream, f"m-{stream}-1-{seq}", seq, rows, 1000 + seq, b"node", [("fs-batch-id", b"x")], 1, payload)


def drain(spool: Spool, ack: bool = True) -> list[SpoolRecord]:
    out = []
    while (rec := spool.next()) is not None:
        out.append(rec)
        if ack:
            spool.ack(rec)
    return out


def opened(path: Path, max_bytes: int = 1 << 20, segment_bytes: int | None = 8192) -> Spool:
    spool = Spool(path, max_bytes, Counter(), segment_bytes)
    spool.open()
    return spool


def test_records_come_back_in_order_and_acknowledged_segments_go(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for seq in range(1, 31):
        put(spool, seq)
    assert spool.segments > 1  # 8 KiB segments
    recs = drain(spool)
    assert [r.sequence for r in recs] == list(range(1, 31))
    assert recs[4].payload == bytes([5]) * 1000 and recs[4].key == b"node" and recs[4].rows == 10
    assert recs[4].headers == (("fs-batch-id", b"x"),) and recs[4].batch_id == "m-process_exec-1-5"
    assert spool.pending_batches == 0 and spool.segments <= 1
    spool.close()
    assert not list(tmp_path.glob("*.seg")) or all(p.stat().st_size == 0 for p in tmp_path.glob("*.seg"))


def test_a_backlog_beyond_the_memory_tail_comes_back_whole_and_in_order(tmp_path: Path) -> None:
    """Records just appended are handed over from memory, older ones read from disk: a reader
    that falls behind by more than the in-memory tail gets every batch, once, in order."""
    spool = opened(tmp_path, max_bytes=64 << 20, segment_bytes=3 << 20)
    for seq in range(1, 4):
        put(spool, seq, size=1 << 20)
        assert spool.next().sequence == seq  # type: ignore[union-attr]
    for seq in range(4, 16):  # 12 MiB behind the reader: more than the tail keeps
        put(spool, seq, size=1 << 20)
    recs = drain(spool, ack=False)
    put(spool, 16, size=1 << 20)
    recs += drain(spool, ack=False)
    assert [r.sequence for r in recs] == list(range(4, 17))
    assert all(r.payload == bytes([r.sequence]) * (1 << 20) and r.headers == (("fs-batch-id", b"x"),) for r in recs)
    spool.close()
    again = opened(tmp_path, max_bytes=64 << 20)  # nothing was acknowledged: all of it is still there
    assert [r.sequence for r in drain(again)] == list(range(1, 17))
    again.close()


def test_what_was_not_acknowledged_survives_a_restart(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for seq in range(1, 21):
        put(spool, seq)
    first = [spool.next() for _ in range(8)]
    for rec in first[:5]:
        assert rec is not None
        spool.ack(rec)  # 6, 7, 8 were handed to the producer but never acknowledged
    spool.close()
    again = opened(tmp_path)
    assert again.pending_batches == 15
    assert [r.sequence for r in drain(again)] == list(range(6, 21))
    again.close()


def test_a_killed_writer_loses_nothing_it_appended(tmp_path: Path) -> None:
    """SIGKILL right after appending: the records are in the page cache, hence in the file."""
    script = (
        "import os, signal, sys\n"
        "from collections import Counter\n"
        "from pathlib import Path\n"
        "from node_agent.spool import Spool\n"
        f"s = Spool(Path({str(tmp_path)!r}), 1 << 20, Counter(), 8192)\n"
        "s.open()\n"
        "for seq in range(1, 41):\n"
        "    s.append('process_exec', f'b-{seq}', seq, 3, 0, b'k', [], 1, b'p' * 700)\n"
        "for _ in range(10):\n"
        "    s.ack(s.next())\n"
        "s.checkpoint()\n"  # the cursor: 10 acknowledged
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -signal.SIGKILL
    spool = opened(tmp_path)  # the dead process's lock went with it
    assert [r.batch_id for r in drain(spool)] == [f"b-{seq}" for seq in range(11, 41)]
    spool.close()


def test_a_torn_tail_is_quarantined_and_counted(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=1 << 20)
    for seq in range(1, 11):
        put(spool, seq, rows=7)
    spool.close()
    (seg,) = tmp_path.glob("*.seg")
    os.truncate(seg, seg.stat().st_size - 300)  # the last record lost its end (power cut)
    again = opened(tmp_path)
    assert [r.sequence for r in drain(again)] == list(range(1, 10))
    assert again.counters["process_exec.rows_spool_corrupt"] == 7
    assert again.counters["process_exec.rows_dropped"] == 7
    assert again.counters["process_exec.batches_spool_corrupt"] == 1
    assert again.counters["spool_files_quarantined"] == 1
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    again.close()


def test_a_flipped_payload_byte_and_a_broken_head_are_skipped_and_counted(tmp_path: Path) -> None:
    spool = opened(tmp_path, segment_bytes=1 << 20)
    for seq in range(1, 11):
        put(spool, seq, rows=5)
    spool.close()
    (seg,) = tmp_path.glob("*.seg")
    data = bytearray(seg.read_bytes())
    size = len(data) // 10  # equal records
    data[3 * size + HEAD.size + 200] ^= 0xFF  # payload of record 4 (its meta is ~150 bytes)
    data[6 * size + 2] ^= 0xFF  # the magic of record 7: its head no longer checks out
    seg.write_bytes(bytes(data))
    again = opened(tmp_path)
    assert [r.sequence for r in drain(again)] == [1, 2, 3, 5, 6, 8, 9, 10]
    assert again.counters["process_exec.rows_spool_corrupt"] == 5  # record 4: its head says what it held
    assert again.counters["spool_bytes_unreadable"] == size  # record 7: just bytes
    again.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, 30000), st.integers(0, 255)), max_size=8),
       truncate=st.integers(0, 30000), garbage=st.binary(max_size=2000))  # fmt: skip
def test_any_damage_is_survived_and_accounted(
    tmp_path_factory: pytest.TempPathFactory, cuts: list[tuple[int, int]], truncate: int, garbage: bytes
) -> None:
    """Whatever happened to the files, opening never fails, and every batch is either
    read back intact or counted as lost (per stream when its head survived)."""
    path = tmp_path_factory.mktemp("spool")
    spool = opened(path, segment_bytes=1 << 20)
    for seq in range(1, 21):
        put(spool, seq, rows=1)
    spool.close()
    (seg,) = path.glob("*.seg")
    pristine = seg.read_bytes()
    with open(seg, "rb") as f:
        spans = {r.record.sequence: (r.record.offset, r.record.offset + r.size)
                 for r in scan(f.fileno(), 1, 0, len(pristine)) if r.record is not None}  # fmt: skip
    data = bytearray(pristine)
    for pos, value in cuts:
        data[pos % len(data)] = value
    damaged = bytes(data[: truncate or len(data)])
    seg.write_bytes(damaged + garbage)
    (path / "00000000000000ff.seg").write_bytes(garbage)  # a file that is not a spool segment
    again = opened(path)
    recs = drain(again)
    assert all(r.payload == bytes([r.sequence % 251]) * 1000 for r in recs)
    assert len({r.sequence for r in recs}) == len(recs)
    # a record whose bytes are all there and untouched comes back, and only those
    intact = {
        s for s, (start, end) in spans.items() if end <= len(damaged) and damaged[start:end] == pristine[start:end]
    }
    assert {r.sequence for r in recs} == intact
    assert len(recs) + again.counters["process_exec.batches_spool_corrupt"] <= 20
    again.close()


def test_a_full_spool_evicts_the_oldest_and_counts_exactly(tmp_path: Path) -> None:
    spool = opened(tmp_path, max_bytes=64 << 10, segment_bytes=8 << 10)
    for seq in range(1, 201):
        put(spool, seq, rows=seq % 7 + 1)
        if seq % 50 == 0:
            put(spool, seq, rows=3, size=200, stream="pipeline_stats")
    assert spool.bytes <= 64 << 10
    recs = drain(spool)
    kept = [r for r in recs if r.stream == "process_exec"]
    seqs = [r.sequence for r in kept]
    assert seqs == list(range(seqs[0], 201))  # the newest ones, in order
    evicted = sum(seq % 7 + 1 for seq in range(1, seqs[0]))
    assert spool.counters["process_exec.rows_spool_evicted"] == evicted
    assert spool.counters["process_exec.rows_dropped"] == evicted
    assert spool.counters["process_exec.batches_spool_evicted"] == seqs[0] - 1
    # the agent's own counters are moved forward, not evicted: all four arrive
    assert len([r for r in recs if r.stream == "pipeline_stats"]) == 4
    assert spool.counters["pipeline_stats.rows_dropped"] == 0
    spool.close()


def test_a_segment_evicted_under_a_batch_in_flight(tmp_path: Path) -> None:
    """A batch being sent when its segment is evicted counts as shipped if Kafka takes it,
    as evicted if the agent stops before."""
    spool = opened(tmp_path, max_bytes=32 << 10, segment_bytes=8 << 10)
    put(spool, 1)
    put(spool, 2)
    a, b = spool.next(), spool.next()
    assert a is not None and b is not None
    for seq in range(3, 60):
        put(spool, seq)
    assert not spool.is_live(a)
    spool.ack(a)
    assert spool.release(b) is False
    assert spool.counters["process_exec.rows_spool_evicted"] == 10 + 10 * (drain(spool)[0].sequence - 3)
    spool.close()


def test_one_spool_one_agent(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    with pytest.raises(SpoolError, match=r"in use by another agent \(pid \d+\); give each agent its own spool_dir"):
        opened(tmp_path)
    spool.close()
    opened(tmp_path).close()  # released


def test_an_unwritable_spool_dir_is_a_config_error() -> None:
    # procfs refuses directories even to root, so this runs whoever runs the suite
    with pytest.raises(ConfigError, match="spool_dir: cannot use"):
        opened(Path("/proc/self/fleetscope-spool"))


def test_a_file_in_place_of_the_spool_dir_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("")
    with pytest.raises(ConfigError, match=r"spool_dir: cannot use .*set spool_dir \(--spool-dir"):
        opened(tmp_path / "spool")


async def test_memory_stays_bounded_while_no_broker_answers(tmp_path: Path) -> None:
    """256 MiB of batches into a sink whose broker never answers: they go to the disk spool
    (bounded at 64 MiB, the oldest evicted and counted), not to memory."""
    sink = KafkaSink(("127.0.0.1:1",), "fleetscope", tmp_path / "spool", 64 << 20)
    await sink.start()
    payload = os.urandom(1 << 20)  # incompressible: the sink's LZ4 frames are as big
    tracemalloc.start()
    try:
        for seq in range(1, 257):
            sink.submit(Batch("process_exec", f"m-process_exec-1-{seq}", seq, 1000, payload, b"n", 0))
            await asyncio.sleep(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    status = sink.status()
    assert peak < 16 << 20, f"{peak} bytes allocated for 256 MiB of batches"
    assert status["bytes"] <= 64 << 20 and status["connected"] is False
    kept = status["batches"]
    assert kept < 256
    assert sink.counters["process_exec.batches_spool_evicted"] == 256 - kept
    assert sink.counters["process_exec.rows_spool_evicted"] == 1000 * (256 - kept)
    await sink.stop(1.0)
    assert sink.counters["process_exec.rows_dropped"] == 1000 * (256 - kept)  # nothing more: the rest waits on disk
    again = opened(tmp_path / "spool", max_bytes=64 << 20)
    assert again.pending_batches == kept
    again.close()


def test_spool_settings() -> None:
    from fleetscope.config import AgentSettings, build

    s = build(AgentSettings, {"brokers": "k:9092"}, {})
    assert s.spool_dir == Path("/var/lib/fleetscope/spool") and s.spool_max_bytes == 1 << 30
    s = build(
        AgentSettings, {"brokers": "k:9092"}, {"FLEETSCOPE_SPOOL_DIR": "/x", "FLEETSCOPE_SPOOL_MAX_BYTES": "64MiB"}
    )
    assert s.spool_dir == Path("/x") and s.spool_max_bytes == 64 << 20
    with pytest.raises(ConfigError, match=r"spool_max_bytes: 1048576 holds fewer than 4 batches .* at least 4194304"):
        build(AgentSettings, {"brokers": "k:9092", "spool_max_bytes": "1MiB"}, {})


def test_an_unreadable_segment_is_set_aside(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    put(spool, 1)
    spool.close()
    (seg,) = tmp_path.glob("*.seg")
    seg.unlink()
    seg.mkdir()  # reading it fails (EISDIR), like an I/O error would
    again = opened(tmp_path)
    assert again.pending_batches == 0 and again.counters["spool_files_quarantined"] == 1
    put(again, 2)
    assert [r.sequence for r in drain(again)] == [2]
    again.close()
