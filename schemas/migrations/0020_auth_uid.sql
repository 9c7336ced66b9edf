-- Who is asking: auth.uid(), which every row-level security policy (0021) compares
-- owners with.
--
-- Supabase has auth.uid() already: it reads the JWT claims PostgREST sets per request
-- (request.jwt.claim.sub, or request.jwt.claims ->> 'sub'). It is never replaced.
--
-- Where there is none (plain PostgreSQL, our stand-in auth schema from 0001) we add
-- one; nothing existing is changed. It honours the same JWT settings, for a PostgREST
-- in front of plain PostgreSQL, except for members of the group role "analyst": those
-- have their own SQL sessions and could SET any claim they like, so an analyst is
-- whoever pipeline.analyst_users says its login role is, and a claim is ignored.

CREATE SCHEMA IF NOT EXISTS pipeline;

-- Analyst login role -> the auth.users id whose sites it may read (plain PostgreSQL).
-- By name, so it can be filled before or after the role is created.
CREATE TABLE IF NOT EXISTS pipeline.analyst_users (
    role_name  name        PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);

DO $do$
BEGIN
    IF to_regprocedure('auth.uid()') IS NOT NULL THEN
        RETURN;  -- Supabase's (or the operator's): left exactly as it is
    END IF;

    -- SECURITY DEFINER so analysts need no access to schema pipeline. It answers only
    -- for a role the session's login may act as, so it cannot be used to look up
    -- another analyst's owner id.
    CREATE FUNCTION auth.login_user_id(login name) RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $fn$
        SELECT a.user_id
        FROM pipeline.analyst_users a
        JOIN pg_roles r ON r.rolname = a.role_name
        WHERE a.role_name = login AND pg_has_role(session_user, r.oid, 'MEMBER')
    $fn$;
    COMMENT ON FUNCTION auth.login_user_id(name) IS
        'pipeline: the auth.users id mapped to an analyst login role (pipeline.analyst_users)';

    CREATE FUNCTION auth.uid() RETURNS uuid
    LANGUAGE sql STABLE
    AS $fn$
        SELECT CASE
            -- superusers are members of every role; they bypass RLS anyway
            WHEN current_setting('is_superuser') = 'off'
                 AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                             WHERE r.rolname = 'analyst'
                               AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER'))
            THEN auth.login_user_id(current_user)
            ELSE coalesce(
                nullif(current_setting('request.jwt.claim.sub', true), ''),
                nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
            )::uuid
        END
    $fn$;
    COMMENT ON FUNCTION auth.uid() IS
        'pipeline: the requesting user; analysts by login role (pipeline.analyst_users), others by JWT claim like Supabase';

    -- The group analysts' login roles join (roles are per cluster: another database
    -- may have made it, possibly at this very moment).
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'analyst') THEN
        BEGIN
            CREATE ROLE analyst NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;
            WHEN insufficient_privilege THEN
                RAISE WARNING 'may not create role "analyst": create it (NOLOGIN), then run SELECT pipeline.grant_read_access(''analyst'')';
        END;
    END IF;
END
$do$;
