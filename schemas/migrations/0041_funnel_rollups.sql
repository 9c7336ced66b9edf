-- The two analyst functions that still read every event of a large site's range:
-- site_funnel and experiment_activity (docs/querying.md#funnel-by-event-type).
--
--   experiment_activity  a covering index: the experiment's events of the range are read
--                        from the index alone (an index-only scan), not from the table.
--   site_funnel          visitors who reached step 1 are the unique visitors of that
--                        event type, from the rollups' visitor sets (0040); only visitors
--                        who did the second step's event type can reach steps 2 and on,
--                        and only their event sequences are read, from a new rollup:
--
--   site_event_type_codes   per site, one character per event type (its code)
--   site_visitor_sequences  per site, visitor and UTC hour: the codes of the visitor's
--                           events of the hour, in the funnel's order (created_at, then id)
--
-- A visitor reached step k when its sequence over the range contains the codes of steps
-- 1..k in that order (LIKE '%a%b%c%'): that is what 0022's fold computes, an event of step
-- k counting only after step k-1 was reached. The rollup job (pipeline/rollups.py) keeps
-- the sequences with the other rollups, in the same transaction per slice: a slice's
-- events are appended to their hour's sequence (they are later than everything in it);
-- an hour that gets late rows is rebuilt from all its events. The function reads whole
-- UTC hours below rollups_until() from the sequences and the rest (edges, the last
-- minutes, hours with rows marked late) from visitor_events, like the other functions.

-- 1. experiment_activity: everything it reads, site_id included (row-level security
-- checks it), is in the index; it also serves what the (experiment_id) index did (the
-- ON DELETE SET NULL from experiments), which it replaces. Created on the parent, so
-- every partition gets it (and new partitions too). The build blocks writes to
-- visitor_events while it runs (no CONCURRENTLY on a partitioned table, nor in a
-- migration's transaction): 2 s for 2 million events on the benchmark machine.
CREATE INDEX IF NOT EXISTS visitor_events_experiment_activity_idx
    ON public.visitor_events (experiment_id, created_at) INCLUDE (site_id, event_type, visitor_id, session_id)
    WHERE experiment_id IS NOT NULL;
DROP INDEX IF EXISTS public.visitor_events_experiment_id_idx;


-- 2. Event type codes. n counts a site's event types from 0 in the order the job meets
-- them; code is event_type_code(n). One character each, so a sequence is a short string
-- and a funnel a LIKE pattern; never '%', '_' or '\' (LIKE's special characters).
CREATE OR REPLACE FUNCTION public.event_type_code(n integer)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    -- 0-9A-Za-z first (one byte), then from U+0100 on (skipping the UTF-16 surrogates): a
    -- site with more than 62 event types needs a UTF8 database (Supabase's and ours are)
    SELECT CASE WHEN n < 62 THEN substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', n + 1, 1)
                WHEN n + 194 < 55296 THEN chr(n + 194)
                ELSE chr(n + 194 + 2048) END
$$;

CREATE TABLE IF NOT EXISTS public.site_event_type_codes (
    site_id    uuid             NOT NULL REFERENCES public.sites (id) ON DELETE CASCADE,
    event_type text COLLATE "C" NOT NULL,
    n          integer          NOT NULL,
    code       text COLLATE "C" NOT NULL,
    PRIMARY KEY (site_id, event_type),
    UNIQUE (site_id, n)
);

-- visitor: hashtextextended(visitor_id, 0) as in the rollups' visitor sets, 0 for events
-- without visitor_id (0022's funnel counts those together, as one visitor). Events without
-- event_type are left out (they are no funnel step).
CREATE TABLE IF NOT EXISTS public.site_visitor_sequences (
    site_id uuid             NOT NULL REFERENCES public.sites (id) ON DELETE CASCADE,
    visitor bigint           NOT NULL,
    hour    timestamptz      NOT NULL,
    codes   text COLLATE "C" NOT NULL,
    -- visitor first: the funnel looks its visitors up by "visitor = ANY (array)", and with
    -- site_id first a generic plan can prefer (site_id, hour) as the index condition and
    -- compare every row of the site's range with the whole array (seconds). Without an
    -- index leading with site_id, deleting a site scans the table (as for user_id, schema.md).
    PRIMARY KEY (visitor, site_id, hour)
) WITH (fillfactor = 90);  -- the current hour's rows are extended every run: room for HOT updates

DO $do$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['public.site_event_type_codes', 'public.site_visitor_sequences'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t::regclass AND polname = 'pipeline_owner_select') THEN
            EXECUTE format('CREATE POLICY pipeline_owner_select ON %s FOR SELECT USING (site_id = ANY (ARRAY('
                           'SELECT s.id FROM public.sites s WHERE s.user_id = (SELECT auth.uid()))))', t);
        END IF;
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
    END LOOP;
END
$do$;


-- 3. The funnel. Same signature, columns and answers as 0022's (events of equal created_at
-- in id order). For [from_time, to_time):
--   step 1       the distinct visitors with an event of steps[1]: the 'event_type' visitor
--                sets of site_daily_rollups / site_hourly_rollups where they cover the range,
--                visitor_events for the rest (as site_top reads them)
--   steps 2..    only visitors with an event of steps[2] (found the same way) can reach
--                them: their sequences, from site_visitor_sequences for the whole UTC hours
--                below rollups_until(), from visitor_events for the rest and for the hours
--                holding rows marked late (those hours entirely)
--   no visitor   events without visitor_id are one "visitor" (as in 0022): always among
--                the sequences read
-- A step that repeats an earlier one, or is NULL, is never reached (0022 maps an event
-- to the first step of its type), nor is any step after it.
CREATE OR REPLACE FUNCTION public.site_funnel(
    site_id uuid, from_time timestamptz, to_time timestamptz, steps text[])
RETURNS TABLE (step integer, event_type text, visitors bigint, of_previous numeric, of_first numeric)
LANGUAGE sql STABLE
AS $$
    WITH reach AS MATERIALIZED (
        -- how many steps can be reached at all
        SELECT coalesce((SELECT min(i) - 1 FROM generate_series(1, cardinality(site_funnel.steps)) i
                         WHERE site_funnel.steps[i] IS NULL
                            OR array_position(site_funnel.steps, site_funnel.steps[i]) <> i),
                        cardinality(site_funnel.steps), 0) AS k
    ),
    dict AS MATERIALIZED (
        SELECT c.event_type, c.code, c.n FROM public.site_event_type_codes c WHERE c.site_id = site_funnel.site_id
    ),
    -- each reachable step's code (a type the site's sequences do not hold yet gets an unused
    -- one, for its raw events) and the pattern of the steps up to it
    step_codes AS MATERIALIZED (
        SELECT x.step, x.event_type, x.code, '%' || string_agg(x.code, '%') OVER (ORDER BY x.step) || '%' AS pattern
        FROM (SELECT i AS step, site_funnel.steps[i] COLLATE "C" AS event_type,
                     coalesce(d.code, public.event_type_code((SELECT coalesce(max(d2.n), -1) FROM dict d2) + i)) AS code
              FROM reach, generate_series(1, reach.k) i
              LEFT JOIN dict d ON d.event_type = site_funnel.steps[i]) x
    ),
    -- visitors with an event of step 1 or 2, as 64-bit hashes, from site_top's sources: the
    -- 'event_type' visitor sets where they cover the range, visitor_events for the rest
    dc AS MATERIALIZED (
        SELECT * FROM public.rollup_coverage('dimension', from_time, to_time)
    ),
    sets AS MATERIALIZED (
        SELECT r.value, r.visitors
        FROM dc
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_daily_rollups r
                            WHERE dc.grain = 'day' AND r.site_id = site_funnel.site_id AND r.dimension = 'event_type'
                              AND r.day >= (dc.lo AT TIME ZONE 'UTC')::date AND r.day < (dc.hi AT TIME ZONE 'UTC')::date
                              AND r.value IN (SELECT s.event_type FROM step_codes s WHERE s.step <= 2)
                            OFFSET 0) r
        UNION ALL
        SELECT r.value, r.visitors
        FROM dc
        CROSS JOIN LATERAL (SELECT r.* FROM public.site_hourly_rollups r
                            WHERE dc.grain = 'hour' AND r.site_id = site_funnel.site_id AND r.dimension = 'event_type'
                              AND r.hour >= dc.lo AND r.hour < dc.hi
                              AND r.value IN (SELECT s.event_type FROM step_codes s WHERE s.step <= 2)
                            OFFSET 0) r
    ),
    unrolled_typed AS MATERIALIZED (
        SELECT e.event_type COLLATE "C" AS value, hashtextextended(e.visitor_id, 0) AS h
        FROM public.site_events_unrolled(site_funnel.site_id, from_time, to_time, 'dimension') e
        WHERE e.outside_buckets AND e.visitor_id IS NOT NULL
          AND e.event_type IN (SELECT s.event_type FROM step_codes s WHERE s.step <= 2)
    ),
    first_step AS MATERIALIZED (
        SELECT count(DISTINCT u.h) AS visitors
        FROM (SELECT x.h FROM sets t CROSS JOIN LATERAL unnest(t.visitors) AS x (h)
              WHERE t.value = (SELECT s.event_type FROM step_codes s WHERE s.step = 1)
              UNION ALL
              SELECT t.h FROM unrolled_typed t WHERE t.value = (SELECT s.event_type FROM step_codes s WHERE s.step = 1)) u
    ),
    -- whose sequences are read: the second step's visitors, and the events without visitor (0).
    -- Rows, not an array: "= ANY (array)" outside an index condition (a generic plan) would
    -- compare each row with every element.
    candidates AS MATERIALIZED (
        SELECT x.h AS visitor FROM sets t CROSS JOIN LATERAL unnest(t.visitors) AS x (h)
        WHERE t.value = (SELECT s.event_type FROM step_codes s WHERE s.step = 2)
        UNION
        SELECT t.h FROM unrolled_typed t WHERE t.value = (SELECT s.event_type FROM step_codes s WHERE s.step = 2)
        UNION
        SELECT 0
    ),
    hc AS MATERIALIZED (
        SELECT * FROM public.rollup_coverage('hour', from_time, to_time)
    ),
    -- events the sequences lack: outside the whole hours (in_hours false), or marked late
    -- inside them (their visitor's hour is then read whole)
    raw AS MATERIALIZED (
        SELECT e.id, e.created_at, e.event_type COLLATE "C" AS event_type, e.visitor_id,
               coalesce(hashtextextended(e.visitor_id, 0), 0) AS visitor,
               coalesce(e.created_at >= hc.lo AND e.created_at < hc.hi, false) AS in_hours
        FROM public.site_events_unrolled(site_funnel.site_id, from_time, to_time, 'hour') e
        LEFT JOIN hc ON true
        WHERE e.outside_buckets
          AND coalesce(hashtextextended(e.visitor_id, 0), 0) IN (SELECT c.visitor FROM candidates c)
    ),
    late_hours AS MATERIALIZED (
        SELECT DISTINCT r.visitor, r.visitor_id, date_trunc('hour', r.created_at, 'UTC') AS hour FROM raw r WHERE r.in_hours
    ),
    pieces AS (
        -- rolled-up hours, along the primary key, visitor by visitor (one index scan)
        SELECT q.visitor, q.hour AS at, NULL::uuid AS id, q.codes
        FROM hc
        CROSS JOIN LATERAL (SELECT q.* FROM public.site_visitor_sequences q
                            WHERE q.visitor = ANY (ARRAY(SELECT c.visitor FROM candidates c))
                              AND q.site_id = site_funnel.site_id AND q.hour >= hc.lo AND q.hour < hc.hi
                            OFFSET 0) q
        WHERE NOT EXISTS (SELECT 1 FROM late_hours l WHERE l.visitor = q.visitor AND l.hour = q.hour)
        UNION ALL
        -- events outside them
        SELECT r.visitor, r.created_at, r.id, s.code
        FROM raw r JOIN step_codes s ON s.event_type = r.event_type
        WHERE NOT r.in_hours
        UNION ALL
        -- hours with late rows: all their events, along (visitor_id, created_at)
        SELECT l.visitor, v.created_at, v.id, s.code
        FROM late_hours l
        CROSS JOIN hc
        CROSS JOIN LATERAL (SELECT v.* FROM public.visitor_events v
                            WHERE v.visitor_id = l.visitor_id
                              AND v.created_at >= from_time AND v.created_at < to_time  -- partitions pruned
                              AND v.created_at >= l.hour AND v.created_at < least(l.hour + interval '1 hour', hc.hi)
                            UNION ALL
                            SELECT v.* FROM public.visitor_events v
                            WHERE l.visitor_id IS NULL AND v.visitor_id IS NULL
                              AND v.created_at >= from_time AND v.created_at < to_time
                              AND v.created_at >= l.hour AND v.created_at < least(l.hour + interval '1 hour', hc.hi)) v
        JOIN step_codes s ON s.event_type = v.event_type COLLATE "C"
        WHERE v.site_id = site_funnel.site_id
    ),
    reached AS MATERIALIZED (
        -- each visitor's sequence: its pieces in time order (a window aggregate takes its rows
        -- in the window's order; one sort, where string_agg(... ORDER BY) sorts per visitor).
        -- A rolled-up hour (id NULL) never ties with an event of the same visitor: those are
        -- outside its hour, or it is replaced by them.
        -- Many visitors share a sequence: each distinct one is matched once.
        SELECT y.seq, y.visitors, y.no_visitor, (SELECT count(*) FROM step_codes s WHERE y.seq LIKE s.pattern) AS n
        FROM (SELECT x.seq, count(*) AS visitors, bool_or(x.visitor = 0) AS no_visitor
              FROM (SELECT p.visitor, string_agg(p.codes, '') OVER w AS seq, row_number() OVER w AS i
                    FROM pieces p
                    WINDOW w AS (PARTITION BY p.visitor ORDER BY p.at, p.id
                                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) x
              WHERE x.i = 1
              GROUP BY x.seq) y
    ),
    counts AS MATERIALIZED (
        SELECT g.step,
               CASE WHEN g.step > reach.k THEN 0
                    WHEN g.step = 1 THEN (SELECT f.visitors FROM first_step f)
                                         + (SELECT count(*) FROM reached r WHERE r.no_visitor AND r.n >= 1)
                    ELSE (SELECT coalesce(sum(r.visitors), 0) FROM reached r WHERE r.n >= g.step) END AS visitors
        FROM reach, generate_series(1, cardinality(site_funnel.steps)) AS g (step)
    )
    SELECT c.step, site_funnel.steps[c.step], c.visitors,
           round(c.visitors::numeric / nullif(lag(c.visitors) OVER w, 0), 4),
           round(c.visitors::numeric / nullif(first_value(c.visitors) OVER w, 0), 4)
    FROM counts c
    WINDOW w AS (ORDER BY c.step)
    ORDER BY c.step
$$;


-- Readers (0023, 0040) read the new tables like the other rollups and call the new function.
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
                   ' public.site_hourly_rollups, public.site_session_rollups, public.site_rollup_late,'
                   ' public.site_event_type_codes, public.site_visitor_sequences TO %s', grantee);
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.visitor_events,'
                   ' public.site_daily_rollups, public.site_hourly_rollups, public.site_session_rollups,'
                   ' public.site_rollup_late, public.site_event_type_codes, public.site_visitor_sequences'
                   ' FROM %s', grantee);
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
                   ' public.site_sessions_from_events(uuid, timestamptz, timestamptz),'
                   ' public.event_type_code(integer) TO %s', grantee);
END
$$;

DO $do$
DECLARE
    api_role text;
    reader regrole;
BEGIN
    REVOKE ALL ON public.site_event_type_codes, public.site_visitor_sequences FROM PUBLIC;
    -- Supabase's default privileges hand every new table in public to its API roles
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = api_role);
        EXECUTE format('REVOKE ALL ON public.site_event_type_codes, public.site_visitor_sequences FROM %I', api_role);
    END LOOP;
    -- whoever reads visitor_events reads these too: the funnel needs them
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


-- 4. A database that had rollups before this migration (0040) has them up to rolled_to,
-- with no sequences below it: the funnel would read empty sequences there. Build those
-- hours' sequences once, here, as the job would have appended them slice by slice (events
-- below rolled_to; rows marked late included: the job rebuilds their hours when it rolls
-- them up). Codes are numbered per site in event_type order. Nothing to do on a new
-- database (rolled_to is NULL) or when a site already has codes.
INSERT INTO public.site_event_type_codes (site_id, event_type, n, code)
SELECT t.site_id, t.event_type, t.n, public.event_type_code(t.n)
FROM (SELECT d.site_id, d.event_type,
             (row_number() OVER (PARTITION BY d.site_id ORDER BY d.event_type) - 1)::integer AS n
      FROM (SELECT DISTINCT v.site_id, v.event_type COLLATE "C" AS event_type
            FROM public.visitor_events v
            JOIN pipeline.rollup_state s ON v.created_at < s.rolled_to
            WHERE v.event_type IS NOT NULL) d
      WHERE NOT EXISTS (SELECT FROM public.site_event_type_codes c WHERE c.site_id = d.site_id)) t;

INSERT INTO public.site_visitor_sequences (site_id, visitor, hour, codes)
SELECT v.site_id, coalesce(hashtextextended(v.visitor_id, 0), 0), date_trunc('hour', v.created_at, 'UTC'),
       string_agg(c.code, '' ORDER BY v.created_at, v.id)
FROM public.visitor_events v
JOIN pipeline.rollup_state s ON v.created_at < s.rolled_to
JOIN public.site_event_type_codes c ON c.site_id = v.site_id AND c.event_type = v.event_type COLLATE "C"
GROUP BY 1, 2, 3
ON CONFLICT DO NOTHING;
