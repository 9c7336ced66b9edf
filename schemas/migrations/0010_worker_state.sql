-- State the stream workers keep next to the rows they write, in the same transaction:
-- Kafka offsets (with fencing epochs) and each visitor's recent sessions.

CREATE SCHEMA IF NOT EXISTS pipeline;

-- Where each consumer group resumes, per topic partition. A worker that is assigned a
-- partition bumps `epoch`; every write checks that its epoch is still current, so a
-- worker that lost the partition cannot write after the new owner started.
CREATE TABLE IF NOT EXISTS pipeline.consumer_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL DEFAULT -1,  -- -1: nothing stored yet
    epoch       bigint      NOT NULL DEFAULT 0,
    owner       text,                             -- host:pid of the current owner
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- A visitor's few most recent sessions (processors/sessions.py), so a restart or a
-- partition move continues sessions instead of splitting them.
CREATE TABLE IF NOT EXISTS pipeline.visitor_sessions (
    site_id    uuid        NOT NULL,
    visitor_id text        NOT NULL,
    state      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, visitor_id)
);
-- For the clean-up of visitors not seen for a while (docs/worker.md).
CREATE INDEX IF NOT EXISTS visitor_sessions_updated_at_idx ON pipeline.visitor_sessions (updated_at);

-- Per-site settings the seed's `sites` table has no column for. A site's time zone
-- decides where its sessions break at midnight.
CREATE TABLE IF NOT EXISTS pipeline.site_settings (
    site_id   uuid PRIMARY KEY REFERENCES public.sites (id) ON DELETE CASCADE,
    time_zone text NOT NULL DEFAULT 'UTC'
        CHECK (now() AT TIME ZONE time_zone IS NOT NULL)  -- rejects names Postgres does not know
);
