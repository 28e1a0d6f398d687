"""Size bounds on what the Kubernetes API server sends the ingester.

lightkube reads a list response whole and a watch stream line by line (httpx's line
reader keeps everything up to the next newline), so an API server (or something posing
as one) that sends an endless body or a line without end would make the ingester allocate
without limit. This httpx transport wraps the real one and ends a response, with
`ResponseTooLarge` (an httpx.ReadError: the watcher backs off and lists again, as after
any connection failure), once a list response exceeds `max_body` bytes or a watch event
`max_line` bytes. Each such end is counted by the `on_exceeded` callback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx2 as httpx

__all__ = ["MAX_LIST_BYTES", "MAX_WATCH_EVENT_BYTES", "BoundedTransport", "ResponseTooLarge"]

# One page of a list (the watcher asks for 500 objects per page): pods are 5-20 KB of JSON.
MAX_LIST_BYTES = 64 << 20
# One watch event is one object; etcd stores at most 1.5 MiB per object by default.
MAX_WATCH_EVENT_BYTES = 16 << 20


class ResponseTooLarge(httpx.ReadError):
    """A response body or watch event beyond its bound; the response was closed."""


class _BoundedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, what: str, watch: bool, limit: int,
                 on_exceeded: Callable[[], None]) -> None:  # fmt: skip
        self.inner, self.what, self.watch, self.limit, self.on_exceeded = inner, what, watch, limit, on_exceeded

    async def __aiter__(self) -> AsyncIterator[bytes]:
        pending = 0  # bytes since the last newline (watch) or of the whole body (list)
        async for chunk in self.inner:
            newline = chunk.rfind(b"\n") if self.watch else -1
            pending = len(chunk) - newline - 1 if newline >= 0 else pending + len(chunk)
            if pending > self.limit:
                self.on_exceeded()
                kind = "a watch event" if self.watch else "a response"
                raise ResponseTooLarge(f"{kind} of more than {self.limit} bytes from {self.what}; closed it")
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class BoundedTransport(httpx.AsyncBaseTransport):
    """Delegates to `inner`; bounds every response body as the module says."""

    def __init__(self, inner: httpx.AsyncBaseTransport, on_exceeded: Callable[[], None],
                 max_body: int = MAX_LIST_BYTES, max_line: int = MAX_WATCH_EVENT_BYTES) -> None:  # fmt: skip
        self.inner, self.on_exceeded = inner, on_exceeded
        self.max_body, self.max_line = max_body, max_line

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        watch = request.url.params.get("watch") in ("true", "1")
        what = f"{request.method} {request.url.path}"
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        limit = self.max_line if watch else self.max_body
        response.stream = _BoundedStream(stream, what, watch, limit, self.on_exceeded)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
