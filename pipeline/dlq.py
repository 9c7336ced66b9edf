"""Dead letters: inspect and replay.

A dead letter is a JSON document on the DLQ topic:
  reason      decode_error | invalid_envelope | store_failed
  detail      the error, in words
  failed_at   epoch ms
  worker      host:pid of the worker that gave up on it
  source      {topic, partition, offset, timestamp} of the original record
  key         the original record key (text)
  value       the original record value when it is UTF-8 text, else null and
  value_b64   the original bytes, base64

``replay`` re-publishes the original key and value bytes to the events topic. It is
safe to repeat: the sink stores an event id once, and what still fails goes back to
the dead-letter topic.
"""

from __future__ import annotations

import base64
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.settings import KafkaSettings
from pipeline.topics import topic_partitions


def original_value(letter: dict) -> bytes | None:
    if letter.get("value_b64") is not None:
        return base64.b64decode(letter["value_b64"])
    if letter.get("value") is not None:
        return letter["value"].encode()
    return None


async def read_all(kafka: KafkaSettings, topic: str | None = None):
    """Yield every dead letter present now (from the oldest retained to the current end)."""
    topic = topic or kafka.dlq_topic
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await topic_partitions(kafka.bootstrap, topic)
        if not parts:
            return
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        remaining = {tp for tp in parts if ends[tp] > await consumer.position(tp)}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset >= ends[tp]:
                        continue
                    try:
                        letter = orjson.loads(r.value)
                    except orjson.JSONDecodeError:
                        letter = {"reason": "unreadable_dead_letter", "value": None}
                    yield r, letter
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def replay(kafka: KafkaSettings, *, reasons: set[str] | None = None, since_ms: int | None = None,
                 dry_run: bool = False) -> dict[str, int]:
    """Re-publish matching dead letters to the events topic; returns counts."""
    counts = {"seen": 0, "replayed": 0, "skipped": 0}
    producer = None
    if not dry_run:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
    try:
        futures = []
        async for record, letter in read_all(kafka):
            counts["seen"] += 1
            value = original_value(letter)
            if (value is None or (reasons and letter.get("reason") not in reasons)
                    or (since_ms and letter.get("failed_at", 0) < since_ms)):
                counts["skipped"] += 1
                continue
            counts["replayed"] += 1
            if producer is not None:
                futures.append(await producer.send(kafka.events_topic, value, key=record.key))
        for f in futures:
            await f
    finally:
        if producer is not None:
            await producer.stop()
    return counts
