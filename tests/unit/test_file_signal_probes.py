"""file_open, oom_kills and fatal_signals without a kernel: settings, knobs, column builders,
and that every column a builder makes is in the stream's protobuf message and table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fleetscope import cli, config
from fleetscope.codec import SCHEMAS
from fleetscope.config import ConfigError, RunSettings
from ingester.enrich import TABLE_COLUMNS
from ingester.load import BATCH_COLUMNS
from node_agent.errors import ProbeConfigError
from node_agent.probes import file_open, get_probe

MIGRATIONS = Path(__file__).resolve().parents[2] / "infra" / "clickhouse" / "migrations"


@dataclass(frozen=True)
class Settings:
    bpf_dir: Path = Path("bpf")
    ring_bytes: int = 1 << 20
    filter_pid: int = 0
    filter_cgroup: str = ""
    loader: str = "libbpf"
    args_max: int = 512
    file_open_prefixes: tuple[str, ...] = ("/etc/",)
    file_open_all: bool = False


def run_settings(argv: list[str]) -> RunSettings:
    args = vars(cli.parser().parse_args(["run", *argv]))
    args.pop("command")
    settings: RunSettings = config.build(RunSettings, args, {})
    return settings


def test_prefix_setting_parses_and_names_its_key() -> None:
    assert run_settings([]).file_open_prefixes == ("/etc/",)
    assert run_settings(["--file-open-prefixes", "/etc/, /var/lib/kubelet/"]).file_open_prefixes == (
        "/etc/", "/var/lib/kubelet/",
    )  # fmt: skip
    assert run_settings(["--file-open-prefixes", ""]).file_open_prefixes == ()
    assert run_settings(["--file-open-all", "true"]).file_open_all is True
    with pytest.raises(ConfigError, match=r"file_open_prefixes: .* at most 8 prefixes"):
        run_settings(["--file-open-prefixes", ",".join(f"/p{i}/" for i in range(9))])
    with pytest.raises(ConfigError, match=r"file_open_prefixes: .* longer than 64 bytes"):
        run_settings(["--file-open-prefixes", "/" + "x" * 64])
    assert (config.FILE_OPEN_PREFIXES_MAX, config.FILE_OPEN_PREFIX_BYTES) == (
        file_open.PREFIXES_MAX, file_open.PREFIX_BYTES,
    )  # fmt: skip


def test_prefix_table_is_laid_out_for_the_bpf_arrays() -> None:
    knobs = file_open.rodata(Settings(file_open_prefixes=("/etc/", "/run/secrets/")))
    assert knobs["prefix_count"] == 2 and knobs["capture_all"] == 0
    lens = np.frombuffer(knobs["prefix_lens"], "<u4")  # type: ignore[arg-type]
    assert lens.tolist() == [5, 13, 0, 0, 0, 0, 0, 0]
    table = knobs["prefixes"]
    assert isinstance(table, bytes) and len(table) == 8 * 64
    assert table[:5] == b"/etc/" and table[64:77] == b"/run/secrets/" and not table[77:].strip(b"\0")
    with pytest.raises(ProbeConfigError, match="file_open_prefixes"):
        file_open.rodata(Settings(file_open_prefixes=("",)))


def records(fields: dict[str, str], n: int) -> np.ndarray:
    return np.zeros(n, np.dtype(list(fields.items())))


def test_file_open_columns_split_the_result_into_fd_and_errno() -> None:
    rec = records({"time_ns": "<u8", "cgroup_id": "<u8", "pid": "<u4", "tid": "<u4", "uid": "<u4",
                   "flags": "<u4", "mode": "<u4", "ret": "<i4", "dfd": "<i4", "syscall": "<u2",
                   "rflags": "<u2", "comm": "S16", "path": "S256"}, 4)  # fmt: skip
    rec["ret"] = [3, -2, 0, -13]
    rec["syscall"] = [0, 1, 2, 9]
    rec["rflags"] = [0, 1, 2, 3]
    rec["path"] = [b"/etc/a", b"b", b"c", b"d"]
    cols = file_open.columns(rec, 10)
    assert cols["fd"].tolist() == [3, -1, 0, -1] and cols["errno"].tolist() == [0, 2, 0, 13]
    assert cols["syscall"].tolist() == [b"openat", b"openat2", b"open", b"?"]
    assert cols["path_truncated"].tolist() == [0, 1, 0, 1]
    assert cols["time"].tolist() == [10] * 4


@pytest.mark.parametrize("probe", ["file_open", "oom_kills", "fatal_signals"])
def test_columns_match_the_proto_and_the_table(probe: str) -> None:
    stream = get_probe(probe).streams[0]
    schema = SCHEMAS[stream.name]
    # the CREATE and every later ALTER of the table; the ingester adds the k8s and batch columns itself
    sql = "".join(t for p in sorted(MIGRATIONS.glob("*.sql")) if f"fleet.{stream.name}\n" in (t := p.read_text()))
    table_columns = set(re.findall(r"^\s+(?:ADD COLUMN IF NOT EXISTS )?`(\w+)`", sql, re.M))
    table_columns -= {"node", *TABLE_COLUMNS, *BATCH_COLUMNS}
    # in_process_exit routes a row's span (ingester/spans.py), it is no event data: wire only
    assert {c.name for c in schema.columns} - {"in_process_exit"} == table_columns
