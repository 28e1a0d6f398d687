"""Spans derived from kernel events, built column-wise from decoded batches.

One span per TCP connection end (client or server), per process whose lifetime reached a
threshold (from its exit row alone: the exit knows its lifetime, so the span is exact and
needs no state), per fatal signal and per OOM kill. The node joins the last two into the
exit row (bpf/exit_join.bpf.h): they become events of the process span, or spans made from
the exit row when the process is too short for one; their own rows then say in_process_exit
and make no span. The builder works on whole columns (numpy, dictionary-encoded strings);
only the OTLP hand-over makes one SDK object per span.

Ids are derived from (node, stream, batch id, row): a redelivered batch yields the same
spans, which fleet.otel_traces deduplicates with the token "<batch id>:spans".

Resource attributes come from the per-row Kubernetes columns when the enrichment stage has
set them on the batch (``k8s_namespace``, ``k8s_pod``, ``k8s_container``,
``k8s_workload_kind``, ``k8s_workload``, ``k8s_node``, ``container_id``, ``pod_uid`` as
StringColumn, ``k8s_labels`` as native.MapColumn); without them a span's resource is the
node (``host.name``) and the process.
"""

from __future__ import annotations

import hashlib
import ipaddress
import signal as signals
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetscope.codec import DecodedBatch, StringColumn
from fleetscope.native import ArrayColumn, MapColumn, Values, constant_strings

# SDK enum values (opentelemetry.trace.SpanKind, opentelemetry.trace.StatusCode)
INTERNAL, SERVER, CLIENT = 0, 1, 2
UNSET, OK, ERROR = 0, 1, 2
# the OTel ClickHouse exporter's spelling of kinds and status codes
KIND_NAMES = ("Internal", "Server", "Client", "Producer", "Consumer")
STATUS_NAMES = ("Unset", "Ok", "Error")

SPAN_STREAMS = ("tcp_connections", "process_exit", "fatal_signals", "oom_kills")
UNKNOWN_SERVICE = "unknown_service"
APP_NAME_LABEL = "app.kubernetes.io/name"
K8S_COLUMNS = ("k8s_namespace", "k8s_pod", "k8s_container", "k8s_workload_kind", "k8s_workload", "k8s_node",
               "container_id", "pod_uid")  # fmt: skip
# workload kind -> resource attribute naming it (OTel k8s semantic conventions)
WORKLOAD_ATTRIBUTE = {
    "Deployment": "k8s.deployment.name", "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name", "ReplicaSet": "k8s.replicaset.name",
    "Job": "k8s.job.name", "CronJob": "k8s.cronjob.name",
}  # fmt: skip


def _signal_names() -> np.ndarray:
    names = [f"SIG{n}" for n in range(65)]
    for s in signals.Signals:
        if 0 < s.value < 65 and not s.name.startswith("SIG_"):
            names[s.value] = s.name
    return np.array(names, dtype=object)


SIGNAL_NAMES = _signal_names()


# --- string columns, vectorised --------------------------------------------------------------


def _lengths(col: StringColumn) -> np.ndarray:
    ends = col.offsets.astype(np.int64)
    return np.diff(ends, prepend=0) if len(ends) else ends


def nonempty(col: StringColumn) -> np.ndarray:
    """Per row: whether its string is not empty."""
    lens = _lengths(col)
    return lens[col.index] > 0 if len(lens) else np.zeros(len(col.index), bool)


def take(col: StringColumn, rows: np.ndarray) -> StringColumn:
    return StringColumn(col.data, col.offsets, col.index[rows])


def strings_of(values: Sequence[str], index: np.ndarray) -> StringColumn:
    """A column from a small dictionary (a few Python strings) and a per-row index into it."""
    raw = [v.encode() for v in values]
    return StringColumn(b"".join(raw), np.cumsum([len(r) for r in raw], dtype="<u4"),
                        np.ascontiguousarray(index, "<u4"))  # fmt: skip


def fixed_strings(values: np.ndarray) -> StringColumn:
    """A column with one dictionary entry per row from a fixed-width bytes array ('S<n>')."""
    n, width = len(values), values.dtype.itemsize
    raw = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8).reshape(n, width)
    nonzero = raw != 0
    lens = np.where(nonzero.any(axis=1), width - np.argmax(nonzero[:, ::-1], axis=1), 0) if width else np.zeros(n)
    data = raw[np.arange(width) < lens[:, None]].tobytes()
    return StringColumn(data, np.cumsum(lens, dtype="<u4"), np.arange(n, dtype="<u4"))


def numbers(values: np.ndarray) -> StringColumn:
    """Integers as decimal text: each distinct value formatted once (numpy's int -> bytes
    conversion), rows index them."""
    uniq, inverse = np.unique(values.astype(np.int64), return_inverse=True)
    text = fixed_strings(uniq.astype("S20"))
    return StringColumn(text.data, text.offsets, inverse.ravel().astype("<u4"))


def merge(cols: Sequence[StringColumn]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """One dictionary holding every column's entries: (data, offsets, base index per column)."""
    data = b"".join(c.data for c in cols)
    shifts = np.cumsum([0] + [len(c.data) for c in cols[:-1]])
    offsets = np.concatenate([c.offsets.astype(np.int64) + s for c, s in zip(cols, shifts, strict=True)] or [[]])
    bases = np.cumsum([0] + [len(c.offsets) for c in cols[:-1]]).astype(np.int64)
    return data, offsets.astype("<u4"), bases


def choose(cols: Sequence[StringColumn], which: np.ndarray) -> StringColumn:
    """Per row, the string of column which[row]."""
    data, offsets, bases = merge(cols)
    stacked = np.stack([c.index.astype(np.int64) for c in cols], axis=1)
    rows = np.arange(len(which))
    return StringColumn(data, offsets, (bases[which] + stacked[rows, which]).astype("<u4"))


def first_nonempty(cols: Sequence[StringColumn], fallback: str) -> StringColumn:
    """Per row, the first non-empty string among cols, else fallback."""
    n = len(cols[0].index) if cols else 0
    options = [*cols, constant_strings(fallback, n)]
    present = np.stack([nonempty(c) for c in cols] + [np.ones(n, bool)], axis=1)
    return choose(options, np.argmax(present, axis=1))


def prefixed(prefix: str, col: StringColumn) -> StringColumn:
    """Every dictionary entry with a prefix (a dictionary operation, not a per-row one)."""
    values = [prefix + v.decode("utf-8", "replace") for v in col.values] or [prefix]
    return strings_of(values, col.index)


def labelled(labels: MapColumn, key: str, rows: int) -> StringColumn:
    """Per row, the value of one map key ("" when the row's map lacks it)."""
    keys = labels.keys
    hits = np.array([v == key.encode() for v in keys.values] or [False], bool)
    entries = np.nonzero(hits[keys.index])[0] if len(keys.index) else np.zeros(0, np.int64)
    owner = np.searchsorted(labels.offsets.astype(np.int64), entries, side="right")
    empty = len(labels.values.offsets)  # one past the dictionary: the "" entry added below
    index = np.full(rows, empty, np.int64)
    index[owner] = labels.values.index[entries]
    offsets = np.append(labels.values.offsets.astype(np.int64), len(labels.values.data))
    return StringColumn(labels.values.data, offsets.astype("<u4"), index.astype("<u4"))


# --- spans as columns ----------------------------------------------------------------------------


@dataclass
class Attr:
    """One attribute over all spans: int, bool or string values, and which rows have it."""

    key: str
    values: np.ndarray | StringColumn
    present: np.ndarray | None = None  # bool per row; None: every row

    def mask(self, rows: int) -> np.ndarray:
        return np.ones(rows, bool) if self.present is None else self.present

    def as_strings(self) -> StringColumn:
        if isinstance(self.values, StringColumn):
            return self.values
        if self.values.dtype == bool:
            return strings_of(["false", "true"], self.values.astype(np.uint32))
        return numbers(self.values)

    def python(self) -> list[Any]:
        """Per-row Python values (only for the OTLP hand-over)."""
        if isinstance(self.values, StringColumn):
            return self.values.decoded().tolist()
        return self.values.tolist()


@dataclass
class SpanSet:
    """Spans of one batch, one row each, with the source row they came from."""

    stream: str
    source_rows: np.ndarray
    trace_id: np.ndarray  # (n, 16) uint8
    span_id: np.ndarray  # (n, 8) uint8
    start_ns: np.ndarray
    end_ns: np.ndarray
    name: StringColumn
    kind: np.ndarray  # SDK SpanKind value per row
    status: np.ndarray  # SDK StatusCode value per row
    status_message: StringColumn
    resource: list[Attr]
    attributes: list[Attr]
    events: list[EventSet] = field(default_factory=list)  # kinds of events; a span has any of them

    def __len__(self) -> int:
        return len(self.source_rows)


@dataclass
class EventSet:
    """One kind of span event over all spans of a SpanSet: which spans have it, when, its
    name and attributes (per span row)."""

    present: np.ndarray  # bool per span
    time_ns: np.ndarray  # per span
    name: StringColumn
    attributes: list[Attr] = field(default_factory=list)


def concat_strings(cols: Sequence[StringColumn]) -> StringColumn:
    """The rows of several columns one after the other (their dictionaries merged)."""
    data, offsets, bases = merge(cols)
    index = np.concatenate([c.index.astype(np.int64) + b for c, b in zip(cols, bases, strict=True)] or [[]])
    return StringColumn(data, offsets, index.astype("<u4"))


def reorder(attr: Attr, order: np.ndarray) -> Attr:
    """The attribute with its rows taken in `order`."""
    values = attr.values[order] if isinstance(attr.values, np.ndarray) else take(attr.values, order)
    return Attr(attr.key, values, None if attr.present is None else attr.present[order])


def stack_attrs(blocks: Sequence[tuple[Sequence[Attr], int]]) -> list[Attr]:
    """Attribute lists of consecutive row blocks ((attrs, rows) each) as one list over all
    rows: every key once, in order of first appearance, absent in the blocks without it."""
    keys: dict[str, Attr] = {}
    for attrs, _ in blocks:
        for a in attrs:
            keys.setdefault(a.key, a)
    out = []
    for key, first in keys.items():
        parts: list[Any] = []
        present = []
        for attrs, rows in blocks:
            found = next((x for x in attrs if x.key == key), None)
            if found is None:
                v = first.values
                parts.append(np.zeros(rows, v.dtype) if isinstance(v, np.ndarray) else constant_strings("", rows))
                present.append(np.zeros(rows, bool))
            else:
                parts.append(found.values)
                present.append(found.mask(rows))
        values = np.concatenate(parts) if isinstance(first.values, np.ndarray) else concat_strings(parts)
        mask = np.concatenate(present) if present else np.zeros(0, bool)
        out.append(Attr(key, values, None if mask.all() else mask))
    return out


def concat_spans(sets: Sequence[SpanSet]) -> SpanSet:
    """Several SpanSets of one batch as one (one insert, one deduplication token)."""
    if len(sets) == 1:
        return sets[0]
    sizes = [len(x) for x in sets]
    total = sum(sizes)
    events = []
    offset = 0
    for x, n in zip(sets, sizes, strict=True):
        for ev in x.events:  # padded: absent outside its own set's rows
            present = np.zeros(total, bool)
            present[offset : offset + n] = ev.present
            when = np.zeros(total, np.int64)
            when[offset : offset + n] = ev.time_ns
            blank = [([], offset), (ev.attributes, n), ([], total - offset - n)]
            name = concat_strings([constant_strings("", offset), ev.name, constant_strings("", total - offset - n)])
            events.append(EventSet(present, when, name, stack_attrs(blank)))
        offset += n
    return SpanSet(
        sets[0].stream,
        np.concatenate([x.source_rows for x in sets]),
        np.concatenate([x.trace_id for x in sets]),
        np.concatenate([x.span_id for x in sets]),
        np.concatenate([x.start_ns for x in sets]),
        np.concatenate([x.end_ns for x in sets]),
        concat_strings([x.name for x in sets]),
        np.concatenate([x.kind for x in sets]),
        np.concatenate([x.status for x in sets]),
        concat_strings([x.status_message for x in sets]),
        stack_attrs([(x.resource, n) for x, n in zip(sets, sizes, strict=True)]),
        stack_attrs([(x.attributes, n) for x, n in zip(sets, sizes, strict=True)]),
        events,
    )


def attribute_map(attrs: Sequence[Attr], rows: int) -> MapColumn:
    """A Map column of the present attributes per row, in attribute order."""
    if not attrs:
        empty = StringColumn(b"", np.zeros(0, "<u4"), np.zeros(0, "<u4"))
        return MapColumn(np.zeros(rows, "<u8"), empty, empty)
    mask = np.stack([a.mask(rows) for a in attrs], axis=1)
    strs = [a.as_strings() for a in attrs]
    data, offsets, bases = merge(strs)
    stacked = np.stack([s.index.astype(np.int64) for s in strs], axis=1)
    row, k = np.nonzero(mask)  # row-major: each row's entries together, in attribute order
    values = StringColumn(data, offsets, (bases[k] + stacked[row, k]).astype("<u4"))
    keys = strings_of([a.key for a in attrs], k)
    return MapColumn(np.cumsum(mask.sum(axis=1), dtype="<u8"), keys, values)


_HEX = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")


def hex_ids(ids: np.ndarray) -> StringColumn:
    """(n, k) id bytes as lowercase hex text, the exporter's TraceId/SpanId form."""
    n, k = ids.shape
    text = np.ascontiguousarray(_HEX[ids]).view(f"S{2 * k}").reshape(n)
    return StringColumn(text.tobytes(), np.arange(1, n + 1, dtype="<u4") * np.uint32(2 * k),
                        np.arange(n, dtype="<u4"))  # fmt: skip


def otel_columns(spans: SpanSet, scope: tuple[str, str]) -> dict[str, Values]:
    """The spans as fleet.otel_traces columns (the OTel ClickHouse exporter's layout)."""
    n = len(spans)
    resource = {a.key: a for a in spans.resource}
    cols: dict[str, Values] = {
        "Timestamp": spans.start_ns.astype("<i8"),
        "TraceId": hex_ids(spans.trace_id),
        "SpanId": hex_ids(spans.span_id),
        "ParentSpanId": constant_strings("", n),
        "TraceState": constant_strings("", n),
        "SpanName": spans.name,
        "SpanKind": strings_of(KIND_NAMES, spans.kind),
        "ServiceName": resource["service.name"].as_strings(),
        "ResourceAttributes": attribute_map(spans.resource, n),
        "ScopeName": constant_strings(scope[0], n),
        "ScopeVersion": constant_strings(scope[1], n),
        "SpanAttributes": attribute_map(spans.attributes, n),
        "Duration": (spans.end_ns - spans.start_ns).astype("<u8"),
        "StatusCode": strings_of(STATUS_NAMES, spans.status),
        "StatusMessage": spans.status_message,
    }
    # events of every kind, each span's together and in time order
    rows = [np.nonzero(ev.present)[0] for ev in spans.events]
    span_of = np.concatenate(rows or [np.zeros(0, np.int64)])
    when = np.concatenate([ev.time_ns[r] for ev, r in zip(spans.events, rows, strict=True)] or [np.zeros(0, np.int64)])
    order = np.lexsort((when, span_of))
    ends = np.cumsum(np.bincount(span_of, minlength=n), dtype="<u8")
    names = concat_strings([take(ev.name, r) for ev, r in zip(spans.events, rows, strict=True)]) if rows else None
    blocks = [([reorder(a, r) for a in ev.attributes], len(r)) for ev, r in zip(spans.events, rows, strict=True)]
    attrs = [reorder(a, order) for a in stack_attrs(blocks)]
    cols["Events.Timestamp"] = ArrayColumn(ends, when[order].astype("<i8"))
    cols["Events.Name"] = ArrayColumn(ends, take(names, order) if names is not None else constant_strings("", 0))
    cols["Events.Attributes"] = ArrayColumn(ends, attribute_map(attrs, len(order)))
    return cols


# --- ids -----------------------------------------------------------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit values (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def span_ids(node: str, stream: str, batch_id: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(trace ids (n, 16), span ids (n, 8)) from (node, stream, batch id, row), never zero."""
    seed = hashlib.blake2b(f"{node}\0{stream}\0{batch_id}".encode(), digest_size=24).digest()
    s = np.frombuffer(seed, "<u8")
    r = rows.astype(np.uint64)
    parts = [_mix(r ^ s[i]) | np.uint64(0) for i in range(3)]
    parts[1] |= (parts[0] == 0) & (parts[1] == 0)  # an all-zero trace id is invalid
    parts[2] |= parts[2] == 0
    big = [p.astype(">u8") for p in parts]
    trace = np.stack([big[0], big[1]], axis=1).view(np.uint8).reshape(len(rows), 16)
    span = big[2].view(np.uint8).reshape(len(rows), 8)
    return trace, span


# --- resource ------------------------------------------------------------------------------------


def resource(batch: DecodedBatch, rows: np.ndarray, comm: StringColumn | None) -> list[Attr]:
    """Resource attributes per span: Kubernetes identity when the batch carries it, else the
    node; service.name from the app.kubernetes.io/name label, the workload, the container or
    the process name, in that order."""
    n = len(rows)
    node = batch.header.node.host_name
    out = [Attr("host.name", constant_strings(node, n))]
    cols = batch.columns
    k8s = {name: take(c, rows) for name in K8S_COLUMNS if isinstance(c := cols.get(name), StringColumn)}
    for key, name in (("k8s.node.name", "k8s_node"), ("k8s.namespace.name", "k8s_namespace"),
                      ("k8s.pod.name", "k8s_pod"), ("k8s.pod.uid", "pod_uid"),
                      ("k8s.container.name", "k8s_container"), ("container.id", "container_id")):  # fmt: skip
        if name in k8s:
            out.append(Attr(key, k8s[name], nonempty(k8s[name])))
    workload = k8s.get("k8s_workload")
    if workload is not None and "k8s_workload_kind" in k8s:
        kinds = k8s["k8s_workload_kind"]
        kind_of_entry = np.array([v.decode() for v in kinds.values] or [""], dtype=object)
        for kind, key in WORKLOAD_ATTRIBUTE.items():
            is_kind = (kind_of_entry == kind)[kinds.index] & nonempty(workload)
            if is_kind.any():
                out.append(Attr(key, workload, is_kind))
    names: list[StringColumn] = []
    labels = cols.get("k8s_labels")
    if isinstance(labels, MapColumn):
        names.append(take(labelled(labels, APP_NAME_LABEL, batch.rows), rows))
    names += [c for c in (workload, k8s.get("k8s_container"), comm) if c is not None]
    service = first_nonempty(names, UNKNOWN_SERVICE) if names else constant_strings(UNKNOWN_SERVICE, n)
    out.insert(0, Attr("service.name", service))
    return out


# --- builders per stream -------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanOptions:
    """What the builder needs from the settings."""

    process_min_duration_ns: int


def _base(batch: DecodedBatch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = batch.header
    return span_ids(h.node.host_name, h.stream, h.batch_id, rows)


def _u(batch: DecodedBatch, name: str, rows: np.ndarray) -> np.ndarray:
    col = batch.columns[name]
    assert isinstance(col, np.ndarray)
    return col[rows]


def _s(batch: DecodedBatch, name: str, rows: np.ndarray) -> StringColumn:
    col = batch.columns[name]
    assert isinstance(col, StringColumn)
    return take(col, rows)


def _entry_codes(col: StringColumn, codes: dict[str, int], default: int) -> np.ndarray:
    """Per row, a code for its string, via the dictionary (one lookup per distinct value)."""
    table = np.array([codes.get(v.decode(), default) for v in col.values] or [default], np.int64)
    return table[col.index] if len(col.index) else np.zeros(0, np.int64)


def _addresses(local: np.ndarray, remote: np.ndarray) -> tuple[StringColumn, StringColumn]:
    """IPv6 address rows (16 bytes each; IPv4 v4-mapped) as text, formatted once per distinct
    address: IPv4 dotted, IPv6 compressed."""
    both = np.ascontiguousarray(np.concatenate([local, remote])).view(np.uint8).reshape(-1, 16)
    uniq, inverse = np.unique(both.view("V16").ravel(), return_inverse=True)
    texts = []
    for raw in uniq:
        a = ipaddress.IPv6Address(bytes(raw))
        texts.append(str(a.ipv4_mapped) if a.ipv4_mapped is not None else str(a))
    n = len(local)
    inverse = inverse.ravel()
    return strings_of(texts, inverse[:n]), strings_of(texts, inverse[n:])


def tcp_spans(batch: DecodedBatch, opts: SpanOptions) -> SpanSet:
    """A CLIENT span per connect row and a SERVER span per accept row: connection lifetime,
    peers per the network/server/client semantic conventions, bytes, RTT, retransmits;
    status ERROR for a connect that failed."""
    rows = np.arange(batch.rows)
    trace, span = _base(batch, rows)
    start = _u(batch, "time", rows).astype(np.int64)
    end = start + _u(batch, "duration_ns", rows).astype(np.int64)
    role = _s(batch, "role", rows)
    client = _entry_codes(role, {"connect": 1}, 0).astype(bool)
    kind = np.where(client, CLIENT, SERVER)
    local, remote = _addresses(_u(batch, "local_addr", rows), _u(batch, "remote_addr", rows))
    lport = _u(batch, "local_port", rows).astype(np.int64)
    rport = _u(batch, "remote_port", rows).astype(np.int64)
    # server = remote for a connect, local for an accept; client the other way round
    which = client.astype(np.int64)
    server_addr, client_addr = choose([local, remote], which), choose([remote, local], which)
    family = _u(batch, "family", rows)
    failed = _u(batch, "failed", rows).astype(bool)
    error = _s(batch, "error", rows)
    reset = _s(batch, "reset", rows)
    owner = _u(batch, "owner_known", rows).astype(bool)
    comm = _s(batch, "comm", rows)
    message = choose([constant_strings("", len(rows)), error, constant_strings("connect failed", len(rows))],
                     np.where(failed, np.where(nonempty(error), 1, 2), 0))  # fmt: skip
    attrs = [
        Attr("network.transport", constant_strings("tcp", len(rows))),
        Attr("network.type", strings_of(["ipv4", "ipv6"], (family == 6).astype(np.uint32))),
        Attr("network.peer.address", remote),
        Attr("network.peer.port", rport),
        Attr("network.local.address", local),
        Attr("network.local.port", lport),
        Attr("server.address", server_addr),
        Attr("server.port", np.where(client, rport, lport)),
        Attr("client.address", client_addr),
        Attr("client.port", np.where(client, lport, rport)),
        Attr("process.pid", _u(batch, "pid", rows).astype(np.int64), owner),
        Attr("process.executable.name", comm, owner & nonempty(comm)),
        Attr("fleetscope.tcp.bytes_sent", _u(batch, "bytes_sent", rows).astype(np.int64)),
        Attr("fleetscope.tcp.bytes_received", _u(batch, "bytes_received", rows).astype(np.int64)),
        Attr("fleetscope.tcp.srtt_us", _u(batch, "srtt_us", rows).astype(np.int64)),
        Attr("fleetscope.tcp.retransmits", _u(batch, "retransmits", rows).astype(np.int64)),
        Attr("fleetscope.tcp.handshake_ns", _u(batch, "handshake_ns", rows).astype(np.int64), client & ~failed),
        Attr("fleetscope.tcp.reset", reset, nonempty(reset)),
        Attr("error.type", error, nonempty(error)),
        Attr("fleetscope.cgroup_id", _u(batch, "cgroup_id", rows).astype(np.int64)),
        Attr("fleetscope.netns", _u(batch, "netns", rows).astype(np.int64)),
    ]
    return SpanSet(
        "tcp_connections", rows, trace, span, start, end,
        strings_of(["tcp accept", "tcp connect"], client.astype(np.uint32)), kind,
        np.where(failed, ERROR, UNSET), message, resource(batch, rows, comm), attrs,
    )  # fmt: skip


def _signal_text(signal: np.ndarray, template: str) -> StringColumn:
    uniq, inverse = np.unique(signal, return_inverse=True)
    return strings_of([template.format(SIGNAL_NAMES[s] if s < 65 else f"SIG{s}") for s in uniq], inverse.ravel())


def _column(batch: DecodedBatch, name: str, rows: np.ndarray) -> np.ndarray:
    """A numeric column, or zeros for a batch decoded without it (an older stream schema)."""
    col = batch.columns.get(name)
    return col[rows] if isinstance(col, np.ndarray) else np.zeros(len(rows), np.int64)


def _oom_attrs(batch: DecodedBatch, rows: np.ndarray, prefix: str = "") -> list[Attr]:
    """The OOM kill's figures and trigger, from oom_kills columns or process_exit's oom_* ones."""
    names = ("total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb", "pgtables_kb", "oom_score_adj")
    figures = [Attr(f"fleetscope.oom.{n}", _column(batch, prefix + n if n != "oom_score_adj" else n, rows)
                    .astype(np.int64)) for n in names]  # fmt: skip
    return [*figures, Attr("fleetscope.oom.trigger.pid", _column(batch, prefix + "trigger_pid", rows).astype(np.int64))]


def _sender_attrs(batch: DecodedBatch, rows: np.ndarray, known: np.ndarray, prefix: str = "") -> list[Attr]:
    """The signal's code and sender, from fatal_signals columns or process_exit's signal_* ones."""
    comm = _s(batch, f"{prefix}sender_comm", rows)
    return [
        Attr("fleetscope.signal.code", _column(batch, "signal_code" if prefix else "code", rows).astype(np.int64),
             known if prefix else None),
        Attr("fleetscope.signal.sender.pid", _column(batch, f"{prefix}sender_pid", rows).astype(np.int64), known),
        Attr("fleetscope.signal.sender.uid", _column(batch, f"{prefix}sender_uid", rows).astype(np.int64), known),
        Attr("fleetscope.signal.sender.name", comm, known & nonempty(comm)),
    ]  # fmt: skip


# the signals the fatal_signals probe reports (FATAL_SIGNALS_MASK, bpf/fatal_signals.h)
FATAL_SIGNALS = np.array([6, 7, 9, 11])


def process_spans(batch: DecodedBatch, opts: SpanOptions) -> SpanSet:
    """An INTERNAL span per process that lived at least the threshold, from its exit row:
    start = exit - lifetime. Killed by a signal: status ERROR and a "process.signal" event
    (at the signal's generation when its sender was seen, with the sender; else at the
    exit); OOM-killed: a "process.oom_kill" event at the kill with the memory figures; a
    non-zero exit code: status ERROR.

    The OOM kill and the sender come from the oom_kills / fatal_signals maps the exit read
    on the node; those probes' own rows then say in_process_exit and make no span. So a
    process under the threshold gets the spans they would have made from this row: an "oom
    kill" span, and a "signal <SIG>" span when fatal_signals shared its map (one span per
    kill either way, from one row, without state across batches or streams)."""
    duration = batch.columns["duration_ns"]
    assert isinstance(duration, np.ndarray)
    long = duration >= opts.process_min_duration_ns
    rows = np.nonzero(long)[0]
    trace, span = _base(batch, rows)
    end = _u(batch, "time", rows).astype(np.int64)
    start = end - _u(batch, "duration_ns", rows).astype(np.int64)
    comm = _s(batch, "comm", rows)
    sig = _u(batch, "signal", rows).astype(np.int64)
    code = _u(batch, "exit_code", rows).astype(np.int64)
    killed = sig != 0
    pairs, inverse = np.unique(np.stack([sig, code], axis=1), axis=0, return_inverse=True)
    texts = [
        f"killed by {SIGNAL_NAMES[s] if s < 65 else f'SIG{s}'}" if s else (f"exit code {c}" if c else "")
        for s, c in pairs.tolist()
    ]
    message = strings_of(texts or [""], inverse.ravel())
    signal_name = _signal_text(sig, "{}")
    attrs = [
        Attr("process.pid", _u(batch, "pid", rows).astype(np.int64)),
        Attr("process.parent_pid", _u(batch, "ppid", rows).astype(np.int64)),
        Attr("process.executable.name", comm, nonempty(comm)),
        Attr("process.exit.code", code, ~killed),
        Attr("fleetscope.process.signal", signal_name, killed),
        Attr("fleetscope.cgroup_id", _u(batch, "cgroup_id", rows).astype(np.int64)),
    ]
    known = killed & (_column(batch, "signal_sender_known", rows) != 0)
    oom = _column(batch, "oom_killed", rows) != 0
    n = len(rows)
    events = [
        EventSet(killed, end - np.where(known, _column(batch, "signal_delay_ns", rows).astype(np.int64), 0),
                 constant_strings("process.signal", n),
                 [Attr("fleetscope.process.signal", signal_name, killed),
                  *_sender_attrs(batch, rows, known, "signal_")]),
        EventSet(oom, end - _column(batch, "oom_delay_ns", rows).astype(np.int64),
                 constant_strings("process.oom_kill", n), _oom_attrs(batch, rows, "oom_")),
    ]  # fmt: skip
    lifetimes = SpanSet(
        "process_exit", rows, trace, span, start, end, prefixed("process ", comm),
        np.full(n, INTERNAL), np.where(killed | (code != 0), ERROR, UNSET), message,
        resource(batch, rows, comm), attrs, events,
    )  # fmt: skip
    short = ~long
    oom_rows = np.nonzero(short & (_column(batch, "oom_killed", np.arange(batch.rows)) != 0))[0]
    all_sig = _u(batch, "signal", np.arange(batch.rows)).astype(np.int64)
    joined = _column(batch, "fatal_signals_joined", np.arange(batch.rows)) != 0
    sig_rows = np.nonzero(short & joined & np.isin(all_sig, FATAL_SIGNALS))[0]
    parts = [lifetimes, _exit_oom_spans(batch, oom_rows), _exit_signal_spans(batch, sig_rows)]
    return concat_spans([p for p in parts if len(p)] or [lifetimes])


def _exit_oom_spans(batch: DecodedBatch, rows: np.ndarray) -> SpanSet:
    """The "oom kill" spans of process_exit rows under the threshold (as oom_kill_spans would
    make them from the oom_kills rows, which left them to these)."""
    h = batch.header
    trace, span = span_ids(h.node.host_name, f"{h.stream}.oom_kill", h.batch_id, rows)
    at = _u(batch, "time", rows).astype(np.int64) - _u(batch, "oom_delay_ns", rows).astype(np.int64)
    comm = _s(batch, "comm", rows)
    n = len(rows)
    attrs = [
        Attr("process.pid", _u(batch, "pid", rows).astype(np.int64)),
        Attr("process.parent_pid", _u(batch, "ppid", rows).astype(np.int64)),
        Attr("process.executable.name", comm, nonempty(comm)),
        *_oom_attrs(batch, rows, "oom_"),
        Attr("fleetscope.cgroup_id", _u(batch, "cgroup_id", rows).astype(np.int64)),
    ]
    return SpanSet(
        "process_exit", rows, trace, span, at, at.copy(), constant_strings("oom kill", n), np.full(n, INTERNAL),
        np.full(n, ERROR), constant_strings("killed by the OOM killer", n), resource(batch, rows, comm), attrs,
    )  # fmt: skip


def _exit_signal_spans(batch: DecodedBatch, rows: np.ndarray) -> SpanSet:
    """The "signal <SIG>" spans of process_exit rows under the threshold (as
    fatal_signal_spans would make them from the fatal_signals rows, which left them to these)."""
    h = batch.header
    return _signal_spans(batch, rows, span_ids(h.node.host_name, f"{h.stream}.signal", h.batch_id, rows), "signal_")


def _signal_spans(batch: DecodedBatch, rows: np.ndarray, ids: tuple[np.ndarray, np.ndarray], prefix: str) -> SpanSet:
    """A "signal <SIG>" span per row, from the signal's generation (when its sender was seen)
    to the process's end: from fatal_signals columns, or process_exit's signal_* ones (prefix),
    which lack the uid and core dump."""
    trace, span = ids
    end = _u(batch, "time", rows).astype(np.int64)
    known = _u(batch, f"{prefix}sender_known", rows).astype(bool)
    start = end - np.where(known, _u(batch, f"{prefix}delay_ns", rows).astype(np.int64), 0)
    comm = _s(batch, "comm", rows)
    sig = _u(batch, "signal", rows).astype(np.int64)
    sender = _sender_attrs(batch, rows, known, prefix)
    own = not prefix  # the fatal_signals row's own columns
    attrs = [
        Attr("process.pid", _u(batch, "pid", rows).astype(np.int64)),
        Attr("process.parent_pid", _u(batch, "ppid", rows).astype(np.int64)),
        *([Attr("process.user.id", _u(batch, "uid", rows).astype(np.int64))] if own else []),
        Attr("process.executable.name", comm, nonempty(comm)),
        Attr("fleetscope.process.signal", _signal_text(sig, "{}")),
        *sender[:1],
        *([Attr("fleetscope.signal.core_dumped", _u(batch, "core_dumped", rows).astype(bool))] if own else []),
        *sender[1:],
        Attr("fleetscope.cgroup_id", _u(batch, "cgroup_id", rows).astype(np.int64)),
    ]
    return SpanSet(
        batch.header.stream, rows, trace, span, start, end, _signal_text(sig, "signal {}"),
        np.full(len(rows), INTERNAL), np.full(len(rows), ERROR), _signal_text(sig, "killed by {}"),
        resource(batch, rows, comm), attrs,
    )  # fmt: skip


def _standalone(batch: DecodedBatch) -> np.ndarray:
    """Rows of an oom_kills / fatal_signals batch whose process_exit row does not carry them
    (in_process_exit 0: the node's process probe does not read that probe's map)."""
    return np.nonzero(_column(batch, "in_process_exit", np.arange(batch.rows)) == 0)[0]


def fatal_signal_spans(batch: DecodedBatch, opts: SpanOptions) -> SpanSet:
    """A span per process killed by SIGKILL/SIGSEGV/SIGBUS/SIGABRT, from the signal's
    generation (when seen) to the process's end, with the sender; none for a row that its
    process_exit row carries (process_spans makes the event or the span from that)."""
    rows = _standalone(batch)
    return _signal_spans(batch, rows, _base(batch, rows), "")


def oom_kill_spans(batch: DecodedBatch, opts: SpanOptions) -> SpanSet:
    """A zero-length span per OOM kill at the kill, with the victim's memory figures and the
    task whose allocation ran out; none for a kill that the victim's process_exit row
    carries (process_spans makes the event or the span from that)."""
    rows = _standalone(batch)
    trace, span = _base(batch, rows)
    at = _u(batch, "time", rows).astype(np.int64)
    comm = _s(batch, "comm", rows)
    n = len(rows)
    attrs = [
        Attr("process.pid", _u(batch, "pid", rows).astype(np.int64)),
        Attr("process.user.id", _u(batch, "uid", rows).astype(np.int64)),
        Attr("process.executable.name", comm, nonempty(comm)),
        *_oom_attrs(batch, rows),
        Attr("fleetscope.oom.trigger.name", _s(batch, "trigger_comm", rows)),
        Attr("fleetscope.cgroup_id", _u(batch, "cgroup_id", rows).astype(np.int64)),
    ]
    return SpanSet(
        "oom_kills", rows, trace, span, at, at.copy(), constant_strings("oom kill", n), np.full(n, INTERNAL),
        np.full(n, ERROR), constant_strings("killed by the OOM killer", n), resource(batch, rows, comm), attrs,
    )  # fmt: skip


BUILDERS: dict[str, Callable[[DecodedBatch, SpanOptions], SpanSet]] = {
    "tcp_connections": tcp_spans,
    "process_exit": process_spans,
    "fatal_signals": fatal_signal_spans,
    "oom_kills": oom_kill_spans,
}


def build(batch: DecodedBatch, opts: SpanOptions, extra: Mapping[str, Values] | None = None) -> SpanSet | None:
    """The spans of one decoded batch; None for a stream without spans. `extra` holds the
    columns the ingester's enrichment made for the batch (the Kubernetes columns), which win
    over the batch's own columns of the same name."""
    builder = BUILDERS.get(batch.header.stream)
    if builder is None or batch.rows == 0:
        return None
    if extra:
        batch = DecodedBatch(batch.header, {**batch.columns, **extra})  # type: ignore[dict-item]
    return builder(batch, opts)
