"""A probe the verifier rejects is disabled alone; `fleetscope agent --status` shows why,
with the verifier's log, and `--check` reports what loads on this kernel."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import FleetscopeProcess

pytestmark = [pytest.mark.root, pytest.mark.integration]

# A store through a scalar the verifier cannot prove is a pointer: "invalid mem access 'scalar'".
BROKEN_LINE = "\t{ volatile __u64 *p = (volatile __u64 *)(long)bpf_get_prandom_u32(); *p = 1; }\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bpf_dir_with_broken_oom_probe(bpf_objects: Path, tmp_path: Path) -> Path:
    """process.bpf.o as built; oom_kills.bpf.o rebuilt with a verifier-rejected store."""
    out = tmp_path / "bpf"
    out.mkdir()
    shutil.copy(bpf_objects / "process.bpf.o", out)
    src = (bpf_objects / "oom_kills.bpf.c").read_text()
    anchor = "int BPF_PROG(raw_tp__mark_victim, struct task_struct *task, uid_t uid)\n{\n"
    assert anchor in src
    broken = tmp_path / "oom_kills.bpf.c"
    broken.write_text(src.replace(anchor, anchor + BROKEN_LINE))
    arch = subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()
    target = {"x86_64": "x86", "aarch64": "arm64"}.get(arch, arch)
    subprocess.run(
        ["clang", "-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{target}", "-I", str(bpf_objects),
         "-c", str(broken), "-o", str(out / "oom_kills.bpf.o")],
        check=True,
    )  # fmt: skip
    return out


def test_broken_probe_is_disabled_alone_and_status_shows_the_verifier_log(
    bpf_dir_with_broken_oom_probe: Path, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    run = FleetscopeProcess(
        "run", "--data-dir", str(tmp_path / "store"), "--bpf-dir", str(bpf_dir_with_broken_oom_probe),
        "--probes", "process,oom_kills", "--status", "log", "--sql-listen", "off", "--status-listen", listen,
        log=tmp_path / "run.log",
    )  # fmt: skip
    with run:
        run.wait_for_log("agent status at", 120)
        assert "probe oom_kills disabled" in run.log_text()
        assert "invalid mem access 'scalar'" in run.log_text()  # the verifier log reaches the agent's log
        status = subprocess.run(
            [sys.executable, "-m", "fleetscope", "agent", "--status", "--status-listen", listen],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        healthz = subprocess.run(["curl", "-s", "-w", " %{http_code}", f"http://{listen}/healthz"],
                                 capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        run.stop()
    assert status.returncode == 1, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    assert any(ln.split()[:2] == ["process", "running"] for ln in map(str.strip, lines))
    oom = next(ln.strip() for ln in lines if ln.strip().startswith("oom_kills"))
    assert "DISABLED" in oom and "EACCES" in oom and "verifier" in oom
    assert any("invalid mem access 'scalar'" in ln for ln in lines)
    assert healthz.startswith("degraded: probe oom_kills disabled") and healthz.endswith(" 503")
    assert run.returncode == 0


def test_status_says_when_no_agent_answers() -> None:
    listen = f"127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "fleetscope", "agent", "--status", "--status-listen", listen],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 1 and "is `fleetscope agent` running?" in out.stderr


def test_check_reports_each_probe_and_loader(bpf_objects: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "agent", "--check", "--bpf-dir", str(bpf_objects), "--probes", "process"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines()]
    assert next(r[:3] for r in rows if r[:2] == ["process", "libbpf"]) == ["process", "libbpf", "ok:"]
    assert any(r[:2] == ["runqueue_latency", "bcc"] and r[2] == "unavailable:" for r in rows)  # tp_btf only
    assert any(r[:2] == ["tcp_connections", "bcc"] and r[2] == "ok:" for r in rows)
