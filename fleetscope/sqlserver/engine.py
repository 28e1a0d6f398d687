"""The embedded engine as the HTTP interface uses it: one connection handle per request.

chdb hosts one engine per process but any number of connection handles to it, and
queries on different handles run in parallel (the GIL is released while the engine works).
Opening a handle on the running engine costs about 0.2 ms, so every request gets a fresh
one: URL settings, ``database`` and the read-only level are applied to that handle alone
and vanish with it, and a slow SELECT never holds a lock that an insert (the in-process
ingester's own handle, or another request's) waits for. An anchor handle keeps the engine
up between requests. All calls here block; the server runs them in its worker threads.

The raw binding (``chdb._chdb``) is used rather than ``chdb.connect``: its streaming
iterator stops at the first chunk without rows and so drops the header an empty result
still has in formats such as CSVWithNames or JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from chdb import _chdb

from fleetscope.sqlserver.codecs import Encoder
from fleetscope.sqlserver.formats import Framer

_CODE = re.compile(r"Code: (\d+)\. DB::Exception: ")
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")
_VERSION = re.compile(r"\s*\(version [^()]*\)\.?")
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Error codes the server raises itself (names as the engine's errorCodeToName gives them).
UNKNOWN_SETTING = 115
SYNTAX_ERROR = 62
BAD_ARGUMENTS = 36
NOT_IMPLEMENTED = 48
READONLY = 164
UNKNOWN_FORMAT = 73
AUTHENTICATION_FAILED = 516
TOO_MANY_SIMULTANEOUS_QUERIES = 202
QUERY_IS_TOO_LARGE = 97
CANNOT_DECOMPRESS = 271
INTO_OUTFILE_NOT_ALLOWED = 489
UNKNOWN_EXCEPTION = 1002

_BAD_REQUEST = {
    "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT", "CANNOT_PARSE_ESCAPE_SEQUENCE",
    "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER",
    "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6",
    "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN",
    "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST", "TOO_BIG_AST",
    "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
    "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE", "CANNOT_DECOMPRESS", "UNKNOWN_QUERY_PARAMETER",
    "BAD_QUERY_PARAMETER",
}  # fmt: skip
_NOT_FOUND = {
    "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
    "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING", "UNKNOWN_AGGREGATE_FUNCTION",
    "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE", "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE",
}  # fmt: skip
_FORBIDDEN = {"UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE", "ACCESS_DENIED"}
_STATUS_BY_NAME = {
    "REQUIRED_PASSWORD": 401, "QUERY_IS_TOO_LARGE": 413, "NOT_IMPLEMENTED": 501, "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503, "HTTP_LENGTH_REQUIRED": 411, "TIMEOUT_EXCEEDED": 408, "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}  # fmt: skip


class EngineError(Exception):
    """A failure in ClickHouse's terms: code, symbolic name and message."""

    def __init__(self, code: int, message: str, name: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.name = code, message, name

    @property
    def http_status(self) -> int:
        """The status ClickHouse's HTTP handler gives this error (exceptionCodeToHTTPStatus)."""
        if self.name in _FORBIDDEN:
            return 403
        if self.name in _BAD_REQUEST:
            return 400
        if self.name in _NOT_FOUND:
            return 404
        return _STATUS_BY_NAME.get(self.name, 500)

    def body(self, version: str) -> str:
        """``Code: N. DB::Exception: message (NAME) (version V)``, as ClickHouse writes it."""
        text = self.message.rstrip().rstrip(".")
        if self.name and not text.endswith(f"({self.name})"):
            text = f"{text}. ({self.name})"
        return f"Code: {self.code}. DB::Exception: {text} (version {version})\n"


@dataclass(frozen=True)
class FormatInfo:
    name: str
    is_input: bool
    is_output: bool
    content_type: str


@dataclass
class Stats:
    """What X-ClickHouse-Summary reports; strings, as ClickHouse sends them."""

    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    result_rows: int = 0
    result_bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    def add_result(self, result: Any) -> None:
        self.read_rows += int(result.storage_rows_read())
        self.read_bytes += int(result.storage_bytes_read())
        self.written_rows += int(result.rows_written())
        self.written_bytes += int(result.bytes_written())
        self.result_rows += int(result.rows_read())
        self.result_bytes += len(result.bytes())

    def header(self) -> str:
        values = {
            "read_rows": self.read_rows, "read_bytes": self.read_bytes, "written_rows": self.written_rows,
            "written_bytes": self.written_bytes, "total_rows_to_read": self.read_rows,
            "result_rows": self.result_rows, "result_bytes": self.result_bytes,
            "elapsed_ns": int((time.monotonic() - self.started) * 1e9),
        }  # fmt: skip
        return json.dumps({k: str(v) for k, v in values.items()}, separators=(",", ":"))


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Engine:
    """The process's engine, opened (or joined, in `fleetscope run`) at one data directory."""

    def __init__(self, data_dir: str) -> None:
        # chdb compares engine paths literally; clickhouse-connect's chdb:// client uses
        # realpath too, so `fleetscope run`'s ingester and this server share one engine.
        self.path = os.path.realpath(data_dir)
        os.makedirs(self.path, exist_ok=True)
        self._anchor = self._connect()
        row = self._anchor.query("SELECT version(), timezone(), hostName()", "TabSeparated").bytes()
        self.version, self.timezone, self.host = row.decode().rstrip("\n").split("\t")
        formats = self._anchor.query(
            "SELECT name, is_input, is_output, content_type FROM system.formats", "JSONCompactEachRow"
        ).bytes()
        self.formats: dict[str, FormatInfo] = {}
        for line in formats.splitlines():
            name, is_in, is_out, ctype = json.loads(line)
            self.formats[name.lower()] = FormatInfo(name, bool(is_in), bool(is_out), ctype)
        names = self._anchor.query(
            "SELECT number, errorCodeToName(number) FROM numbers(2000) WHERE errorCodeToName(number) != ''",
            "TabSeparated",
        ).bytes()
        self.error_names = {int(c): n for c, n in (ln.split("\t") for ln in names.decode().splitlines())}

    def _connect(self) -> Any:
        try:
            return _chdb.connect(self.path)  # type: ignore[attr-defined]
        except RuntimeError as e:
            raise self.error(e) from None

    def handle(self) -> Any:
        """A fresh connection handle to the engine, with the engine's default settings."""
        return self._connect()

    def error(self, e: BaseException | str, code: int = 0) -> EngineError:
        """An EngineError from an engine exception (or our own message with a code)."""
        text = str(e).strip()
        matches = list(_CODE.finditer(text))
        if matches:
            code, text = int(matches[-1].group(1)), text[matches[-1].end() :]
        code = code or UNKNOWN_EXCEPTION
        text = _VERSION.sub("", text).strip()
        found = _NAME.findall(text)
        name = self.error_names.get(code) or (found[-1] if found else "")
        if name and text.endswith(f"({name})."):
            text = text[:-1]
        return EngineError(code, text, name)

    def canonical_format(self, name: str, output: bool) -> FormatInfo:
        info = self.formats.get(name.lower())
        if info is None or not (info.is_output if output else info.is_input):
            kind = "output" if output else "input"
            raise self.error(f"Unknown {kind} format {name}", UNKNOWN_FORMAT)
        return info

    def close(self) -> None:
        anchor, self._anchor = self._anchor, None
        if anchor is not None:
            anchor.close()


def prepare(engine: Engine, conn: Any, database: str, settings: dict[str, str], readonly: int) -> None:
    """Apply a request's database, settings and read-only level to its fresh handle."""
    try:
        if database:
            conn.query(f"USE {quote_identifier(database)}", "TabSeparated")
        ordered = sorted(settings.items(), key=lambda kv: kv[0] == "readonly")
        if readonly:
            ordered = [(k, v) for k, v in ordered if k != "readonly"] + [("readonly", str(readonly))]
        if ordered:
            conn.query("SET " + ", ".join(f"{k} = {quote_literal(v)}" for k, v in ordered), "TabSeparated")
    except RuntimeError as e:
        raise engine.error(e) from None


class ResultStream:
    """A running SELECT on its own handle: each step fetches a chunk, frames and compresses it."""

    def __init__(self, engine: Engine, conn: Any, sql: str, fmt: str, params: dict[str, str],
                 framer: Framer, encoder: Encoder | None) -> None:  # fmt: skip
        self.engine, self.conn, self.framer, self.encoder = engine, conn, framer, encoder
        self.stats = Stats()
        try:
            self._stream: Any = conn.send_query(sql, fmt, params=params)
        except RuntimeError as e:
            raise engine.error(e) from None
        self._done = False

    def next(self) -> bytes | None:
        """The next piece of the response body, or None at the end."""
        if self._done:
            return None
        try:
            result = self.conn.streaming_fetch_result(self._stream)
        except RuntimeError as e:
            self._done = True
            raise self.engine.error(e) from None
        data = result.bytes() if result is not None else b""
        if not data:
            self._done = True
            out = self.framer.finish()
            return self._compress(out, final=True)
        self.stats.add_result(result)
        return self._compress(self.framer.frame(data), final=False)

    def _compress(self, data: bytes, final: bool) -> bytes:
        if self.encoder is None:
            return data
        out = self.encoder.compress(data) if data else b""
        return out + self.encoder.finish() if final else out

    def error_tail(self, block: bytes) -> bytes:
        """The exception block after a mid-stream failure, through the same compressor."""
        return self._compress(block, final=True)

    def close(self) -> None:
        if not self._done:
            self._done = True
            with contextlib.suppress(RuntimeError):
                self.conn.streaming_cancel_query(self._stream)
        self.conn.close()


class InsertStream:
    """A streaming INSERT on its own handle: the request body goes to the engine as it arrives."""

    def __init__(self, engine: Engine, conn: Any, statement: str, fmt: str) -> None:
        self.engine, self.conn = engine, conn
        self.stats = Stats()
        try:
            self._ins: Any = conn.send_insert(statement, fmt)
        except RuntimeError as e:
            raise engine.error(e) from None
        self._open = True

    def append(self, data: bytes) -> None:
        try:
            self.conn.insert_append(self._ins, data)
        except RuntimeError as e:
            self.cancel()
            raise self.engine.error(e) from None

    def finish(self) -> Stats:
        self._open = False
        try:
            result = self.conn.insert_done(self._ins)
        except RuntimeError as e:
            raise self.engine.error(e) from None
        self.stats.written_rows = int(result.rows_written())
        self.stats.written_bytes = int(result.bytes_written())
        return self.stats

    def cancel(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(RuntimeError):
                self.conn.insert_cancel(self._ins)

    def close(self) -> None:
        self.cancel()
        self.conn.close()
