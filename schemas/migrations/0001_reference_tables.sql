-- Reference tables visitor_events points at, as in the Supabase design
-- (/work/shared/seed). Everything is create-if-missing: on Supabase these
-- objects already exist and must be left exactly as they are.

-- Plain PostgreSQL has no Supabase auth; a one-column auth.users is enough for
-- the foreign keys. Only when the whole schema is missing: an existing auth
-- schema is Supabase's (or the operator's) and is never touched.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'auth') THEN
        CREATE SCHEMA auth;
        CREATE TABLE auth.users (id uuid PRIMARY KEY);
    ELSIF to_regclass('auth.users') IS NULL THEN
        RAISE EXCEPTION 'schema auth exists but has no users table'
            USING ERRCODE = 'undefined_table',
                  HINT = 'create auth.users (id uuid primary key) or drop the empty auth schema';
    END IF;
END
$$;

-- The seed names these enums without their values. On Supabase they exist
-- already (with whatever values the app defined); these sets are only for
-- databases that lack them.
DO $$
BEGIN
    IF to_regtype('public.segment_audience') IS NULL THEN
        CREATE TYPE public.segment_audience AS ENUM ('b2b', 'b2c', 'b2g', 'mixed');
    END IF;
    IF to_regtype('public.segment_language') IS NULL THEN
        -- ISO 639-1 two-letter codes, complete, so no language needs an ALTER TYPE later.
        CREATE TYPE public.segment_language AS ENUM (
            'aa', 'ab', 'ae', 'af', 'ak', 'am', 'an', 'ar', 'as', 'av', 'ay', 'az',
            'ba', 'be', 'bg', 'bi', 'bm', 'bn', 'bo', 'br', 'bs',
            'ca', 'ce', 'ch', 'co', 'cr', 'cs', 'cu', 'cv', 'cy',
            'da', 'de', 'dv', 'dz',
            'ee', 'el', 'en', 'eo', 'es', 'et', 'eu',
            'fa', 'ff', 'fi', 'fj', 'fo', 'fr', 'fy',
            'ga', 'gd', 'gl', 'gn', 'gu', 'gv',
            'ha', 'he', 'hi', 'ho', 'hr', 'ht', 'hu', 'hy', 'hz',
            'ia', 'id', 'ie', 'ig', 'ii', 'ik', 'io', 'is', 'it', 'iu',
            'ja', 'jv',
            'ka', 'kg', 'ki', 'kj', 'kk', 'kl', 'km', 'kn', 'ko', 'kr', 'ks', 'ku', 'kv', 'kw', 'ky',
            'la', 'lb', 'lg', 'li', 'ln', 'lo', 'lt', 'lu', 'lv',
            'mg', 'mh', 'mi', 'mk', 'ml', 'mn', 'mr', 'ms', 'mt', 'my',
            'na', 'nb', 'nd', 'ne', 'ng', 'nl', 'nn', 'no', 'nr', 'nv', 'ny',
            'oc', 'oj', 'om', 'or', 'os',
            'pa', 'pi', 'pl', 'ps', 'pt',
            'qu',
            'rm', 'rn', 'ro', 'ru', 'rw',
            'sa', 'sc', 'sd', 'se', 'sg', 'si', 'sk', 'sl', 'sm', 'sn', 'so', 'sq', 'sr', 'ss', 'st', 'su', 'sv', 'sw',
            'ta', 'te', 'tg', 'th', 'ti', 'tk', 'tl', 'tn', 'to', 'tr', 'ts', 'tt', 'tw', 'ty',
            'ug', 'uk', 'ur', 'uz',
            've', 'vi', 'vo',
            'wa', 'wo',
            'xh',
            'yi', 'yo',
            'za', 'zh', 'zu'
        );
    END IF;
END
$$;

-- Deleting an account removes what it owns; deleting a segment only detaches leads.
CREATE TABLE IF NOT EXISTS public.sites (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text,
    url           text,
    description   text,
    logo_url      text,
    resource_urls jsonb,
    user_id       uuid REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    competitors   jsonb,
    focus_mode    integer
);

CREATE TABLE IF NOT EXISTS public.segments (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text,
    description text,
    audience    public.segment_audience,
    size        integer,
    engagement  integer,
    is_active   boolean,
    keywords    jsonb,
    hot_topics  jsonb,
    site_id     uuid REFERENCES public.sites (id) ON DELETE CASCADE,
    user_id     uuid REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    language    public.segment_language,
    url         text
);

CREATE TABLE IF NOT EXISTS public.leads (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text,
    email        text,
    company      text,
    position     text,
    segment_id   uuid REFERENCES public.segments (id) ON DELETE SET NULL,
    status       text,
    notes        text,
    last_contact timestamptz,
    site_id      uuid REFERENCES public.sites (id) ON DELETE CASCADE,
    user_id      uuid REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    phone        text,
    origin       text
);

CREATE TABLE IF NOT EXISTS public.experiments (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text,
    description text,
    status      text,
    start_date  timestamptz,
    end_date    timestamptz,
    conversion  numeric,
    roi         numeric,
    preview_url text,
    site_id     uuid REFERENCES public.sites (id) ON DELETE CASCADE,
    user_id     uuid REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    hypothesis  text
);

CREATE TABLE IF NOT EXISTS public.experiment_segments (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    experiment_id uuid REFERENCES public.experiments (id) ON DELETE CASCADE,
    segment_id    uuid REFERENCES public.segments (id) ON DELETE CASCADE,
    participants  integer
);
