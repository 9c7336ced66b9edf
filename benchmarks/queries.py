"""How fast the analysts' queries (docs/querying.md) are on a large visitor_events.

Creates a scratch database with the full migrations, generates N events (default
10 million) over D days (30) for S sites (100) entirely in SQL, runs the rollup job
(pipeline/rollups.py: everything up to a minute ago, as a worker would after the load;
its time and the rollups' size are printed), then times each documented query for one
site and one week, as an analyst under row-level security (a login role in group
"analyst", mapped to the site's owner) and, for comparison, as the table owner (no
RLS). Prints p50 and p95 per query; --explain also prints each query's EXPLAIN
(ANALYZE, BUFFERS). The database is dropped at the end (--keep keeps it).
--no-rollups skips the job: every query then reads visitor_events, as before rollups.

    .venv/bin/python benchmarks/queries.py [--dsn URL] [--events 10000000] [--days 30] [--sites 100]
                                           [--runs 21] [--explain] [--keep] [--no-rollups]

The data (all generated with generate_series and random(), setseed() for repeatability):
  * traffic per site is Zipf-like (site rank r gets ~ ln((r+1)/r) of it: the largest
    site about 15%, the median one about 0.4%), weekends 25% quieter, 70% of sessions
    between 08:00 and 22:00 UTC;
  * sessions of 1-30 events (geometric, mean 2.5, so 40% bounce), a visitor per
    session drawn from a per-site pool with returning visitors favoured;
  * the first event a page view with an external referrer (65%: search engines and
    social sites, skewed) or none; later ones page views (62%), clicks, durations,
    form_start, form_submit, signup; 300 pages per site, skewed;
  * 30 countries and 5 device types with realistic skew; 3% of sessions belong to a
    lead (200 per site), 30% to one of 3 experiments per site, 25% to a segment, 10%
    to a campaign; user_id is the site's owner (50 owners, 2 sites each).
Rows are inserted in time order, as the pipeline writes them. The load skips foreign-key
checks (session_replication_role = replica, so the DSN must be a superuser's) and builds
the secondary indexes afterwards; the result is the migrated schema, then VACUUM ANALYZE.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import rollups  # noqa: E402
from pipeline import settings as cfg  # noqa: E402
from schemas.migrate import apply_migrations, ensure_partitions  # noqa: E402

OWNERS = 50
LEADS_PER_SITE = 200
EXPERIMENTS_PER_SITE = 3
SEGMENTS_PER_SITE = 5
MEAN_EVENTS_PER_SESSION = 2.5  # geometric with continuation 0.6
FUNNEL = ["pageview", "form_start", "form_submit", "signup"]

# Ids are md5 of a name, so the events can name their references without joins.
REFERENCES_SQL = f"""
INSERT INTO auth.users (id) SELECT md5('owner-' || o)::uuid FROM generate_series(0, {OWNERS} - 1) o;
INSERT INTO public.sites (id, name, url, user_id)
    SELECT md5('site-' || r)::uuid, 'Site ' || r, 'https://site' || r || '.example.com', md5('owner-' || r % {OWNERS})::uuid
    FROM generate_series(1, $1) r;
INSERT INTO public.segments (id, name, site_id, user_id)
    SELECT md5('segment-' || r || '-' || k)::uuid, 'Segment ' || k, md5('site-' || r)::uuid, md5('owner-' || r % {OWNERS})::uuid
    FROM generate_series(1, $1) r, generate_series(0, {SEGMENTS_PER_SITE} - 1) k;
INSERT INTO public.leads (id, name, email, site_id, user_id)
    SELECT md5('lead-' || r || '-' || k)::uuid, 'Lead ' || k, 'lead' || k || '@site' || r || '.example.com',
           md5('site-' || r)::uuid, md5('owner-' || r % {OWNERS})::uuid
    FROM generate_series(1, $1) r, generate_series(0, {LEADS_PER_SITE} - 1) k;
INSERT INTO public.experiments (id, name, status, site_id, user_id)
    SELECT md5('experiment-' || r || '-' || k)::uuid, 'Experiment ' || k, 'running', md5('site-' || r)::uuid,
           md5('owner-' || r % {OWNERS})::uuid
    FROM generate_series(1, $1) r, generate_series(0, {EXPERIMENTS_PER_SITE} - 1) k;
"""

# One day of sessions ($1 day start, $2 sessions, $3 sites, $4 sessions over all days, $5 day number).
# MATERIALIZED CTEs keep each random() drawn once per row.
DAY_SQL = f"""
WITH draws AS MATERIALIZED (
    SELECT g, random() AS r_site, random() AS r_visitor, random() AS r_time, random() AS r_len,
           random() AS r_device, random() AS r_country, random() AS r_ref, random() AS r_page,
           random() AS r_lead, random() AS r_exp, random() AS r_seg, random() AS r_camp
    FROM generate_series(1, $2) g
), sessions AS MATERIALIZED (
    SELECT d.*, a.site_rank,
           'v' || a.site_rank || '-' || floor(d.r_visitor ^ 2 * greatest(20, $4::float8 * 0.55
               * ln((a.site_rank + 1.0) / a.site_rank) / ln($3::int + 1.0)))::int AS visitor_id,
           md5('session-' || $5::int || '-' || d.g)::uuid::text AS session_id,
           $1::timestamptz + make_interval(secs => CASE WHEN d.r_time < 0.7 THEN 28800 + d.r_time / 0.7 * 50400
                                                        ELSE (d.r_time - 0.7) / 0.3 * 86400 END) AS started_at,
           least(30, 1 + floor(ln(1 - d.r_len) / ln(0.6)))::int AS n_events,
           CASE WHEN d.r_device < 0.55 THEN 'desktop' WHEN d.r_device < 0.93 THEN 'mobile'
                WHEN d.r_device < 0.98 THEN 'tablet' WHEN d.r_device < 0.995 THEN 'bot' ELSE 'other' END AS device,
           (ARRAY['US','GB','DE','IN','FR','ES','BR','CA','MX','NL','IT','JP','AU','PL','SE',
                  'AR','CO','TR','ID','KR','BE','CH','AT','PT','IE','DK','NO','FI','ZA','NG'])
               [1 + floor(d.r_country ^ 2.2 * 30)::int] AS country,
           CASE WHEN d.r_ref < 0.35 THEN NULL
                ELSE (ARRAY['https://www.google.com/', 'https://www.google.com/', 'https://www.google.com/',
                            'https://www.bing.com/', 'https://duckduckgo.com/', 'https://www.facebook.com/',
                            'https://t.co/abc', 'https://www.linkedin.com/feed/', 'https://www.reddit.com/r/webdev/',
                            'https://news.ycombinator.com/item?id=1', 'https://www.youtube.com/', 'https://github.com/',
                            'https://newsletter.example.net/issue/42'])
                     [1 + floor(((d.r_ref - 0.35) / 0.65) ^ 1.5 * 13)::int] END AS referrer
    FROM draws d
    CROSS JOIN LATERAL (SELECT floor(exp(d.r_site * ln($3::int + 1.0)))::int AS site_rank) a
), events AS MATERIALIZED (
    SELECT s.*, k, random() AS r_type, random() AS r_page2, random() AS r_gap, md5(random()::text) AS rnd
    FROM sessions s CROSS JOIN LATERAL generate_series(1, s.n_events) k
), shaped AS (
    SELECT e.*,
           e.started_at + make_interval(secs => (e.k - 1) * 40 + e.r_gap * 30) AS at,
           CASE WHEN e.k = 1 OR e.r_type < 0.62 THEN 'pageview' WHEN e.r_type < 0.84 THEN 'click'
                WHEN e.r_type < 0.92 THEN 'duration' WHEN e.r_type < 0.96 THEN 'form_start'
                WHEN e.r_type < 0.985 THEN 'form_submit' ELSE 'signup' END AS event_type,
           floor((CASE WHEN e.k = 1 THEN e.r_page ELSE e.r_page2 END) ^ 3 * 300)::int AS page
    FROM events e
)
INSERT INTO public.visitor_events (id, event_type, page_url, referrer_url, visitor_id, session_id, ip_address,
    user_agent, device_type, country, region, city, duration_seconds, custom_data, lead_id, segment_id,
    experiment_id, site_id, user_id, created_at, updated_at, location, campaign_id)
SELECT
    -- a UUIDv7 of the event time, like the pipeline's ids
    (lpad(to_hex((extract(epoch FROM x.at) * 1000)::bigint), 12, '0') || '7' || substr(x.rnd, 1, 3) || '8'
        || substr(x.rnd, 4, 15))::uuid,
    x.event_type,
    'https://site' || x.site_rank || '.example.com'
        || CASE WHEN x.page < 6 THEN (ARRAY['/', '/pricing', '/features', '/about', '/contact', '/signup'])[x.page + 1]
                ELSE '/blog/post-' || x.page END
        || CASE WHEN x.k = 1 AND x.r_camp < 0.1 THEN '?utm_source=newsletter&utm_campaign=c' || x.site_rank ELSE '' END,
    CASE WHEN x.k = 1 THEN x.referrer ELSE 'https://site' || x.site_rank || '.example.com/' END,
    x.visitor_id, x.session_id,
    '198.51.' || floor(x.r_country * 255)::int || '.0',
    CASE x.device WHEN 'desktop' THEN 'Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36'
                  WHEN 'mobile' THEN 'Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148'
                  WHEN 'tablet' THEN 'Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148'
                  WHEN 'bot' THEN 'Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)'
                  ELSE 'Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/4.0' END,
    x.device, x.country, NULL, NULL,
    CASE WHEN x.event_type = 'duration' THEN floor(x.r_gap * 300)::int END,
    jsonb_build_object('$browser', jsonb_build_object('family', CASE x.device WHEN 'desktop' THEN 'Chrome' ELSE 'Safari' END)),
    CASE WHEN x.r_lead < 0.03 THEN md5('lead-' || x.site_rank || '-' || floor(x.r_lead / 0.03 * {LEADS_PER_SITE})::int)::uuid END,
    CASE WHEN x.r_seg < 0.25 THEN md5('segment-' || x.site_rank || '-' || floor(x.r_seg / 0.25 * {SEGMENTS_PER_SITE})::int)::uuid END,
    CASE WHEN x.r_exp < 0.3 THEN md5('experiment-' || x.site_rank || '-' || floor(x.r_exp / 0.3 * {EXPERIMENTS_PER_SITE})::int)::uuid END,
    md5('site-' || x.site_rank)::uuid,
    md5('owner-' || x.site_rank % {OWNERS})::uuid,
    x.at, x.at + interval '2 seconds',
    CASE WHEN x.r_country < 0.6 THEN jsonb_build_object('latitude', round((x.r_country * 100 - 40)::numeric, 4),
                                                       'longitude', round((x.r_page * 300 - 150)::numeric, 4),
                                                       'accuracy_radius', 100) END,
    CASE WHEN x.r_camp < 0.1 THEN md5('experiment-' || x.site_rank || '-0')::uuid END
FROM shaped x
ORDER BY x.at
"""

# The documented queries (docs/querying.md): $1 site (or lead/experiment), $2 from, $3 to.
QUERIES: dict[str, tuple[str, str]] = {
    "page views per day": ("site", "SELECT * FROM public.site_page_views($1, $2, $3)"),
    "daily stats (sessions, bounce rate)": ("site", "SELECT * FROM public.site_daily_stats($1, $2, $3)"),
    "sessions (latest 100)": ("site", """
        SELECT * FROM public.site_sessions($1, $2, $3) ORDER BY started_at DESC LIMIT 100"""),
    "top pages": ("site", "SELECT * FROM public.site_top($1, $2, $3, 'page')"),
    "top referrers": ("site", "SELECT * FROM public.site_top($1, $2, $3, 'referrer')"),
    "top countries": ("site", "SELECT * FROM public.site_top($1, $2, $3, 'country')"),
    "top devices": ("site", "SELECT * FROM public.site_top($1, $2, $3, 'device')"),
    "funnel": ("site", f"SELECT * FROM public.site_funnel($1, $2, $3, '{{{','.join(FUNNEL)}}}')"),
    "lead activity": ("lead", "SELECT * FROM public.lead_activity($1, $2, $3)"),
    "lead timeline": ("lead", """
        SELECT created_at, event_type, page_url, session_id FROM public.visitor_events
        WHERE lead_id = $1 AND created_at >= $2 AND created_at < $3
        ORDER BY created_at DESC LIMIT 50"""),
    "experiment activity": ("experiment", "SELECT * FROM public.experiment_activity($1, $2, $3)"),
}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def generate(conn: asyncpg.Connection, args: argparse.Namespace, first_day: datetime) -> float:
    """Load reference rows and events; return the seconds the load took."""
    started = time.perf_counter()
    await conn.execute(REFERENCES_SQL.replace("$1", str(int(args.sites))))
    await ensure_partitions(conn, first_day, first_day + timedelta(days=args.days, hours=1))

    # secondary indexes are built once after the load, as fast as that goes
    indexes = await conn.fetch(
        "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS ddl FROM pg_index"
        " WHERE indrelid = 'public.visitor_events'::regclass AND NOT indisprimary")
    for index in indexes:
        await conn.execute(f"DROP INDEX {index['name']}")
    # jit: compiling these big statements costs more than it saves
    await conn.execute("SET session_replication_role = replica; SET work_mem = '256MB'; SET jit = off")
    await conn.execute("SELECT setseed($1)", args.seed)

    weights = [0.75 if (first_day + timedelta(days=d)).weekday() >= 5 else 1.0 for d in range(args.days)]
    sessions_total = args.events / MEAN_EVENTS_PER_SESSION
    for d, weight in enumerate(weights):
        day = first_day + timedelta(days=d)
        n = round(sessions_total * weight / sum(weights))
        t = time.perf_counter()
        await conn.execute(DAY_SQL, day, n, args.sites, sessions_total, d)
        print(f"  {day:%Y-%m-%d}: {n:,} sessions in {time.perf_counter() - t:.1f} s", flush=True)
    await conn.execute("RESET session_replication_role; RESET work_mem; RESET jit")

    t = time.perf_counter()
    await conn.execute("SET maintenance_work_mem = '512MB'")
    for index in indexes:
        # pg_get_indexdef says ON ONLY for a partitioned index: that would build no partition's
        await conn.execute(index["ddl"].replace(" ON ONLY ", " ON ", 1))
    assert not await conn.fetchval(
        "SELECT count(*) FROM pg_index WHERE indrelid = 'public.visitor_events'::regclass AND NOT indisvalid")
    print(f"  indexes built in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    await conn.execute("VACUUM (ANALYZE) public.visitor_events")
    await conn.execute("VACUUM (ANALYZE)")
    print(f"  vacuumed and analyzed in {time.perf_counter() - t:.1f} s", flush=True)
    return time.perf_counter() - started


async def time_query(conn: asyncpg.Connection, sql: str, params: tuple, runs: int) -> tuple[float, float, int]:
    """(p50 ms, p95 ms, rows) over ``runs`` executions after two warm-ups."""
    stmt = await conn.prepare(sql)
    for _ in range(2):
        rows = await stmt.fetch(*params)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        rows = await stmt.fetch(*params)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), _percentile(times, 0.95), len(rows)


def _literal(value) -> str:
    return f"'{value.isoformat()}'" if isinstance(value, datetime) else f"'{value}'"


async def run(args: argparse.Namespace) -> None:
    name = f"bench_queries_{uuid.uuid4().hex[:8]}"
    analyst = f"bench_analyst_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    conn = None
    try:
        server = await admin.fetchval("SHOW server_version")
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(args.dsn, database=name)
        await apply_migrations(conn)

        today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        first_day = today - timedelta(days=args.days)
        print(f"PostgreSQL {server}: generating ~{args.events:,} events over {args.days} days "
              f"({first_day:%Y-%m-%d} to {today - timedelta(days=1):%Y-%m-%d}) for {args.sites} sites into {name}",
              flush=True)
        load_s = await generate(conn, args, first_day)
        total = await conn.fetchval("SELECT count(*) FROM public.visitor_events")
        size = await conn.fetchval(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(partition))) FROM pipeline.visitor_events_partitions()")
        print(f"{total:,} events, {size} with indexes, loaded in {load_s:.0f} s", flush=True)
        if args.rollups:
            run_ = await rollups.roll_up(conn, lag=timedelta(minutes=1))
            await conn.execute("VACUUM (ANALYZE) " + ", ".join(rollups.TABLES))
            sizes = await conn.fetch(
                "SELECT t, pg_size_pretty(pg_total_relation_size(t::regclass)) AS size,"
                " (SELECT reltuples::bigint FROM pg_class WHERE oid = t::regclass) AS rows FROM unnest($1::text[]) t",
                list(rollups.TABLES))
            print(f"rollups: {run_.rows:,} events rolled up in {run_.seconds:.0f} s ({run_.slices} transactions); "
                  + ", ".join(f"{r['t']} {r['rows']:,} rows {r['size']}" for r in sizes), flush=True)

        # the last full week; the median site by traffic and the largest one
        week = (today - timedelta(days=7), today)
        for rank in args.site_ranks:
            site = await conn.fetchval("SELECT md5('site-' || $1)::uuid", str(rank))
            owner = await conn.fetchval("SELECT user_id FROM public.sites WHERE id = $1", site)
            lead = await conn.fetchval(
                "SELECT lead_id FROM public.visitor_events WHERE site_id = $1 AND created_at >= $2 AND created_at < $3"
                " AND lead_id IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC LIMIT 1", site, *week)
            experiment = await conn.fetchval("SELECT md5('experiment-' || $1 || '-0')::uuid", str(rank))
            week_events = await conn.fetchval(
                "SELECT count(*) FROM public.visitor_events WHERE site_id = $1 AND created_at >= $2 AND created_at < $3",
                site, *week)
            print(f"\nsite rank {rank} ({site}): {week_events:,} events in the week {week[0]:%Y-%m-%d} .. "
                  f"{week[1] - timedelta(days=1):%Y-%m-%d}; {args.runs} runs per query after 2 warm-ups")

            await conn.execute(f'CREATE ROLE "{analyst}" LOGIN IN ROLE analyst')
            await conn.execute("INSERT INTO pipeline.analyst_users (role_name, user_id) VALUES ($1, $2)", analyst, owner)
            ids = {"site": site, "lead": lead, "experiment": experiment}
            print("| query | rows | analyst p50 ms | analyst p95 ms | owner p50 ms |")
            print("|---|---:|---:|---:|---:|")
            for label, (kind, sql) in QUERIES.items():
                params = (ids[kind], *week)
                await conn.execute(f'SET ROLE "{analyst}"')
                p50, p95, rows = await time_query(conn, sql, params, args.runs)
                await conn.execute("RESET ROLE")
                owner_p50, _, owner_rows = await time_query(conn, sql, params, args.runs)
                assert rows == owner_rows, (label, rows, owner_rows)  # RLS lets the owner of the site see it all
                print(f"| {label} | {rows} | {p50:.1f} | {p95:.1f} | {owner_p50:.1f} |", flush=True)
            if args.explain:
                await conn.execute(f'SET ROLE "{analyst}"')
                for label, (kind, sql) in QUERIES.items():
                    text = sql
                    for i, value in reversed(list(enumerate((ids[kind], *week), start=1))):
                        text = text.replace(f"${i}", _literal(value))
                    plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {text}")
                    print(f"\n-- {label} (as analyst)\n{' '.join(text.split())};")
                    print("\n".join(r[0] for r in plan))
                await conn.execute("RESET ROLE")
            await conn.execute("DELETE FROM pipeline.analyst_users")
            await conn.execute(f'DROP ROLE "{analyst}"')
    finally:
        if conn is not None:
            await conn.close()
        await admin.execute(f'DROP ROLE IF EXISTS "{analyst}"')
        if args.keep:
            print(f"kept database {name}")
        else:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=cfg.load(cfg.PostgresSettings).database_url,
                        help="a superuser's PostgreSQL DSN (default: env DATABASE_URL)")
    parser.add_argument("--events", type=int, default=10_000_000, help="events to generate (default 10000000)")
    parser.add_argument("--days", type=int, default=30, help="days they span, ending yesterday (default 30)")
    parser.add_argument("--sites", type=int, default=100, help="sites (default 100)")
    parser.add_argument("--site-ranks", type=int, nargs="+", default=[50, 1],
                        help="traffic ranks of the sites to time (default: 50, the median, and 1, the largest)")
    parser.add_argument("--runs", type=int, default=21, help="timed runs per query (default 21)")
    parser.add_argument("--seed", type=float, default=0.42, help="setseed() value for the data")
    parser.add_argument("--explain", action="store_true", help="also print EXPLAIN (ANALYZE, BUFFERS) of each query")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--no-rollups", dest="rollups", action="store_false",
                        help="do not run the rollup job (the queries read visitor_events only)")
    args = parser.parse_args()
    if args.days < 8:
        parser.error("--days must be at least 8 (a full week is timed)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
