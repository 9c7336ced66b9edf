"""Versioned SQL migrations and visitor_events partition upkeep.

Migrations are ``schemas/migrations/NNNN_name.sql``, applied in version order,
each in its own transaction, and recorded in ``pipeline.schema_migrations``.
A session-level advisory lock serialises concurrent runs, so two ``migrate``
processes started at once are safe: the second waits, then finds nothing to do.

The partition functions themselves are SQL (``pipeline.*``, see
``0004_partition_management.sql`` and docs/schema.md); this module wraps them.

An existing unpartitioned ``public.visitor_events`` (Supabase's) is converted:
moved aside to ``pipeline.visitor_events_legacy`` in the transaction that creates
the partitioned table, then copied over in keyset chunks whose progress is
committed with them, so a killed run resumes where it stopped (docs/schema.md).

Run by hand: ``python -m schemas.migrate [--database-url ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
GRANULARITIES = ("day", "week", "month")

# Advisory locks use the two-int form, namespace 'pipe'; key 2 is taken by the
# partition functions in SQL.
_LOCK_NAMESPACE = 0x70697065
_MIGRATIONS_LOCK = 1

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

# The migration that creates the partitioned public.visitor_events; an unpartitioned
# table is moved aside in its transaction, so the name is never missing for writers.
_VISITOR_EVENTS_VERSION = "0003"
LEGACY_TABLE = "pipeline.visitor_events_legacy"

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS pipeline;
CREATE TABLE IF NOT EXISTS pipeline.schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


class MigrationError(RuntimeError):
    """The database or the migration files are not in a state we can migrate."""


class MigrationChecksumError(MigrationError):
    """An applied migration's file was edited afterwards."""


class UnpartitionedVisitorEventsError(MigrationError):
    """public.visitor_events is unpartitioned and cannot be converted; migrate changed nothing."""


# The seed's visitor_events columns, in 0003's order, with format_type() names: what a
# table to convert may have (any subset including id, with these exact types).
VISITOR_EVENTS_COLUMNS: dict[str, str] = {
    "id": "uuid", "event_type": "text", "page_url": "text", "referrer_url": "text",
    "visitor_id": "text", "session_id": "text", "ip_address": "text", "user_agent": "text",
    "device_type": "text", "country": "text", "region": "text", "city": "text",
    "duration_seconds": "integer", "custom_data": "jsonb", "lead_id": "uuid", "segment_id": "uuid",
    "experiment_id": "uuid", "site_id": "uuid", "user_id": "uuid",
    "created_at": "timestamp with time zone", "updated_at": "timestamp with time zone",
    "location": "jsonb", "campaign_id": "uuid",
}
# What 0003's foreign keys point at.
_REFERENCES = {
    "lead_id": "public.leads", "segment_id": "public.segments", "experiment_id": "public.experiments",
    "campaign_id": "public.experiments", "site_id": "public.sites", "user_id": "auth.users",
}
_NIL_UUID = uuid.UUID(int=0)

_CONVERSION_TABLE = """
CREATE TABLE IF NOT EXISTS pipeline.visitor_events_conversion (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    source_columns text[] NOT NULL,       -- the legacy columns copied
    fallback_time  timestamptz NOT NULL,  -- created_at for rows without created_at and updated_at
    estimated_rows bigint NOT NULL,       -- for progress messages only
    last_id        uuid,                  -- every legacy row with id <= last_id is copied
    rows_copied    bigint NOT NULL DEFAULT 0,
    rows_present   bigint NOT NULL DEFAULT 0,  -- skipped: the same (id, created_at) was there
    rows_late      bigint,                -- copied by the final check: written to legacy meanwhile
    started_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    legacy_dropped boolean NOT NULL DEFAULT false
)
"""


@dataclass(frozen=True)
class ConversionStatus:
    """Progress of converting an unpartitioned visitor_events (pipeline.visitor_events_conversion)."""

    rows_copied: int
    rows_present: int
    last_id: uuid.UUID | None
    finished: bool
    legacy_dropped: bool


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migration files of ``directory`` (default MIGRATIONS_DIR) in version order."""
    migrations: dict[str, Migration] = {}
    for path in sorted((directory or MIGRATIONS_DIR).glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match is None:
            raise MigrationError(f"migration file name must be NNNN_name.sql: {path.name}")
        version, name = match.groups()
        if version in migrations:
            raise MigrationError(f"two migrations with version {version}")
        migrations[version] = Migration(version, name, path.read_text(encoding="utf-8"))
    return [migrations[v] for v in sorted(migrations)]


async def apply_migrations(
    conn: asyncpg.Connection,
    *,
    granularity: str = "day",
    premake_days: int = 7,
    conversion_chunk_rows: int = 10_000,
    keep_legacy: bool = False,
) -> list[str]:
    """Apply pending migrations; return the versions applied by this call.

    Also stores ``granularity`` as the partition size for new partitions,
    ensures partitions from now - 1 day to now + ``premake_days`` and brings every
    partition's row-level security in line with the parent's, on every call (a
    no-op run included). Must not be called inside a transaction: each migration
    gets its own.

    An unpartitioned public.visitor_events is converted: moved aside to
    pipeline.visitor_events_legacy when the partitioned table is created, then
    copied in chunks of ``conversion_chunk_rows``; an interrupted copy continues
    on the next call. The legacy table is dropped at the end unless
    ``keep_legacy``. Raises UnpartitionedVisitorEventsError, having changed
    nothing, when the table cannot be converted (see docs/schema.md).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    if premake_days < 0:
        raise ValueError("premake_days must be >= 0")
    if conversion_chunk_rows < 1:
        raise ValueError("conversion_chunk_rows must be >= 1")
    if conn.is_in_transaction():
        raise MigrationError("apply_migrations needs a connection outside any transaction")

    migrations = load_migrations()
    await conn.execute("SELECT pg_advisory_lock($1, $2)", _LOCK_NAMESPACE, _MIGRATIONS_LOCK)
    try:
        legacy_columns = await _convertible_columns(conn)
        await conn.execute(_BOOTSTRAP)
        applied = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM pipeline.schema_migrations")
        }
        _check_applied(migrations, applied)

        done: list[str] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            creates_visitor_events = migration.version == _VISITOR_EVENTS_VERSION
            try:
                async with conn.transaction():
                    if creates_visitor_events and legacy_columns is not None:
                        await _move_legacy_aside(conn, legacy_columns)
                    await conn.execute(migration.sql)
                    if creates_visitor_events:
                        # deny-all until the policies arrive (0021): on Supabase, default
                        # privileges hand every new table in public to anon/authenticated
                        await conn.execute("ALTER TABLE public.visitor_events ENABLE ROW LEVEL SECURITY")
                    await conn.execute(
                        "INSERT INTO pipeline.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        migration.version, migration.name, migration.checksum,
                    )
            except asyncpg.PostgresError as exc:
                # name the file; the transaction has rolled it back entirely
                raise MigrationError(f"migration {migration.version}_{migration.name} failed: {exc}") from exc
            log.info("applied migration %s_%s", migration.version, migration.name)
            done.append(migration.version)

        await _store_granularity(conn, granularity)
        now = datetime.now(timezone.utc)
        await ensure_partitions(conn, now - timedelta(days=1), now + timedelta(days=premake_days))
        fixed = await conn.fetchval("SELECT pipeline.protect_visitor_events_partitions()")
        if fixed:
            log.warning("secured %d visitor_events partition(s): row-level security, policies or grants differed "
                        "from the parent's", fixed)
        await _continue_conversion(conn, conversion_chunk_rows, keep_legacy)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_NAMESPACE, _MIGRATIONS_LOCK)


async def conversion_status(conn: asyncpg.Connection) -> ConversionStatus | None:
    """Where the conversion stands; None if this database never had one."""
    row = await _conversion_row(conn)
    if row is None:
        return None
    return ConversionStatus(row["rows_copied"], row["rows_present"], row["last_id"],
                            row["finished_at"] is not None, row["legacy_dropped"])


async def _conversion_row(conn: asyncpg.Connection) -> asyncpg.Record | None:
    if await conn.fetchval("SELECT to_regclass('pipeline.visitor_events_conversion')") is None:
        return None
    return await conn.fetchrow("SELECT * FROM pipeline.visitor_events_conversion")


# --------------------------------------------------------------------------- conversion


async def _convertible_columns(conn: asyncpg.Connection) -> list[str] | None:
    """The columns to copy if public.visitor_events is an unpartitioned table to convert, else None.

    Read-only. Raises UnpartitionedVisitorEventsError when the table is there but
    cannot be converted without losing or changing something.
    """
    rel = await conn.fetchrow(
        "SELECT oid, relkind::text AS kind FROM pg_class WHERE oid = to_regclass('public.visitor_events')")
    if rel is None or rel["kind"] == "p":
        return None

    def refuse(why: str) -> UnpartitionedVisitorEventsError:
        return UnpartitionedVisitorEventsError(
            f"public.visitor_events is not partitioned and cannot be converted: {why}. "
            "migrate changed nothing (docs/schema.md, 'Converting an unpartitioned visitor_events')")

    oid = rel["oid"]
    if rel["kind"] != "r":
        raise refuse("it is not a plain table")
    if await conn.fetchval("SELECT to_regclass($1)", LEGACY_TABLE) is not None:
        raise refuse(f"{LEGACY_TABLE} exists already")
    if await conn.fetchval("SELECT to_regclass('pipeline.schema_migrations')") is not None and await conn.fetchval(
            "SELECT 1 FROM pipeline.schema_migrations WHERE version = $1", _VISITOR_EVENTS_VERSION):
        raise refuse(f"migration {_VISITOR_EVENTS_VERSION} (the partitioned table) is recorded as applied already")

    columns = await _table_columns(conn, oid)
    odd = [f"{name} {type_}" for name, type_ in columns if VISITOR_EVENTS_COLUMNS.get(name) != type_]
    if odd:
        raise refuse("columns the partitioned table lacks or types it does not use: " + ", ".join(odd))
    names = [name for name, _ in columns]
    # keyset chunks need a unique, non-null key
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = i.indkey[0] WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid"
        " AND i.indnkeyatts = 1 AND i.indpred IS NULL AND a.attname = 'id' AND a.attnotnull)", oid):
        raise refuse("id is not its primary key (a unique, not-null id is needed to copy in resumable chunks)")

    # Views, other tables' foreign keys, policies elsewhere would keep pointing at the
    # old table (by oid) and keep it from being dropped.
    dependents = await conn.fetch(
        "SELECT DISTINCT pg_describe_object(d.classid, d.objid, 0) AS what FROM pg_depend d"
        " WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = $1 AND d.deptype = 'n'"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE d.classid = 'pg_constraint'::regclass"
        "                 AND c.oid = d.objid AND c.conrelid = $1)"
        " AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE d.classid = 'pg_policy'::regclass"
        "                 AND p.oid = d.objid AND p.polrelid = $1)"
        " AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE d.classid = 'pg_trigger'::regclass"
        "                 AND t.oid = d.objid AND t.tgrelid = $1)"
        " ORDER BY 1", oid)
    if dependents:
        raise refuse("other objects depend on it (drop them, migrate, re-create them on the new table): "
                     + ", ".join(r["what"] for r in dependents))

    # A reference the new table's foreign keys would refuse stops the copy half-way:
    # find it now. A validated foreign key of the old table already guarantees it.
    orphans = []
    for column, target in _REFERENCES.items():
        if column not in names or await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid"
            " AND a.attnum = c.conkey[1] WHERE c.conrelid = $1 AND c.contype = 'f' AND c.convalidated"
            " AND cardinality(c.conkey) = 1 AND a.attname = $2 AND c.confrelid = to_regclass($3))",
            oid, column, target,
        ):
            continue
        if await conn.fetchval("SELECT to_regclass($1)", target) is None:
            missing = await conn.fetchval(f"SELECT count(*) FROM public.visitor_events WHERE {column} IS NOT NULL")
        else:
            missing = await conn.fetchval(
                f"SELECT count(*) FROM public.visitor_events l WHERE l.{column} IS NOT NULL"
                f" AND NOT EXISTS (SELECT 1 FROM {target} t WHERE t.id = l.{column})")
        if missing:
            orphans.append(f"{missing} rows whose {column} is not in {target}")
    if orphans:
        raise refuse("the partitioned table's foreign keys would refuse " + "; ".join(orphans))
    return names


async def _table_columns(conn: asyncpg.Connection, oid: int) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum", oid)
    return [(r[0], r[1]) for r in rows]


async def _move_legacy_aside(conn: asyncpg.Connection, columns: list[str]) -> None:
    """Rename the unpartitioned table to LEGACY_TABLE and record the conversion (in 0003's transaction)."""
    await conn.execute("LOCK TABLE public.visitor_events IN ACCESS EXCLUSIVE MODE")
    oid = await conn.fetchval("SELECT 'public.visitor_events'::regclass::oid")
    if [name for name, _ in await _table_columns(conn, oid)] != columns:
        raise MigrationError("public.visitor_events changed while migrate was checking it; run migrate again")
    lost = [r[0] for r in await conn.fetch(
        "SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal"
        " UNION ALL SELECT 'policy ' || polname FROM pg_policy WHERE polrelid = $1"
        " UNION ALL SELECT 'publication ' || p.pubname FROM pg_publication_rel r"
        "           JOIN pg_publication p ON p.oid = r.prpubid WHERE r.prrelid = $1", oid)]
    if lost:
        log.warning("the old visitor_events' %s stay with %s and are dropped with it; "
                    "re-create on public.visitor_events what is still wanted", ", ".join(lost), LEGACY_TABLE)
    await conn.execute(
        "ALTER TABLE public.visitor_events RENAME TO visitor_events_legacy;"
        " ALTER TABLE public.visitor_events_legacy SET SCHEMA pipeline")
    # nobody but the owner touches it any more (writers find the new table by name)
    for grantee in await conn.fetch(
        "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END"
        " FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a WHERE c.oid = $1 AND a.grantee <> c.relowner",
        oid,
    ):
        await conn.execute(f"REVOKE ALL ON {LEGACY_TABLE} FROM {grantee[0]}")
    await conn.execute(_CONVERSION_TABLE)
    await conn.execute(
        "INSERT INTO pipeline.visitor_events_conversion (source_columns, fallback_time, estimated_rows)"
        " SELECT $1, now(), greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $2", columns, oid)
    log.info("moved the unpartitioned public.visitor_events aside to %s; its rows are copied after the migrations",
             LEGACY_TABLE)


def _copy_expressions(columns: list[str]) -> tuple[list[str], list[str], str]:
    """(target columns, expressions over legacy row ``l``, created_at expression) for the copy.

    created_at is the partition key and NOT NULL: a legacy row without one gets its
    updated_at, else the moment the table was moved aside (the same on every run).
    updated_at is NOT NULL too and falls back to that created_at.
    """
    fallback = "(SELECT c.fallback_time FROM pipeline.visitor_events_conversion c)"
    created = "coalesce(" + ", ".join(
        [f"l.{c}" for c in ("created_at", "updated_at") if c in columns] + [fallback]) + ")"
    targets, exprs = [], []
    for name in VISITOR_EVENTS_COLUMNS:
        if name == "created_at":
            exprs.append(created)
        elif name == "updated_at":
            exprs.append(f"coalesce(l.updated_at, {created})" if name in columns else created)
        elif name in columns:
            exprs.append(f"l.{name}")
        else:
            continue  # the new table's default (or NULL)
        targets.append(name)
    return targets, exprs, created


async def _continue_conversion(conn: asyncpg.Connection, chunk_rows: int, keep_legacy: bool) -> ConversionStatus | None:
    state = await _conversion_row(conn)
    if state is None or state["finished_at"] is not None:
        return await conversion_status(conn)
    columns = list(state["source_columns"])
    targets, exprs, created = _copy_expressions(columns)
    insert = f"INSERT INTO public.visitor_events ({', '.join(targets)}) SELECT {', '.join(exprs)}"
    last_id = state["last_id"]

    # Partitions first, for every day that still has rows to copy, each call its own
    # transaction; the chunks then never create partitions under their row locks.
    days = await conn.fetchval(
        f"SELECT array_agg(d ORDER BY d) FROM (SELECT DISTINCT date_trunc('day', {created}, 'UTC') AS d"
        f" FROM {LEGACY_TABLE} l WHERE ($1::uuid IS NULL OR l.id > $1) AND isfinite({created})) days",
        last_id) or []
    for i in range(0, len(days), 31):
        await ensure_partitions_for(conn, days[i:i + 31])

    def chunk_sql(op: str) -> str:
        # The chunk's rows and the progress row commit together: a crash loses the
        # chunk whole and the next run starts after the last committed id.
        return (
            f"WITH chunk AS MATERIALIZED (SELECT {', '.join('l.' + c for c in columns)} FROM {LEGACY_TABLE} l"
            f"   WHERE l.id {op} $1 ORDER BY l.id LIMIT $2),"
            f" copied AS ({insert} FROM chunk l ON CONFLICT DO NOTHING RETURNING 1)"
            " SELECT (SELECT count(*) FROM chunk) AS n, (SELECT count(*) FROM copied) AS copied,"
            "        (SELECT l.id FROM chunk l ORDER BY l.id DESC LIMIT 1) AS last_id")

    first, following = chunk_sql(">="), chunk_sql(">")
    estimated = state["estimated_rows"]
    copied, present = state["rows_copied"], state["rows_present"]
    reported = time.monotonic()
    log.info("copying visitor_events rows from %s (%s rows estimated, %d done)", LEGACY_TABLE,
             estimated or "no", copied + present)
    while True:
        try:
            async with conn.transaction():
                row = await conn.fetchrow(first if last_id is None else following, last_id or _NIL_UUID, chunk_rows)
                if not row["n"]:
                    break
                moved = await conn.execute(
                    "UPDATE pipeline.visitor_events_conversion SET last_id = $1, rows_copied = rows_copied + $2,"
                    " rows_present = rows_present + $3, updated_at = now() WHERE last_id IS NOT DISTINCT FROM $4",
                    row["last_id"], row["copied"], row["n"] - row["copied"], last_id)
                if moved != "UPDATE 1":
                    raise MigrationError("someone else is converting visitor_events (progress moved underneath)")
        except asyncpg.PostgresError as exc:
            # e.g. a reference deleted meanwhile from a legacy table without foreign keys
            raise MigrationError(f"copying {LEGACY_TABLE} stopped after id {last_id}: {exc}; "
                                 "every chunk before is kept, and the next migrate resumes there") from exc
        last_id = row["last_id"]
        copied += row["copied"]
        present += row["n"] - row["copied"]
        if time.monotonic() - reported > 10:
            reported = time.monotonic()
            log.info("copied %d rows%s", copied + present,
                     f" of about {estimated} ({100 * (copied + present) / estimated:.0f}%)" if estimated else "")

    # The final pass: whatever reached the legacy table behind the copy (it should be
    # nothing) is copied under a lock that keeps writers out, then the table goes.
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '10s'; SET LOCAL work_mem = '128MB'")
            await conn.execute(f"LOCK TABLE {LEGACY_TABLE} IN SHARE ROW EXCLUSIVE MODE")
            late = await conn.fetchval(
                f"WITH late AS ({insert} FROM {LEGACY_TABLE} l WHERE NOT EXISTS (SELECT 1 FROM public.visitor_events v"
                f" WHERE v.id = l.id AND v.created_at = {created}) ON CONFLICT DO NOTHING RETURNING 1)"
                " SELECT count(*) FROM late")
            if not keep_legacy:
                await conn.execute(f"DROP TABLE {LEGACY_TABLE}")
            await conn.execute(
                "UPDATE pipeline.visitor_events_conversion SET rows_late = $1, rows_copied = rows_copied + $1,"
                " finished_at = now(), updated_at = now(), legacy_dropped = $2", late, not keep_legacy)
    except (asyncpg.LockNotAvailableError, asyncpg.DependentObjectsStillExistError) as exc:
        log.warning("every row is copied, but %s could not be finished (%s); run migrate again", LEGACY_TABLE, exc)
        return await conversion_status(conn)
    if late:
        log.warning("%d rows were written to %s during the copy; they are copied too", late, LEGACY_TABLE)
    await conn.execute("ANALYZE public.visitor_events")  # the planner knows nothing about the new rows yet
    log.info("converted visitor_events: %d rows copied, %d already there; %s %s", copied + late, present,
             LEGACY_TABLE, "kept" if keep_legacy else "dropped")
    return await conversion_status(conn)


def _check_applied(migrations: list[Migration], applied: dict[str, str]) -> None:
    by_version = {m.version: m for m in migrations}
    for version, checksum in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            # a newer release migrated this database; running older code is the operator's call
            log.warning("database has migration %s that this code does not know", version)
        elif migration.checksum != checksum:
            raise MigrationChecksumError(
                f"migration {version}_{migration.name} changed after it was applied; "
                "add a new migration instead of editing an applied one"
            )


async def _store_granularity(conn: asyncpg.Connection, granularity: str) -> None:
    previous = await conn.fetchval(
        "UPDATE pipeline.partition_config p SET granularity = $1, updated_at = now()"
        " FROM (SELECT granularity FROM pipeline.partition_config) old"
        " WHERE p.granularity <> $1 RETURNING old.granularity",
        granularity,
    )
    if previous is not None:
        log.warning(
            "visitor_events partition granularity changed from %s to %s; existing partitions stay, "
            "new ones use the new size", previous, granularity,
        )


def _aware(value: datetime, name: str) -> datetime:
    # a naive datetime would be read in some unknown zone; partitions are UTC
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value


async def ensure_partitions(conn: asyncpg.Connection, start: datetime, end: datetime) -> None:
    """Create any missing partitions so that every instant of [start, end] is covered."""
    _aware(start, "start")
    _aware(end, "end")
    if end < start:
        raise ValueError("end must not be before start")
    await conn.execute("SELECT pipeline.ensure_visitor_events_partitions($1, $2)", start, end)


async def ensure_partitions_for(conn: asyncpg.Connection, timestamps: Iterable[datetime]) -> None:
    """Create the partitions a batch of ``created_at`` values needs (one call per distinct partition)."""
    values = [_aware(ts, "timestamp") for ts in timestamps]
    if values:
        await conn.execute("SELECT pipeline.ensure_visitor_events_partitions_for($1)", values)


async def default_partition_rows(conn: asyncpg.Connection) -> int:
    """Rows in the DEFAULT partition; anything above 0 needs draining."""
    return await conn.fetchval("SELECT pipeline.visitor_events_default_rows()")


async def drain_default_partition(conn: asyncpg.Connection) -> int:
    """Move the DEFAULT partition's rows into proper partitions; return how many moved."""
    return await conn.fetchval("SELECT pipeline.drain_visitor_events_default()")


async def _main(args: argparse.Namespace) -> None:
    from pipeline import settings as cfg

    pg = cfg.load(cfg.PostgresSettings, args)
    conn = await asyncpg.connect(pg.database_url)
    try:
        applied = await apply_migrations(
            conn, granularity=pg.partition_granularity, premake_days=pg.partition_premake_days,
            conversion_chunk_rows=args.conversion_chunk_rows, keep_legacy=args.keep_legacy,
        )
        log.info("applied %s", ", ".join(applied) if applied else "nothing (up to date)")
        if args.drain:
            log.info("moved %d rows out of the DEFAULT partition", await drain_default_partition(conn))
        rows = await default_partition_rows(conn)
        if rows:
            log.warning("DEFAULT partition holds %d rows; run with --drain", rows)
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    from pipeline import settings as cfg

    parser = argparse.ArgumentParser(prog="python -m schemas.migrate", description=__doc__.splitlines()[0])
    cfg.add_arguments(parser, cfg.PostgresSettings)
    parser.add_argument("--drain", action="store_true", help="also drain the DEFAULT partition")
    parser.add_argument("--conversion-chunk-rows", type=int, default=10_000,
                        help="rows per transaction when converting an unpartitioned visitor_events (default 10000)")
    parser.add_argument("--keep-legacy", action="store_true",
                        help="after converting, keep pipeline.visitor_events_legacy instead of dropping it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
