"""Stream worker end to end, in process: collector -> real Kafka -> worker -> real PostgreSQL.

Crash, rebalance and outage tests (separate processes) are in test_worker_faults.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid

import aiohttp
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from conftest import read_topic, running_collector, running_worker, wait_for_count
from pipeline import dlq
from pipeline.settings import CollectorSettings, KafkaSettings

IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
          "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1")
DESKTOP = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           "Chrome/131.0.0.0 Safari/537.36")


def collector(kafka: KafkaSettings):
    return running_collector(kafka, CollectorSettings(trusted_proxies=[ipaddress.ip_network("127.0.0.1/32")]))


worker = running_worker


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def fetch(dsn: str, sql: str, *args):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def test_pixel_and_beacon_become_enriched_rows(topics, pipeline_db):
    dsn, site = pipeline_db
    async with collector(topics) as http, worker(topics, dsn):
        r = await http.get("/t.gif", params={"site_id": site, "visitor_id": "v-london",
                                              "page_url": "https://shop.example/?utm_source=news"},
                           headers={"X-Forwarded-For": "81.2.69.142", "User-Agent": IPHONE,
                                    "Accept-Language": "en-GB,en;q=0.8"})
        assert r.status == 200
        r = await http.post("/collect", data=orjson.dumps({"batch": [
            {"site_id": site, "visitor_id": "v-london", "event_type": "click", "page_url": "https://shop.example/a",
             "referrer_url": "https://shop.example/", "custom_data": {"button": "buy"}},
            {"site_id": site, "visitor_id": "v-london", "event_type": "duration", "duration_seconds": 42,
             "session_id": "client-s1"},
        ]}), headers={"Content-Type": "text/plain", "X-Forwarded-For": "81.2.69.142", "User-Agent": IPHONE})
        assert r.status == 204
        r = await http.get("/t.gif", params={"site_id": site, "visitor_id": "v-desk"},
                           headers={"X-Forwarded-For": "2001:db8:1234:5678::1", "User-Agent": DESKTOP})
        assert r.status == 200
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 4) == 4

    rows = {(r["visitor_id"], r["event_type"]): r for r in await fetch(dsn, "SELECT * FROM visitor_events")}
    pv = rows[("v-london", "pageview")]
    assert (pv["country"], pv["region"], pv["city"]) == ("GB", "England", "London")
    loc = orjson.loads(pv["location"])
    assert loc["latitude"] == pytest.approx(51.5142) and loc["time_zone"] == "Europe/London"
    assert pv["ip_address"] == "81.2.69.0"  # anonymised by default
    assert pv["device_type"] == "mobile"
    custom = orjson.loads(pv["custom_data"])
    assert custom["$browser"]["family"].startswith("Mobile Safari") and custom["$lang"] == "en-gb"
    assert str(pv["site_id"]) == site and pv["user_agent"] == IPHONE
    assert pv["user_id"] is not None  # the site's owner
    # One visitor, one session: internal navigation does not split it.
    london = [r for k, r in rows.items() if k[0] == "v-london"]
    assert len({r["session_id"] for r in london}) == 1
    assert str(uuid.UUID(pv["session_id"])) == pv["session_id"]
    click = rows[("v-london", "click")]
    assert orjson.loads(click["custom_data"])["button"] == "buy"
    duration = rows[("v-london", "duration")]
    assert duration["duration_seconds"] == 42
    assert orjson.loads(duration["custom_data"])["$client_session_id"] == "client-s1"
    desk = rows[("v-desk", "pageview")]
    assert desk["device_type"] == "desktop" and desk["ip_address"] == "2001:db8:1234::"
    assert desk["country"] is None and desk["location"] is None  # documentation range: unknown
    # created_at is the event id's UUIDv7 time.
    for r in rows.values():
        assert r["id"].version == 7
        assert abs(int(r["id"].hex[:12], 16) - r["created_at"].timestamp() * 1000) < 1


async def test_do_not_track_and_gpc_keep_no_ip_and_only_the_country(topics, pipeline_db):
    dsn, site = pipeline_db
    async with collector(topics) as http, worker(topics, dsn):
        for visitor, extra in (("v-dnt", {"DNT": "1"}), ("v-gpc", {"Sec-GPC": "1"}),
                               ("v-plain", {}), ("v-dnt0", {"DNT": "0"})):
            r = await http.get("/t.gif", params={"site_id": site, "visitor_id": visitor},
                               headers={"X-Forwarded-For": "81.2.69.142", "User-Agent": DESKTOP, **extra})
            assert r.status == 200
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 4) == 4
    rows = {r["visitor_id"]: r for r in await fetch(
        dsn, "SELECT visitor_id, ip_address, country, region, city, location FROM visitor_events")}
    for private in ("v-dnt", "v-gpc"):
        assert tuple(rows[private].values())[1:] == (None, "GB", None, None, None), private
    for plain in ("v-plain", "v-dnt0"):  # DNT: 0 is no request not to track
        assert tuple(rows[plain].values())[1:4] == ("81.2.69.0", "GB", "England"), plain
        assert rows[plain]["city"] == "London" and rows[plain]["location"] is not None


async def test_client_retry_with_same_event_id_is_stored_once(topics, pipeline_db):
    dsn, site = pipeline_db
    ids = [str(uuid.uuid4()) for _ in range(5)]
    batch = {"batch": [{"site_id": site, "visitor_id": "v-retry", "event_id": i, "client_ts": 1795700000000 + n}
                       for n, i in enumerate(ids)]}
    async with collector(topics) as http, worker(topics, dsn):
        for _ in range(3):  # the snippet retries after a lost answer
            r = await http.post("/collect", json=batch)
            assert r.status == 204
        await read_topic(topics.bootstrap, topics.events_topic, 15)
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 5) == 5
        await asyncio.sleep(1.0)  # let the two retries' batches be processed too
    rows = await fetch(dsn, "SELECT id::text AS id, count(*) AS n FROM visitor_events GROUP BY 1")
    assert sorted(r["id"] for r in rows) == sorted(ids) and all(r["n"] == 1 for r in rows)


async def test_poison_messages_are_dead_lettered_neighbours_stored_and_replay_works(topics, pipeline_db):
    dsn, site = pipeline_db
    other_site = str(uuid.uuid4())
    good = {"site_id": site, "visitor_id": "v-ok"}

    def envelope(event: dict, ua: str | None = "curl/8") -> bytes:
        return orjson.dumps({"v": 1, "id": str(uuid.uuid4()), "received_at": 1795716000000, "ip": "81.2.69.142",
                             "ua": ua, "hints": {}, "source": "beacon", "event": {"event_type": "pageview", **event}})

    # A rule of the database's that validation does not know: only the sink meets it.
    conn = await asyncpg.connect(dsn)
    await conn.execute("ALTER TABLE visitor_events ADD CONSTRAINT no_evil CHECK (event_type <> 'evil')")
    await conn.close()
    poison = [
        (b"\x00\xff not json", "decode_error"),
        (orjson.dumps({"v": 99}), "invalid_envelope"),
        (envelope({"site_id": site, "visitor_id": "v-bad", "page_url": "a\u0000b"}), "invalid_envelope"),
        (envelope({"site_id": site, "visitor_id": "v-evil", "event_type": "evil"}), "store_failed"),
        (envelope({"site_id": other_site, "visitor_id": "v-nosite"}), "unknown_site"),
        # A lone surrogate (valid JSON escape, not encodable as UTF-8 text).
        (envelope({**good, "event_type": "surrogate"}, ua="UA").replace(b'"ua":"UA"', b'"ua":"x\\udc80y"'),
         "decode_error"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=topics.bootstrap, acks="all")
    await producer.start()
    try:
        for n in range(3):
            await producer.send_and_wait(topics.events_topic, envelope({**good, "event_type": f"ok{n}"}), key=b"k")
        for value, _ in poison:
            await producer.send_and_wait(topics.events_topic, value, key=b"k")
        for n in range(3, 6):
            await producer.send_and_wait(topics.events_topic, envelope({**good, "event_type": f"ok{n}"}), key=b"k")
    finally:
        await producer.stop()

    async with worker(topics, dsn):
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 6) == 6
        letters = await read_topic(topics.bootstrap, topics.dlq_topic, len(poison))
    # Dead letters are at least once (a batch re-read after a rebalance publishes again):
    # one per source record is what counts.
    docs = list({(d["source"]["partition"], d["source"]["offset"]): d
                 for d in (orjson.loads(r.value) for r in letters)}.values())
    assert sorted(d["reason"] for d in docs) == sorted(reason for _, reason in poison)
    offsets = sorted(d["source"]["offset"] for d in docs)
    assert offsets == [3, 4, 5, 6, 7, 8]  # their place in the partition, for inspection
    assert all(d["source"]["topic"] == topics.events_topic for d in docs)
    evil = next(d for d in docs if d["reason"] == "store_failed")
    assert "23514" in evil["detail"] and "no_evil" in evil["detail"]  # check violation, named
    binary = next(d for d in docs if d["source"]["offset"] == 3)
    assert dlq.original_value(binary) == b"\x00\xff not json"

    # The fixes: the rule is dropped, the site created. Replay re-feeds those dead letters.
    conn = await asyncpg.connect(dsn)
    await conn.execute("ALTER TABLE visitor_events DROP CONSTRAINT no_evil")
    await conn.execute("INSERT INTO public.sites (id, name) VALUES ($1, 'late site')", other_site)
    await conn.close()
    counts = await dlq.replay(topics, reasons={"store_failed", "unknown_site"})
    replayable = sum(orjson.loads(r.value)["reason"] in ("store_failed", "unknown_site") for r in letters)
    assert replayable >= 2
    assert counts == {"seen": len(letters), "replayed": replayable, "skipped": len(letters) - replayable}
    async with worker(topics, dsn):
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 8) == 8
        rows = await fetch(dsn, "SELECT visitor_id, site_id::text FROM visitor_events "
                                "WHERE visitor_id IN ('v-evil', 'v-nosite') ORDER BY 1")
        assert [(r["visitor_id"], r["site_id"]) for r in rows] == [("v-evil", site), ("v-nosite", other_site)]
    # Replaying again stores nothing twice.
    await dlq.replay(topics, reasons={"store_failed", "unknown_site"})
    async with worker(topics, dsn):
        await asyncio.sleep(2)
    assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 8, 1) == 8


async def test_offsets_and_sessions_are_stored_with_the_rows(topics, pipeline_db):
    dsn, site = pipeline_db
    async with collector(topics) as http:
        for n in range(10):
            r = await http.get("/t.gif", params={"site_id": site, "visitor_id": f"v{n % 3}"})
            assert r.status == 200
    port = _free_port()
    async with worker(topics, dsn, metrics_port=port):
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 10) == 10
        assert await wait_for_count(dsn, "SELECT count(*) FROM pipeline.visitor_sessions", 3) == 3
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    # Reads may repeat (a rebalance while joining re-reads uncommitted records); stores do not.
    assert metrics["worker_events_consumed_total"] >= 10
    assert metrics["worker_events_stored_total"] == 10
    assert metrics["worker_partitions_assigned"] == 6
    assert metrics["worker_end_to_end_seconds_count"] == 10
    assert metrics["worker_sink_write_seconds_count"] >= 1
    assert sum(v for k, v in metrics.items() if k.startswith("worker_consumer_lag")) == 0
    offsets = await fetch(dsn, "SELECT partition, next_offset, epoch FROM pipeline.consumer_offsets "
                               "WHERE topic = $1", topics.events_topic)
    assert sum(max(r["next_offset"], 0) for r in offsets) == 10
    assert len(offsets) == 6 and all(r["epoch"] >= 1 for r in offsets)
    # A restarted worker resumes from the stored offsets: nothing is stored twice.
    async with worker(topics, dsn):
        await asyncio.sleep(2)
    assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 10, 1) == 10


async def test_upkeep_makes_partitions_ahead_and_forgets_idle_anonymous_visitors(topics, pipeline_db):
    dsn, site = pipeline_db
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO pipeline.visitor_sessions (site_id, visitor_id, state, updated_at) VALUES "
            "($1, 'idle', '{}', now() - interval '9 days'), "
            "($1, 'idle-lead', $2, now() - interval '9 days'), "
            "($1, 'recent', '{}', now() - interval '1 day')", site, orjson.dumps({"l": str(uuid.uuid4())}).decode())
        await conn.execute("DROP TABLE pipeline.visitor_events_p" + _day(5))  # a missing day ahead
    finally:
        await conn.close()
    async with worker(topics, dsn, maintenance_interval_s=0.5):
        left = await wait_for_count(dsn, "SELECT count(*) FROM pipeline.visitor_sessions", 2, 10)
    assert left == 2
    kept = {r["visitor_id"] for r in await fetch(dsn, "SELECT visitor_id FROM pipeline.visitor_sessions")}
    assert kept == {"idle-lead", "recent"}
    assert await wait_for_count(dsn, "SELECT count(*) FROM pg_class WHERE relname = $1", 1, 10,
                                "visitor_events_p" + _day(5)) == 1


def _day(ahead: int) -> str:
    import datetime as dt

    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=ahead)).strftime("%Y%m%d")
