-- Partition management for public.visitor_events, all in schema "pipeline".
--
-- Coverage is read from the catalog (pg_inherits + partition bounds), never
-- from a separate registry, so it cannot drift from what really exists, and a
-- granularity change never tries to create an overlapping partition.
-- Every function that formats or truncates timestamps pins TimeZone and
-- DateStyle, so bounds and names are UTC whatever the session says.

CREATE SCHEMA IF NOT EXISTS pipeline;

-- The granularity lives in the database so every worker creating partitions
-- on demand uses the same one. One row; schemas/migrate.py sets it.
CREATE TABLE IF NOT EXISTS pipeline.partition_config (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    granularity text NOT NULL DEFAULT 'day' CHECK (granularity IN ('day', 'week', 'month')),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pipeline.partition_config DEFAULT VALUES ON CONFLICT DO NOTHING;


-- The natural partition (UTC bounds and name) for a timestamp at a granularity.
CREATE OR REPLACE FUNCTION pipeline.partition_period(
    ts timestamptz, period text,
    OUT range_start timestamptz, OUT range_end timestamptz, OUT partition_name text)
LANGUAGE plpgsql STABLE
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
BEGIN
    IF ts IS NULL OR NOT isfinite(ts) THEN
        RAISE EXCEPTION 'visitor_events partitions need a finite timestamp, got %', ts
            USING ERRCODE = 'datetime_field_overflow';
    END IF;
    CASE period
        WHEN 'day' THEN
            range_start := date_trunc('day', ts, 'UTC');
            range_end := range_start + interval '1 day';
            partition_name := 'visitor_events_p' || to_char(range_start, 'YYYYMMDD');
        WHEN 'week' THEN  -- ISO weeks: Monday 00:00 UTC
            range_start := date_trunc('week', ts, 'UTC');
            range_end := range_start + interval '7 days';
            partition_name := 'visitor_events_w' || to_char(range_start, 'YYYYMMDD');
        WHEN 'month' THEN
            range_start := date_trunc('month', ts, 'UTC');
            range_end := range_start + interval '1 month';
            partition_name := 'visitor_events_m' || to_char(range_start, 'YYYYMM');
        ELSE
            RAISE EXCEPTION 'unknown partition granularity %', period
                USING ERRCODE = 'invalid_parameter_value';
    END CASE;
END
$$;


-- The partitions of visitor_events (or just only_partition) with their
-- bounds, parsed from the catalog (MINVALUE/MAXVALUE become -infinity/infinity;
-- the DEFAULT partition has none). MATERIALIZED: one deparse per partition.
CREATE OR REPLACE FUNCTION pipeline.visitor_events_partitions(only_partition regclass DEFAULT NULL)
RETURNS TABLE (partition regclass, range_start timestamptz, range_end timestamptz, is_default boolean)
LANGUAGE sql STABLE
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
    WITH parsed AS MATERIALIZED (
        SELECT i.inhrelid AS rel, e.expr,
               regexp_match(e.expr, '^FOR VALUES FROM \((.+)\) TO \((.+)\)$') AS b
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) e
        WHERE i.inhparent = to_regclass('public.visitor_events')
          AND (only_partition IS NULL OR i.inhrelid = only_partition)
    )
    SELECT rel::regclass,
           CASE b[1] WHEN 'MINVALUE' THEN '-infinity' WHEN 'MAXVALUE' THEN 'infinity'
                     ELSE btrim(b[1], '''') END::timestamptz,
           CASE b[2] WHEN 'MINVALUE' THEN '-infinity' WHEN 'MAXVALUE' THEN 'infinity'
                     ELSE btrim(b[2], '''') END::timestamptz,
           expr = 'DEFAULT'
    FROM parsed
    ORDER BY 4, 2
$$;


-- The non-default partition covering ts, if any (0 or 1 row). Usually that is
-- the one named after ts's period at the current granularity, so that one is
-- checked alone first: the hot path stays cheap however many partitions exist.
CREATE OR REPLACE FUNCTION pipeline.visitor_events_partition_for(ts timestamptz)
RETURNS TABLE (partition regclass, range_start timestamptz, range_end timestamptz)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    guess regclass;
BEGIN
    SELECT to_regclass(format('pipeline.%I', pp.partition_name)) INTO guess
    FROM pipeline.partition_config c CROSS JOIN LATERAL pipeline.partition_period(ts, c.granularity) pp;
    IF guess IS NOT NULL THEN
        RETURN QUERY SELECT p.partition, p.range_start, p.range_end
                     FROM pipeline.visitor_events_partitions(guess) p
                     WHERE NOT p.is_default AND p.range_start <= ts AND ts < p.range_end;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT p.partition, p.range_start, p.range_end
                 FROM pipeline.visitor_events_partitions() p
                 WHERE NOT p.is_default AND p.range_start <= ts AND ts < p.range_end;
END
$$;


-- Returns the partition covering ts, creating it if missing. Rows the DEFAULT
-- partition holds for the new range are moved into it in the same
-- transaction (PostgreSQL refuses to add a partition while DEFAULT holds rows
-- that belong to it); moved_rows says how many.
--
-- Concurrency: creators serialise on a transaction-scoped advisory lock
-- (namespace 0x70697065 'pipe', key 2) and re-check coverage after getting it,
-- so concurrent callers wait and then find the winner's partition. Call it in
-- READ COMMITTED (the default), outside a transaction that has already written
-- to visitor_events.
CREATE OR REPLACE FUNCTION pipeline.ensure_visitor_events_partition(
    ts timestamptz,
    OUT partition regclass, OUT range_start timestamptz, OUT range_end timestamptz,
    OUT moved_rows bigint)
LANGUAGE plpgsql VOLATILE
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD'
AS $$
#variable_conflict use_variable
DECLARE
    v_granularity text;
    v_base text;
    v_name text;
    v_suffix integer := 1;
    v_default regclass := to_regclass('pipeline.visitor_events_default');
BEGIN
    moved_rows := 0;
    -- fast path without the lock: the partition usually exists already
    SELECT f.partition, f.range_start, f.range_end INTO partition, range_start, range_end
    FROM pipeline.visitor_events_partition_for(ts) f;
    IF partition IS NOT NULL THEN
        RETURN;
    END IF;

    PERFORM pg_advisory_xact_lock(1885957733, 2);
    -- a new statement after the wait sees what a concurrent creator committed
    SELECT f.partition, f.range_start, f.range_end INTO partition, range_start, range_end
    FROM pipeline.visitor_events_partition_for(ts) f;
    IF partition IS NOT NULL THEN
        RETURN;
    END IF;

    SELECT c.granularity INTO STRICT v_granularity FROM pipeline.partition_config c;
    SELECT pp.range_start, pp.range_end, pp.partition_name INTO range_start, range_end, v_base
    FROM pipeline.partition_period(ts, v_granularity) pp;

    -- After a granularity change the natural period can overlap partitions made
    -- at the old one: shrink it to the free gap around ts (ts itself is free).
    SELECT greatest(range_start, max(p.range_end) FILTER (WHERE p.range_end <= ts)),
           least(range_end, min(p.range_start) FILTER (WHERE p.range_start > ts))
    INTO range_start, range_end
    FROM pipeline.visitor_events_partitions() p
    WHERE NOT p.is_default;

    -- a shrunk period can leave two gaps in one month/week: number the second
    v_name := v_base;
    WHILE to_regclass(format('pipeline.%I', v_name)) IS NOT NULL LOOP
        v_suffix := v_suffix + 1;
        v_name := v_base || '_' || v_suffix;
    END LOOP;

    -- Build as a plain table, fill it from DEFAULT, then ATTACH: ATTACH locks
    -- the parent less strongly than CREATE TABLE ... PARTITION OF, and the rows
    -- need somewhere to live while DEFAULT gives them up.
    EXECUTE format('CREATE TABLE pipeline.%I (LIKE public.visitor_events INCLUDING DEFAULTS)', v_name);
    IF v_default IS NOT NULL THEN
        -- ATTACH takes this lock anyway; taking it first stops inserts into
        -- DEFAULT for this range between the move and the ATTACH.
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', v_default);
        EXECUTE format(
            'WITH moved AS (DELETE FROM %s WHERE created_at >= $1 AND created_at < $2 RETURNING *)'
            ' INSERT INTO pipeline.%I SELECT * FROM moved', v_default, v_name)
            USING range_start, range_end;
        GET DIAGNOSTICS moved_rows = ROW_COUNT;
    END IF;
    EXECUTE format('ALTER TABLE public.visitor_events ATTACH PARTITION pipeline.%I FOR VALUES FROM (%L) TO (%L)',
                   v_name, range_start, range_end);
    partition := format('pipeline.%I', v_name)::regclass;
    IF moved_rows > 0 THEN
        RAISE NOTICE 'moved % rows from DEFAULT into new partition %', moved_rows, partition;
    END IF;
END
$$;


-- Partitions covering every instant of [range_from, range_to].
CREATE OR REPLACE FUNCTION pipeline.ensure_visitor_events_partitions(range_from timestamptz, range_to timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    t timestamptz := range_from;
BEGIN
    -- an infinite end would mean creating partitions forever
    IF NOT (isfinite(range_from) AND isfinite(range_to)) THEN
        RAISE EXCEPTION 'range must be finite: [%, %]', range_from, range_to
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF range_from > range_to THEN
        RAISE EXCEPTION 'empty range: % > %', range_from, range_to USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WHILE t <= range_to LOOP
        SELECT e.range_end INTO t FROM pipeline.ensure_visitor_events_partition(t) e;
    END LOOP;
END
$$;


-- Partitions for each of a batch's timestamps (what a worker calls before
-- COPY). Walks them in order and skips those the previous partition covers,
-- so a batch costs one call per distinct partition, not per row. Non-finite
-- and NULL timestamps are skipped: such rows land in DEFAULT and show up in
-- its row count.
CREATE OR REPLACE FUNCTION pipeline.ensure_visitor_events_partitions_for(ts timestamptz[])
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    t timestamptz;
    covered_until timestamptz;
BEGIN
    FOR t IN SELECT DISTINCT u.x FROM unnest(ts) AS u(x) WHERE isfinite(u.x) ORDER BY 1 LOOP
        CONTINUE WHEN t < covered_until;
        SELECT e.range_end INTO covered_until FROM pipeline.ensure_visitor_events_partition(t) e;
    END LOOP;
END
$$;


-- Rows currently in the DEFAULT partition. Exact, and cheap as long as the
-- DEFAULT stays near-empty, which is what this is for.
CREATE OR REPLACE FUNCTION pipeline.visitor_events_default_rows()
RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT count(*) FROM pipeline.visitor_events_default
$$;


-- Moves every row out of DEFAULT into a proper partition (creating partitions
-- as needed) and returns how many moved. Rows with an infinite created_at
-- cannot belong to any partition and stay; visitor_events_default_rows()
-- still counts them.
CREATE OR REPLACE FUNCTION pipeline.drain_visitor_events_default()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    t timestamptz;
    previous timestamptz;
    n bigint;
    total bigint := 0;
BEGIN
    LOOP
        SELECT min(d.created_at) INTO t FROM pipeline.visitor_events_default d WHERE isfinite(d.created_at);
        EXIT WHEN t IS NULL;
        -- each pass empties a whole range, so the same oldest row twice means no progress
        IF t = previous THEN
            RAISE EXCEPTION 'could not move rows at % out of the DEFAULT partition', t;
        END IF;
        previous := t;
        SELECT e.moved_rows INTO n FROM pipeline.ensure_visitor_events_partition(t) e;
        total := total + n;
    END LOOP;
    RETURN total;
END
$$;
