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
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import yaml

from fleetscope.credentials import Secret, mask_dsn, read_secret_file, secret

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


def _listen(text: str) -> str:
    """HOST:PORT to listen on (port 0: any free port), or "off"."""
    if text.strip().lower() in ("off", "no", "none", "false"):
        return "off"
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (or off)")
    return f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether every address of host is a loopback address (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _host_port_or_any(text: str) -> str:
    value = _listen(text)
    if value == "off":
        raise ValueError("serve-sql needs an address to listen on, e.g. 127.0.0.1:8123")
    return value


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


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a number from 0 to 1, e.g. 0.01 for 1%")
    return value


FILE_OPEN_PREFIXES_MAX = 8  # FILE_OPEN_PREFIXES in bpf/file_open.h
FILE_OPEN_PREFIX_BYTES = 64  # FILE_OPEN_PREFIX_LEN in bpf/file_open.h


def _path_prefixes(text: str) -> tuple[str, ...]:
    """Comma-separated path prefixes for the file_open probe; empty: none."""
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if len(items) > FILE_OPEN_PREFIXES_MAX:
        raise ValueError(f"at most {FILE_OPEN_PREFIXES_MAX} prefixes")
    long = [s for s in items if len(s.encode()) > FILE_OPEN_PREFIX_BYTES]
    if long:
        raise ValueError(f"{long[0]!r} is longer than {FILE_OPEN_PREFIX_BYTES} bytes")
    return items


def opt(default: Any, parse: Callable[[str], Any], help: str, metavar: str | None = None) -> Any:
    """Declare a setting: its default, the parser for text values, and its help line."""
    return field(default=default, metadata={"parse": parse, "help": help, "metavar": metavar})


DEFAULT_PROBES = ("process",)


def _patterns(text: str) -> tuple[str, ...]:
    """Comma-separated regular expressions, each compiled to check it; empty: none."""
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    for p in items:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{p!r} is not a regular expression: {e}") from None
    return items


# Secrets in command lines masked by the agent (node_agent/redact.py), kept here so settings
# load without the agent. No pattern may contain a comma (the list separator): {n,m} is
# written out. The first group of a match (or all of it) becomes ***.
DEFAULT_REDACT_PATTERNS = (
    # KEY=value: password=..., --db-password=..., AWS_SECRET_ACCESS_KEY=..., GITHUB_TOKEN=...
    r"(?i)(?:passw(?:or)?d|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)[\w.-]*=(\S+)",
    # a flag naming a secret, then its value as the next argument: --token VALUE, -password VALUE
    r"(?i)(?:^|\s)--?[\w.-]*(?:passw(?:or)?d|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?)"
    r"[\w.-]*\s+([^\s-]\S*)",
    # HTTP authorization: "Authorization: Bearer ...", "Basic dXNlcjpwYXNz"
    r"(?i)\bbearer\s+(\S+)",
    r"(?i)\bbasic\s+([A-Za-z0-9+/]{8}[A-Za-z0-9+/=]*)",
    # a URL's password: scheme://user:PASSWORD@host
    r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:([^\s/@]+)@",
    # token shapes: GitHub (ghp_, gho_, ghu_, ghs_, ghr_), JSON Web Tokens
    r"\b(gh[pousr]_[A-Za-z0-9]{36}[A-Za-z0-9]*)",
    r"\b(eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)",
)

# Label selector terms: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b); field selectors
# take the first three only (what the API server accepts).
_SELECTOR_TERM = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w./-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\))?)\s*(?:,|$)"
)


def selector_terms(text: str, fields: bool = False) -> list[tuple[str, str, tuple[str, ...]]]:
    """A Kubernetes label (or field) selector as (key, operator, values) terms; operators are
    =, !=, in, notin, exists, !exists. Raises ValueError naming what is not understood."""
    terms: list[tuple[str, str, tuple[str, ...]]] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _SELECTOR_TERM.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot parse the selector at {text[pos:]!r}")
        pos = m.end()
        if m["nkey"]:
            terms.append((m["nkey"], "!exists", ()))
        elif m["setop"]:
            terms.append((m["key"], m["setop"], tuple(v.strip() for v in m["values"].split(",") if v.strip())))
        elif m["op"]:
            terms.append((m["key"], "=" if m["op"] in ("=", "==") else "!=", (m["value"],)))
        else:
            terms.append((m["key"], "exists", ()))
        if fields and terms[-1][1] not in ("=", "!="):
            raise ValueError("a field selector takes only key=value and key!=value terms")
    return terms


def _label_selector(text: str) -> str:
    selector_terms(text)
    return text.strip()


def _field_selector(text: str) -> str:
    selector_terms(text, fields=True)
    return text.strip()


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated names (label or annotation keys); empty: none."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


DEFAULT_K8S_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version", "app")


def _probes(text: str) -> tuple[str, ...]:
    from node_agent.probes import all_probes  # the probe modules are the list of probes

    known = tuple(sorted(all_probes()))
    return _list_of(known)(text)


# --- settings groups; commands combine them --------------------------------------------


@dataclass(frozen=True)
class Common:
    log_level: str = opt("info", _choice("debug", "info", "warning", "error"), "log verbosity")


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


def _upper_choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().upper()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


@dataclass(frozen=True)
class Kafka:
    brokers: tuple[str, ...] = opt((), _brokers, "Kafka bootstrap servers", "HOST:PORT[,HOST:PORT]")
    topic_prefix: str = opt("fleetscope", str, "topics are <prefix>.<stream>.v1")
    # TLS and SASL of every Kafka client of the command (fleetscope/kafka_security.py)
    kafka_security_protocol: str = opt(
        "PLAINTEXT",
        _upper_choice(*KAFKA_PROTOCOLS),
        "how to talk to the brokers: PLAINTEXT, SSL (TLS), SASL_SSL (TLS + SASL login), SASL_PLAINTEXT",
        "|".join(KAFKA_PROTOCOLS),
    )
    kafka_ssl_cafile: Path | None = opt(
        None, _optional_path, "PEM file of the CA(s) that signed the brokers' certificates (default: the system's)"
    )
    kafka_ssl_certfile: Path | None = opt(
        None, _optional_path, "PEM client certificate (chain), for brokers that require TLS client authentication"
    )
    kafka_ssl_keyfile: Path | None = opt(None, _optional_path, "PEM private key of kafka_ssl_certfile (unencrypted)")
    kafka_ssl_check_hostname: bool = opt(True, _bool, "check that a broker's certificate names the host connected to")
    kafka_sasl_mechanism: str = opt(
        "SCRAM-SHA-512", _upper_choice(*KAFKA_SASL_MECHANISMS), "SASL mechanism", "|".join(KAFKA_SASL_MECHANISMS)
    )
    kafka_sasl_username: str = opt("", str, "SASL user name")
    kafka_sasl_password: Secret = opt(
        Secret(""), secret, "SASL password; prefer the environment or kafka_sasl_password_file (never logged)"
    )
    kafka_sasl_password_file: Path | None = opt(
        None, _optional_path, "read the SASL password from the first line of this file (re-read at each connect)"
    )

    def kafka_password(self) -> Secret:
        """The SASL password, from kafka_sasl_password or its file (read now: rotation works)."""
        if self.kafka_sasl_password_file is not None:
            try:
                return read_secret_file("kafka_sasl_password_file", self.kafka_sasl_password_file)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return self.kafka_sasl_password

    def validate_kafka_security(self) -> None:
        """Refuse combinations that would send data or credentials in clear, or not be used."""
        proto = self.kafka_security_protocol
        tls, sasl = proto in ("SSL", "SASL_SSL"), proto.startswith("SASL_")
        for key in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            if getattr(self, key) is not None and not tls:
                raise ConfigError(
                    f"{key}: is set, but kafka_security_protocol is {proto}, which does not use TLS; "
                    "set kafka_security_protocol SSL or SASL_SSL"
                )
        given = [k for k in ("kafka_sasl_username", "kafka_sasl_password", "kafka_sasl_password_file")
                 if getattr(self, k)]  # fmt: skip
        if given and not sasl:
            raise ConfigError(
                f"{given[0]}: is set, but kafka_security_protocol is {proto}, which sends no credentials; "
                "set kafka_security_protocol SASL_SSL"
            )
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ConfigError("kafka_ssl_keyfile: needs kafka_ssl_certfile (the certificate of that key)")
        if sasl:
            if not self.kafka_sasl_username:
                raise ConfigError(f"kafka_sasl_username: required with kafka_security_protocol {proto}")
            if self.kafka_sasl_password and self.kafka_sasl_password_file:
                raise ConfigError("kafka_sasl_password/kafka_sasl_password_file: give one of them, not both")
            if not self.kafka_sasl_password and not self.kafka_sasl_password_file:
                raise ConfigError(
                    f"kafka_sasl_password: required with kafka_security_protocol {proto}; set "
                    "FLEETSCOPE_KAFKA_SASL_PASSWORD or kafka_sasl_password_file"
                )
            if proto == "SASL_PLAINTEXT" and self.kafka_sasl_mechanism == "PLAIN":
                raise ConfigError(
                    "kafka_sasl_mechanism: PLAIN over SASL_PLAINTEXT sends the password in clear; "
                    "use kafka_security_protocol SASL_SSL, or a SCRAM mechanism"
                )
            self.kafka_password()  # an unreadable or empty password file fails at start
        if tls:
            from fleetscope.kafka_security import ssl_context  # imports ssl; only when used

            ssl_context(self)  # unreadable or mismatched PEM files fail at start, naming the key


@dataclass(frozen=True)
class Store:
    clickhouse: str = opt("", _dsn, "ClickHouse DSN: http(s)://user:pass@host:8123/db or chdb:///path", "DSN")


@dataclass(frozen=True)
class ClickHouseAuth:
    """The ClickHouse password kept out of the DSN (and so out of the command line)."""

    clickhouse_password: Secret = opt(
        Secret(""), secret, "password of the DSN's user; prefer the environment or clickhouse_password_file"
    )
    clickhouse_password_file: Path | None = opt(
        None, _optional_path, "read the ClickHouse password from the first line of this file"
    )

    def clickhouse_secret(self) -> Secret:
        """The password to connect with ("" for the DSN's own, or none)."""
        if self.clickhouse_password_file is None:
            return self.clickhouse_password
        try:
            return read_secret_file("clickhouse_password_file", self.clickhouse_password_file)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def validate_clickhouse_auth(self, dsn: str) -> None:
        if self.clickhouse_password and self.clickhouse_password_file:
            raise ConfigError("clickhouse_password/clickhouse_password_file: give one of them, not both")
        if self.clickhouse_password or self.clickhouse_password_file:
            if dsn.startswith("chdb://"):
                raise ConfigError("clickhouse_password: the embedded engine (chdb://) takes no password")
            if urlsplit(dsn).password is not None:
                raise ConfigError(
                    f"clickhouse: {mask_dsn(dsn)} has a password and clickhouse_password is set too; "
                    "drop the password from the DSN"
                )
            self.clickhouse_secret()  # an unreadable or empty file fails at start


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
    loader: str = opt(
        "auto",
        _choice("auto", "libbpf", "bcc"),
        "how probes load: libbpf (CO-RE objects), bcc (fallback, compiles bpf/<probe>.bcc.c), "
        "auto (libbpf when the kernel has BTF, else bcc)",
    )
    args_max: int = opt(512, _positive_int, "bytes of argv captured per exec (at most 1024)")
    redact_patterns: tuple[str, ...] = opt(
        DEFAULT_REDACT_PATTERNS,
        _patterns,
        "regular expressions whose first group (or whole match) is masked as *** in process_exec args on the "
        "node; comma-separated (write a comma inside a pattern as \\x2c); empty: no redaction",
        "LIST",
    )
    file_open_prefixes: tuple[str, ...] = opt(
        ("/etc/",),
        _path_prefixes,
        "file_open: also record successful opens of paths starting with one of these "
        f"(at most {FILE_OPEN_PREFIXES_MAX}, {FILE_OPEN_PREFIX_BYTES} bytes each; failures are always recorded)",
        "LIST",
    )
    file_open_all: bool = opt(False, _bool, "file_open: record every open, not only failures and prefixes")
    tcp_max_connections: int = opt(
        65536, _positive_int, "tcp_connections: connection ends tracked at once; more are counted as drops"
    )
    histogram_interval: float = opt(
        10.0, _duration, "*_latency probes: how often the in-kernel histograms are read and shipped (>= 100ms)"
    )
    histogram_max_keys: int = opt(
        4096,
        _positive_int,
        "*_latency probes: histogram keys per interval (cgroup x syscall, disk x operation, cgroup); "
        "samples of further keys are counted as drops",
    )
    ring_bytes: int = opt(2 << 20, _size, "ring buffer size per event kind (power of 2, >= 4096)")
    cgroup_cache_entries: int = opt(
        16384, _positive_int, "cgroup ids whose container id and pod UID the agent remembers (LRU)"
    )
    batch_max_rows: int = opt(
        32768, _positive_int, "a batch is shipped at this many rows (or fewer: a batch being filled holds <= 4 MiB)"
    )
    batch_max_bytes: int = opt(
        1 << 20,
        _size,
        "... or when its message reaches this many bytes: compressed, as Kafka gets it "
        "(keep under the broker's message.max.bytes); in `run`, uncompressed",
    )
    batch_max_age: float = opt(1.0, _duration, "... or when its oldest row is this old")
    status_interval: float = opt(10.0, _duration, "how often the agent logs its counters")
    status_listen: str = opt(
        "127.0.0.1:9465", _listen, "serve the agent's /status, /healthz and /metrics here (off: don't)", "HOST:PORT|off"
    )
    stats_interval: float = opt(10.0, _duration, "how often counters are shipped to fleet.pipeline_stats")

    def validate(self) -> None:
        if self.args_max > 1024:
            raise ConfigError("args_max: must be at most 1024 (the record's argv field)")
        if self.histogram_interval < 0.1:
            raise ConfigError(f"histogram_interval: {self.histogram_interval}s is too short; use 100ms or more")
        rb = self.ring_bytes
        if rb < 4096 or rb & (rb - 1):
            raise ConfigError(f"ring_bytes: {rb} must be a power of 2 and at least 4096")

    @property
    def node(self) -> str:
        return self.node_name or socket.gethostname()


@dataclass(frozen=True)
class Tracing:
    """The pipeline's own traces and where spans go over OTLP (fleetscope/otel.py). The
    OpenTelemetry SDK reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint, headers,
    TLS, compression, timeout) and OTEL_BSP_* itself; fleetscope does not."""

    otlp_protocol: str = opt(
        "off",
        _choice("off", "http/protobuf", "grpc"),
        "export spans over OTLP with this protocol (endpoint etc. from OTEL_EXPORTER_OTLP_*); off: don't",
        "off|http/protobuf|grpc",
    )
    trace_sample_ratio: float = opt(
        0.01, _ratio, "share of batches whose trip through the pipeline is traced (self-tracing, needs OTLP)"
    )


@dataclass(frozen=True)
class Spans:
    """Spans derived from kernel events, written by the ingester (ingester/spans.py)."""

    spans: bool = opt(
        True,
        _bool,
        "turn TCP connections, process lifetimes, OOM kills and fatal signals into spans "
        "(fleet.otel_traces, and OTLP with otlp_protocol)",
    )
    span_process_min_duration: float = opt(
        1.0, _duration, "a process becomes a span when it lived at least this long (0: every process)"
    )


DEFAULT_SPOOL_DIR = Path("/var/lib/fleetscope/spool")


@dataclass(frozen=True)
class SpoolOptions:
    """The agent's disk spool between the batcher and Kafka (node_agent/spool.py)."""

    spool_dir: Path = opt(
        DEFAULT_SPOOL_DIR, _path, "directory of the disk spool: batches not yet acknowledged by Kafka (one agent each)"
    )
    spool_max_bytes: int = opt(
        1 << 30, _size, "disk the spool may use; when full, its oldest batches are evicted and counted as lost"
    )


@dataclass(frozen=True)
class AgentSettings(Common, Kafka, AgentOptions, Tracing, SpoolOptions):
    """`fleetscope agent`: probes -> Kafka."""

    def validate(self) -> None:
        if not self.brokers:
            raise ConfigError("brokers: required; set --brokers HOST:PORT or FLEETSCOPE_BROKERS")
        AgentOptions.validate(self)
        self.validate_kafka_security()
        if self.spool_max_bytes < 4 * self.batch_max_bytes:
            raise ConfigError(
                f"spool_max_bytes: {self.spool_max_bytes} holds fewer than 4 batches of batch_max_bytes "
                f"({self.batch_max_bytes}); raise it to at least {4 * self.batch_max_bytes}"
            )


@dataclass(frozen=True)
class CheckSettings(Common, AgentOptions):
    """`fleetscope agent --check`: which probes load on this kernel; needs no broker."""


@dataclass(frozen=True)
class Kubernetes:
    """Where the ingester learns pod metadata for the k8s_* columns (ingester/enrich)."""

    k8s_api: str = opt(
        "off",
        _choice("off", "in-cluster", "kubeconfig"),
        "Kubernetes API for pod metadata: in-cluster (the pod's service account), kubeconfig (k8s_kubeconfig), or off",
    )
    k8s_kubeconfig: Path = opt(Path("~/.kube/config"), _path, "kubeconfig file for k8s_api kubeconfig")
    k8s_context: str = opt("", str, "context of the kubeconfig to use (default: its current-context)")
    k8s_label_selector: str = opt(
        "", _label_selector, "only pods matching this label selector, e.g. 'tier=web,env!=dev' (default: all)"
    )
    k8s_field_selector: str = opt(
        "", _field_selector, "only pods matching this field selector, e.g. 'metadata.namespace!=kube-system'"
    )
    k8s_labels: tuple[str, ...] = opt(DEFAULT_K8S_LABELS, _names, "pod labels copied into k8s_labels", "LIST")
    k8s_annotations: tuple[str, ...] = opt((), _names, "pod annotations copied into k8s_annotations", "LIST")
    k8s_deleted_grace: float = opt(600.0, _duration, "deleted pods stay resolvable this long, for late events")
    k8s_resolve_wait: float = opt(
        2.0,
        _duration,
        "a batch with pods or containers the watch has not delivered yet waits for them until this long "
        "after the batch was made (0: never)",
    )


@dataclass(frozen=True)
class IngestSettings(Common, Kafka, Store, ClickHouseAuth, Kubernetes, Spans, Tracing):
    """`fleetscope ingest`: Kafka -> ClickHouse."""

    group_id: str = opt("fleetscope-ingest", str, "Kafka consumer group")
    dlq_topic: str = opt(
        "fleetscope.dlq.v1", str, "dead-letter topic for malformed, oversized and unknown-major-version batches"
    )
    max_poll_records: int = opt(64, _positive_int, "Kafka messages (batches) fetched per poll")
    retry_backoff_max: float = opt(30.0, _duration, "cap of the exponential backoff between insert retries")
    stats_interval: float = opt(10.0, _duration, "how often counters are written to fleet.pipeline_stats")
    # delivery under faults (ingester/app.py, docs/failure-modes.md)
    max_in_flight_bytes: int = opt(
        64 << 20, _size, "Kafka messages fetched but not yet stored: fetching pauses at this bound, resumes below half"
    )
    max_batch_bytes: int = opt(
        64 << 20,
        _size,
        "a larger message, or one whose LZ4 frame decompresses to more, goes to the dead-letter topic (oversized)",
    )
    insert_max_bytes: int = opt(
        16 << 20,
        _size,
        "fetched batches of one stream stored by one insert, up to this many message bytes, and as many bytes of "
        "batches once decompressed (one part for ClickHouse to write and merge instead of one per batch; each batch "
        "still stored exactly once)",
    )
    max_poll_interval: float = opt(
        300.0,
        _duration,
        "Kafka max.poll.interval: when inserts keep failing this long, the ingester gives its partitions to the "
        "other members and rejoins once ClickHouse answers",
    )
    health_listen: str = opt(
        "127.0.0.1:9466", _listen, "serve the ingester's /healthz and /metrics here (off: don't)", "HOST:PORT|off"
    )

    def validate(self) -> None:
        if not self.brokers:
            raise ConfigError("brokers: required; set --brokers HOST:PORT or FLEETSCOPE_BROKERS")
        if not self.clickhouse:
            raise ConfigError("clickhouse: required; set --clickhouse DSN or FLEETSCOPE_CLICKHOUSE")
        if self.max_poll_interval < 1:
            raise ConfigError(f"max_poll_interval: {self.max_poll_interval}s is too short; use 1s or more")
        if self.max_batch_bytes > 64 << 20:  # fleetscope.codec.MAX_BATCH_BYTES: what the decoder accepts
            raise ConfigError(f"max_batch_bytes: {self.max_batch_bytes} exceeds the decoder's bound; use 64MiB or less")
        self.validate_kafka_security()
        self.validate_clickhouse_auth(self.clickhouse)


@dataclass(frozen=True)
class SqlAccess:
    """Who may use the ClickHouse HTTP interface of `run` and `serve-sql`, and how much."""

    sql_user: str = opt("default", str, "user name SQL clients must send (with sql_password)")
    sql_password: Secret = opt(
        Secret(""), secret, "password SQL clients must send; empty: no check (loopback only). Prefer the environment"
    )
    sql_password_file: Path | None = opt(None, _path, "read sql_password from the first line of this file")
    sql_read_only: bool = opt(False, _bool, "accept only SELECT, SHOW, DESCRIBE, EXISTS, EXPLAIN (dashboards)")
    sql_max_queries: int = opt(16, _positive_int, "queries and inserts run at once; more wait for a slot")

    def sql_secret(self) -> str:
        """The password clients must send ("" for none), from sql_password or its file."""
        if self.sql_password_file is None:
            return self.sql_password
        try:
            lines = self.sql_password_file.read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"sql_password_file: cannot read {self.sql_password_file}: {e.strerror}") from None
        if not lines or not lines[0]:
            raise ConfigError(f"sql_password_file: {self.sql_password_file} is empty; put the password on line 1")
        return lines[0]

    def check_listen(self, key: str, listen: str) -> None:
        """Refuse to expose the store beyond this machine without a password."""
        if self.sql_password and self.sql_password_file:
            raise ConfigError("sql_password/sql_password_file: give one of them, not both")
        secret = self.sql_secret()
        if listen != "off" and not secret and not is_loopback(listen.rpartition(":")[0]):
            raise ConfigError(
                f"{key}: {listen} is reachable from other machines and no password is set; set "
                "FLEETSCOPE_SQL_PASSWORD or sql_password_file, or listen on 127.0.0.1"
            )


@dataclass(frozen=True)
class RunSettings(Common, AgentOptions, SqlAccess, Kubernetes, Spans, Tracing):
    """`fleetscope run`: agent and ingester in one process, embedded ClickHouse."""

    data_dir: Path = opt(Path("./data"), _path, "where the embedded ClickHouse keeps its data")
    sql_listen: str = opt(
        "127.0.0.1:8123", _listen, "serve the ClickHouse HTTP interface here (off: don't)", "HOST:PORT|off"
    )
    duration: float = opt(0.0, _duration, "stop after this long (0: run until Ctrl-C)")
    status: str = opt(
        "auto", _choice("auto", "line", "log", "off"), "live status: one line on a TTY, log lines otherwise"
    )

    @property
    def clickhouse(self) -> str:
        return f"chdb://{self.data_dir.resolve()}"

    def validate(self) -> None:
        AgentOptions.validate(self)
        self.check_listen("sql_listen", self.sql_listen)


@dataclass(frozen=True)
class ServeSqlSettings(Common, SqlAccess):
    """`fleetscope serve-sql`: the ClickHouse HTTP interface over an embedded store."""

    data_dir: Path = opt(Path("./data"), _path, "the embedded store to serve")
    listen: str = opt("127.0.0.1:8123", _host_port_or_any, "address of the ClickHouse HTTP interface", "HOST:PORT")

    def validate(self) -> None:
        self.check_listen("listen", self.listen)


DEFAULT_SQL_DSN = "http://127.0.0.1:8123"


@dataclass(frozen=True)
class QuerySettings(Common, ClickHouseAuth):
    """`fleetscope query`: run SQL, print a table."""

    data_dir: Path | None = opt(None, _path, "query a store no process has open, in this directory")
    clickhouse: str = opt(
        "", _dsn, f"or query this ClickHouse DSN (default with neither: {DEFAULT_SQL_DSN}, a running "
        "`fleetscope run` or `serve-sql`)", "DSN",
    )  # fmt: skip
    format: str = opt("table", _choice("table", "tsv", "json"), "output format")

    def validate(self) -> None:
        if self.data_dir and self.clickhouse:
            raise ConfigError("data_dir/clickhouse: give one of --data-dir DIR or --clickhouse DSN, not both")
        self.validate_clickhouse_auth(self.dsn)

    @property
    def dsn(self) -> str:
        if self.data_dir:
            return f"chdb://{self.data_dir.resolve()}"
        return self.clickhouse or DEFAULT_SQL_DSN


@dataclass(frozen=True)
class MigrateSettings(Common, Store, ClickHouseAuth):
    """`fleetscope migrate`: apply ClickHouse migrations (idempotent)."""

    def validate(self) -> None:
        if not self.clickhouse:
            raise ConfigError("clickhouse: required; set --clickhouse DSN or FLEETSCOPE_CLICKHOUSE")
        self.validate_clickhouse_auth(self.clickhouse)


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
            raise ConfigError(f"{f.name}: bad value {_shown(f, str(raw))!r} from {source}: {e}") from None
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate:
        validate()
    return settings


def _shown(f: dataclasses.Field[Any], raw: str) -> str:
    """A setting's text as an error message may show it: secrets hidden, DSNs masked."""
    if f.metadata["parse"] is secret:
        return "***"
    return mask_dsn(raw) if f.metadata["parse"] is _dsn else raw


def replace(settings: Any, **changes: Any) -> Any:
    return dataclasses.replace(settings, **changes)


def environ() -> Mapping[str, str]:
    """The process environment; the only place fleetscope reads it."""
    return os.environ
