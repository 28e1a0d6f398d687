"""The agent runs with CAP_BPF and CAP_PERFMON only, and says what is missing without them.

`setpriv --bounding-set -all,+bpf,+perfmon` keeps uid 0 (this machine's Python lives under
/root, which no other user can read) but takes every other capability out of the bounding
set, so the exec'd agent's effective set is exactly those two: no CAP_SYS_ADMIN, no
CAP_DAC_OVERRIDE, no CAP_SYS_RESOURCE. Every probe must load and a real exec must be stored.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from node_agent.capabilities import CAP_BPF, CAP_PERFMON
from node_agent.probes import all_probes
from tests.support.real import require_real

pytestmark = [pytest.mark.root, pytest.mark.integration]


def setpriv(*caps: str) -> list[str]:
    """The command prefix that runs a program as uid 0 with only the given capabilities."""
    if shutil.which("setpriv") is None:
        require_real("setpriv (util-linux) is missing")
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    return ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--"]


def fleetscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetscope", *args]


def test_agent_runs_every_probe_with_only_bpf_and_perfmon(bpf_objects: Path, tmp_path: Path) -> None:
    probes = sorted(all_probes())
    data_dir, log = tmp_path / "store", tmp_path / "run.log"
    argv = setpriv("bpf", "perfmon") + fleetscope(
        "run", "--data-dir", str(data_dir), "--bpf-dir", str(bpf_objects), "--probes", ",".join(probes),
        "--sql-listen", "off", "--status-listen", "off", "--status", "log",
    )  # fmt: skip
    marker = f"capmark-{uuid.uuid4().hex[:12]}"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            # every probe attached (the process probe loads last: it borrows maps of others)
            while not all(f"probe {n} running" in log.read_text() for n in probes) and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            cap_eff = next(
                int(line.split()[1], 16)
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                if line.startswith("CapEff:")
            )
            assert cap_eff == (1 << CAP_BPF) | (1 << CAP_PERFMON)
            subprocess.run(["/bin/sh", "-c", "exit 0", marker], check=True)
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0, log.read_text()
    text = log.read_text()
    for name in probes:
        assert f"probe {name} running (libbpf)" in text, text
    rows = subprocess.run(
        fleetscope("query", "--data-dir", str(data_dir), "--format", "tsv",
                   f"SELECT count() FROM fleet.process_exec WHERE position(args, '{marker}') > 0"),
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert rows[-1] == "1"


@pytest.mark.parametrize(("caps", "lacking"), [((), "CAP_BPF, CAP_PERFMON"), (("bpf",), "CAP_PERFMON")])
def test_without_them_the_agent_names_what_is_missing(
    bpf_objects: Path, tmp_path: Path, caps: tuple[str, ...], lacking: str
) -> None:
    argv = setpriv(*caps) + fleetscope(
        "run", "--data-dir", str(tmp_path / "store"), "--bpf-dir", str(bpf_objects), "--sql-listen", "off",
        "--status-listen", "off", "--duration", "1s",
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"missing capabilities {lacking} (the agent needs CAP_BPF and CAP_PERFMON" in done.stderr
    assert "Traceback" not in done.stderr
