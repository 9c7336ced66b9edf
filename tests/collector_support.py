"""Helpers for the collector tests.

* ``running_collector``: the real app on a real TCP port, in this event loop.
* ``send_events``: POST N events and learn which ones Kafka acknowledged, which were
  refused (503 ...) and which failed in transport. Meant for outage tests: stop the
  broker, send, restart, send, then compare ``acked`` with what ``read_topic`` finds.
* ``read_topic``: everything in a topic up to its current end offsets, decoded.
* ``create_topic``: a topic with a given partition count.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from pipeline.settings import CollectorSettings, KafkaSettings
from pipeline.topics import create_topics, delete_topic  # noqa: F401 (re-exported for the tests)
from schemas.event import Envelope, decode_envelope

from ingest.app import PUBLISHER, create_app
from ingest.publisher import ProducerFactory, Publisher


@dataclass
class RunningCollector:
    app: web.Application
    base_url: str  # http://host:port (ops endpoints live here)
    pixel_url: str
    beacon_url: str

    @property
    def publisher(self) -> Publisher:
        return self.app[PUBLISHER]


@asynccontextmanager
async def running_collector(
    collector: CollectorSettings,
    kafka: KafkaSettings,
    *,
    producer_factory: ProducerFactory | None = None,
) -> AsyncIterator[RunningCollector]:
    """Serve the collector on ``collector.host``/``collector.port`` (port 0: any free one)."""
    app = create_app(collector, kafka, producer_factory=producer_factory)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=collector.shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, collector.host, collector.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        yield RunningCollector(
            app=app,
            base_url=base,
            pixel_url=base + app.router["pixel"].canonical,
            beacon_url=base + app.router["beacon"].canonical,
        )
    finally:
        await runner.cleanup()


@dataclass
class SendReport:
    acked: list[str] = field(default_factory=list)  # event ids answered 2xx: in Kafka
    refused: dict[str, int] = field(default_factory=dict)  # event id -> HTTP status
    failed: dict[str, str] = field(default_factory=dict)  # event id -> transport error
    retry_after: dict[str, str] = field(default_factory=dict)  # event id -> Retry-After of a 503


async def send_events(
    beacon_url: str,
    site_id: str,
    n: int,
    *,
    concurrency: int = 16,
    timeout_s: float = 30.0,
    make_event: Callable[[int, str], dict[str, Any]] | None = None,
) -> SendReport:
    """POST ``n`` single-event beacons, each with its own ``event_id``; report the outcome
    of each. Never raises for HTTP or connection errors: they are what it reports."""
    report = SendReport()
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        event_id = str(uuid.uuid4())
        event = (
            make_event(i, event_id)
            if make_event
            else {"site_id": site_id, "event_id": event_id, "visitor_id": f"v{i}", "event_type": "load_test"}
        )
        event_id = event.get("event_id", event_id)
        async with sem:
            try:
                async with session.post(
                    beacon_url, data=orjson.dumps(event), headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        report.acked.append(event_id)
                    else:
                        report.refused[event_id] = resp.status
                        if "Retry-After" in resp.headers:
                            report.retry_after[event_id] = resp.headers["Retry-After"]
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                report.failed[event_id] = repr(exc)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in range(n)))
    return report


@dataclass
class Received:
    key: bytes | None
    partition: int
    offset: int
    timestamp: int
    envelope: Envelope


async def read_topic(bootstrap: str, topic: str, *, timeout_s: float = 20.0) -> list[Received]:
    """Every record of ``topic`` up to the end offsets as of the call, oldest first per
    partition. Records acknowledged before the call are guaranteed to be included."""
    # No group: a subscription then gets every partition, without any committed offsets.
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} not found")
            await asyncio.sleep(0.02)
        tps = sorted(consumer.assignment())
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Received] = []
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps)):
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(out)} records of {topic}, end offsets not reached")
            batches = await consumer.getmany(*tps, timeout_ms=200)
            for tp, records in batches.items():
                for r in records:
                    if r.offset < ends[tp]:
                        out.append(Received(r.key, r.partition, r.offset, r.timestamp, decode_envelope(r.value)))
    finally:
        await consumer.stop()


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    await create_topics(bootstrap, {topic: partitions})


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus exposition text as {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
