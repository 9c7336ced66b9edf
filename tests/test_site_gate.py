"""COLLECTOR_REJECT_UNKNOWN_SITES: the collector answers 400 for sites that do not exist,
learns new sites by NOTIFY within a second, and keeps the good events of a batch."""

import asyncio
import time
import uuid

import asyncpg

from conftest import running_collector
from pipeline.settings import CollectorSettings, PostgresSettings


async def test_unknown_sites_are_refused_at_the_collector(topics, pipeline_db):
    dsn, site = pipeline_db
    new_site = str(uuid.uuid4())
    settings = CollectorSettings(reject_unknown_sites=True)
    async with running_collector(topics, settings, PostgresSettings(database_url=dsn)) as http:
        deadline = time.monotonic() + 10
        while (r := await http.get("/t.gif", params={"site_id": new_site})).status != 400:
            assert time.monotonic() < deadline, "the site list never loaded"
            await asyncio.sleep(0.1)
        body = await r.json()
        assert body["field"] == "site_id" and body["reason"] == "unknown_site"
        assert (await http.get("/t.gif", params={"site_id": site})).status == 200

        r = await http.post("/collect", json={"batch": [{"site_id": site}, {"site_id": new_site}]})
        assert r.status == 200
        report = await r.json()
        assert report["accepted"] == 1 and report["rejected"][0]["index"] == 1

        conn = await asyncpg.connect(dsn)
        await conn.execute("INSERT INTO public.sites (id, name) VALUES ($1, 'new')", new_site)
        await asyncio.sleep(1.0)
        assert (await http.get("/t.gif", params={"site_id": new_site})).status == 200
        await conn.execute("DELETE FROM public.sites WHERE id = $1", new_site)
        await conn.close()
        await asyncio.sleep(1.0)
        assert (await http.get("/t.gif", params={"site_id": new_site})).status == 400
