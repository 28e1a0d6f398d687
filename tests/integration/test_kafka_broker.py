"""The real Kafka broker fixture serves what fleetscope's Kafka clients need.

aiokafka's idempotent producer (acks=all, lz4) and a consumer group with manual commits,
against the single-node KRaft broker that the suite starts; a clean restart and a crash
(SIGKILL) keep both the messages and the committed offsets.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka import codec as aiokafka_codec
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from tests.support.kafka_broker import KafkaBroker

pytestmark = pytest.mark.kafka

TAKE_SECONDS = 30.0

_names = itertools.count()


def unique(prefix: str) -> str:
    """A topic or group name no other test in this session uses."""
    return f"{prefix}-{time.monotonic_ns()}-{next(_names)}"


def headers_for(i: int) -> list[tuple[str, bytes]]:
    return [("seq", str(i).encode()), ("source", b"test-kafka-broker")]


async def produce(bootstrap: str, topic: str, count: int) -> None:
    """Send ``count`` keyed messages with headers through an idempotent lz4 producer."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        compression_type="lz4",
        linger_ms=5,
    )
    await producer.start()
    try:
        sends = [
            await producer.send(topic, key=f"node-{i % 7}".encode(), value=b"v%03d" % i, headers=headers_for(i))
            for i in range(count)
        ]
        await producer.flush()
        for metadata in await asyncio.gather(*sends):
            assert metadata.offset >= 0
    finally:
        await producer.stop()


def group_consumer(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


async def take(consumer: AIOKafkaConsumer, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    """Read exactly ``count`` records (never more) or fail after ``TAKE_SECONDS``."""
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(TAKE_SECONDS):
            while len(records) < count:
                batches = await consumer.getmany(timeout_ms=500, max_records=count - len(records))
                for batch in batches.values():
                    records.extend(batch)
    except TimeoutError:
        pytest.fail(f"got {len(records)} of {count} records in {TAKE_SECONDS} s")
    return records


def next_offsets(records: list[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, int]:
    """The offset to commit per partition: one past the last record read there."""
    offsets: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
    return offsets


async def committed(consumer: AIOKafkaConsumer, topic: str) -> dict[int, int | None]:
    partitions = consumer.partitions_for_topic(topic) or set()
    return {p: await consumer.committed(TopicPartition(topic, p)) for p in sorted(partitions)}


async def consume_and_commit(bootstrap: str, topic: str, group: str, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    """Join ``group``, read ``count`` records and commit exactly what was read."""
    consumer = group_consumer(bootstrap, topic, group)
    await consumer.start()
    try:
        records = await take(consumer, count)
        offsets = next_offsets(records)
        await consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        return records
    finally:
        await consumer.stop()


def test_aiokafka_has_lz4() -> None:
    # aiokafka >= 0.11 compresses with cramjam (the `aiokafka[lz4]` extra), not `lz4`.
    assert aiokafka_codec.has_lz4(), "aiokafka's lz4 codec needs cramjam: install aiokafka[lz4]"


async def test_idempotent_lz4_producer_and_group_commit(kafka_broker: KafkaBroker) -> None:
    topic, group = unique("roundtrip"), unique("group")
    await produce(kafka_broker.bootstrap, topic, 100)

    consumer = group_consumer(kafka_broker.bootstrap, topic, group)
    await consumer.start()
    try:
        records = await take(consumer, 100)
        await consumer.commit()
        assert consumer.partitions_for_topic(topic) == {0, 1, 2, 3}  # auto-created, 4 partitions
        by_partition = await committed(consumer, topic)
        end = await consumer.end_offsets([TopicPartition(topic, p) for p in range(4)])
    finally:
        await consumer.stop()

    assert sorted(r.value for r in records if r.value is not None) == [b"v%03d" % i for i in range(100)]
    for r in records:
        assert r.value is not None
        i = int(r.value[1:])
        assert r.key == f"node-{i % 7}".encode()
        assert list(r.headers) == headers_for(i)
    # Messages of one key stay in order within their partition.
    for key in {r.key for r in records}:
        seq = [int(r.value[1:]) for r in records if r.key == key and r.value is not None]
        assert seq == sorted(seq)
    assert by_partition == {tp.partition: offset for tp, offset in end.items()}
    assert sum(o or 0 for o in by_partition.values()) == 100


async def test_create_topic_helper(kafka_broker: KafkaBroker) -> None:
    topic = unique("created")
    kafka_broker.create_topic(topic, partitions=3)
    kafka_broker.create_topic(topic, partitions=3)  # already there: no error

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert described["error_code"] == 0
    assert sorted(p["partition"] for p in described["partitions"]) == [0, 1, 2]
    assert all(p["leader"] == 1 for p in described["partitions"])


@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_restart_keeps_messages_and_committed_offsets(kafka_broker: KafkaBroker, how: str) -> None:
    topic, group = unique(f"durable-{how}"), unique(f"group-{how}")
    await produce(kafka_broker.bootstrap, topic, 100)
    first = await consume_and_commit(kafka_broker.bootstrap, topic, group, 60)
    bootstrap, pid = kafka_broker.bootstrap, kafka_broker.pid

    if how == "restart":
        kafka_broker.restart()
    else:
        kafka_broker.kill()
        assert not kafka_broker.running
        kafka_broker.start()
    assert kafka_broker.running
    assert kafka_broker.pid != pid
    assert kafka_broker.bootstrap == bootstrap

    # The group resumes at its committed offsets: exactly the 40 it had not read.
    consumer = group_consumer(kafka_broker.bootstrap, topic, group)
    await consumer.start()
    try:
        rest = await take(consumer, 40)
        extra = await consumer.getmany(timeout_ms=1000)
    finally:
        await consumer.stop()
    assert not any(extra.values())
    seen = [r.value for r in first + rest]
    assert sorted(v for v in seen if v is not None) == [b"v%03d" % i for i in range(100)]

    # And every message is still there for a new group.
    everything = await consume_and_commit(kafka_broker.bootstrap, topic, unique("fresh"), 100)
    assert {r.value for r in everything} == set(seen)
    assert all(list(r.headers) == headers_for(int(r.value[1:])) for r in everything if r.value)
