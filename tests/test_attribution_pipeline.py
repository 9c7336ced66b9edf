"""Attribution in the running worker, against real Kafka and PostgreSQL: identify
back-fill, cache invalidation by NOTIFY, unknown sites, stale experiments, campaigns,
and the participants job."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import orjson
import pytest
import uuid_utils
from aiokafka import AIOKafkaProducer

from conftest import running_worker as worker
from conftest import wait_for_count


def envelope(site: str, visitor: str, t_ms: int | None = None, **event) -> bytes:
    received = int(time.time() * 1000)
    return orjson.dumps({
        # A dated event gets a v4 id: a v7 id's own time would win over client_ts.
        "v": 1, "id": str(uuid.uuid4() if t_ms else uuid_utils.uuid7()), "received_at": received, "ip": "81.2.69.142", "ua": "curl/8",
        "hints": {"accept-language": "es-ES,es;q=0.9"}, "source": "beacon",
        "event": {"site_id": site, "visitor_id": visitor, "event_type": "pageview",
                  **({"client_ts": t_ms} if t_ms else {}), **event},
    })


async def send(kafka, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for v in values:
            await producer.send_and_wait(kafka.events_topic, v, key=b"same-partition")
    finally:
        await producer.stop()


async def rows(dsn: str, sql: str, *args) -> list:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def execute(dsn: str, sql: str, *args) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


@pytest.fixture
async def refdata(pipeline_db):
    """A site with a lead (in segment A), segments A and B, and experiments."""
    dsn, site = pipeline_db
    ids = {k: str(uuid.uuid4()) for k in ("seg_a", "seg_b", "seg_es", "lead", "exp", "exp_old", "campaign")}
    conn = await asyncpg.connect(dsn)
    try:
        for key, name, extra in (("seg_a", "A", {}), ("seg_b", "B", {}),
                                 ("seg_es", "Spanish blog", {"url": "/blog", "language": "es"})):
            await conn.execute(
                "INSERT INTO public.segments (id, site_id, name, is_active, url, language) "
                "VALUES ($1, $2, $3, true, $4, $5::segment_language)",
                ids[key], site, name, extra.get("url"), extra.get("language"))
        await conn.execute("INSERT INTO public.leads (id, site_id, email, segment_id) VALUES ($1, $2, $3, $4)",
                           ids["lead"], site, "Ana@Example.com", ids["seg_a"])
        await conn.execute(
            "INSERT INTO public.experiments (id, site_id, name, status, start_date, end_date) VALUES "
            "($1, $4, 'Checkout', 'running', now() - interval '1 day', NULL), "
            "($2, $4, 'Old test', 'completed', now() - interval '9 days', now() - interval '2 days'), "
            "($3, $4, 'Black Friday', 'active', now() - interval '1 day', NULL)",
            ids["exp"], ids["exp_old"], ids["campaign"], site)
        await conn.execute("INSERT INTO public.experiment_segments (experiment_id, segment_id) VALUES ($1, $2)",
                           ids["exp"], ids["seg_es"])
    finally:
        await conn.close()
    return dsn, site, ids


async def test_identify_backfills_earlier_anonymous_events(topics, refdata):
    dsn, site, ids = refdata
    now = int(time.time() * 1000)
    await send(topics,
               envelope(site, "v1", now - 3 * 86_400_000),  # older than LEAD_BACKFILL_DAYS=2: stays anonymous
               envelope(site, "v1", now - 86_400_000),
               envelope(site, "v1", now - 60_000),
               envelope(site, "v2", now - 60_000))  # another visitor: untouched
    async with worker(topics, dsn, lead_backfill_days=2):
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 4) == 4
        await send(topics, envelope(site, "v1", event_type="identify", custom_data={"email": "ana@example.COM"}),
                   envelope(site, "v1"))
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 6) == 6
    got = await rows(dsn, "SELECT visitor_id, event_type, lead_id::text, segment_id::text, created_at "
                          "FROM visitor_events ORDER BY visitor_id, created_at")
    v1 = [r for r in got if r["visitor_id"] == "v1"]
    assert [r["lead_id"] for r in v1] == [None, ids["lead"], ids["lead"], ids["lead"], ids["lead"]]
    assert v1[-1]["segment_id"] == ids["seg_a"]  # the lead's segment
    assert [r["lead_id"] for r in got if r["visitor_id"] == "v2"] == [None]
    # Idempotent: identifying again changes nothing.
    async with worker(topics, dsn, lead_backfill_days=2):
        await send(topics, envelope(site, "v1", event_type="identify", lead_id=ids["lead"]))
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 7) == 7
    assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events WHERE lead_id IS NULL", 2) == 2


async def test_reference_changes_reach_the_worker_within_a_second(topics, refdata):
    dsn, site, ids = refdata
    new_site = str(uuid.uuid4())
    async with worker(topics, dsn) as w:
        await send(topics, envelope(site, "v1", lead_id=ids["lead"]), envelope(new_site, "v9"))
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 1) == 1
        assert (await rows(dsn, "SELECT segment_id::text FROM visitor_events"))[0]["segment_id"] == ids["seg_a"]
        # The lead moves to segment B; a new site appears (it was cached as unknown).
        await execute(dsn, "UPDATE public.leads SET segment_id = $1 WHERE id = $2", ids["seg_b"], ids["lead"])
        await execute(dsn, "INSERT INTO public.sites (id, name) VALUES ($1, 'new')", new_site)
        await asyncio.sleep(1.0)
        await send(topics, envelope(site, "v1"), envelope(new_site, "v9"))
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 3) == 3
        hits = w.refs.hits["site"] + w.refs.hits["lead"]
    got = await rows(dsn, "SELECT site_id::text, segment_id::text FROM visitor_events ORDER BY created_at")
    assert got[1]["segment_id"] == ids["seg_b"]
    assert any(r["site_id"] == new_site for r in got)
    assert hits > 0  # the cache served the repeated lookups


async def test_experiments_campaigns_segments_rules_and_participants(topics, refdata):
    dsn, site, ids = refdata
    await send(
        topics,
        envelope(site, "v1", experiment_id=ids["exp"], custom_data={"variant": "B"},
                 page_url="https://shop.example/blog/hola"),
        envelope(site, "v1", page_url="https://shop.example/blog/adios"),  # sticky experiment
        envelope(site, "v2", experiment_id=ids["exp_old"], page_url="https://shop.example/shop"),  # stale
        envelope(site, "v3", page_url="https://shop.example/?utm_campaign=black+friday&utm_source=mail"),
        envelope(site, "v4", campaign_id=str(uuid.uuid4())),  # not an experiment of the site: dropped
    )
    async with worker(topics, dsn) as w:
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 5) == 5
        dropped = {k[0]: v for k, v in w.metrics.attribution_dropped._metrics.items()}
    got = {r["visitor_id"]: r for r in await rows(
        dsn, "SELECT DISTINCT ON (visitor_id) visitor_id, experiment_id::text, campaign_id::text, "
             "segment_id::text, custom_data FROM visitor_events ORDER BY visitor_id, created_at")}
    assert got["v1"]["experiment_id"] == ids["exp"] and got["v1"]["segment_id"] == ids["seg_es"]
    assert orjson.loads(got["v1"]["custom_data"])["$variant"] == "B"
    assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events WHERE visitor_id = 'v1' "
                                     "AND experiment_id IS NOT NULL", 2) == 2
    assert got["v2"]["experiment_id"] is None and got["v2"]["segment_id"] is None
    assert got["v3"]["campaign_id"] == ids["campaign"]
    assert orjson.loads(got["v3"]["custom_data"])["$utm_source"] == "mail"
    assert got["v4"]["campaign_id"] is None
    # Counted when processed (a batch re-read after a rebalance counts again).
    assert dropped["experiment"]._value.get() >= 1 and dropped["campaign"]._value.get() >= 1

    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT pipeline.recompute_experiment_participants()") == 1
        assert await conn.fetchval("SELECT participants FROM public.experiment_segments") == 1
        assert await conn.fetchval("SELECT pipeline.recompute_experiment_participants()") == 0  # idempotent
    finally:
        await conn.close()
