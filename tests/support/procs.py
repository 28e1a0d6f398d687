"""Run fleetscope CLI processes and marker workloads for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


class FleetscopeProcess:
    """`python -m fleetscope ARGS` in the background, its output in a log file."""

    def __init__(self, *args: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.args, self.log_path = args, log
        self.env = {**os.environ, **(env or {})}
        if args[:1] == ("agent",) and "--spool-dir" not in args:
            # an agent's disk spool is private to it (locked): never the machine's default
            # /var/lib/fleetscope/spool, which agents of other test runs may hold
            self.env.setdefault("FLEETSCOPE_SPOOL_DIR", str(log.with_suffix(".spool")))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.returncode: int | None = None

    def start(self) -> FleetscopeProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetscope", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )  # fmt: skip
        return self

    def __enter__(self) -> FleetscopeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_text():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.args[0]} did not log {text!r} in {timeout}s:\n{self.log_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is not None and self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.returncode = self.proc.wait()
                raise AssertionError(f"{self.args[0]} ignored signal {sig} for {timeout}s") from None
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.returncode


def spawn_markers(n: int, marker: str) -> dict[int, tuple[int, int]]:
    """Run n processes `/bin/sh -c 'exit CODE' MARKER-I` with distinct arguments and exit
    codes I % 256; returns pid -> (I, CODE)."""
    expected: dict[int, tuple[int, int]] = {}
    for i in range(n):
        code = i % 256
        p = subprocess.Popen(["/bin/sh", "-c", f"exit {code}", f"{marker}-{i}"])
        assert p.wait() == code
        expected[p.pid] = (i, code)
    return expected
