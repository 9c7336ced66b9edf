-- Who may read what. Row-level security (0021) decides which rows; these privileges
-- decide which statements. Readers get SELECT and nothing else on visitor_events:
-- INSERT/UPDATE/DELETE fail with "permission denied" rather than silently touching no
-- row, and TRUNCATE, which row-level security does not cover, is not theirs.

-- Read access for a role: schemas, SELECT on visitor_events and the reference tables,
-- the analytics functions, auth.uid(). Only what the role lacks is granted (on
-- Supabase, schema auth is not ours to grant on, and its roles have it already).
-- Use it for any other reader, e.g. SELECT pipeline.grant_read_access('metabase');
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
                   ' public.experiments, public.experiment_segments TO %s', grantee);
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON public.visitor_events FROM %s',
                   grantee);
    EXECUTE format('GRANT EXECUTE ON FUNCTION public.url_host(text),'
                   ' public.site_daily_stats(uuid, timestamptz, timestamptz, text),'
                   ' public.site_sessions(uuid, timestamptz, timestamptz),'
                   ' public.site_top(uuid, timestamptz, timestamptz, text, integer),'
                   ' public.funnel_advance(integer, integer), public.funnel_progress(integer),'
                   ' public.site_funnel(uuid, timestamptz, timestamptz, text[]),'
                   ' public.lead_activity(uuid, timestamptz, timestamptz, text),'
                   ' public.experiment_activity(uuid, timestamptz, timestamptz) TO %s', grantee);
END
$$;

DO $do$
DECLARE
    api_role text;
BEGIN
    REVOKE ALL ON public.visitor_events FROM PUBLIC;
    -- Supabase: default privileges give anon and authenticated everything on a new
    -- table in public. Signed-in users read (their own rows); nobody else gets in, and
    -- events are written by the pipeline only.
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = api_role);
        EXECUTE format('REVOKE ALL ON public.visitor_events FROM %I', api_role);
        -- TRUNCATE ignores row-level security
        EXECUTE format('REVOKE TRUNCATE, REFERENCES, TRIGGER ON public.sites, public.leads, public.segments,'
                       ' public.experiments, public.experiment_segments FROM %I', api_role);
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        PERFORM pipeline.grant_read_access('authenticated');
    END IF;
    -- Analysts only where auth.uid() is ours (0020): it knows them by login role.
    -- Supabase's believes the JWT claim, which anyone with an SQL session can SET.
    IF to_regprocedure('auth.login_user_id(name)') IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'analyst') THEN
        PERFORM pipeline.grant_read_access('analyst');
    END IF;
END
$do$;
