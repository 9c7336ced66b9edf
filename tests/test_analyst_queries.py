"""experiment_activity (migrations 0022, 0041) for an analyst under row-level security.

It reads an experiment's events from the covering index alone: everything the query and
the row-level security policy need (site_id included) must be in the index, in every
partition, or PostgreSQL has to visit the table for each event. The answers are those
of the query written out. (The funnel's rollups are tested in test_rollups.py.)
"""

from __future__ import annotations

import random
import re
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from schemas import migrate

UTC = timezone.utc
BASE = datetime(2030, 5, 6, tzinfo=UTC)
DAYS = 3

RAW_EXPERIMENT = """
SELECT v.event_type, count(*), count(DISTINCT v.visitor_id COLLATE "C"), count(DISTINCT v.session_id COLLATE "C")
FROM public.visitor_events v
WHERE v.experiment_id = $1 AND v.created_at >= $2 AND v.created_at < $3
GROUP BY v.event_type
ORDER BY 2 DESC, 1
"""


@pytest.fixture
async def setup(empty_database_url, pg_admin_url):
    """(conn, analyst of owner a, experiment of a's site, experiment of b's site)."""
    conn = await asyncpg.connect(empty_database_url)
    admin = await asyncpg.connect(pg_admin_url)
    analyst = f"ann_{uuid.uuid4().hex[:8]}"
    try:
        await migrate.apply_migrations(conn)
        a, b = uuid.uuid4(), uuid.uuid4()
        sites = {a: uuid.uuid4(), b: uuid.uuid4()}
        experiments = {a: uuid.uuid4(), b: uuid.uuid4()}
        await conn.executemany("INSERT INTO auth.users (id) VALUES ($1)", [(a,), (b,)])
        for owner in (a, b):
            await conn.execute("INSERT INTO public.sites (id, name, user_id) VALUES ($1, 's', $2)", sites[owner], owner)
            await conn.execute("INSERT INTO public.experiments (id, name, site_id, user_id) VALUES ($1, 'e', $2, $3)",
                               experiments[owner], sites[owner], owner)
        await migrate.ensure_partitions(conn, BASE, BASE + timedelta(days=DAYS))
        rnd = random.Random(3)
        rows = []
        for owner in (a, b):
            for i in range(600):
                rows.append((BASE + timedelta(seconds=rnd.uniform(0, DAYS * 86400)),
                             rnd.choice(["pageview", "pageview", "click", "signup", None]),
                             None if i % 17 == 0 else f"v{rnd.randrange(50)}",
                             None if i % 11 == 0 else f"s{rnd.randrange(120)}",
                             experiments[owner] if i % 3 else None, sites[owner]))
        await conn.executemany(
            "INSERT INTO public.visitor_events (created_at, event_type, visitor_id, session_id, experiment_id, site_id)"
            " VALUES ($1, $2, $3, $4, $5, $6)", rows)
        await conn.execute("VACUUM (ANALYZE) public.visitor_events")  # all-visible: no heap fetches needed
        await admin.execute(f'CREATE ROLE "{analyst}" LOGIN IN ROLE analyst')
        await conn.execute("INSERT INTO pipeline.analyst_users (role_name, user_id) VALUES ($1, $2)", analyst, a)
        yield conn, analyst, experiments[a], experiments[b]
    finally:
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", analyst):
            await conn.execute(f'DROP OWNED BY "{analyst}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{analyst}"')
        await admin.close()
        await conn.close()


async def test_experiment_activity_is_exact_and_reads_only_the_index(setup):
    conn, analyst, mine, theirs = setup
    ranges = [(BASE, BASE + timedelta(days=DAYS)),
              (BASE + timedelta(hours=7, minutes=13), BASE + timedelta(days=1, hours=22, seconds=5))]
    expected = {r: [tuple(x) for x in await conn.fetch(RAW_EXPERIMENT, mine, *r)] for r in ranges}
    assert all(len(rows) == 4 for rows in expected.values())  # three types and the events without one

    await conn.execute(f'SET ROLE "{analyst}"')
    try:
        for r in ranges:
            got = [tuple(x) for x in await conn.fetch("SELECT * FROM public.experiment_activity($1, $2, $3)", mine, *r)]
            assert got == expected[r]
            assert await conn.fetch("SELECT * FROM public.experiment_activity($1, $2, $3)", theirs, *r) == []

        # the small table would be read whole; what matters is that the index alone can answer
        await conn.execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)"
            " SELECT * FROM public.experiment_activity($1, $2, $3)", mine, *ranges[0]))
    finally:
        await conn.execute("RESET ROLE; RESET enable_seqscan; RESET enable_bitmapscan")
    scans = re.findall(r"(\w[\w ]*Scan)(?: using \S+)? on (visitor_events_\w+)", plan)
    assert {p for _, p in scans} == {f"visitor_events_p{(BASE + timedelta(days=d)):%Y%m%d}" for d in range(DAYS)}, plan
    assert {kind for kind, _ in scans} == {"Index Only Scan"}, plan
    assert re.findall(r"Heap Fetches: (\d+)", plan) == ["0"] * DAYS, plan
    assert "site_id = ANY" in plan, plan  # row-level security is checked on the index's site_id
