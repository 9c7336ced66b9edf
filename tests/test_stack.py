"""README command 1's machinery: `pipeline stack up|status|env|down` brings up a second,
independent stack (own directory and ports), a pixel hit lands in its Kafka topic,
and `down` stops every process it started."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg
import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def stack_env():
    kafka_port, pg_port, collector_port, worker_port = _free_ports(4)
    # The controller listens on kafka_port + 1; make sure that one is free too.
    while _port_open(kafka_port + 1):
        kafka_port, = _free_ports(1)
    # Not pytest's tmp_path: its parents are private to root, and the postgres system
    # user must reach its data directory.
    state = Path(tempfile.mkdtemp(prefix="pipeline-stack-test-"))
    os.chmod(state, 0o755)
    env = dict(os.environ, STACK_DIR=str(state), KAFKA_PORT=str(kafka_port), PG_PORT=str(pg_port),
               COLLECTOR_PORT=str(collector_port), STACK_WORKER_PORT=str(worker_port), LOG_FORMAT="text")
    for var in ("KAFKA_BOOTSTRAP", "DATABASE_URL", "EVENTS_TOPIC"):
        env.pop(var, None)
    yield env
    subprocess.run([sys.executable, "-m", "pipeline.cli", "stack", "down"], env=env, cwd=ROOT,
                   capture_output=True, timeout=120)
    shutil.rmtree(state, ignore_errors=True)


def _pipeline(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


async def _poll_rows(dsn: str, visitor: str, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch("SELECT * FROM visitor_events WHERE visitor_id = $1", visitor)
            if rows or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.3)
    finally:
        await conn.close()


@pytest.mark.timeout(600)
def test_stack_up_pixel_lands_in_kafka_then_down(stack_env):
    up = _pipeline(stack_env, "stack", "up")
    assert up.returncode == 0, up.stderr + up.stdout
    assert "collector" in up.stdout and "healthy" in up.stdout

    env_lines = dict(line.split("=", 1) for line in _pipeline(stack_env, "stack", "env").stdout.split())
    collector_url = env_lines["COLLECTOR_URL"].strip("'")
    assert collector_url == f"http://127.0.0.1:{stack_env['COLLECTOR_PORT']}"
    assert env_lines["KAFKA_BOOTSTRAP"] == f"127.0.0.1:{stack_env['KAFKA_PORT']}"
    assert env_lines["DATABASE_URL"].endswith(f":{stack_env['PG_PORT']}/pipeline")

    # Idempotent and quick when everything already runs.
    again = _pipeline(stack_env, "stack", "up", timeout=60)
    assert again.returncode == 0, again.stderr

    site = "00000000-0000-4000-8000-000000000001"  # the demo site the stack creates
    with urllib.request.urlopen(f"{collector_url}/t.gif?site_id={site}&visitor_id=stack-v1", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "image/gif"

    # As a user would: eval "$(pipeline stack env)" first.
    user_env = dict(stack_env, **{k: v.strip("'") for k, v in env_lines.items()})
    tail = _pipeline(user_env, "tail", "--from-beginning", "--max", "1", "--idle-timeout", "20", timeout=60)
    assert tail.returncode == 0, tail.stderr
    line = orjson.loads(tail.stdout.splitlines()[0])
    assert line["key"] == f"{site}:stack-v1"
    assert line["value"]["event"]["site_id"] == site

    # ... and, through the worker, in PostgreSQL.
    dsn = env_lines["DATABASE_URL"].strip("'")
    rows = asyncio.run(_poll_rows(dsn, "stack-v1"))
    assert len(rows) == 1 and rows[0]["event_type"] == "pageview" and rows[0]["session_id"]

    status = _pipeline(stack_env, "stack", "status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("healthy") == 4  # kafka, postgres, collector, worker-0

    down = _pipeline(stack_env, "stack", "down", timeout=120)
    assert down.returncode == 0
    assert {"collector", "worker-0", "kafka", "postgres"} <= set(down.stdout.split(": ", 1)[1].replace(",", "").split())
    for port in (stack_env["KAFKA_PORT"], stack_env["PG_PORT"], stack_env["COLLECTOR_PORT"],
                 stack_env["STACK_WORKER_PORT"]):
        assert not _port_open(int(port)), f"port {port} still open after stack down"
    status = _pipeline(stack_env, "stack", "status")
    assert status.returncode == 1 and "stopped" in status.stdout
