"""Shared fixtures: the real Kafka broker and PostgreSQL server of the local stack.

The test command (deploy/local/test.sh) starts both before pytest runs. For a quick
run against other servers set TEST_KAFKA_BOOTSTRAP and/or TEST_PG_ADMIN_URL.
Every test gets its own topics and databases, so tests never see each other's data.
"""

from __future__ import annotations

import os
import uuid

import asyncpg
import pytest

from pipeline import settings as cfg

_stack = cfg.load(cfg.StackSettings)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return os.environ.get("TEST_KAFKA_BOOTSTRAP", f"127.0.0.1:{_stack.kafka_port}")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return os.environ.get("TEST_PG_ADMIN_URL", f"postgresql://postgres@127.0.0.1:{_stack.pg_port}/postgres")


def _with_db(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
async def empty_database_url(pg_admin_url: str):
    """DSN of a new, empty database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_db(pg_admin_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def unique_topic() -> str:
    """A topic name no other test uses (the broker auto-creates it on first produce)."""
    return f"test-{uuid.uuid4().hex[:12]}"
