"""Effectively-once storage through crashes, rebalances and a PostgreSQL outage.

Workers run as real processes (``pipeline worker``) so they can be killed with
SIGKILL; events enter through the real collector (in process) and Kafka. At the end,
every event the collector acknowledged is in visitor_events exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import uuid_utils

from conftest import running_collector, wait_for_count
from pipeline import settings as cfg
from pipeline.settings import CollectorSettings, KafkaSettings

ROOT = Path(__file__).resolve().parent.parent


class Workers:
    """Worker processes of one consumer group."""

    def __init__(self, kafka: KafkaSettings, dsn: str, log_dir: Path) -> None:
        self.env = dict(
            os.environ, KAFKA_BOOTSTRAP=kafka.bootstrap, EVENTS_TOPIC=kafka.events_topic,
            DLQ_TOPIC=kafka.dlq_topic, DATABASE_URL=dsn, WORKER_GROUP=f"g-{kafka.events_topic}",
            WORKER_METRICS_PORT="0", WORKER_BATCH_MS="200", LOG_FORMAT="json", LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        log = open(self.log_dir / f"worker-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"], env=self.env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def stop_all(self) -> None:
        for p in self.alive():
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    def full_log(self) -> str:
        return "".join(f.read_text(errors="replace") for f in sorted(self.log_dir.glob("worker-*.log")))

    def logs(self) -> str:
        return "\n".join((f.name + ":\n" + f.read_text(errors="replace")[-3000:])
                         for f in sorted(self.log_dir.glob("worker-*.log")))


@pytest.fixture
def workers(topics, pipeline_db, tmp_path):
    w = Workers(topics, pipeline_db[0], tmp_path)
    yield w
    w.stop_all()


def collector(kafka: KafkaSettings):
    return running_collector(kafka, CollectorSettings(publish_timeout_s=10))


async def send_events(http: aiohttp.ClientSession, site: str, total: int, visitors: int,
                      acked: set[str], per_request: int = 100, rate: float | None = None) -> None:
    """POST ``total`` events in batches; remember the ids the collector acknowledged."""
    sent = 0
    started = time.monotonic()
    while sent < total:
        n = min(per_request, total - sent)
        events = [{"site_id": site, "visitor_id": f"v{(sent + i) % visitors}", "event_id": str(uuid_utils.uuid7()),
                   "page_url": f"https://shop.example/p/{(sent + i) % 17}"} for i in range(n)]
        for _ in range(100):
            r = await http.post("/collect", data=orjson.dumps({"batch": events}),
                                headers={"Content-Type": "application/json"})
            if r.status == 204:
                acked.update(e["event_id"] for e in events)
                break
            assert r.status == 503, await r.text()
            await asyncio.sleep(0.2)
        sent += n
        if rate:  # pace the stream so the faults happen mid-stream
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)


async def assert_exactly_once(dsn: str, acked: set[str], workers: Workers, timeout: float = 180) -> None:
    got = await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", len(acked), timeout)
    conn = await asyncpg.connect(dsn)
    try:
        stored = await conn.fetch("SELECT id::text AS id FROM visitor_events")
    finally:
        await conn.close()
    ids = [r["id"] for r in stored]
    assert got == len(acked), f"{got} rows for {len(acked)} acknowledged events\n{workers.logs()}"
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == acked


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.timeout(600)
async def test_kill_9_worker_repeatedly_loses_and_duplicates_nothing(topics, pipeline_db, workers):
    dsn, site = pipeline_db
    acked: set[str] = set()
    workers.start()
    async with collector(topics) as http:
        sender = asyncio.create_task(send_events(http, site, 50_000, visitors=2_000, acked=acked, rate=2_500))
        kills = 0
        while not sender.done() and kills < 4:
            await asyncio.sleep(3)
            for proc in workers.alive():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            await asyncio.sleep(0.3)
            workers.start()
        await sender
    assert kills >= 3, "the stream ended before the worker could be killed several times"
    assert len(acked) == 50_000
    await assert_exactly_once(dsn, acked, workers)


@pytest.mark.timeout(600)
async def test_workers_joining_and_leaving_mid_stream(topics, pipeline_db, workers):
    dsn, site = pipeline_db
    acked: set[str] = set()
    first = workers.start()
    async with collector(topics) as http:
        sender = asyncio.create_task(send_events(http, site, 30_000, visitors=300, acked=acked, rate=2_000))
        await asyncio.sleep(3)
        workers.start()
        await asyncio.sleep(3)
        workers.start()
        await asyncio.sleep(3)
        first.send_signal(signal.SIGTERM)  # a worker leaves; its partitions move
        assert first.wait(timeout=60) == 0
        await sender
    await assert_exactly_once(dsn, acked, workers)
    conn = await asyncpg.connect(dsn)
    try:
        split = await conn.fetch("SELECT visitor_id, count(DISTINCT session_id) AS n FROM visitor_events "
                                 "GROUP BY visitor_id HAVING count(DISTINCT session_id) > 1")
        owners = await conn.fetchval("SELECT count(DISTINCT owner) FROM pipeline.consumer_offsets")
    finally:
        await conn.close()
    assert not split, f"sessions split by the partition moves: {split[:5]}"
    assert owners >= 2, "the partitions never moved between workers"


@pytest.mark.timeout(600)
async def test_postgres_down_for_20s_mid_stream(topics, pipeline_db, workers):
    if "TEST_PG_ADMIN_URL" in os.environ:
        pytest.skip("needs the stack's own PostgreSQL, which this test stops and starts")
    from pipeline.stack import Postgres

    postgres = Postgres(cfg.load(cfg.StackSettings), cfg.load(cfg.PostgresSettings))
    dsn, site = pipeline_db
    acked: set[str] = set()
    proc = workers.start()
    async with collector(topics) as http:
        await send_events(http, site, 2_000, visitors=200, acked=acked)
        assert await wait_for_count(dsn, "SELECT count(*) FROM visitor_events", 2_000) == 2_000
        before = rss_mb(proc.pid)
        sender = asyncio.create_task(send_events(http, site, 20_000, visitors=200, acked=acked, rate=700))
        await asyncio.sleep(2)
        await asyncio.to_thread(postgres.down)
        peak = before
        try:
            for _ in range(20):
                await asyncio.sleep(1)
                peak = max(peak, rss_mb(proc.pid))
                assert proc.poll() is None, "the worker died while Postgres was down\n" + workers.logs()
        finally:
            await asyncio.to_thread(postgres.up)
        await sender
    await assert_exactly_once(dsn, acked, workers)
    log = workers.full_log()
    assert "worker.sink_unavailable" in log or "worker.retry" in log, "the outage never reached the worker"
    assert peak - before < 100, f"worker memory grew from {before:.0f} MB to {peak:.0f} MB while paused"
