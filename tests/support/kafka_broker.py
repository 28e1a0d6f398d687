"""A real Apache Kafka broker for the test suite.

One KRaft node that is both broker and controller, run with the machine's Java from the
jars that ``tools/kafka/fetch.sh`` copies out of Maven Central.  Everything it writes lives
under ``log_dir``: ``server.properties``, the data (``data/``) and the JVM's output
(``broker.log``), so :meth:`KafkaBroker.restart` -- or a new :class:`KafkaBroker` on the
same directory -- finds the topics, messages and committed offsets again.

The readiness check and :meth:`KafkaBroker.create_topic` use aiokafka on a private event
loop in a helper thread, so they can be called from plain and from ``async`` tests alike
(they block the caller's loop while they run).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.structs import TopicPartition

__all__ = ["CLUSTER_ID", "REPO_ROOT", "KafkaBroker", "KafkaBrokerError", "SaslSslListener"]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Root of the fleetscope work tree."""

CLUSTER_ID = "ZmxlZXRzY29wZS10ZXN0LQ"
"""Fixed KRaft cluster id (base64url of the 16 bytes ``fleetscope-test-``)."""

NODE_ID = 1
SCRAM_LOGIN_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
DEFAULT_LOG4J_CONFIG = REPO_ROOT / "tools" / "kafka" / "log4j2.properties"

_TOPIC_ALREADY_EXISTS = 36
_PR_SET_PDEATHSIG = 1


class KafkaBrokerError(RuntimeError):
    """The broker could not be formatted, started or used."""


@dataclass(frozen=True)
class SaslSslListener:
    """A second client listener, SASL_SSL with SCRAM-SHA-512 logins (beside PLAINTEXT).

    The SCRAM users are written into the KRaft metadata when the storage is formatted
    (``kafka-storage format --add-scram``), so they apply to a fresh ``log_dir`` only.
    """

    keystore: Path  # PKCS12: the broker's key, its certificate and the chain
    keystore_password: str
    scram_users: Mapping[str, str] = field(default_factory=dict)  # user -> password
    truststore: Path | None = None  # PEM CA certificates that client certificates must chain to
    client_auth: str = "none"  # ssl.client.auth: none, requested or required
    port: int | None = None  # None: a free one, kept across restarts
    advertised_port: int | None = None  # what metadata tells clients (e.g. a proxy in front)


def find_java() -> str | None:
    """Return the ``java`` launcher: ``$JAVA_HOME/bin/java`` if set, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("java")


def has_kafka_jars(libs_dir: Path) -> bool:
    """Whether ``libs_dir`` holds the broker's jars.

    ``tools/kafka/fetch.sh`` moves its result into place only when complete, so the
    Kafka jar's presence is enough; a Kafka distribution's ``libs/`` also qualifies.
    """
    return libs_dir.is_dir() and any(libs_dir.glob("kafka_2.13-*.jar"))


def _ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned local ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_free_port(exclude: frozenset[int] = frozenset()) -> int:
    """Pick a free loopback TCP port *below* the kernel's ephemeral range.

    The kernel never hands such a port to an outgoing connection or to ``bind(0)``, so the
    port stays available while the broker is down between a stop and a restart.
    """
    low, _high = _ephemeral_port_range()
    top = max(low - 1, 10_001)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(10_000, top)
        if port not in exclude and _port_is_free(port):
            return port
    # Fall back on whatever the kernel assigns.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    if port in exclude:
        raise KafkaBrokerError("could not find a free loopback port")
    return port


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the test process goes away (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _pdeathsig_is_safe() -> bool:
    """Whether tying the JVM's life to the caller is safe.

    Linux sends the parent-death signal when the *thread* that forked the child ends, so
    it is used only from the main thread (a start from, say, ``asyncio.to_thread`` would
    otherwise lose its broker when that worker thread is retired).
    """
    return sys.platform == "linux" and threading.current_thread() is threading.main_thread()


def _run_in_thread(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a fresh event loop in a helper thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-broker") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class KafkaBroker:
    """A single-node KRaft Kafka (broker + controller) run as a ``java`` subprocess.

    Args:
        log_dir: Directory for the config, data and JVM output; created if missing.
        libs_dir: Directory with every runtime jar (``tools/kafka/fetch.sh`` output).
        port: Client (PLAINTEXT) port on 127.0.0.1.  ``None`` picks a free one on the
            first :meth:`start`; it is kept across restarts.
        num_partitions: Partitions of auto-created topics.
        overrides: Extra ``server.properties`` entries; they win over the defaults.
        log4j_config: Log4j 2 configuration for the JVM.
        java: ``java`` launcher; default ``$JAVA_HOME/bin/java`` or the one on PATH.
        jvm_options: Extra JVM options for the broker (e.g. ``-XX:TieredStopAtLevel=1``
            starts it about 0.5 s sooner at the cost of peak throughput).
        sasl_ssl: An extra SASL_SSL listener (TLS + SCRAM-SHA-512), see :class:`SaslSslListener`.
    """

    def __init__(
        self,
        log_dir: Path,
        libs_dir: Path,
        port: int | None = None,
        *,
        num_partitions: int = 4,
        overrides: Mapping[str, str | int | bool] | None = None,
        log4j_config: Path = DEFAULT_LOG4J_CONFIG,
        java: str | None = None,
        jvm_options: Sequence[str] = (),
        sasl_ssl: SaslSslListener | None = None,
    ) -> None:
        self.log_dir = Path(log_dir).resolve()
        self.libs_dir = Path(libs_dir).resolve()
        self.num_partitions = num_partitions
        self.overrides: dict[str, str | int | bool] = dict(overrides or {})
        self.log4j_config = log4j_config
        self._java = java
        self.jvm_options = list(jvm_options)
        self._port = port
        self._controller_port: int | None = None
        self.sasl_ssl = sasl_ssl
        self._sasl_ssl_port: int | None = sasl_ssl.port if sasl_ssl else None
        self._proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        """Wall time of the last successful :meth:`start`, launch to ready."""

    # -- paths and addresses -------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """Kafka's ``log.dirs``: partitions and the KRaft metadata log."""
        return self.log_dir / "data"

    @property
    def config_path(self) -> Path:
        """The ``server.properties`` written before each start."""
        return self.log_dir / "server.properties"

    @property
    def log_path(self) -> Path:
        """The JVM's stdout and stderr, appended to across restarts."""
        return self.log_dir / "broker.log"

    @property
    def port(self) -> int:
        """The client port; known after the first :meth:`start` unless given."""
        if self._port is None:
            raise KafkaBrokerError("the broker has no port yet: call start() first")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``bootstrap_servers`` for clients: ``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_ssl_port(self) -> int:
        """The SASL_SSL listener's port; known after the first :meth:`start` unless given."""
        if self._sasl_ssl_port is None:
            raise KafkaBrokerError("the broker has no SASL_SSL listener (or no port yet: call start() first)")
        return self._sasl_ssl_port

    @property
    def pid(self) -> int | None:
        """Process id of the running JVM, if any."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the JVM process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        """Start the broker and block until it serves clients.

        Formats the KRaft storage first if it never was.  Raises :class:`KafkaBrokerError`
        (with the end of ``broker.log``) if the JVM exits or is not ready in ``timeout``
        seconds; the JVM is killed in that case.
        """
        if self.running:
            raise KafkaBrokerError(f"broker already running (pid {self.pid})")
        self._reap()
        java = self._java_path()
        self._ensure_ports()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._server_properties())
        if not (self.data_dir / "meta.properties").is_file():
            self._format(java)

        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"---- starting broker on {self.bootstrap} ----\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [
                    java,
                    "-Xmx512m",
                    *self._jvm_flags(),
                    *self.jvm_options,
                    "-cp",
                    str(self.libs_dir / "*"),
                    "kafka.Kafka",
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_dir,
                preexec_fn=_die_with_parent if _pdeathsig_is_safe() else None,
            )
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the broker down cleanly (SIGTERM) and wait; SIGKILL after ``timeout`` s."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would; data on disk is kept."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._proc = None

    def restart(self, timeout: float = 180.0) -> None:
        """Stop cleanly and start again on the same port and log directory."""
        self.stop()
        self.start(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers for tests ---------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        partitions: int = 4,
        config: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Create a topic (no error if it exists) and wait until every partition has a leader."""

        async def run() -> None:
            try:
                async with asyncio.timeout(timeout):
                    await self._create_topic(name, partitions, dict(config or {}))
            except TimeoutError:
                raise KafkaBrokerError(f"topic {name!r} not ready after {timeout} s") from None

        _run_in_thread(run)

    def tail_log(self, max_bytes: int = 8192) -> str:
        """The end of ``broker.log``, for error messages."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - max_bytes))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    # -- internals -----------------------------------------------------------------------

    def _reap(self) -> None:
        """Forget a JVM that has exited on its own (after waiting for it)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc.wait()
            self._proc = None

    def _java_path(self) -> str:
        java = self._java or find_java()
        if java is None:
            raise KafkaBrokerError("no `java` found (set JAVA_HOME or put java on PATH)")
        if not has_kafka_jars(self.libs_dir):
            raise KafkaBrokerError(f"no Kafka jars in {self.libs_dir}: run tools/kafka/fetch.sh {self.libs_dir}")
        return java

    def _ensure_ports(self) -> None:
        if self._port is None:
            self._port = pick_free_port()
        if self._controller_port is None:
            self._controller_port = pick_free_port(exclude=frozenset({self._port}))
        if self.sasl_ssl is not None and self._sasl_ssl_port is None:
            self._sasl_ssl_port = pick_free_port(exclude=frozenset({self._port, self._controller_port}))

    def _jvm_flags(self) -> list[str]:
        return [
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_config}",
        ]

    def _server_properties(self) -> str:
        port, cport = self.port, self._controller_port
        props: dict[str, str | int | bool] = {
            "process.roles": "broker,controller",
            "node.id": NODE_ID,
            "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "auto.create.topics.enable": True,
            "num.partitions": self.num_partitions,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            # After a crash the controller keeps the dead broker's registration until its
            # session times out (default 9 s), and only then lets the new one in.
            "broker.session.timeout.ms": 4000,
            "broker.heartbeat.interval.ms": 500,
            "auto.leader.rebalance.enable": False,
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "log.segment.bytes": 16 * 1024 * 1024,
        }
        if self.sasl_ssl is not None:
            props.update(self._sasl_ssl_properties())
        props.update(self.overrides)
        lines = ["# Written by tests/support/kafka_broker.py before each start."]
        for key, value in props.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"{key}={text}")
        return "\n".join(lines) + "\n"

    def _sasl_ssl_properties(self) -> dict[str, str | int | bool]:
        listener = self.sasl_ssl
        assert listener is not None
        sport = self.sasl_ssl_port
        prefix = "listener.name.sasl_ssl."
        props: dict[str, str | int | bool] = {
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},SASL_SSL://127.0.0.1:{sport},"
            f"CONTROLLER://127.0.0.1:{self._controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"SASL_SSL://127.0.0.1:{listener.advertised_port or sport}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            prefix + "scram-sha-512.sasl.jaas.config": f"{SCRAM_LOGIN_MODULE} required;",
            prefix + "ssl.keystore.type": "PKCS12",
            prefix + "ssl.keystore.location": str(listener.keystore),
            prefix + "ssl.keystore.password": listener.keystore_password,
            prefix + "ssl.client.auth": listener.client_auth,
        }
        if listener.truststore is not None:
            props[prefix + "ssl.truststore.type"] = "PEM"
            props[prefix + "ssl.truststore.location"] = str(listener.truststore)
        return props

    def _format(self, java: str) -> None:
        """Format the KRaft storage with the fixed cluster id (first start only)."""
        result = subprocess.run(
            [
                java,
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",
                *self._jvm_flags(),
                "-cp",
                str(self.libs_dir / "*"),
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                CLUSTER_ID,
                "--config",
                str(self.config_path),
                "--ignore-formatted",
                *self._scram_arguments(),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        (self.log_dir / "format.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"formatting {self.data_dir} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )

    def _scram_arguments(self) -> list[str]:
        users = self.sasl_ssl.scram_users if self.sasl_ssl else {}
        return [a for u, p in users.items() for a in ("--add-scram", f"SCRAM-SHA-512=[name={u},password={p}]")]

    def _wait_ready(self, deadline: float) -> None:
        while True:
            proc = self._proc
            assert proc is not None
            code = proc.poll()
            if code is not None:
                raise KafkaBrokerError(
                    f"the broker exited with status {code} while starting; end of {self.log_path}:\n{self.tail_log()}"
                )
            if self._accepts_connections() and self._serves_metadata():
                return
            if time.monotonic() >= deadline:
                raise KafkaBrokerError(
                    f"the broker was not ready on {self.bootstrap} in time; end of {self.log_path}:\n{self.tail_log()}"
                )
            time.sleep(0.2)

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def _serves_metadata(self) -> bool:
        """A Metadata request answered with this node as a live broker."""
        try:
            return _run_in_thread(self._probe_metadata)
        except Exception:
            return False

    async def _probe_metadata(self) -> bool:
        client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(client.bootstrap(), 10)
            return any(b.nodeId == NODE_ID for b in client.cluster.brokers())
        finally:
            await client.close()

    async def _create_topic(self, name: str, partitions: int, config: dict[str, str]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            response = await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config)])
        finally:
            await admin.close()
        for topic, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                message = rest[0] if rest else ""
                raise KafkaBrokerError(f"creating topic {topic!r} failed: {code} {message}")

        client = AIOKafkaClient(bootstrap_servers=self.bootstrap)
        try:
            await client.bootstrap()
            while True:
                cluster = await client.fetch_all_metadata()
                found = cluster.partitions_for_topic(name) or set()
                if len(found) >= partitions and all(
                    (cluster.leader_for_partition(TopicPartition(name, p)) or -1) >= 0 for p in found
                ):
                    return
                await asyncio.sleep(0.1)
        finally:
            await client.close()
