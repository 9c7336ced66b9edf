"""What attribution costs, and how well the reference cache hits.

1. CPU: per-event time of the worker's pure stages (decode, enrich, attribute,
   sessionize, row) with attribution, and with ``attribute`` replaced by a no-op that
   returns an empty result, on the same batches with the same visitor states and
   reference data. The attribution side also runs the worker's per-batch pass that
   collects the reference keys (``Enricher.needs``), which exists only for attribution.
   Everything else attribution needs (the lead lookup included) happens inside
   ``attribute``, so the no-op side does none of it; what both sides run is the worker's
   own work (decode, event time, language, device, geo, sessions, row) and the use of the
   result (its UTM keys merged into custom_data, the page handed to sessionization).
   Each round runs every batch both ways back to back (alternating which goes first,
   the garbage collector reset before each) and compares the two sides' totals; after a
   warm-up round, the median of the rounds' ratios is the result. Target: < 10%.
2. Cache: the worker's RefCache over the same stream against a real PostgreSQL holding
   100 sites (5 segments, 3 experiments, 200 leads each): hit rate per batch of 5,000.

The stream (``stream``; its actual mix is printed): Zipf-weighted sites, each with its
own host and ~50 pages (Zipf); 70% page views, the rest clicks and custom events with
custom_data, and durations; 12% of page views land with UTM tags (a few campaigns, one
named like an experiment), 4% with an ad click id (new in every round: such URLs never
repeat, so they must miss the URL caches), 3% with another query string;
browser languages en/es/de/fr/pt; a quarter with an external referrer. Visitors: 20,000
per site; one in ten is a known customer (a lead) who sends ``lead_id`` on 30% of
events and identifies by email on 2%; 10% of page views report an experiment and the
visitor's variant. Visitor state (linked lead, sticky variants) carries over from
batch to batch as in the worker.

    .venv/bin/python benchmarks/attribution.py [--events 50000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
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
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 "
    "Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile "
    "Safari/537.36",
]
PAGES = (["/", "/pricing", "/about", "/contact", "/shop", "/es/", "/es/blog/hola", "/es/blog/adios"]
         + [f"/blog/post-{i}" for i in range(16)] + [f"/shop/shoes/item-{i}" for i in range(14)]
         + [f"/docs/page-{i}" for i in range(12)])
PAGE_WEIGHTS = [1 / (i + 1) for i in range(len(PAGES))]
LANGUAGES = ["en-US,en;q=0.9", "es-ES,es;q=0.9", "de-DE,de;q=0.9", "fr-FR,fr;q=0.8", "pt-BR,pt;q=0.8", "en-GB"]
LANGUAGE_WEIGHTS = [45, 20, 10, 10, 5, 10]
REFERRERS = ["https://www.google.com/", "https://www.facebook.com/", "https://news.example/today",
             "https://duckduckgo.com/"]
SOURCES = [("google", "cpc"), ("newsletter", "email"), ("facebook", "social"), ("partner", "referral")]
CAMPAIGNS = ["spring_sale", "brand", "retargeting", "launch"]  # + one named like an experiment
VISITORS = 20_000  # per site
CLICK = "CLICKID0000000000000000000000000"  # stands for an ad click id, unique per event


def fresh_clicks(batch: list[bytes], rng: random.Random) -> list[bytes]:
    """The batch with new click ids: a click id never repeats, so its URL must miss the
    URL caches in every round, as in production (the rest of each event stays the same)."""
    token = CLICK.encode()
    return [v.replace(token, b"%032x" % rng.getrandbits(128)) if token in v else v for v in batch]
LEADS = 200  # per site


async def seed(dsn: str, sites: int) -> dict:
    conn = await asyncpg.connect(dsn)
    data = {"sites": [], "leads": {}, "exps": {}, "exp_names": {}}
    try:
        owner = str(uuid.uuid4())
        await conn.execute("INSERT INTO auth.users (id) VALUES ($1)", owner)
        for _ in range(sites):
            site = str(uuid.uuid4())
            data["sites"].append(site)
            await conn.execute("INSERT INTO public.sites (id, name, user_id) VALUES ($1, 's', $2)", site, owner)
            segments = []
            for i, (url, language, keywords) in enumerate((("/blog", None, []), ("/shop", None, []),
                                                           ("/pricing", None, []), ("/es", "es", []),
                                                           (None, None, ["shoes"]))):
                segments.append(await conn.fetchval(
                    "INSERT INTO public.segments (site_id, name, is_active, url, language, keywords) "
                    "VALUES ($1, $2, true, $3, $4::segment_language, $5) RETURNING id::text",
                    site, f"seg{i}", url, language, orjson.dumps(keywords).decode()))
            exps = [str(uuid.uuid4()) for _ in range(3)]
            data["exps"][site] = exps
            data["exp_names"][site] = f"exp {exps[0][:4]}"
            for e in exps:
                await conn.execute("INSERT INTO public.experiments (id, site_id, name, status, start_date) "
                                   "VALUES ($1, $2, $3, 'running', now() - interval '1 day')", e, site, f"exp {e[:4]}")
            leads = [str(uuid.uuid4()) for _ in range(LEADS)]
            data["leads"][site] = leads
            # A quarter of the leads were put in a segment by hand (it wins over the page's).
            await conn.executemany(
                "INSERT INTO public.leads (id, site_id, email, segment_id) VALUES ($1, $2, $3, $4)",
                [(lead, site, f"{lead[:8]}@example.com", segments[0] if i % 4 == 0 else None)
                 for i, lead in enumerate(leads)])
    finally:
        await conn.close()
    return data


def stream(data: dict, n: int, rng: random.Random) -> tuple[list[bytes], dict[str, int]]:
    """n envelopes as the collector publishes them, and counts of what they carry."""
    now = int(time.time() * 1000)
    sites = data["sites"]
    weights = [1 / (i + 1) for i in range(len(sites))]  # a few big sites, many small ones
    mix = dict.fromkeys(("pageview", "utm", "click id", "other query", "custom_data", "lead_id", "email",
                         "experiment", "campaign_id", "from a known customer"), 0)
    out = []
    for _ in range(n):
        site = rng.choices(sites, weights)[0]
        k = site.rsplit("-", 1)[1][:6]
        v = rng.randrange(VISITORS)
        query = ""
        r = rng.random()
        kind = rng.random()
        event_type = ("pageview" if kind < 0.70 else "click" if kind < 0.85 else "signup_step" if kind < 0.93
                      else "duration")
        if event_type == "pageview":
            if r < 0.12:
                source, medium = rng.choice(SOURCES)
                campaign = rng.choice(CAMPAIGNS + [data["exp_names"][site]])
                query = f"?utm_source={source}&utm_medium={medium}&utm_campaign={campaign.replace(' ', '%20')}"
                mix["utm"] += 1
            elif r < 0.16:
                query = f"?{rng.choice(('gclid', 'fbclid'))}={CLICK}"  # unique: see fresh_clicks
                mix["click id"] += 1
            elif r < 0.19:
                query = rng.choice((f"?q=word{rng.randrange(50)}", f"?page={rng.randrange(2, 9)}"))
                mix["other query"] += 1
        event = {"site_id": site, "event_type": event_type, "visitor_id": f"v{v}",
                 "page_url": f"https://www.site-{k}.example" + rng.choices(PAGES, PAGE_WEIGHTS)[0] + query}
        referrer = rng.random()
        if referrer < 0.25:
            event["referrer_url"] = rng.choice(REFERRERS)
        elif referrer < 0.65:
            event["referrer_url"] = f"https://www.site-{k}.example/"
        if event_type in ("click", "signup_step"):
            event["custom_data"] = ({"element": f"cta-{rng.randrange(5)}"} if event_type == "click"
                                    else {"step": rng.randrange(1, 4)})
        elif event_type == "duration":
            event["duration_seconds"] = rng.randrange(1, 600)
        if v % 10 == 0:  # a known customer
            mix["from a known customer"] += 1
            lead = data["leads"][site][v // 10 % LEADS]
            p = rng.random()
            if p < 0.30:
                event["lead_id"] = lead
            elif p < 0.32:
                event["event_type"] = "identify"
                event["custom_data"] = {"email": f"{lead[:8].upper()}@Example.com "}
        if event_type == "pageview" and rng.random() < 0.10:
            exp = data["exps"][site][v % 3]
            event["experiment_id"] = exp
            event.setdefault("custom_data", {})["variant"] = "AB"[v % 2]
        if rng.random() < 0.005:
            event["campaign_id"] = rng.choice(data["exps"][site])
        mix["pageview"] += event["event_type"] == "pageview"
        mix["custom_data"] += "custom_data" in event
        mix["lead_id"] += "lead_id" in event
        mix["email"] += "email" in event.get("custom_data", {})
        mix["experiment"] += "experiment_id" in event
        mix["campaign_id"] += "campaign_id" in event
        out.append(orjson.dumps({
            "v": 1, "id": str(uuid_utils.uuid7()), "received_at": now, "ip": "81.2.69.142", "ua": rng.choice(UAS),
            "hints": {"accept-language": rng.choices(LANGUAGES, LANGUAGE_WEIGHTS)[0]}, "source": "beacon",
            "event": event}))
    return out, mix


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from pipeline.refdata import RefCache
    from pipeline.stack import Postgres
    from processors import attribution as attr
    from processors import enrich as enrich_mod
    from processors.enrich import Enricher
    from schemas.migrate import apply_migrations

    empty = attr.Attribution(None, None, None, None, None, {}, (), None)

    def noop(_event, _refs, _lookup, visitor, _t, _lang):
        return empty, visitor

    real = attr.attribute
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
        # ``template`` keeps the click-id placeholders, so that every round can give them new
        # ids (see fresh_clicks); ``values`` is the stream as first sent.
        template, mix = stream(data, args.events, random.Random(args.seed))
        values = fresh_clicks(template, random.Random(args.seed))
        print(f"{len(values)} events: " + ", ".join(f"{k} {v / len(values):.1%}" for k, v in mix.items())
              + f"; {len({orjson.loads(v)['event']['page_url'] for v in values})} distinct page URLs")
        enricher = Enricher.from_settings(cfg.EnrichSettings(), cfg.WorkerSettings())
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        cache = RefCache(pool, dsn)
        await cache.listen()

        # The real pipeline once over the stream, as the worker runs it: each batch gets the
        # states of its visitors left by the batches before, and a snapshot of the cache.
        batches = []
        states: dict = {}
        print("batch  cache hit rate by kind (distinct keys per batch)")
        for k in range(0, len(values), 5000):
            batch = values[k:k + 5000]
            h0, m0 = dict(cache.hits), dict(cache.misses)
            decoded, _ = enricher.decode(batch)
            mine = {key: states[key] for key in {enricher.visitor_key(env) for _, env in decoded} if key in states}
            refs = await cache.snapshot(enricher.needs(decoded, mine))
            print(f"{k // 5000 + 1:>5}  " + "  ".join(
                f"{kind} {_rate(cache.hits[kind] - h0[kind], cache.misses[kind] - m0[kind])}" for kind in cache.hits))
            states.update(enricher.build(decoded, mine, refs).states)
            batches.append((template[k:k + 5000], mine, refs))

        def run(batch, mine, refs, with_attribution: bool) -> float:
            gc.collect()  # each run starts from the same collector state
            if not with_attribution:
                enrich_mod.attr.attribute = noop
            try:
                t = time.process_time()
                decoded, _ = enricher.decode(batch)
                if with_attribution:  # the worker collects reference keys only for attribution
                    enricher.needs(decoded, mine)
                enricher.build(decoded, mine, refs)
                return time.process_time() - t
            finally:
                enrich_mod.attr.attribute = real

        # Round 0 warms up (caches of URLs, user agents, pages); batch by batch both ways,
        # alternating which goes first, so that the machine's noise hits both alike.
        totals = {True: [], False: []}
        clicks = random.Random(args.seed + 1)
        for rnd in range(args.rounds + 1):
            spent = {True: 0.0, False: 0.0}
            for i, (batch, mine, refs) in enumerate(batches):
                batch = fresh_clicks(batch, clicks)  # the same for both sides of the pair
                for with_attribution in ((True, False) if (rnd + i) % 2 else (False, True)):
                    spent[with_attribution] += run(batch, mine, refs, with_attribution)
            if rnd:
                for w in spent:
                    totals[w].append(spent[w] / len(values) * 1e6)
        # Each round compares both sides on the same batches at nearly the same moments, so
        # its ratio is the measurement; the median round's is the result.
        ratios = [a / b - 1 for a, b in zip(totals[True], totals[False])]
        with_attr, without = statistics.median(totals[True]), statistics.median(totals[False])
        print(f"\nper event, all pure stages (medians of {args.rounds} rounds): {with_attr:.1f} us with attribution, "
              f"{without:.1f} us without\nattribution adds {statistics.median(ratios):.1%} (median round; "
              f"target < 10%); round by round: {', '.join(f'{r:.1%}' for r in ratios)}")
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
