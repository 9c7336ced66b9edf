"""The collector while the real broker is stopped and started again: 503 with
Retry-After (never a silent drop), /readyz says so, and every event it acknowledged
before, during or after the outage is in the topic."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from conftest import create_topics, read_topic
from ingest.app import create_app
from pipeline import settings as cfg
from pipeline.settings import CollectorSettings, KafkaSettings

SITE = "00000000-0000-4000-8000-0000000000cc"


@pytest.mark.timeout(300)
async def test_kafka_stopped_gives_503_and_loses_nothing_acknowledged():
    if "TEST_KAFKA_BOOTSTRAP" in os.environ:
        pytest.skip("needs the stack's own broker, which this test stops and starts")
    from pipeline.stack import Kafka

    broker = Kafka(cfg.load(cfg.StackSettings), cfg.load(cfg.KafkaSettings))
    topic = f"test-outage-{uuid.uuid4().hex[:8]}"
    await create_topics(broker.bootstrap, topic)
    kafka = KafkaSettings(bootstrap=broker.bootstrap, events_topic=topic)
    server = TestServer(create_app(CollectorSettings(publish_timeout_s=2, retry_after_s=3), kafka))
    await server.start_server()
    acked: set[str] = set()
    statuses: list[int] = []

    async def send(http: aiohttp.ClientSession, n: int = 5) -> aiohttp.ClientResponse:
        events = [{"site_id": SITE, "visitor_id": f"v{i}", "event_id": str(uuid.uuid4())} for i in range(n)]
        r = await http.post("/collect", data=orjson.dumps({"batch": events}),
                            headers={"Content-Type": "application/json"})
        statuses.append(r.status)
        if r.status == 204:
            acked.update(e["event_id"] for e in events)
        return r

    try:
        async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as http:
            for _ in range(4):
                assert (await send(http)).status == 204

            await asyncio.to_thread(broker.down)
            try:
                deadline = time.monotonic() + 60
                while True:
                    r = await send(http)
                    if r.status == 503:
                        break
                    assert r.status == 204, await r.text()  # acknowledged: must survive
                    assert time.monotonic() < deadline, "no 503 while Kafka was down"
                assert r.headers["Retry-After"] == "3"
                assert "error" in orjson.loads(await r.read())
                assert (await http.get("/readyz")).status == 503
                for _ in range(3):  # it keeps saying so, it does not pretend
                    assert (await send(http)).status == 503
            finally:
                await asyncio.to_thread(broker.up)

            deadline = time.monotonic() + 90
            while (await send(http)).status != 204:
                assert time.monotonic() < deadline, f"collector did not recover: {statuses[-5:]}"
                await asyncio.sleep(0.5)
            for _ in range(4):
                assert (await send(http)).status == 204
            assert (await http.get("/readyz")).status == 200
    finally:
        await server.close()

    records = await read_topic(broker.bootstrap, topic, len(acked), timeout=60)
    in_topic = {orjson.loads(r.value)["id"] for r in records}
    assert acked <= in_topic, f"{len(acked - in_topic)} acknowledged events lost"
    assert 503 in statuses and statuses.count(204) >= 9
