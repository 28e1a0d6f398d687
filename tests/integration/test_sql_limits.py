"""The ClickHouse HTTP interface bounds what one request can make it allocate.

A 1 GiB body of zeros compressed to about 1 MiB, sent as the query, is refused (code 97,
the query is too large) once 64 MiB of it are decoded; the server's peak memory (VmHWM of the
real `fleetscope serve-sql` process) grows by far less than the body would expand to. An
oversized multipart form field is refused the same way.
"""

from __future__ import annotations

import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from tests.support.sql_http import ServeSql

pytestmark = [pytest.mark.integration]


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:"))) / 1024


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_bombs_and_oversized_forms_are_refused_with_bounded_memory(tmp_path: Path) -> None:
    c = zlib.compressobj(9, wbits=31)
    zeros = bytes(1 << 20)
    bomb = b"".join(c.compress(zeros) for _ in range(1024)) + c.flush()  # 1 GiB of zeros
    with ServeSql(tmp_path / "store", tmp_path / "serve.log") as server:
        assert server.proc is not None
        status, _ = post(server.url + "/", b"SELECT 1", {})
        assert status == 200
        before = peak_rss_mib(server.proc.pid)
        status, text = post(server.url + "/", bomb, {"Content-Encoding": "gzip"})
        assert "the query is longer than 67108864 bytes" in text, (status, text[:300])
        grown = peak_rss_mib(server.proc.pid) - before
        print(f"peak RSS grew {grown:.0f} MiB for a {len(bomb) >> 10} KiB body that expands to 1 GiB")
        assert grown < 400

        boundary = "fsboundary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"query\"\r\n\r\n".encode()
                + b"SELECT 1 -- " + b"x" * (65 << 20) + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
        status, text = post(server.url + "/", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert "the form's query and parameters exceed 67108864 bytes" in text, (status, text[:300])
        status, text = post(server.url + "/", b"SELECT 42", {})
        assert (status, text.strip()) == (200, "42")  # and it still serves
