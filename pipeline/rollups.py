"""The rollup job: visitor_events pre-aggregated per site, hour, day and session, and
per site, visitor and hour the event sequences site_funnel reads (migration 0041).

``roll_up`` moves ``pipeline.rollup_state.rolled_to`` forward to ``now - lag`` in
slices of at most ``slice`` of event time, one transaction per slice. A slice
[rolled_to, end) is added to the rollups (public.site_hourly_rollups,
public.site_daily_rollups, public.site_session_rollups) together with the rows sinks
marked late (public.site_rollup_late: stored below rolled_to after it had passed them);
the marks are deleted and rolled_to is set to ``end`` in the same transaction. Every
aggregate merges exactly (sums, sorted sets of visitor hashes, first/last event of a
session), so the current hour's rows are extended run by run instead of being
recomputed. A visitor's sequence of an hour (public.site_visitor_sequences: its events'
type codes in (created_at, id) order) gets the slice's events appended, being later than
all it holds; an hour that receives late rows is rebuilt from all its events instead.
A UTC day's hours are folded into daily rows once, in the slice that closes the day;
the hourly rows of site_top's dimensions are dropped ``hourly_days`` later (the
site-wide ones are kept: days in other time zones are made of them).

The hand-over with the sinks (sinks/postgres.py). A sink's write transaction ends
with ``pipeline.rollup_write_horizon()``: a shared transaction-level advisory lock,
then the watermark; it marks the rows it stored below the watermark. Each slice
here, under the exclusive lock, first commits ``watermark = greatest(watermark,
target)``, then opens a REPEATABLE READ transaction and takes its snapshot, then
releases the lock. So every write that read the old watermark committed before the
snapshot (the exclusive lock waited for it) and is in it, and every write that
commits after the snapshot read the new watermark and marked its rows below it: no
row is missed and none is counted twice (marks at or above the slice start are only
deleted, their rows being in the slice). The lock is held for milliseconds; the
computing runs on the snapshot without it.

Only one job runs at a time (a session advisory lock; another caller returns at
once). docs/querying.md#rollups has the tables and the guarantees.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import asyncpg

log = logging.getLogger("pipeline.rollups")

# Advisory locks, namespace 'pipe' like schemas/migrate.py (1: migrations, 2: partitions).
_NAMESPACE = 0x70697065
HORIZON_LOCK = 3  # sinks shared (pipeline.rollup_write_horizon()), the job exclusive
JOB_LOCK = 4  # one job at a time

BUSY = "another rollup job is running"

TABLES = ("public.site_daily_rollups", "public.site_hourly_rollups", "public.site_session_rollups",
          "public.site_rollup_late", "public.site_event_type_codes", "public.site_visitor_sequences")

# One statement per slice, from its REPEATABLE READ snapshot. $1, $2: the slice [start,
# end); $3: the first day still open after it (days before it are closed: daily rows); $4:
# the first day that was open before it; $5: from when hourly rows of every dimension are
# kept.
#
# ev: the slice's rows and the late-marked rows below $1, each once (the late ones looked
# up one by one by primary key, whatever the planner thinks of the marks table's size).
# Sessions are merged with their stored rows ("old", read before the upsert, in the same
# snapshot); the hours' session counts move by the difference between the merged rows and
# the old ones, so a session that grows, stops being a bounce or gets an earlier first
# event is counted once, where it now starts. The days that close in this slice get their
# daily rows from their hourly rows plus the slice's rows; hourly rows of the dimensions
# before $5 (and closed) are dropped. Sequences: see the comments at new_codes below.
_SLICE_SQL = """
WITH ev AS MATERIALIZED (
    SELECT v.site_id, v.created_at, v.id, v.event_type, v.page_url, v.referrer_url, v.visitor_id, v.session_id,
           v.country, v.device_type
    FROM public.visitor_events v
    WHERE v.created_at >= $1 AND v.created_at < $2 AND v.site_id IS NOT NULL
    UNION ALL
    SELECT v.site_id, v.created_at, v.id, v.event_type, v.page_url, v.referrer_url, v.visitor_id, v.session_id,
           v.country, v.device_type
    FROM public.site_rollup_late l
    CROSS JOIN LATERAL (SELECT * FROM public.visitor_events v
                        WHERE v.id = l.id AND v.created_at = l.created_at OFFSET 0) v
    WHERE l.created_at < $1 AND v.site_id IS NOT NULL
),
fresh AS (
    SELECT x.site_id, x.session_id, x.visitor_id, x.started_at, x.ended_at, x.events, x.page_views,
           x.first[1][1] AS landing_page, nullif(public.url_host(x.first[1][2]), public.url_host(x.first[1][1]))
               AS referrer_host, x.first[1][3]::uuid AS first_event_id, x.country, x.device_type
    FROM (
        SELECT e.site_id, e.session_id COLLATE "C" AS session_id, min(e.visitor_id) AS visitor_id,
               min(e.created_at) AS started_at, max(e.created_at) AS ended_at, count(*) AS events,
               count(*) FILTER (WHERE e.event_type = 'pageview') AS page_views,
               -- page, referrer and id of the first event, with one sort
               (array_agg(ARRAY[e.page_url, e.referrer_url, e.id::text] ORDER BY e.created_at, e.id))[1:1] AS first,
               min(e.country) AS country, min(e.device_type) AS device_type
        FROM ev e
        WHERE e.session_id IS NOT NULL
        GROUP BY 1, 2
    ) x
),
old AS MATERIALIZED (
    SELECT s.* FROM public.site_session_rollups s
    WHERE (s.site_id, s.session_id) IN (SELECT f.site_id, f.session_id FROM fresh f)
),
merged AS MATERIALIZED (
    SELECT f.site_id, f.session_id, least(o.visitor_id, f.visitor_id) AS visitor_id,
           least(o.started_at, f.started_at) AS started_at, greatest(o.ended_at, f.ended_at) AS ended_at,
           coalesce(o.events, 0) + f.events AS events, coalesce(o.page_views, 0) + f.page_views AS page_views,
           CASE WHEN w.earlier THEN f.landing_page ELSE o.landing_page END AS landing_page,
           CASE WHEN w.earlier THEN f.referrer_host ELSE o.referrer_host END AS referrer_host,
           CASE WHEN w.earlier THEN f.first_event_id ELSE o.first_event_id END AS first_event_id,
           least(o.country, f.country) AS country, least(o.device_type, f.device_type) AS device_type
    FROM fresh f
    LEFT JOIN old o ON o.site_id = f.site_id AND o.session_id = f.session_id
    CROSS JOIN LATERAL (SELECT o.site_id IS NULL OR (f.started_at, f.first_event_id)
                                                    < (o.started_at, o.first_event_id) AS earlier) w
),
sessions AS (
    INSERT INTO public.site_session_rollups AS s (site_id, session_id, visitor_id, started_at, ended_at, events,
        page_views, landing_page, referrer_host, first_event_id, country, device_type)
    SELECT m.site_id, m.session_id, m.visitor_id, m.started_at, m.ended_at, m.events, m.page_views, m.landing_page,
           m.referrer_host, m.first_event_id, m.country, m.device_type
    FROM merged m
    ON CONFLICT (site_id, session_id) DO UPDATE SET
        visitor_id = EXCLUDED.visitor_id, started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
        events = EXCLUDED.events, page_views = EXCLUDED.page_views, landing_page = EXCLUDED.landing_page,
        referrer_host = EXCLUDED.referrer_host, first_event_id = EXCLUDED.first_event_id,
        country = EXCLUDED.country, device_type = EXCLUDED.device_type
    RETURNING 1
),
-- the rows per site, dimension, hour, value and visitor hash
keyed AS MATERIALIZED (
    SELECT e.site_id, d.dimension, date_trunc('hour', e.created_at, 'UTC') AS hour, d.value,
           hashtextextended(e.visitor_id, 0) AS h, count(*) AS n,
           count(*) FILTER (WHERE e.event_type = 'pageview') AS pv
    FROM ev e
    CROSS JOIN LATERAL (
        SELECT x.dimension,
               CASE WHEN x.dimension = 'all' THEN ''
                    ELSE public.rollup_value(x.dimension, e.event_type, e.page_url, e.referrer_url, e.country,
                                             e.device_type) END AS value
        FROM unnest('{all,page,referrer,country,device,event_type}'::text[]) AS x (dimension)) d
    WHERE d.value IS NOT NULL
    GROUP BY 1, 2, 3, 4, 5
),
hourly AS (
    INSERT INTO public.site_hourly_rollups AS r (site_id, dimension, hour, value, events, page_views, visitors,
                                                  sessions, bounces, session_seconds)
    SELECT x.site_id, x.dimension, x.hour, x.value, sum(x.n), sum(x.pv),
           coalesce(array_agg(x.h ORDER BY x.h) FILTER (WHERE x.h IS NOT NULL), '{}'),
           sum(x.sessions), sum(x.bounces), sum(x.seconds)
    FROM (
        SELECT k.site_id, k.dimension, k.hour, k.value, k.h, k.n, k.pv, 0 AS sessions, 0 AS bounces,
               0::numeric AS seconds
        FROM keyed k
        WHERE k.dimension = 'all' OR k.hour >= $5 OR k.hour >= $3
        UNION ALL
        SELECT m.site_id, 'all', date_trunc('hour', m.started_at, 'UTC'), '', NULL, 0, 0, 1, (m.events = 1)::integer,
               extract(epoch FROM m.ended_at - m.started_at)
        FROM merged m
        UNION ALL
        SELECT o.site_id, 'all', date_trunc('hour', o.started_at, 'UTC'), '', NULL, 0, 0, -1, -(o.events = 1)::integer,
               -extract(epoch FROM o.ended_at - o.started_at)
        FROM old o
    ) x
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (site_id, dimension, hour, value) DO UPDATE
    SET events = r.events + EXCLUDED.events, page_views = r.page_views + EXCLUDED.page_views,
        visitors = pipeline.rollup_union(r.visitors, EXCLUDED.visitors),
        sessions = r.sessions + EXCLUDED.sessions, bounces = r.bounces + EXCLUDED.bounces,
        session_seconds = r.session_seconds + EXCLUDED.session_seconds
    RETURNING 1
),
-- closed days: the slice's rows of them, and the hours of the days closing now
to_days AS MATERIALIZED (
    SELECT k.site_id, k.dimension, (k.hour AT TIME ZONE 'UTC')::date AS day, k.value, k.n, k.pv, ARRAY[k.h] AS hashes
    FROM keyed k
    WHERE k.hour < $3
    UNION ALL
    SELECT r.site_id, r.dimension, (r.hour AT TIME ZONE 'UTC')::date, r.value, r.events, r.page_views, r.visitors
    FROM public.site_hourly_rollups r
    WHERE r.hour >= $4 AND r.hour < $3
),
daily AS (
    INSERT INTO public.site_daily_rollups AS r (site_id, dimension, day, value, events, page_views, visitors)
    SELECT c.site_id, c.dimension, c.day, c.value, c.events, c.page_views, coalesce(h.visitors, '{}')
    FROM (SELECT t.site_id, t.dimension, t.day, t.value, sum(t.n) AS events, sum(t.pv) AS page_views
          FROM to_days t GROUP BY 1, 2, 3, 4) c
    LEFT JOIN (SELECT t.site_id, t.dimension, t.day, t.value, array_agg(DISTINCT x.h ORDER BY x.h) AS visitors
               FROM to_days t CROSS JOIN LATERAL unnest(t.hashes) AS x (h)
               WHERE x.h IS NOT NULL
               GROUP BY 1, 2, 3, 4) h USING (site_id, dimension, day, value)
    ON CONFLICT (site_id, dimension, day, value) DO UPDATE
    SET events = r.events + EXCLUDED.events, page_views = r.page_views + EXCLUDED.page_views,
        visitors = pipeline.rollup_union(r.visitors, EXCLUDED.visitors)
    RETURNING 1
),
-- The funnel's sequences (migration 0041). New event types of a site get the next codes.
new_codes AS (
    INSERT INTO public.site_event_type_codes (site_id, event_type, n, code)
    SELECT t.site_id, t.event_type, m.n + t.k, public.event_type_code((m.n + t.k)::integer)
    FROM (SELECT d.site_id, d.event_type, row_number() OVER (PARTITION BY d.site_id ORDER BY d.event_type) AS k
          FROM (SELECT DISTINCT e.site_id, e.event_type COLLATE "C" AS event_type FROM ev e
                WHERE e.event_type IS NOT NULL) d
          WHERE NOT EXISTS (SELECT FROM public.site_event_type_codes c
                            WHERE c.site_id = d.site_id AND c.event_type = d.event_type)) t
    CROSS JOIN LATERAL (SELECT coalesce(max(c.n), -1) AS n FROM public.site_event_type_codes c
                        WHERE c.site_id = t.site_id) m
    RETURNING site_id, event_type, code
),
codes AS MATERIALIZED (
    SELECT c.site_id, c.event_type, c.code FROM public.site_event_type_codes c
    UNION ALL
    SELECT n.site_id, n.event_type, n.code FROM new_codes n
),
coded AS MATERIALIZED (
    SELECT e.site_id, coalesce(hashtextextended(e.visitor_id, 0), 0) AS visitor,
           date_trunc('hour', e.created_at, 'UTC') AS hour, e.created_at, e.id, c.code
    FROM ev e
    JOIN codes c ON c.site_id = e.site_id AND c.event_type = e.event_type COLLATE "C"
),
-- hours that get late rows are rebuilt from all their events below $2 (in this snapshot:
-- the rolled-up ones, the late ones, the slice's); the slice's events of other hours are
-- later than everything their hour holds, so they are appended
late_hours AS MATERIALIZED (
    SELECT DISTINCT k.site_id, k.visitor, k.hour FROM coded k WHERE k.created_at < $1
),
appended AS (
    SELECT k.site_id, k.visitor, k.hour, string_agg(k.code, '' ORDER BY k.created_at, k.id) AS codes
    FROM coded k
    WHERE NOT EXISTS (SELECT FROM late_hours l
                      WHERE l.site_id = k.site_id AND l.visitor = k.visitor AND l.hour = k.hour)
    GROUP BY 1, 2, 3
),
rebuilt AS (
    SELECT l.site_id, l.visitor, l.hour, string_agg(c.code, '' ORDER BY v.created_at, v.id) AS codes
    FROM late_hours l
    CROSS JOIN LATERAL (SELECT v.* FROM public.visitor_events v
                        WHERE v.site_id = l.site_id AND v.created_at >= l.hour
                          AND v.created_at < least(l.hour + interval '1 hour', $2)
                        OFFSET 0) v
    JOIN codes c ON c.site_id = v.site_id AND c.event_type = v.event_type COLLATE "C"
    WHERE coalesce(hashtextextended(v.visitor_id, 0), 0) = l.visitor
    GROUP BY 1, 2, 3
),
sequences AS (
    INSERT INTO public.site_visitor_sequences AS q (site_id, visitor, hour, codes)
    SELECT a.site_id, a.visitor, a.hour, coalesce(o.codes, '') || a.codes
    FROM appended a
    -- by primary key, one by one
    LEFT JOIN LATERAL (SELECT o.codes FROM public.site_visitor_sequences o
                       WHERE o.site_id = a.site_id AND o.visitor = a.visitor AND o.hour = a.hour OFFSET 0) o ON true
    UNION ALL
    SELECT r.site_id, r.visitor, r.hour, r.codes FROM rebuilt r
    ON CONFLICT (site_id, visitor, hour) DO UPDATE SET codes = EXCLUDED.codes
    RETURNING 1
),
dropped AS (
    DELETE FROM public.site_hourly_rollups r
    WHERE r.dimension <> 'all' AND r.hour < least($5, $3)
    RETURNING 1
)
SELECT (SELECT count(*) FROM ev) AS rows, (SELECT count(*) FROM ev WHERE created_at < $1) AS late,
       (SELECT count(*) FROM hourly) AS hourly_rows, (SELECT count(*) FROM daily) AS daily_rows,
       (SELECT count(*) FROM sessions) AS session_rows, (SELECT count(*) FROM dropped) AS dropped_rows,
       (SELECT count(*) FROM sequences) AS sequence_rows
"""


@dataclass(frozen=True)
class RollupRun:
    """What one ``roll_up`` call did."""

    slices: int = 0  # transactions committed
    rows: int = 0  # visitor_events rows added to the rollups
    late: int = 0  # of which marked late by the sinks
    rolled_to: datetime | None = None  # where the rollups end now
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was done, if so


async def roll_up(
    conn: asyncpg.Connection,
    *,
    lag: timedelta = timedelta(minutes=2),
    slice: timedelta = timedelta(hours=24),
    until: datetime | None = None,
    hourly_days: int = 8,
    lock_timeout: float = 5.0,
) -> RollupRun:
    """Roll visitor_events up to ``until`` (default: the database's ``now() - lag``);
    see the module docstring.

    Must be called outside a transaction. Returns at once (``skipped``) when another
    job is running or an unpartitioned visitor_events is still being converted (its
    rows arrive below any watermark without marks), and stops (``skipped``, what was
    done kept) when the sinks' lock cannot be had within ``lock_timeout`` seconds (a
    write transaction held open): waiting longer would hold up every sink behind it.
    """
    if conn.is_in_transaction():
        raise RuntimeError("roll_up needs a connection outside any transaction")
    if slice <= timedelta(0) or lag < timedelta(0):
        raise ValueError("slice must be positive and lag not negative")
    started = time.perf_counter()
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", _NAMESPACE, JOB_LOCK):
        return RollupRun(skipped=BUSY)
    try:
        if await conn.fetchval("SELECT to_regclass('pipeline.visitor_events_conversion')") and await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pipeline.visitor_events_conversion WHERE finished_at IS NULL)"):
            return RollupRun(skipped="visitor_events is being converted (pipeline migrate)")
        target = until or await conn.fetchval("SELECT now() - $1::interval", lag)
        # hourly rows of every dimension are kept for the last hourly_days days (never
        # brought back for days whose hours were dropped)
        keep_hours_from = await conn.fetchval(
            "SELECT greatest(hourly_from, date_trunc('day', $1::timestamptz, 'UTC') - make_interval(days => $2))"
            " FROM pipeline.rollup_state", target, hourly_days)
        slices = rows = late = 0
        rolled_to = None
        while True:
            try:
                tx, rolled_to = await _begin_slice(conn, target, lock_timeout)
            except asyncpg.LockNotAvailableError:
                return RollupRun(slices, rows, late, rolled_to, time.perf_counter() - started,
                                 skipped=f"sinks' lock not granted within {lock_timeout} s")
            try:
                if rolled_to is None:
                    start = end = await _next_rows(conn, None, target)
                else:
                    start = end = rolled_to
                if end + slice < target:  # more than one slice to go: skip empty partitions
                    end = await _next_rows(conn, end, target)
                end = min(target, end + slice)
                if rolled_to is not None and end <= start:
                    # caught up; rows marked late are merged by a slice of no time, once per call
                    if slices or not await conn.fetchval("SELECT EXISTS (SELECT FROM public.site_rollup_late)"):
                        await tx.rollback()
                        break
                    end = start
                # jit: the slice statement is large enough for JIT to spend seconds compiling it
                await conn.execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
                counts = await conn.fetchrow(_SLICE_SQL, start, end, _day(end), _day(start), keep_hours_from)
                await conn.execute("DELETE FROM public.site_rollup_late WHERE created_at < $1", end)
                await conn.execute(
                    "UPDATE pipeline.rollup_state SET rolled_to = $1, hourly_from = $2, updated_at = now()",
                    end, keep_hours_from)
                await tx.commit()
            except BaseException:
                if conn.is_in_transaction():
                    await tx.rollback()
                raise
            slices += 1
            rows += counts["rows"]
            late += counts["late"]
            rolled_to = end
            log.debug("rollups.slice", extra={"start": start.isoformat(), "end": end.isoformat(),
                                              "rows": counts["rows"], "late": counts["late"],
                                              "hourly_rows": counts["hourly_rows"],
                                              "daily_rows": counts["daily_rows"],
                                              "session_rows": counts["session_rows"],
                                              "dropped_rows": counts["dropped_rows"],
                                              "sequence_rows": counts["sequence_rows"]})
        if rows > 100_000:  # a first run or a long catch-up: the planner needs to know
            await conn.execute("ANALYZE " + ", ".join(TABLES))
        return RollupRun(slices, rows, late, rolled_to, time.perf_counter() - started)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", _NAMESPACE, JOB_LOCK)


def _day(t: datetime) -> datetime:
    """The UTC midnight at or before t."""
    return t.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


async def _begin_slice(conn: asyncpg.Connection, target: datetime, lock_timeout: float):
    """Raise the watermark to ``target`` and open the slice's REPEATABLE READ
    transaction, with its snapshot taken, while holding the sinks' lock exclusively.
    Returns (transaction, rolled_to as of the snapshot)."""
    await conn.execute(f"SET lock_timeout = '{int(lock_timeout * 1000)}ms'")
    try:
        await conn.execute("SELECT pg_advisory_lock($1, $2)", _NAMESPACE, HORIZON_LOCK)
    finally:
        await conn.execute("RESET lock_timeout")
    tx = None
    try:
        await conn.execute(
            "UPDATE pipeline.rollup_state SET watermark = greatest(watermark, $1), updated_at = now()", target)
        tx = conn.transaction(isolation="repeatable_read")
        await tx.start()
        rolled_to = await conn.fetchval("SELECT rolled_to FROM pipeline.rollup_state")  # the snapshot
    except BaseException:
        if tx is not None and conn.is_in_transaction():
            await tx.rollback()
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", _NAMESPACE, HORIZON_LOCK)
        raise
    try:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", _NAMESPACE, HORIZON_LOCK)
    except BaseException:
        await tx.rollback()
        raise
    return tx, rolled_to


async def _next_rows(conn: asyncpg.Connection, after: datetime | None, default: datetime) -> datetime:
    """Where rows at or after ``after`` (None: any) begin, in the snapshot, within a
    partition's time (its start, or ``after`` inside it); ``default`` if nowhere.

    Partitions are walked in time order and empty ones skipped, so a first run or a long
    catch-up does not step through empty days one transaction each; nothing reads more
    than one row of a partition (no index leads with created_at).
    """
    found = await conn.fetchval(
        "SELECT min(created_at) FROM pipeline.visitor_events_default"
        " WHERE created_at > '-infinity' AND created_at >= coalesce($1::timestamptz, '-infinity') AND created_at < $2",
        after, default)
    for part in await conn.fetch(
        "SELECT partition::text AS name, range_start FROM pipeline.visitor_events_partitions()"
        " WHERE NOT is_default AND range_end > coalesce($1::timestamptz, '-infinity') AND range_start < $2 ORDER BY range_start",
        after, found or default,
    ):
        if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {part['name']})"):
            begins = part["range_start"] if after is None else max(after, part["range_start"])
            found = begins if found is None else min(found, begins)
            break
    return default if found is None else min(found, default)


async def rebuild(conn: asyncpg.Connection) -> None:
    """Forget every rollup: the next ``roll_up`` builds them again from the oldest row.

    Waits for a running job. Until the rebuild has caught up, the functions read the
    raw rows for what is not rolled up yet: correct, only slower.
    """
    if conn.is_in_transaction():
        raise RuntimeError("rebuild needs a connection outside any transaction")
    await conn.execute("SELECT pg_advisory_lock($1, $2)", _NAMESPACE, JOB_LOCK)
    try:
        await conn.execute("SELECT pg_advisory_lock($1, $2)", _NAMESPACE, HORIZON_LOCK)
        try:
            async with conn.transaction():
                await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
                await conn.execute(
                    "UPDATE pipeline.rollup_state SET watermark = NULL, rolled_to = NULL, hourly_from = NULL,"
                    " updated_at = now()")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", _NAMESPACE, HORIZON_LOCK)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", _NAMESPACE, JOB_LOCK)
