-- Analysts' common questions as SQL functions, callable over PostgREST RPC
-- (POST /rest/v1/rpc/site_daily_stats {"site_id": ..., "from_time": ..., "to_time": ...})
-- and from SQL. docs/querying.md shows each with its plan and timing.
--
-- All are SECURITY INVOKER (the default): they read visitor_events with the caller's
-- rights, so row-level security applies and another owner's site simply has no rows.
-- They are plain LANGUAGE sql single-SELECT functions without SET clauses, so
-- PostgreSQL inlines them into the calling query: the time bounds prune partitions
-- and the site/lead/experiment id picks the index, as if the query were written out.
-- Time ranges are half-open, [from_time, to_time). A page view is event_type
-- 'pageview' (the collector's default type). Text grouping keys use COLLATE "C":
-- the same groups, without locale-aware comparisons in every sort.

-- Host of an absolute URL (scheme://[user@]host[:port]...), lower-case, without
-- "www." (like processors/sessions.py), else NULL. split_part, not a regular
-- expression: it runs for every event of a top-referrers query, and this is several
-- times cheaper. (An IPv6 literal host is not parsed.) One expression, so it is inlined.
CREATE OR REPLACE FUNCTION public.url_host(url text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN split_part(url, '/', 2) = '' AND right(split_part(url, '/', 1), 1) = ':' THEN
        nullif(substr(lower(split_part(split_part(split_part(split_part(split_part(url, '/', 3), '?', 1), '#', 1), '@', -1), ':', 1)),
                      CASE WHEN starts_with(lower(split_part(split_part(split_part(split_part(split_part(
                                url, '/', 3), '?', 1), '#', 1), '@', -1), ':', 1)), 'www.') THEN 5 ELSE 1 END), '')
    END
$$;


-- Per day: page views, events, unique visitors, sessions, bounces (sessions of one
-- event), bounce rate, mean session length (first to last event). A session counts
-- on the day of its first event in the range; events without a session_id count in
-- everything but the session figures. Days are dates in time_zone.
CREATE OR REPLACE FUNCTION public.site_daily_stats(
    site_id uuid, from_time timestamptz, to_time timestamptz, time_zone text DEFAULT 'UTC')
RETURNS TABLE (day date, page_views bigint, events bigint, visitors bigint, sessions bigint,
               bounces bigint, bounce_rate numeric, avg_session_seconds numeric)
LANGUAGE sql STABLE
AS $$
    WITH e AS (
        SELECT (v.created_at AT TIME ZONE site_daily_stats.time_zone)::date AS day,
               v.event_type, v.visitor_id COLLATE "C" AS visitor_id, v.session_id COLLATE "C" AS session_id,
               v.created_at
        FROM public.visitor_events v
        WHERE v.site_id = site_daily_stats.site_id
          AND v.created_at >= site_daily_stats.from_time AND v.created_at < site_daily_stats.to_time
    ),
    per_day AS (
        SELECT e.day, count(*) FILTER (WHERE e.event_type = 'pageview') AS page_views, count(*) AS events,
               count(DISTINCT e.visitor_id) AS visitors
        FROM e
        GROUP BY e.day
    ),
    per_session AS (
        SELECT min(e.day) AS day, count(*) AS events, max(e.created_at) - min(e.created_at) AS length
        FROM e
        WHERE e.session_id IS NOT NULL
        GROUP BY e.session_id
    ),
    session_days AS (
        SELECT s.day, count(*) AS sessions, count(*) FILTER (WHERE s.events = 1) AS bounces,
               avg(extract(epoch FROM s.length)) AS seconds
        FROM per_session s
        GROUP BY s.day
    )
    SELECT d.day, d.page_views, d.events, d.visitors, coalesce(s.sessions, 0), coalesce(s.bounces, 0),
           round(s.bounces::numeric / nullif(s.sessions, 0), 4), round(s.seconds, 1)
    FROM per_day d
    LEFT JOIN session_days s USING (day)
    ORDER BY d.day
$$;


-- One row per session with events in the range: its visitor, first and last event,
-- event and page-view counts, landing page, external referrer host of the landing
-- event, country, device, and whether it bounced (a single event).
CREATE OR REPLACE FUNCTION public.site_sessions(site_id uuid, from_time timestamptz, to_time timestamptz)
RETURNS TABLE (session_id text, visitor_id text, started_at timestamptz, ended_at timestamptz,
               events bigint, page_views bigint, landing_page text, referrer_host text,
               country text, device_type text, is_bounce boolean)
LANGUAGE sql STABLE
AS $$
    SELECT s.session_id::text, s.visitor_id, s.started_at, s.ended_at, s.events, s.page_views,
           s.first_hit[1][1], nullif(public.url_host(s.first_hit[1][2]), public.url_host(s.first_hit[1][1])),
           s.country, s.device_type, s.events = 1
    FROM (
        SELECT v.session_id COLLATE "C" AS session_id, min(v.visitor_id) AS visitor_id,
               min(v.created_at) AS started_at, max(v.created_at) AS ended_at,
               count(*) AS events, count(*) FILTER (WHERE v.event_type = 'pageview') AS page_views,
               -- page and referrer of the first event, with one sort
               (array_agg(ARRAY[v.page_url, v.referrer_url] ORDER BY v.created_at))[1:1] AS first_hit,
               min(v.country) AS country, min(v.device_type) AS device_type
        FROM public.visitor_events v
        WHERE v.site_id = site_sessions.site_id
          AND v.created_at >= site_sessions.from_time AND v.created_at < site_sessions.to_time
          AND v.session_id IS NOT NULL
        GROUP BY 1
    ) s
$$;


-- The top values of one dimension, by events, with their unique visitors:
--   'page'       page views by URL without query string and fragment
--   'referrer'   events whose referrer is another host than the page, by that host
--   'country'    events by country code ('(unknown)' when not located)
--   'device'     events by device type
--   'event_type' events by type
-- Any other dimension gives no rows.
CREATE OR REPLACE FUNCTION public.site_top(
    site_id uuid, from_time timestamptz, to_time timestamptz, dimension text, max_rows integer DEFAULT 10)
RETURNS TABLE (value text, events bigint, visitors bigint)
LANGUAGE sql STABLE
AS $$
    -- unique visitors as groups of (value, visitor): a hash aggregate, where
    -- count(DISTINCT) would sort every group
    SELECT d.value, sum(d.n)::bigint, count(d.visitor_id)
    FROM (
        SELECT x.value, x.visitor_id, count(*) AS n
        FROM (
            SELECT CASE site_top.dimension
                WHEN 'page' THEN CASE WHEN v.event_type = 'pageview'
                                      THEN split_part(split_part(v.page_url, '#', 1), '?', 1) END
                -- same scheme://authority is internal at a glance; only the rest needs parsing
                WHEN 'referrer' THEN CASE WHEN split_part(v.referrer_url, '/', 3) IS DISTINCT FROM split_part(v.page_url, '/', 3)
                                          THEN nullif(public.url_host(v.referrer_url), public.url_host(v.page_url)) END
                WHEN 'country' THEN coalesce(v.country, '(unknown)')
                WHEN 'device' THEN coalesce(v.device_type, '(unknown)')
                WHEN 'event_type' THEN v.event_type
            END COLLATE "C" AS value, v.visitor_id COLLATE "C" AS visitor_id
            FROM public.visitor_events v
            WHERE v.site_id = site_top.site_id
              AND v.created_at >= site_top.from_time AND v.created_at < site_top.to_time
            OFFSET 0  -- keeps the value computed once per event, not again for the test below
        ) x
        WHERE x.value IS NOT NULL
        GROUP BY 1, 2
    ) d
    GROUP BY d.value
    ORDER BY 2 DESC, 1
    LIMIT site_top.max_rows
$$;


-- Ordered funnels. funnel_progress(step ORDER BY created_at) is how many steps of a
-- funnel a visitor completed in order: step k counts only after step k-1.
CREATE OR REPLACE FUNCTION public.funnel_advance(reached integer, step integer)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN step = reached + 1 THEN step ELSE reached END
$$;

CREATE OR REPLACE AGGREGATE public.funnel_progress(integer) (
    SFUNC = public.funnel_advance, STYPE = integer, INITCOND = '0'
);

-- Visitors who did steps[1], then steps[2], ... (each after the previous, within the
-- range), per step, with the share of the previous step and of the first. Steps are
-- distinct event types.
CREATE OR REPLACE FUNCTION public.site_funnel(
    site_id uuid, from_time timestamptz, to_time timestamptz, steps text[])
RETURNS TABLE (step integer, event_type text, visitors bigint, of_previous numeric, of_first numeric)
LANGUAGE sql STABLE
AS $$
    WITH reached AS (
        SELECT public.funnel_progress(array_position(site_funnel.steps, v.event_type) ORDER BY v.created_at) AS n
        FROM public.visitor_events v
        WHERE v.site_id = site_funnel.site_id
          AND v.created_at >= site_funnel.from_time AND v.created_at < site_funnel.to_time
          AND v.event_type = ANY (site_funnel.steps)
        GROUP BY v.visitor_id COLLATE "C"
    ),
    counts AS (
        SELECT s.step, count(r.n) AS visitors
        FROM generate_series(1, cardinality(site_funnel.steps)) AS s(step)
        LEFT JOIN reached r ON r.n >= s.step
        GROUP BY s.step
    )
    SELECT c.step, site_funnel.steps[c.step], c.visitors,
           round(c.visitors::numeric / nullif(lag(c.visitors) OVER w, 0), 4),
           round(c.visitors::numeric / nullif(first_value(c.visitors) OVER w, 0), 4)
    FROM counts c
    WINDOW w AS (ORDER BY c.step)
    ORDER BY c.step
$$;


-- A lead's activity per day (in time_zone): events, page views, sessions, first and last event.
CREATE OR REPLACE FUNCTION public.lead_activity(
    lead_id uuid, from_time timestamptz, to_time timestamptz, time_zone text DEFAULT 'UTC')
RETURNS TABLE (day date, events bigint, page_views bigint, sessions bigint,
               first_seen timestamptz, last_seen timestamptz)
LANGUAGE sql STABLE
AS $$
    SELECT (v.created_at AT TIME ZONE lead_activity.time_zone)::date, count(*),
           count(*) FILTER (WHERE v.event_type = 'pageview'), count(DISTINCT v.session_id COLLATE "C"),
           min(v.created_at), max(v.created_at)
    FROM public.visitor_events v
    WHERE v.lead_id = lead_activity.lead_id
      AND v.created_at >= lead_activity.from_time AND v.created_at < lead_activity.to_time
    GROUP BY 1
    ORDER BY 1
$$;


-- What an experiment's participants did: events, unique visitors and sessions per event type.
CREATE OR REPLACE FUNCTION public.experiment_activity(
    experiment_id uuid, from_time timestamptz, to_time timestamptz)
RETURNS TABLE (event_type text, events bigint, visitors bigint, sessions bigint)
LANGUAGE sql STABLE
AS $$
    SELECT v.event_type, count(*), count(DISTINCT v.visitor_id COLLATE "C"), count(DISTINCT v.session_id COLLATE "C")
    FROM public.visitor_events v
    WHERE v.experiment_id = experiment_activity.experiment_id
      AND v.created_at >= experiment_activity.from_time AND v.created_at < experiment_activity.to_time
    GROUP BY v.event_type
    ORDER BY 2 DESC, 1
$$;
