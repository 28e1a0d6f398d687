"""Fixtures shared by all tests: the compiled BPF probes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.real import require_real

REPO = Path(__file__).resolve().parent.parent
BPF_DIR = REPO / "bpf"


@pytest.fixture(scope="session")
def bpf_objects() -> Path:
    """The directory of built probe objects; needs root and a kernel with BTF."""
    if os.geteuid() != 0:
        require_real("eBPF probes need root (CAP_BPF, CAP_PERFMON); run the suite as root")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        require_real("this kernel has no BTF (/sys/kernel/btf/vmlinux)")
    if shutil.which("clang") is None or shutil.which("bpftool") is None:
        require_real("clang/bpftool missing: run `make test`, which installs them")
    subprocess.run(["make", "-s", "-C", str(BPF_DIR)], check=True)
    return BPF_DIR
