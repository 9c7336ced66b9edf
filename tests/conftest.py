"""Shared fixtures: the real Kafka broker and PostgreSQL server of the local stack.

The test command (deploy/local/test.sh) starts both before pytest runs. For a quick
run against other servers set TEST_KAFKA_BOOTSTRAP and/or TEST_PG_ADMIN_URL.
Every test gets its own topics and databases, so tests never see each other's data.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import asyncpg
import pytest

from pipeline import settings as cfg

_stack = cfg.load(cfg.StackSettings)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return os.environ.get("TEST_KAFKA_BOOTSTRAP", f"127.0.0.1:{_stack.kafka_port}")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return os.environ.get("TEST_PG_ADMIN_URL", f"postgresql://postgres@127.0.0.1:{_stack.pg_port}/postgres")


def _with_db(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
async def empty_database_url(pg_admin_url: str):
    """DSN of a new, empty database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_db(pg_admin_url, name)
    # A new connection: some tests restart the server meanwhile.
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def unique_topic() -> str:
    """A topic name no other test uses (the broker auto-creates it on first produce)."""
    return f"test-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------
# A migrated database with one site, and helpers shared by the pipeline tests


async def seed_site(conn: asyncpg.Connection, time_zone: str | None = None) -> tuple[str, str]:
    """Insert an owner (auth.users) and a site; return (site_id, user_id)."""
    user_id, site_id = str(uuid.uuid4()), str(uuid.uuid4())
    await conn.execute("INSERT INTO auth.users (id) VALUES ($1)", user_id)
    await conn.execute("INSERT INTO public.sites (id, name, url, user_id) VALUES ($1, 'Test site', "
                       "'https://shop.example', $2)", site_id, user_id)
    if time_zone:
        await conn.execute("INSERT INTO pipeline.site_settings (site_id, time_zone) VALUES ($1, $2)",
                           site_id, time_zone)
    return site_id, user_id


@pytest.fixture
async def pipeline_db(empty_database_url: str):
    """(DSN, site_id) of a migrated database holding one site."""
    from schemas.migrate import apply_migrations

    conn = await asyncpg.connect(empty_database_url)
    try:
        await apply_migrations(conn)
        site_id, _ = await seed_site(conn)
    finally:
        await conn.close()
    return empty_database_url, site_id


async def create_topics(bootstrap: str, *topics: str, partitions: int = 6) -> None:
    from pipeline import topics as kafka_topics

    await kafka_topics.create_topics(bootstrap, {t: partitions for t in topics})


async def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list:
    """Every record of ``topic`` from the start, waiting until at least ``expect`` arrived."""
    import asyncio
    import time

    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
        # Anything else already there (to catch duplicates) without waiting long.
        batch = await consumer.getmany(timeout_ms=300)
        for records in batch.values():
            out.extend(records)
    finally:
        await consumer.stop()
    await asyncio.sleep(0)
    return out


async def wait_for_count(dsn: str, sql: str, expected: int, timeout: float = 60.0, *args) -> int:
    """Poll ``sql`` (a count) until it returns ``expected`` or the deadline passes."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            value = await conn.fetchval(sql, *args)
            if value == expected or time.monotonic() > deadline:
                return value
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


# ---------------------------------------------------------------------------
# The pipeline's own components, in this test process


@pytest.fixture
async def topics(kafka_bootstrap):
    """KafkaSettings naming an events topic (6 partitions) and a dead-letter topic of this test's own."""
    from pipeline.settings import KafkaSettings

    events, dead = f"test-ev-{uuid.uuid4().hex[:8]}", f"test-dlq-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, events, partitions=6)
    await create_topics(kafka_bootstrap, dead, partitions=1)
    return KafkaSettings(bootstrap=kafka_bootstrap, events_topic=events, dlq_topic=dead)


@contextlib.asynccontextmanager
async def running_collector(kafka, settings=None, pg=None):
    """The real collector app on a local port; yields an aiohttp session based at it."""
    import aiohttp
    from aiohttp.test_utils import TestServer

    from ingest.app import create_app
    from pipeline.settings import CollectorSettings

    server = TestServer(create_app(settings or CollectorSettings(), kafka, pg))
    await server.start_server()
    try:
        async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as http:
            yield http
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def running_worker(kafka, dsn: str, **overrides):
    """A stream worker in this event loop (its own consumer group per topic)."""
    import asyncio

    from pipeline.settings import EnrichSettings, PostgresSettings, WorkerSettings
    from pipeline.worker import Worker

    settings = WorkerSettings(**{"group_id": f"g-{kafka.events_topic}", "metrics_port": 0, "batch_ms": 100,
                                 **overrides})
    w = Worker(settings, kafka, PostgresSettings(database_url=dsn), EnrichSettings())
    task = asyncio.create_task(w.run())
    try:
        yield w
    finally:
        w.stop_nowait()
        await asyncio.wait_for(task, 30)
