"""What attribution costs, and how well the reference cache hits.

1. CPU: per-event time of the worker's pure stages (decode, enrich, attribute,
   sessionize, row) for a realistic stream, and of the attribution step alone, measured
   in the same run. Target: attribution adds < 10% to the per-event CPU time.
2. Cache: the worker's RefCache over the same stream against a real PostgreSQL holding
   100 sites (5 segments, 3 experiments, 200 leads each): hit rate per batch of 5,000.

    .venv/bin/python benchmarks/attribution.py [--events 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import orjson  # noqa: E402
import uuid_utils  # noqa: E402

from pipeline import settings as cfg  # noqa: E402

UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1",
]
PAGES = ["/", "/blog/a", "/blog/b", "/shop/shoes", "/pricing", "/es/blog/hola"]


async def seed(dsn: str, sites: int) -> dict:
    conn = await asyncpg.connect(dsn)
    data = {"sites": [], "leads": {}, "exps": {}}
    try:
        owner = str(uuid.uuid4())
        await conn.execute("INSERT INTO auth.users (id) VALUES ($1)", owner)
        for _ in range(sites):
            site = str(uuid.uuid4())
            data["sites"].append(site)
            await conn.execute("INSERT INTO public.sites (id, name, user_id) VALUES ($1, 's', $2)", site, owner)
            for i, url in enumerate(("/blog", "/shop", "/pricing", "/es", None)):
                await conn.execute(
                    "INSERT INTO public.segments (site_id, name, is_active, url, keywords) VALUES ($1, $2, true, $3, $4)",
                    site, f"seg{i}", url, orjson.dumps(["shoes"] if url is None else []).decode())
            exps = [str(uuid.uuid4()) for _ in range(3)]
            data["exps"][site] = exps
            for e in exps:
                await conn.execute("INSERT INTO public.experiments (id, site_id, name, status, start_date) "
                                   "VALUES ($1, $2, $3, 'running', now() - interval '1 day')", e, site, f"exp {e[:4]}")
            leads = [str(uuid.uuid4()) for _ in range(200)]
            data["leads"][site] = leads
            await conn.executemany("INSERT INTO public.leads (id, site_id, email) VALUES ($1, $2, $3)",
                                   [(lead, site, f"{lead[:8]}@example.com") for lead in leads])
    finally:
        await conn.close()
    return data


def stream(data: dict, n: int) -> list[bytes]:
    now = int(time.time() * 1000)
    sites = data["sites"]
    weights = [1 / (i + 1) for i in range(len(sites))]  # a few big sites, many small ones
    out = []
    for i in range(n):
        site = random.choices(sites, weights)[0]
        event = {"site_id": site, "event_type": "pageview", "visitor_id": f"v{random.randrange(20000)}",
                 "page_url": "https://shop.example" + random.choice(PAGES) + "?utm_campaign=x&utm_source=y"}
        r = random.random()
        if r < 0.05:
            event["lead_id"] = random.choice(data["leads"][site])
        elif r < 0.08:
            event["event_type"] = "identify"
            event["custom_data"] = {"email": random.choice(data["leads"][site])[:8] + "@example.com"}
        elif r < 0.2:
            event["experiment_id"] = random.choice(data["exps"][site])
        out.append(orjson.dumps({"v": 1, "id": str(uuid_utils.uuid7()), "received_at": now, "ip": "81.2.69.142",
                                 "ua": random.choice(UAS), "hints": {"accept-language": "es"}, "source": "beacon",
                                 "event": event}))
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--sites", type=int, default=100)
    args = ap.parse_args()

    from pipeline.refdata import RefCache
    from pipeline.stack import Postgres
    from processors import attribution as attr
    from processors import enrich as enrich_mod
    from processors.enrich import Enricher

    empty = attr.Attribution(None, None, None, None, None, {}, (), None)

    def stub(_event, _refs, _lookup, visitor, _t, _lang):
        return empty, visitor

    real = attr.attribute
    from schemas.migrate import apply_migrations

    postgres = Postgres(cfg.load(cfg.StackSettings), cfg.load(cfg.PostgresSettings))
    await asyncio.to_thread(postgres.up)
    name = f"bench_attr_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres.admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = postgres.admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        conn = await asyncpg.connect(dsn)
        await apply_migrations(conn)
        await conn.close()
        data = await seed(dsn, args.sites)
        values = stream(data, args.events)
        enricher = Enricher.from_settings(cfg.EnrichSettings(), cfg.WorkerSettings())
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        cache = RefCache(pool, dsn)
        await cache.listen()

        total_cpu = attr_cpu = 0.0
        batches = [values[i:i + 5000] for i in range(0, len(values), 5000)]
        print("batch  cache hit rate by kind (distinct keys per batch)")
        for k, batch in enumerate(batches):
            h0, m0 = dict(cache.hits), dict(cache.misses)
            decoded, _ = enricher.decode(batch)
            refs = await cache.snapshot(enricher.needs(decoded, {}))
            rates = "  ".join(f"{kind} {_rate(cache.hits[kind] - h0[kind], cache.misses[kind] - m0[kind])}"
                              for kind in cache.hits)
            print(f"{k + 1:>5}  {rates}")
            # The same batch with attribution and with it replaced by a stub returning an
            # empty result (the difference is what attribution costs); warmed up first, then
            # alternating which goes first, so caches favour neither.
            for rnd in range(3):
                for with_attribution in ((True, False) if rnd % 2 else (False, True)):
                    if not with_attribution:
                        enrich_mod.attr.attribute = stub
                    try:
                        t = time.process_time()
                        decoded, _ = enricher.decode(batch)
                        enricher.build(decoded, {}, refs)
                        spent = time.process_time() - t
                    finally:
                        enrich_mod.attr.attribute = real
                    if rnd:
                        if with_attribution:
                            total_cpu += spent
                        else:
                            attr_cpu += spent
        n = 2 * len(values)
        with_attr, without = total_cpu / n * 1e6, attr_cpu / n * 1e6
        print(f"\nper event, all pure stages: {with_attr:.1f} us with attribution, {without:.1f} us without "
              f"-> attribution adds {with_attr / without - 1:.1%} (target < 10%)")
        print("cache hit rate over the run: " + ", ".join(
            f"{kind} {_rate(cache.hits[kind], cache.misses[kind])} ({cache.hits[kind]} of "
            f"{cache.hits[kind] + cache.misses[kind]} distinct keys per batch)" for kind in cache.hits))
        await cache.close()
        await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return 0


def _rate(hits: int, misses: int) -> str:
    return f"{hits / (hits + misses):6.1%}" if hits + misses else "     -"


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
