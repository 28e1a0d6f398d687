"""Start `fleetscope serve-sql` (a real process) and find the address it listens on."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from tests.support.procs import FleetscopeProcess

_ADDRESS = re.compile(r"serving the ClickHouse HTTP interface on http://(\S+)")


def free_port() -> int:
    """A TCP port nothing listens on right now (for servers that must come back on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeSql(FleetscopeProcess):
    """`fleetscope serve-sql --data-dir DIR --listen ADDR [extra flags]`; .url once started."""

    def __init__(self, data_dir: Path, log: Path, *extra: str, listen: str = "127.0.0.1:0",
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__("serve-sql", "--data-dir", str(data_dir), "--listen", listen, *extra, log=log, env=env)
        self.url = ""

    def start(self) -> ServeSql:
        super().start()
        self.wait_for_log("serving the ClickHouse HTTP interface on", 60)
        self.url = "http://" + _ADDRESS.findall(self.log_text())[-1]
        return self

    def __enter__(self) -> ServeSql:
        return self.start()

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])


def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll predicate() until it is true; AssertionError naming what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s")
