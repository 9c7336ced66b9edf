"""End-to-end throughput and latency, and the sink against raw COPY.

Part 1, the sink alone: the same realistic rows written in batches of 5,000 by
``PostgresSink.write`` (offsets, duplicate check, COPY, session state, one
transaction) and by a bare asyncpg ``copy_records_to_table`` into the same table,
alternating rounds. Target: sink >= 80% of raw COPY.

Part 2, end to end on this machine: collector + Kafka + worker(s) + PostgreSQL all
here. A client sends beacons (``--per-request`` events each) at ``--rate`` events/s
for ``--seconds``; a poller counts stored rows every 100 ms. Printed: sustained
events/s and p50/p95 of receive -> queryable (the k-th acknowledged event against the
moment the k-th row became visible). Target: >= 5,000 events/s, p95 < 2 s.

    .venv/bin/python benchmarks/pipeline.py [--rate 5000] [--seconds 20] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import orjson  # noqa: E402
import uuid_utils  # noqa: E402

from pipeline import settings as cfg  # noqa: E402
from pipeline.stack import Kafka, Postgres  # noqa: E402
from pipeline.topics import create_topics  # noqa: E402

UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 "
    "Safari/605.1.15",
]
IPS = ["81.2.69.142", "2.125.160.216", "89.160.20.112", "216.160.83.56", "175.16.199.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def fresh_database(admin_url: str) -> str:
    from schemas.migrate import apply_migrations

    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = admin_url.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(dsn)
    await apply_migrations(conn)
    await conn.close()
    return dsn


async def drop_database(admin_url: str, dsn: str) -> None:
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    await admin.close()


async def make_site(dsn: str) -> str:
    from tests.conftest import seed_site

    conn = await asyncpg.connect(dsn)
    site, _ = await seed_site(conn)
    await conn.close()
    return site


# ---------------------------------------------------------------------------- part 1


def synthetic_rows(site: str, n: int, visitors: int):
    """Rows and session states exactly as the worker builds them."""
    from processors.attribution import RefSnapshot, Site, SiteRefs
    from processors.enrich import Enricher

    enricher = Enricher.from_settings(cfg.EnrichSettings(), cfg.WorkerSettings())
    now = int(time.time() * 1000)
    values = []
    for i in range(n):
        values.append(orjson.dumps({
            "v": 1, "id": str(uuid_utils.uuid7()), "received_at": now, "ip": random.choice(IPS),
            "ua": random.choice(UAS), "hints": {"accept-language": "en-GB,en;q=0.9"}, "source": "beacon",
            "event": {"site_id": site, "event_type": "pageview", "visitor_id": f"v{i % visitors}",
                      "page_url": f"https://shop.example/p/{i % 50}", "referrer_url": "https://shop.example/"},
        }))
    decoded, dead = enricher.decode(values)
    assert not dead
    refs = RefSnapshot(sites={site: SiteRefs(Site(site, None))})
    built = enricher.build(decoded, {}, refs)
    sessions = [(k[0], k[1], orjson.dumps(v.to_json()).decode()) for k, v in built.states.items()]
    return built.rows, sessions


def with_new_ids(rows: list[tuple]) -> list[tuple]:
    return [(str(uuid_utils.uuid7()),) + r[1:] for r in rows]


async def bench_sink(dsn: str, site: str, rounds: int, batches: int, batch_rows: int) -> tuple[float, float]:
    from sinks.postgres import COLUMNS, Batch, PostgresSink

    rows, sessions = synthetic_rows(site, batch_rows, visitors=batch_rows // 10)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    sink = PostgresSink(pool, group_id="bench", owner="bench")
    await sink.claim("bench-topic", [0])
    # where the rollup job keeps the sinks' watermark: a few minutes behind (pipeline/rollups.py)
    await pool.execute("UPDATE pipeline.rollup_state SET watermark = now() - interval '3 minutes'")
    raw_times, sink_times = [], []
    offset = 0
    # Warm-up: partitions, caches, plans.
    await sink.write(Batch(with_new_ids(rows), {("bench-topic", 0): 1}, sessions))
    # Batch by batch, alternating which goes first, so that the machine's noise (2 shared
    # cores) hits both alike; the median batch time of each is compared.
    for i in range(rounds * batches):
        raw_batch, sink_batch = with_new_ids(rows), with_new_ids(rows)
        for which in (("raw", "sink") if i % 2 else ("sink", "raw")):
            t = time.perf_counter()
            if which == "raw":
                async with pool.acquire() as conn, conn.transaction():
                    await conn.copy_records_to_table("visitor_events", records=raw_batch, columns=COLUMNS)
                raw_times.append(time.perf_counter() - t)
            else:
                offset += batch_rows
                await sink.write(Batch(sink_batch, {("bench-topic", 0): offset}, sessions))
                sink_times.append(time.perf_counter() - t)
        if (i + 1) % batches == 0:
            print(f"  after {i + 1:>3} batches: raw COPY {batch_rows / statistics.median(raw_times):8.0f} rows/s   "
                  f"sink {batch_rows / statistics.median(sink_times):8.0f} rows/s", flush=True)
    await pool.close()
    return batch_rows / statistics.median(raw_times), batch_rows / statistics.median(sink_times)


# ---------------------------------------------------------------------------- part 2


async def send_load(url: str, site: str, rate: int, seconds: int, per_request: int,
                    acked_at: list[tuple[float, int]], concurrency: int = 32) -> int:
    import aiohttp

    total = rate * seconds
    requests = total // per_request
    interval = per_request / rate
    start = time.monotonic()
    acked = 0
    sem = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal acked
        events = [{"site_id": site, "visitor_id": f"v{(k * per_request + i) % 5000}",
                   "page_url": f"https://shop.example/p/{i}"} for i in range(per_request)]
        body = orjson.dumps({"batch": events})
        headers = {"Content-Type": "text/plain", "User-Agent": random.choice(UAS),
                   "X-Forwarded-For": random.choice(IPS)}
        while True:
            async with session.post(url, data=body, headers=headers) as r:
                if r.status == 204:
                    acked += per_request
                    acked_at.append((time.monotonic(), acked))
                    return
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession() as session:
        tasks = []
        for k in range(requests):
            due = start + k * interval
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await sem.acquire()
            t = asyncio.create_task(one(session, k))
            t.add_done_callback(lambda _: sem.release())
            tasks.append(t)
        await asyncio.gather(*tasks)
    return acked


async def poll_rows(dsn: str, target: int, seen_at: list[tuple[float, int]], timeout: float) -> None:
    conn = await asyncpg.connect(dsn)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            n = await conn.fetchval("SELECT count(*) FROM visitor_events")
            seen_at.append((time.monotonic(), n))
            if target and n >= target:
                return
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def latencies(acked_at: list[tuple[float, int]], seen_at: list[tuple[float, int]], step: int) -> list[float]:
    """Receive -> visible for every ``step``-th event (FIFO approximation)."""
    seen_counts = [n for _, n in seen_at]
    out = []
    for t_ack, n in acked_at[::max(1, len(acked_at) // 2000)]:
        i = bisect.bisect_left(seen_counts, n)
        if i < len(seen_at):
            out.append(seen_at[i][0] - t_ack)
    return out


async def bench_end_to_end(kafka: Kafka, dsn: str, site: str, args) -> dict[str, float]:
    topic = f"bench-e2e-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka.bootstrap, {topic: 6, topic + "-dlq": 1})
    port = free_port()
    env = dict(os.environ, LOG_LEVEL="WARNING", KAFKA_BOOTSTRAP=kafka.bootstrap, EVENTS_TOPIC=topic,
               DLQ_TOPIC=topic + "-dlq", DATABASE_URL=dsn, COLLECTOR_PORT=str(port),
               COLLECTOR_TRUSTED_PROXIES="127.0.0.1/32", WORKER_GROUP=topic, WORKER_METRICS_PORT="0",
               PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "collector"], env=env, cwd=ROOT)]
    procs += [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker"], env=env, cwd=ROOT)
              for _ in range(args.workers)]
    try:
        import aiohttp

        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        acked_at: list[tuple[float, int]] = []
        seen_at: list[tuple[float, int]] = []
        t0 = time.monotonic()
        poller = asyncio.create_task(poll_rows(dsn, 0, seen_at, timeout=args.seconds + 120))
        acked = await send_load(f"http://127.0.0.1:{port}/collect", site, args.rate, args.seconds,
                                args.per_request, acked_at)
        send_end = time.monotonic()
        send_s = send_end - t0
        poller.cancel()
        await poll_rows(dsn, acked, seen_at, timeout=120)
        stored_s = seen_at[-1][0] - t0
        # Steady state: rows stored per second between 2 s in and the end of sending.
        window = [(t, n) for t, n in seen_at if t0 + 2 <= t <= send_end]
        steady = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
        lat = latencies(acked_at, seen_at, args.per_request)
        lat.sort()
        return {
            "acked": acked, "stored": seen_at[-1][1], "send_rate": acked / send_s,
            "stored_rate": seen_at[-1][1] / stored_s, "steady_rate": steady,
            "p50": lat[len(lat) // 2], "p95": lat[int(len(lat) * 0.95)],
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=6000, help="events/s offered end to end")
    ap.add_argument("--seconds", type=int, default=20, help="how long to offer them")
    ap.add_argument("--per-request", type=int, default=20, help="events per beacon")
    ap.add_argument("--workers", type=int, default=1, help="worker processes")
    ap.add_argument("--sink-rounds", type=int, default=3)
    ap.add_argument("--sink-batches", type=int, default=10, help="batches of 5,000 rows per round")
    ap.add_argument("--skip-sink", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()

    stack = cfg.load(cfg.StackSettings)
    kafka = Kafka(stack, cfg.load(cfg.KafkaSettings))
    postgres = Postgres(stack, cfg.load(cfg.PostgresSettings))
    await asyncio.to_thread(kafka.up)
    await asyncio.to_thread(postgres.up)
    dsn = await fresh_database(postgres.admin_url)
    try:
        site = await make_site(dsn)
        if not args.skip_sink:
            print("sink alone vs raw copy_records_to_table (batches of 5,000 rows):")
            raw, sink = await bench_sink(dsn, site, args.sink_rounds, args.sink_batches, 5000)
            print(f"raw COPY {raw:8.0f} rows/s | sink {sink:8.0f} rows/s | ratio {sink / raw:.2f} "
                  f"(target >= 0.80: {'met' if sink / raw >= 0.8 else 'NOT met'})\n", flush=True)
        if not args.skip_e2e:
            await (await asyncpg.connect(dsn)).execute("TRUNCATE visitor_events")
            print(f"end to end: {args.rate} events/s offered for {args.seconds} s, {args.per_request} per beacon, "
                  f"{args.workers} worker(s):")
            r = await bench_end_to_end(kafka, dsn, site, args)
            print(f"acknowledged {r['acked']} ({r['send_rate']:.0f}/s), stored {r['stored']}: "
                  f"{r['steady_rate']:.0f} events/s stored while sending, {r['stored_rate']:.0f}/s overall")
            print(f"receive -> queryable: p50 {r['p50'] * 1000:.0f} ms, p95 {r['p95'] * 1000:.0f} ms")
            ok = r["steady_rate"] >= 5000 and r["p95"] < 2
            print(f"target >= 5,000 events/s with p95 < 2 s: {'met' if ok else 'NOT met'}")
            if r["stored"] != r["acked"]:
                print("STORED != ACKNOWLEDGED")
                return 1
    finally:
        await drop_database(postgres.admin_url, dsn)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
