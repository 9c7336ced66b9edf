"""The PostgreSQL sink: bulk binary COPY into visitor_events, effectively once.

One ``write`` is one transaction that
  1. advances the Kafka offsets of every partition in the batch, but only while this
     worker still holds the partition's current epoch (fencing: the row lock taken
     here also makes a new owner's ``claim`` wait until this transaction ends),
  2. skips rows already stored (a client retry re-sends the same event id),
  3. COPYs the rest in binary, isolating rows Postgres refuses (SQLSTATE classes 22
     and 23) by bisection inside savepoints, so one bad row never fails its batch,
  4. stores the visitors' session state,
  5. hands refused rows to ``on_rejected`` (the dead-letter producer) before commit,
  6. last, names the rows it stored below the rollups' watermark in
     public.site_rollup_late, so the rollup job adds them (pipeline/rollups.py).
A crash anywhere rolls everything back, offsets included: the batch is re-read.

Errors of any other class (connection lost, server shutting down, serialization,
out of resources, missing table) are raised as ``SinkUnavailable`` for the caller to
retry with backoff; they say nothing about the rows.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

log = logging.getLogger("sinks.postgres")

# visitor_events columns in the order rows are built (see processors/rows.py).
COLUMNS = (
    "id", "event_type", "page_url", "referrer_url", "visitor_id", "session_id", "ip_address",
    "user_agent", "device_type", "country", "region", "city", "duration_seconds", "custom_data",
    "lead_id", "segment_id", "experiment_id", "site_id", "user_id", "created_at", "updated_at",
    "location", "campaign_id",
)
ID, CREATED_AT, SITE_ID = COLUMNS.index("id"), COLUMNS.index("created_at"), COLUMNS.index("site_id")

Row = tuple
Rejected = list[tuple[int, str]]  # (index in the batch's rows, reason)


class SinkUnavailable(Exception):
    """Postgres cannot take the batch now; retry later. Nothing was committed."""


class Fenced(Exception):
    """Another worker owns a partition of this batch now; the batch must be dropped."""


@dataclass
class Batch:
    rows: list[Row]
    # (topic, partition) -> the next offset to read once this batch is stored
    offsets: dict[tuple[str, int], int]
    # (site_id, visitor_id, state as JSON text) for every visitor the batch touched
    sessions: list[tuple[str, str, str]] = field(default_factory=list)
    # (site_id, visitor_id, lead_id, since): give the visitor's anonymous events since then the lead
    backfills: list[tuple[str, str, str, datetime]] = field(default_factory=list)


@dataclass
class WriteResult:
    stored: list[int]  # indexes of the batch's rows stored by this write
    duplicates: int
    rejected: Rejected


def _is_row_error(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    return state[:2] in ("22", "23")


class PostgresSink:
    def __init__(self, pool: asyncpg.Pool, *, group_id: str, owner: str) -> None:
        self._pool = pool
        self._group = group_id
        self._owner = owner
        self._epochs: dict[tuple[str, int], int] = {}
        self._covered: set[datetime] = set()  # partition start times known to exist

    # -- ownership -----------------------------------------------------------

    async def claim(self, topic: str, partitions: Sequence[int]) -> dict[int, int | None]:
        """Take ownership of partitions: bump their epochs; return where to resume.

        ``None`` means nothing was ever stored for that partition. Waits for a
        previous owner's open transaction, so the offsets returned are final.
        """
        out: dict[int, int | None] = {}
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """
                INSERT INTO pipeline.consumer_offsets AS o (group_id, topic, partition, next_offset, epoch, owner)
                SELECT $1, $2, p, -1, 1, $4 FROM unnest($3::int[]) AS p
                ON CONFLICT (group_id, topic, partition)
                DO UPDATE SET epoch = o.epoch + 1, owner = EXCLUDED.owner, updated_at = now()
                RETURNING partition, next_offset, epoch
                """,
                self._group, topic, list(partitions), self._owner,
            )
        for r in rows:
            self._epochs[(topic, r["partition"])] = r["epoch"]
            out[r["partition"]] = r["next_offset"] if r["next_offset"] >= 0 else None
        return out

    def release(self, topic: str, partitions: Sequence[int]) -> None:
        for p in partitions:
            self._epochs.pop((topic, p), None)

    def owns(self, topic: str, partition: int) -> bool:
        return (topic, partition) in self._epochs

    # -- writing -------------------------------------------------------------

    async def write(
        self,
        batch: Batch,
        on_rejected: Callable[[Rejected], Awaitable[None]] | None = None,
    ) -> WriteResult:
        try:
            return await self._write(batch, on_rejected)
        except (Fenced, SinkUnavailable):
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _write(self, batch: Batch, on_rejected) -> WriteResult:
        rows = batch.rows
        if rows:
            await self._ensure_partitions(rows)
        async with self._pool.acquire() as conn, conn.transaction():
            await self._advance_offsets(conn, batch.offsets)
            fresh = await self._without_stored(conn, rows)
            rejected = await self._copy_isolating(conn, [rows[i] for i in fresh])
            rejected = [(fresh[i], reason) for i, reason in rejected]
            duplicates = len(rows) - len(fresh)
            dup_now = [i for i, reason in rejected if reason == "duplicate"]
            rejected = [(i, reason) for i, reason in rejected if reason != "duplicate"]
            duplicates += len(dup_now)
            if batch.sessions:
                await conn.execute(
                    """
                    INSERT INTO pipeline.visitor_sessions (site_id, visitor_id, state, updated_at)
                    SELECT s, v, st::jsonb, now() FROM unnest($1::uuid[], $2::text[], $3::text[]) AS t(s, v, st)
                    ON CONFLICT (site_id, visitor_id) DO UPDATE SET state = EXCLUDED.state, updated_at = now()
                    """,
                    [s[0] for s in batch.sessions], [s[1] for s in batch.sessions],
                    [s[2] for s in batch.sessions],
                )
            if batch.backfills:
                await self._backfill(conn, batch.backfills)
            if rejected and on_rejected is not None:
                await on_rejected(rejected)
            not_stored = {i for i, _ in rejected} | set(dup_now)
            stored = [i for i in fresh if i not in not_stored]
            if stored:
                await self._mark_late(conn, [rows[i] for i in stored])
        return WriteResult(stored=stored, duplicates=duplicates, rejected=rejected)

    async def _mark_late(self, conn: asyncpg.Connection, rows: list[Row]) -> None:
        """The write's last statements: rows stored below the rollups' watermark are named
        in public.site_rollup_late for the rollup job. rollup_write_horizon() takes a lock
        (shared, held until commit) that the job takes exclusively while it moves the
        watermark: so this either commits before the job's snapshot, or sees the new
        watermark. Last, so the lock is held for the commit only."""
        horizon = await conn.fetchval("SELECT pipeline.rollup_write_horizon()")
        if horizon is None:
            return  # no rollups yet: the job's first run reads everything
        late = [r for r in rows if r[CREATED_AT] < horizon and r[SITE_ID] is not None]
        if late:
            await conn.execute(
                "INSERT INTO public.site_rollup_late (site_id, created_at, id)"
                " SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[])",
                [r[SITE_ID] for r in late], [r[CREATED_AT] for r in late], [r[ID] for r in late])

    async def _backfill(self, conn: asyncpg.Connection, backfills: list[tuple[str, str, str, datetime]]) -> None:
        """Identify: the visitor's earlier anonymous events get the lead (idempotent: only
        rows without a lead change). After the COPY, so this batch's rows are included."""
        await conn.execute(
            """
            UPDATE public.visitor_events v SET lead_id = b.lead, updated_at = now()
            FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::timestamptz[]) AS b(site, visitor, lead, since)
            WHERE v.site_id = b.site AND v.visitor_id = b.visitor AND v.created_at >= b.since
              AND v.created_at >= $5 AND v.lead_id IS NULL
            """,
            [b[0] for b in backfills], [b[1] for b in backfills], [b[2] for b in backfills],
            [b[3] for b in backfills], min(b[3] for b in backfills),
        )

    async def _advance_offsets(self, conn: asyncpg.Connection, offsets: dict[tuple[str, int], int]) -> None:
        for (topic, partition), next_offset in sorted(offsets.items()):
            epoch = self._epochs.get((topic, partition))
            updated = None
            if epoch is not None:
                updated = await conn.fetchval(
                    """
                    UPDATE pipeline.consumer_offsets SET next_offset = $5, updated_at = now()
                    WHERE group_id = $1 AND topic = $2 AND partition = $3 AND epoch = $4
                    RETURNING 1
                    """,
                    self._group, topic, partition, epoch, next_offset,
                )
            if updated is None:
                self._epochs.pop((topic, partition), None)
                raise Fenced(f"{topic}[{partition}] is owned by another worker now")

    async def _without_stored(self, conn: asyncpg.Connection, rows: list[Row]) -> list[int]:
        """Indexes of rows whose (id, created_at) is neither stored nor repeated in the batch."""
        if not rows:
            return []
        times = [r[CREATED_AT] for r in rows]
        stored = await conn.fetch(
            "SELECT id, created_at FROM public.visitor_events "
            "WHERE id = ANY($1::uuid[]) AND created_at BETWEEN $2 AND $3",
            [r[ID] for r in rows], min(times), max(times),
        )
        seen = {(str(r["id"]), r["created_at"]) for r in stored}
        fresh = []
        for i, r in enumerate(rows):
            key = (str(r[ID]), r[CREATED_AT])
            if key not in seen:
                seen.add(key)
                fresh.append(i)
        return fresh

    async def _copy_isolating(self, conn: asyncpg.Connection, rows: list[Row], base: int = 0) -> Rejected:
        """COPY rows; on a row-level error, bisect inside savepoints to find the culprits."""
        if not rows:
            return []
        try:
            async with conn.transaction():  # a savepoint
                await conn.copy_records_to_table("visitor_events", schema_name="public",
                                                 records=rows, columns=COLUMNS)
            return []
        except asyncpg.PostgresError as exc:
            if not _is_row_error(exc):
                raise
            if len(rows) == 1:
                if exc.sqlstate == "23505":
                    return [(base, "duplicate")]
                return [(base, f"{exc.sqlstate}: {exc}")]
        mid = len(rows) // 2
        left = await self._copy_isolating(conn, rows[:mid], base)
        right = await self._copy_isolating(conn, rows[mid:], base + mid)
        return left + right

    async def _ensure_partitions(self, rows: list[Row]) -> None:
        """Create missing partitions for the batch's hours (each hour once per process)."""
        from schemas.migrate import ensure_partitions_for

        hours = {r[CREATED_AT].replace(minute=0, second=0, microsecond=0) for r in rows} - self._covered
        if not hours:
            return
        async with self._pool.acquire() as conn:
            # Partition bounds fall on whole hours, so an hour's start stands for all of it.
            await ensure_partitions_for(conn, sorted(hours))
        self._covered |= hours
