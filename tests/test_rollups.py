"""Rollups (pipeline/rollups.py, migrations 0040 and 0041) against a real PostgreSQL.

The rollup-backed functions must return exactly what the same questions asked of the
raw rows return (the reference queries below are 0022's functions written out). That is
checked for several sites, ranges (day-aligned, mid-hour, around midnight, crossing
sessions) and time zones (a DST change included), at every stage:

* rolled up in slices whose bounds cut through sessions, hours and days, with the rest
  read raw; re-running is a no-op; the incremental result equals a rebuild in one go;
* late rows stored through the sink below the watermark: marked, counted at once, then
  merged by the next run;
* the sink/job hand-over: a write in flight while the job moves the watermark is
  neither lost nor counted twice, whichever of the two comes first;
* row-level security on the rollup tables for two owners' analysts;
* the worker runs the job; ``pipeline maintenance`` runs and rebuilds it.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from pipeline import rollups
from schemas import migrate
from sinks.postgres import COLUMNS, Batch, PostgresSink

UTC = timezone.utc
BASE = datetime(2030, 3, 29, tzinfo=UTC)  # Europe's summer time starts on the 31st
DAYS = 4
END = BASE + timedelta(days=DAYS)
DIMENSIONS = ("page", "referrer", "country", "device", "event_type")
TIME_ZONES = ("UTC", "Europe/Madrid", "America/New_York", "Asia/Kolkata")  # Kolkata: half-hour offset
# day-aligned, cutting hours and sessions, around a midnight, one hour
RANGES = [
    (BASE, END),
    (BASE + timedelta(days=1), BASE + timedelta(days=3)),
    (BASE + timedelta(days=1, hours=5, minutes=30), BASE + timedelta(days=3, hours=7, minutes=15, seconds=3)),
    (BASE + timedelta(days=1, hours=23, minutes=57), BASE + timedelta(days=2, minutes=2)),
    (BASE + timedelta(days=2, hours=14), BASE + timedelta(days=2, hours=15)),
]

# --------------------------------------------------------------------------- the raw answers (0022)

RAW_DAILY_STATS = """
WITH e AS (
    SELECT (v.created_at AT TIME ZONE $4)::date AS day, v.event_type, v.visitor_id COLLATE "C" AS visitor_id,
           v.session_id COLLATE "C" AS session_id, v.created_at
    FROM public.visitor_events v
    WHERE v.site_id = $1 AND v.created_at >= $2 AND v.created_at < $3
),
per_day AS (
    SELECT e.day, count(*) FILTER (WHERE e.event_type = 'pageview') AS page_views, count(*) AS events,
           count(DISTINCT e.visitor_id) AS visitors
    FROM e GROUP BY e.day
),
per_session AS (
    SELECT min(e.day) AS day, count(*) AS events, max(e.created_at) - min(e.created_at) AS length
    FROM e WHERE e.session_id IS NOT NULL GROUP BY e.session_id
),
session_days AS (
    SELECT s.day, count(*) AS sessions, count(*) FILTER (WHERE s.events = 1) AS bounces,
           avg(extract(epoch FROM s.length)) AS seconds
    FROM per_session s GROUP BY s.day
)
SELECT d.day, d.page_views, d.events, d.visitors, coalesce(s.sessions, 0), coalesce(s.bounces, 0),
       round(s.bounces::numeric / nullif(s.sessions, 0), 4), round(s.seconds, 1)
FROM per_day d LEFT JOIN session_days s USING (day)
ORDER BY d.day
"""

RAW_SESSIONS = """
SELECT s.session_id::text, s.visitor_id, s.started_at, s.ended_at, s.events, s.page_views,
       s.first_hit[1][1], nullif(public.url_host(s.first_hit[1][2]), public.url_host(s.first_hit[1][1])),
       s.country, s.device_type, s.events = 1
FROM (
    SELECT v.session_id COLLATE "C" AS session_id, min(v.visitor_id) AS visitor_id,
           min(v.created_at) AS started_at, max(v.created_at) AS ended_at,
           count(*) AS events, count(*) FILTER (WHERE v.event_type = 'pageview') AS page_views,
           (array_agg(ARRAY[v.page_url, v.referrer_url] ORDER BY v.created_at, v.id))[1:1] AS first_hit,
           min(v.country) AS country, min(v.device_type) AS device_type
    FROM public.visitor_events v
    WHERE v.site_id = $1 AND v.created_at >= $2 AND v.created_at < $3 AND v.session_id IS NOT NULL
    GROUP BY 1
) s
ORDER BY 1
"""

RAW_TOP = """
SELECT d.value, sum(d.n)::bigint, count(d.visitor_id)
FROM (
    SELECT x.value, x.visitor_id, count(*) AS n
    FROM (
        SELECT CASE $4
            WHEN 'page' THEN CASE WHEN v.event_type = 'pageview'
                                  THEN split_part(split_part(v.page_url, '#', 1), '?', 1) END
            WHEN 'referrer' THEN CASE WHEN split_part(v.referrer_url, '/', 3) IS DISTINCT FROM split_part(v.page_url, '/', 3)
                                      THEN nullif(public.url_host(v.referrer_url), public.url_host(v.page_url)) END
            WHEN 'country' THEN coalesce(v.country, '(unknown)')
            WHEN 'device' THEN coalesce(v.device_type, '(unknown)')
            WHEN 'event_type' THEN v.event_type
        END COLLATE "C" AS value, v.visitor_id COLLATE "C" AS visitor_id
        FROM public.visitor_events v
        WHERE v.site_id = $1 AND v.created_at >= $2 AND v.created_at < $3
    ) x
    WHERE x.value IS NOT NULL
    GROUP BY 1, 2
) d
GROUP BY d.value
ORDER BY 2 DESC, 1
LIMIT $5
"""

RAW_PAGE_VIEWS = """
SELECT (created_at AT TIME ZONE $4)::date, count(*)
FROM public.visitor_events
WHERE site_id = $1 AND created_at >= $2 AND created_at < $3 AND event_type = 'pageview'
GROUP BY 1 ORDER BY 1
"""

# 0022's site_funnel written out; events of equal created_at in id order (0022 leaves
# their order open)
RAW_FUNNEL = """
WITH reached AS (
    SELECT public.funnel_progress(array_position($4::text[], v.event_type) ORDER BY v.created_at, v.id) AS n
    FROM public.visitor_events v
    WHERE v.site_id = $1 AND v.created_at >= $2 AND v.created_at < $3 AND v.event_type = ANY ($4::text[])
    GROUP BY v.visitor_id COLLATE "C"
),
counts AS (
    SELECT s.step, count(r.n) AS visitors
    FROM generate_series(1, cardinality($4::text[])) AS s (step)
    LEFT JOIN reached r ON r.n >= s.step
    GROUP BY s.step
)
SELECT c.step, ($4::text[])[c.step], c.visitors,
       round(c.visitors::numeric / nullif(lag(c.visitors) OVER w, 0), 4),
       round(c.visitors::numeric / nullif(first_value(c.visitors) OVER w, 0), 4)
FROM counts c
WINDOW w AS (ORDER BY c.step)
ORDER BY c.step
"""

# the generated types in several orders, a single step, a repeated step (never reached
# after the first), types no event has (one of them only among late rows: "upgrade"), none
FUNNELS = [
    ["pageview", "click", "form_start", "signup"],
    ["click", "pageview", "signup"],
    ["signup", "form_start"],
    ["click", "signup"],
    ["pageview"],
    ["pageview", "pageview", "click"],
    ["form_start", "nope", "signup"],
    ["nope", "pageview"],
    ["pageview", "upgrade"],
    [],
]


async def _rows(conn: asyncpg.Connection, sql: str, *args) -> list[tuple]:
    return [tuple(r) for r in await conn.fetch(sql, *args)]


async def assert_equal_to_raw(conn: asyncpg.Connection, sites, ranges=RANGES) -> int:
    """Every rollup-backed function equals its raw reference; returns how many answers had rows."""
    answered = 0
    for site in sites:
        for a, b in ranges:
            for tz in TIME_ZONES:
                got = await _rows(conn, "SELECT * FROM public.site_daily_stats($1, $2, $3, $4)", site, a, b, tz)
                assert got == await _rows(conn, RAW_DAILY_STATS, site, a, b, tz), (site, a, b, tz)
                got = await _rows(conn, "SELECT * FROM public.site_page_views($1, $2, $3, $4)", site, a, b, tz)
                assert got == await _rows(conn, RAW_PAGE_VIEWS, site, a, b, tz), (site, a, b, tz)
                answered += bool(got)
            got = await _rows(conn, "SELECT * FROM public.site_sessions($1, $2, $3) ORDER BY 1", site, a, b)
            assert got == await _rows(conn, RAW_SESSIONS, site, a, b), (site, a, b)
            latest = await _rows(conn, "SELECT * FROM public.site_sessions($1, $2, $3)"
                                       " ORDER BY started_at DESC, session_id LIMIT 5", site, a, b)
            assert latest == sorted(got, key=lambda r: (r[2], r[0]), reverse=True)[:5]
            for steps in FUNNELS:
                got = await _rows(conn, "SELECT * FROM public.site_funnel($1, $2, $3, $4)", site, a, b, steps)
                assert got == await _rows(conn, RAW_FUNNEL, site, a, b, steps), (site, a, b, steps)
                answered += any(r[2] for r in got[1:])  # later steps reached too
            for dimension in DIMENSIONS:
                for n in (3, 10):
                    got = await _rows(conn, "SELECT * FROM public.site_top($1, $2, $3, $4, $5)", site, a, b,
                                      dimension, n)
                    assert got == await _rows(conn, RAW_TOP, site, a, b, dimension, n), (site, a, b, dimension, n)
    return answered


# --------------------------------------------------------------------------- data


def _row(**cols) -> tuple:
    """A visitor_events row in the sink's column order."""
    cols.setdefault("id", uuid.uuid4())
    cols.setdefault("updated_at", cols["created_at"])
    return tuple(cols.get(c) for c in COLUMNS)


def generate(sites: list[uuid.UUID], seed: int = 7) -> list[tuple]:
    """Sessions of 1-8 events over DAYS days per site: some just before midnight or an
    hour, some without session_id or visitor, one shared session_id across sites, and a
    12-hour session crossing midnight."""
    rnd = random.Random(seed)
    rows = []
    for k, site in enumerate(sites):
        host = f"https://s{k}.example"
        for n in range(120):
            if n % 9 == 0:  # just before a midnight or a full hour
                start = BASE + timedelta(days=rnd.randrange(DAYS - 1), hours=rnd.choice([23, 11, 16]),
                                         minutes=rnd.uniform(52, 59.9))
            else:
                start = BASE + timedelta(seconds=rnd.uniform(0, DAYS * 86400 - 7200))
            session = None if n % 13 == 0 else ("shared" if n == 5 else f"s{k}-{n}")
            visitor = None if n % 23 == 0 else f"v{rnd.randrange(40)}"
            country = rnd.choice(["US", "GB", "ES", "IN", None])
            device = rnd.choice(["desktop", "desktop", "mobile", "tablet", None])
            t = start
            for i in range(rnd.choice([1, 1, 1, 2, 2, 3, 5, 8])):
                page = host + rnd.choice(["/", "/", "/pricing", "/about?utm=x", "/blog/a#top", "/signup"])
                referrer = (rnd.choice(["https://www.google.com/search?q=x", "https://news.ycombinator.com/item",
                                        "https://WWW.Reddit.com/r/x", f"{host}/", None])
                            if i == 0 else rnd.choice([f"{host}/", None]))
                kind = "pageview" if i == 0 else rnd.choice(["pageview", "pageview", "click", "form_start", "signup"])
                rows.append(_row(event_type=kind, page_url=page, referrer_url=referrer, visitor_id=visitor,
                                 session_id=session, country=country, device_type=device, site_id=site, created_at=t))
                t += timedelta(seconds=rnd.uniform(3, 600))
        t = BASE + timedelta(days=1, hours=13, minutes=rnd.uniform(0, 59))
        for i in range(40):  # one long session, crossing the second midnight
            rows.append(_row(event_type="pageview" if i % 3 else "click", page_url=f"{host}/docs/{i % 7}",
                             referrer_url=None if i else "https://t.co/abc", visitor_id="marathon",
                             session_id=f"long-{k}", country="DE", device_type="desktop", site_id=site,
                             created_at=t))
            t += timedelta(seconds=rnd.uniform(600, 1500))
    return rows


async def _store(conn: asyncpg.Connection, rows: list[tuple]) -> None:
    await migrate.ensure_partitions_for(conn, [r[COLUMNS.index("created_at")] for r in rows])
    await conn.copy_records_to_table("visitor_events", schema_name="public", records=rows, columns=COLUMNS)


async def _tables(conn: asyncpg.Connection) -> list[list[tuple]]:
    """Everything the rollups hold, in a fixed order (visitor sets as sorted arrays)."""
    return [
        await _rows(conn, "SELECT * FROM public.site_daily_rollups ORDER BY site_id, dimension, day, value"),
        await _rows(conn, "SELECT * FROM public.site_hourly_rollups ORDER BY site_id, dimension, hour, value"),
        await _rows(conn, "SELECT * FROM public.site_session_rollups ORDER BY site_id, session_id"),
        # sequences as event types: codes are numbered in the order the job met the types
        await _rows(conn, """
            SELECT q.site_id, q.visitor, q.hour,
                   ARRAY(SELECT c.event_type FROM regexp_split_to_table(q.codes, '') WITH ORDINALITY AS x (code, i)
                         JOIN public.site_event_type_codes c ON c.site_id = q.site_id AND c.code = x.code
                         ORDER BY x.i)
            FROM public.site_visitor_sequences q ORDER BY 1, 2, 3"""),
    ]


class Db:
    def __init__(self, conn, dsn, sites, owners):
        self.conn, self.dsn, self.sites, self.owners = conn, dsn, sites, owners


@pytest.fixture
async def db(empty_database_url):
    """A migrated database: owner a with two sites, owner b with one, DAYS days of events."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await migrate.apply_migrations(conn)
        a, b = uuid.uuid4(), uuid.uuid4()
        sites = [uuid.uuid4(), uuid.uuid4(), uuid.uuid4()]
        owners = {sites[0]: a, sites[1]: a, sites[2]: b}
        await conn.executemany("INSERT INTO auth.users (id) VALUES ($1)", [(a,), (b,)])
        await conn.executemany("INSERT INTO public.sites (id, name, user_id) VALUES ($1, 'site', $2)",
                               list(owners.items()))
        await _store(conn, generate(sites))
        yield Db(conn, empty_database_url, sites, owners)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("hourly_days", [8, 1])  # 1: days 0-2 lose their hourly rows: edges there are read raw
async def test_slices_through_sessions_equal_raw_and_a_rebuild_in_one_go(db, hourly_days):
    conn = db.conn
    assert await conn.fetchval("SELECT public.rollups_until()") is None
    assert await assert_equal_to_raw(conn, db.sites) > 0  # nothing rolled up: all raw

    # slices of 5 hours ending mid-hour, mid-session; then up to a second before a midnight
    first = await rollups.roll_up(conn, until=BASE + timedelta(days=1, hours=13, minutes=37, seconds=12.345),
                                  slice=timedelta(hours=5), hourly_days=hourly_days)
    assert first.slices >= 7 and first.rows > 0 and first.late == 0
    assert await conn.fetchval("SELECT public.rollups_until()") == first.rolled_to
    await assert_equal_to_raw(conn, db.sites)
    await rollups.roll_up(conn, until=BASE + timedelta(days=2, hours=23, minutes=59, seconds=59),
                          slice=timedelta(hours=5), hourly_days=hourly_days)
    await assert_equal_to_raw(conn, db.sites)
    last = await rollups.roll_up(conn, until=END + timedelta(hours=1), slice=timedelta(hours=5),
                                 hourly_days=hourly_days)
    assert last.rolled_to == END + timedelta(hours=1)
    # closed days have daily rows; the dimensions' hours are kept for hourly_days only
    assert await conn.fetchval("SELECT max(day) FROM public.site_daily_rollups") == (END - timedelta(days=1)).date()
    kept_from = END - timedelta(days=hourly_days)
    assert await conn.fetchval("SELECT min(hour) FROM public.site_hourly_rollups WHERE dimension <> 'all'") == max(
        kept_from, BASE)
    assert await conn.fetchval("SELECT min(hour) FROM public.site_hourly_rollups WHERE dimension = 'all'") == BASE
    total = await conn.fetchval("SELECT count(*) FROM public.visitor_events")
    assert await _rolled_events(conn) == total
    assert await conn.fetchval("SELECT sum(events) FROM public.site_daily_rollups WHERE dimension = 'all'") == total
    await assert_equal_to_raw(conn, db.sites)
    incremental = await _tables(conn)

    # the answers do come from the rollups: rows deleted behind their back still count
    day = (BASE + timedelta(days=1), BASE + timedelta(days=2))
    funnel = "SELECT * FROM public.site_funnel($1, $2, $3, $4)"
    reached = await _rows(conn, funnel, db.sites[0], *day, FUNNELS[0])
    assert reached[1][2] > 0  # the second step is read from the sequences
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute("DELETE FROM public.visitor_events WHERE site_id = $1 AND created_at >= $2"
                           " AND created_at < $3", db.sites[0], *day)
        assert await conn.fetch(RAW_TOP, db.sites[0], *day, "device", 10) == []
        assert len(await conn.fetch("SELECT * FROM public.site_top($1, $2, $3, 'device')", db.sites[0], *day)) > 0
        assert [r[2] for r in await _rows(conn, RAW_FUNNEL, db.sites[0], *day, FUNNELS[0])] == [0, 0, 0, 0]
        assert await _rows(conn, funnel, db.sites[0], *day, FUNNELS[0]) == reached
    finally:
        await tx.rollback()

    # running again changes nothing
    again = await rollups.roll_up(conn, until=END + timedelta(hours=1), hourly_days=hourly_days)
    assert (again.slices, again.rows) == (0, 0)
    assert await _tables(conn) == incremental

    # built in one go, the rollups are the same, row for row
    await rollups.rebuild(conn)
    assert await conn.fetchval("SELECT public.rollups_until()") is None
    assert await conn.fetchval("SELECT count(*) FROM public.site_daily_rollups") == 0
    whole = await rollups.roll_up(conn, until=END + timedelta(hours=1), slice=timedelta(days=30),
                                  hourly_days=hourly_days)
    assert whole.slices == 1 and whole.rows == await conn.fetchval("SELECT count(*) FROM public.visitor_events")
    assert await _tables(conn) == incremental


async def _rolled_events(conn) -> int:
    """Events in the rollups: the site-wide hours are kept for all time."""
    return await conn.fetchval("SELECT sum(events) FROM public.site_hourly_rollups WHERE dimension = 'all'")


async def _sink(dsn: str) -> tuple[asyncpg.Pool, PostgresSink]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    sink = PostgresSink(pool, group_id="g", owner="test")
    await sink.claim("t", [0])
    return pool, sink


async def test_late_rows_are_counted_at_once_and_merged_by_the_next_run(db):
    conn, site = db.conn, db.sites[0]
    # a click, rolled up; a late signup comes before it in the same hour (funnel click -> signup: not reached)
    click_at = BASE + timedelta(days=2, hours=5, minutes=30)
    await _store(conn, [_row(event_type="click", page_url="https://s0.example/", visitor_id="orderly",
                             session_id="orderly", site_id=site, created_at=click_at)])
    await rollups.roll_up(conn, until=END, slice=timedelta(hours=7))
    assert await conn.fetchval("SELECT watermark FROM pipeline.rollup_state") == END
    session = await conn.fetchrow(
        "SELECT session_id, started_at, visitor_id FROM public.site_session_rollups"
        " WHERE site_id = $1 AND events = 1 ORDER BY started_at LIMIT 1", site)
    long_one = await conn.fetchrow("SELECT session_id, started_at FROM public.site_session_rollups"
                                   " WHERE site_id = $1 AND session_id = 'long-0'", site)
    lead = uuid.uuid4()
    await conn.execute("INSERT INTO public.leads (id, site_id, user_id) VALUES ($1, $2, $3)", lead, site,
                       db.owners[site])
    late = [
        # before a stored bounce: the session gets a new landing page and is no bounce any more
        _row(event_type="pageview", page_url="https://s0.example/early", referrer_url="https://duckduckgo.com/",
             visitor_id=session["visitor_id"], session_id=session["session_id"], country="FR", device_type="tv",
             site_id=site, created_at=session["started_at"] - timedelta(minutes=3)),
        # inside the long session, on its second day
        _row(event_type="signup", page_url="https://s0.example/signup", visitor_id="marathon",
             session_id=long_one["session_id"], site_id=site, created_at=long_one["started_at"] + timedelta(hours=11)),
        # a new visitor and session on a rolled-up day, and an event without session
        _row(event_type="pageview", page_url="https://s0.example/new", visitor_id="latecomer", session_id="late-s",
             site_id=site, created_at=BASE + timedelta(days=2, hours=3, seconds=1.5)),
        _row(event_type="click", page_url="https://s0.example/", visitor_id="latecomer", site_id=site,
             created_at=BASE + timedelta(hours=7)),
        _row(event_type="signup", page_url="https://s0.example/signup", visitor_id="orderly", session_id="orderly",
             site_id=site, created_at=click_at - timedelta(minutes=20)),
        # a type the site never had, in the long session's hour (after its pageviews)
        _row(event_type="upgrade", page_url="https://s0.example/upgrade", visitor_id="marathon",
             session_id=long_one["session_id"], site_id=site,
             created_at=long_one["started_at"] + timedelta(hours=11, seconds=1)),
    ]
    fresh = _row(event_type="pageview", page_url="https://s0.example/now", visitor_id="v1", session_id="now",
                 site_id=site, created_at=END + timedelta(minutes=5))
    pool, sink = await _sink(db.dsn)
    try:
        result = await sink.write(Batch(late + [fresh], {("t", 0): 1},
                                        backfills=[(str(site), "v1", str(lead), BASE)]))
        assert len(result.stored) == 7
    finally:
        await pool.close()
    marked = {r["id"] for r in await conn.fetch("SELECT id FROM public.site_rollup_late")}
    assert marked == {r[COLUMNS.index("id")] for r in late}  # not the one above the watermark
    # the lead back-fill changed old rows, but nothing the rollups count
    assert await conn.fetchval("SELECT count(*) FROM public.visitor_events WHERE lead_id = $1", lead) > 0

    before = await _tables(conn)
    await assert_equal_to_raw(conn, db.sites)  # the marked rows are read raw meanwhile
    merged = await rollups.roll_up(conn, until=END + timedelta(hours=1))
    assert (merged.slices, merged.late, merged.rows) == (1, 6, 7)
    assert await conn.fetchval("SELECT count(*) FROM public.site_rollup_late") == 0
    assert await _tables(conn) != before
    await assert_equal_to_raw(conn, db.sites)

    # and the merged rollups are what a rebuild makes of the same rows
    incremental = await _tables(conn)
    await rollups.rebuild(conn)
    await rollups.roll_up(conn, until=END + timedelta(hours=1), slice=timedelta(days=30))
    assert await _tables(conn) == incremental


async def test_a_write_that_read_the_old_watermark_is_waited_for(db, monkeypatch):
    """The sink has read the watermark (holding its lock) and not committed yet when the
    job starts: the job waits for it, and the row is in the job's snapshot."""
    conn, site = db.conn, db.sites[1]
    await rollups.roll_up(conn, until=BASE + timedelta(days=2), slice=timedelta(days=30))
    target = BASE + timedelta(days=3)
    row = _row(event_type="pageview", page_url="https://s1.example/in-flight", visitor_id="flight",
               session_id="flight", site_id=site, created_at=target - timedelta(hours=1))

    read_watermark, commit = asyncio.Event(), asyncio.Event()
    original = PostgresSink._mark_late

    async def pausing(self, c, rows):
        await original(self, c, rows)  # the lock is held from here to the commit
        read_watermark.set()
        await commit.wait()

    monkeypatch.setattr(PostgresSink, "_mark_late", pausing)
    pool, sink = await _sink(db.dsn)
    job_conn = await asyncpg.connect(db.dsn)
    try:
        write = asyncio.create_task(sink.write(Batch([row], {("t", 0): 1})))
        await asyncio.wait_for(read_watermark.wait(), 10)
        job = asyncio.create_task(rollups.roll_up(job_conn, until=target, lock_timeout=30))
        pid = job_conn.get_server_pid()
        await _until(lambda: conn.fetchval(
            "SELECT wait_event = 'advisory' FROM pg_stat_activity WHERE pid = $1", pid))
        assert not job.done()
        commit.set()
        assert len((await write).stored) == 1
        run = await asyncio.wait_for(job, 30)
    finally:
        commit.set()
        await pool.close()
        await job_conn.close()
    assert run.rolled_to == target and run.late == 0
    assert await conn.fetchval("SELECT count(*) FROM public.site_rollup_late") == 0  # it read the old watermark
    assert await conn.fetchval("SELECT events FROM public.site_session_rollups WHERE site_id = $1"
                               " AND session_id = 'flight'", site) == 1
    await assert_equal_to_raw(conn, [site])


async def test_a_write_that_commits_after_the_snapshot_marks_its_rows(db, monkeypatch):
    """The job moves the watermark and takes its snapshot while a write is in flight
    (rows copied, not committed): the write then sees the new watermark and marks the
    row, which the job's snapshot did not have; the next run adds it."""
    conn, site = db.conn, db.sites[2]
    await rollups.roll_up(conn, until=BASE + timedelta(days=2), slice=timedelta(days=30))
    target = BASE + timedelta(days=3)
    row = _row(event_type="pageview", page_url="https://s2.example/in-flight", visitor_id="flight",
               session_id="flight", site_id=site, created_at=target - timedelta(hours=1))

    copied, go_on = asyncio.Event(), asyncio.Event()
    original = PostgresSink._mark_late

    async def pausing(self, c, rows):
        copied.set()
        await go_on.wait()
        await original(self, c, rows)

    monkeypatch.setattr(PostgresSink, "_mark_late", pausing)
    pool, sink = await _sink(db.dsn)
    try:
        write = asyncio.create_task(sink.write(Batch([row], {("t", 0): 1})))
        await asyncio.wait_for(copied.wait(), 10)
        run = await asyncio.wait_for(rollups.roll_up(conn, until=target), 30)  # does not wait for the write
        assert run.rolled_to == target
        go_on.set()
        assert len((await write).stored) == 1
    finally:
        go_on.set()
        await pool.close()
    assert [r["id"] for r in await conn.fetch("SELECT id FROM public.site_rollup_late")] == [row[0]]
    assert await conn.fetchval("SELECT count(*) FROM public.site_session_rollups WHERE session_id = 'flight'") == 0
    await assert_equal_to_raw(conn, [site])  # counted from the mark meanwhile
    run = await rollups.roll_up(conn, until=target)
    assert (run.slices, run.late, run.rows) == (1, 1, 1)
    assert await conn.fetchval("SELECT events FROM public.site_session_rollups WHERE site_id = $1"
                               " AND session_id = 'flight'", site) == 1
    await assert_equal_to_raw(conn, [site])


async def test_a_write_holding_its_lock_too_long_only_postpones_the_job(db):
    conn = db.conn
    writer = await asyncpg.connect(db.dsn)
    try:
        async with writer.transaction():
            assert await writer.fetchval("SELECT pipeline.rollup_write_horizon()") is None
            run = await rollups.roll_up(conn, until=END, lock_timeout=0.2)
            assert run.skipped and run.slices == 0
        assert await conn.fetchval("SELECT rolled_to FROM pipeline.rollup_state") is None
    finally:
        await writer.close()
    run = await rollups.roll_up(conn, until=END)
    assert run.skipped is None and run.rolled_to == END


async def _until(check, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- access


@pytest.fixture
async def analysts(db, pg_admin_url):
    """(alice, bob): login roles in group analyst mapped to owner a and owner b."""
    admin = await asyncpg.connect(pg_admin_url)
    names = [f"alice_{uuid.uuid4().hex[:8]}", f"bob_{uuid.uuid4().hex[:8]}"]
    try:
        for name in names:
            await admin.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE analyst')
        a, b = db.owners[db.sites[0]], db.owners[db.sites[2]]
        await db.conn.executemany("INSERT INTO pipeline.analyst_users (role_name, user_id) VALUES ($1, $2)",
                                  [(names[0], a), (names[1], b)])
        yield names
    finally:
        for name in names:
            await db.conn.execute(f'DROP OWNED BY "{name}"')
            await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        await admin.close()


async def test_each_owners_analyst_reads_only_its_own_rollups(db, analysts):
    conn = db.conn
    await rollups.roll_up(conn, until=END, slice=timedelta(days=1))
    tables = ("site_daily_rollups", "site_hourly_rollups", "site_session_rollups", "site_event_type_codes",
              "site_visitor_sequences", "site_rollup_late")
    policy = await conn.fetchval("SELECT clause FROM pipeline.policy_clauses('public.visitor_events')")
    for table in tables:
        assert await conn.fetchval("SELECT relrowsecurity FROM pg_class WHERE oid = $1::regclass", f"public.{table}")
        assert await conn.fetchval(f"SELECT clause FROM pipeline.policy_clauses('public.{table}')") == policy
    for analyst, mine in ((analysts[0], set(db.sites[:2])), (analysts[1], {db.sites[2]})):
        other = next(s for s in db.sites if s not in mine)
        await conn.execute(f'SET ROLE "{analyst}"')
        try:
            for table in tables[:-1]:
                seen = {r[0] for r in await conn.fetch(f"SELECT DISTINCT site_id FROM public.{table}")}
                assert seen == mine, table
            assert await conn.fetchval("SELECT public.rollups_until()") == END
            assert await conn.fetch("SELECT * FROM public.site_top($1, $2, $3, 'page')", other, BASE, END) == []
            assert await conn.fetch("SELECT * FROM public.site_daily_stats($1, $2, $3)", other, BASE, END) == []
            assert await conn.fetch("SELECT * FROM public.site_sessions($1, $2, $3)", other, BASE, END) == []
            assert await conn.fetch("SELECT * FROM public.site_page_views($1, $2, $3)", other, BASE, END) == []
            assert [r["visitors"] for r in await conn.fetch("SELECT * FROM public.site_funnel($1, $2, $3, $4)",
                                                            other, BASE, END, FUNNELS[0])] == [0, 0, 0, 0]
            await assert_equal_to_raw(conn, mine, RANGES[:2])
            for sql in ("DELETE FROM public.site_daily_rollups", "UPDATE public.site_hourly_rollups SET events = 0",
                        "TRUNCATE public.site_session_rollups", "INSERT INTO public.site_rollup_late VALUES"
                        " ('00000000-0000-0000-0000-000000000000', now(), gen_random_uuid())",
                        "SELECT * FROM pipeline.rollup_state"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
        finally:
            await conn.execute("RESET ROLE")


async def test_readers_granted_before_the_rollups_can_call_the_functions(empty_database_url, pg_admin_url,
                                                                       tmp_path, monkeypatch):
    """A role given grant_read_access before migration 0040 reads the rollups after it."""
    name = f"metabase_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_admin_url)
    conn = await asyncpg.connect(empty_database_url)
    all_versions = [m.version for m in migrate.load_migrations()]
    try:
        await admin.execute(f'CREATE ROLE "{name}" LOGIN')
        for f in migrate.MIGRATIONS_DIR.glob("*.sql"):
            if f.name < "0040":
                (tmp_path / f.name).write_text(f.read_text())
        with monkeypatch.context() as m:
            m.setattr(migrate, "MIGRATIONS_DIR", tmp_path)
            assert await migrate.apply_migrations(conn) == [v for v in all_versions if v < "0040"]
        await conn.execute("SELECT pipeline.grant_read_access($1)", name)
        assert await migrate.apply_migrations(conn) == [v for v in all_versions if v >= "0040"]
        for table in ("site_daily_rollups", "site_hourly_rollups", "site_session_rollups", "site_rollup_late"):
            assert await conn.fetchval("SELECT has_table_privilege($1, $2, 'SELECT')", name, f"public.{table}")
            assert not await conn.fetchval("SELECT has_table_privilege($1, $2, 'INSERT')", name, f"public.{table}")
        assert await conn.fetchval("SELECT has_function_privilege($1, 'public.site_page_views(uuid, timestamptz,"
                                   " timestamptz, text)', 'EXECUTE')", name)
    finally:
        await conn.execute(f'DROP OWNED BY "{name}"')
        await conn.close()
        await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        await admin.close()


# --------------------------------------------------------------------------- who runs it


async def test_the_worker_runs_the_job(db, topics):
    from pipeline.settings import EnrichSettings, PostgresSettings, RollupSettings, WorkerSettings
    from pipeline.worker import Worker

    conn = db.conn
    yesterday = datetime.now(UTC) - timedelta(days=1)
    recent = [_row(event_type="pageview", page_url="https://s0.example/", visitor_id=f"v{i % 7}",
                   session_id=f"r{i % 11}", site_id=db.sites[0], created_at=yesterday + timedelta(minutes=i))
              for i in range(50)]
    await _store(conn, recent)
    worker = Worker(WorkerSettings(group_id=f"g-{topics.events_topic}", metrics_port=0, batch_ms=100,
                                   rollup_interval_s=0.2),
                    topics, PostgresSettings(database_url=db.dsn), EnrichSettings(),
                    rollup=RollupSettings(lag_s=0, slice_hours=12))
    task = asyncio.create_task(worker.run())
    try:
        await _until(lambda: conn.fetchval("SELECT public.rollups_until() > now() - interval '1 minute'"), 60)
    finally:
        worker.stop_nowait()
        await asyncio.wait_for(task, 30)
    assert await _rolled_events(conn) == 50  # the rows before now; BASE is in the future
    await assert_equal_to_raw(conn, db.sites[:1], [(yesterday - timedelta(hours=1), yesterday + timedelta(hours=2))])


# --------------------------------------------------------------------------- upgrade


async def test_upgrading_a_rolled_up_database_builds_the_funnel_sequences(db):
    """A database rolled up under 0040 has no sequences below rolled_to; 0041 builds them."""
    conn = db.conn
    await rollups.roll_up(conn, until=BASE + timedelta(days=2, hours=5, minutes=17), slice=timedelta(hours=7))
    built = await _tables(conn)
    # the state right after 0041's tables were created on such a database
    await conn.execute("TRUNCATE public.site_visitor_sequences, public.site_event_type_codes")
    day = (BASE + timedelta(days=1), BASE + timedelta(days=2))
    funnel = "SELECT * FROM public.site_funnel($1, $2, $3, $4)"
    assert await _rows(conn, funnel, db.sites[0], *day, FUNNELS[0]) != await _rows(
        conn, RAW_FUNNEL, db.sites[0], *day, FUNNELS[0])  # without sequences the funnel is wrong

    (migration,) = [m for m in migrate.load_migrations() if m.version == "0041"]
    await conn.execute(migration.sql)  # re-runnable: only its backfill does anything here

    await assert_equal_to_raw(conn, db.sites)
    assert await _tables(conn) == built  # the same sequences and codes as the job made
    # and the job goes on from there
    await rollups.roll_up(conn, until=END + timedelta(hours=1), slice=timedelta(hours=7))
    await assert_equal_to_raw(conn, db.sites)
