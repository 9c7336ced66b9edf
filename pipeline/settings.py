"""All configuration, in one typed place.

Every setting is a field of one of the section dataclasses below. Each field names
its environment variable; the CLI derives a ``--flag`` from the same field. The
precedence is: command-line flag > environment variable > default.

Nothing else in the code base reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _opt(default: typing.Any, env: str, help: str, **kw: typing.Any) -> typing.Any:
    meta = {"env": env, "help": help}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = _opt("127.0.0.1:19092", "KAFKA_BOOTSTRAP", "Kafka bootstrap servers (host:port,...)")
    events_topic: str = _opt("visitor-events", "EVENTS_TOPIC", "topic the collector publishes to")
    dlq_topic: str = _opt("visitor-events-dlq", "DLQ_TOPIC", "dead-letter topic")
    events_partitions: int = _opt(6, "EVENTS_PARTITIONS", "partition count used when creating the events topic")


@dataclass(frozen=True)
class PostgresSettings:
    database_url: str = _opt(
        "postgresql://postgres@127.0.0.1:54329/pipeline", "DATABASE_URL", "PostgreSQL DSN"
    )
    partition_granularity: str = _opt(
        "day", "PARTITION_GRANULARITY", "visitor_events partition size: day, week or month"
    )
    partition_premake_days: int = _opt(
        7, "PARTITION_PREMAKE_DAYS", "create visitor_events partitions this many days ahead"
    )


@dataclass(frozen=True)
class CollectorSettings:
    host: str = _opt("127.0.0.1", "COLLECTOR_HOST", "address the collector listens on")
    port: int = _opt(8080, "COLLECTOR_PORT", "port the collector listens on")
    path_prefix: str = _opt(
        "", "COLLECTOR_PATH_PREFIX", "prefix for all collector routes, e.g. /a1 (first-party paths resist ad blockers)"
    )
    pixel_path: str = _opt("/t.gif", "COLLECTOR_PIXEL_PATH", "tracking-pixel GET route")
    beacon_path: str = _opt("/collect", "COLLECTOR_BEACON_PATH", "beacon POST route")
    snippet_path: str = _opt("/t.js", "COLLECTOR_SNIPPET_PATH", "route serving the website JavaScript snippet")
    demo: bool = _opt(False, "COLLECTOR_DEMO", "serve the demo site under /demo/ (development)")
    trusted_proxies: list[IPNetwork] = _opt(
        [], "COLLECTOR_TRUSTED_PROXIES",
        "comma-separated CIDRs whose X-Forwarded-For/Forwarded headers are believed",
    )
    max_body_bytes: int = _opt(64 * 1024, "COLLECTOR_MAX_BODY_BYTES", "largest accepted POST body")
    max_batch_events: int = _opt(100, "COLLECTOR_MAX_BATCH_EVENTS", "largest accepted batch")
    max_inflight_bytes: int = _opt(
        32 * 1024 * 1024, "COLLECTOR_MAX_INFLIGHT_BYTES",
        "bytes of events awaiting a Kafka ack; beyond this the collector answers 503",
    )
    publish_timeout_s: float = _opt(
        5.0, "COLLECTOR_PUBLISH_TIMEOUT", "seconds to wait for Kafka's ack before answering 503"
    )
    retry_after_s: int = _opt(5, "COLLECTOR_RETRY_AFTER", "Retry-After seconds sent with a 503")
    linger_ms: int = _opt(
        2, "COLLECTOR_LINGER_MS",
        "producer linger in ms: adds up to this to each answer, halves the broker's CPU per event "
        "at moderate rates (fewer, fuller produce requests); see docs/performance.md",
    )
    cookieless_secret: str = _opt(
        "change-me", "COLLECTOR_COOKIELESS_SECRET",
        "secret for the daily-rotating visitor hash used when a hit has no visitor_id",
    )
    shutdown_timeout_s: float = _opt(10.0, "COLLECTOR_SHUTDOWN_TIMEOUT", "grace period for in-flight requests")
    reject_unknown_sites: bool = _opt(
        False, "COLLECTOR_REJECT_UNKNOWN_SITES",
        "answer 400 for site_ids not in the sites table (reads DATABASE_URL); else workers dead-letter them",
    )


@dataclass(frozen=True)
class WorkerSettings:
    group_id: str = _opt("visitor-events-sink", "WORKER_GROUP", "Kafka consumer group of the workers")
    batch_rows: int = _opt(5000, "WORKER_BATCH_ROWS", "flush a batch at this many events")
    batch_ms: int = _opt(500, "WORKER_BATCH_MS", "flush a batch this many ms after its first event")
    metrics_host: str = _opt("127.0.0.1", "WORKER_METRICS_HOST", "address of the worker's /metrics and /healthz")
    metrics_port: int = _opt(9102, "WORKER_METRICS_PORT", "port of the worker's /metrics and /healthz (0: off)")
    retry_max_s: float = _opt(10.0, "WORKER_RETRY_MAX", "longest backoff between retries while Postgres is down")
    pool_size: int = _opt(4, "WORKER_PG_POOL", "PostgreSQL connections per worker")
    session_timeout_min: int = _opt(30, "SESSION_TIMEOUT_MINUTES", "inactivity that ends a session")
    session_default_tz: str = _opt(
        "UTC", "SESSION_DEFAULT_TZ", "time zone of a site's midnight when pipeline.site_settings has none"
    )
    session_cache_visitors: int = _opt(200_000, "SESSION_CACHE_VISITORS", "visitors' session state kept in memory")
    max_past_days: int = _opt(
        30, "EVENT_MAX_PAST_DAYS", "client times older than this (vs. receive time) are replaced by the receive time"
    )
    max_future_s: int = _opt(
        600, "EVENT_MAX_FUTURE_SECONDS", "client times ahead of the receive time by more are replaced by it"
    )
    maintenance_interval_s: float = _opt(
        3600.0, "WORKER_MAINTENANCE_INTERVAL",
        "seconds between upkeep runs: partitions ahead, forgetting idle visitors (one worker at a time)",
    )
    rollup_interval_s: float = _opt(
        60.0, "ROLLUP_INTERVAL",
        "seconds between runs of the rollup job that keeps the analyst queries fast (one worker at a time; 0: off)",
    )
    visitor_state_days: int = _opt(
        7, "VISITOR_STATE_DAYS", "session/attribution state of visitors idle this long is deleted by upkeep"
    )
    lead_backfill_days: int = _opt(
        30, "LEAD_BACKFILL_DAYS", "on identify, a visitor's anonymous events of this many days get the lead"
    )
    refdata_ttl_s: float = _opt(
        300.0, "REFDATA_TTL", "seconds a cached site/lead/segment/experiment is trusted without a NOTIFY"
    )
    refdata_negative_ttl_s: float = _opt(
        30.0, "REFDATA_NEGATIVE_TTL", "seconds an unknown site/lead is remembered as unknown"
    )


@dataclass(frozen=True)
class RollupSettings:
    lag_s: float = _opt(
        120.0, "ROLLUP_LAG",
        "the rollup job leaves events younger than this many seconds to its next run (queries read them raw)",
    )
    slice_hours: float = _opt(
        24.0, "ROLLUP_SLICE_HOURS", "most event time one rollup transaction covers (first run, catching up)"
    )
    hourly_days: int = _opt(
        8, "ROLLUP_HOURLY_DAYS",
        "days the hourly rollups of site_top's dimensions are kept after their day closed (ranges cutting a day)",
    )


@dataclass(frozen=True)
class EnrichSettings:
    geoip_city_db: Path = _opt(
        PROJECT_ROOT.parent / "shared" / "geoip" / "GeoIP2-City-Test.mmdb", "GEOIP_CITY_DB",
        "MaxMind/DB-IP City database (.mmdb); the default is MaxMind's small test database",
    )
    ip_storage: str = _opt(
        "anonymized", "IP_STORAGE",
        "how ip_address is stored: anonymized (IPv4 /24, IPv6 /48), full, or none",
    )
    ua_cache_size: int = _opt(10_000, "UA_CACHE_SIZE", "user agents whose parse result is cached (LRU)")


@dataclass(frozen=True)
class StackSettings:
    state_dir: Path = _opt(PROJECT_ROOT / ".stack", "STACK_DIR", "where the local stack keeps data, logs and pids")
    cache_dir: Path = _opt(PROJECT_ROOT / ".cache", "STACK_CACHE_DIR", "download cache (Kafka jars)")
    kafka_version: str = _opt("4.1.1", "KAFKA_VERSION", "Apache Kafka version fetched from Maven Central")
    kafka_port: int = _opt(19092, "KAFKA_PORT", "local broker port (the controller uses port+1)")
    kafka_heap: str = _opt("512m", "KAFKA_HEAP", "broker JVM heap")
    pg_port: int = _opt(54329, "PG_PORT", "local PostgreSQL port")
    workers: int = _opt(1, "STACK_WORKERS", "stream workers the local stack runs")
    worker_base_port: int = _opt(9102, "STACK_WORKER_PORT", "worker n of the local stack serves /metrics on this + n")
    demo_site_id: str = _opt(
        "00000000-0000-4000-8000-000000000001", "STACK_DEMO_SITE",
        "site the local stack creates so that example hits are stored (empty: none)",
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = _opt("INFO", "LOG_LEVEL", "log level")
    format: str = _opt("json", "LOG_FORMAT", "json or text")


SECTIONS = (KafkaSettings, PostgresSettings, CollectorSettings, WorkerSettings, RollupSettings, EnrichSettings,
            StackSettings, LogSettings)


# ---------------------------------------------------------------------------
# env / CLI plumbing


def _parse_value(tp: typing.Any, raw: str) -> typing.Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return [_parse_value(inner, part.strip()) for part in raw.split(",") if part.strip()]
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if tp == IPNetwork:
        return ipaddress.ip_network(raw, strict=False)
    return tp(raw)


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.metadata["env"].lower().replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, *sections: type) -> None:
    """Add one ``--flag`` per field of the given sections (default None = not given)."""
    for section in sections:
        group = parser.add_argument_group(section.__name__.removesuffix("Settings").lower())
        for f in dataclasses.fields(section):
            env = f.metadata["env"]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, list):
                shown = ",".join(map(str, default)) or "none"
            else:
                shown = default
            group.add_argument(
                _flag(f), dest=env, default=None, metavar=env,
                help=f"{f.metadata['help']} (env {env}, default {shown})",
            )


def load(section: type, args: argparse.Namespace | None = None, env: typing.Mapping[str, str] | None = None):
    """Build one settings section from flags, then environment, then defaults."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(section)
    values = {}
    for f in dataclasses.fields(section):
        name = f.metadata["env"]
        raw = getattr(args, name, None) if args is not None else None
        if raw is None:
            raw = env.get(name)
        if raw is None:
            continue
        try:
            values[f.name] = _parse_value(hints[f.name], raw)
        except ValueError as exc:
            raise SystemExit(f"invalid value for {name}: {raw!r} ({exc})") from None
    return section(**values)


def reference_markdown() -> str:
    """docs/configuration.md, generated so it cannot drift: ``python -m pipeline.settings``."""
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable and a command-line flag (`--` + the variable name in "
        "lower case with dashes, e.g. `COLLECTOR_PORT` → `--collector-port`). A flag beats the variable, "
        "the variable beats the default. `pipeline <command> --help` shows the settings each command reads.",
        "",
        "This page is generated from `pipeline/settings.py` by `python -m pipeline.settings > "
        "docs/configuration.md`; a test fails when it is stale.",
        "",
    ]
    for section in SECTIONS:
        lines += [f"## {section.__name__.removesuffix('Settings')}", "",
                  "| variable | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, list):
                default = ",".join(map(str, default)) or "(none)"
            shown = str(default).replace(str(PROJECT_ROOT), "<project>")
            shown = shown.replace(str(PROJECT_ROOT.parent), "<project>/..") or "(empty)"
            lines.append(f"| `{f.metadata['env']}` | `{shown}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
