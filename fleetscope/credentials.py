"""Secrets in settings, DSNs and messages: kept out of logs, reprs and error texts.

Passwords reach fleetscope from the environment or from a file (first line), never from a
log line: a `Secret` shows as '***' in a repr (a settings object logged whole), a DSN is
shown with its password masked, and `scrub` takes known secrets out of any text (a driver
error that echoes what it was given) before it is logged or printed. Nothing here imports a
driver, so the config module can use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# query-string keys that carry a password in DSNs and ClickHouse HTTP URLs
_SECRET_PARAMS = frozenset({"password", "pass", "pwd", "secret", "token", "access_token", "key"})
# user:password@ in any URL inside a text
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<pw>[^/\s@]*)@")


class Secret(str):
    """A str whose repr is masked: a frozen settings dataclass logged whole (its repr) does
    not print the value. str(), formatting and comparison still give the real value, for
    the one place that hands it to a client library."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(MASK) if self else "''"


def secret(text: str) -> Secret:
    """Parser for secret settings: the value as a Secret."""
    return Secret(text)


def read_secret_file(key: str, path: Path) -> Secret:
    """The first line of a secret file (a mounted Kubernetes secret, a systemd credential).

    Raises ValueError naming the key and the fix, without the file's content."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{key}: {path} is not UTF-8 text") from None
    if not lines or not lines[0]:
        raise ValueError(f"{key}: {path} is empty; put the secret on its first line")
    return Secret(lines[0])


def mask_dsn(dsn: str) -> str:
    """The DSN with its password (user:password@, and ?password= style parameters) replaced
    by ***, safe to log."""
    try:
        parts = urlsplit(dsn)
    except ValueError:  # not a URL at all (e.g. a bad IPv6 literal): show nothing of it
        return MASK
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return dsn  # urlunsplit would also rewrite chdb:///path as chdb:/path
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """text with URL passwords masked and every given secret (of 4 or more characters, so a
    short one does not mangle the message) replaced by ***."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@" if m["pw"] else m[0], text)
    for s in sorted({str(s) for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, MASK)
    return text
