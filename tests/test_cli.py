"""The pipeline command: every subcommand has a useful --help, and maintenance runs."""

import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["collector", "worker", "migrate", "maintenance", "stack", "tail", "dlq"]


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    r = run(command, "--help")
    assert r.returncode == 0 and f"pipeline {command}" in r.stdout


def test_top_level_help_lists_every_command():
    out = run("--help").stdout
    assert all(c in out for c in COMMANDS)


def test_bad_setting_is_a_clear_error():
    r = run("collector", "--collector-port", "eighty")
    assert r.returncode != 0 and "COLLECTOR_PORT" in r.stderr


async def test_migrate_then_maintenance(empty_database_url):
    import os

    env = dict(os.environ, DATABASE_URL=empty_database_url)
    r = run("migrate", env=env)
    assert r.returncode == 0 and "applied" in r.stdout, r.stderr
    assert "applied 0 migration(s)" in run("migrate", env=env).stdout  # idempotent
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("INSERT INTO public.visitor_events (id, created_at) VALUES (gen_random_uuid(), "
                           "'2001-01-01T00:00:00Z')")  # only DEFAULT can hold it
        assert await conn.fetchval("SELECT pipeline.visitor_events_default_rows()") == 1
        r = run("maintenance", env=env)
        assert r.returncode == 0 and "1 row(s) moved" in r.stdout, r.stderr
        assert await conn.fetchval("SELECT pipeline.visitor_events_default_rows()") == 0
        assert await conn.fetchval("SELECT count(*) FROM public.visitor_events") == 1
        # the rollups start at the oldest event (2001: the empty years between are skipped, not
        # walked a day at a time) and reach now - ROLLUP_LAG; that event has no site to count for
        assert "rollups complete up to" in r.stdout and "0 row(s) added" in r.stdout, r.stdout
        assert await conn.fetchval("SELECT now() - public.rollups_until() < interval '3 minutes'")
        r = run("maintenance", "--rebuild-rollups", env=env)
        assert r.returncode == 0 and "rollups rebuilt and complete up to" in r.stdout, r.stderr
    finally:
        await conn.close()
