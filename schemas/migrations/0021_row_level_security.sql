-- Row-level security, Supabase style: a user (auth.uid(), see 0020) reads only the
-- events of sites it owns, and only its own sites, leads, segments and experiments.
--
-- The workers write as the tables' owner, which RLS does not apply to (it is not
-- FORCEd), so the sink is unaffected. Only SELECT policies exist on visitor_events:
-- nobody else writes there (0023 also revokes the write privileges).
--
-- Partitions: RLS on a partitioned table covers queries on the parent only; a
-- partition queried by name is checked against its own policies. So every partition
-- gets RLS and exactly the parent's policies, including partitions created later
-- (ensure_visitor_events_partition is wrapped below), and keeps no privileges of its
-- own: analysts read through the parent.

-- (SELECT ...) around the sub-queries makes them run once per query (an InitPlan),
-- and site_id = ANY(array) can then be an index condition.
CREATE POLICY pipeline_owner_select ON public.visitor_events
    FOR SELECT
    USING (site_id = ANY (ARRAY(SELECT s.id FROM public.sites s WHERE s.user_id = (SELECT auth.uid()))));
ALTER TABLE public.visitor_events ENABLE ROW LEVEL SECURITY;


-- A relation's policies as the text after "CREATE POLICY name ON table", for comparing
-- and re-creating them. The empty search_path makes every name in the expressions
-- schema-qualified, so the text means the same wherever it is replayed.
CREATE OR REPLACE FUNCTION pipeline.policy_clauses(rel regclass)
RETURNS TABLE (policy_name name, clause text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.polname,
           format('AS %s FOR %s TO %s',
                  CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                  CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                  CASE WHEN p.polroles = '{0}' THEN 'PUBLIC'
                       ELSE (SELECT string_agg(quote_ident(r.rolname), ', ' ORDER BY r.rolname)
                             FROM pg_roles r WHERE r.oid = ANY (p.polroles)) END)
           || coalesce(' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')', '')
           || coalesce(' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')', '')
    FROM pg_policy p
    WHERE p.polrelid = rel
$$;


-- Makes one partition as safe as its parent: RLS on, the parent's policies exactly
-- (extra or different ones dropped, missing ones created), no privileges for anyone
-- but the owner. Changes nothing when all is in order (ALTER and CREATE POLICY take
-- an exclusive lock on the partition). Returns whether it changed anything.
CREATE OR REPLACE FUNCTION pipeline.protect_visitor_events_partition(part regclass)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parent constant regclass := 'public.visitor_events'::regclass;
    changed boolean := false;
    pol record;
    grantee oid;
BEGIN
    IF NOT (SELECT c.relrowsecurity FROM pg_class c WHERE c.oid = part) THEN
        EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', part);
        changed := true;
    END IF;

    FOR pol IN
        SELECT m.policy_name FROM pipeline.policy_clauses(part) m
        WHERE NOT EXISTS (SELECT 1 FROM pipeline.policy_clauses(parent) p
                          WHERE p.policy_name = m.policy_name AND p.clause = m.clause)
    LOOP
        EXECUTE format('DROP POLICY %I ON %s', pol.policy_name, part);
        changed := true;
    END LOOP;
    FOR pol IN
        SELECT p.policy_name, p.clause FROM pipeline.policy_clauses(parent) p
        WHERE NOT EXISTS (SELECT 1 FROM pg_policy x WHERE x.polrelid = part AND x.polname = p.policy_name)
    LOOP
        EXECUTE format('CREATE POLICY %I ON %s ', pol.policy_name, part) || pol.clause;
        changed := true;
    END LOOP;

    -- e.g. default privileges would otherwise hand a new partition to API roles
    FOR grantee IN
        SELECT DISTINCT a.grantee FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
        WHERE c.oid = part AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE ALL ON %s FROM %s', part,
                       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE grantee::regrole::text END);
        changed := true;
    END LOOP;
    RETURN changed;
END
$$;


-- Every partition, DEFAULT included; returns how many needed a change. schemas/migrate.py
-- runs it on every migrate, which also covers partitions attached by hand and parent
-- policies changed later.
CREATE OR REPLACE FUNCTION pipeline.protect_visitor_events_partitions()
RETURNS integer
LANGUAGE sql VOLATILE
AS $$
    SELECT count(*) FILTER (WHERE pipeline.protect_visitor_events_partition(p.partition))::integer
    FROM pipeline.visitor_events_partitions() p
$$;


-- New partitions are protected in the transaction that creates them, so no session
-- ever sees one unprotected. 0004's function keeps doing the creating under a new
-- name; its callers (ensure_visitor_events_partitions, _for, drain) call this one by
-- its old name.
ALTER FUNCTION pipeline.ensure_visitor_events_partition(timestamptz)
    RENAME TO ensure_visitor_events_partition_unprotected;

CREATE FUNCTION pipeline.ensure_visitor_events_partition(
    ts timestamptz,
    OUT partition regclass, OUT range_start timestamptz, OUT range_end timestamptz,
    OUT moved_rows bigint)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
BEGIN
    moved_rows := 0;
    -- the common case, an existing partition, costs what it cost before
    SELECT f.partition, f.range_start, f.range_end INTO partition, range_start, range_end
    FROM pipeline.visitor_events_partition_for(ts) f;
    IF partition IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT e.partition, e.range_start, e.range_end, e.moved_rows
    INTO partition, range_start, range_end, moved_rows
    FROM pipeline.ensure_visitor_events_partition_unprotected(ts) e;
    PERFORM pipeline.protect_visitor_events_partition(partition);
END
$$;

SELECT pipeline.protect_visitor_events_partitions();


-- The reference tables: each row's user_id is its owner.
--   * RLS already on (an existing Supabase table): only our owner-read policy is
--     added; the app's own policies stay as they are.
--   * RLS off (our tables, or a Supabase table without it): turning it on must not
--     lock owners out of what they could do before, so owners also get to write their
--     own rows. Before, any role with a grant could write every row: this only narrows.
-- experiment_segments has no owner column: it belongs to its experiment's owner.
DO $do$
DECLARE
    t regclass;
    owner_check text;
    cmd text;
BEGIN
    FOREACH t IN ARRAY ARRAY['public.sites', 'public.leads', 'public.segments',
                             'public.experiments', 'public.experiment_segments']::regclass[] LOOP
        owner_check := CASE WHEN t = 'public.experiment_segments'::regclass
            THEN 'experiment_id IN (SELECT x.id FROM public.experiments x WHERE x.user_id = (SELECT auth.uid()))'
            ELSE 'user_id = (SELECT auth.uid())' END;
        IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = t) THEN
            EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
            FOREACH cmd IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
                IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t AND polname = 'pipeline_owner_' || cmd) THEN
                    EXECUTE format('CREATE POLICY %I ON %s FOR %s %s', 'pipeline_owner_' || cmd, t, upper(cmd),
                                   CASE cmd WHEN 'insert' THEN format('WITH CHECK (%s)', owner_check)
                                            WHEN 'update' THEN format('USING (%s) WITH CHECK (%s)', owner_check, owner_check)
                                            ELSE format('USING (%s)', owner_check) END);
                END IF;
            END LOOP;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = t AND polname = 'pipeline_owner_select') THEN
            EXECUTE format('CREATE POLICY pipeline_owner_select ON %s FOR SELECT USING (%s)', t, owner_check);
        END IF;
    END LOOP;

    -- The policies filter on user_id (and deleting an account cascades by it): index
    -- it unless some index already leads with it.
    FOREACH t IN ARRAY ARRAY['public.sites', 'public.leads', 'public.segments', 'public.experiments']::regclass[] LOOP
        IF NOT EXISTS (
            SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = t AND a.attname = 'user_id' AND i.indpred IS NULL
        ) THEN
            EXECUTE format('CREATE INDEX %I ON %s (user_id)',
                           (SELECT relname FROM pg_class WHERE oid = t) || '_user_id_idx', t);
        END IF;
    END LOOP;
END
$do$;
