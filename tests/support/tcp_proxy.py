"""A recording TCP proxy on loopback, for tests that check what goes over the wire.

Every connection accepted on `port` is relayed to the target; the bytes the client sent
are kept per connection (the first `keep` bytes of each), so a test can check that a
client's traffic is TLS from its first byte and that no known plaintext appears in it.
Runs in threads, so it serves clients in other processes and in the test's event loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self

__all__ = ["RecordingProxy", "is_tls_client_hello"]


def is_tls_client_hello(data: bytes) -> bool:
    """Whether data starts with a TLS handshake record holding a ClientHello."""
    return len(data) >= 6 and data[0] == 0x16 and data[1] == 0x03 and data[5] == 0x01


class RecordingProxy:
    """Relay 127.0.0.1:port -> target, recording what clients send."""

    def __init__(self, target_port: int, port: int = 0, keep: int = 1 << 20) -> None:
        self.target = ("127.0.0.1", target_port)
        self.keep = keep
        self.sent: list[bytearray] = []  # per connection, the client's bytes (first `keep`)
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = int(self._server.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closed = False

    def start(self) -> Self:
        t = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def close(self) -> None:
        self._closed = True
        self._server.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def client_bytes(self) -> list[bytes]:
        with self._lock:
            return [bytes(b) for b in self.sent]

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            record = bytearray()
            with self._lock:
                self.sent.append(record)
                self._sockets += [client, upstream]
            for src, dst, rec in ((client, upstream, record), (upstream, client, None)):
                t = threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None and len(record) < self.keep:
                    with self._lock:
                        record += data[: self.keep - len(record)]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
