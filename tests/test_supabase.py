"""Supabase compatibility and analysts' access, against a real PostgreSQL.

* A Supabase-shaped database (its auth schema and auth.uid(), roles anon and
  authenticated with Supabase's default privileges, the seed's tables, an unpartitioned
  public.visitor_events with foreign keys and rows of two owners) is converted to the
  partitioned layout: every row kept, resumable after a kill mid-chunk, idempotent.
* Row-level security: each owner reads only its own rows, through the parent and through
  a partition, and writes nothing; partitions made later are covered too.
* Plain PostgreSQL: analysts are login roles in group "analyst", mapped to an owner.
* The analytics functions give exact numbers under row-level security.

Roles are per cluster: anon and authenticated are created if missing and left in place
(like Supabase's); the per-test login roles are dropped afterwards.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import pytest

from schemas import migrate

UTC = timezone.utc
ALL_VERSIONS = [m.version for m in migrate.load_migrations()]
LEGACY_ROWS = 3000

# What Supabase has before the pipeline arrives: its auth schema (a few of auth.users'
# columns suffice) with auth.uid() as Supabase defines it, the API roles with the
# default privileges Supabase grants them on schema public.
SUPABASE_AUTH = """
DO $$ BEGIN CREATE ROLE anon NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
CREATE SCHEMA auth;
CREATE TABLE auth.users (
    instance_id uuid, id uuid PRIMARY KEY, aud varchar(255), role varchar(255), email varchar(255),
    encrypted_password varchar(255), created_at timestamptz, updated_at timestamptz, is_anonymous boolean
);
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid
$$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated;
GRANT EXECUTE ON FUNCTION auth.uid() TO anon, authenticated;
GRANT USAGE ON SCHEMA public TO anon, authenticated;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated;
"""

# Supabase's visitor_events: the seed's 23 columns, id uuid primary key, nullable
# timestamps, foreign keys, RLS with the app's own policy.
SUPABASE_VISITOR_EVENTS = """
CREATE TABLE public.visitor_events (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    event_type text, page_url text, referrer_url text, visitor_id text, session_id text, ip_address text,
    user_agent text, device_type text, country text, region text, city text, duration_seconds integer,
    custom_data jsonb,
    lead_id uuid REFERENCES public.leads (id),
    segment_id uuid REFERENCES public.segments (id),
    experiment_id uuid REFERENCES public.experiments (id),
    site_id uuid REFERENCES public.sites (id),
    user_id uuid REFERENCES auth.users (id),
    created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(),
    location jsonb,
    campaign_id uuid REFERENCES public.experiments (id)
);
ALTER TABLE public.visitor_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Users see their events" ON public.visitor_events FOR SELECT USING (user_id = auth.uid());
-- the app keeps its sites under RLS already; the other tables have none
ALTER TABLE public.sites ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Users manage their sites" ON public.sites USING (user_id = auth.uid());
"""


@dataclass
class Owners:
    a: uuid.UUID
    b: uuid.UUID
    sites: dict[uuid.UUID, uuid.UUID]  # site -> owner

    def sites_of(self, owner: uuid.UUID) -> set[uuid.UUID]:
        return {s for s, o in self.sites.items() if o == owner}


async def _add_owners(conn: asyncpg.Connection) -> Owners:
    """Owner a with two sites, owner b with one; leads, segments, experiments per site."""
    a, b = uuid.uuid4(), uuid.uuid4()
    sites = {uuid.uuid4(): a, uuid.uuid4(): a, uuid.uuid4(): b}
    await conn.executemany("INSERT INTO auth.users (id) VALUES ($1)", [(a,), (b,)])
    for i, (site, owner) in enumerate(sites.items()):
        await conn.execute("INSERT INTO public.sites (id, name, user_id) VALUES ($1, $2, $3)", site, f"site {i}", owner)
        for table, n in (("leads", 5), ("segments", 2), ("experiments", 2)):
            await conn.execute(
                f"INSERT INTO public.{table} (id, site_id, user_id)"
                f" SELECT md5($1 || '{table}' || k)::uuid, $1::uuid, $2 FROM generate_series(0, {n - 1}) k",
                str(site), owner)
        await conn.execute(
            "INSERT INTO public.experiment_segments (experiment_id, segment_id)"
            " VALUES (md5($1 || 'experiments0')::uuid, md5($1 || 'segments0')::uuid)", str(site))
    return Owners(a, b, sites)


async def _add_legacy_events(conn: asyncpg.Connection, owners: Owners, n: int) -> None:
    """n rows over ten days, as the app wrote them: v4 ids, references, a few odd timestamps."""
    site_list = list(owners.sites)
    await conn.execute(
        """
        INSERT INTO public.visitor_events (event_type, page_url, referrer_url, visitor_id, session_id,
            ip_address, user_agent, device_type, country, city, duration_seconds, custom_data, lead_id,
            segment_id, experiment_id, site_id, user_id, created_at, updated_at, location, campaign_id)
        SELECT (ARRAY['pageview', 'click', 'signup'])[1 + g % 3], 'https://shop.example/p/' || g % 17,
               CASE WHEN g % 4 = 0 THEN 'https://www.google.com/' END, 'v' || g % 97, 's' || g % 331,
               '203.0.113.0', 'Mozilla/5.0', 'desktop', 'ES', 'Madrid', g % 60, jsonb_build_object('n', g),
               CASE WHEN g % 10 = 0 THEN md5(s.site::text || 'leads' || g % 5)::uuid END,
               CASE WHEN g % 7 = 0 THEN md5(s.site::text || 'segments' || g % 2)::uuid END,
               CASE WHEN g % 5 = 0 THEN md5(s.site::text || 'experiments' || g % 2)::uuid END,
               s.site, s.owner, t.at, t.at + interval '1 second',
               jsonb_build_object('latitude', 40.4), CASE WHEN g % 11 = 0 THEN md5(s.site::text || 'experiments1')::uuid END
        FROM generate_series(1, $1) g
        CROSS JOIN LATERAL (SELECT ($2::uuid[])[1 + g % 3] AS site, ($3::uuid[])[1 + g % 3] AS owner) s
        CROSS JOIN LATERAL (SELECT date_trunc('hour', now()) - (g % 240) * interval '1 hour'
                                   - (g % 7) * interval '1 minute' AS at) t
        """,
        n, site_list, [owners.sites[s] for s in site_list])
    # rows without created_at (one keeps its updated_at), and a UUIDv7 id among the v4 ones
    await conn.execute(
        "UPDATE public.visitor_events SET created_at = NULL"
        " WHERE id IN (SELECT id FROM public.visitor_events ORDER BY id LIMIT 10)")
    await conn.execute(
        "UPDATE public.visitor_events SET created_at = NULL, updated_at = NULL"
        " WHERE id IN (SELECT id FROM public.visitor_events WHERE created_at IS NOT NULL ORDER BY id DESC LIMIT 5)")
    await conn.execute(
        "INSERT INTO public.visitor_events (id, event_type, site_id, user_id, created_at)"
        " VALUES ('01890a5d-ac96-774b-bcce-b302099a8057', 'pageview', $1, $2, now() - interval '3 days')",
        site_list[0], owners.sites[site_list[0]])


@pytest.fixture
async def supabase(empty_database_url: str):
    """(connection, owners) of a Supabase-shaped database with LEGACY_ROWS + 1 unpartitioned events."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(SUPABASE_AUTH)
        # the seed's reference tables (Supabase has them): 0001's own statements, run by hand
        await conn.execute(migrate.load_migrations()[0].sql)
        await conn.execute(SUPABASE_VISITOR_EVENTS)
        owners = await _add_owners(conn)
        await _add_legacy_events(conn, owners, LEGACY_ROWS)
        yield conn, owners
    finally:
        await conn.close()


async def _rows(conn: asyncpg.Connection, table: str) -> dict[uuid.UUID, asyncpg.Record]:
    rows = await conn.fetch(
        f"SELECT id, created_at, updated_at, to_jsonb(v) - 'created_at' - 'updated_at' AS rest FROM {table} v")
    return {r["id"]: r for r in rows}


@asynccontextmanager
async def acting_as(conn: asyncpg.Connection, role: str, sub: uuid.UUID | None = None):
    """The connection as ``role`` (and, for Supabase's API roles, with a JWT for ``sub``)."""
    await conn.execute(f'SET ROLE "{role}"')
    if sub is not None:
        await conn.execute("SELECT set_config('request.jwt.claims', $1, false)",
                           json.dumps({"sub": str(sub), "role": role}))
    try:
        yield conn
    finally:
        await conn.execute("RESET ROLE; RESET request.jwt.claims")


async def _wait_for(check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _catalog(conn: asyncpg.Connection) -> list:
    """What migrate could change, including privileges and policies."""
    return [
        [tuple(r) for r in await conn.fetch(
            "SELECT n.nspname, c.relname, c.relkind::text, c.relrowsecurity, c.relacl::text FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('public', 'pipeline', 'auth')"
            " ORDER BY 1, 2")],
        [tuple(r) for r in await conn.fetch(
            "SELECT polrelid::regclass::text, polname, pg_get_expr(polqual, polrelid) FROM pg_policy ORDER BY 1, 2")],
        [tuple(r) for r in await conn.fetch(
            "SELECT oid::regprocedure::text, md5(prosrc), proacl::text FROM pg_proc"
            " WHERE pronamespace::regnamespace::text IN ('public', 'pipeline', 'auth') ORDER BY 1")],
        [tuple(r) for r in await conn.fetch("SELECT * FROM pipeline.schema_migrations ORDER BY version")],
    ]


# --------------------------------------------------------------------------- conversion


async def test_conversion_keeps_every_row_and_is_idempotent(supabase):
    conn, owners = supabase
    before = await _rows(conn, "public.visitor_events")
    assert len(before) == LEGACY_ROWS + 1
    uid_src = await conn.fetchval("SELECT prosrc FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure")
    users_before = await conn.fetch("SELECT * FROM auth.users ORDER BY id")

    assert await migrate.apply_migrations(conn, conversion_chunk_rows=500) == ALL_VERSIONS

    assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE oid = 'public.visitor_events'::regclass") == "p"
    assert await conn.fetchval("SELECT to_regclass('pipeline.visitor_events_legacy')") is None
    status = await migrate.conversion_status(conn)
    assert status.finished and status.legacy_dropped
    assert status.rows_copied == LEGACY_ROWS + 1 and status.rows_present == 0
    fallback = await conn.fetchval("SELECT fallback_time FROM pipeline.visitor_events_conversion")

    after = await _rows(conn, "public.visitor_events")
    assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == len(before)
    assert set(after) == set(before)
    for event_id, old in before.items():
        new = after[event_id]
        assert new["rest"] == old["rest"], event_id
        # created_at: kept; else updated_at; else when the table was moved aside
        assert new["created_at"] == (old["created_at"] or old["updated_at"] or fallback)
        assert new["updated_at"] == (old["updated_at"] or new["created_at"])
    # every row sits in the partition named after its day; none waits in DEFAULT
    assert await conn.fetchval("SELECT pipeline.visitor_events_default_rows()") == 0
    misplaced = await conn.fetchval(
        "SELECT count(*) FROM public.visitor_events"
        " WHERE tableoid::regclass::text"
        "    <> 'pipeline.visitor_events_p' || to_char(created_at AT TIME ZONE 'UTC', 'YYYYMMDD')")
    assert misplaced == 0
    # Supabase's auth is left as it was
    assert await conn.fetchval("SELECT prosrc FROM pg_proc WHERE oid = 'auth.uid()'::regprocedure") == uid_src
    assert await conn.fetch("SELECT * FROM auth.users ORDER BY id") == users_before
    assert await conn.fetchval("SELECT to_regprocedure('auth.login_user_id(name)')") is None

    # idempotent: nothing to apply, nothing changes
    catalog = await _catalog(conn)
    assert await migrate.apply_migrations(conn) == []
    assert await _catalog(conn) == catalog
    assert await _rows(conn, "public.visitor_events") == after


async def test_conversion_resumes_after_a_kill_mid_chunk(supabase, empty_database_url):
    conn, owners = supabase
    before = await _rows(conn, "public.visitor_events")
    pid = conn.get_server_pid()
    run = asyncio.create_task(migrate.apply_migrations(conn, conversion_chunk_rows=7))
    observer = await asyncpg.connect(empty_database_url)
    try:
        async def copied(at_least: int) -> bool:
            if run.done() or await observer.fetchval("SELECT to_regclass('pipeline.visitor_events_conversion')") is None:
                return run.done()
            return await observer.fetchval(
                "SELECT rows_copied + rows_present FROM pipeline.visitor_events_conversion") >= at_least

        await _wait_for(lambda: copied(70))
        assert not run.done(), "the copy finished before it could be interrupted"
        # Hold the progress row: the next chunk inserts its rows, then waits to record
        # them. Killed there, it must leave nothing behind.
        hold = observer.transaction()
        await hold.start()
        await observer.fetchrow("SELECT * FROM pipeline.visitor_events_conversion FOR UPDATE")

        async def chunk_waiting() -> bool:
            return await observer.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid)

        await _wait_for(chunk_waiting)
        assert await observer.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises((migrate.MigrationError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await run
        await hold.rollback()

        status = await migrate.conversion_status(observer)
        assert not status.finished and status.rows_copied >= 70
        copied_ids = {r[0] for r in await observer.fetch("SELECT id FROM public.visitor_events")}
        # exactly the committed chunks: every legacy id up to last_id, nothing beyond
        assert copied_ids == {i for i in before if i <= status.last_id}
        assert len(copied_ids) == status.rows_copied

        # meanwhile writers go on: a worker stores a new event in the new table, and
        # something still writes the old one behind the copy's position
        site, owner = next(iter(owners.sites.items()))
        new_id = await observer.fetchval(
            "INSERT INTO public.visitor_events (event_type, site_id, user_id) VALUES ('pageview', $1, $2) RETURNING id",
            site, owner)
        late_id = uuid.UUID(int=1)
        assert late_id < status.last_id
        await observer.execute(
            "INSERT INTO pipeline.visitor_events_legacy (id, event_type, site_id, user_id, created_at)"
            " VALUES ($1, 'late', $2, $3, now())", late_id, site, owner)

        resumed = await asyncpg.connect(empty_database_url)
        try:
            assert await migrate.apply_migrations(resumed, conversion_chunk_rows=500) == []
        finally:
            await resumed.close()
        after = {r[0] for r in await observer.fetch("SELECT id FROM public.visitor_events")}
        assert after == set(before) | {new_id, late_id}
        assert await observer.fetchval("SELECT count(*) FROM public.visitor_events") == len(before) + 2
        status = await migrate.conversion_status(observer)
        assert status.finished and status.legacy_dropped
        assert await observer.fetchval("SELECT rows_late FROM pipeline.visitor_events_conversion") == 1
    finally:
        await observer.close()


@pytest.mark.parametrize("setup, error", [
    ("CREATE VIEW public.recent_events AS SELECT id FROM public.visitor_events", "view recent_events"),
    ("ALTER TABLE public.visitor_events DROP CONSTRAINT visitor_events_lead_id_fkey;"
     " UPDATE public.visitor_events SET lead_id = gen_random_uuid()"
     " WHERE id = (SELECT min(id::text)::uuid FROM public.visitor_events)", "1 rows whose lead_id is not in public.leads"),
    ("ALTER TABLE public.visitor_events ALTER COLUMN country TYPE varchar(2)", "country character varying"),
])
async def test_unconvertible_table_is_refused_untouched(supabase, setup, error):
    conn, _ = supabase
    await conn.execute(setup)
    before = await _rows(conn, "public.visitor_events")
    with pytest.raises(migrate.UnpartitionedVisitorEventsError, match=error):
        await migrate.apply_migrations(conn)
    assert await conn.fetchval("SELECT to_regnamespace('pipeline')") is None
    assert await _rows(conn, "public.visitor_events") == before


# --------------------------------------------------------------------------- row-level security on Supabase


@pytest.fixture
async def converted(supabase):
    conn, owners = supabase
    await migrate.apply_migrations(conn, conversion_chunk_rows=1000)
    return conn, owners


async def test_each_owner_reads_only_its_own_rows(converted):
    conn, owners = converted
    for owner in (owners.a, owners.b):
        mine = owners.sites_of(owner)
        expected = await conn.fetchval("SELECT count(*) FROM public.visitor_events WHERE site_id = ANY($1)", list(mine))
        assert expected > 0
        async with acting_as(conn, "authenticated", owner):
            assert await conn.fetchval("SELECT auth.uid()") == owner
            assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == expected
            assert {r[0] for r in await conn.fetch("SELECT DISTINCT site_id FROM public.visitor_events")} == mine
            assert {r[0] for r in await conn.fetch("SELECT id FROM public.sites")} == mine
            for table in ("leads", "segments", "experiments"):
                assert {r[0] for r in await conn.fetch(f"SELECT DISTINCT site_id FROM public.{table}")} == mine, table
            assert await conn.fetchval("SELECT count(*) FROM public.experiment_segments") == len(mine)
            # another owner's site through the API function: simply no rows
            other = next(iter(set(owners.sites) - mine))
            week = (datetime.now(UTC) - timedelta(days=11), datetime.now(UTC) + timedelta(days=1))
            assert await conn.fetch("SELECT * FROM public.site_daily_stats($1, $2, $3)", other, *week) == []
            stats = await conn.fetch("SELECT * FROM public.site_daily_stats($1, $2, $3)", next(iter(mine)), *week)
            assert sum(r["events"] for r in stats) == await conn.fetchval(
                "SELECT count(*) FROM public.visitor_events WHERE site_id = $1 AND created_at >= $2 AND created_at < $3",
                next(iter(mine)), *week)
    # anonymous and signed-out requests see nothing
    async with acting_as(conn, "anon"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM public.visitor_events")
        assert await conn.fetchval("SELECT count(*) FROM public.sites") == 0
    async with acting_as(conn, "authenticated"):
        assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == 0
    # the owner of the tables (the workers) is not subject to RLS: not FORCEd anywhere
    assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == LEGACY_ROWS + 1
    assert not await conn.fetchval(
        "SELECT bool_or(relforcerowsecurity) FROM pg_class WHERE oid = 'public.visitor_events'::regclass"
        " OR oid IN (SELECT partition FROM pipeline.visitor_events_partitions())")


async def test_rollups_are_read_like_visitor_events(converted):
    """On Supabase, the rollup tables (0040) follow visitor_events' policies and privileges, and
    the functions reading them give each signed-in owner exactly its own sites' numbers."""
    from pipeline import rollups

    conn, owners = converted
    now = datetime.now(UTC)
    assert (await rollups.roll_up(conn, until=now)).rolled_to == now
    tables = ("site_daily_rollups", "site_hourly_rollups", "site_session_rollups", "site_rollup_late")
    for table in tables:
        assert not await conn.fetchval("SELECT has_table_privilege('anon', $1, 'SELECT')", f"public.{table}")
        for privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            assert not await conn.fetchval("SELECT has_table_privilege('authenticated', $1, $2)",
                                           f"public.{table}", privilege), (table, privilege)
    span = (now - timedelta(days=11), now)
    for owner in (owners.a, owners.b):
        mine = owners.sites_of(owner)
        async with acting_as(conn, "authenticated", owner):
            for table in tables[:3]:
                assert {r[0] for r in await conn.fetch(f"SELECT DISTINCT site_id FROM public.{table}")} == mine
            for site in owners.sites:
                stats = await conn.fetch("SELECT * FROM public.site_daily_stats($1, $2, $3)", site, *span)
                top = await conn.fetch("SELECT * FROM public.site_top($1, $2, $3, 'country')", site, *span)
                assert bool(stats) == bool(top) == (site in mine)
                if site in mine:
                    assert sum(r["events"] for r in stats) == sum(r["events"] for r in await conn.fetch(
                        "SELECT * FROM public.site_top($1, $2, $3, 'event_type', 100)", site, *span))
        expected = {s: await conn.fetchval("SELECT count(*) FROM public.visitor_events WHERE site_id = $1"
                                           " AND created_at >= $2 AND created_at < $3", s, *span) for s in mine}
        async with acting_as(conn, "authenticated", owner):
            for site in mine:
                stats = await conn.fetch("SELECT * FROM public.site_daily_stats($1, $2, $3)", site, *span)
                assert sum(r["events"] for r in stats) == expected[site] > 0
    async with acting_as(conn, "anon"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT count(*) FROM public.site_daily_rollups")


async def test_partitions_are_covered_directly(converted):
    conn, owners = converted
    partition = await conn.fetchval(
        "SELECT tableoid::regclass::text FROM public.visitor_events GROUP BY 1 ORDER BY count(*) DESC LIMIT 1")
    mine = list(owners.sites_of(owners.a))
    expected = await conn.fetchval(f"SELECT count(*) FROM {partition} WHERE site_id = ANY($1)", mine)
    assert 0 < expected < await conn.fetchval(f"SELECT count(*) FROM {partition}")

    # by default a partition cannot be reached at all
    async with acting_as(conn, "authenticated", owners.a):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval(f"SELECT count(*) FROM {partition}")

    # even if someone grants it by mistake, the partition's own policies hold
    await conn.execute(f"GRANT USAGE ON SCHEMA pipeline TO authenticated; GRANT SELECT ON {partition} TO authenticated")
    try:
        async with acting_as(conn, "authenticated", owners.a):
            assert await conn.fetchval(f"SELECT count(*) FROM {partition}") == expected
        # and the next migrate takes the stray grant back
        await migrate.apply_migrations(conn)
        assert not await conn.fetchval("SELECT has_table_privilege('authenticated', $1, 'SELECT')", partition)
    finally:
        await conn.execute("REVOKE USAGE ON SCHEMA pipeline FROM authenticated")


async def test_readers_cannot_write(converted):
    conn, owners = converted
    site = next(iter(owners.sites_of(owners.a)))
    count = await conn.fetchval("SELECT count(*) FROM public.visitor_events")
    statements = [
        ("INSERT INTO public.visitor_events (event_type, site_id) VALUES ('x', $1)", (site,)),
        ("UPDATE public.visitor_events SET event_type = 'x' WHERE site_id = $1", (site,)),
        ("DELETE FROM public.visitor_events WHERE site_id = $1", (site,)),
        ("TRUNCATE public.visitor_events", ()),
        ("TRUNCATE public.sites CASCADE", ()),
    ]
    for role in ("authenticated", "anon"):
        async with acting_as(conn, role, owners.a if role == "authenticated" else None):
            for sql, args in statements:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql, *args)
    # another owner's site cannot be changed either (the app's own rows stay the app's business)
    other = next(iter(owners.sites_of(owners.b)))
    async with acting_as(conn, "authenticated", owners.a):
        assert await conn.execute("UPDATE public.sites SET name = 'taken' WHERE id = $1", other) == "UPDATE 0"
        assert await conn.execute("DELETE FROM public.leads WHERE site_id = $1", other) == "DELETE 0"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # new row violates row-level security
            await conn.execute("INSERT INTO public.leads (site_id, user_id) VALUES ($1, $2)", other, owners.b)
    assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == count
    assert await conn.fetchval("SELECT name FROM public.sites WHERE id = $1", other) != "taken"


async def test_new_partitions_are_protected_when_created(converted):
    conn, owners = converted
    # default privileges in pipeline would hand new tables to the API roles
    await conn.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA pipeline GRANT SELECT ON TABLES TO authenticated")
    parent = await conn.fetch("SELECT * FROM pipeline.policy_clauses('public.visitor_events')")
    ahead = datetime(2031, 7, 14, 12, tzinfo=UTC)
    await migrate.ensure_partitions_for(conn, [ahead])
    # a late event whose partition does not exist yet goes to DEFAULT; draining creates it
    site, owner = next(iter(owners.sites.items()))
    await conn.execute("INSERT INTO public.visitor_events (site_id, user_id, created_at) VALUES ($1, $2, '2019-03-02')",
                       site, owner)
    assert await migrate.drain_default_partition(conn) == 1
    for name in ("pipeline.visitor_events_p20310714", "pipeline.visitor_events_p20190302"):
        assert await conn.fetchval("SELECT relrowsecurity FROM pg_class WHERE oid = $1::regclass", name)
        assert await conn.fetch("SELECT * FROM pipeline.policy_clauses($1)", name) == parent
        assert not await conn.fetchval("SELECT has_table_privilege('authenticated', $1, 'SELECT')", name)

    # one attached by hand is brought in line by the next migrate
    await conn.execute("CREATE TABLE pipeline.visitor_events_manual (LIKE public.visitor_events INCLUDING DEFAULTS);"
                       " ALTER TABLE public.visitor_events ATTACH PARTITION pipeline.visitor_events_manual"
                       " FOR VALUES FROM ('2032-01-01') TO ('2032-01-02')")
    assert await conn.fetchval("SELECT pipeline.protect_visitor_events_partitions()") == 1
    assert await conn.fetch("SELECT * FROM pipeline.policy_clauses('pipeline.visitor_events_manual')") == parent
    assert await conn.fetchval("SELECT pipeline.protect_visitor_events_partitions()") == 0


# --------------------------------------------------------------------------- plain PostgreSQL: analyst roles


@pytest.fixture
async def roles(empty_database_url: str, pg_admin_url: str):
    """make(prefix, analyst=True) -> a new login role (in group analyst); all dropped afterwards."""
    made: list[str] = []
    admin = await asyncpg.connect(pg_admin_url)

    async def make(prefix: str, analyst: bool = True) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE ROLE "{name}" LOGIN' + (" IN ROLE analyst" if analyst else ""))
        made.append(name)
        return name

    try:
        yield make
    finally:
        db = await asyncpg.connect(empty_database_url)
        try:
            for name in made:
                await db.execute(f'DROP OWNED BY "{name}"')
        finally:
            await db.close()
        for name in made:
            await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        await admin.close()


@dataclass
class PlainDb:
    conn: asyncpg.Connection
    dsn: str
    owners: Owners
    alice: str  # analyst of owner a
    bob: str  # analyst of owner b


@pytest.fixture
async def plain(empty_database_url, roles):
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await migrate.apply_migrations(conn) == ALL_VERSIONS
        owners = await _add_owners(conn)
        now = datetime.now(UTC)
        await conn.execute(
            "INSERT INTO public.visitor_events (event_type, visitor_id, site_id, user_id, created_at)"
            " SELECT 'pageview', 'v' || g, s.id, s.user_id, $1::timestamptz - g * interval '1 minute'"
            " FROM public.sites s, generate_series(1, 40) g", now)
        alice, bob = await roles("alice"), await roles("bob")
        await conn.executemany("INSERT INTO pipeline.analyst_users (role_name, user_id) VALUES ($1, $2)",
                               [(alice, owners.a), (bob, owners.b)])
        yield PlainDb(conn, empty_database_url, owners, alice, bob)
    finally:
        await conn.close()


async def test_plain_postgres_has_the_shim_and_a_read_only_analyst_group(plain):
    conn = plain.conn
    assert await conn.fetchval("SELECT to_regprocedure('auth.login_user_id(name)')") is not None
    for table in ("visitor_events", "sites", "leads", "segments", "experiments", "experiment_segments"):
        assert await conn.fetchval("SELECT has_table_privilege('analyst', $1, 'SELECT')", f"public.{table}")
        for privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            assert not await conn.fetchval(
                "SELECT has_table_privilege('analyst', $1, $2)", f"public.{table}", privilege), (table, privilege)
    assert not await conn.fetchval("SELECT has_schema_privilege('analyst', 'pipeline', 'USAGE')")


async def test_analysts_read_only_their_owners_rows(plain):
    conn, owners = plain.conn, plain.owners
    partition = await conn.fetchval("SELECT tableoid::regclass::text FROM public.visitor_events LIMIT 1")
    for analyst, owner, other in ((plain.alice, owners.a, owners.b), (plain.bob, owners.b, owners.a)):
        mine = owners.sites_of(owner)
        async with acting_as(conn, analyst):
            assert await conn.fetchval("SELECT auth.uid()") == owner
            assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == 40 * len(mine)
            assert {r[0] for r in await conn.fetch("SELECT DISTINCT site_id FROM public.visitor_events")} == mine
            assert {r[0] for r in await conn.fetch("SELECT id FROM public.sites")} == mine
            # a claim an analyst sets itself is ignored: it is who it logged in as
            await conn.execute("SELECT set_config('request.jwt.claim.sub', $1, false)", str(other))
            assert await conn.fetchval("SELECT auth.uid()") == owner
            assert {r[0] for r in await conn.fetch("SELECT DISTINCT site_id FROM public.visitor_events")} == mine
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(f"SELECT count(*) FROM {partition}")
        await conn.execute("RESET request.jwt.claim.sub")

    # granted by mistake, a partition still shows only the analyst's rows
    await conn.execute(f"GRANT USAGE ON SCHEMA pipeline TO analyst; GRANT SELECT ON {partition} TO analyst")
    async with acting_as(conn, plain.alice):
        assert {r[0] for r in await conn.fetch(f"SELECT DISTINCT site_id FROM {partition}")} == owners.sites_of(owners.a)
    await conn.execute(f"REVOKE USAGE ON SCHEMA pipeline FROM analyst; REVOKE SELECT ON {partition} FROM analyst")


async def test_analysts_cannot_write(plain):
    conn, owners = plain.conn, plain.owners
    site = next(iter(owners.sites_of(owners.a)))
    async with acting_as(conn, plain.alice):
        for sql, args in [
            ("INSERT INTO public.visitor_events (event_type, site_id) VALUES ('x', $1)", (site,)),
            ("UPDATE public.visitor_events SET event_type = 'x' WHERE site_id = $1", (site,)),
            ("DELETE FROM public.visitor_events WHERE site_id = $1", (site,)),
            ("TRUNCATE public.visitor_events", ()),
            ("INSERT INTO public.sites (name, user_id) VALUES ('mine', $1)", (owners.a,)),
            ("UPDATE public.sites SET name = 'x' WHERE id = $1", (site,)),
            ("DELETE FROM public.leads WHERE site_id = $1", (site,)),
            ("INSERT INTO pipeline.analyst_users VALUES ('x', $1)", (owners.a,)),
        ]:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql, *args)
    assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == 40 * len(owners.sites)


async def test_unmapped_analysts_and_claims_of_other_roles(plain, roles):
    conn, owners = plain.conn, plain.owners
    stranger = await roles("carol")  # in group analyst, mapped to nobody
    async with acting_as(conn, stranger, owners.a):
        assert await conn.fetchval("SELECT auth.uid()") is None
        assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == 0
    # a role outside the group (e.g. a PostgREST in front of plain PostgreSQL) goes by the JWT claim
    api = await roles("api", analyst=False)
    await conn.execute("SELECT pipeline.grant_read_access($1)", api)
    async with acting_as(conn, api, owners.b):
        assert await conn.fetchval("SELECT auth.uid()") == owners.b
        assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == 40 * len(owners.sites_of(owners.b))


async def test_an_analyst_login_cannot_look_up_another_mapping(plain):
    try:
        alice = await asyncpg.connect(plain.dsn, user=plain.alice)
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError) as exc:
        pytest.skip(f"the server does not let a password-less role log in: {exc}")
    try:
        assert await alice.fetchval("SELECT auth.uid()") == plain.owners.a
        assert await alice.fetchval("SELECT auth.login_user_id($1)", plain.bob) is None
        assert await alice.fetchval("SELECT count(DISTINCT site_id) FROM public.visitor_events") == 2
    finally:
        await alice.close()


# --------------------------------------------------------------------------- analytics functions


async def test_functions_give_exact_numbers_under_rls(plain):
    conn, owners = plain.conn, plain.owners
    site = sorted(owners.sites_of(owners.a))[0]
    other_site = next(iter(owners.sites_of(owners.b)))
    lead = await conn.fetchval("SELECT md5($1 || 'leads0')::uuid", str(site))
    experiment = await conn.fetchval("SELECT md5($1 || 'experiments0')::uuid", str(site))
    day1 = datetime(2030, 3, 4, tzinfo=UTC)
    t = day1 + timedelta(hours=9)
    m = timedelta(minutes=1)
    host = "https://a.example"
    # (at, type, page, referrer, visitor, session, country, device, lead, experiment)
    events = [
        (t, "pageview", f"{host}/", "https://www.google.com/search?q=a", "v1", "s1", "US", "desktop", lead, None),
        (t + m, "click", f"{host}/", f"{host}/", "v1", "s1", "US", "desktop", lead, None),
        (t + 2 * m, "pageview", f"{host}/pricing?utm_source=x", f"{host}/", "v1", "s1", "US", "desktop", lead, None),
        (t + 3 * m, "form_start", f"{host}/pricing", f"{host}/", "v1", "s1", "US", "desktop", lead, None),
        (t + 4 * m, "form_submit", f"{host}/pricing", f"{host}/", "v1", "s1", "US", "desktop", lead, None),
        (t + 10 * m, "pageview", f"{host}/pricing", "https://news.ycombinator.com/item?id=1", "v2", "s2", "GB",
         "mobile", None, experiment),
        (t + 20 * m, "pageview", f"{host}/about", None, "v3", None, None, "desktop", None, None),
        (t + timedelta(days=1), "pageview", f"{host}/", None, "v1", "s3", "US", "desktop", None, experiment),
        (t + timedelta(days=1) + m, "signup", f"{host}/signup", f"{host}/", "v1", "s3", "US", "desktop", None, experiment),
    ]
    await migrate.ensure_partitions(conn, day1, day1 + timedelta(days=2))
    for s in (site, other_site):  # the other owner's site has the same traffic
        await conn.executemany(
            "INSERT INTO public.visitor_events (created_at, event_type, page_url, referrer_url, visitor_id, session_id,"
            " country, device_type, lead_id, experiment_id, site_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            [(*e[:8], e[8] if s == site else None, e[9] if s == site else None, s) for e in events])
    span = (day1, day1 + timedelta(days=2))

    async with acting_as(conn, plain.alice):
        stats = [tuple(r) for r in await conn.fetch("SELECT * FROM public.site_daily_stats($1, $2, $3)", site, *span)]
        assert stats == [
            # day, page views, events, visitors, sessions, bounces, bounce rate, mean session seconds
            (day1.date(), 4, 7, 3, 2, 1, Decimal("0.5000"), Decimal("120.0")),
            ((day1 + timedelta(days=1)).date(), 1, 2, 1, 1, 0, Decimal("0.0000"), Decimal("60.0")),
        ]
        # the day boundary follows the time zone asked for: 09:00 UTC is still the same day in Los Angeles
        assert [r["day"] for r in await conn.fetch(
            "SELECT * FROM public.site_daily_stats($1, $2, $3, 'America/Los_Angeles')", site, *span)] == [
            day1.date(), (day1 + timedelta(days=1)).date()]

        sessions = {r["session_id"]: r for r in await conn.fetch(
            "SELECT * FROM public.site_sessions($1, $2, $3)", site, *span)}
        assert set(sessions) == {"s1", "s2", "s3"}
        assert (sessions["s1"]["events"], sessions["s1"]["page_views"], sessions["s1"]["is_bounce"]) == (5, 2, False)
        assert (sessions["s1"]["landing_page"], sessions["s1"]["referrer_host"]) == (f"{host}/", "google.com")
        assert (sessions["s2"]["is_bounce"], sessions["s2"]["referrer_host"]) == (True, "news.ycombinator.com")
        assert sessions["s3"]["referrer_host"] is None
        assert sessions["s1"]["ended_at"] - sessions["s1"]["started_at"] == 4 * m

        async def top(dimension: str) -> list[tuple]:
            return [tuple(r) for r in await conn.fetch(
                "SELECT * FROM public.site_top($1, $2, $3, $4)", site, *span, dimension)]

        assert await top("page") == [(f"{host}/", 2, 1), (f"{host}/pricing", 2, 2), (f"{host}/about", 1, 1)]
        assert await top("referrer") == [("google.com", 1, 1), ("news.ycombinator.com", 1, 1)]
        assert await top("country") == [("US", 7, 1), ("(unknown)", 1, 1), ("GB", 1, 1)]
        assert await top("device") == [("desktop", 8, 2), ("mobile", 1, 1)]
        assert await top("nonsense") == []

        funnel = [tuple(r) for r in await conn.fetch(
            "SELECT * FROM public.site_funnel($1, $2, $3, $4)", site, *span,
            ["pageview", "form_start", "form_submit", "signup"])]
        third = Decimal("0.3333")
        assert funnel == [
            (1, "pageview", 3, None, Decimal("1.0000")),
            (2, "form_start", 1, third, third),
            (3, "form_submit", 1, Decimal("1.0000"), third),
            (4, "signup", 1, Decimal("1.0000"), third),
        ]
        # order matters: signup before the form does not complete the funnel
        assert [r["visitors"] for r in await conn.fetch(
            "SELECT * FROM public.site_funnel($1, $2, $3, $4)", site, *span, ["signup", "form_start"])] == [1, 0]

        assert [tuple(r)[:4] for r in await conn.fetch(
            "SELECT * FROM public.lead_activity($1, $2, $3)", lead, *span)] == [(day1.date(), 5, 2, 1)]
        assert [tuple(r) for r in await conn.fetch(
            "SELECT * FROM public.experiment_activity($1, $2, $3)", experiment, *span)] == [
            ("pageview", 2, 2, 2), ("signup", 1, 1, 1)]

        # the other owner's site: no rows from any function
        for sql, args in [
            ("SELECT * FROM public.site_daily_stats($1, $2, $3)", (other_site, *span)),
            ("SELECT * FROM public.site_sessions($1, $2, $3)", (other_site, *span)),
            ("SELECT * FROM public.site_top($1, $2, $3, 'page')", (other_site, *span)),
        ]:
            assert await conn.fetch(sql, *args) == []
        assert [r["visitors"] for r in await conn.fetch(
            "SELECT * FROM public.site_funnel($1, $2, $3, $4)", other_site, *span, ["pageview"])] == [0]

    # bob (the other owner) sees his own site's identical traffic, and not alice's
    async with acting_as(conn, plain.bob):
        assert len(await conn.fetch("SELECT * FROM public.site_daily_stats($1, $2, $3)", other_site, *span)) == 2
        assert await conn.fetch("SELECT * FROM public.site_daily_stats($1, $2, $3)", site, *span) == []
        assert await conn.fetch("SELECT * FROM public.lead_activity($1, $2, $3)", lead, *span) == []


async def test_functions_are_inlined_and_prune_partitions(plain):
    """The time range reaches the partitions: one week reads seven daily partitions, not DEFAULT."""
    conn, owners = plain.conn, plain.owners
    site = next(iter(owners.sites_of(owners.a)))
    start = datetime(2030, 6, 3, tzinfo=UTC)
    await migrate.ensure_partitions(conn, start - timedelta(days=10), start + timedelta(days=17))
    async with acting_as(conn, plain.alice):
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN (COSTS OFF) SELECT * FROM public.site_daily_stats($1, $2, $3)",
            site, start, start + timedelta(days=7)))
    # inlined: the planner sees the query itself (unnest of the rollups' visitor sets is no function of ours)
    assert not re.search(r"Function Scan on (?!unnest )", plan), plan
    scanned = set(re.findall(r" on (visitor_events_\w+?) ", plan))
    assert scanned == {f"visitor_events_p{(start + timedelta(days=d)):%Y%m%d}" for d in range(7)}, plan
