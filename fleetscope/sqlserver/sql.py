"""Just enough ClickHouse SQL lexing for the HTTP interface.

The engine parses and classifies statements itself (``classify_query``); what it cannot
tell us before running them is where an INSERT's inline data begins, which output FORMAT a
query names (it wins over ``default_format`` and decides how results are framed), and
whether a query uses clauses an HTTP server must refuse (``INTO OUTFILE``, ``FROM INFILE``
touch the server's files). Works on bytes so INSERT data offsets are byte offsets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

_WS = frozenset(b" \t\n\r\f\v")
_WORD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_0123456789") | frozenset(
    range(0x80, 0x100)
)
_WORD = _WORD_START | frozenset(b"$")
_QUOTES = frozenset(b"'\"`")


class Incomplete(Exception):
    """The buffer ends inside the statement; read more of the request body."""


class SqlRefused(ValueError):
    """The statement uses a clause the HTTP interface refuses (message says which)."""


@dataclass(frozen=True)
class Tok:
    kind: str  # "word", "quoted" (string or quoted identifier), "punct", "heredoc"
    start: int
    end: int


def tokens(buf: bytes, final: bool, pos: int = 0) -> Iterator[Tok]:
    """Tokens of buf without whitespace and comments; Incomplete if not final and a
    literal, comment or heredoc runs to the end of the buffer."""
    n = len(buf)
    while pos < n:
        c = buf[pos]
        if c in _WS:
            pos += 1
        elif buf.startswith(b"--", pos) or (c == 0x23 and buf[pos + 1 : pos + 2] in (b" ", b"!")):
            end = buf.find(b"\n", pos)
            if end < 0:
                if not final:
                    raise Incomplete
                return
            pos = end + 1
        elif buf.startswith(b"/*", pos):
            end = buf.find(b"*/", pos + 2)
            if end < 0:
                if not final:
                    raise Incomplete
                return
            pos = end + 2
        elif c in _QUOTES:
            end = _quoted_end(buf, pos)
            if end < 0:
                if not final:
                    raise Incomplete
                yield Tok("quoted", pos, n)
                return
            yield Tok("quoted", pos, end)
            pos = end
        elif c == 0x24 and (heredoc := _heredoc_end(buf, pos)) != 0:  # $tag$ ... $tag$
            if heredoc < 0:
                if not final:
                    raise Incomplete
                yield Tok("heredoc", pos, n)
                return
            yield Tok("heredoc", pos, heredoc)
            pos = heredoc
        elif c in _WORD_START:
            end = pos + 1
            while end < n and buf[end] in _WORD:
                end += 1
            if end == n and not final:
                raise Incomplete  # the word may go on
            yield Tok("word", pos, end)
            pos = end
        else:
            yield Tok("punct", pos, pos + 1)
            pos += 1


def _quoted_end(buf: bytes, pos: int) -> int:
    """End (exclusive) of the literal opened at pos; backslash escapes and doubled quotes."""
    quote, i, n = buf[pos], pos + 1, len(buf)
    while i < n:
        c = buf[i]
        if c == 0x5C:  # backslash
            i += 2
        elif c == quote:
            if i + 1 < n and buf[i + 1] == quote:
                i += 2
            elif i + 1 == n:
                return -1  # a doubled quote may follow
            else:
                return i + 1
        else:
            i += 1
    return -1


def _heredoc_end(buf: bytes, pos: int) -> int:
    """0 if no heredoc starts at pos, -1 if it is unterminated, else its end."""
    close = buf.find(b"$", pos + 1)
    if close < 0:
        return 0
    tag = buf[pos : close + 1]
    if not all(ch in _WORD_START for ch in tag[1:-1]):
        return 0
    end = buf.find(tag, close + 1)
    return -1 if end < 0 else end + len(tag)


def _word(buf: bytes, t: Tok) -> str:
    return buf[t.start : t.end].decode("utf-8", "replace").upper() if t.kind == "word" else ""


def _name(buf: bytes, t: Tok) -> str:
    """A format name: a bare word or a quoted identifier."""
    raw = buf[t.start : t.end].decode("utf-8", "replace")
    return raw[1:-1] if t.kind == "quoted" else raw


@dataclass(frozen=True)
class InsertData:
    """An INSERT whose rows follow in the request: statement (without FORMAT), input format,
    and the byte offset in the buffer where the data begins."""

    statement: str
    fmt: str
    data_start: int


def split_insert(buf: bytes, final: bool) -> InsertData | None:
    """Find where an INSERT's inline data starts; None for anything else (INSERT SELECT,
    INSERT without data, or not an INSERT). Incomplete if more of the body is needed."""
    toks = tokens(buf, final)
    for keyword in ("INSERT", "INTO"):
        t = next(toks, None)
        if t is None:
            return _eof(final)  # type: ignore[func-returns-value]
        if _word(buf, t) != keyword:
            return None
    t = next(toks, None)
    if t is None:
        return _eof(final)  # type: ignore[func-returns-value]
    if _word(buf, t) == "TABLE":
        t = next(toks, None)
    if t is not None and _word(buf, t) == "FUNCTION":
        t = next(toks, None)  # the function name; its arguments are a group below
    elif t is not None:
        t = next(toks, None)  # past the table name
        if t is not None and buf[t.start : t.end] == b".":
            next(toks, None)
            t = next(toks, None)
    depth = 0
    while t is not None:
        text = buf[t.start : t.end]
        if t.kind == "punct" and text in (b"(", b"["):
            depth += 1
        elif t.kind == "punct" and text in (b")", b"]"):
            depth -= 1
        elif depth == 0 and t.kind == "word":
            kw = _word(buf, t)
            if kw == "FORMAT":
                name = next(toks, None)
                if name is None or name.kind not in ("word", "quoted"):
                    return _eof(final)  # type: ignore[func-returns-value]
                return InsertData(buf[: t.start].decode(), _name(buf, name), _data_start(buf, name.end, final))
            if kw == "VALUES":
                return InsertData(buf[: t.start].decode(), "Values", t.end)
            if kw in ("SELECT", "WITH"):
                return None
            if kw == "FROM":
                raise SqlRefused("FROM INFILE reads files on the server; send the data in the request body")
        t = next(toks, None)
    return _eof(final)  # type: ignore[func-returns-value]


def _eof(final: bool) -> None:
    """At the end of what was read: an INSERT without data if that is all, else read on."""
    if not final:
        raise Incomplete


def _data_start(buf: bytes, pos: int, final: bool) -> int:
    """ClickHouse's rule: data starts after spaces and tabs and one optional line break."""
    n = len(buf)
    while pos < n and buf[pos] in b" \t\f":
        pos += 1
    if pos < n and buf[pos] == 0x0D:
        pos += 1
    if pos == n and not final:
        raise Incomplete
    if pos < n and buf[pos] == 0x0A:
        pos += 1
    return pos


@dataclass(frozen=True)
class QueryShape:
    """What the server needs to know about a complete statement before running it."""

    first_word: str
    fmt: str | None  # the FORMAT clause's name, if the statement has one
    totals: bool  # WITH TOTALS: the engine's streaming drops the totals, so it runs whole


def shape(buf: bytes) -> QueryShape:
    """First keyword, trailing FORMAT clause and WITH TOTALS of one complete statement.

    Raises SqlRefused for INTO OUTFILE, which would write a file on the server.
    """
    toks = [t for t in tokens(buf, final=True)]
    first = ""
    for t in toks:
        if t.kind == "word":
            first = _word(buf, t)
            break
        if buf[t.start : t.end] != b"(":
            break
    depth, fmt, totals = 0, None, False
    for i, t in enumerate(toks):
        text = buf[t.start : t.end]
        if t.kind == "punct" and text in (b"(", b"["):
            depth += 1
        elif t.kind == "punct" and text in (b")", b"]"):
            depth -= 1
        elif t.kind == "word":
            kw = _word(buf, t)
            if kw == "TOTALS" and i > 0 and _word(buf, toks[i - 1]) == "WITH":
                totals = True
            elif depth == 0 and kw == "OUTFILE" and i > 0 and _word(buf, toks[i - 1]) == "INTO":
                raise SqlRefused("INTO OUTFILE writes files on the server; read the result from the response")
            elif depth == 0 and kw == "FORMAT" and i + 1 < len(toks) and toks[i + 1].kind in ("word", "quoted"):
                rest = toks[i + 2 :]
                if not rest or buf[rest[0].start : rest[0].end] == b";" or _word(buf, rest[0]) == "SETTINGS":
                    fmt = _name(buf, toks[i + 1])
    return QueryShape(first, fmt, totals)
