"""The local stack: a real Kafka broker (KRaft), a throw-away PostgreSQL cluster and
the pipeline's own processes, started in the background and tracked by pid files.

Kafka comes from Maven Central (org.apache.kafka:kafka_2.13 and its runtime
dependencies, resolved by ``mvn``) and is cached under ``.cache/`` so the second
start downloads nothing. PostgreSQL comes from Debian's packages.

Every ``*_up`` is idempotent: when the component already runs and answers, it
returns at once.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from pipeline.topics import TopicError, create_topics
from pipeline.settings import PROJECT_ROOT, CollectorSettings, KafkaSettings, PostgresSettings, StackSettings

log = logging.getLogger("pipeline.stack")

DEPLOY = PROJECT_ROOT / "deploy" / "local"


class StackError(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _pid_alive(pid) else None


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    _fail(f"{what} not ready after {timeout:.0f}s", log_file)


def _fail(message: str, log_file: Path | None = None) -> typing.NoReturn:
    tail = ""
    if log_file and log_file.exists():
        lines = log_file.read_text(errors="replace").splitlines()[-30:]
        tail = f"\n--- last lines of {log_file} ---\n" + "\n".join(lines)
    raise StackError(message + tail)


def _stop_pid(pid_file: Path, name: str, timeout: float = 30.0) -> bool:
    pid = _read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        log.warning("stack.kill", extra={"component": name, "pid": pid})
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def _spawn(argv: list[str], log_file: Path, pid_file: Path, env: dict[str, str] | None = None,
           user: str | None = None) -> int:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, user=user,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


# ---------------------------------------------------------------------------
# Kafka


@dataclass
class Kafka:
    stack: StackSettings
    kafka: KafkaSettings

    @property
    def dir(self) -> Path:
        return self.stack.state_dir / "kafka"

    @property
    def libs(self) -> Path:
        return self.stack.cache_dir / f"kafka-{self.stack.kafka_version}" / "libs"

    @property
    def pid_file(self) -> Path:
        return self.dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "broker.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.stack.kafka_port}"

    def fetch(self) -> None:
        """Resolve the broker jars from Maven Central once; later calls are free."""
        stamp = self.libs / ".complete"
        if stamp.exists():
            return
        if not shutil.which("mvn") or not shutil.which("java"):
            raise StackError("java and mvn are needed to fetch Kafka (deploy/local/bootstrap.sh installs them)")
        print(f"fetching Apache Kafka {self.stack.kafka_version} from Maven Central ...", flush=True)
        tmp = self.libs.with_name("libs.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            "mvn", "-q", "-B", "-f", str(DEPLOY / "kafka-pom.xml"),
            f"-Dkafka.version={self.stack.kafka_version}",
            "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise StackError(f"mvn failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        shutil.rmtree(self.libs, ignore_errors=True)
        tmp.rename(self.libs)
        stamp.write_text("ok\n")

    def _java(self, *args: str, heap: str | None = None) -> list[str]:
        jvm = ["java"]
        if heap:
            jvm += [f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC"]
        return jvm + [
            f"-Dlog4j2.configurationFile={DEPLOY / 'log4j2.yaml'}",
            "-cp", str(self.libs / "*"), *args,
        ]

    def _write_config(self) -> Path:
        port = self.stack.kafka_port
        conf = self.dir / "server.properties"
        conf.write_text(
            "\n".join([
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{port + 1}",
                f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"log.dirs={self.dir / 'data'}",
                f"num.partitions={self.kafka.events_partitions}",
                # Single node: internal topics cannot be replicated.
                "offsets.topic.replication.factor=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                # Consumer groups form at once instead of waiting 3 s for more members.
                "group.initial.rebalance.delay.ms=0",
                "",
            ])
        )
        return conf

    def running(self) -> bool:
        return _read_pid(self.pid_file) is not None

    def healthy(self) -> bool:
        return self.running() and _port_open("127.0.0.1", self.stack.kafka_port)

    def up(self) -> None:
        if self.healthy():
            self.ensure_topics()
            return
        if _port_open("127.0.0.1", self.stack.kafka_port):
            raise StackError(f"port {self.stack.kafka_port} is taken by another process (set KAFKA_PORT)")
        self.fetch()
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self._write_config()
        if not (self.dir / "data" / "meta.properties").exists():
            cluster_id = subprocess.run(
                self._java("kafka.tools.StorageTool", "random-uuid"), capture_output=True, text=True, check=True
            ).stdout.strip().splitlines()[-1]
            res = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(conf)),
                capture_output=True, text=True,
            )
            if res.returncode != 0:
                raise StackError(f"formatting Kafka storage failed:\n{res.stdout}\n{res.stderr}")
        _spawn(self._java("kafka.Kafka", str(conf), heap=self.stack.kafka_heap), self.log_file, self.pid_file)
        _wait(lambda: _port_open("127.0.0.1", self.stack.kafka_port) or not self.running(), 90, "Kafka", self.log_file)
        if not self.running():
            _fail("Kafka exited during start-up", self.log_file)
        self.ensure_topics()

    def ensure_topics(self) -> None:
        try:
            asyncio.run(create_topics(self.bootstrap, {
                self.kafka.events_topic: self.kafka.events_partitions,
                self.kafka.dlq_topic: 1,
            }))
        except TopicError as exc:
            raise StackError(str(exc)) from exc

    def down(self) -> bool:
        return _stop_pid(self.pid_file, "kafka", timeout=60)


# ---------------------------------------------------------------------------
# PostgreSQL


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    stack: StackSettings
    pg: PostgresSettings

    @property
    def dir(self) -> Path:
        return self.stack.state_dir / "postgres"

    @property
    def data(self) -> Path:
        # Resolved: the server's user may not traverse the checkout (see _make_home).
        return self.dir.resolve() / "data"

    @property
    def log_file(self) -> Path:
        return self.dir.resolve() / "postgres.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.stack.pg_port}/postgres"

    @property
    def database_url(self) -> str:
        """The pipeline's database on the local cluster (named like the one in DATABASE_URL)."""
        name = self.pg.database_url.rsplit("/", 1)[-1].split("?")[0] or "pipeline"
        return f"postgresql://postgres@127.0.0.1:{self.stack.pg_port}/{name}"

    def _bin(self, name: str) -> str:
        bindir = _pg_bindir()
        if bindir is None:
            raise StackError("PostgreSQL is not installed (deploy/local/bootstrap.sh installs it)")
        return str(bindir / name)

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        # The server refuses to run as root: as root, run it as the 'postgres' system user.
        user = "postgres" if os.geteuid() == 0 else None
        res = subprocess.run(argv, capture_output=True, text=True, user=user)
        if check and res.returncode != 0:
            raise StackError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def running(self) -> bool:
        pidfile = self.data / "postmaster.pid"
        return pidfile.exists() and _read_pid(pidfile) is not None

    def healthy(self) -> bool:
        return self.running() and _port_open("127.0.0.1", self.stack.pg_port)

    def up(self) -> None:
        if not self.healthy():
            self._start()
        asyncio.run(self._ensure_database())

    def _start(self) -> None:
        if _port_open("127.0.0.1", self.stack.pg_port) and not self.running():
            raise StackError(f"port {self.stack.pg_port} is taken by another process (set PG_PORT)")
        self._make_home()
        if not (self.data / "PG_VERSION").exists():
            shutil.rmtree(self.data, ignore_errors=True)
            self._run([self._bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                       "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions"])
        opts = (
            f"-p {self.stack.pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c shared_buffers=256MB -c max_connections=200 -c max_wal_size=2GB"
        )
        self._run([self._bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.log_file),
                   "-w", "-t", "60", "start"])

    def _make_home(self) -> None:
        """The cluster's directory, writable by the server's user. As root that is the
        'postgres' system user, who may not be able to reach a checkout under a private
        directory: then the directory lives in /var/tmp and .stack/postgres links to it."""
        if self.dir.exists():
            return
        self.dir.mkdir(parents=True)
        if os.geteuid() != 0:
            return
        shutil.chown(self.dir, "postgres")
        reachable = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(self.dir)],
                                   capture_output=True).returncode == 0
        if not reachable:
            self.dir.rmdir()
            digest = hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:10]
            home = Path("/var/tmp") / f"pipeline-postgres-{digest}"
            home.mkdir(exist_ok=True)
            shutil.chown(home, "postgres")
            self.dir.symlink_to(home)

    async def _ensure_database(self) -> None:
        name = self.database_url.rsplit("/", 1)[-1]
        deadline = time.monotonic() + 30
        while True:
            try:
                admin = await asyncpg.connect(self.admin_url)
                break
            except (OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()

    def down(self) -> bool:
        if not self.running():
            return False
        self._run([self._bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], check=False)
        return True


# ---------------------------------------------------------------------------
# The pipeline's own processes


@dataclass
class Service:
    """One of our own long-running processes (collector, worker N)."""

    stack: StackSettings
    name: str
    argv: list[str]
    health_url: str | None = None

    @property
    def pid_file(self) -> Path:
        return self.stack.state_dir / "pids" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.stack.state_dir / "logs" / f"{self.name}.log"

    def running(self) -> bool:
        return _read_pid(self.pid_file) is not None

    def healthy(self) -> bool:
        if not self.running():
            return False
        if self.health_url is None:
            return True
        try:
            with urllib.request.urlopen(self.health_url, timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def up(self, env: dict[str, str], timeout: float = 60) -> None:
        if self.running():
            return
        _spawn(self.argv, self.log_file, self.pid_file, env=env)
        _wait(lambda: self.healthy() or not self.running(), timeout, self.name, self.log_file)
        if not self.running():
            _fail(f"{self.name} exited during start-up", self.log_file)

    def down(self) -> bool:
        return _stop_pid(self.pid_file, self.name)


# ---------------------------------------------------------------------------
# The whole stack


@dataclass
class Stack:
    stack: StackSettings
    kafka_settings: KafkaSettings
    pg_settings: PostgresSettings
    collector_settings: CollectorSettings

    @property
    def kafka(self) -> Kafka:
        return Kafka(self.stack, self.kafka_settings)

    @property
    def postgres(self) -> Postgres:
        return Postgres(self.stack, self.pg_settings)

    @property
    def collector_url(self) -> str:
        c = self.collector_settings
        return f"http://{c.host}:{c.port}{c.path_prefix}"

    @property
    def collector(self) -> Service:
        return Service(
            self.stack, "collector", [sys.executable, "-m", "pipeline.cli", "collector"],
            health_url=f"{self.collector_url}/readyz",
        )

    def worker_port(self, n: int) -> int:
        return self.stack.worker_base_port + n

    @property
    def workers(self) -> list[Service]:
        return [
            Service(self.stack, f"worker-{n}",
                    [sys.executable, "-m", "pipeline.cli", "worker", "--worker-metrics-port", str(self.worker_port(n))],
                    health_url=f"http://127.0.0.1:{self.worker_port(n)}/healthz")
            for n in range(self.stack.workers)
        ]

    def _all_workers(self) -> list[Service]:
        """Workers started earlier, even if STACK_WORKERS is smaller now."""
        names = sorted(p.stem for p in (self.stack.state_dir / "pids").glob("worker-*.pid"))
        known = {w.name: w for w in self.workers}
        return [known.get(n) or Service(self.stack, n, []) for n in names] or self.workers

    def env(self) -> dict[str, str]:
        """What the stack's own processes and its users need to reach it."""
        return {
            "COLLECTOR_URL": self.collector_url,
            "KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "EVENTS_TOPIC": self.kafka_settings.events_topic,
            "DLQ_TOPIC": self.kafka_settings.dlq_topic,
            "DATABASE_URL": self.postgres.database_url,
        }

    def process_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env())
        env.setdefault("PYTHONUNBUFFERED", "1")
        # The local stack is for development: its collector serves the demo site (/demo/).
        env.setdefault("COLLECTOR_DEMO", "true")
        return env

    def up(self, *, services: bool = True) -> None:
        self.kafka.up()
        self.postgres.up()
        from schemas.migrate import apply_migrations

        asyncio.run(_migrate(self.postgres.database_url, self.pg_settings, apply_migrations))
        if self.stack.demo_site_id:
            asyncio.run(_seed_demo_site(self.postgres.database_url, self.stack.demo_site_id))
        if services:
            env = self.process_env()
            self.collector.up(env)
            for worker in self.workers:
                worker.up(env)

    def down(self) -> list[str]:
        stopped = []
        # Producers first, then consumers (they drain their last batch), then the servers.
        parts = [("collector", self.collector)] + [(w.name, w) for w in self._all_workers()]
        parts += [("kafka", self.kafka), ("postgres", self.postgres)]
        for name, comp in parts:
            if comp.down():
                stopped.append(name)
        return stopped

    def status(self) -> list[dict[str, object]]:
        rows = []
        parts = [
            ("kafka", self.kafka, self.kafka.bootstrap),
            ("postgres", self.postgres, self.postgres.database_url),
            ("collector", self.collector, self.collector_url),
        ] + [(w.name, w, w.health_url.rsplit("/", 1)[0] + "/metrics") for w in self.workers]
        for name, comp, where in parts:
            running = comp.running()
            rows.append({
                "component": name, "where": where, "running": running,
                "healthy": running and comp.healthy(),
            })
        return rows


async def _seed_demo_site(dsn: str, site_id: str) -> None:
    """A site (and its owner) for the example hits; visitor_events references sites."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            if await conn.fetchval("SELECT 1 FROM public.sites WHERE id = $1", site_id):
                return
            owner = await conn.fetchval(
                "INSERT INTO auth.users (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id "
                "RETURNING id", "00000000-0000-4000-8000-00000000000f")
            await conn.execute("INSERT INTO public.sites (id, name, url, user_id) VALUES ($1, 'Demo site', "
                               "'http://127.0.0.1', $2)", site_id, owner)
    finally:
        await conn.close()


async def _migrate(dsn: str, pg: PostgresSettings, apply_migrations) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn, granularity=pg.partition_granularity, premake_days=pg.partition_premake_days)
    finally:
        await conn.close()
