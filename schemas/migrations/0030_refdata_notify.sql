-- Workers cache reference data (sites, leads, segments, experiments, site settings) and
-- drop entries when these notifications arrive (LISTEN pipeline_refdata), so a change
-- is seen within a second without polling. The payload is small JSON:
-- {"t": table, "id": row id, "site": site id}.

CREATE OR REPLACE FUNCTION pipeline.notify_refdata() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- jsonb, because the tables differ in columns (sites has no site_id, site_settings no id)
    new_row jsonb := CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END;
    old_row jsonb := CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END;
    r jsonb;
BEGIN
    FOREACH r IN ARRAY ARRAY[new_row, old_row] LOOP
        -- The old row matters only when deleted or moved to another site.
        CONTINUE WHEN r IS NULL OR (r = old_row AND new_row IS NOT NULL
                                    AND old_row->>'site_id' IS NOT DISTINCT FROM new_row->>'site_id');
        PERFORM pg_notify('pipeline_refdata', json_build_object(
            't', TG_TABLE_NAME,
            'id', coalesce(r->>'id', r->>'site_id'),
            'site', CASE WHEN TG_TABLE_NAME = 'sites' THEN r->>'id' ELSE r->>'site_id' END)::text);
    END LOOP;
    RETURN NULL;
END
$$;

DO $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['public.sites', 'public.leads', 'public.segments', 'public.experiments',
                               'pipeline.site_settings']
    LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS pipeline_refdata_notify ON %s', tbl);
        EXECUTE format('CREATE TRIGGER pipeline_refdata_notify AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION pipeline.notify_refdata()', tbl);
    END LOOP;
END
$$;

-- experiment_segments.participants: distinct visitors of the experiment whose events fell
-- in the segment. A job, not a trigger (it scans the experiment's events): run it when
-- needed, e.g. hourly:  SELECT pipeline.recompute_experiment_participants();
CREATE OR REPLACE FUNCTION pipeline.recompute_experiment_participants(only_experiment uuid DEFAULT NULL)
RETURNS integer LANGUAGE sql AS $$
    WITH counts AS (
        SELECT es.id, (
            SELECT count(DISTINCT v.visitor_id)::integer
            FROM public.visitor_events v
            WHERE v.experiment_id = es.experiment_id AND v.segment_id = es.segment_id
        ) AS n
        FROM public.experiment_segments es
        WHERE only_experiment IS NULL OR es.experiment_id = only_experiment
    ), updated AS (
        UPDATE public.experiment_segments es SET participants = counts.n
        FROM counts WHERE es.id = counts.id AND es.participants IS DISTINCT FROM counts.n
        RETURNING 1
    )
    SELECT count(*)::integer FROM updated
$$;

-- Identify by email looks leads up per site, case-insensitively.
CREATE INDEX IF NOT EXISTS leads_site_id_lower_email_idx ON public.leads (site_id, lower(email));
