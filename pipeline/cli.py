"""The ``pipeline`` command: one entry point, one subcommand per process kind.

    pipeline collector        run the HTTP collector
    pipeline worker           run a stream worker (Kafka -> enrich -> PostgreSQL)
    pipeline dlq list|replay  inspect or re-feed dead letters
    pipeline migrate          apply SQL migrations and create partitions ahead
    pipeline maintenance      periodic jobs: partitions ahead, DEFAULT partition drain,
                              experiment participants, rollups
    pipeline stack up|down|status|env
                              the local stack (Kafka, PostgreSQL, collector)
    pipeline tail             print events from a Kafka topic (debugging)

Every setting is an environment variable and a flag; ``pipeline <cmd> --help`` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys

from pipeline import logs
from pipeline import settings as cfg


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("collector", help="run the aiohttp collector (HTTP -> Kafka)")
    cfg.add_arguments(p, cfg.CollectorSettings, cfg.KafkaSettings, cfg.PostgresSettings, cfg.LogSettings)

    p = sub.add_parser("worker", help="run a stream worker (consumer group member)")
    cfg.add_arguments(p, cfg.WorkerSettings, cfg.RollupSettings, cfg.EnrichSettings, cfg.KafkaSettings,
                      cfg.PostgresSettings, cfg.LogSettings)

    p = sub.add_parser("dlq", help="dead letters: list them, or replay them into the events topic")
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("--reason", action="append", help="only dead letters with this reason (repeatable)")
    p.add_argument("--since", help="only dead letters that failed at or after this ISO time")
    p.add_argument("--dry-run", action="store_true", help="with 'replay': count, publish nothing")
    cfg.add_arguments(p, cfg.KafkaSettings, cfg.LogSettings)

    p = sub.add_parser("migrate", help="apply SQL migrations (idempotent) and create partitions ahead")
    cfg.add_arguments(p, cfg.PostgresSettings, cfg.LogSettings)

    p = sub.add_parser("maintenance", help="periodic jobs: partitions ahead, drain DEFAULT, participants, rollups")
    p.add_argument("--rebuild-rollups", action="store_true",
                   help="forget the rollups and build them again from visitor_events (docs/operations.md)")
    cfg.add_arguments(p, cfg.PostgresSettings, cfg.RollupSettings, cfg.LogSettings)

    p = sub.add_parser("stack", help="the local stack: Kafka, PostgreSQL, collector")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--no-services", action="store_true",
                   help="with 'up': start only Kafka and PostgreSQL (and migrate), not our processes")
    cfg.add_arguments(p, cfg.StackSettings, cfg.KafkaSettings, cfg.PostgresSettings, cfg.CollectorSettings,
                      cfg.LogSettings)

    p = sub.add_parser("tail", help="print events from a Kafka topic, one JSON per line")
    p.add_argument("--topic", help="topic to read (default: EVENTS_TOPIC)")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest retained event")
    p.add_argument("--max", type=int, default=0, help="stop after this many events (0: never)")
    p.add_argument("--idle-timeout", type=float, default=0,
                   help="stop after this many seconds without a new event (0: never)")
    cfg.add_arguments(p, cfg.KafkaSettings, cfg.LogSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log_settings = cfg.load(cfg.LogSettings, args)
    logs.setup(log_settings.level, log_settings.format)

    if args.command == "collector":
        from ingest.app import run

        run(cfg.load(cfg.CollectorSettings, args), cfg.load(cfg.KafkaSettings, args),
            cfg.load(cfg.PostgresSettings, args))
        return 0

    if args.command == "worker":
        return asyncio.run(_worker(args))

    if args.command == "dlq":
        return asyncio.run(_dlq(cfg.load(cfg.KafkaSettings, args), args))

    if args.command == "migrate":
        return asyncio.run(_migrate(cfg.load(cfg.PostgresSettings, args)))

    if args.command == "stack":
        return _stack(args)

    if args.command == "maintenance":
        return asyncio.run(_maintenance(cfg.load(cfg.PostgresSettings, args), cfg.load(cfg.RollupSettings, args),
                                        rebuild_rollups=args.rebuild_rollups))

    if args.command == "tail":
        return asyncio.run(_tail(cfg.load(cfg.KafkaSettings, args), args))
    return 2


async def _tail(kafka: cfg.KafkaSettings, args: argparse.Namespace) -> int:
    import orjson
    from aiokafka import AIOKafkaConsumer

    # No group: reading must not move any consumer group's offsets.
    consumer = AIOKafkaConsumer(
        args.topic or kafka.events_topic, bootstrap_servers=kafka.bootstrap, group_id=None,
        auto_offset_reset="earliest" if args.from_beginning else "latest", enable_auto_commit=False,
    )
    await consumer.start()
    seen = 0
    try:
        while not args.max or seen < args.max:
            timeout = args.idle_timeout or None
            try:
                msg = await asyncio.wait_for(consumer.getone(), timeout)
            except asyncio.TimeoutError:
                break
            try:
                value = orjson.loads(msg.value)
            except orjson.JSONDecodeError:
                value = msg.value.decode(errors="replace")  # not JSON: show it as text
            line = {"partition": msg.partition, "offset": msg.offset,
                    "key": msg.key.decode(errors="replace") if msg.key else None, "value": value}
            print(orjson.dumps(line).decode(), flush=True)
            seen += 1
    finally:
        await consumer.stop()
    return 0


async def _worker(args: argparse.Namespace) -> int:
    import signal

    from pipeline.worker import Worker

    worker = Worker(cfg.load(cfg.WorkerSettings, args), cfg.load(cfg.KafkaSettings, args),
                    cfg.load(cfg.PostgresSettings, args), cfg.load(cfg.EnrichSettings, args),
                    rollup=cfg.load(cfg.RollupSettings, args))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop_nowait)
    await worker.run()
    return 0


async def _dlq(kafka: cfg.KafkaSettings, args: argparse.Namespace) -> int:
    import datetime as dt

    import orjson

    from pipeline import dlq

    reasons = set(args.reason) if args.reason else None
    since_ms = None
    if args.since:
        since = dt.datetime.fromisoformat(args.since)
        since = since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)
        since_ms = int(since.timestamp() * 1000)
    if args.action == "list":
        async for record, letter in dlq.read_all(kafka):
            if reasons and letter.get("reason") not in reasons:
                continue
            if since_ms and letter.get("failed_at", 0) < since_ms:
                continue
            print(orjson.dumps({"dlq_offset": record.offset, "dlq_partition": record.partition, **letter}).decode())
        return 0
    counts = await dlq.replay(kafka, reasons=reasons, since_ms=since_ms, dry_run=args.dry_run)
    print(("would replay" if args.dry_run else "replayed") +
          f" {counts['replayed']} of {counts['seen']} dead letters ({counts['skipped']} skipped)")
    return 0


async def _migrate(pg: cfg.PostgresSettings) -> int:
    import asyncpg

    from schemas.migrate import apply_migrations

    conn = await asyncpg.connect(pg.database_url)
    try:
        applied = await apply_migrations(conn, granularity=pg.partition_granularity,
                                         premake_days=pg.partition_premake_days)
    finally:
        await conn.close()
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return 0


async def _maintenance(pg: cfg.PostgresSettings, rollup: cfg.RollupSettings, *, rebuild_rollups: bool = False) -> int:
    """What a cron job runs (daily is enough; hourly is fine): idempotent."""
    import datetime as dt

    import asyncpg

    from pipeline import rollups
    from schemas.migrate import drain_default_partition, ensure_partitions

    conn = await asyncpg.connect(pg.database_url)
    try:
        now = dt.datetime.now(dt.timezone.utc)
        await ensure_partitions(conn, now, now + dt.timedelta(days=pg.partition_premake_days))
        drained = await drain_default_partition(conn)
        changed = await conn.fetchval("SELECT pipeline.recompute_experiment_participants()")
        if rebuild_rollups:
            await rollups.rebuild(conn)
        run = await rollups.roll_up(conn, lag=dt.timedelta(seconds=rollup.lag_s),
                                    slice=dt.timedelta(hours=rollup.slice_hours), hourly_days=rollup.hourly_days)
    finally:
        await conn.close()
    print(f"partitions ensured for {pg.partition_premake_days} days ahead; {drained} row(s) moved out of "
          f"the DEFAULT partition; {changed} experiment_segments row(s) updated")
    if run.skipped:
        print(f"rollups skipped: {run.skipped}")
    else:
        print(f"rollups{' rebuilt and' if rebuild_rollups else ''} complete up to "
              f"{run.rolled_to:%Y-%m-%d %H:%M:%S}Z: {run.rows} row(s) added ({run.late} late) in {run.seconds:.1f} s")
    return 0


def _stack(args: argparse.Namespace) -> int:
    from pipeline.stack import Stack, StackError

    stack = Stack(
        cfg.load(cfg.StackSettings, args), cfg.load(cfg.KafkaSettings, args),
        cfg.load(cfg.PostgresSettings, args), cfg.load(cfg.CollectorSettings, args),
    )
    try:
        if args.action == "up":
            stack.up(services=not args.no_services)
            _print_status(stack)
        elif args.action == "down":
            stopped = stack.down()
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        elif args.action == "status":
            return 0 if _print_status(stack) else 1
        elif args.action == "env":
            for key, value in stack.env().items():
                print(f"{key}={shlex.quote(value)}")
    except StackError as exc:
        print(f"stack {args.action} failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_status(stack) -> bool:
    ok = True
    for row in stack.status():
        state = "healthy" if row["healthy"] else ("running, NOT healthy" if row["running"] else "stopped")
        ok = ok and bool(row["healthy"])
        print(f"{row['component']:<10} {state:<22} {row['where']}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
