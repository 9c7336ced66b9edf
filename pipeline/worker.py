"""The stream worker: Kafka consumer group -> processors -> PostgreSQL sink.

Per batch: decode -> validate -> enrich -> attribute -> sessionize (all pure, in
``processors/``) -> dead letters to the DLQ topic -> one sink transaction that stores
rows, session state and offsets together (``sinks/postgres.py``).

Ownership. Offsets live in Postgres, not in Kafka. When Kafka assigns a partition,
the worker claims it in Postgres (bumping its epoch) and seeks to the stored offset;
every write re-checks the epoch, so a worker that lost a partition can never write
after the new owner started. Kafka commits are made too, but only so that lag tools
show something; nothing reads them.

Backpressure. The loop is sequential: while a batch cannot be stored, consumption is
paused and the batch is retried with backoff; memory holds one batch plus the
consumer's bounded fetch buffer. A rebalance aborts the retry (the batch is re-read by
whoever owns the partitions next).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg
import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from pipeline.settings import EnrichSettings, KafkaSettings, PostgresSettings, RollupSettings, WorkerSettings
from pipeline.refdata import RefCache
from processors.enrich import DeadLetter, Enricher, VisitorState
from sinks.postgres import Batch, Fenced, PostgresSink, SinkUnavailable

log = logging.getLogger("pipeline.worker")

VisitorKey = tuple[str, str]


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.consumed = Counter("worker_events_consumed", "Kafka records consumed", registry=r)
        self.stored = Counter("worker_events_stored", "rows stored in visitor_events", registry=r)
        self.duplicates = Counter("worker_events_duplicate", "events skipped as already stored", registry=r)
        self.dead = Counter("worker_events_dead_lettered", "events sent to the dead-letter topic",
                            ["reason"], registry=r)
        self.batch_size = Histogram("worker_batch_size", "events per stored batch", registry=r,
                                    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000))
        self.copy_seconds = Histogram("worker_sink_write_seconds", "duration of one sink transaction",
                                      registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.e2e_seconds = Histogram("worker_end_to_end_seconds", "collector receive -> committed in Postgres",
                                     registry=r, buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 300))
        self.retries = Counter("worker_sink_retries", "sink attempts that failed and were retried",
                               registry=r)
        self.stale = Counter("worker_stale_records_skipped",
                             "records delivered from before the claimed offset, skipped", registry=r)
        self.fenced = Counter("worker_batches_fenced", "batches dropped: partition owned by another worker",
                              registry=r)
        self.lag = Gauge("worker_consumer_lag", "records behind the partition end", ["partition"], registry=r)
        self.assigned = Gauge("worker_partitions_assigned", "partitions this worker owns", registry=r)
        self.sink_up = Gauge("worker_sink_available", "1 while Postgres takes writes", registry=r)
        self.attribution_dropped = Counter(
            "worker_attribution_dropped", "references an event named but could not keep (unknown or not running)",
            ["what"], registry=r)
        self.backfills = Counter("worker_lead_backfills", "visitors newly linked to a lead (back-filled)",
                                 registry=r)
        self.refdata_hits = Counter("worker_refdata_cache_hits", "reference lookups served from the cache",
                                    ["kind"], registry=r)
        self.refdata_misses = Counter("worker_refdata_cache_misses", "reference lookups loaded from Postgres",
                                      ["kind"], registry=r)


@dataclass
class Prepared:
    """A processed batch, ready for the sink."""

    batch: Batch
    records: list[ConsumerRecord]
    row_index: list[int]  # record position of each row (for dead letters of refused rows)
    received_at: list[int]  # collector receive times (ms), for the end-to-end metric


class _Listener(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked) -> None:
        await self._worker._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        await self._worker._on_assigned(list(assigned))


class Worker:
    def __init__(self, worker: WorkerSettings, kafka: KafkaSettings, pg: PostgresSettings,
                 enrich: EnrichSettings, *, owner: str | None = None,
                 rollup: RollupSettings | None = None) -> None:
        self.cfg = worker
        self.kafka = kafka
        self.pg = pg
        self.rollup = rollup or RollupSettings()
        self.enricher = Enricher.from_settings(enrich, worker)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = WorkerMetrics()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()  # one batch at a time; rebalance callbacks wait for it
        self._rebalancing = False
        self._pending: list[ConsumerRecord] = []
        # (topic, partition) -> next offset to accept (None: whatever comes first), per owned partition
        self._next: dict[tuple[str, int], int | None] = {}
        self._inflight: asyncio.Task[bool] | None = None  # the batch being written
        self._deadline: float | None = None  # give up retrying the write after this
        self._states: OrderedDict[VisitorKey, VisitorState] = OrderedDict()
        self.refs: RefCache | None = None
        self._upkeep: asyncio.Task | None = None
        self._rollups: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # informative commits in flight
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.pool: asyncpg.Pool | None = None
        self.sink: PostgresSink | None = None
        self._web: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.pool = await _retry_forever(
            lambda: asyncpg.create_pool(self.pg.database_url, min_size=1, max_size=self.cfg.pool_size),
            "postgres.connect", self.cfg.retry_max_s, self._stop,
        )
        self.sink = PostgresSink(self.pool, group_id=self.cfg.group_id, owner=self.owner)
        self.refs = RefCache(self.pool, self.pg.database_url, ttl=self.cfg.refdata_ttl_s,
                             negative_ttl=self.cfg.refdata_negative_ttl_s)
        await _retry_forever(self.refs.listen, "postgres.listen", self.cfg.retry_max_s, self._stop)
        self.producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap, acks="all",
                                         enable_idempotence=True, linger_ms=5)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap, group_id=self.cfg.group_id,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=self.cfg.batch_rows,
            # A batch may wait for Postgres for a while; stay in the group meanwhile.
            max_poll_interval_ms=600_000, session_timeout_ms=20_000, heartbeat_interval_ms=3_000,
            rebalance_timeout_ms=60_000,
        )
        self.consumer.subscribe([self.kafka.events_topic], listener=_Listener(self))
        await self.consumer.start()
        if self.cfg.metrics_port:
            await self._start_http()
        self._upkeep = asyncio.create_task(self._maintain())
        if self.cfg.rollup_interval_s > 0:
            self._rollups = asyncio.create_task(self._roll_up())
        log.info("worker.started", extra={"owner": self.owner, "topic": self.kafka.events_topic,
                                          "group": self.cfg.group_id})

    def stop_nowait(self) -> None:
        """Ask the loop to finish its batch and exit (signal-handler safe)."""
        self._stop.set()

    async def close(self) -> None:
        for task in (self._upkeep, self._rollups):
            if task is not None:
                task.cancel()
        async with self._lock:
            await self._flush(deadline=time.monotonic() + 10)
        for closer in (self.consumer and self.consumer.stop, self.producer and self.producer.stop,
                       self.refs and self.refs.close, self.pool and self.pool.close,
                       self._web and self._web.cleanup):
            if closer:
                try:
                    await closer()
                except Exception:  # closing is best effort; the data is safe either way
                    log.exception("worker.close_failed")
        log.info("worker.stopped", extra={"owner": self.owner})

    async def run(self) -> None:
        try:
            await self.start()
        except _Abandoned:  # stopped before Postgres ever answered
            await self.close()
            return
        try:
            while not self._stop.is_set():
                await self._collect()
                async with self._lock:
                    await self._flush_pipelined()
        finally:
            await self.close()

    # -- consuming -------------------------------------------------------------

    async def _collect(self) -> None:
        """Fill ``_pending`` until the batch is full or old enough (or a stop)."""
        assert self.consumer is not None
        first = time.monotonic() if self._pending else None
        while not self._stop.is_set() and len(self._pending) < self.cfg.batch_rows:
            if first is None:
                timeout_ms = self.cfg.batch_ms
            else:
                timeout_ms = int((first + self.cfg.batch_ms / 1000 - time.monotonic()) * 1000)
                if timeout_ms <= 0:
                    return
            data = await self.consumer.getmany(timeout_ms=timeout_ms,
                                               max_records=self.cfg.batch_rows - len(self._pending))
            for tp, records in data.items():
                key = (tp.topic, tp.partition)
                if key not in self._next or not (self.sink and self.sink.owns(*key)):
                    continue
                # A fetch that was in flight when the partition was (re)claimed may still
                # deliver records from before the claimed offset: never process them twice.
                expected = self._next[key]
                if expected is not None and records[0].offset < expected:
                    stale = len(records)
                    records = [r for r in records if r.offset >= expected]
                    self.metrics.stale.inc(stale - len(records))
                if records:
                    self._pending.extend(records)
                    self._next[key] = records[-1].offset + 1
                    self.metrics.consumed.inc(len(records))
            if self._pending and first is None:
                first = time.monotonic()

    async def _flush(self, deadline: float | None = None) -> None:
        """Prepare ``_pending`` and store it after the batch in flight; wait for both."""
        await self._flush_pipelined()
        await self._drain(deadline)

    async def _flush_pipelined(self) -> None:
        """Prepare ``_pending`` (CPU) while the previous batch is being written (I/O),
        then start its write. Writes stay in order: one in flight at a time."""
        if not self._pending:
            return
        records, self._pending = self._pending, []
        try:
            prepared = await self._prepare(records)
        except _Abandoned as exc:
            # Nothing stored, offsets not advanced: the records are read again later.
            self._states.clear()
            log.warning("worker.batch_abandoned", extra={"events": len(records), "detail": str(exc)})
            await self._drain()
            return
        if not await self._drain():
            # The previous batch was not stored; this one was built on its session state
            # and its offsets follow it: drop it too, it is read again.
            self._states.clear()
            return
        self._inflight = asyncio.create_task(self._store(prepared))

    async def _drain(self, deadline: float | None = None) -> bool:
        """Wait for the batch in flight; True when it was stored (or there was none)."""
        task, self._inflight = self._inflight, None
        if task is None:
            return True
        if deadline is not None:
            self._deadline = deadline
        try:
            return await task
        finally:
            self._deadline = None

    async def _prepare(self, records: list[ConsumerRecord]) -> Prepared:
        """Pure stages around the I/O they need (session state, site time zones), then
        the dead letters they produced are published (before any offset moves)."""
        assert self.refs is not None
        decoded, dead = self.enricher.decode([r.value for r in records])
        keys = {self.enricher.visitor_key(env) for _, env in decoded}
        states = await self._load_states(keys)
        needs = self.enricher.needs(decoded, states)
        moving = lambda: self._rebalancing  # noqa: E731
        hits, misses = dict(self.refs.hits), dict(self.refs.misses)
        refs = await _retry_forever(lambda: self.refs.snapshot(needs), "postgres.refdata",
                                    self.cfg.retry_max_s, self._stop, give_up=moving)
        for kind in hits:
            self.metrics.refdata_hits.labels(kind).inc(self.refs.hits[kind] - hits[kind])
            self.metrics.refdata_misses.labels(kind).inc(self.refs.misses[kind] - misses[kind])
        out = self.enricher.build(decoded, states, refs)
        for what, n in out.dropped.items():
            self.metrics.attribution_dropped.labels(what).inc(n)
        self.metrics.backfills.inc(len(out.backfills))
        dead.extend(out.dead)
        for key, state in out.states.items():
            self._remember(key, state)
        offsets: dict[tuple[str, int], int] = {}
        for r in records:
            k = (r.topic, r.partition)
            offsets[k] = max(offsets.get(k, 0), r.offset + 1)
        sessions = [(k[0], k[1], orjson.dumps(s.to_json()).decode()) for k, s in out.states.items()]
        await self._dead_letter(dead, records)
        batch = Batch(rows=out.rows, offsets=offsets, sessions=sessions, backfills=out.backfills)
        return Prepared(batch, records, out.row_index, out.received_at)

    async def _store(self, p: Prepared) -> bool:
        """Write one batch; retry while Postgres is unavailable. False: not stored."""
        assert self.sink is not None and self.consumer is not None
        delay = 0.2
        paused = False

        async def rejected(rows: list[tuple[int, str]]) -> None:
            await self._dead_letter([DeadLetter(p.row_index[i], "store_failed", why) for i, why in rows], p.records)

        try:
            while True:
                started = time.monotonic()
                try:
                    result = await self.sink.write(p.batch, on_rejected=rejected)
                    break
                except Fenced as exc:
                    self.metrics.fenced.inc()
                    self._states.clear()
                    log.warning("worker.fenced", extra={"detail": str(exc)})
                    return False
                except SinkUnavailable as exc:
                    self.metrics.sink_up.set(0)
                    self.metrics.retries.inc()
                    if (self._rebalancing or self._stop.is_set()
                            or (self._deadline and time.monotonic() > self._deadline)):
                        # Not stored, offsets not advanced: the batch is read again later.
                        self._states.clear()
                        log.warning("worker.batch_abandoned", extra={"events": len(p.records), "detail": str(exc)})
                        return False
                    if not paused:
                        self.consumer.pause(*self.consumer.assignment())
                        paused = True
                    log.warning("worker.sink_unavailable", extra={"retry_in_s": round(delay, 2), "detail": str(exc)})
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, self.cfg.retry_max_s)
        finally:
            if paused:
                self.consumer.resume(*self.consumer.assignment())
        now = time.time()
        self.metrics.sink_up.set(1)
        self.metrics.copy_seconds.observe(time.monotonic() - started)
        self.metrics.batch_size.observe(len(p.records))
        self.metrics.stored.inc(len(result.stored))
        self.metrics.duplicates.inc(result.duplicates)
        for i in result.stored:  # rows stored now, not those a re-read batch repeated
            self.metrics.e2e_seconds.observe(max(0.0, now - p.received_at[i] / 1000))
        self._informative_commit(p.batch.offsets)
        await self._update_lag()
        return True

    # -- dead letters -----------------------------------------------------------

    async def _dead_letter(self, dead: list[DeadLetter], records: list[ConsumerRecord]) -> None:
        """Publish dead letters and wait for Kafka's ack (before the offsets move)."""
        if not dead:
            return
        assert self.producer is not None
        futures = []
        for d in dead:
            r = records[d.index]
            doc = {
                "reason": d.reason, "detail": d.detail, "failed_at": int(time.time() * 1000),
                "worker": self.owner,
                "source": {"topic": r.topic, "partition": r.partition, "offset": r.offset,
                           "timestamp": r.timestamp},
                "key": r.key.decode(errors="replace") if r.key is not None else None,
                **_dlq_value(r.value),
            }
            futures.append(await self.producer.send(self.kafka.dlq_topic, orjson.dumps(doc), key=r.key))
            self.metrics.dead.labels(d.reason).inc()
        await asyncio.gather(*futures)
        log.info("worker.dead_lettered", extra={"events": len(dead),
                                                 "reasons": sorted({d.reason for d in dead})})

    # -- state -----------------------------------------------------------------

    async def _load_states(self, keys: Iterable[VisitorKey]) -> dict[VisitorKey, VisitorState]:
        out: dict[VisitorKey, VisitorState] = {}
        missing = []
        for k in keys:
            if k in self._states:
                self._states.move_to_end(k)
                out[k] = self._states[k]
            else:
                missing.append(k)
        if missing:
            assert self.pool is not None
            rows = await _retry_forever(
                lambda: self.pool.fetch(
                    "SELECT site_id::text, visitor_id, state FROM pipeline.visitor_sessions "
                    "WHERE (site_id, visitor_id) IN (SELECT * FROM unnest($1::uuid[], $2::text[]))",
                    [k[0] for k in missing], [k[1] for k in missing]),
                "postgres.load_sessions", self.cfg.retry_max_s, self._stop, give_up=lambda: self._rebalancing,
            )
            for row in rows:
                out[(row["site_id"], row["visitor_id"])] = VisitorState.from_json(orjson.loads(row["state"]))
        return out

    def _remember(self, key: VisitorKey, state: VisitorState) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.cfg.session_cache_visitors:
            self._states.popitem(last=False)

    # -- upkeep ------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Periodic upkeep, done by whichever worker takes the advisory lock first:
        partitions for the days ahead (so none is created on demand at midnight) and
        the deletion of state of visitors idle for ``visitor_state_days``."""
        from datetime import datetime, timedelta, timezone

        from schemas.migrate import ensure_partitions

        assert self.pool is not None
        while not self._stop.is_set():
            try:
                async with self.pool.acquire() as conn:
                    if await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('pipeline.worker.upkeep'))"):
                        try:
                            now = datetime.now(timezone.utc)
                            await ensure_partitions(conn, now, now + timedelta(days=self.pg.partition_premake_days))
                            deleted = await conn.fetchval(
                                # Visitors linked to a lead are kept: their lead must follow them.
                                "WITH gone AS (DELETE FROM pipeline.visitor_sessions WHERE updated_at < "
                                "now() - make_interval(days => $1) AND state->>'l' IS NULL RETURNING 1) "
                                "SELECT count(*) FROM gone",
                                self.cfg.visitor_state_days)
                            log.info("worker.upkeep", extra={"forgotten_visitors": deleted})
                        finally:
                            await conn.execute("SELECT pg_advisory_unlock(hashtext('pipeline.worker.upkeep'))")
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("worker.upkeep_failed", extra={"detail": str(exc)})
            try:
                await asyncio.wait_for(self._stop.wait(), self.cfg.maintenance_interval_s)
            except TimeoutError:
                pass

    async def _roll_up(self) -> None:
        """Every ``rollup_interval_s``, the rollup job (pipeline/rollups.py); a worker
        that finds another one running it skips its turn."""
        from datetime import timedelta

        from pipeline import rollups

        assert self.pool is not None
        while not self._stop.is_set():
            try:
                async with self.pool.acquire() as conn:
                    run = await rollups.roll_up(conn, lag=timedelta(seconds=self.rollup.lag_s),
                                                slice=timedelta(hours=self.rollup.slice_hours),
                                                hourly_days=self.rollup.hourly_days)
                if run.slices:
                    log.info("worker.rollups", extra={"rows": run.rows, "late": run.late, "slices": run.slices,
                                                      "rolled_to": run.rolled_to.isoformat() if run.rolled_to else None,
                                                      "seconds": round(run.seconds, 3)})
                if run.skipped and run.skipped != rollups.BUSY:  # another worker's turn is the normal case
                    log.info("worker.rollups_skipped", extra={"detail": run.skipped})
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("worker.rollups_failed", extra={"detail": str(exc)})
            try:
                await asyncio.wait_for(self._stop.wait(), self.cfg.rollup_interval_s)
            except TimeoutError:
                pass

    # -- rebalancing -----------------------------------------------------------

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        self._rebalancing = True
        try:
            async with self._lock:
                # Still the owner: store what was read, but do not hold up the group for long.
                await self._flush(deadline=time.monotonic() + 5)
                self._pending = []
                assert self.sink is not None
                for tp in revoked:
                    self.sink.release(tp.topic, [tp.partition])
                    self._next.pop((tp.topic, tp.partition), None)
                    try:
                        self.metrics.lag.remove(str(tp.partition))
                    except KeyError:
                        pass
                self._states.clear()
        finally:
            self._rebalancing = False
        log.info("worker.revoked", extra={"partitions": sorted(tp.partition for tp in revoked)})

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self.sink is not None and self.consumer is not None
        async with self._lock:
            moved = {(tp.topic, tp.partition) for tp in assigned}
            self._pending = [r for r in self._pending if (r.topic, r.partition) not in moved]
            by_topic: dict[str, list[int]] = {}
            for tp in assigned:
                by_topic.setdefault(tp.topic, []).append(tp.partition)
            for topic, parts in by_topic.items():
                resume = await _retry_forever(lambda: self.sink.claim(topic, parts), "postgres.claim",
                                              self.cfg.retry_max_s, self._stop)
                for p, offset in resume.items():
                    tp = TopicPartition(topic, p)
                    self._next[(topic, p)] = offset
                    if offset is None:
                        await self.consumer.seek_to_beginning(tp)
                    else:
                        self.consumer.seek(tp, offset)
            self.metrics.assigned.set(len(self.consumer.assignment()))
        log.info("worker.assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})

    def _informative_commit(self, offsets: dict[tuple[str, int], int]) -> None:
        assert self.consumer is not None
        tps = {TopicPartition(t, p): o for (t, p), o in offsets.items()
               if TopicPartition(t, p) in self.consumer.assignment()}
        if not tps:
            return

        async def commit() -> None:
            try:
                await self.consumer.commit(tps)
            except KafkaError:
                pass  # informative only; the offsets that count are in Postgres

        task = asyncio.ensure_future(commit())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _update_lag(self) -> None:
        assert self.consumer is not None
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                pos = await self.consumer.position(tp)
            except KafkaError:
                continue
            self.metrics.lag.labels(str(tp.partition)).set(max(0, high - pos))

    # -- HTTP ------------------------------------------------------------------

    async def _start_http(self) -> None:
        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True, "owner": self.owner})

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        self._web = web.AppRunner(app, access_log=None)
        await self._web.setup()
        await web.TCPSite(self._web, self.cfg.metrics_host, self.cfg.metrics_port).start()


def _dlq_value(value: bytes | None) -> dict[str, str | None]:
    """The original record value, readable when it is text, byte-exact for replay."""
    if value is None:
        return {"value": None}
    try:
        return {"value": value.decode()}
    except UnicodeDecodeError:
        return {"value": None, "value_b64": base64.b64encode(value).decode()}


class _Abandoned(Exception):
    """A retry loop gave up because the worker is stopping or its partitions are moving."""


async def _retry_forever(make, what: str, max_delay: float, stop: asyncio.Event, give_up=None):
    delay = 0.2
    while True:
        try:
            return await make()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            if stop.is_set() or (give_up is not None and give_up()):
                raise _Abandoned(f"{what}: {exc}") from exc
            log.warning("worker.retry", extra={"what": what, "retry_in_s": round(delay, 2), "detail": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
