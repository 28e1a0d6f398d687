"""Fixtures that start real components for the integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kafka_broker import (
    REPO_ROOT,
    KafkaBroker,
    find_java,
    has_kafka_jars,
)
from tests.support.real import require_real

KAFKA_LIBS_ENV = "FLEETSCOPE_KAFKA_LIBS"
DEFAULT_KAFKA_LIBS = REPO_ROOT / ".cache" / "kafka" / "libs"


def kafka_libs_dir() -> Path:
    """Where the Kafka jars are: ``$FLEETSCOPE_KAFKA_LIBS`` or ``<repo>/.cache/kafka/libs``."""
    return Path(os.environ.get(KAFKA_LIBS_ENV) or DEFAULT_KAFKA_LIBS)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A single-node KRaft Kafka broker on a free loopback port, shared by the session.

    Auto-created topics get 4 partitions.  Tests that restart or kill it must leave it
    running (``broker.start()``) for the tests after them.
    """
    libs = kafka_libs_dir()
    if find_java() is None:
        require_real("Kafka broker: no `java` on PATH (install a JDK 17, then run `make test`)")
    if not has_kafka_jars(libs):
        require_real(f"Kafka broker: no jars in {libs}; run `make test` or `tools/kafka/fetch.sh {libs}`")
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"), libs)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
