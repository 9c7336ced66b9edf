"""Migrations and visitor_events partition management, against a real PostgreSQL.

Every test gets a fresh empty database (conftest's ``empty_database_url``).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, datetime, timedelta, timezone

import asyncpg
import pytest

from schemas import migrate

UTC = timezone.utc
ALL_VERSIONS = [m.version for m in migrate.load_migrations()]
# ours; other files (e.g. the workers' state) may follow
SCHEMA_VERSIONS = ["0001", "0002", "0003", "0004"]

# The seed's public.visitor_events, in the seed's order.
VISITOR_EVENTS_COLUMNS = [
    ("id", "uuid"), ("event_type", "text"), ("page_url", "text"), ("referrer_url", "text"),
    ("visitor_id", "text"), ("session_id", "text"), ("ip_address", "text"), ("user_agent", "text"),
    ("device_type", "text"), ("country", "text"), ("region", "text"), ("city", "text"),
    ("duration_seconds", "integer"), ("custom_data", "jsonb"), ("lead_id", "uuid"),
    ("segment_id", "uuid"), ("experiment_id", "uuid"), ("site_id", "uuid"), ("user_id", "uuid"),
    ("created_at", "timestamp with time zone"), ("updated_at", "timestamp with time zone"),
    ("location", "jsonb"), ("campaign_id", "uuid"),
]
TSTZ = "timestamp with time zone"
REFERENCE_COLUMNS = {
    "sites": [
        ("id", "uuid"), ("name", "text"), ("url", "text"), ("description", "text"), ("logo_url", "text"),
        ("resource_urls", "jsonb"), ("user_id", "uuid"), ("created_at", TSTZ), ("updated_at", TSTZ),
        ("competitors", "jsonb"), ("focus_mode", "integer"),
    ],
    "segments": [
        ("id", "uuid"), ("name", "text"), ("description", "text"), ("audience", "segment_audience"),
        ("size", "integer"), ("engagement", "integer"), ("is_active", "boolean"), ("keywords", "jsonb"),
        ("hot_topics", "jsonb"), ("site_id", "uuid"), ("user_id", "uuid"), ("created_at", TSTZ),
        ("updated_at", TSTZ), ("language", "segment_language"), ("url", "text"),
    ],
    "leads": [
        ("id", "uuid"), ("name", "text"), ("email", "text"), ("company", "text"), ("position", "text"),
        ("segment_id", "uuid"), ("status", "text"), ("notes", "text"), ("last_contact", TSTZ),
        ("site_id", "uuid"), ("user_id", "uuid"), ("created_at", TSTZ), ("updated_at", TSTZ),
        ("phone", "text"), ("origin", "text"),
    ],
    "experiments": [
        ("id", "uuid"), ("name", "text"), ("description", "text"), ("status", "text"),
        ("start_date", TSTZ), ("end_date", TSTZ), ("conversion", "numeric"), ("roi", "numeric"),
        ("preview_url", "text"), ("site_id", "uuid"), ("user_id", "uuid"), ("created_at", TSTZ),
        ("updated_at", TSTZ), ("hypothesis", "text"),
    ],
    "experiment_segments": [
        ("id", "uuid"), ("experiment_id", "uuid"), ("segment_id", "uuid"), ("participants", "integer"),
    ],
}


@pytest.fixture
async def db(empty_database_url: str):
    conn = await asyncpg.connect(empty_database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def migrated(db: asyncpg.Connection):
    await migrate.apply_migrations(db)
    return db


def _utc(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


async def _partitions(conn: asyncpg.Connection) -> dict[str, tuple[datetime, datetime]]:
    rows = await conn.fetch(
        "SELECT partition::text AS name, range_start, range_end"
        " FROM pipeline.visitor_events_partitions() WHERE NOT is_default"
    )
    return {r["name"]: (r["range_start"], r["range_end"]) for r in rows}


def _assert_no_overlap(partitions: dict[str, tuple[datetime, datetime]]) -> None:
    spans = sorted(partitions.values())
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert s1 < e1 <= s2 < e2, f"overlap or empty range: {(s1, e1)} {(s2, e2)}"


async def _insert_event(conn: asyncpg.Connection, created_at: datetime, **cols) -> tuple[uuid.UUID, str]:
    """Insert one event through the parent; return its id and the partition it landed in."""
    cols = {"created_at": created_at, "event_type": "page_view", **cols}
    names = ", ".join(cols)
    params = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
    row = await conn.fetchrow(
        f"INSERT INTO public.visitor_events ({names}) VALUES ({params}) RETURNING id, tableoid::regclass::text AS part",
        *cols.values(),
    )
    return row["id"], row["part"]


async def _where(conn: asyncpg.Connection, event_id: uuid.UUID) -> str | None:
    return await conn.fetchval(
        "SELECT tableoid::regclass::text FROM public.visitor_events WHERE id = $1", event_id
    )


async def _catalog(conn: asyncpg.Connection) -> list:
    """Everything migrate could create or change, in comparable form."""
    schemas = ["public", "pipeline", "auth"]
    return [
        [tuple(r) for r in await conn.fetch(
            "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY($1) ORDER BY 1, 2", schemas)],
        [tuple(r) for r in await conn.fetch(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace::regnamespace::text = ANY($1) ORDER BY 1, 2", schemas)],
        [tuple(r) for r in await conn.fetch(
            "SELECT oid::regprocedure::text, md5(prosrc) FROM pg_proc"
            " WHERE pronamespace::regnamespace::text = ANY($1) ORDER BY 1", schemas)],
        [tuple(r) for r in await conn.fetch(
            "SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid"
            " ORDER BY 1, e.enumsortorder")],
        [tuple(r) for r in await conn.fetch("SELECT * FROM pipeline.schema_migrations ORDER BY version")],
        [tuple(r) for r in await conn.fetch("SELECT * FROM pipeline.partition_config")],
    ]


# --------------------------------------------------------------------------- migrations


async def test_applying_twice_is_a_noop(db):
    day_before = datetime.now(UTC).date()
    applied = await migrate.apply_migrations(db)
    assert applied == ALL_VERSIONS and applied[:4] == SCHEMA_VERSIONS
    first = await _catalog(db)
    assert await migrate.apply_migrations(db) == []
    second = await _catalog(db)
    if datetime.now(UTC).date() != day_before:
        # midnight passed between the runs: the second run rightly premade one more day
        def strip(catalog):
            return [[r for r in part if not any("visitor_events_p2" in str(x) for x in r)] for part in catalog]
        first, second = strip(first), strip(second)
    assert first == second


async def test_concurrent_migrate_runs_apply_once(empty_database_url):
    conns = [await asyncpg.connect(empty_database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate.apply_migrations(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    assert sorted(results) == [[], [], ALL_VERSIONS]


async def test_edited_applied_migration_is_refused(migrated):
    await migrated.execute("UPDATE pipeline.schema_migrations SET checksum = 'edited' WHERE version = '0002'")
    with pytest.raises(migrate.MigrationChecksumError, match="0002"):
        await migrate.apply_migrations(migrated)


async def test_failing_migration_is_rolled_back_alone(db, tmp_path, monkeypatch):
    for m in migrate.load_migrations():
        (tmp_path / f"{m.version}_{m.name}.sql").write_text(m.sql)
    (tmp_path / "9999_broken.sql").write_text(
        "CREATE TABLE public.half_done (id int);\nSELECT no_such_function();\n")
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", tmp_path)

    with pytest.raises(migrate.MigrationError, match="9999_broken"):
        await migrate.apply_migrations(db)
    assert await db.fetchval("SELECT to_regclass('public.half_done')") is None
    recorded = [r[0] for r in await db.fetch("SELECT version FROM pipeline.schema_migrations ORDER BY 1")]
    assert recorded == ALL_VERSIONS


async def test_inside_a_transaction_is_refused(db):
    async with db.transaction():
        with pytest.raises(migrate.MigrationError):
            await migrate.apply_migrations(db)


async def test_unpartitioned_visitor_events_is_converted(db):
    # the full Supabase case (23 columns, foreign keys, interruptions) is in test_supabase.py
    await db.execute("CREATE TABLE public.visitor_events (id uuid PRIMARY KEY, event_type text)")
    legacy_id = await db.fetchval("INSERT INTO public.visitor_events VALUES (gen_random_uuid(), 'legacy') RETURNING id")
    assert await migrate.apply_migrations(db) == ALL_VERSIONS
    assert await db.fetchval("SELECT relkind::text FROM pg_class WHERE oid = 'public.visitor_events'::regclass") == "p"
    assert await db.fetchval("SELECT event_type FROM public.visitor_events WHERE id = $1", legacy_id) == "legacy"
    assert await db.fetchval("SELECT to_regclass('pipeline.visitor_events_legacy')") is None


async def test_unconvertible_visitor_events_is_left_alone(db):
    # a column the partitioned table does not have would be lost: refuse, touch nothing
    await db.execute("CREATE TABLE public.visitor_events (id uuid PRIMARY KEY, event_type text, extra int)")
    await db.execute("INSERT INTO public.visitor_events VALUES (gen_random_uuid(), 'legacy', 1)")
    before = await _catalog_without_pipeline(db)
    with pytest.raises(migrate.UnpartitionedVisitorEventsError, match="extra integer"):
        await migrate.apply_migrations(db)
    assert await db.fetchval("SELECT relkind::text FROM pg_class WHERE oid = 'public.visitor_events'::regclass") == "r"
    assert await db.fetchval("SELECT event_type FROM public.visitor_events") == "legacy"
    assert await _catalog_without_pipeline(db) == before
    assert await db.fetchval("SELECT to_regnamespace('pipeline')") is None


async def _catalog_without_pipeline(conn):
    return [tuple(r) for r in await conn.fetch(
        "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2")]


# --------------------------------------------------------------------------- schema shape


async def test_visitor_events_has_the_seed_columns(migrated):
    rows = await migrated.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = 'visitor_events' ORDER BY ordinal_position"
    )
    assert [tuple(r) for r in rows] == VISITOR_EVENTS_COLUMNS
    assert len(rows) == 23
    assert await migrated.fetchval(
        "SELECT pg_get_partkeydef('public.visitor_events'::regclass)") == "RANGE (created_at)"
    pk = await migrated.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'public.visitor_events'::regclass"
        " AND contype = 'p'")
    assert pk == "PRIMARY KEY (id, created_at)"


async def test_reference_tables_have_the_seed_columns(migrated):
    for table, expected in REFERENCE_COLUMNS.items():
        rows = await migrated.fetch(
            "SELECT column_name, CASE data_type WHEN 'USER-DEFINED' THEN udt_name ELSE data_type END"
            " FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1"
            " ORDER BY ordinal_position", table)
        assert [tuple(r) for r in rows] == expected, table
    languages = await migrated.fetchval("SELECT enum_range(NULL::public.segment_language)::text[]")
    assert {"en", "es", "fr", "de", "zh"} <= set(languages) and all(len(code) == 2 for code in languages)


async def test_visitor_events_foreign_keys(migrated):
    rows = await migrated.fetch(
        "SELECT a.attname, c.confrelid::regclass::text AS target, c.confdeltype::text AS on_delete"
        " FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]"
        " WHERE c.conrelid = 'public.visitor_events'::regclass AND c.contype = 'f'")
    # confdeltype: n = SET NULL, c = CASCADE
    assert {(r["attname"], r["target"], r["on_delete"]) for r in rows} == {
        ("lead_id", "leads", "n"), ("segment_id", "segments", "n"), ("experiment_id", "experiments", "n"),
        ("campaign_id", "experiments", "n"), ("user_id", "auth.users", "n"), ("site_id", "sites", "c"),
    }


async def test_foreign_key_actions_and_violation(migrated):
    db = migrated
    user = await db.fetchval("INSERT INTO auth.users (id) VALUES (gen_random_uuid()) RETURNING id")
    site = await db.fetchval("INSERT INTO public.sites (name, user_id) VALUES ('s', $1) RETURNING id", user)
    lead = await db.fetchval("INSERT INTO public.leads (site_id) VALUES ($1) RETURNING id", site)
    exp = await db.fetchval("INSERT INTO public.experiments (site_id) VALUES ($1) RETURNING id", site)
    now = datetime.now(UTC)
    event, _ = await _insert_event(db, now, site_id=site, lead_id=lead, experiment_id=exp, campaign_id=exp, user_id=user)

    await db.execute("DELETE FROM public.leads WHERE id = $1", lead)
    await db.execute("DELETE FROM public.experiments WHERE id = $1", exp)
    row = await db.fetchrow("SELECT lead_id, experiment_id, campaign_id, site_id FROM public.visitor_events WHERE id = $1", event)
    assert tuple(row) == (None, None, None, site)

    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await _insert_event(db, now, lead_id=uuid.uuid4())

    await db.execute("DELETE FROM public.sites WHERE id = $1", site)
    assert await _where(db, event) is None


async def test_uuid_generate_v7(migrated):
    before_ms = int(datetime.now(UTC).timestamp() * 1000)
    ids = [uuid.UUID(str(u)) for u in await migrated.fetchval(
        "SELECT array_agg(public.uuid_generate_v7()) FROM generate_series(1, 500)")]
    after_ms = int(datetime.now(UTC).timestamp() * 1000)
    assert len(set(ids)) == 500
    for u in ids:
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert before_ms - 5 <= u.int >> 80 <= after_ms + 5  # 48-bit millisecond prefix
    first = await migrated.fetchval("SELECT public.uuid_generate_v7()")
    await asyncio.sleep(0.005)
    second = await migrated.fetchval("SELECT public.uuid_generate_v7()")
    assert first < second
    # the column default, for hand-inserted rows
    event, _ = await _insert_event(migrated, datetime.now(UTC))
    assert event.version == 7


# --------------------------------------------------------------------------- existing objects


async def test_existing_auth_schema_and_tables_are_not_touched(db):
    await db.execute("""
        CREATE SCHEMA auth;
        CREATE TABLE auth.users (id uuid PRIMARY KEY, email varchar(255) NOT NULL, is_anonymous boolean);
        CREATE TABLE auth.sessions (id uuid PRIMARY KEY, user_id uuid REFERENCES auth.users (id));
        INSERT INTO auth.users VALUES ('00000000-0000-4000-8000-000000000001', 'a@example.com', false);
        CREATE TYPE public.segment_audience AS ENUM ('enterprise', 'smb');
        CREATE TABLE public.sites (id uuid PRIMARY KEY, name text, user_id uuid, legacy_flag int);
    """)

    def auth_and_existing(conn):
        return conn.fetch(
            "SELECT c.table_schema, c.table_name, c.column_name, c.data_type, c.is_nullable, c.column_default"
            " FROM information_schema.columns c"
            " WHERE c.table_schema = 'auth' OR (c.table_schema = 'public' AND c.table_name = 'sites')"
            " ORDER BY 1, 2, c.ordinal_position")

    before = [tuple(r) for r in await auth_and_existing(db)]
    constraints_before = await db.fetch(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace = 'auth'::regnamespace ORDER BY 1")

    assert await migrate.apply_migrations(db) == ALL_VERSIONS

    assert [tuple(r) for r in await auth_and_existing(db)] == before
    assert await db.fetch(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace = 'auth'::regnamespace ORDER BY 1"
    ) == constraints_before
    assert await db.fetchval("SELECT email FROM auth.users") == "a@example.com"
    assert await db.fetchval("SELECT enum_range(NULL::public.segment_audience)::text[]") == ["enterprise", "smb"]
    # the new tables reference the existing auth.users
    assert await db.fetchval(
        "SELECT confrelid::regclass::text FROM pg_constraint WHERE conname = 'visitor_events_user_id_fkey'"
    ) == "auth.users"


# --------------------------------------------------------------------------- partitions


async def test_partitions_premade_from_yesterday(db):
    await migrate.apply_migrations(db, premake_days=3)
    today = datetime.now(UTC).date()
    parts = await _partitions(db)
    for offset in range(-1, 4):
        d = today + timedelta(days=offset)
        assert parts[f"pipeline.visitor_events_p{d:%Y%m%d}"] == (_utc(d), _utc(d + timedelta(days=1)))
    # nothing beyond the horizon (allowing for midnight passing during the test)
    assert max(end for _, end in parts.values()) <= _utc(today + timedelta(days=5))
    _assert_no_overlap(parts)

    await migrate.apply_migrations(db)  # default premake_days=7
    parts = await _partitions(db)
    for offset in range(0, 8):
        d = today + timedelta(days=offset)
        assert f"pipeline.visitor_events_p{d:%Y%m%d}" in parts
    assert await db.fetchval("SELECT 'pipeline.visitor_events_default'::regclass::text") is not None


async def test_events_land_in_their_named_partitions(migrated):
    db = migrated
    now = datetime.now(UTC)
    old = now - timedelta(days=40)
    ahead = now + timedelta(days=2)

    await migrate.ensure_partitions_for(db, [old, ahead, old + timedelta(minutes=1)])
    _, part_old = await _insert_event(db, old)
    _, part_ahead = await _insert_event(db, ahead)
    assert part_old == f"pipeline.visitor_events_p{old:%Y%m%d}"
    assert part_ahead == f"pipeline.visitor_events_p{ahead:%Y%m%d}"

    # a day nobody asked for goes to DEFAULT
    _, part_unmade = await _insert_event(db, now - timedelta(days=60))
    assert part_unmade == "pipeline.visitor_events_default"

    # a range covers every day in it, ends included
    start = now - timedelta(days=30)
    await migrate.ensure_partitions(db, start, start + timedelta(days=2))
    parts = await _partitions(db)
    for offset in range(3):
        assert f"pipeline.visitor_events_p{start + timedelta(days=offset):%Y%m%d}" in parts
    _assert_no_overlap(parts)


async def test_naive_datetimes_are_refused(migrated):
    with pytest.raises(ValueError):
        await migrate.ensure_partitions(migrated, datetime(2030, 1, 1), datetime(2030, 1, 2, tzinfo=UTC))


async def test_concurrent_ensure_partitions_do_not_fail(migrated, empty_database_url):
    base = _utc(datetime.now(UTC).date() + timedelta(days=20))
    conns = [await asyncpg.connect(empty_database_url) for _ in range(6)]
    try:
        calls = []
        for i, conn in enumerate(conns):
            if i % 2:
                calls.append(migrate.ensure_partitions(conn, base, base + timedelta(days=14)))
            else:
                stamps = [base + timedelta(hours=7 * k + i) for k in range(48)]
                calls.append(migrate.ensure_partitions_for(conn, stamps))
        await asyncio.gather(*calls)
    finally:
        for conn in conns:
            await conn.close()
    parts = await _partitions(migrated)
    _assert_no_overlap(parts)
    for offset in range(15):
        d = base.date() + timedelta(days=offset)
        assert parts[f"pipeline.visitor_events_p{d:%Y%m%d}"] == (_utc(d), _utc(d + timedelta(days=1)))


async def test_default_partition_is_drained(migrated):
    db = migrated
    now = datetime.now(UTC)
    stamps = [now - timedelta(days=100), now - timedelta(days=100, minutes=5), now + timedelta(days=45)]
    ids = []
    for ts in stamps:
        event_id, part = await _insert_event(db, ts)
        assert part == "pipeline.visitor_events_default"
        ids.append(event_id)
    assert await migrate.default_partition_rows(db) == 3

    assert await migrate.drain_default_partition(db) == 3
    assert await migrate.default_partition_rows(db) == 0
    for event_id, ts in zip(ids, stamps):
        assert await _where(db, event_id) == f"pipeline.visitor_events_p{ts:%Y%m%d}"
    assert await migrate.drain_default_partition(db) == 0
    _assert_no_overlap(await _partitions(db))


async def test_rows_with_infinite_timestamps_stay_in_default_and_are_counted(migrated):
    await migrated.execute("INSERT INTO public.visitor_events (created_at) VALUES ('infinity')")
    _, part = await _insert_event(migrated, datetime.now(UTC) - timedelta(days=90))
    assert part == "pipeline.visitor_events_default"
    assert await migrate.drain_default_partition(migrated) == 1
    assert await migrate.default_partition_rows(migrated) == 1


async def test_creating_a_partition_moves_rows_out_of_default(migrated):
    db = migrated
    ts = datetime.now(UTC) - timedelta(days=60)
    other = ts - timedelta(days=3)
    event_id, part = await _insert_event(db, ts)
    other_id, _ = await _insert_event(db, other)
    assert part == "pipeline.visitor_events_default"

    # plain CREATE TABLE ... PARTITION OF would fail here; ensure moves the row
    await migrate.ensure_partitions(db, ts, ts)
    assert await _where(db, event_id) == f"pipeline.visitor_events_p{ts:%Y%m%d}"
    # rows outside the new range stay put
    assert await _where(db, other_id) == "pipeline.visitor_events_default"
    assert await migrate.default_partition_rows(db) == 1


async def test_week_and_month_names_and_bounds(db):
    await migrate.apply_migrations(db, granularity="week")
    this_monday = datetime.now(UTC).date() - timedelta(days=datetime.now(UTC).weekday())
    parts = await _partitions(db)
    assert parts[f"pipeline.visitor_events_w{this_monday:%Y%m%d}"] == (
        _utc(this_monday), _utc(this_monday + timedelta(days=7)))
    _assert_no_overlap(parts)

    await migrate.ensure_partitions_for(db, [datetime(2030, 3, 6, 12, tzinfo=UTC)])  # a Wednesday
    assert (await _partitions(db))["pipeline.visitor_events_w20300304"] == (
        datetime(2030, 3, 4, tzinfo=UTC), datetime(2030, 3, 11, tzinfo=UTC))

    await migrate.apply_migrations(db, granularity="month")
    assert await db.fetchval("SELECT granularity FROM pipeline.partition_config") == "month"
    await migrate.ensure_partitions_for(db, [datetime(2032, 2, 14, tzinfo=UTC), datetime(2032, 12, 31, 23, tzinfo=UTC)])
    parts = await _partitions(db)
    assert parts["pipeline.visitor_events_m203202"] == (
        datetime(2032, 2, 1, tzinfo=UTC), datetime(2032, 3, 1, tzinfo=UTC))
    assert parts["pipeline.visitor_events_m203212"] == (
        datetime(2032, 12, 1, tzinfo=UTC), datetime(2033, 1, 1, tzinfo=UTC))
    _assert_no_overlap(parts)


async def test_bounds_and_names_are_utc_whatever_the_session_timezone(migrated, empty_database_url):
    # in Los Angeles this instant and its UTC midnight are still 30 May
    conn = await asyncpg.connect(empty_database_url, server_settings={"TimeZone": "America/Los_Angeles"})
    try:
        ts = datetime(2030, 5, 31, 2, 30, tzinfo=UTC)
        await migrate.ensure_partitions_for(conn, [ts])
        _, part = await _insert_event(conn, ts)
    finally:
        await conn.close()
    assert part == "pipeline.visitor_events_p20300531"
    assert (await _partitions(migrated))[part] == (
        datetime(2030, 5, 31, tzinfo=UTC), datetime(2030, 6, 1, tzinfo=UTC))


async def test_granularity_change_never_overlaps(migrated):
    db = migrated
    # day partitions for 10-12 January, then switch to month
    await migrate.ensure_partitions(db, datetime(2031, 1, 10, tzinfo=UTC), datetime(2031, 1, 12, 12, tzinfo=UTC))
    await migrate.apply_migrations(db, granularity="month")
    await migrate.ensure_partitions(db, datetime(2031, 1, 1, tzinfo=UTC), datetime(2031, 1, 31, 23, tzinfo=UTC))

    jan = {n: b for n, b in (await _partitions(db)).items() if "2031" in n}
    d = lambda day: datetime(2031, 1, day, tzinfo=UTC)  # noqa: E731
    assert jan == {
        "pipeline.visitor_events_m203101": (d(1), d(10)),
        "pipeline.visitor_events_p20310110": (d(10), d(11)),
        "pipeline.visitor_events_p20310111": (d(11), d(12)),
        "pipeline.visitor_events_p20310112": (d(12), d(13)),
        "pipeline.visitor_events_m203101_2": (d(13), datetime(2031, 2, 1, tzinfo=UTC)),
    }
    _assert_no_overlap(await _partitions(db))

    # 20 January's "own" name m203101 is the shrunk [1, 10): coverage is found by bounds, not name
    before = await _partitions(db)
    await migrate.ensure_partitions(db, d(20), d(20))
    assert await _partitions(db) == before
    _, part = await _insert_event(db, d(20))
    assert part == "pipeline.visitor_events_m203101_2"

    # and a row in DEFAULT for a shrunk gap is still drained into the right place
    await migrate.apply_migrations(db, granularity="week")
    event_id, part = await _insert_event(db, datetime(2031, 2, 2, tzinfo=UTC))  # Sunday of the week from 27 Jan
    assert part == "pipeline.visitor_events_default"
    assert await migrate.drain_default_partition(db) == 1
    assert await _where(db, event_id) == "pipeline.visitor_events_w20310127"
    assert (await _partitions(db))["pipeline.visitor_events_w20310127"] == (
        datetime(2031, 2, 1, tzinfo=UTC), datetime(2031, 2, 3, tzinfo=UTC))
