"""The ClickHouse HTTP interface over the embedded engine, served with aiohttp.

Why aiohttp: the server must stream in both directions (INSERT bodies into the engine as
they arrive, results out block by block with backpressure), keep many keep-alive
connections on one event loop next to the agent and ingester of `fleetscope run`, parse
multipart forms (clickhouse-connect sends long parameters that way), and accept 1 MiB
request lines like ClickHouse. aiohttp's server does all of that with its C HTTP parser
and no ASGI layer; plain asyncio streams would mean writing and hardening an HTTP/1.1
parser (chunked uploads, pipelining, Expect: 100-continue), and uvicorn/starlette add two
packages and an ASGI hop per chunk for nothing we use.

The engine work (every chdb call blocks) runs in this server's own thread pool, never the
event loop's default executor that the in-process ingester uses, and at most
``max_queries`` requests hold the engine at once. See engine.py for how requests share it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import secrets
import string
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from aiohttp import BodyPartReader, web
from multidict import CIMultiDict, MultiMapping

from fleetscope.sqlserver import sql
from fleetscope.sqlserver.codecs import DecodeError, Encoder, choose_encoding, decoder
from fleetscope.sqlserver.engine import (
    AUTHENTICATION_FAILED,
    BAD_ARGUMENTS,
    CANNOT_DECOMPRESS,
    INTO_OUTFILE_NOT_ALLOWED,
    NOT_IMPLEMENTED,
    QUERY_IS_TOO_LARGE,
    READONLY,
    SETTING_NAME,
    SYNTAX_ERROR,
    TOO_MANY_SIMULTANEOUS_QUERIES,
    UNKNOWN_SETTING,
    Engine,
    EngineError,
    InsertStream,
    ResultStream,
    Stats,
    prepare,
)
from fleetscope.sqlserver.formats import STREAMED, FramingError, framer

log = logging.getLogger(__name__)
T = TypeVar("T")

# URL parameters that are not settings (ClickHouse's reserved names, plus HTTP-only knobs
# this server reads itself or ignores).
_NOT_SETTINGS = {
    "query", "database", "default_format", "query_id", "user", "password", "quota_key", "stacktrace",
    "buffer_size", "wait_end_of_query", "session_id", "session_timeout", "session_check", "compress",
    "decompress", "client_protocol_version", "role", "enable_http_compression", "http_zlib_compression_level",
    "send_progress_in_http_headers", "http_headers_progress_interval_ms", "http_wait_end_of_query",
    "cancel_http_readonly_queries_on_client_close", "http_response_buffer_size", "add_http_cors_header",
}  # fmt: skip
_STATIC = ("/play", "/dashboard", "/binary", "/merges", "/js/")
_INSERT_BUFFER = 1 << 20  # bytes handed to the engine per append
_MAX_STATEMENT = 1 << 20  # an INSERT's statement must end within this much of the request
_MAX_QUERY = 64 << 20  # any other query text
_SLOT_WAIT = 30.0  # seconds a request waits for a free engine slot before it is refused
_TAG_CHARS = string.ascii_letters + string.digits


class SqlServerError(RuntimeError):
    """The SQL interface cannot start (address in use, engine not available)."""

    retriable: ClassVar[bool] = False


@dataclass(frozen=True)
class ServerOptions:
    """What the server needs from the settings of `run` or `serve-sql`."""

    host: str
    port: int
    user: str = "default"
    password: str = ""  # empty: credentials are not checked
    read_only: bool = False
    max_queries: int = 16


@dataclass
class Call:
    """One request's parameters, in ClickHouse's terms."""

    query_id: str
    database: str = ""
    default_format: str = "TabSeparated"
    settings: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    readonly: int = 0
    revision: int = 0
    wait_end: bool = False
    encoding: str | None = None
    level: int = 3


class SqlServer:
    """Owns the listening socket, the worker threads and a handle on the engine."""

    def __init__(self, data_dir: str, options: ServerOptions) -> None:
        self.data_dir, self.options = data_dir, options
        self.counters: Counter[str] = Counter()
        self.engine: Engine | None = None
        self._runner: web.AppRunner | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._slots = asyncio.Semaphore(options.max_queries)
        self.address = f"{options.host}:{options.port}"

    async def __aenter__(self) -> SqlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Join (or open) the engine, then listen; SqlServerError says why it could not."""
        o = self.options
        self._pool = ThreadPoolExecutor(max_workers=o.max_queries + 2, thread_name_prefix="fleetscope-sql")
        try:
            self.engine = await self._blocking(Engine, self.data_dir)
        except EngineError as e:
            await self.stop()
            raise SqlServerError(f"cannot open the embedded store in {self.data_dir}: {e.message}") from None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, auto_decompress=False, shutdown_timeout=5.0,
            max_line_size=1 << 20, max_field_size=1 << 16, read_bufsize=4 << 20,
        )  # fmt: skip
        await self._runner.setup()
        site = web.TCPSite(self._runner, o.host, o.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise SqlServerError(
                f"cannot listen on {o.host}:{o.port} for the SQL interface: {e.strerror}"
                " (another fleetscope or a ClickHouse server there?); choose another address"
            ) from None
        host, port = self._runner.addresses[0][:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("serving the ClickHouse HTTP interface on http://%s (store %s%s%s)", self.address,
                 self.engine.path, ", read-only" if o.read_only else "",
                 ", password required" if o.password else "")  # fmt: skip

    async def stop(self) -> None:
        """Stop listening, cancel running queries, release the engine handle. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise EngineError(TOO_MANY_SIMULTANEOUS_QUERIES, "the SQL interface is shutting down")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _later(self, fn: Callable[[], object]) -> None:
        """Run a cleanup in the pool without waiting (it must run even if we are cancelled)."""
        if self._pool is not None:
            self._pool.submit(fn)
        else:
            fn()

    # --- request handling -----------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.counters["requests"] += 1
        path, params = request.path, request.rel_url.query
        if path in ("/ping", "/replicas_status") or (
            path == "/" and request.method in ("GET", "HEAD") and "query" not in params and not request.body_exists
        ):
            return web.Response(text="Ok.\n")
        query_id = params.get("query_id") or request.headers.get("X-ClickHouse-Query-Id") or str(uuid.uuid4())
        engine = self.engine
        if engine is None:
            return web.Response(status=503, text="shutting down\n")
        if path.startswith(_STATIC):
            return self._error(EngineError(NOT_IMPLEMENTED, f"{path} is not served by fleetscope",
                                           "NOT_IMPLEMENTED"), query_id, status=404)  # fmt: skip
        try:
            self._authenticate(request, params)
            call = self._call(request, params, query_id)
            try:
                await asyncio.wait_for(self._slots.acquire(), _SLOT_WAIT)
            except TimeoutError:
                raise engine.error(
                    f"all {self.options.max_queries} query slots were busy for {_SLOT_WAIT:.0f}s",
                    TOO_MANY_SIMULTANEOUS_QUERIES,
                ) from None
            try:
                return await self._execute(request, params, call)
            finally:
                self._slots.release()
        except EngineError as e:
            self.counters["errors"] += 1
            log.info("query %s failed: Code %d (%s): %s", query_id, e.code, e.name, e.message.splitlines()[0])
            await self._drain(request)
            return self._error(e, query_id)

    def _error(self, e: EngineError, query_id: str, status: int | None = None) -> web.Response:
        engine = self.engine
        if engine is not None and not e.name:
            e.name = engine.error_names.get(e.code, "")
        body = e.body(engine.version if engine else "unknown")
        headers = {
            "X-ClickHouse-Exception-Code": str(e.code), "X-ClickHouse-Query-Id": query_id,
            "Content-Type": "text/plain; charset=UTF-8",
        }  # fmt: skip
        if e.name:
            headers["X-ClickHouse-Exception-Name"] = e.name
        return web.Response(status=status or e.http_status, text=body, headers=headers)

    async def _drain(self, request: web.Request) -> None:
        """Read what is left of a failed request's body, so the client gets our answer."""
        if request.body_exists and not request.content.at_eof():
            try:
                while await request.content.readany():
                    pass
            except (OSError, web.HTTPException, asyncio.IncompleteReadError):
                pass

    def _authenticate(self, request: web.Request, params: MultiMapping[str]) -> None:
        """ClickHouse's three ways: X-ClickHouse-User/Key, Basic auth, user/password parameters."""
        engine = self.engine
        assert engine is not None
        h = request.headers
        user, key = h.get("X-ClickHouse-User", ""), h.get("X-ClickHouse-Key", "")
        auth = h.get("Authorization", "")
        mixed = "Invalid authentication: it is not allowed to use {} and {} simultaneously"
        if user or key:
            if auth or "user" in params or "password" in params:
                raise engine.error(mixed.format("X-ClickHouse HTTP headers", "other authentication methods"),
                                   AUTHENTICATION_FAILED)  # fmt: skip
            password = key
        elif auth:
            if "user" in params or "password" in params:
                raise engine.error(mixed.format("Authorization HTTP header", "authentication via parameters"),
                                   AUTHENTICATION_FAILED)  # fmt: skip
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "basic":
                raise engine.error(f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported",
                                   AUTHENTICATION_FAILED)  # fmt: skip
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise engine.error("Invalid authentication: malformed Basic credentials",
                                   AUTHENTICATION_FAILED) from None  # fmt: skip
        else:
            user, password = params.get("user", "default"), params.get("password", "")
        o = self.options
        if not o.password:
            return
        ok_user = hmac.compare_digest((user or "default").encode(), o.user.encode())
        if not (hmac.compare_digest(password.encode(), o.password.encode()) and ok_user):
            self.counters["auth_failures"] += 1
            raise engine.error(f"{user or 'default'}: Authentication failed: password is incorrect, or there is "
                               "no user with such name", AUTHENTICATION_FAILED)  # fmt: skip

    def _call(self, request: web.Request, params: MultiMapping[str], query_id: str) -> Call:
        engine = self.engine
        assert engine is not None
        if any(params.get(p, "0") not in ("", "0", "false") for p in ("compress", "decompress")):
            raise engine.error(
                "ClickHouse's own block compression (compress=1, decompress=1) is not supported by fleetscope; "
                "use HTTP compression (Accept-Encoding, Content-Encoding) instead", NOT_IMPLEMENTED,
            )  # fmt: skip
        call = Call(query_id)
        call.database = request.headers.get("X-ClickHouse-Database") or params.get("database", "")
        call.default_format = (
            request.headers.get("X-ClickHouse-Format") or params.get("default_format") or "TabSeparated"
        )
        for key, value in params.items():
            if key.startswith("param_"):
                call.params[key[6:]] = value
            elif key not in _NOT_SETTINGS and key:
                if not SETTING_NAME.match(key):
                    raise engine.error(f"Unknown setting '{key}'", UNKNOWN_SETTING)
                call.settings[key] = value
        try:
            call.revision = int(params.get("client_protocol_version", "0") or 0)
            call.level = int(params.get("http_zlib_compression_level", "3") or 3)
        except ValueError:
            raise engine.error("client_protocol_version and http_zlib_compression_level take integers",
                               BAD_ARGUMENTS) from None  # fmt: skip
        call.wait_end = params.get("wait_end_of_query", "0") in ("1", "true")
        if params.get("enable_http_compression", "1") in ("1", "true"):
            call.encoding = choose_encoding(request.headers.get("Accept-Encoding", ""))
        if self.options.read_only:
            call.readonly = 1
        elif request.method == "GET":
            call.readonly = 2  # ClickHouse: GET requests are read-only
        return call

    async def _execute(self, request: web.Request, params: MultiMapping[str], call: Call) -> web.StreamResponse:
        engine = self.engine
        assert engine is not None
        text = params.get("query", "")
        if request.content_type.startswith("multipart/form-data"):
            text = await self._form(request, call, text)
            body: AsyncIterator[bytes] = _empty()
        else:
            try:
                body = _decoded(request, decoder(request.headers.get("Content-Encoding", "")))
            except DecodeError as e:
                raise engine.error(str(e), CANNOT_DECOMPRESS) from None
        head = (text + "\n").encode() if text else b""
        done = False
        while True:  # read until we know whether this is an INSERT with data, and where it starts
            try:
                insert = sql.split_insert(head, final=done)
                break
            except sql.Incomplete:
                pass
            except sql.SqlRefused as e:
                raise engine.error(str(e), BAD_ARGUMENTS) from None
            if len(head) > _MAX_STATEMENT:
                insert = None
                break
            chunk = await _next(body, engine)
            if chunk is None:
                done = True
            else:
                head += chunk
        if insert is not None and not call.params:
            return await self._insert(call, insert, head[insert.data_start :], body)
        rest = [head]
        size = len(head)
        while (chunk := await _next(body, engine)) is not None:
            size += len(chunk)
            if size > _MAX_QUERY:
                raise engine.error(f"the query is longer than {_MAX_QUERY} bytes", QUERY_IS_TOO_LARGE)
            rest.append(chunk)
        try:
            query = b"".join(rest).decode()
        except UnicodeDecodeError:
            raise engine.error("the query is not valid UTF-8", BAD_ARGUMENTS) from None
        if not query.strip():
            raise engine.error("Empty query", SYNTAX_ERROR)
        return await self._query(request, call, query)

    async def _form(self, request: web.Request, call: Call, text: str) -> str:
        """multipart/form-data: the query and param_* fields; external tables are refused."""
        engine = self.engine
        assert engine is not None
        reader = await request.multipart()
        budget = _MAX_QUERY  # for the query and every parameter together
        async for part in reader:
            name = getattr(part, "name", None) or ""
            if (name == "query" or name.startswith("param_")) and isinstance(part, BodyPartReader):
                value, size = await _part_text(part, budget, engine)
                budget -= size
                if name == "query":
                    text = value
                else:
                    call.params[name[6:]] = value
            else:
                raise engine.error(f"external data (form field {name!r}) is not supported by fleetscope",
                                   NOT_IMPLEMENTED)  # fmt: skip
        return text

    def _headers(self, call: Call, stats: Stats | None, fmt: str | None, content_type: str) -> CIMultiDict[str]:
        engine = self.engine
        assert engine is not None
        h: CIMultiDict[str] = CIMultiDict()
        h["Content-Type"] = content_type
        h["X-ClickHouse-Query-Id"] = call.query_id
        h["X-ClickHouse-Timezone"] = call.settings.get("session_timezone") or engine.timezone
        h["X-ClickHouse-Server-Display-Name"] = engine.host
        if fmt:
            h["X-ClickHouse-Format"] = fmt
        if stats is not None:
            h["X-ClickHouse-Summary"] = stats.header()
        return h

    async def _query(self, request: web.Request, call: Call, query: str) -> web.StreamResponse:
        engine = self.engine
        assert engine is not None
        conn = await self._blocking(engine.handle)
        owned = True
        try:
            fmt, streamed = await self._blocking(self._plan, conn, call, query)
            content_type = engine.formats[fmt.lower()].content_type if fmt else "text/plain; charset=UTF-8"
            encoder = Encoder(call.encoding, call.level) if call.encoding else None
            if not streamed:
                body, stats = await self._blocking(self._whole, conn, call, query, fmt)
                h = self._headers(call, stats, fmt, content_type)
                if encoder is not None:
                    body = encoder.compress(body) + encoder.finish() if body else b""
                    if body:
                        h["Content-Encoding"] = encoder.name
                self.counters["queries"] += 1
                self.counters["bytes_out"] += len(body)
                return web.Response(body=body, headers=h)
            assert fmt is not None
            stream = await self._blocking(
                ResultStream, engine, conn, query, fmt, call.params, framer(fmt, call.revision), encoder
            )
            owned = False
            return await self._stream(request, call, stream, fmt, content_type, encoder)
        finally:
            if owned:
                self._later(conn.close)

    def _plan(self, conn: Any, call: Call, query: str) -> tuple[str | None, bool]:
        """In a worker: refuse what this request may not run, apply its settings, and pick
        the output format (None for statements without a result) and whether to stream."""
        engine = self.engine
        assert engine is not None
        try:
            info = conn.classify_query(query)
        except RuntimeError as e:
            raise engine.error(e) from None
        if info["statement_count"] > 1:
            raise engine.error("Syntax error: Multi-statements are not allowed", SYNTAX_ERROR)
        kind = info["query_class"].name
        mutating = kind in ("MUTATING", "MUTATING_GLOBAL")
        if (call.readonly == 1 and kind not in ("READ_ONLY", "UNKNOWN")) or (call.readonly == 2 and mutating):
            raise engine.error(self._readonly_message(), READONLY)
        try:
            shape = sql.shape(query.encode())
        except sql.SqlRefused as e:
            raise engine.error(str(e), INTO_OUTFILE_NOT_ALLOWED) from None
        prepare(engine, conn, call.database, call.settings, call.readonly)
        if kind != "READ_ONLY":
            return None, False
        fmt = engine.canonical_format(shape.fmt or call.default_format, output=True).name
        streamed = (
            shape.first_word in ("SELECT", "WITH")
            and not shape.totals
            and fmt in STREAMED
            and call.settings.get("extremes", "0") in ("0", "false")
            and not (fmt == "Arrow" and call.settings.get("output_format_arrow_low_cardinality_as_dictionary"))
        )
        return fmt, streamed

    def _readonly_message(self) -> str:
        if self.options.read_only:
            return "Cannot execute query in readonly mode: this server accepts SELECT, SHOW, DESCRIBE, EXISTS, EXPLAIN"
        return "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. Use POST"

    def _whole(self, conn: Any, call: Call, query: str, fmt: str | None) -> tuple[bytes, Stats]:
        """In a worker: run a statement to completion; the engine formats the whole result."""
        engine = self.engine
        assert engine is not None
        stats = Stats()
        try:
            result = conn.query(query, fmt or "TabSeparated", params=call.params)
        except RuntimeError as e:
            raise engine.error(e) from None
        stats.add_result(result)
        if not fmt:
            return b"", stats
        if fmt == "Native" and call.revision:  # whole results also get the client's block layout
            return framer(fmt, call.revision).frame(result.bytes()), stats
        return result.bytes(), stats

    async def _stream(self, request: web.Request, call: Call, stream: ResultStream, fmt: str,
                      content_type: str, encoder: Encoder | None) -> web.StreamResponse:  # fmt: skip
        """First chunk before the headers (so most errors get a proper status), then stream.
        A failure after that is written into the body as ClickHouse's tagged exception block."""
        try:
            first = await self._blocking(stream.next)
            if call.wait_end:
                parts = [first or b""]
                while (part := await self._blocking(stream.next)) is not None:
                    parts.append(part)
                body = b"".join(parts)
                h = self._headers(call, stream.stats, fmt, content_type)
                if encoder is not None:
                    h["Content-Encoding"] = encoder.name
                self.counters["queries"] += 1
                self.counters["bytes_out"] += len(body)
                return web.Response(body=body, headers=h)
            h = self._headers(call, stream.stats, fmt, content_type)
            tag = "".join(secrets.choice(_TAG_CHARS) for _ in range(16))
            h["X-ClickHouse-Exception-Tag"] = tag
            if encoder is not None:
                h["Content-Encoding"] = encoder.name
            response = web.StreamResponse(headers=h)
            await response.prepare(request)
            chunk = first
            try:
                while chunk is not None:
                    if chunk:
                        await response.write(chunk)
                        self.counters["bytes_out"] += len(chunk)
                    chunk = await self._blocking(stream.next)
            except (EngineError, FramingError) as e:
                err = e if isinstance(e, EngineError) else EngineError(1002, str(e), "UNKNOWN_EXCEPTION")
                self.counters["errors_mid_stream"] += 1
                log.info("query %s failed after its first block: %s", call.query_id, err.message.splitlines()[0])
                assert self.engine is not None
                msg = err.body(self.engine.version).rstrip("\n").encode()
                block = b"\r\n__exception__\r\n%s\r\n%s\n%d %s\r\n__exception__\r\n" % (
                    tag.encode(), msg, len(msg) + 1, tag.encode())  # fmt: skip
                await response.write(stream.error_tail(block))
            except ConnectionResetError:  # the client went away; close() cancels the query
                self.counters["client_disconnects"] += 1
                log.debug("query %s: the client closed the connection mid-result", call.query_id)
                return response
            self.counters["queries"] += 1
            await response.write_eof()
            return response
        except FramingError as e:
            raise EngineError(1002, str(e), "UNKNOWN_EXCEPTION") from None
        finally:
            self._later(stream.close)

    async def _insert(self, call: Call, insert: sql.InsertData, head: bytes,
                      body: AsyncIterator[bytes]) -> web.StreamResponse:  # fmt: skip
        """Stream the request's rows into the engine, a buffer at a time, reading the next
        buffer while the engine parses the previous one."""
        engine = self.engine
        assert engine is not None
        if call.readonly:
            raise engine.error(self._readonly_message(), READONLY)
        fmt = engine.canonical_format(insert.fmt, output=False).name
        conn = await self._blocking(engine.handle)
        stream: InsertStream | None = None
        try:
            stream = await self._blocking(self._open_insert, conn, call, insert.statement, fmt)
            pending: asyncio.Future[None] | None = None
            buffer = bytearray(head)
            while True:
                chunk = await _next(body, engine)
                if chunk is not None:
                    buffer += chunk
                if buffer and (chunk is None or len(buffer) >= _INSERT_BUFFER):
                    if pending is not None:
                        await pending
                    pending = asyncio.ensure_future(self._blocking(stream.append, bytes(buffer)))
                    buffer.clear()
                if chunk is None:
                    break
            if pending is not None:
                await pending
            stats = await self._blocking(stream.finish)
        except BaseException:
            if stream is not None:
                self._later(stream.cancel)
            raise
        finally:
            self._later(stream.close if stream is not None else conn.close)
        self.counters["inserts"] += 1
        self.counters["rows_inserted"] += stats.written_rows
        return web.Response(headers=self._headers(call, stats, None, "text/plain; charset=UTF-8"))

    def _open_insert(self, conn: Any, call: Call, statement: str, fmt: str) -> InsertStream:
        engine = self.engine
        assert engine is not None
        try:
            info = conn.classify_query(statement)
        except RuntimeError as e:
            raise engine.error(e) from None
        if info["statement_count"] > 1:
            raise engine.error("Syntax error: Multi-statements are not allowed", SYNTAX_ERROR)
        prepare(engine, conn, call.database, call.settings, 0)
        return InsertStream(engine, conn, statement, fmt)


async def _part_text(part: BodyPartReader, budget: int, engine: Engine) -> tuple[str, int]:
    """A form field's text and its size in bytes, read in chunks and refused beyond budget
    bytes (aiohttp's part.text() would read any size into memory)."""
    chunks, size = [], 0
    while chunk := await part.read_chunk(1 << 16):
        size += len(chunk)
        if size > budget:
            raise engine.error(f"the form's query and parameters exceed {_MAX_QUERY} bytes", QUERY_IS_TOO_LARGE)
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode(part.get_charset(default="utf-8")), size
    except (UnicodeDecodeError, LookupError):
        raise engine.error(f"form field {part.name!r} is not valid text", BAD_ARGUMENTS) from None


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


async def _decoded(request: web.Request, dec: Any) -> AsyncIterator[bytes]:
    """The request body as it arrives, decompressed."""
    while True:
        data = await request.content.readany()
        if not data:
            dec.finish()
            return
        for out in dec.pieces(data):  # at most codecs.PIECE_BYTES each, whatever the ratio
            if out:
                yield out


async def _next(body: AsyncIterator[bytes], engine: Engine) -> bytes | None:
    try:
        return await anext(body)
    except StopAsyncIteration:
        return None
    except DecodeError as e:
        raise engine.error(str(e), CANNOT_DECOMPRESS) from None
