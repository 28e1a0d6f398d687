"""The numpy dtypes and .rodata layout read from a probe's BTF match what C compilers see.

The record structs in bpf/<probe>.h are the one source of truth: gcc compiles the same
header for user space and its sizeof/offsetof must equal the BTF-derived dtype.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from node_agent.btf import Btf, BtfError
from tests.support.real import require_real

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
RECORDS = {
    "process_exec_event": [
        "time_ns", "cgroup_id", "pid", "ppid", "uid", "args_len", "argc", "flags",
        "comm", "filename", "args",
    ],
    "process_exit_event": [
        "time_ns", "cgroup_id", "duration_ns", "oom_delay_ns", "oom_total_vm_kb", "oom_anon_rss_kb",
        "oom_file_rss_kb", "oom_shmem_rss_kb", "oom_pgtables_kb", "signal_delay_ns", "pid", "ppid", "exit_code",
        "signal", "flags", "oom_trigger_pid", "signal_sender_pid", "signal_sender_uid", "signal_code",
        "oom_score_adj", "pad", "comm", "signal_sender_comm",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def process_btf() -> Btf:
    """BTF of bpf/process.bpf.o, built with `make -C bpf` when missing or stale."""
    for tool in ("make", "clang", "bpftool"):
        if shutil.which(tool) is None:
            require_real(f"building bpf/process.bpf.o needs `{tool}` (apt install clang bpftool)")
    if not Path("/sys/kernel/btf/vmlinux").exists():
        require_real("building bpf/process.bpf.o needs kernel BTF at /sys/kernel/btf/vmlinux")
    build = subprocess.run(["make", "-C", str(BPF_DIR)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    return Btf.from_file(BPF_DIR / "process.bpf.o")


def c_layout(tmp_path: Path, header: Path, structs: dict[str, list[str]]) -> dict:
    """sizeof and offsetof of each member, as gcc compiles header for user space."""
    if shutil.which("gcc") is None:
        require_real("comparing with C layouts needs `gcc`")
    lines = ["#include <linux/types.h>", "#include <stddef.h>", "#include <stdio.h>"]
    lines += [f'#include "{header}"', "int main(void) {", 'printf("{");']
    for i, (name, members) in enumerate(structs.items()):
        sep = "," if i else ""
        lines.append(f'printf("{sep}\\"{name}\\": {{\\"size\\": %zu", sizeof(struct {name}));')
        for m in members:
            lines.append(
                f'printf(", \\"{m}\\": [%zu, %zu]", offsetof(struct {name}, {m}), sizeof(((struct {name} *)0)->{m}));'
            )
        lines.append('printf("}");')
    lines += ['printf("}\\n");', "return 0;", "}"]
    src, exe = tmp_path / "layout.c", tmp_path / "layout"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    return json.loads(subprocess.run([str(exe)], capture_output=True, check=True).stdout)


def test_record_dtypes_match_c_layout(process_btf: Btf, tmp_path: Path) -> None:
    layout = c_layout(tmp_path, BPF_DIR / "process.h", RECORDS)
    for name, members in RECORDS.items():
        dtype = process_btf.struct_dtype(name)
        c = layout[name]
        assert dtype.itemsize == c["size"] == process_btf.struct_size(name)
        assert list(dtype.names or ()) == members  # no member missing, none extra
        for m in members:
            offset, size = c[m]
            assert dtype.fields is not None
            field, field_offset = dtype.fields[m][:2]
            assert (field_offset, field.itemsize) == (offset, size), f"{name}.{m}"
        assert [(m.name, m.offset, m.size) for m in process_btf.members(name)] == [(m, *c[m]) for m in members]


def test_header_static_asserts_agree(process_btf: Btf) -> None:
    text = (BPF_DIR / "process.h").read_text()
    asserted = dict(re.findall(r"sizeof\(struct (\w+)\) == (\d+)", text))
    assert asserted, "process.h should _Static_assert its record sizes"
    for name, size in asserted.items():
        assert process_btf.struct_dtype(name).itemsize == int(size)


def test_record_field_kinds(process_btf: Btf) -> None:
    exec_t = process_btf.struct_dtype("process_exec_event")
    assert exec_t["time_ns"] == np.dtype("<u8")
    assert exec_t["pid"] == np.dtype("<u4")
    assert exec_t["comm"] == np.dtype("S16")  # char[] -> fixed bytes
    assert exec_t["filename"] == np.dtype("S256")
    assert exec_t["args"] == np.dtype("S1024")
    kinds = {m.name: m.kind for m in process_btf.members("process_exit_event")}
    assert kinds["comm"] == "bytes" and kinds["duration_ns"] == "uint"
    stats = process_btf.struct_dtype("stream_stats")
    assert stats.names == ("emitted", "dropped") and stats.itemsize == 16


def test_rodata_offsets_match_symbol_table(process_btf: Btf) -> None:
    if shutil.which("readelf") is None:
        require_real("comparing with the ELF symbol table needs `readelf` (binutils)")
    out = subprocess.run(
        ["readelf", "-sW", "-S", str(BPF_DIR / "process.bpf.o")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    index = re.search(r"\[\s*(\d+)\]\s+\.rodata\s", out)
    assert index is not None
    # Num: Value Size Type Bind Vis Ndx Name
    symbols = {
        m.group(4): (int(m.group(1), 16), int(m.group(2)))
        for m in re.finditer(r"^\s*\d+:\s+([0-9a-f]+)\s+(\d+)\s+\w+\s+\w+\s+\w+\s+(\d+)\s+(\w+)$",
                             out, re.M)
        if m.group(3) == index.group(1)
    }  # fmt: skip
    variables = process_btf.datasec_vars(".rodata")
    assert variables == symbols
    assert set(variables) >= {"args_max", "targ_tgid", "wakeup_bytes"}
    assert variables["args_max"][1] == 4 and variables["wakeup_bytes"][1] == 8


SYNTHETIC = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
enum color { RED = 1, BLUE = -2 };
struct inner { unsigned short a; signed char b; char tag[3]; };
struct outer {
    u64 when;
    u32 ids[4];
    struct inner in;
    enum color color;
    int delta;
    _Bool ok;
    char pad[7];
    const volatile u32 knob;
    void *ptr;
    float ratio;
    int last[2][3];
};
struct bits { u32 low : 3; u32 high : 29; };
const volatile u32 first_knob = 7;
const volatile u64 second_knob = 9;
struct outer use_outer;
struct bits use_bits;
"""


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Btf, dict]:
    """BTF of a small C file exercising every supported kind, and gcc's layout of it."""
    if shutil.which("clang") is None:
        require_real("compiling a BTF sample needs `clang`")
    tmp = tmp_path_factory.mktemp("btf")
    src = tmp / "sample.c"
    src.write_text(SYNTHETIC)
    obj = tmp / "sample.o"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-c", str(src), "-o", str(obj)],
                   check=True)  # fmt: skip
    header = tmp / "sample.h"
    header.write_text(SYNTHETIC.split("struct bits")[0])
    members = ["when", "ids", "in", "color", "delta", "ok", "pad", "knob", "ptr", "ratio", "last"]
    return Btf.from_file(obj), c_layout(tmp, header, {"outer": members, "inner": ["a", "b", "tag"]})


def test_synthetic_struct_layout(synthetic: tuple[Btf, dict]) -> None:
    btf, layout = synthetic
    dtype = btf.struct_dtype("outer")
    assert dtype.itemsize == layout["outer"]["size"]
    assert dtype.fields is not None
    for name, (offset, size) in ((k, v) for k, v in layout["outer"].items() if k != "size"):
        assert (dtype.fields[name][1], dtype.fields[name][0].itemsize) == (offset, size), name
    assert dtype["ids"] == np.dtype(("<u4", (4,)))  # arrays of non-char stay numeric
    assert dtype["last"] == np.dtype(("<i4", (2, 3)))
    assert dtype["in"]["tag"] == np.dtype("S3") and dtype["in"]["b"] == np.dtype("i1")
    assert dtype["color"].kind in "iu" and dtype["color"].itemsize == 4
    assert dtype["ok"] == np.dtype("?") and dtype["ratio"] == np.dtype("<f4")
    assert dtype["ptr"] == np.dtype("<u8") and dtype["knob"] == np.dtype("<u4")
    # a record decodes through the dtype like the C struct
    rec = np.zeros(1, dtype)
    rec["in"]["tag"] = b"ab"
    rec["last"][0, 1, 2] = -5
    assert rec["in"]["tag"][0] == b"ab" and rec["last"][0, 1, 2] == -5


def test_synthetic_datasec_and_errors(synthetic: tuple[Btf, dict]) -> None:
    btf, _ = synthetic
    variables = btf.datasec_vars(".rodata")
    assert variables["first_knob"][1] == 4 and variables["second_knob"][1] == 8
    assert variables["first_knob"][0] != variables["second_knob"][0]
    with pytest.raises(BtfError, match="bitfields"):
        btf.struct_dtype("bits")
    with pytest.raises(BtfError, match="no struct 'missing'"):
        btf.struct_dtype("missing")
    with pytest.raises(BtfError, match="no datasec"):
        btf.datasec_vars(".nothing")


def test_raw_kernel_btf() -> None:
    vmlinux = Path("/sys/kernel/btf/vmlinux")
    if not vmlinux.exists():
        require_real("no kernel BTF at /sys/kernel/btf/vmlinux")
    btf = Btf.from_file(vmlinux)
    names = [m.name for m in btf.members("task_struct")]
    assert "tgid" in names and "real_parent" in names
    assert btf.struct_dtype("trace_entry").itemsize == 8


def test_malformed_input(tmp_path: Path) -> None:
    if shutil.which("cc") is None:
        require_real("building a non-BPF object needs `cc`")
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\0" * 32)
    not_bpf = tmp_path / "empty.o"
    subprocess.run(["cc", "-c", "-x", "c", "-", "-o", str(not_bpf)], input=b"int x;",
                   check=True)  # fmt: skip
    with pytest.raises(BtfError, match=r"no \.BTF section"):
        Btf.from_file(not_bpf)
