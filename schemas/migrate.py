"""Versioned SQL migrations and visitor_events partition upkeep.

Migrations are ``schemas/migrations/NNNN_name.sql``, applied in version order,
each in its own transaction, and recorded in ``pipeline.schema_migrations``.
A session-level advisory lock serialises concurrent runs, so two ``migrate``
processes started at once are safe: the second waits, then finds nothing to do.

The partition functions themselves are SQL (``pipeline.*``, see
``0004_partition_management.sql`` and docs/schema.md); this module wraps them.

Run by hand: ``python -m schemas.migrate [--database-url ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import re
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
    """public.visitor_events exists but is not partitioned; migrate left it alone."""


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
    conn: asyncpg.Connection, *, granularity: str = "day", premake_days: int = 7
) -> list[str]:
    """Apply pending migrations; return the versions applied by this call.

    Also stores ``granularity`` as the partition size for new partitions and
    ensures partitions from now - 1 day to now + ``premake_days``, on every
    call (a no-op run included). Must not be called inside a transaction: each
    migration gets its own.

    Raises UnpartitionedVisitorEventsError, having changed nothing, when
    public.visitor_events exists unpartitioned (the current Supabase table).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    if premake_days < 0:
        raise ValueError("premake_days must be >= 0")
    if conn.is_in_transaction():
        raise MigrationError("apply_migrations needs a connection outside any transaction")

    migrations = load_migrations()
    await conn.execute("SELECT pg_advisory_lock($1, $2)", _LOCK_NAMESPACE, _MIGRATIONS_LOCK)
    try:
        await _refuse_unpartitioned(conn)
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
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
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
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_NAMESPACE, _MIGRATIONS_LOCK)


async def _refuse_unpartitioned(conn: asyncpg.Connection) -> None:
    relkind = await conn.fetchval(
        "SELECT relkind::text FROM pg_class WHERE oid = to_regclass('public.visitor_events')"
    )
    if relkind is not None and relkind != "p":
        raise UnpartitionedVisitorEventsError(
            "public.visitor_events exists and is not partitioned; migrate changed nothing. "
            "Converting it is a separate step (docs/schema.md)."
        )


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
            conn, granularity=pg.partition_granularity, premake_days=pg.partition_premake_days
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
