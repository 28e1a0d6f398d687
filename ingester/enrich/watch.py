"""List + watch of pods, ReplicaSets and Jobs with lightkube, feeding the PodCache.

Per resource: list (all namespaces; pods through the configured selectors), then watch
from the list's resourceVersion, following the version of every event. A watch the API
server ends is resumed from the last version; `410 Gone` (the version was compacted away,
as an HTTP status or as an ERROR event in the stream) means events were missed, so the
resource is listed again and the cache synced to it. Other errors back off exponentially
(capped) and list again once the server answers; they never empty the cache: known pods
keep resolving meanwhile.

lightkube is the client: asyncio-native over httpx, msgspec-decoded models (fast for large
lists), the list's resourceVersion exposed and the watch's resource_version settable, so
this module owns the relist-on-410 policy; KubeConfig reads kubeconfig files (tokens, client
certificates, exec plugins) and in-cluster service accounts with token rotation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
from lightkube import AsyncClient, KubeConfig, operators
from lightkube.config.client_adapter import verify_cluster
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import ApiError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.resources.apps_v1 import ReplicaSet
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Pod

from fleetscope.config import ConfigError, Kubernetes, selector_terms
from fleetscope.retry import Backoff, first_line
from ingester.enrich.bounded import BoundedTransport
from ingester.enrich.pods import (
    MIRROR_ANNOTATION,
    SERVICE_NAME_LABEL,
    OwnerRecord,
    OwnerRef,
    PodCache,
    PodRecord,
    split_container_id,
)

log = logging.getLogger(__name__)

BACKOFF_MAX = 30.0  # seconds between reconnects to an unreachable API server, at most
WATCH_SERVER_TIMEOUT = 300  # seconds; the API server ends a watch then and it is resumed


def kube_config(settings: Kubernetes) -> SingleConfig:
    """The API server and credentials: the pod's service account or a kubeconfig file.

    In-cluster, lightkube reads the service account's token (re-read as the kubelet rotates
    it), CA and namespace, and the API address from KUBERNETES_SERVICE_HOST/PORT, which the
    kubelet sets in every container.
    """
    if settings.k8s_api == "in-cluster":
        try:
            config = KubeConfig.from_service_account()
        except (LightkubeConfigError, KeyError, OSError) as e:
            raise ConfigError(
                f"k8s_api: in-cluster needs the pod's service account and KUBERNETES_SERVICE_HOST ({e}); "
                "run the ingester in a pod, or set k8s_api kubeconfig"
            ) from None
        return _single(config, "", "k8s_api")
    path = settings.k8s_kubeconfig.expanduser()
    try:
        config = KubeConfig.from_file(path)
    except (LightkubeConfigError, OSError, ValueError, TypeError) as e:
        raise ConfigError(f"k8s_kubeconfig: cannot use {path}: {e}; give a readable kubeconfig file") from None
    return _single(config, settings.k8s_context, "k8s_context")


def _single(config: KubeConfig, context: str, key: str) -> SingleConfig:
    try:
        single = config.get(context_name=context or None)
    except (LightkubeConfigError, KeyError, ValueError) as e:
        raise ConfigError(f"{key}: {e}; name a context of the kubeconfig") from None
    if single is None or single.user is None:
        raise ConfigError(f"{key}: the kubeconfig context has no user; add credentials to it")
    return single


def selector(text: str, fields: bool = False) -> list[tuple[str, Any]]:
    """A selector string (validated by fleetscope.config) as lightkube's selector pairs."""
    ops: dict[str, Callable[[tuple[str, ...]], Any]] = {
        "=": lambda v: operators.equal(v[0]),
        "!=": lambda v: operators.not_equal(v[0]),
        "in": operators.in_,
        "notin": operators.not_in,
        "exists": lambda v: operators.exists(),
        "!exists": lambda v: operators.not_exists(),
    }
    return [(key, ops[op](values)) for key, op, values in selector_terms(text, fields)]


def _controller(refs: list[Any] | None) -> OwnerRef | None:
    for ref in refs or ():
        if ref.controller:
            return OwnerRef(ref.kind, ref.name, ref.uid)
    return None


def pod_record(pod: Pod, labels: tuple[str, ...], annotations: tuple[str, ...]) -> PodRecord:
    """The cache's view of a Pod: selected labels and annotations, started containers."""
    meta, spec, status = pod.metadata, pod.spec, pod.status
    assert meta is not None  # the API server always sends metadata
    all_labels = meta.labels or {}
    all_annotations = meta.annotations or {}
    containers: dict[str, tuple[str, str]] = {}
    if status is not None:
        for cs in (
            *(status.initContainerStatuses or ()),
            *(status.containerStatuses or ()),
            *(status.ephemeralContainerStatuses or ()),
        ):
            cid, runtime = split_container_id(cs.containerID or "")
            if cid:
                containers[cid] = (cs.name, runtime)
    return PodRecord(
        uid=meta.uid or "",
        namespace=meta.namespace or "",
        name=meta.name or "",
        node=(spec.nodeName if spec is not None else None) or "",
        ip=(status.podIP if status is not None else None) or "",
        labels={k: all_labels[k] for k in labels if k in all_labels},
        annotations={k: all_annotations[k] for k in annotations if k in all_annotations},
        service_name=all_labels.get(SERVICE_NAME_LABEL, ""),
        owner=_controller(meta.ownerReferences),
        pod_template_hash=all_labels.get("pod-template-hash", ""),
        mirror_uid=all_annotations.get(MIRROR_ANNOTATION, ""),
        containers=containers,
    )


def _owner_record(obj: Any) -> tuple[str, OwnerRecord]:
    meta = obj.metadata
    return meta.uid or "", OwnerRecord(
        obj.kind or type(obj).__name__, meta.name or "", _controller(meta.ownerReferences)
    )


class KubernetesWatch:
    """Keeps a PodCache in step with the API server; one task per watched resource."""

    def __init__(self, settings: Kubernetes, cache: PodCache, on_change: Callable[[], None]) -> None:
        self.settings = settings
        self.cache = cache
        self.on_change = on_change
        self.synced = False  # the pods were listed at least once
        self.connected = False  # the last pod list or watch request succeeded
        self.counters: dict[str, int] = {
            "lists": 0, "relists_410": 0, "watch_events": 0, "errors": 0, "responses_too_large": 0,
        }  # fmt: skip
        self._client: AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._server = ""

    async def start(self) -> None:
        """Read the configuration (ConfigError when unusable) and start watching in the background."""
        config = kube_config(self.settings)
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per watch request otherwise
        self._server = config.cluster.server if config.cluster is not None else "?"
        # the kubeconfig's CA and client certificate, in a transport that bounds response sizes
        assert config.user is not None  # kube_config() refuses a context without a user
        verify = verify_cluster(config.cluster, config.user, config.abs_file, trust_env=False)
        transport = BoundedTransport(httpx.AsyncHTTPTransport(verify=verify, trust_env=False), self._too_large)
        self._client = AsyncClient(config=config, trust_env=False, timeout=httpx.Timeout(10.0), transport=transport)
        for name, res in (("pods", Pod), ("replicasets", ReplicaSet), ("jobs", Job)):
            task = asyncio.create_task(self._run(name, res), name=f"k8s-watch-{name}")
            task.add_done_callback(self._died)
            self._tasks.append(task)
        log.info("kubernetes: watching pods, replicasets and jobs at %s", self._server)

    def _too_large(self) -> None:
        self.counters["responses_too_large"] += 1

    def _died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("kubernetes watch %s failed: %r", task.get_name(), task.exception())

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _selectors(self, name: str) -> dict[str, Any]:
        s = self.settings
        if name != "pods":
            return {}
        return {
            "labels": selector(s.k8s_label_selector) if s.k8s_label_selector else None,
            "fields": selector(s.k8s_field_selector, fields=True) if s.k8s_field_selector else None,
        }

    async def _list(self, name: str, res: Any) -> str:
        """List everything, sync the cache to it; returns the list's resourceVersion."""
        assert self._client is not None
        listing = self._client.list(res, namespace="*", chunk_size=500, **self._selectors(name))
        items = [obj async for obj in listing]
        s = self.settings
        if name == "pods":
            self.cache.sync(pod_record(p, s.k8s_labels, s.k8s_annotations) for p in items)
        else:
            self.cache.sync_owners(res.__name__, (_owner_record(o) for o in items))
        self.counters["lists"] += 1
        self.on_change()
        return listing.resourceVersion

    def _apply(self, name: str, kind: str, obj: Any) -> None:
        s = self.settings
        if kind == "BOOKMARK":
            return
        if name == "pods":
            if kind == "DELETED":
                self.cache.delete(obj.metadata.uid or "")
            else:
                self.cache.upsert(pod_record(obj, s.k8s_labels, s.k8s_annotations))
        elif kind == "DELETED":
            self.cache.delete_owner(obj.metadata.uid or "")
        else:
            self.cache.upsert_owner(*_owner_record(obj))
        self.counters["watch_events"] += 1
        self.on_change()

    def _set_connected(self, name: str, up: bool) -> None:
        if name == "pods" and up != self.connected:
            self.connected = up
            if up:
                log.info("kubernetes API at %s reachable; pods listed, watching", self._server)
            self.on_change()  # a batch waiting for a pod stops waiting once the watch is down

    async def _run(self, name: str, res: Any) -> None:
        assert self._client is not None
        backoff = Backoff(BACKOFF_MAX)
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list(name, res)
                    if name == "pods":
                        self.synced = True
                    self._set_connected(name, True)
                    backoff = Backoff(BACKOFF_MAX)
                watch = self._client.watch(
                    res, namespace="*", resource_version=version, server_timeout=WATCH_SERVER_TIMEOUT,
                    **self._selectors(name),
                )  # fmt: skip
                async for kind, obj in watch:
                    if obj.metadata is not None and obj.metadata.resourceVersion:
                        version = obj.metadata.resourceVersion
                    self._apply(name, kind, obj)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                code = e.status.code if e.status is not None else None
                if code == 410:
                    # the version was compacted: events were missed, so list again
                    log.info("kubernetes: %s watch expired (410 Gone: %s); listing again", name, e.status.message)
                    self.counters["relists_410"] += 1
                    version = None
                    continue
                if code in (403, 404) and name != "pods":
                    log.warning(
                        "kubernetes: cannot list/watch %s (%s): %s; grant it in the ClusterRole "
                        "(README, Kubernetes identity)", name, first_line(e),
                        "workloads of ReplicaSet pods fall back to the pod-template-hash naming rule"
                        if name == "replicasets" else "a CronJob's pods show their Job as the workload",
                    )  # fmt: skip
                    return
                await self._failed(name, e, backoff)
                version = None
            except (httpx.HTTPError, OSError, ValueError) as e:
                await self._failed(name, e, backoff)
                version = None  # list again once it answers: that is also when it counts as reachable

    async def _failed(self, name: str, e: BaseException, backoff: Backoff) -> None:
        self.counters["errors"] += 1
        self._set_connected(name, False)
        delay = backoff.next()
        log.warning(
            "kubernetes API at %s: %s %s failed: %s; retrying in %.1fs%s", self._server, name,
            "list/watch", first_line(e) or type(e).__name__, delay,
            " (rows of unknown pods are written unenriched)" if name == "pods" else "",
        )  # fmt: skip
        await asyncio.sleep(delay)
