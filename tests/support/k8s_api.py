"""A small Kubernetes API server for tests: pods, ReplicaSets and Jobs in the real wire format.

What the ingester's client library (lightkube) uses of the real API server, over HTTP on
loopback with bearer-token auth and a kubeconfig the test writes:

- ``GET /api/v1/pods``, ``/apis/apps/v1/replicasets``, ``/apis/batch/v1/jobs`` (and the
  ``/namespaces/<ns>/`` forms): a List with ``metadata.resourceVersion``, items without
  kind/apiVersion as the API server sends them, ``limit``/``continue`` paging,
  ``labelSelector`` and ``fieldSelector``;
- the same with ``?watch=true``: a chunked ``application/json`` stream of one
  ``{"type": ..., "object": ...}`` event per line, from ``resourceVersion`` on (or ADDED
  for everything without one), ended after ``timeoutSeconds``;
- a watch from a version that was compacted away: HTTP 200 and an ERROR event whose object
  is a Status with code 410 ("too old resource version"), as the API server's watch cache
  answers; or, with ``expired_as_status``, an HTTP 410 with that Status;
- ``expire()``: compaction now: open watches get that ERROR event and end, so the client
  must list again to learn what changed meanwhile.

Objects are plain dicts shaped like the API's JSON (``pod()``, ``replicaset()``, ``job()``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from fleetscope.config import selector_terms

RESOURCES = {
    ("api/v1", "pods"): ("Pod", "v1"),
    ("apis/apps/v1", "replicasets"): ("ReplicaSet", "apps/v1"),
    ("apis/batch/v1", "jobs"): ("Job", "batch/v1"),
}
NOW = "2026-01-01T00:00:00Z"


def _owner(kind: str, name: str, uid: str, api_version: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True,
            "blockOwnerDeletion": True}  # fmt: skip


def pod(
    name: str, namespace: str, uid: str, *, node: str = "node-1", ip: str = "10.1.0.5",
    containers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    owner: tuple[str, str, str] | None = None, labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A running Pod; containers are (name, "<runtime>://<id>") as in containerStatuses."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid, "creationTimestamp": NOW,
                            "labels": labels or {}, "annotations": annotations or {}}  # fmt: skip
    if owner is not None:
        kind, oname, ouid = owner
        api = {"ReplicaSet": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1", "Job": "batch/v1"}
        meta["ownerReferences"] = [_owner(kind, oname, ouid, api.get(kind, "v1"))]
    statuses = [
        {"name": c, "containerID": cid, "image": f"registry.example/{c}:1", "imageID": f"sha256:{c}",
         "ready": True, "restartCount": 0, "started": True, "state": {"running": {"startedAt": NOW}}}
        for c, cid in containers
    ]  # fmt: skip
    return {
        "kind": "Pod", "apiVersion": "v1", "metadata": meta,
        "spec": {"nodeName": node, "containers": [{"name": c, "image": f"example/{c}:1"} for c, _ in containers]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "containerStatuses": statuses},
    }  # fmt: skip


def replicaset(name: str, namespace: str, uid: str, deployment: tuple[str, str] | None) -> dict[str, Any]:
    """A ReplicaSet, owned by Deployment (name, uid) when given."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid, "creationTimestamp": NOW}
    if deployment is not None:
        meta["ownerReferences"] = [_owner("Deployment", deployment[0], deployment[1], "apps/v1")]
    return {"kind": "ReplicaSet", "apiVersion": "apps/v1", "metadata": meta,
            "spec": {"selector": {"matchLabels": {"app": name}}}}  # fmt: skip


def job(name: str, namespace: str, uid: str, cronjob: tuple[str, str] | None) -> dict[str, Any]:
    """A Job, owned by CronJob (name, uid) when given."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid, "creationTimestamp": NOW}
    if cronjob is not None:
        meta["ownerReferences"] = [_owner("CronJob", cronjob[0], cronjob[1], "batch/v1")]
    return {"kind": "Job", "apiVersion": "batch/v1", "metadata": meta,
            "spec": {"template": {"spec": {"containers": [{"name": "job"}]}}}}  # fmt: skip


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


def _field(obj: dict[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part, "") if isinstance(cur, dict) else ""
    return str(cur)


def _matches(obj: dict[str, Any], labels: str, fields: str) -> bool:
    have = obj["metadata"].get("labels") or {}
    for key, op, values in selector_terms(labels):
        ok = {
            "=": lambda k, v: have.get(k) == v[0], "!=": lambda k, v: have.get(k) != v[0],
            "in": lambda k, v: have.get(k) in v, "notin": lambda k, v: have.get(k) not in v,
            "exists": lambda k, v: k in have, "!exists": lambda k, v: k not in have,
        }[op](key, values)  # fmt: skip
        if not ok:
            return False
    for key, op, values in selector_terms(fields, fields=True):
        if (_field(obj, key) == values[0]) != (op == "="):
            return False
    return True


@dataclass
class _Watch:
    resource: str
    namespace: str
    labels: str
    fields: str
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


class K8sApiServer:
    """The test API server, in a thread of its own; mutate it from the test with add/update/delete."""

    def __init__(self, token: str = "fleetscope-test-token", expired_as_status: bool = False, port: int = 0) -> None:
        self.token = token
        self.expired_as_status = expired_as_status
        self.requests: list[tuple[str, str]] = []  # (path, query string)
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r: {} for _, r in RESOURCES}
        self._history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, resource, type, object)
        self._rv = 100
        self._compacted = 0  # watches from a version below this get 410
        self._watches: list[_Watch] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = port  # 0: any free port

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> K8sApiServer:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            # as asyncio.run does: handlers still waiting (a watch caught mid-start) end here,
            # not when the garbage collector finds them after the loop closed (an error then
            # surfaces in whatever test runs at that moment)
            loop.run_until_complete(_cancelled(asyncio.all_tasks(loop)))
            loop.close()

        self._thread = threading.Thread(target=serve, name="k8s-api", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test API server did not start")
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{prefix:api/v1|apis/apps/v1|apis/batch/v1}/{resource}", self._handle)
        app.router.add_get(
            "/{prefix:api/v1|apis/apps/v1|apis/batch/v1}/namespaces/{namespace}/{resource}", self._handle
        )
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _shutdown(self) -> None:
        for w in self._watches:
            w.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(60)
            assert not self._thread.is_alive(), "the test API server's loop did not stop"
            self._loop = None

    def __enter__(self) -> K8sApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, context: str = "test") -> Path:
        """A kubeconfig for this server with a bearer token, as kubectl would read it."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "ingester", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "test", "user": "ingester"}}],
        }))  # fmt: skip
        return path

    # --- mutations (from the test's thread) -----------------------------------------------

    def _call(self, fn: Callable[[], Any]) -> Any:
        assert self._loop is not None
        done: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(self._run(fn), self._loop)  # type: ignore[arg-type]
        return done.result(10)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def _resource_of(self, obj: dict[str, Any]) -> str:
        return next(r for (_, r), (kind, _) in RESOURCES.items() if kind == obj["kind"])

    def _emit(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._history.append((self._rv, resource, kind, copy.deepcopy(obj)))
        for w in self._watches:
            in_namespace = not w.namespace or w.namespace == obj["metadata"]["namespace"]
            if w.resource == resource and in_namespace and _matches(obj, w.labels, w.fields):
                w.queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})

    def add(self, obj: dict[str, Any]) -> None:
        """Create or replace an object (ADDED or MODIFIED to watchers)."""

        def do() -> None:
            resource = self._resource_of(obj)
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            kind = "MODIFIED" if key in self._objects[resource] else "ADDED"
            stored = copy.deepcopy(obj)
            self._objects[resource][key] = stored
            self._emit(resource, kind, stored)

        self._call(do)

    def delete(self, obj: dict[str, Any]) -> None:
        def do() -> None:
            resource = self._resource_of(obj)
            stored = self._objects[resource].pop((obj["metadata"]["namespace"], obj["metadata"]["name"]))
            self._emit(resource, "DELETED", stored)

        self._call(do)

    def expire(self, then: Callable[[K8sApiServer], None] | None = None) -> None:
        """Compact the history up to now (after applying `then`'s changes, which watchers
        therefore only learn by listing again) and end every open watch with 410."""

        def do() -> None:
            if then is not None:  # changes made now are not streamed: they are compacted away
                saved, self._watches = self._watches, []
                then(self)
                self._watches = saved
            self._rv += 1
            self._compacted = self._rv  # every version before this one is gone
            for w in self._watches:
                w.queue.put_nowait(self._expired_event(self._rv - 1))

        self._call(do)

    def add_in_expire(self, obj: dict[str, Any]) -> None:
        """Inside expire(then=...): create an object (runs on the server's loop already)."""
        resource = self._resource_of(obj)
        stored = copy.deepcopy(obj)
        self._objects[resource][(obj["metadata"]["namespace"], obj["metadata"]["name"])] = stored
        self._emit(resource, "ADDED", stored)

    def list_requests(self, resource: str) -> int:
        return sum(1 for p, q in self.requests if p.endswith(resource) and "watch=" not in q)

    # --- HTTP -----------------------------------------------------------------------------

    def _expired_event(self, rv: int) -> dict[str, Any]:
        message = f"too old resource version: {rv} ({self._compacted})"
        return {"type": "ERROR", "object": _status(410, "Expired", message)}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.query_string))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        key = (request.match_info["prefix"], request.match_info["resource"])
        if key not in RESOURCES:
            return web.json_response(_status(404, "NotFound", "the server could not find the requested resource"),
                                     status=404)  # fmt: skip
        resource = key[1]
        q = request.query
        namespace = request.match_info.get("namespace", "")
        labels, fields = q.get("labelSelector", ""), q.get("fieldSelector", "")
        if q.get("watch") in ("true", "1"):
            return await self._watch(request, resource, namespace, labels, fields)
        items = [
            o for (ns, _), o in sorted(self._objects[resource].items())
            if (not namespace or ns == namespace) and _matches(o, labels, fields)
        ]  # fmt: skip
        start = int(q.get("continue") or 0)
        limit = int(q.get("limit") or 0) or len(items) or 1
        page = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items[start : start + limit]]
        kind, api = RESOURCES[key]
        meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        return web.json_response({"kind": f"{kind}List", "apiVersion": api, "metadata": meta, "items": page})

    async def _watch(
        self, request: web.Request, resource: str, namespace: str, labels: str, fields: str
    ) -> web.StreamResponse:
        since = request.query.get("resourceVersion", "")
        expired = since not in ("", "0") and int(since) < self._compacted
        if expired and self.expired_as_status:
            return web.json_response(self._expired_event(int(since))["object"], status=410)
        w = _Watch(resource, namespace, labels, fields)
        if expired:
            w.queue.put_nowait(self._expired_event(int(since)))
        elif since and since != "0":
            for rv, res, kind, obj in self._history:
                if res == resource and rv > int(since) and _matches(obj, labels, fields):
                    w.queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})
        else:
            for (ns, _), obj in sorted(self._objects[resource].items()):
                if (not namespace or ns == namespace) and _matches(obj, labels, fields):
                    w.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(obj)})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self._watches.append(w)
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds") or 1800)
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(w.queue.get(), left)
                except TimeoutError:
                    break
                if event is None:
                    break
                await resp.write(json.dumps(event).encode() + b"\n")
                if event["type"] == "ERROR":
                    break
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watches.remove(w)
        return resp


async def _cancelled(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until they have ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def new_uid() -> str:
    return str(uuid.uuid4())
