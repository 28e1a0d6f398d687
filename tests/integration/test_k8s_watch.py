"""The ingester's Kubernetes watch with the real client library (lightkube) against the test
API server: list + watch with resourceVersion, relist after 410 Gone (as an ERROR event and
as an HTTP status), reconnect with backoff, selectors, configuration errors, and the
enricher's bounded wait for pods the watch is about to deliver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from fleetscope.config import ConfigError, IngestSettings
from ingester.enrich import Enricher
from tests.support import k8s_api
from tests.support.k8s_api import K8sApiServer, new_uid
from tests.support.sql_http import free_port
from tests.unit.test_enrich import identity_batch

A, B = "a" * 64, "b" * 64


def settings(kubeconfig: Path, **kw: object) -> IngestSettings:
    return IngestSettings(**{"k8s_api": "kubeconfig", "k8s_kubeconfig": kubeconfig, **kw})  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s")
        await asyncio.sleep(0.02)


@pytest.fixture
def api() -> K8sApiServer:
    with K8sApiServer() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
async def enricher(api: K8sApiServer, tmp_path: Path) -> AsyncIterator[Enricher]:
    e = Enricher(settings(api.write_kubeconfig(tmp_path / "kubeconfig"), k8s_resolve_wait=3.0))
    async with e:
        await until(lambda: e.watching, 10, "the first list")
        yield e


@pytest.mark.parametrize("expired_as_status", [False, True])
async def test_list_watch_and_relist_after_410(tmp_path: Path, expired_as_status: bool) -> None:
    with K8sApiServer(expired_as_status=expired_as_status) as api:
        rs_uid = new_uid()
        api.add(k8s_api.replicaset("web-5d8f", "shop", rs_uid, ("web", new_uid())))
        listed = k8s_api.pod("web-5d8f-a", "shop", new_uid(), containers=[("app", f"containerd://{A}")],
                             owner=("ReplicaSet", "web-5d8f", rs_uid))  # fmt: skip
        api.add(listed)
        async with Enricher(settings(api.write_kubeconfig(tmp_path / "kc"))) as e:
            await until(lambda: e.watching and len(e.cache.pods) == 1, 10, "the first list")
            cache = e.cache
            streamed = k8s_api.pod("late", "shop", new_uid(), containers=[("c", f"cri-o://{B}")])
            api.add(streamed)
            await until(lambda: cache.pod_of_container(B) is not None, 5, "the watch event")
            api.delete(listed)
            await until(lambda: cache.pods[listed["metadata"]["uid"]].deleted_at is not None, 5, "DELETED")
            assert cache.workload(cache.pods[listed["metadata"]["uid"]]) == ("Deployment", "web")

            lists = api.list_requests("pods")
            hidden = k8s_api.pod("hidden", "shop", new_uid())
            api.expire(then=lambda s: s.add_in_expire(hidden))  # only a new list can show it
            await until(lambda: hidden["metadata"]["uid"] in cache.pods, 5, "the relist after 410")
            assert api.list_requests("pods") == lists + 1
            assert e.counters["k8s_relists_410"] >= 1
            watches = [q for p, q in api.requests if p == "/api/v1/pods" and "watch=true" in q]
            assert all("resourceVersion=" in q for q in watches)  # always resumed from a version


async def test_reconnects_with_backoff_when_the_api_server_comes_back(tmp_path: Path) -> None:
    api = K8sApiServer(port=free_port())
    kubeconfig = api.write_kubeconfig(tmp_path / "kc")  # the server is not there yet
    async with Enricher(settings(kubeconfig)) as e:
        await asyncio.sleep(1.0)
        assert not e.watching and e.counters["k8s_errors"] >= 2
        # rows of unknown pods are not held while the API is away
        batch = identity_batch([(A, "u-1", "containerd", "container")] * 10)
        out = await e.enrich(batch)
        assert out is not None and out.unenriched == 10 and e.waited_batches == 0
        with api:
            api.add(k8s_api.pod("p", "ns", "u-1", containers=[("app", f"containerd://{A}")]))
            await until(lambda: e.watching and "u-1" in e.cache.pods, 15, "reconnect")
        out = await e.enrich(batch)
        assert out is not None and out.unenriched == 0 and e.unenriched_rows == 10


async def test_selectors_are_sent_to_the_api_server(api: K8sApiServer, tmp_path: Path) -> None:
    api.add(k8s_api.pod("web", "shop", new_uid(), labels={"tier": "web"}))
    api.add(k8s_api.pod("db", "shop", new_uid(), labels={"tier": "db"}))
    api.add(k8s_api.pod("sys", "kube-system", new_uid(), labels={"tier": "web"}))
    s = settings(api.write_kubeconfig(tmp_path / "kc"), k8s_label_selector="tier in (web)",
                 k8s_field_selector="metadata.namespace!=kube-system")  # fmt: skip
    async with Enricher(s) as e:
        await until(lambda: e.watching, 10, "the first list")
        assert sorted(p.name for p in e.cache.pods.values()) == ["web"]
    assert any("labelSelector=tier in (web)" in q for p, q in api.requests if "watch=true" in q), api.requests


async def test_enricher_waits_for_pods_the_watch_is_about_to_deliver(api: K8sApiServer, enricher: Enricher) -> None:
    # whether enrich() waited is the enricher's own count (waited_batches), not a stopwatch: the VM pauses at random
    batch = identity_batch([(A, "u-late", "containerd", "container")] * 100)
    # dated so that its window (k8s_resolve_wait = 3 s) ends 60 s from now: returning within 30 s proves the
    # pod's arrival ended the wait, not the deadline
    batch.header.created_ns += 57 * 10**9
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, api.add, k8s_api.pod("late", "ns", "u-late", containers=[("app", f"containerd://{A}")]))
    out = await asyncio.wait_for(enricher.enrich(batch), 30)
    assert out is not None and out.unenriched == 0 and enricher.waited_batches == 1
    assert out.identities[0].container_name == "app"

    never = identity_batch([(B, "u-never", "containerd", "container")] * 10)
    deadline = never.header.created_ns / 1e9 + enricher.settings.k8s_resolve_wait
    out = await enricher.enrich(never)  # waits until k8s_resolve_wait after the batch was made
    assert out is not None and out.unenriched == 10 and enricher.waited_batches == 2
    assert deadline <= time.time() < deadline + 15  # it gave up at the deadline (bound generous for a loaded VM)
    out = await enricher.enrich(identity_batch([(B, "u-never", "containerd", "container")]))
    assert out is not None and out.unenriched == 1 and enricher.waited_batches == 2  # given up on: no wait
    stale = identity_batch([("c" * 64, "u-old", "", "container")])
    stale.header.created_ns -= 10**10  # made 10 s ago: the window has passed
    out = await enricher.enrich(stale)
    assert out is not None and out.unenriched == 1 and enricher.waited_batches == 2


async def test_a_waiting_batch_stops_waiting_when_the_watch_goes_down(api: K8sApiServer, enricher: Enricher) -> None:
    batch = identity_batch([(A, "u-lost", "containerd", "container")] * 10)
    batch.header.created_ns += 57 * 10**9  # its window ends 60 s from now: only the watch's loss can end it sooner
    asyncio.get_running_loop().call_later(0.3, api.stop)
    out = await asyncio.wait_for(enricher.enrich(batch), 30)
    assert out is not None and out.unenriched == 10 and enricher.waited_batches == 1 and not enricher.watching


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"k8s_kubeconfig": Path("/nonexistent/kubeconfig")}, "k8s_kubeconfig: cannot use /nonexistent/kubeconfig"),
        ({"k8s_context": "nope"}, "k8s_context: "),
        ({"k8s_api": "in-cluster"}, "k8s_api: in-cluster needs the pod's service account"),
    ],
)
async def test_unusable_configuration_is_a_config_error(
    api: K8sApiServer, tmp_path: Path, kw: dict[str, object], message: str
) -> None:
    s = settings(api.write_kubeconfig(tmp_path / "kc"), **kw)
    with pytest.raises(ConfigError, match=message):
        await Enricher(s).start()


def test_batches_without_identity_columns_are_left_alone() -> None:
    from fleetscope.codec import SCHEMAS, decode_batch, encode_batch
    from fleetscope.v1 import batch_pb2

    h = batch_pb2.BatchHeader(stream="block_io_latency", batch_id="b", row_count=0)
    cols = {c.name: np.zeros(0, c.dtype) if c.dtype is not None else np.zeros(0, "S1")
            for c in SCHEMAS["block_io_latency"].columns}  # fmt: skip
    batch = decode_batch(SCHEMAS["block_io_latency"], encode_batch(SCHEMAS["block_io_latency"], h, cols))
    assert Enricher(IngestSettings(k8s_api="kubeconfig")).lookup(batch) is None
