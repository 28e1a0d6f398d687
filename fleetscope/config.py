"""Typed, frozen settings for every fleetscope command, built once at start-up.

Each setting has one name used three ways: the CLI flag ``--batch-max-rows``, the
environment variable ``FLEETSCOPE_BATCH_MAX_ROWS`` and the config-file key
``batch_max_rows`` (YAML, given by ``--config`` or ``FLEETSCOPE_CONFIG``). Precedence is
CLI > environment > file > default. Nothing else in fleetscope reads ``os.environ``.
A bad value raises ConfigError naming the key and what is allowed; only ``cli.main``
turns it into an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

ENV_PREFIX = "FLEETSCOPE_"
CONFIG_ENV = "FLEETSCOPE_CONFIG"
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """Invalid configuration; the message names the key, the bad value and the fix."""

    retriable: ClassVar[bool] = False


# --- value parsers: str -> typed value, raising ValueError with what is allowed -----------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def _duration(text: str) -> float:
    """Seconds, with an optional unit: 500ms, 10s, 5m, 1h."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise ValueError("must be a duration such as 500ms, 10s, 5m or 1h")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def _size(text: str) -> int:
    """Bytes, with an optional binary unit: 4096, 256KiB, 16MiB, 1GiB."""
    m = re.fullmatch(r"\s*([0-9]+)\s*(B|KiB|MiB|GiB|K|M|G)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError("must be a size such as 4096, 256KiB, 16MiB or 1GiB")
    unit = (m.group(2) or "B").upper().rstrip("IB") or "B"
    return int(m.group(1)) << {"B": 0, "K": 10, "M": 20, "G": 30}[unit]


def _host_port(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return f"{host}:{port}"


def _brokers(text: str) -> tuple[str, ...]:
    items = tuple(_host_port(b) for b in text.split(",") if b.strip())
    if not items:
        raise ValueError("must list at least one HOST:PORT")
    return items


def _dsn(text: str) -> str:
    if not re.match(r"^(https?://[^/]+|chdb://)", text):
        raise ValueError("must be http(s)://user:pass@host:8123/db or chdb:///path")
    return text


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _list_of(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise ValueError(f"must be a comma-separated list of {', '.join(allowed)}")
        return items

    return parse


def _path(text: str) -> Path:
    return Path(text).expanduser()


def opt(default: Any, parse: Callable[[str], Any], help: str, metavar: str | None = None) -> Any:
    """Declare a setting: its default, the parser for text values, and its help line."""
    return field(default=default, metadata={"parse": parse, "help": help, "metavar": metavar})


DEFAULT_PROBES = ("process",)


def _probes(text: str) -> tuple[str, ...]:
    from node_agent.probes import all_probes  # the probe modules are the list of probes

    known = tuple(sorted(all_probes()))
    return _list_of(known)(text)


# --- settings groups; commands combine them --------------------------------------------


@dataclass(frozen=True)
class Common:
    log_level: str = opt("info", _choice("debug", "info", "warning", "error"), "log verbosity")


@dataclass(frozen=True)
class Kafka:
    brokers: tuple[str, ...] = opt((), _brokers, "Kafka bootstrap servers", "HOST:PORT[,HOST:PORT]")
    topic_prefix: str = opt("fleetscope", str, "topics are <prefix>.<stream>.v1")


@dataclass(frozen=True)
class Store:
    clickhouse: str = opt("", _dsn, "ClickHouse DSN: http(s)://user:pass@host:8123/db or chdb:///path", "DSN")


@dataclass(frozen=True)
class AgentOptions:
    node_name: str = opt("", str, "node name stored with every row (default: the host name)")
    probes: tuple[str, ...] = opt(DEFAULT_PROBES, _probes, "probes to load, comma-separated", "LIST")
    filter_pid: int = opt(0, _non_negative_int, "only events of this process (thread group id); 0: all")
    filter_cgroup: str = opt(
        "",
        str,
        "only events of tasks in this cgroup v2 directory or below (absolute, or relative to the mount)",
    )
    bpf_dir: Path = opt(REPO_ROOT / "bpf", _path, "directory with the compiled *.bpf.o probes")
    args_max: int = opt(512, _positive_int, "bytes of argv captured per exec (at most 1024)")
    ring_bytes: int = opt(8 << 20, _size, "ring buffer size per event kind (power of 2, >= 4096)")
    batch_max_rows: int = opt(16384, _positive_int, "a batch is shipped at this many rows")
    batch_max_bytes: int = opt(
        1 << 20, _size, "... or this many bytes (keep under the broker's message.max.bytes)"
    )
    batch_max_age: float = opt(1.0, _duration, "... or when its oldest row is this old")
    status_interval: float = opt(10.0, _duration, "how often the agent logs its counters")
    stats_interval: float = opt(10.0, _duration, "how often counters are shipped to fleet.pipeline_stats")

    def validate(self) -> None:
        if self.args_max > 1024:
            raise ConfigError("args_max: must be at most 1024 (the record's argv field)")
        rb = self.ring_bytes
        if rb < 4096 or rb & (rb - 1):
            raise ConfigError(f"ring_bytes: {rb} must be a power of 2 and at least 4096")

    @property
    def node(self) -> str:
        return self.node_name or socket.gethostname()


@dataclass(frozen=True)
class AgentSettings(Common, Kafka, AgentOptions):
    """`fleetscope agent`: probes -> Kafka."""

    def validate(self) -> None:
        if not self.brokers:
            raise ConfigError("brokers: required; set --brokers HOST:PORT or FLEETSCOPE_BROKERS")
        AgentOptions.validate(self)


@dataclass(frozen=True)
class IngestSettings(Common, Kafka, Store):
    """`fleetscope ingest`: Kafka -> ClickHouse."""

    group_id: str = opt("fleetscope-ingest", str, "Kafka consumer group")
    dlq_topic: str = opt("fleetscope.dlq.v1", str, "dead-letter topic for batches that cannot be decoded")
    max_poll_records: int = opt(64, _positive_int, "Kafka messages (batches) fetched per poll")
    retry_backoff_max: float = opt(30.0, _duration, "cap of the exponential backoff between insert retries")
    stats_interval: float = opt(10.0, _duration, "how often counters are written to fleet.pipeline_stats")

    def validate(self) -> None:
        if not self.brokers:
            raise ConfigError("brokers: required; set --brokers HOST:PORT or FLEETSCOPE_BROKERS")
        if not self.clickhouse:
            raise ConfigError("clickhouse: required; set --clickhouse DSN or FLEETSCOPE_CLICKHOUSE")


@dataclass(frozen=True)
class RunSettings(Common, AgentOptions):
    """`fleetscope run`: agent and ingester in one process, embedded ClickHouse."""

    data_dir: Path = opt(Path("./data"), _path, "where the embedded ClickHouse keeps its data")
    duration: float = opt(0.0, _duration, "stop after this long (0: run until Ctrl-C)")
    status: str = opt(
        "auto", _choice("auto", "line", "log", "off"), "live status: one line on a TTY, log lines otherwise"
    )

    @property
    def clickhouse(self) -> str:
        return f"chdb://{self.data_dir.resolve()}"


@dataclass(frozen=True)
class QuerySettings(Common):
    """`fleetscope query`: run SQL, print a table."""

    data_dir: Path | None = opt(None, _path, "query the embedded store in this directory")
    clickhouse: str = opt("", _dsn, "or query this ClickHouse DSN", "DSN")
    format: str = opt("table", _choice("table", "tsv", "json"), "output format")

    def validate(self) -> None:
        if bool(self.data_dir) == bool(self.clickhouse):
            raise ConfigError("data_dir/clickhouse: give exactly one of --data-dir DIR or --clickhouse DSN")

    @property
    def dsn(self) -> str:
        return self.clickhouse or f"chdb://{Path(self.data_dir or '.').resolve()}"


@dataclass(frozen=True)
class MigrateSettings(Common, Store):
    """`fleetscope migrate`: apply ClickHouse migrations (idempotent)."""

    def validate(self) -> None:
        if not self.clickhouse:
            raise ConfigError("clickhouse: required; set --clickhouse DSN or FLEETSCOPE_CLICKHOUSE")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per setting; defaults are SUPPRESSed so we can tell 'not given'."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"YAML file of settings (env {CONFIG_ENV})",
    )
    for f in fields(cls):
        meta = f.metadata
        default = f.default if not isinstance(f.default, tuple) else ",".join(f.default)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=meta.get("metavar") or f.name.upper(),
            help=f"{meta['help']} [env {env_name(f.name)}, key {f.name}, default {default!r}]",
        )


def _load_file(path: str) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must be a mapping of key: value")
    return data


def build(cls: type, cli: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    """Resolve every setting of ``cls`` from CLI > environment > file > default, then validate."""
    names = {f.name for f in fields(cls)}
    file_path = cli.get("config") or environ.get(CONFIG_ENV)
    file_values = _load_file(file_path) if file_path else {}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in {file_path}; known keys: {', '.join(sorted(names))}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in cli:
            raw, source = cli[f.name], f"--{f.name.replace('_', '-')}"
        elif env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], env_name(f.name)
        elif f.name in file_values:
            raw, source = file_values[f.name], f"key {f.name} in {file_path}"
        else:
            continue
        if isinstance(raw, list):
            raw = ",".join(str(x) for x in raw)
        try:
            values[f.name] = f.metadata["parse"](str(raw))
        except ValueError as e:
            raise ConfigError(f"{f.name}: bad value {raw!r} from {source}: {e}") from None
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate:
        validate()
    return settings


def replace(settings: Any, **changes: Any) -> Any:
    return dataclasses.replace(settings, **changes)


def environ() -> Mapping[str, str]:
    """The process environment; the only place fleetscope reads it."""
    return os.environ
