"""Kubernetes identity of a batch's rows: per-row k8s_* columns and, per pod, the
OpenTelemetry resource attributes, from the agent's container_id / pod_uid columns and the
pod cache the Kubernetes watch keeps.

Work is per distinct identity of a batch (a few per batch), never per row: the identity
columns are dictionary-encoded, so the rows' distinct (container, pod, runtime, kind)
combinations come from their dictionary indexes with numpy, are looked up once each, and
every k8s_* column is a dictionary column again (LowCardinality in ClickHouse).

Enrichment never waits for the API server: rows of pods the cache does not know are written
with empty fields and enriched = 0, and counted. It waits only for what the watch is about
to deliver, while the watch is connected: a pod or container that started moments ago and
is not yet in the API's status, until ``k8s_resolve_wait`` after the batch was made, once
per pod and container.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fleetscope.codec import DecodedBatch, StringColumn
from fleetscope.config import Kubernetes
from fleetscope.native import MapColumn, Values
from ingester.enrich.pods import PodCache, PodRecord

if TYPE_CHECKING:
    from ingester.enrich.watch import KubernetesWatch

log = logging.getLogger(__name__)

IDENTITY_COLUMNS = ("container_id", "pod_uid", "container_runtime", "cgroup_kind")
K8S_STRING_COLUMNS = ("k8s_namespace", "k8s_pod", "k8s_container", "k8s_workload_kind", "k8s_workload", "k8s_node")
# the table columns the ingester fills (the agent ships IDENTITY_COLUMNS)
TABLE_COLUMNS = (*K8S_STRING_COLUMNS, "k8s_labels", "k8s_annotations", "enriched")
HOST_KIND = "host"
EXPIRE_INTERVAL = 10.0  # seconds between sweeps of pods deleted longer ago than the grace period
GIVEN_UP_MAX = 65536  # identities already waited for, remembered so no batch waits for them again


@dataclass(frozen=True)
class RowIdentity:
    """One distinct identity of a batch: what the agent shipped and what the cache knew."""

    container_id: str
    pod_uid: str
    container_runtime: str
    cgroup_kind: str
    host_name: str  # the batch's node
    pod: PodRecord | None = None
    container_name: str = ""
    workload_kind: str = ""
    workload: str = ""

    @property
    def enriched(self) -> bool:
        """The Kubernetes fields are complete: the pod was found, or the row has no pod."""
        return self.pod is not None or self.cgroup_kind == HOST_KIND


@dataclass
class Enrichment:
    """A batch's Kubernetes identity: `identities[row_key[i]]` is row i's.

    `columns` are the table columns to insert with the batch (BatchLoader.insert's extra);
    the span builder (ingester/spans.py) takes its resource attributes from those columns.
    """

    identities: list[RowIdentity]
    row_key: np.ndarray  # intp, one per row
    columns: dict[str, Values] = field(default_factory=dict)
    unenriched: int = 0  # rows with enriched = 0

    @property
    def pending(self) -> list[RowIdentity]:
        """Identities worth waiting for: a pod (or its container) the API has yet to report."""
        return [
            i for i in self.identities
            if i.pod_uid and (i.pod is None or (i.container_id and not i.container_name and i.pod.deleted_at is None))
        ]  # fmt: skip


def string_column(values: list[str], row_key: np.ndarray) -> StringColumn:
    """Per-identity strings + each row's identity -> a StringColumn with a distinct dictionary."""
    codes: dict[str, int] = {}
    index = np.fromiter((codes.setdefault(v, len(codes)) for v in values), "<u4", len(values))
    encoded = [v.encode() for v in codes]
    offsets = np.cumsum([len(e) for e in encoded], dtype=np.int64).astype("<u4")
    return StringColumn(b"".join(encoded), offsets, index[row_key] if len(row_key) else np.zeros(0, "<u4"))


def map_column(maps: list[dict[str, str]], row_key: np.ndarray) -> MapColumn:
    """Per-identity maps + each row's identity -> a Map column (no Python object per row)."""
    lens = np.array([len(m) for m in maps] or [0], np.int64)
    starts = np.cumsum(lens) - lens  # where each map's entries start in the per-identity lists
    row_lens = lens[row_key]
    ends = np.cumsum(row_lens)
    total = int(ends[-1]) if len(ends) else 0
    # output entry j of a row comes from entry (j - the row's start + its map's start)
    entry = np.repeat(starts[row_key] - (ends - row_lens), row_lens) + np.arange(total, dtype=np.int64)
    entries = [(k, v) for m in maps for k, v in m.items()]
    keys = string_column([k for k, _ in entries], entry)
    values = string_column([v for _, v in entries], entry)
    return MapColumn(ends.astype("<u8"), keys, values)


def _distinct(columns: list[StringColumn], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows' distinct combinations of dictionary indexes: (first row of each, each row's key)."""
    key = np.zeros(rows, np.int64)
    sizes = [max(len(col.offsets), 1) for col in columns]
    if np.prod(sizes, dtype=object) < 1 << 62:  # one mixed-radix key over all the dictionaries
        for col, size in zip(columns, sizes, strict=True):
            key = key * size + col.index
    else:  # pairwise, so the combined key never exceeds rows * dictionary size
        for col, size in zip(columns, sizes, strict=True):
            _, key = np.unique(key * size + col.index, return_inverse=True)
            key = key.ravel().astype(np.int64)
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return first, inverse.ravel()


class Enricher:
    """Owns the pod cache and the Kubernetes watch; enriches decoded batches."""

    def __init__(self, settings: Kubernetes) -> None:
        self.settings = settings
        self.enabled = settings.k8s_api != "off"
        self.cache = PodCache(settings.k8s_deleted_grace)
        self.unenriched_rows = 0
        self.waited_seconds = 0.0
        # batches held back for pods the watch was about to deliver (k8s_resolve_wait), counted
        # when the wait starts; /metrics shows it as fleetscope_ingester_k8s_batches_waited_total
        self.waited_batches = 0
        self._changed = asyncio.Event()
        self._given_up: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._watch: KubernetesWatch | None = None
        self._expiry: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Enricher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the watch (a ConfigError for an unusable kubeconfig or service account)."""
        if not self.enabled or self._watch is not None:
            return
        from ingester.enrich.watch import KubernetesWatch  # lightkube only when enrichment is on

        self._watch = KubernetesWatch(self.settings, self.cache, self._changed.set)
        await self._watch.start()
        self._expiry = asyncio.create_task(self._expire(), name="k8s-expire")

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
            self._expiry = None
        if self._watch is not None:
            counters = self.counters
            watch, self._watch = self._watch, None
            await watch.stop()
            log.info("kubernetes enrichment: %s", dict(sorted(counters.items())))

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(EXPIRE_INTERVAL, max(self.settings.k8s_deleted_grace / 4, 0.1)))
            self.cache.expire()

    @property
    def watching(self) -> bool:
        """The pods were listed and the watch is connected: what is unknown may still come."""
        return self._watch is not None and self._watch.synced and self._watch.connected

    @property
    def counters(self) -> dict[str, int]:
        out = {
            "rows_unenriched": self.unenriched_rows,
            "pods_cached": len(self.cache.pods),
            "waited_ms": int(self.waited_seconds * 1000),
            "waited_batches": self.waited_batches,
        }
        if self._watch is not None:
            out |= {f"k8s_{k}": v for k, v in self._watch.counters.items()}
        return out

    def lookup(self, batch: DecodedBatch) -> Enrichment | None:
        """The batch's identities and k8s_* columns from the cache as it is now (no waiting);
        None for streams without the identity columns."""
        if not all(isinstance(batch.columns.get(c), StringColumn) for c in IDENTITY_COLUMNS):
            return None
        cols = [batch.columns[c] for c in IDENTITY_COLUMNS]
        assert all(isinstance(c, StringColumn) for c in cols)
        string_cols: list[StringColumn] = [c for c in cols if isinstance(c, StringColumn)]
        first, row_key = _distinct(string_cols, batch.rows)
        dictionaries = [c.values for c in string_cols]
        host = batch.header.node.host_name
        identities = []
        for row in first.tolist():
            cid, uid, runtime, kind = (
                d[int(c.index[row])].decode("utf-8", "replace") for d, c in zip(dictionaries, string_cols, strict=True)
            )
            identities.append(self._identify(cid, uid, runtime, kind, host))
        return self._columns(identities, row_key)

    def _identify(self, cid: str, uid: str, runtime: str, kind: str, host: str) -> RowIdentity:
        pod = self.cache.pod(uid) if uid else self.cache.pod_of_container(cid) if cid else None
        if pod is None:
            return RowIdentity(cid, uid, runtime, kind, host)
        name, api_runtime = pod.containers.get(cid, ("", ""))
        wkind, wname = self.cache.workload(pod)
        return RowIdentity(cid, uid, runtime or api_runtime, kind, host, pod, name, wkind, wname)

    def _columns(self, identities: list[RowIdentity], row_key: np.ndarray) -> Enrichment:
        def pod_field(i: RowIdentity, name: str) -> str:
            p = i.pod
            if p is None:
                return ""
            return {"k8s_namespace": p.namespace, "k8s_pod": p.name, "k8s_node": p.node}.get(name, "")

        per_column = {
            "k8s_namespace": [pod_field(i, "k8s_namespace") for i in identities],
            "k8s_pod": [pod_field(i, "k8s_pod") for i in identities],
            "k8s_container": [i.container_name for i in identities],
            "k8s_workload_kind": [i.workload_kind for i in identities],
            "k8s_workload": [i.workload for i in identities],
            "k8s_node": [pod_field(i, "k8s_node") for i in identities],
            "container_runtime": [i.container_runtime for i in identities],
        }
        columns: dict[str, Values] = {n: string_column(v, row_key) for n, v in per_column.items()}
        columns["k8s_labels"] = map_column([i.pod.labels if i.pod else {} for i in identities], row_key)
        columns["k8s_annotations"] = map_column([i.pod.annotations if i.pod else {} for i in identities], row_key)
        enriched = np.array([i.enriched for i in identities] or [False], np.uint8)[row_key]
        columns["enriched"] = enriched
        return Enrichment(identities, row_key, columns, int(len(enriched) - np.count_nonzero(enriched)))

    async def enrich(self, batch: DecodedBatch) -> Enrichment | None:
        """lookup(), after waiting (bounded, see the module docstring) for identities the watch
        is about to deliver. Counts the rows that stay unenriched."""
        if not self.enabled:
            return None
        result = self.lookup(batch)
        if result is None:
            return None
        deadline = batch.header.created_ns / 1e9 + self.settings.k8s_resolve_wait
        waiting = [i for i in result.pending if (i.pod_uid, i.container_id) not in self._given_up]
        if waiting and self.watching and time.time() < deadline:
            self.waited_batches += 1
            started = time.monotonic()
            while waiting and self.watching and (left := deadline - time.time()) > 0:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
                result = self.lookup(batch)
                assert result is not None
                waiting = [i for i in result.pending if (i.pod_uid, i.container_id) not in self._given_up]
            self.waited_seconds += time.monotonic() - started
            for i in waiting:  # never wait for these again
                self._given_up[i.pod_uid, i.container_id] = None
                if len(self._given_up) > GIVEN_UP_MAX:
                    self._given_up.popitem(last=False)
        self.unenriched_rows += result.unenriched
        return result
