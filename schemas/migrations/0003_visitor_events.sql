-- public.visitor_events: the seed's 23 columns, range-partitioned by created_at.
-- Partitions live in schema "pipeline" so neither PostgREST nor Supabase's
-- default grants on "public" ever expose a partition directly (partitions are
-- not covered by the parent's row-level security).

CREATE SCHEMA IF NOT EXISTS pipeline;

-- An existing unpartitioned table (the current Supabase one) cannot be turned
-- into a partitioned one in place; converting it is a separate, deliberate
-- step. Refuse instead of touching it. (schemas/migrate.py checks this before
-- applying anything; this guard covers running the file by hand.)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class
               WHERE oid = to_regclass('public.visitor_events') AND relkind <> 'p') THEN
        RAISE EXCEPTION 'public.visitor_events exists and is not partitioned; left unchanged'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'convert it to a partitioned table first (see docs/schema.md)';
    END IF;
END
$$;

-- Foreign keys are kept (PostgREST embedding, analysts). References to things
-- that may be deleted are nulled so events survive; a deleted site takes its
-- events with it.
CREATE TABLE IF NOT EXISTS public.visitor_events (
    id               uuid        NOT NULL DEFAULT public.uuid_generate_v7(),
    event_type       text,
    page_url         text,
    referrer_url     text,
    visitor_id       text,
    session_id       text,
    ip_address       text,
    user_agent       text,
    device_type      text,
    country          text,
    region           text,
    city             text,
    duration_seconds integer,
    custom_data      jsonb,
    lead_id          uuid,
    segment_id       uuid,
    experiment_id    uuid,
    site_id          uuid,
    user_id          uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    location         jsonb,
    campaign_id      uuid,
    -- the partition key must be part of every unique constraint
    CONSTRAINT visitor_events_pkey PRIMARY KEY (id, created_at),
    CONSTRAINT visitor_events_lead_id_fkey
        FOREIGN KEY (lead_id) REFERENCES public.leads (id) ON DELETE SET NULL,
    CONSTRAINT visitor_events_segment_id_fkey
        FOREIGN KEY (segment_id) REFERENCES public.segments (id) ON DELETE SET NULL,
    CONSTRAINT visitor_events_experiment_id_fkey
        FOREIGN KEY (experiment_id) REFERENCES public.experiments (id) ON DELETE SET NULL,
    CONSTRAINT visitor_events_site_id_fkey
        FOREIGN KEY (site_id) REFERENCES public.sites (id) ON DELETE CASCADE,
    CONSTRAINT visitor_events_user_id_fkey
        FOREIGN KEY (user_id) REFERENCES auth.users (id) ON DELETE SET NULL,
    CONSTRAINT visitor_events_campaign_id_fkey
        FOREIGN KEY (campaign_id) REFERENCES public.experiments (id) ON DELETE SET NULL
) PARTITION BY RANGE (created_at);

-- Catches rows no partition covers yet. Must stay (nearly) empty: see
-- pipeline.drain_visitor_events_default() and docs/schema.md.
CREATE TABLE IF NOT EXISTS pipeline.visitor_events_default
    PARTITION OF public.visitor_events DEFAULT;

-- Analyst indexes; each one's query is in docs/schema.md.
CREATE INDEX IF NOT EXISTS visitor_events_site_id_created_at_idx
    ON public.visitor_events (site_id, created_at);
CREATE INDEX IF NOT EXISTS visitor_events_visitor_id_created_at_idx
    ON public.visitor_events (visitor_id, created_at);
CREATE INDEX IF NOT EXISTS visitor_events_session_id_idx
    ON public.visitor_events (session_id);
-- Partial: most events carry no lead/segment/experiment, so these stay small
-- and cost nothing on such rows; they serve per-lead/per-experiment queries and
-- keep ON DELETE SET NULL from scanning every partition.
CREATE INDEX IF NOT EXISTS visitor_events_lead_id_idx
    ON public.visitor_events (lead_id) WHERE lead_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS visitor_events_segment_id_idx
    ON public.visitor_events (segment_id) WHERE segment_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS visitor_events_experiment_id_idx
    ON public.visitor_events (experiment_id) WHERE experiment_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS visitor_events_campaign_id_idx
    ON public.visitor_events (campaign_id) WHERE campaign_id IS NOT NULL;
