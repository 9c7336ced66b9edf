"""What the visitor_events foreign keys cost a bulk COPY.

Two scratch databases on the target server get the full migrations; in one the
six foreign keys of visitor_events are then dropped, so the tables are
otherwise identical (columns, partitions, indexes, defaults). Both get the same
reference rows, and the same N events are COPYed (asyncpg
``copy_records_to_table``, in worker-sized batches, each its own transaction)
into each, in alternating rounds so machine noise hits both alike. Each round
starts from an empty table. Printed: rows/s per round, medians, and the ratio.

    .venv/bin/python benchmarks/fk_cost.py [--dsn URL] [--rows 200000] [--rounds 3] [--batch-size 5000]

The DSN (default: DATABASE_URL) needs the right to create databases; both
scratch databases are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import uuid_utils.compat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import settings as cfg  # noqa: E402
from schemas.migrate import apply_migrations  # noqa: E402

COLUMNS = [
    "id", "event_type", "page_url", "referrer_url", "visitor_id", "session_id", "ip_address",
    "user_agent", "device_type", "country", "region", "city", "duration_seconds", "custom_data",
    "lead_id", "segment_id", "experiment_id", "site_id", "user_id", "created_at", "updated_at",
    "location", "campaign_id",
]

# Share of events carrying each optional reference (site and user: always).
# A NULL reference costs no lookup, so the mix matters; it is printed with the result.
REFERENCE_SHARE = {"lead_id": 0.10, "segment_id": 0.40, "experiment_id": 0.20, "campaign_id": 0.20}

USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
]


class References:
    """Ids of the reference rows, identical in both databases."""

    def __init__(self, rng: random.Random) -> None:
        def ids(n: int) -> list[uuid.UUID]:
            return [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(n)]

        self.users = ids(20)
        self.sites = ids(50)
        self.site_owner = {s: self.users[i % len(self.users)] for i, s in enumerate(self.sites)}
        self.segments = ids(200)
        self.leads = ids(2000)
        self.experiments = ids(100)

    async def insert(self, conn: asyncpg.Connection) -> None:
        await conn.executemany("INSERT INTO auth.users (id) VALUES ($1)", [(u,) for u in self.users])
        await conn.executemany(
            "INSERT INTO public.sites (id, name, user_id) VALUES ($1, $2, $3)",
            [(s, f"site {i}", self.site_owner[s]) for i, s in enumerate(self.sites)],
        )
        for table, rows in (("segments", self.segments), ("leads", self.leads), ("experiments", self.experiments)):
            await conn.executemany(
                f"INSERT INTO public.{table} (id, site_id, user_id) VALUES ($1, $2, $3)",
                [(r, s, self.site_owner[s]) for r, s in ((r, self.sites[i % len(self.sites)]) for i, r in enumerate(rows))],
            )
        await conn.execute("ANALYZE")


def make_events(n: int, refs: References, rng: random.Random) -> list[tuple]:
    now = datetime.now(timezone.utc)
    events = []
    for i in range(n):
        site = rng.choice(refs.sites)
        # the last 24 hours: the partitions migrate premakes
        created = now - timedelta(seconds=rng.uniform(0, 86_000))

        def maybe(column: str, pool: list[uuid.UUID]) -> uuid.UUID | None:
            return rng.choice(pool) if rng.random() < REFERENCE_SHARE[column] else None

        events.append((
            uuid_utils.compat.uuid7(), rng.choice(("page_view", "click", "scroll", "custom")),
            f"https://example.com/page/{rng.randrange(500)}", "https://www.google.com/",
            f"v{rng.randrange(50_000)}", f"s{rng.randrange(200_000)}",
            f"203.0.113.{rng.randrange(256)}", rng.choice(USER_AGENTS),
            rng.choice(("desktop", "mobile", "tablet")), "ES", "Madrid", "Madrid",
            rng.randrange(600), json.dumps({"i": i}),
            maybe("lead_id", refs.leads), maybe("segment_id", refs.segments),
            maybe("experiment_id", refs.experiments), site, refs.site_owner[site], created, created,
            json.dumps({"lat": 40.4, "lon": -3.7}), maybe("campaign_id", refs.experiments),
        ))
    return events


async def copy_round(conn: asyncpg.Connection, events: list[tuple], batch_size: int) -> float:
    """COPY all events in batches; return rows/s."""
    await conn.execute("TRUNCATE public.visitor_events")
    started = time.perf_counter()
    for i in range(0, len(events), batch_size):
        await conn.copy_records_to_table(
            "visitor_events", schema_name="public", records=events[i:i + batch_size], columns=COLUMNS
        )
    elapsed = time.perf_counter() - started
    stored = await conn.fetchval("SELECT count(*) FROM public.visitor_events")
    assert stored == len(events), (stored, len(events))
    return len(events) / elapsed


async def run(args: argparse.Namespace) -> None:
    tag = uuid.uuid4().hex[:8]
    names = {"with FKs": f"fk_cost_{tag}_fk", "without FKs": f"fk_cost_{tag}_nofk"}
    admin = await asyncpg.connect(args.dsn)
    conns: dict[str, asyncpg.Connection] = {}
    try:
        server = await admin.fetchval("SHOW server_version")
        for name in names.values():
            await admin.execute(f'CREATE DATABASE "{name}"')
        rng = random.Random(args.seed)
        refs = References(rng)
        for label, name in names.items():
            conn = conns[label] = await asyncpg.connect(args.dsn, database=name)
            await apply_migrations(conn)
            await refs.insert(conn)
        dropped = await conns["without FKs"].fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'public.visitor_events'::regclass AND contype = 'f'"
        )
        for row in dropped:
            await conns["without FKs"].execute(f'ALTER TABLE public.visitor_events DROP CONSTRAINT "{row[0]}"')
        assert len(dropped) == 6, dropped

        print(f"PostgreSQL {server}; {args.rows:,} rows per COPY run in batches of {args.batch_size:,}; "
              f"reference share {REFERENCE_SHARE} (site_id, user_id: 100%)")
        events = make_events(args.rows, refs, rng)

        results: dict[str, list[float]] = {label: [] for label in names}
        for round_no in range(args.rounds):
            # alternate who goes first so warm-up and drift do not favour one side
            order = list(names) if round_no % 2 == 0 else list(reversed(names))
            for label in order:
                rate = await copy_round(conns[label], events, args.batch_size)
                results[label].append(rate)
                print(f"round {round_no + 1} {label:>12}: {rate:>10,.0f} rows/s", flush=True)

        with_fk = statistics.median(results["with FKs"])
        without = statistics.median(results["without FKs"])
        print(f"median with FKs:    {with_fk:>10,.0f} rows/s")
        print(f"median without FKs: {without:>10,.0f} rows/s")
        print(f"ratio with/without: {with_fk / without:.2f}  (FK overhead {100 * (without / with_fk - 1):.0f}% more time)")
    finally:
        for conn in conns.values():
            await conn.close()
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=cfg.load(cfg.PostgresSettings).database_url,
                        help="PostgreSQL DSN (default: env DATABASE_URL)")
    parser.add_argument("--rows", type=int, default=200_000, help="events per COPY run (default 200000)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--batch-size", type=int, default=5_000, help="rows per COPY (default 5000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the generated data")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
