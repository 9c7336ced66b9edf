"""Kafka topic administration shared by the stack, the dlq command, tests and benchmarks."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError


class TopicError(RuntimeError):
    pass


async def create_topics(bootstrap: str, topics: dict[str, int], timeout: float = 60.0) -> None:
    """Create topics with the given partition counts (idempotent); retries until the
    broker serves metadata, e.g. right after it started."""
    deadline = time.monotonic() + timeout
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [NewTopic(t, n, 1) for t, n in topics.items() if t not in existing]
            if missing:
                resp = await admin.create_topics(missing)
                # Errors come back as codes, not exceptions; 0 = created.
                for name, code, *_ in resp.topic_errors:
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise TopicError(f"creating topic {name} failed with error code {code}")
            return
        except (KafkaError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TopicError(f"Kafka at {bootstrap} did not accept topics: {exc!r}") from exc
            await asyncio.sleep(0.5)
        finally:
            await admin.close()


async def delete_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


async def topic_partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    """The topic's partitions ([] if it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (info,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if info.get("error_code"):
        return []
    return [TopicPartition(topic, p["partition"]) for p in sorted(info["partitions"], key=lambda p: p["partition"])]


async def topic_size(bootstrap: str, topic: str) -> int:
    """Records in the topic now (sum of end offsets; the topics here are never compacted)."""
    parts = await topic_partitions(bootstrap, topic)
    if not parts:
        return 0
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()
