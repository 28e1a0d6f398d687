"""Kafka over TLS with SCRAM-SHA-512 logins and client certificates, end to end.

A broker of its own (the session broker stays PLAINTEXT) gets a SASL_SSL listener with
certificates made by the test (tests/support/tls.py), SCRAM users created when its storage
is formatted, and TLS client authentication required. Clients reach that listener only
through a recording proxy (the listener advertises the proxy's port), so the test sees
every byte the agent and the ingester send: each connection must open with a TLS
ClientHello, and no topic name, argument or password may appear in the captured bytes.
Marker processes carry a password argument, which must be stored masked.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from fleetscope import config
from fleetscope.kafka_security import KafkaAuth, explain
from tests.integration.conftest import kafka_libs_dir
from tests.support.kafka_broker import KafkaBroker, SaslSslListener, find_java, has_kafka_jars, pick_free_port
from tests.support.procs import FleetscopeProcess
from tests.support.real import require_real
from tests.support.tcp_proxy import RecordingProxy, is_tls_client_hello
from tests.support.tls import Pki, make_pki

pytestmark = [pytest.mark.kafka, pytest.mark.integration]

AGENT_USER, AGENT_PASSWORD = "fleetscope-agent", f"agent-pw-{uuid.uuid4().hex}"
INGEST_USER, INGEST_PASSWORD = "fleetscope-ingest", f"ingest-pw-{uuid.uuid4().hex}"
N = 50


@dataclass
class SecureKafka:
    broker: KafkaBroker
    proxy: RecordingProxy
    pki: Pki

    @property
    def bootstrap(self) -> str:
        """The SASL_SSL listener, through the proxy."""
        return f"127.0.0.1:{self.proxy.port}"

    def client_args(self, user: str) -> list[str]:
        p = self.pki
        return [
            "--brokers", self.bootstrap, "--kafka-security-protocol", "SASL_SSL",
            "--kafka-ssl-cafile", str(p.ca_cert), "--kafka-ssl-certfile", str(p.client_cert),
            "--kafka-ssl-keyfile", str(p.client_key), "--kafka-sasl-username", user,
        ]  # fmt: skip


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    libs = kafka_libs_dir()
    if find_java() is None or not has_kafka_jars(libs):
        require_real(f"Kafka broker: no java or no jars in {libs}; run `make test`")
    root = tmp_path_factory.mktemp("secure-kafka")
    pki = make_pki(root / "pki")
    sasl_port = pick_free_port()
    proxy = RecordingProxy(sasl_port).start()
    listener = SaslSslListener(
        pki.broker_keystore, pki.keystore_password, {AGENT_USER: AGENT_PASSWORD, INGEST_USER: INGEST_PASSWORD},
        truststore=pki.ca_cert, client_auth="required", port=sasl_port, advertised_port=proxy.port,
    )  # fmt: skip
    broker = KafkaBroker(root / "kafka", libs, sasl_ssl=listener)
    broker.start()
    try:
        yield SecureKafka(broker, proxy, pki)
    finally:
        broker.stop()
        proxy.close()


def query(data_dir: Path, sql: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-m", "fleetscope", "query", "--data-dir", str(data_dir), "--format", "tsv", sql],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [line.split("\t") for line in out.stdout.splitlines()[1:]]


async def wait_consumed(bootstrap: str, group: str, topics: list[str], within: float) -> None:
    """Until the group's committed offsets reach the end of every partition of topics."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        if not parts:
            await consumer._client.force_metadata_update()  # topics created meanwhile
            parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or ())]
        ends = await consumer.end_offsets(parts)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            committed = [await consumer.committed(tp) or 0 for tp in parts]
            if all(c >= ends[tp] for c, tp in zip(committed, parts, strict=True)):
                return
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
    raise AssertionError(f"group {group} did not consume {topics} to their end within {within}s")


def run_markers(marker: str, secret: str) -> None:
    """N processes whose command line holds a password argument."""
    for i in range(N):
        subprocess.run(["/bin/sh", "-c", "exit 0", f"{marker}-{i}", f"--db-password={secret}"], check=True)


async def test_agent_and_ingester_talk_sasl_ssl_only(
    secure_kafka: SecureKafka, bpf_objects: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "store"
    group = prefix = f"secure-{uuid.uuid4().hex[:8]}"
    password_file = tmp_path / "ingest-password"
    password_file.write_text(INGEST_PASSWORD + "\n")
    ingest = FleetscopeProcess(
        "ingest", *secure_kafka.client_args(INGEST_USER), "--kafka-sasl-password-file", str(password_file),
        "--clickhouse", f"chdb://{data_dir}", "--group-id", group, "--topic-prefix", prefix, "--log-level", "debug",
        log=tmp_path / "ingest.log",
    )  # fmt: skip
    agent = FleetscopeProcess(
        "agent", *secure_kafka.client_args(AGENT_USER), "--bpf-dir", str(bpf_objects), "--topic-prefix", prefix,
        "--status-listen", "off", "--log-level", "debug", log=tmp_path / "agent.log",
        env={"FLEETSCOPE_KAFKA_SASL_PASSWORD": AGENT_PASSWORD},
    )  # fmt: skip
    marker, secret = f"fsmark-{uuid.uuid4().hex[:12]}", f"s3cret-{uuid.uuid4().hex[:12]}"
    topics = [f"{prefix}.{s}.v1" for s in ("process_exec", "process_exit", "pipeline_stats")]
    for topic in topics:  # before the ingester subscribes: it would see a later one only minutes later
        await asyncio.to_thread(secure_kafka.broker.create_topic, topic)
    with ingest, agent:
        agent.wait_for_log(f"(SASL_SSL as {AGENT_USER} (SCRAM-SHA-512))", 60)
        ingest.wait_for_log(f"(SASL_SSL as {INGEST_USER} (SCRAM-SHA-512))", 120)
        await asyncio.to_thread(run_markers, marker, secret)
        agent.stop()  # flushes every batch and the last pipeline_stats
        await wait_consumed(secure_kafka.broker.bootstrap, group, topics, 60)
        ingest.stop()
    assert agent.returncode == 0 and ingest.returncode == 0

    rows = query(data_dir, f"SELECT args FROM fleet.process_exec WHERE position(args, '{marker}') > 0")
    assert sorted(r[0] for r in rows) == sorted(f"/bin/sh -c exit 0 {marker}-{i} --db-password=***" for i in range(N))
    assert query(data_dir, f"SELECT count() FROM fleet.process_exec WHERE position(args, '{secret}') > 0") == [["0"]]
    redacted = query(
        data_dir,
        "SELECT sum(value) FROM fleet.pipeline_stats WHERE counter = 'rows_redacted' AND stream = 'process_exec'",
    )
    assert int(redacted[0][0]) >= N  # other processes of this machine may carry secrets too

    sent = secure_kafka.proxy.client_bytes()
    assert len(sent) >= 2  # at least the agent's producer and the ingester's clients
    for data in sent:
        assert is_tls_client_hello(data), data[:16]
        for plain in (marker.encode(), secret.encode(), prefix.encode(), AGENT_PASSWORD.encode(),
                      INGEST_PASSWORD.encode(), b"process_exec"):  # fmt: skip
            assert plain not in data
    for proc in (agent, ingest):
        text = proc.log_text()
        assert AGENT_PASSWORD not in text and INGEST_PASSWORD not in text


def settings(k: SecureKafka, **changes: str) -> config.AgentSettings:
    p = k.pki
    values = {
        "brokers": f"127.0.0.1:{k.broker.sasl_ssl_port}", "kafka_security_protocol": "SASL_SSL",
        "kafka_ssl_cafile": str(p.ca_cert), "kafka_ssl_certfile": str(p.client_cert),
        "kafka_ssl_keyfile": str(p.client_key), "kafka_sasl_username": AGENT_USER,
        "kafka_sasl_password": AGENT_PASSWORD, **changes,
    }  # fmt: skip
    return config.build(config.AgentSettings, {k: v for k, v in values.items() if v != ""}, {})


PLAINTEXT = {"kafka_security_protocol": "PLAINTEXT"} | dict.fromkeys(
    ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "kafka_sasl_username", "kafka_sasl_password"), ""
)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"kafka_sasl_password": "wrong-password-1234"}, f"authentication as '{AGENT_USER}' (SCRAM-SHA-512) failed"),
        ({"kafka_sasl_username": "nobody"}, "authentication as 'nobody' (SCRAM-SHA-512) failed"),
        ({"kafka_ssl_cafile": "OTHER_CA"}, "the broker's TLS certificate is not trusted"),
        ({"kafka_ssl_certfile": "", "kafka_ssl_keyfile": ""}, "may want a client certificate it trusts"),
        (PLAINTEXT, "if this is a TLS listener, set kafka_security_protocol SSL or SASL_SSL"),
    ],
)
async def test_misconfigured_clients_get_a_clear_reason(
    secure_kafka: SecureKafka, changes: dict[str, str], expected: str
) -> None:
    if changes.get("kafka_ssl_cafile") == "OTHER_CA":
        changes = {**changes, "kafka_ssl_cafile": str(secure_kafka.pki.other_ca_cert)}
    reason = await explain(settings(secure_kafka, **changes), RuntimeError("Unable to bootstrap"))
    assert expected in reason
    assert "wrong-password-1234" not in reason and AGENT_PASSWORD not in reason


async def test_agent_logs_a_refused_login_without_the_password(
    secure_kafka: SecureKafka, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from node_agent.batcher import Batch
    from node_agent.shipper import KafkaSink

    s = settings(secure_kafka, kafka_sasl_password="wrong-password-1234")
    sink = KafkaSink(s.brokers, "secure-refused", tmp_path / "spool", 1 << 20, auth=KafkaAuth(s))
    caplog.set_level(logging.DEBUG)
    await sink.start()
    try:
        sink.submit(Batch("process_exec", "batch-1", 1, 1, b"x", b"node", 0))
        deadline = time.monotonic() + 30
        while "authentication as 'fleetscope-agent' (SCRAM-SHA-512) failed" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.1)
    finally:
        await sink.stop(0)
    assert "wrong-password-1234" not in caplog.text


def test_ingester_names_an_untrusted_certificate(secure_kafka: SecureKafka, tmp_path: Path) -> None:
    p = secure_kafka.pki
    args = secure_kafka.client_args(INGEST_USER)
    args[args.index("--kafka-ssl-cafile") + 1] = str(p.other_ca_cert)
    ingest = FleetscopeProcess(
        "ingest", *args, "--clickhouse", f"chdb://{tmp_path / 'store'}", "--group-id", "secure-untrusted",
        log=tmp_path / "ingest.log", env={"FLEETSCOPE_KAFKA_SASL_PASSWORD": INGEST_PASSWORD},
    )  # fmt: skip
    with ingest:
        ingest.wait_for_log("the broker's TLS certificate is not trusted", 120)
    assert INGEST_PASSWORD not in ingest.log_text()
