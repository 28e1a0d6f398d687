"""The agent's disk spool: every batch is appended here before it is sent to Kafka.

Layout of ``spool_dir``::

    0000000000000007.seg   segments: append-only files of records, oldest id first
    cursor                 {"segment": id, "offset": n}: the first record not yet acknowledged
    lock                   flock(2)ed by the agent that owns the directory (and its pid)
    quarantine/            damaged segments found at start, kept for inspection (at most 4)

A record is a 20-byte head, a JSON meta part (stream, batch id, sequence, rows, created,
Kafka key and headers, schema major) and the payload, the Kafka message value as it is sent:
the batch compressed once by KafkaSink (an LZ4 frame, header ``fs-encoding: lz4``; records of
agents before that hold the encoded batch itself, without the header)::

    magic "FSR1" | u32 meta_len | u32 payload_len | u32 payload_crc | u32 head_crc
    meta (meta_len bytes) | payload (payload_len bytes)

``head_crc`` is the CRC-32 of the first 16 bytes and the meta, ``payload_crc`` that of the
payload (zlib's CRC-32: about 1 GB/s here, no extra dependency). A record whose head is
intact but whose payload is torn or corrupt is still counted per stream and rows; a bad
head is skipped by searching for the next magic whose head checks out.

Durability: a record is safe from an agent crash (SIGKILL, OOM kill) once ``append``
returned (it is in the kernel's page cache). Against power loss or a kernel crash,
segments holding unacknowledged records are fdatasync'ed at most ``SYNC_INTERVAL`` after
they were written, by the caller's worker thread (``sync_fds``), so the drain loop never
waits for the disk. Acknowledged segments are deleted; with a healthy broker they usually
are before the kernel's writeback (30 s) writes them at all. The latest appends (at most
``TAIL_MAX_BYTES``) are also kept in memory, so a sender that keeps up gets them back without
reading and checking them again; the file stays the copy that survives a crash.

The spool is bounded by ``max_bytes`` on disk (segments plus quarantine). When an append
does not fit, quarantined files go first, then the oldest segments, whole: their records
not yet handed to the producer are lost, counted per stream as ``rows_dropped`` and
``rows_spool_evicted`` (and ``batches_*``). Records of the agent's own ``pipeline_stats``
stream are moved forward (appended again) instead of evicted, so the counts that explain a
loss are not lost with it, while they take at most a quarter of the spool (beyond that,
weeks of counters with no broker, they are evicted and counted too). Not thread-safe: one
event loop owns it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import struct
import time
import zlib
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetscope.config import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"FSR1"
HEAD = struct.Struct("<4sIIII")  # magic, meta_len, payload_len, payload_crc, head_crc
MAX_META_BYTES = 64 << 10
MAX_PAYLOAD_BYTES = 256 << 20
SEGMENT_MAX_BYTES = 16 << 20  # segments are max_bytes / 16, between 4 KiB and this
SEGMENT_MIN_BYTES = 4 << 10
IDLE_ROLL_BYTES = 1 << 20  # a fully acknowledged active segment this big is rolled and deleted
QUARANTINE_KEEP = 4
SYNC_INTERVAL = 1.0  # seconds; see the module docstring
STATS_STREAM = "pipeline_stats"
SALVAGE_SHARE = 4  # pipeline_stats records move forward while they take at most max_bytes / 4
TAIL_MAX_BYTES = 4 << 20  # payloads of the latest appends kept in memory for next(); see Spool._from_tail

# per-stream counters this module adds to (rows_dropped/batches_dropped: every loss)
EVICTED = "spool_evicted"
CORRUPT = "spool_corrupt"


class SpoolError(ConfigError):
    """The spool directory cannot be used (permissions, another agent); names spool_dir and the fix."""


class SpoolWriteError(OSError):
    """An append failed (disk full, I/O error); the batch was not spooled."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One spooled batch: where it is, what it is, and (when read for sending) its bytes."""

    segment: int
    offset: int
    size: int  # bytes on disk, head included
    stream: str
    batch_id: str
    sequence: int
    rows: int
    created_ns: int
    key: bytes
    headers: tuple[tuple[str, bytes], ...]
    major: int
    payload: bytes = b""
    salvaged: bool = False


def encode_record(meta: dict[str, Any], payload: bytes) -> list[bytes]:
    """The buffers of one record, for a single writev."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    partial = struct.pack("<4sIII", MAGIC, len(meta_bytes), len(payload), zlib.crc32(payload))
    head = partial + struct.pack("<I", zlib.crc32(meta_bytes, zlib.crc32(partial)))
    return [head, meta_bytes, payload]


def record_meta(stream: str, batch_id: str, sequence: int, rows: int, created_ns: int, key: bytes,
                headers: Sequence[tuple[str, bytes]], major: int,
                salvaged: bool = False) -> dict[str, Any]:  # fmt: skip
    """The meta part of a record (header values are latin-1 so any bytes round-trip)."""
    meta: dict[str, Any] = {
        "stream": stream, "batch_id": batch_id, "sequence": sequence, "rows": rows, "created_ns": created_ns,
        "key": key.decode("latin-1"), "headers": [[k, v.decode("latin-1")] for k, v in headers], "major": major,
    }  # fmt: skip
    if salvaged:
        meta["salvaged"] = True
    return meta


def _record(segment: int, offset: int, size: int, meta: dict[str, Any], payload: bytes) -> SpoolRecord:
    return SpoolRecord(
        segment, offset, size, str(meta["stream"]), str(meta["batch_id"]), int(meta["sequence"]), int(meta["rows"]),
        int(meta["created_ns"]), str(meta["key"]).encode("latin-1"),
        tuple((str(k), str(v).encode("latin-1")) for k, v in meta["headers"]), int(meta["major"]), payload,
        bool(meta.get("salvaged", False)),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Read:
    """What is at an offset: "ok" (a record), "damaged" (its meta is readable, the payload
    torn or corrupt), "bad" (no readable head there: skip `size` bytes to resync)."""

    kind: str
    size: int
    record: SpoolRecord | None = None


def _head(fd: int, segment: int, offset: int, end: int) -> tuple[SpoolRecord, int, int] | None:
    """The record (without payload), payload length and CRC at offset, if a head checks out there."""
    head = os.pread(fd, HEAD.size, offset) if end - offset >= HEAD.size else b""
    if len(head) < HEAD.size:
        return None
    magic, meta_len, payload_len, payload_crc, head_crc = HEAD.unpack(head)
    if magic != MAGIC or meta_len > MAX_META_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        return None
    meta_bytes = os.pread(fd, meta_len, offset + HEAD.size)
    if len(meta_bytes) < meta_len or zlib.crc32(meta_bytes, zlib.crc32(head[:16])) != head_crc:
        return None
    try:
        rec = _record(segment, offset, HEAD.size + meta_len + payload_len, json.loads(meta_bytes), b"")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return rec, payload_len, payload_crc


def read_at(fd: int, segment: int, offset: int, end: int, payload: bool = True) -> _Read:
    """Read and check the record at offset of a segment whose data ends at end."""
    found = _head(fd, segment, offset, end)
    if found is None:
        return _Read("bad", _resync(fd, offset + 1, end) - offset)
    rec, payload_len, payload_crc = found
    if offset + rec.size > end:  # torn: the write never completed
        return _Read("damaged", end - offset, rec)
    if not payload:
        return _Read("ok", rec.size, rec)
    data = os.pread(fd, payload_len, offset + rec.size - payload_len)
    if len(data) < payload_len:
        return _Read("damaged", end - offset, rec)
    if zlib.crc32(data) != payload_crc:
        return _Read("damaged", rec.size, rec)
    return _Read("ok", rec.size, dataclasses.replace(rec, payload=data))


def _resync(fd: int, start: int, end: int) -> int:
    """The offset of the next record head that checks out, at or after start (end if none)."""
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            break
        i = chunk.find(MAGIC)
        while i >= 0:
            if _head(fd, -1, pos + i, end) is not None:
                return pos + i
            i = chunk.find(MAGIC, i + 1)
        pos += max(len(chunk) - len(MAGIC) + 1, 1)
    return end


def scan(fd: int, segment: int, start: int, end: int, payload: bool = False) -> Iterator[_Read]:
    """Every record (or damaged stretch) of a segment from start to end."""
    pos = start
    while pos < end:
        r = read_at(fd, segment, pos, end, payload)
        yield r
        pos += max(r.size, 1)


@dataclass
class _Segment:
    id: int
    path: Path
    size: int
    unsynced: bool = False  # written since the last fdatasync, and not yet acknowledged

    @property
    def name(self) -> str:
        return self.path.name


def segment_name(segment: int) -> str:
    return f"{segment:016x}.seg"


@dataclass
class OpenReport:
    """What the spool found at start, for the log."""

    segments: int = 0
    batches: int = 0
    bytes: int = 0
    quarantined: list[str] | None = None


class Spool:
    """Bounded, append-only, crash-safe store of encoded batches; see the module docstring.

    Appends go to the active segment; ``next()`` reads records in order for sending;
    ``ack()`` marks one delivered. Segments whose every record was acknowledged are
    deleted. Loss (eviction, damaged records) is counted in ``counters``, shared with the
    sink: ``<stream>.rows_dropped``, ``<stream>.rows_spool_evicted``, ... and the node-level
    ``spool_files_quarantined``, ``spool_bytes_unreadable``.
    """

    def __init__(self, directory: Path, max_bytes: int, counters: Counter[str] | None = None,
                 segment_bytes: int | None = None) -> None:  # fmt: skip
        self.dir = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(SEGMENT_MIN_BYTES, min(SEGMENT_MAX_BYTES, max_bytes // 16))
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._segments: dict[int, _Segment] = {}  # ascending ids; the last may be the active one
        self._active: _Segment | None = None
        self._fd: int | None = None  # append fd of the active segment
        self._read_seg: int | None = None  # segment and offset of the next record to read
        self._read_off = 0
        self._read_fd: tuple[int, int] | None = None  # (segment, fd)
        self._unacked: deque[list[Any]] = deque()  # [segment, offset, done, record] read, not acked
        self._tail: deque[SpoolRecord] = deque()  # latest appends, with payloads, not yet read
        self._tail_bytes = 0
        self.stats_bytes = 0  # bytes of pipeline_stats records in the spool, not acknowledged
        self._lock_fd: int | None = None
        self._next_id = 1
        self._quarantine: list[tuple[Path, int]] = []  # oldest first, with sizes
        self._cursor: tuple[int, int] | None = None  # last written
        self._to_sync: list[int] = []  # dups of rolled segments' fds, for the next checkpoint
        self.pending_batches = 0  # records in the spool not yet acknowledged
        self.evicting_since = 0.0  # monotonic time of the last eviction (0: never)
        self._evict_logged = 0.0
        self._evicted_unlogged = 0
        self.last_error = ""

    # -- start and stop --------------------------------------------------------------------

    def open(self) -> OpenReport:
        """Lock the directory, drop what the cursor says was acknowledged, check every
        other record, quarantine damaged segments (keeping their good records)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.dir / "quarantine").mkdir(exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolError(
                f"spool_dir: cannot use {self.dir}: {e.strerror}; run the agent as root, or set spool_dir "
                "(--spool-dir, FLEETSCOPE_SPOOL_DIR) to a directory it may write"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolError(
                f"spool_dir: {self.dir} is in use by another agent (pid {owner}); give each agent its own spool_dir"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        kept = sorted((p.stat().st_mtime, p) for p in (self.dir / "quarantine").iterdir())
        self._quarantine = [(p, p.stat().st_size) for _, p in kept]
        cursor = self._read_cursor()
        report = OpenReport(quarantined=[])
        for path in sorted(self.dir.glob("*.tmp")):
            path.unlink()  # a salvage interrupted by a crash; its original is still there
        for path in sorted(self.dir.glob("*.seg")):
            try:
                seg_id = int(path.stem, 16)
            except ValueError:
                log.warning("spool: ignoring %s (not a segment name)", path)
                continue
            self._next_id = max(self._next_id, seg_id + 1)
            start = 0
            if cursor is not None and seg_id < cursor[0]:
                path.unlink()  # acknowledged before the last stop
                continue
            if cursor is not None and seg_id == cursor[0]:
                start = cursor[1]
            try:
                checked = self._check_segment(seg_id, path, start, report)
            except OSError as e:  # unreadable (EIO, permissions): set aside, never fatal
                checked = None
                self.counters["spool_files_quarantined"] += 1
                report.quarantined.append(path.name)  # type: ignore[union-attr]
                log.error("spool: cannot read %s (%s); moving it to quarantine/, its batches are lost", path, e)
                with contextlib.suppress(OSError):
                    os.rename(path, self.dir / "quarantine" / f"{path.name}.{time.time_ns():x}")
            if checked is not None:
                self._segments[seg_id], read_from = checked
                if self._read_seg is None:
                    self._read_seg, self._read_off = seg_id, read_from
        self._trim_quarantine()
        report.segments = len(self._segments)
        report.batches = self.pending_batches
        report.bytes = self.bytes
        self._write_cursor()
        return report

    def _check_segment(self, seg_id: int, path: Path, start: int, report: OpenReport) -> tuple[_Segment, int] | None:
        """Check the segment's records from start; quarantine it when any is damaged. Returns
        the segment and where its first unacknowledged record is."""
        size = path.stat().st_size
        if start >= size:
            path.unlink()
            return None
        good: list[tuple[int, int]] = []
        damaged = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            for r in scan(fd, seg_id, start, size, payload=True):
                if r.kind == "ok" and r.record is not None:
                    good.append((r.record.offset, r.size))
                    if r.record.stream == STATS_STREAM:
                        self.stats_bytes += r.size
                    continue
                damaged += 1
                self._count_damaged(r)
            if damaged:
                self._quarantine_segment(fd, path, good)
        finally:
            os.close(fd)
        if not good:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if damaged:
                report.quarantined.append(path.name)  # type: ignore[union-attr]
            return None
        self.pending_batches += len(good)
        if damaged:
            report.quarantined.append(path.name)  # type: ignore[union-attr]
            return _Segment(seg_id, path, path.stat().st_size), 0
        return _Segment(seg_id, path, size), start

    def _count_damaged(self, r: _Read) -> None:
        if r.record is not None:
            s = r.record.stream
            for reason in ("dropped", CORRUPT):
                self.counters[f"{s}.rows_{reason}"] += r.record.rows
                self.counters[f"{s}.batches_{reason}"] += 1
            log.error("spool: batch %s (%d rows) is damaged on disk; counted as lost (%s)",
                      r.record.batch_id, r.record.rows, CORRUPT)  # fmt: skip
        else:
            self.counters["spool_bytes_unreadable"] += r.size
            log.error("spool: %d unreadable bytes skipped", r.size)

    def _quarantine_segment(self, fd: int, path: Path, good: list[tuple[int, int]]) -> None:
        """Move the damaged file to quarantine/ and put its good records back under its name."""
        tmp = path.with_suffix(".tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for offset, size in good:
                os.write(out, os.pread(fd, size, offset))
            os.fdatasync(out)
        finally:
            os.close(out)
        target = self.dir / "quarantine" / f"{path.name}.{time.time_ns():x}"
        os.rename(path, target)
        os.rename(tmp, path)
        self._fsync_dir()
        self._quarantine.append((target, target.stat().st_size))
        self.counters["spool_files_quarantined"] += 1
        log.error("spool: %s was damaged; moved to %s, its %d good batches kept", path.name, target, len(good))

    def _trim_quarantine(self) -> None:
        while len(self._quarantine) > QUARANTINE_KEEP:
            with contextlib.suppress(FileNotFoundError):
                self._quarantine.pop(0)[0].unlink()

    def close(self) -> None:
        """Sync what is not acknowledged, record the cursor, release the directory."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
        self._active = None
        self._close_read()
        self._tail.clear()
        self._tail_bytes = 0
        with contextlib.suppress(OSError):
            self._write_cursor()
        self._delete_acknowledged()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # -- appending -----------------------------------------------------------------------

    def append(self, stream: str, batch_id: str, sequence: int, rows: int, created_ns: int, key: bytes,
               headers: Sequence[tuple[str, bytes]], major: int, payload: bytes) -> None:  # fmt: skip
        """Append one batch (evicting the oldest segments when it does not fit).
        Raises SpoolWriteError when the disk refuses the write."""
        meta = record_meta(stream, batch_id, sequence, rows, created_ns, key, headers, major)
        segment, offset, size = self._append(encode_record(meta, payload), stats=stream == STATS_STREAM)
        if len(payload) <= TAIL_MAX_BYTES - self._tail_bytes:
            hdrs = tuple((k, bytes(v)) for k, v in headers)
            self._tail.append(SpoolRecord(segment, offset, size, stream, batch_id, sequence, rows, created_ns,
                                          bytes(key), hdrs, major, payload))  # fmt: skip
            self._tail_bytes += len(payload)

    def _append(self, buffers: list[bytes], stats: bool = False, salvaging: bool = False) -> tuple[int, int, int]:
        """Write one record; returns its segment, offset and size."""
        size = sum(len(b) for b in buffers)
        if not salvaging:
            self._make_room(size)
        if self._active is not None and self._active.size and self._active.size + size > self.segment_bytes:
            self._roll()
        try:
            if self._active is None:
                self._start_segment()
            assert self._active is not None and self._fd is not None
            written = os.writev(self._fd, buffers)
            if written != size:
                raise OSError(28, f"short write ({written} of {size} bytes)")
        except OSError as e:
            self.last_error = f"write failed: {e.strerror or e}"
            if self._fd is not None and self._active is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._active.size)  # no torn record behind us
            raise SpoolWriteError(e.errno or 0, f"spool write failed: {e.strerror or e}") from None
        self._active.size += size
        self._active.unsynced = True
        self.pending_batches += 1
        if stats:
            self.stats_bytes += size
        if self._read_seg is None:
            self._read_seg, self._read_off = self._active.id, self._active.size - size
        return self._active.id, self._active.size - size, size

    def _start_segment(self) -> None:
        seg = _Segment(self._next_id, self.dir / segment_name(self._next_id), 0)
        self._next_id += 1
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        self._segments[seg.id] = self._active = seg

    def _roll(self) -> None:
        """Close the active segment; the next append starts a new one."""
        if self._fd is not None:
            if self._active is not None and self._active.unsynced and self.pending_batches:
                self._to_sync.append(os.dup(self._fd))
            os.close(self._fd)
            self._fd = None
        self._active = None
        self._delete_acknowledged()

    def _make_room(self, size: int) -> None:
        while self.bytes + size > self.max_bytes:
            if self._quarantine:
                path, _ = self._quarantine.pop(0)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            closed = [s for s in self._segments.values() if s is not self._active]
            if closed:
                self._evict(closed[0])
            elif self._active is not None and self._active.size:
                self._roll()
            else:
                return  # an empty spool: the record alone is larger than max_bytes

    def _evict(self, seg: _Segment) -> None:
        """Drop a whole segment: its unread records are lost (counted), except pipeline_stats
        records seen for the first time, which are appended again."""
        start = None
        if self._read_seg == seg.id:
            start = self._read_off
        elif self._read_seg is not None and self._read_seg < seg.id:
            start = 0
        lost: Counter[str] = Counter()
        salvage: list[SpoolRecord] = []
        if start is not None:
            fd = os.open(seg.path, os.O_RDONLY)
            try:
                for r in scan(fd, seg.id, start, seg.size, payload=True):
                    rec = r.record
                    if r.kind == "ok" and rec is not None and rec.stream == STATS_STREAM:
                        salvage.append(rec)
                    elif rec is not None:
                        lost[rec.stream] += rec.rows
                        lost[f"{rec.stream}\0batches"] += 1
                    else:
                        self.counters["spool_bytes_unreadable"] += r.size
            finally:
                os.close(fd)
        inflight = [u[3] for u in self._unacked if u[0] == seg.id and not u[2]]
        self.stats_bytes -= sum(r.size for r in (*salvage, *inflight) if r.stream == STATS_STREAM)
        unread = sum(v for k, v in lost.items() if k.endswith("\0batches")) + len(salvage)
        self.pending_batches -= unread + len(inflight)
        for key, value in lost.items():
            if key.endswith("\0batches"):
                stream = key[: -len("\0batches")]
                self.counters[f"{stream}.batches_dropped"] += value
                self.counters[f"{stream}.batches_{EVICTED}"] += value
            else:
                self.counters[f"{key}.rows_dropped"] += value
                self.counters[f"{key}.rows_{EVICTED}"] += value
        before = self.bytes
        self._remove(seg)
        now = time.monotonic()
        self.evicting_since = now
        self._evicted_unlogged += 1
        if now - self._evict_logged >= 10.0:  # a line at most every 10 s; the counters count all
            rows = {k: v for k, v in lost.items() if "\0" not in k}
            more = f" ({self._evicted_unlogged - 1} more segments since the last message)" if self._evict_logged else ""
            log.warning("spool full (%d of %d bytes): evicted segment %s, %d unsent batches lost (rows: %s)%s",
                        before, self.max_bytes, seg.name, unread - len(salvage), rows or "none", more)  # fmt: skip
            self._evict_logged, self._evicted_unlogged = now, 0
        if salvage and self.stats_bytes + sum(r.size for r in salvage) <= self.max_bytes // SALVAGE_SHARE:
            for rec in salvage:
                meta = record_meta(rec.stream, rec.batch_id, rec.sequence, rec.rows, rec.created_ns, rec.key,
                                   rec.headers, rec.major, salvaged=True)  # fmt: skip
                self._append(encode_record(meta, rec.payload), stats=True, salvaging=True)
        elif salvage:
            for rec in salvage:
                for reason in ("dropped", EVICTED):
                    self.counters[f"{rec.stream}.rows_{reason}"] += rec.rows
                    self.counters[f"{rec.stream}.batches_{reason}"] += 1

    def _remove(self, seg: _Segment) -> None:
        if self._read_fd is not None and self._read_fd[0] == seg.id:
            self._close_read()
        if seg is self._active:
            self._roll()
        with contextlib.suppress(FileNotFoundError):
            seg.path.unlink()
        del self._segments[seg.id]
        while self._tail and self._tail[0].segment <= seg.id:  # segments go oldest first
            self._tail_bytes -= len(self._tail.popleft().payload)
        if self._read_seg is not None and self._read_seg <= seg.id:
            later = [i for i in self._segments if i > seg.id]
            self._read_seg, self._read_off = (later[0], 0) if later else (None, 0)

    # -- reading and acknowledging ---------------------------------------------------------

    def next(self) -> SpoolRecord | None:
        """The next record to send, in append order, or None when all were read. Damaged
        records met here (a disk error during the run) are counted and skipped."""
        while self._read_seg is not None:
            seg = self._segments.get(self._read_seg)
            if seg is None or self._read_off >= seg.size:
                if seg is not None and seg is self._active:
                    return None  # caught up with the writer
                later = [i for i in self._segments if i > self._read_seg]
                self._close_read()
                if not later:
                    self._read_seg, self._read_off = None, 0
                    return None
                self._read_seg, self._read_off = later[0], 0
                continue
            rec = self._from_tail(seg.id, self._read_off)
            if rec is not None:
                self._read_off += rec.size
                self._unacked.append([seg.id, rec.offset, False, rec])
                return rec
            if self._read_fd is None or self._read_fd[0] != seg.id:
                self._close_read()
                self._read_fd = (seg.id, os.open(seg.path, os.O_RDONLY))
            r = read_at(self._read_fd[1], seg.id, self._read_off, seg.size)
            self._read_off += max(r.size, 1)
            if r.kind == "ok" and r.record is not None:
                self._unacked.append([seg.id, r.record.offset, False, r.record])
                return r.record
            self._count_damaged(r)
            if r.record is not None:
                self.pending_batches -= 1
        return None

    def _from_tail(self, segment: int, offset: int) -> SpoolRecord | None:
        """The record at (segment, offset) when it is one of the latest appends still in memory.

        A sender that keeps up reads each batch right after it was appended: handing over the
        bytes it was given saves reading them back and checking their CRC (about half of the
        spool's CPU per byte). Older records, and those of a backlog beyond TAIL_MAX_BYTES, are
        read from disk. Entries behind the read position (evicted, read from disk) go here."""
        while self._tail:
            rec = self._tail[0]
            if (rec.segment, rec.offset) > (segment, offset):
                return None
            self._tail.popleft()
            self._tail_bytes -= len(rec.payload)
            if (rec.segment, rec.offset) == (segment, offset):
                return rec
        return None

    def ack(self, rec: SpoolRecord) -> None:
        """The record reached Kafka; segments whose records all did are deleted."""
        for u in self._unacked:
            if u[0] == rec.segment and u[1] == rec.offset and not u[2]:
                u[2] = True
                if rec.segment in self._segments:
                    self.pending_batches -= 1
                    if rec.stream == STATS_STREAM:
                        self.stats_bytes -= rec.size
                break
        while self._unacked and self._unacked[0][2]:
            self._unacked.popleft()
        self._delete_acknowledged()

    def release(self, rec: SpoolRecord) -> bool:
        """The record will not be sent by this process (shutdown). True when it stays in the
        spool for the next start; False when its segment was evicted meanwhile (then it is
        counted as evicted here)."""
        if rec.segment in self._segments:
            return True
        for reason in ("dropped", EVICTED):
            self.counters[f"{rec.stream}.rows_{reason}"] += rec.rows
            self.counters[f"{rec.stream}.batches_{reason}"] += 1
        return False

    def is_live(self, rec: SpoolRecord) -> bool:
        return rec.segment in self._segments

    def _watermark(self) -> tuple[int, int] | None:
        """The first record not yet acknowledged (None: nothing is pending)."""
        for seg_id, offset, done, _ in self._unacked:
            if not done and seg_id in self._segments:
                return seg_id, offset
        if self._read_seg is None:
            return None
        return self._read_seg, self._read_off

    def _delete_acknowledged(self) -> None:
        mark = self._watermark()
        for seg in list(self._segments.values()):
            if seg is self._active:
                break
            if mark is None or seg.id < mark[0] or (seg.id == mark[0] and mark[1] >= seg.size):
                self._remove(seg)

    def _close_read(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd[1])
            self._read_fd = None

    # -- durability ------------------------------------------------------------------------

    def checkpoint(self) -> list[int]:
        """Record the cursor; roll an idle, acknowledged active segment; return fds (dups) of
        segments to fdatasync, which the caller closes after syncing (in a worker thread)."""
        fds, self._to_sync = self._to_sync, []
        active = self._active
        if active is not None and self._fd is not None:
            if self.pending_batches == 0 and active.size >= IDLE_ROLL_BYTES:
                self._roll()
            elif active.unsynced and self.pending_batches:
                fds.append(os.dup(self._fd))
                active.unsynced = False
        with contextlib.suppress(OSError):
            self._write_cursor()
        return fds

    def _read_cursor(self) -> tuple[int, int] | None:
        try:
            data = json.loads((self.dir / "cursor").read_text())
            return int(data["segment"]), int(data["offset"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("spool: ignoring an unreadable cursor (%s); acknowledged batches may be sent again "
                        "(ClickHouse deduplicates them)", e)  # fmt: skip
            return None

    def _write_cursor(self) -> None:
        mark = self._watermark() or (self._next_id, 0)
        if mark == self._cursor:
            return
        tmp = self.dir / "cursor.new"
        tmp.write_text(json.dumps({"segment": mark[0], "offset": mark[1]}))
        os.replace(tmp, self.dir / "cursor")
        self._cursor = mark

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- what it holds ---------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Bytes on disk: segments and quarantined files."""
        return sum(s.size for s in self._segments.values()) + sum(size for _, size in self._quarantine)

    @property
    def segments(self) -> int:
        return len(self._segments)

    @property
    def unread(self) -> bool:
        """Whether records wait to be read (sent)."""
        if self._read_seg is None:
            return False
        seg = self._segments.get(self._read_seg)
        return seg is None or self._read_off < seg.size or any(i > self._read_seg for i in self._segments)
