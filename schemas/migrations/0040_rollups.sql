-- Rollups: visitor_events pre-aggregated per site, so that the site-wide analyst
-- functions read a few hundred rows instead of every event of a large site.
-- docs/querying.md#rollups describes them; pipeline/rollups.py maintains them.
--
--   site_hourly_rollups   per site, UTC hour, dimension and value: events, page views,
--                         unique visitors. Dimension 'all' (the whole site, with the
--                         sessions that started in the hour) for all time: site_daily_stats
--                         in any time zone with whole-hour offsets, site_page_views. The
--                         other dimensions (site_top's) while their day is open and for
--                         ROLLUP_HOURLY_DAYS after: ranges that start or end inside a day.
--   site_daily_rollups    the same per UTC day, for closed days: the hours of a day are
--                         folded into it once when the day closes, so a row being filled is
--                         never a whole day's visitor set rewritten every minute
--   site_session_rollups  per session: what site_sessions returns
--   site_rollup_late      rows stored below the rollups' end that they do not hold yet
--
-- Exactness. The functions answer [from_time, to_time) from three parts:
--   * rollup rows of whole buckets (days, hours) below rollups_until(),
--   * visitor_events rows for the rest of the range (uncovered edges, the last minutes),
--   * visitor_events rows named in site_rollup_late: rows stored below rollups_until()
--     after the job had rolled that time up (a worker catching up, an event from the
--     past). The sink writes the marks in the transaction that stores the rows; the next
--     job run merges those rows into the rollups and deletes the marks, in one transaction.
-- Every aggregate merges exactly: counts add; unique visitors are sorted sets of 64-bit
-- hashes (hashtextextended(visitor_id, 0): a collision among n visitors has probability
-- about n^2/2^65, 3e-8 for a million); a session keeps its first and last event time,
-- its landing event (first by created_at, then id) and min() of visitor, country and
-- device. So every row is counted exactly once, whichever part holds it.
--
-- Access: the tables carry visitor_events' row-level security policy and readers get
-- SELECT on them (grant_read_access, replaced below). The functions stay SECURITY
-- INVOKER single-statement LANGUAGE sql, inlined into the caller's query.

CREATE TABLE IF NOT EXISTS pipeline.rollup_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- sinks mark the rows they store below this (pipeline.rollup_write_horizon()); the
    -- job raises it, under an exclusive advisory lock, before it takes its snapshot
    watermark   timestamptz,
    -- the rollups hold every visitor_events row below this, except those marked late
    rolled_to   timestamptz,
    -- hourly rows of every dimension are kept from here on (and for open days)
    hourly_from timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pipeline.rollup_state DEFAULT VALUES ON CONFLICT DO NOTHING;

-- dimension 'all' (value ''): every event; 'page', 'referrer', 'country', 'device',
-- 'event_type': the values of site_top (public.rollup_value()). visitors: the bucket's
-- distinct hashtextextended(visitor_id, 0), sorted. sessions, bounces, session_seconds
-- ('all' only, else 0): the sessions (of site_session_rollups) whose first event is in the
-- hour, those of a single event, and the sum of their lengths.
CREATE TABLE IF NOT EXISTS public.site_hourly_rollups (
    site_id         uuid             NOT NULL REFERENCES public.sites (id) ON DELETE CASCADE,
    dimension       text             NOT NULL,
    hour            timestamptz      NOT NULL,
    value           text COLLATE "C" NOT NULL,
    events          bigint           NOT NULL,
    page_views      bigint           NOT NULL,
    visitors        bigint[]         NOT NULL,
    sessions        bigint           NOT NULL,
    bounces         bigint           NOT NULL,
    session_seconds numeric          NOT NULL,
    PRIMARY KEY (site_id, dimension, hour, value)
) WITH (fillfactor = 90);  -- the current hour's rows are updated every run: room for HOT updates

CREATE TABLE IF NOT EXISTS public.site_daily_rollups (
    site_id    uuid             NOT NULL REFERENCES public.sites (id) ON DELETE CASCADE,
    dimension  text             NOT NULL,
    day        date             NOT NULL,
    value      text COLLATE "C" NOT NULL,
    events     bigint           NOT NULL,
    page_views bigint           NOT NULL,
    visitors   bigint[]         NOT NULL,
    PRIMARY KEY (site_id, dimension, day, value)
);

CREATE TABLE IF NOT EXISTS public.site_session_rollups (
    site_id        uuid             NOT NULL REFERENCES public.sites (id) ON DELETE CASCADE,
    session_id     text COLLATE "C" NOT NULL,
    visitor_id     text,
    started_at     timestamptz      NOT NULL,
    ended_at       timestamptz      NOT NULL,
    events         bigint           NOT NULL,
    page_views     bigint           NOT NULL,
    landing_page   text,
    referrer_host  text,
    first_event_id uuid             NOT NULL,  -- the landing event: first by (created_at, id)
    country        text,
    device_type    text,
    PRIMARY KEY (site_id, session_id)
) WITH (fillfactor = 90);
-- "the latest sessions" walk it backwards
CREATE INDEX IF NOT EXISTS site_session_rollups_started_at_idx
    ON public.site_session_rollups (site_id, started_at);
-- a site's longest session bounds how long before from_time a session crossing it started
CREATE INDEX IF NOT EXISTS site_session_rollups_length_idx
    ON public.site_session_rollups (site_id, (ended_at - started_at));

CREATE TABLE IF NOT EXISTS public.site_rollup_late (
    site_id    uuid        NOT NULL REFERENCES public.sites (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL,
    id         uuid        NOT NULL
);
CREATE INDEX IF NOT EXISTS site_rollup_late_site_id_created_at_idx
    ON public.site_rollup_late (site_id, created_at);

-- Row-level security as on visitor_events (0021): a reader sees the rows of the sites it
-- owns. The pipeline writes as the tables' owner (RLS is not FORCEd).
DO $do$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['public.site_daily_rollups', 'public.site_hourly_rollups',
                             'public.site_session_rollups', 'public.site_rollup_late'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t::regclass AND polname = 'pipeline_owner_select') THEN
            EXECUTE format('CREATE POLICY pipeline_owner_select ON %s FOR SELECT USING (site_id = ANY (ARRAY('
                           'SELECT s.id FROM public.sites s WHERE s.user_id = (SELECT auth.uid()))))', t);
        END IF;
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
    END LOOP;
END
$do$;


-- The sink's side of the hand-over (sinks/postgres.py), the last statement of its write
-- transaction: waits while the job is moving the watermark, then returns it; the sink
-- marks the rows it stored below it. The shared lock is held until the sink commits, so
-- the job (exclusive) waits for every write that read the old watermark before taking
-- its snapshot, and every later write reads the new one. plpgsql, so that the watermark
-- is read by a statement that starts after the lock is granted (a READ COMMITTED
-- snapshot taken before the wait could still show the old value).
CREATE OR REPLACE FUNCTION pipeline.rollup_write_horizon()
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    horizon timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1885958245, 3);  -- 'pipe' (0x70697065), key 3: pipeline/rollups.py
    SELECT s.watermark INTO horizon FROM pipeline.rollup_state s;
    RETURN horizon;
END
$$;

-- Sorted union of two sorted, distinct arrays (the job merges visitor sets with it).
CREATE OR REPLACE FUNCTION pipeline.rollup_union(a bigint[], b bigint[])
RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN cardinality(b) = 0 THEN a WHEN cardinality(a) = 0 THEN b
                ELSE ARRAY(SELECT DISTINCT x FROM unnest(a || b) AS x ORDER BY x) END
$$;

-- Where the rollups end: every visitor_events row below it is in them or named in
-- site_rollup_late; the days before its day are closed (daily rows). NULL before the first
-- job run. SECURITY DEFINER because readers have no access to schema pipeline; it is one
-- timestamp, the same for everybody.
CREATE OR REPLACE FUNCTION public.rollups_until()
RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.rolled_to FROM pipeline.rollup_state s
$$;

-- From where the hourly rows of every dimension exist (those of open days always do).
CREATE OR REPLACE FUNCTION public.rollups_hourly_from()
RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT least(s.hourly_from, date_trunc('day', s.rolled_to, 'UTC')) FROM pipeline.rollup_state s
$$;

-- An event's value in one of site_top's dimensions (NULL: not counted there). The job
-- and site_top both use it, so rolled-up and raw rows agree.
CREATE OR REPLACE FUNCTION public.rollup_value(dimension text, event_type text, page_url text, referrer_url text,
                                               country text, device_type text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE dimension
        WHEN 'page' THEN CASE WHEN event_type = 'pageview' THEN split_part(split_part(page_url, '#', 1), '?', 1) END
        -- same scheme://authority is internal at a glance; only the rest needs parsing
        WHEN 'referrer' THEN CASE WHEN split_part(referrer_url, '/', 3) IS DISTINCT FROM split_part(page_url, '/', 3)
                                  THEN nullif(public.url_host(referrer_url), public.url_host(page_url)) END
        WHEN 'country' THEN coalesce(country, '(unknown)')
        WHEN 'device' THEN coalesce(device_type, '(unknown)')
        WHEN 'event_type' THEN event_type
    END COLLATE "C"
$$;

-- The parts of [from_time, to_time) that rollup rows answer, ascending, and rollups_until()
-- ("until") on each. By unit:
--   'hour'       whole UTC hours inside the range, below until ('all' hourly rows, kept
--                for all time). With a time_zone whose midnights in the range are not whole
--                UTC hours (India, Nepal, Newfoundland ...) hours cannot be grouped into its
--                days: none.
--   'dimension'  site_top's dimensions: whole closed UTC days inside the range (daily rows,
--                grain 'day'), and whole hours from hourly_from on around or instead of
--                them (grain 'hour').
--   NULL         the session rollups: everything below until.
-- The bucket holding until counts when to_time is at or above it: its row holds exactly
-- the part below. Nothing is covered before the first job run.
CREATE OR REPLACE FUNCTION public.rollup_coverage(unit text, from_time timestamptz, to_time timestamptz,
                                                  time_zone text DEFAULT 'UTC')
RETURNS TABLE (grain text, lo timestamptz, hi timestamptz, until timestamptz)
LANGUAGE sql STABLE
AS $$
    WITH b AS MATERIALIZED (
        SELECT r.until, r.hourly_from,
               date_trunc('hour', from_time, 'UTC')
                   + CASE WHEN date_trunc('hour', from_time, 'UTC') < from_time THEN interval '1 hour'
                          ELSE interval '0' END AS first_hour,
               CASE WHEN to_time >= r.until THEN r.until ELSE date_trunc('hour', to_time, 'UTC') END AS end_hour,
               date_trunc('day', from_time, 'UTC')
                   + CASE WHEN date_trunc('day', from_time, 'UTC') < from_time THEN interval '1 day'
                          ELSE interval '0' END AS first_day,
               least(date_trunc('day', to_time, 'UTC'), date_trunc('day', r.until, 'UTC')) AS end_day
        FROM (SELECT public.rollups_until() AS until, public.rollups_hourly_from() AS hourly_from) r
        WHERE r.until IS NOT NULL
    ),
    parts AS (
        SELECT 'hour' AS grain, b.first_hour AS lo, b.end_hour AS hi, b.until
        FROM b
        WHERE unit = 'hour'
          AND (time_zone = 'UTC' OR NOT EXISTS (
              SELECT 1
              FROM generate_series((from_time AT TIME ZONE time_zone)::date::timestamp,
                                   (to_time AT TIME ZONE time_zone)::date::timestamp, interval '1 day') d
              WHERE (d AT TIME ZONE time_zone) <> date_trunc('hour', d AT TIME ZONE time_zone, 'UTC')))
        UNION ALL
        SELECT NULL, from_time, least(to_time, b.until), b.until FROM b WHERE unit IS NULL
        UNION ALL
        -- whole closed days, and the hours before and after them (all hours if none)
        SELECT 'day', b.first_day, b.end_day, b.until FROM b WHERE unit = 'dimension'
        UNION ALL
        SELECT 'hour', greatest(b.first_hour, b.hourly_from),
               CASE WHEN b.first_day < b.end_day THEN b.first_day ELSE b.end_hour END, b.until
        FROM b WHERE unit = 'dimension'
        UNION ALL
        SELECT 'hour', greatest(b.end_day, b.hourly_from), b.end_hour, b.until
        FROM b WHERE unit = 'dimension' AND b.first_day < b.end_day
    )
    SELECT p.grain, p.lo, p.hi, p.until FROM parts p WHERE p.lo < p.hi
$$;

-- The site's events in [from_time, to_time) that some rollup lacks, with which:
--   outside_buckets   not in the buckets of rollup_coverage(unit, ...): in a gap between
--                     its parts, or marked late inside one
--   outside_sessions  not in site_session_rollups: from rollups_until() on, or marked late
-- (A late row in a gap comes twice, once with each flag.)
CREATE OR REPLACE FUNCTION public.site_events_unrolled(site_id uuid, from_time timestamptz, to_time timestamptz,
                                                       unit text DEFAULT NULL, time_zone text DEFAULT 'UTC')
RETURNS TABLE (id uuid, created_at timestamptz, event_type text, page_url text, referrer_url text,
               visitor_id text, session_id text, country text, device_type text,
               outside_buckets boolean, outside_sessions boolean)
LANGUAGE sql STABLE
AS $$
    WITH c AS MATERIALIZED (
        SELECT * FROM public.rollup_coverage(unit, from_time, to_time, time_zone)
    ),
    gaps AS (
        SELECT coalesce(lag(c.hi) OVER (ORDER BY c.lo), from_time) AS a, c.lo AS b FROM c
        UNION ALL
        SELECT coalesce(max(c.hi), from_time), to_time FROM c
    )
    SELECT v.id, v.created_at, v.event_type, v.page_url, v.referrer_url, v.visitor_id, v.session_id, v.country,
           v.device_type, true, v.created_at >= coalesce((SELECT max(c.until) FROM c), '-infinity')
    FROM gaps g
    -- each gap its own index scan (OFFSET 0: also in a generic plan, which would rather
    -- read the whole range once and filter)
    CROSS JOIN LATERAL (SELECT v.* FROM public.visitor_events v
                        WHERE v.site_id = site_events_unrolled.site_id
                          AND v.created_at >= from_time AND v.created_at < to_time  -- partitions pruned
                          AND v.created_at >= g.a AND v.created_at < g.b
                        OFFSET 0) v
    WHERE g.a < g.b
    UNION ALL
    SELECT v.id, v.created_at, v.event_type, v.page_url, v.referrer_url, v.visitor_id, v.session_id, v.country,
           v.device_type, EXISTS (SELECT 1 FROM c WHERE l.created_at >= c.lo AND l.created_at < c.hi), true
    FROM public.site_rollup_late l
    -- by primary key, one by one
    CROSS JOIN LATERAL (SELECT v.* FROM public.visitor_events v
                        WHERE v.id = l.id AND v.created_at = l.created_at
                          AND v.created_at >= from_time AND v.created_at < to_time
                        OFFSET 0) v
    WHERE l.site_id = site_events_unrolled.site_id
      AND l.created_at >= from_time AND l.created_at < to_time AND l.created_at < public.rollups_until()
$$;

-- Rolled-up sessions of the site whose events cross from_time or to_time (only their
-- events in the range count). One that crosses from_time started at most the site's
-- longest session before it; one that crosses to_time, before to_time.
CREATE OR REPLACE FUNCTION public.site_sessions_crossing(site_id uuid, from_time timestamptz, to_time timestamptz)
RETURNS TABLE (session_id text)
LANGUAGE sql STABLE
AS $$
    SELECT r.session_id
    FROM public.site_session_rollups r
    WHERE r.site_id = site_sessions_crossing.site_id AND r.started_at < from_time AND r.ended_at >= from_time
      AND r.started_at >= from_time - (SELECT max(l.ended_at - l.started_at) FROM public.site_session_rollups l
                                       WHERE l.site_id = site_sessions_crossing.site_id)
    UNION ALL
    SELECT r.session_id
    FROM public.site_session_rollups r
    WHERE r.site_id = site_sessions_crossing.site_id AND r.started_at < to_time AND r.ended_at >= to_time
      -- one bound, so the planner does not expect the whole range
      AND r.started_at >= greatest(from_time, to_time - (SELECT max(l.ended_at - l.started_at)
                                                         FROM public.site_session_rollups l
                                                         WHERE l.site_id = site_sessions_crossing.site_id))
$$;

-- The range's sessions built from visitor_events (their events in the range): those the
-- session rollups cannot give as stored, i.e. sessions crossing from_time or to_time
-- and sessions with events outside the rollups. Read by session_id: a few sessions.
CREATE OR REPLACE FUNCTION public.site_sessions_from_events(site_id uuid, from_time timestamptz, to_time timestamptz)
RETURNS TABLE (session_id text, visitor_id text, started_at timestamptz, ended_at timestamptz,
               events bigint, page_views bigint, landing_page text, referrer_host text, country text,
               device_type text)
LANGUAGE sql STABLE
AS $$
    SELECT s.session_id, s.visitor_id, s.started_at, s.ended_at, s.events, s.page_views, s.first_hit[1][1],
           nullif(public.url_host(s.first_hit[1][2]), public.url_host(s.first_hit[1][1])), s.country, s.device_type
    FROM (
        SELECT v.session_id COLLATE "C" AS session_id, min(v.visitor_id) AS visitor_id,
               min(v.created_at) AS started_at, max(v.created_at) AS ended_at, count(*) AS events,
               count(*) FILTER (WHERE v.event_type = 'pageview') AS page_views,
               -- page and referrer of the first event, with one sort
               (array_agg(ARRAY[v.page_url, v.referrer_url] ORDER BY v.created_at, v.id))[1:1] AS first_hit,
               min(v.country) AS country, min(v.device_type) AS device_type
        -- session by session along (session_id): OFFSET 0, or a generic plan reads the site's range
        -- instead; from an array, which the planner takes for a few sessions (it is)
        FROM unnest(ARRAY(
            SELECT k.session_id COLLATE "default"  -- visitor_events' session_id index
            FROM public.site_sessions_crossing(site_sessions_from_events.site_id, from_time, to_time) k
            UNION
            SELECT e.session_id
            FROM public.site_events_unrolled(site_sessions_from_events.site_id, from_time, to_time) e
            WHERE e.outside_sessions AND e.session_id IS NOT NULL)) AS k (session_id)
        CROSS JOIN LATERAL (SELECT v.* FROM public.visitor_events v
                            WHERE v.session_id = k.session_id AND v.created_at >= from_time AND v.created_at < to_time
                            OFFSET 0) v
        WHERE v.site_id = site_sessions_from_events.site_id  -- outside: no index on site_id to combine with
        GROUP BY 1
    ) s
$$;


-- The analysts' functions of 0022, same signatures and columns, now reading the rollups.

-- One row per session with events in the range (only its events in the range count).
CREATE OR REPLACE FUNCTION public.site_sessions(site_id uuid, from_time timestamptz, to_time timestamptz)
RETURNS TABLE (session_id text, visitor_id text, started_at timestamptz, ended_at timestamptz,
               events bigint, page_views bigint, landing_page text, referrer_host text,
               country text, device_type text, is_bounce boolean)
LANGUAGE sql STABLE
AS $$
    -- Rolled-up sessions whole inside the range with no event outside the rollups, as
    -- stored, and the others built from events. The conditions are on the union, not in
    -- its branches: so the planner knows site_id as a constant in the first one, and
    -- "ORDER BY started_at DESC LIMIT n" reads it backwards along (site_id, started_at).
    SELECT u.session_id::text, u.visitor_id, u.started_at, u.ended_at, u.events, u.page_views, u.landing_page,
           u.referrer_host, u.country, u.device_type, u.events = 1
    FROM (
        SELECT false AS built, r.site_id, r.session_id, r.visitor_id, r.started_at, r.ended_at, r.events,
               r.page_views, r.landing_page, r.referrer_host, r.country, r.device_type
        FROM public.site_session_rollups r
        UNION ALL
        SELECT true, site_sessions.site_id, e.session_id, e.visitor_id, e.started_at, e.ended_at, e.events,
               e.page_views, e.landing_page, e.referrer_host, e.country, e.device_type
        FROM public.site_sessions_from_events(site_sessions.site_id, from_time, to_time) e
    ) u
    WHERE u.site_id = site_sessions.site_id
      AND u.started_at >= from_time AND u.started_at < to_time AND u.ended_at < to_time
      AND (u.built OR u.session_id NOT IN (
          SELECT e.session_id COLLATE "C"
          FROM public.site_events_unrolled(site_sessions.site_id, from_time, to_time) e
          WHERE e.outside_sessions AND e.session_id IS NOT NULL))
$$;


-- Page views per day (in time_zone); days with page views only.
CREATE OR REPLACE FUNCTION public.site_page_views(
    site_id uuid, from_time timestamptz, to_time timestamptz, time_zone text DEFAULT 'UTC')
RETURNS TABLE (day date, page_views bigint)
LANGUAGE sql STABLE
AS $$
    SELECT x.day, sum(x.n)::bigint
    FROM (
        SELECT (r.hour AT TIME ZONE site_page_views.time_zone)::date AS day, r.page_views AS n
        FROM public.rollup_coverage('hour', from_time, to_time, site_page_views.time_zone) c
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_hourly_rollups r
                            WHERE r.site_id = site_page_views.site_id AND r.dimension = 'all'
                              AND r.hour >= c.lo AND r.hour < c.hi
                            OFFSET 0) r
        UNION ALL
        SELECT (e.created_at AT TIME ZONE site_page_views.time_zone)::date, 1
        FROM public.site_events_unrolled(site_page_views.site_id, from_time, to_time, 'hour',
                                         site_page_views.time_zone) e
        WHERE e.outside_buckets AND e.event_type = 'pageview'
    ) x
    GROUP BY x.day
    HAVING sum(x.n) > 0
    ORDER BY x.day
$$;


-- Per day (in time_zone): page views, events, unique visitors, sessions, bounces (sessions
-- of one event), bounce rate, mean session length (first to last event). A session counts
-- on the day of its first event in the range; events without a session_id count in
-- everything but the session figures.
CREATE OR REPLACE FUNCTION public.site_daily_stats(
    site_id uuid, from_time timestamptz, to_time timestamptz, time_zone text DEFAULT 'UTC')
RETURNS TABLE (day date, page_views bigint, events bigint, visitors bigint, sessions bigint,
               bounces bigint, bounce_rate numeric, avg_session_seconds numeric)
LANGUAGE sql STABLE
AS $$
    WITH c AS MATERIALIZED (
        SELECT * FROM public.rollup_coverage('hour', from_time, to_time, site_daily_stats.time_zone)
    ),
    hours AS MATERIALIZED (
        SELECT (r.hour AT TIME ZONE site_daily_stats.time_zone)::date AS day, r.events, r.page_views, r.visitors,
               r.sessions, r.bounces, r.session_seconds
        FROM c
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_hourly_rollups r
                            WHERE r.site_id = site_daily_stats.site_id AND r.dimension = 'all'
                              AND r.hour >= c.lo AND r.hour < c.hi
                            OFFSET 0) r
    ),
    unrolled AS MATERIALIZED (
        SELECT e.*, (e.created_at AT TIME ZONE site_daily_stats.time_zone)::date AS day
        FROM public.site_events_unrolled(site_daily_stats.site_id, from_time, to_time, 'hour',
                                         site_daily_stats.time_zone) e
    ),
    per_day AS (
        SELECT x.day, sum(x.page_views)::bigint AS page_views, sum(x.events)::bigint AS events
        FROM (SELECT h.day, h.page_views, h.events FROM hours h
              UNION ALL
              SELECT u.day, (u.event_type = 'pageview')::integer, 1 FROM unrolled u WHERE u.outside_buckets) x
        GROUP BY x.day
    ),
    -- Unique visitors. A day that is also a closed UTC day has its visitors in one daily
    -- row; other days unite the hours' sets. One set alone is counted by its size.
    whole_days AS MATERIALIZED (
        SELECT r.day, r.visitors
        FROM public.rollup_coverage('dimension', from_time, to_time) d
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_daily_rollups r
                            WHERE r.site_id = site_daily_stats.site_id AND r.dimension = 'all' AND r.value = ''
                              AND r.day >= (d.lo AT TIME ZONE 'UTC')::date AND r.day < (d.hi AT TIME ZONE 'UTC')::date
                            OFFSET 0) r
        WHERE d.grain = 'day' AND (r.day::timestamp AT TIME ZONE site_daily_stats.time_zone) = (r.day::timestamp AT TIME ZONE 'UTC')
          AND ((r.day + 1)::timestamp AT TIME ZONE site_daily_stats.time_zone)
              = ((r.day + 1)::timestamp AT TIME ZONE 'UTC')
    ),
    visitor_sets AS MATERIALIZED (
        SELECT w.day, w.visitors AS hashes FROM whole_days w
        UNION ALL
        SELECT h.day, h.visitors FROM hours h WHERE h.day NOT IN (SELECT w.day FROM whole_days w)
        UNION ALL
        SELECT u.day, array_agg(DISTINCT hashtextextended(u.visitor_id, 0)) FILTER (WHERE u.visitor_id IS NOT NULL)
        FROM unrolled u WHERE u.outside_buckets GROUP BY u.day
    ),
    day_visitors AS (
        SELECT s.day, CASE WHEN count(*) = 1 THEN sum(cardinality(s.hashes))
                           ELSE (SELECT count(DISTINCT x.h) FROM visitor_sets x2, unnest(x2.hashes) AS x (h)
                                 WHERE x2.day = s.day) END AS visitors
        FROM visitor_sets s
        GROUP BY s.day
    ),
    -- Sessions: the hours' counts, minus the rolled-up sessions counted there that are
    -- built from events instead (crossing to_time, events outside the rollups), plus the
    -- stored sessions starting outside the hours, plus the sessions built from events.
    crossing AS MATERIALIZED (
        SELECT k.session_id COLLATE "C" AS session_id
        FROM public.site_sessions_crossing(site_daily_stats.site_id, from_time, to_time) k
        UNION
        SELECT u.session_id COLLATE "C" FROM unrolled u WHERE u.outside_sessions AND u.session_id IS NOT NULL
    ),
    built AS MATERIALIZED (
        SELECT v.session_id COLLATE "C" AS session_id, min(v.created_at) AS started_at,
               max(v.created_at) AS ended_at, count(*) AS events
        FROM unnest(ARRAY(SELECT k.session_id COLLATE "default" FROM crossing k)) AS k (session_id)
        CROSS JOIN LATERAL (SELECT v.* FROM public.visitor_events v
                            WHERE v.session_id = k.session_id AND v.created_at >= from_time AND v.created_at < to_time
                            OFFSET 0) v
        WHERE v.site_id = site_daily_stats.site_id
        GROUP BY 1
    ),
    session_parts AS (
        SELECT h.day, h.sessions AS n, h.bounces AS b, h.session_seconds AS s FROM hours h
        UNION ALL
        SELECT (r.started_at AT TIME ZONE site_daily_stats.time_zone)::date, -1, -(r.events = 1)::integer,
               -extract(epoch FROM r.ended_at - r.started_at)
        FROM c, unnest(ARRAY(SELECT k.session_id FROM crossing k)) AS k (session_id)
        -- by primary key, one by one
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_session_rollups r
                            WHERE r.site_id = site_daily_stats.site_id AND r.session_id = k.session_id
                            OFFSET 0) r
        WHERE r.started_at >= c.lo AND r.started_at < c.hi
        UNION ALL
        SELECT (r.started_at AT TIME ZONE site_daily_stats.time_zone)::date, 1, (r.events = 1)::integer,
               extract(epoch FROM r.ended_at - r.started_at)
        FROM c
        CROSS JOIN LATERAL (VALUES (from_time, c.lo), (c.hi, to_time)) AS g (a, b)
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_session_rollups r
                            WHERE r.site_id = site_daily_stats.site_id
                              AND r.started_at >= g.a AND r.started_at < g.b AND r.ended_at < to_time
                            OFFSET 0) r
        WHERE r.session_id NOT IN (SELECT k.session_id FROM crossing k)
        UNION ALL
        SELECT (b.started_at AT TIME ZONE site_daily_stats.time_zone)::date, 1, (b.events = 1)::integer,
               extract(epoch FROM b.ended_at - b.started_at)
        FROM built b
    ),
    session_days AS (
        SELECT p.day, sum(p.n)::bigint AS sessions, sum(p.b)::bigint AS bounces, sum(p.s) AS seconds
        FROM session_parts p
        GROUP BY p.day
    )
    SELECT d.day, d.page_views, d.events, coalesce(v.visitors, 0)::bigint, coalesce(s.sessions, 0),
           coalesce(s.bounces, 0), round(s.bounces::numeric / nullif(s.sessions, 0), 4),
           round(s.seconds / nullif(s.sessions, 0), 1)
    FROM per_day d
    LEFT JOIN day_visitors v USING (day)
    LEFT JOIN session_days s USING (day)
    ORDER BY d.day
$$;


-- The top values of one dimension, by events, with their unique visitors (see 0022).
CREATE OR REPLACE FUNCTION public.site_top(
    site_id uuid, from_time timestamptz, to_time timestamptz, dimension text, max_rows integer DEFAULT 10)
RETURNS TABLE (value text, events bigint, visitors bigint)
LANGUAGE sql STABLE
AS $$
    WITH c AS MATERIALIZED (
        SELECT * FROM public.rollup_coverage('dimension', from_time, to_time)
    ),
    rolled AS MATERIALIZED (
        -- whole closed days from the daily rows, the hours around them from the hourly ones
        SELECT r.value, r.events, r.visitors
        FROM c
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_daily_rollups r
                            WHERE c.grain = 'day' AND r.site_id = site_top.site_id
                              AND r.dimension = site_top.dimension
                              AND r.day >= (c.lo AT TIME ZONE 'UTC')::date AND r.day < (c.hi AT TIME ZONE 'UTC')::date
                            OFFSET 0) r
        UNION ALL
        SELECT r.value, r.events, r.visitors
        FROM c
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_hourly_rollups r
                            WHERE c.grain = 'hour' AND r.site_id = site_top.site_id
                              AND r.dimension = site_top.dimension AND r.hour >= c.lo AND r.hour < c.hi
                            OFFSET 0) r
    ),
    raw AS MATERIALIZED (
        SELECT x.value, hashtextextended(x.visitor_id, 0) AS h
        FROM (SELECT public.rollup_value(site_top.dimension, e.event_type, e.page_url, e.referrer_url, e.country,
                                         e.device_type) AS value, e.visitor_id
              FROM public.site_events_unrolled(site_top.site_id, from_time, to_time, 'dimension') e
              WHERE e.outside_buckets
              OFFSET 0) x  -- the value computed once per event
        WHERE x.value IS NOT NULL
    ),
    top AS (
        SELECT t.value, sum(t.n)::bigint AS events
        FROM (SELECT r.value, r.events AS n FROM rolled r UNION ALL SELECT w.value, 1 FROM raw w) t
        GROUP BY t.value
        ORDER BY 2 DESC, 1
        LIMIT site_top.max_rows
    )
    -- unique visitors only for the values shown, each its own (smaller) sort
    SELECT t.value, t.events,
           (SELECT count(DISTINCT u.h)
            FROM (SELECT x.h FROM rolled r, unnest(r.visitors) AS x (h) WHERE r.value = t.value
                  UNION ALL
                  SELECT w.h FROM raw w WHERE w.value = t.value) u)
    FROM top t
    ORDER BY 2 DESC, 1
$$;


-- auth.login_user_id() (0020, plain PostgreSQL only) in plpgsql: the same query, but its
-- plan is kept for the session. As LANGUAGE sql SECURITY DEFINER it was planned again at
-- every call, about 0.5 ms, and row-level security calls it once per table a query reads.
DO $do$
BEGIN
    IF obj_description(to_regprocedure('auth.login_user_id(name)'), 'pg_proc') LIKE 'pipeline:%' THEN
        CREATE OR REPLACE FUNCTION auth.login_user_id(login name) RETURNS uuid
        LANGUAGE plpgsql STABLE SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $fn$
        BEGIN
            RETURN (SELECT a.user_id
                    FROM pipeline.analyst_users a
                    JOIN pg_roles r ON r.rolname = a.role_name
                    WHERE a.role_name = login AND pg_has_role(session_user, r.oid, 'MEMBER'));
        END
        $fn$;
    END IF;
END
$do$;


-- Readers (0023) read the rollups like visitor_events and call the new functions.
CREATE OR REPLACE FUNCTION pipeline.grant_read_access(grantee regrole)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %s', grantee);
    IF NOT has_schema_privilege(grantee, 'auth', 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA auth TO %s', grantee);
    END IF;
    IF NOT has_function_privilege(grantee, 'auth.uid()', 'EXECUTE') THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION auth.uid() TO %s', grantee);
    END IF;
    EXECUTE format('GRANT SELECT ON public.visitor_events, public.sites, public.leads, public.segments,'
                   ' public.experiments, public.experiment_segments, public.site_daily_rollups,'
                   ' public.site_hourly_rollups, public.site_session_rollups, public.site_rollup_late TO %s', grantee);
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.visitor_events,'
                   ' public.site_daily_rollups, public.site_hourly_rollups, public.site_session_rollups,'
                   ' public.site_rollup_late FROM %s', grantee);
    EXECUTE format('GRANT EXECUTE ON FUNCTION public.url_host(text),'
                   ' public.site_daily_stats(uuid, timestamptz, timestamptz, text),'
                   ' public.site_sessions(uuid, timestamptz, timestamptz),'
                   ' public.site_top(uuid, timestamptz, timestamptz, text, integer),'
                   ' public.funnel_advance(integer, integer), public.funnel_progress(integer),'
                   ' public.site_funnel(uuid, timestamptz, timestamptz, text[]),'
                   ' public.lead_activity(uuid, timestamptz, timestamptz, text),'
                   ' public.experiment_activity(uuid, timestamptz, timestamptz),'
                   ' public.site_page_views(uuid, timestamptz, timestamptz, text),'
                   ' public.rollups_until(), public.rollups_hourly_from(), public.rollup_value(text, text, text, text, text, text),'
                   ' public.rollup_coverage(text, timestamptz, timestamptz, text),'
                   ' public.site_events_unrolled(uuid, timestamptz, timestamptz, text, text),'
                   ' public.site_sessions_crossing(uuid, timestamptz, timestamptz),'
                   ' public.site_sessions_from_events(uuid, timestamptz, timestamptz) TO %s', grantee);
END
$$;

DO $do$
DECLARE
    api_role text;
    reader regrole;
BEGIN
    REVOKE ALL ON public.site_daily_rollups, public.site_hourly_rollups, public.site_session_rollups,
                  public.site_rollup_late FROM PUBLIC;
    -- Supabase's default privileges hand every new table in public to its API roles
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = api_role);
        EXECUTE format('REVOKE ALL ON public.site_daily_rollups, public.site_hourly_rollups,'
                       ' public.site_session_rollups, public.site_rollup_late FROM %I', api_role);
    END LOOP;
    -- whoever reads visitor_events (authenticated, analyst, roles given grant_read_access)
    -- reads the rollups: the functions need them
    FOR reader IN
        SELECT DISTINCT a.grantee::regrole
        FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
        WHERE c.oid = 'public.visitor_events'::regclass AND a.privilege_type = 'SELECT'
          AND a.grantee <> c.relowner AND a.grantee <> 0
    LOOP
        PERFORM pipeline.grant_read_access(reader);
    END LOOP;
END
$do$;
