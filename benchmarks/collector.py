"""Collector throughput and latency, with real Kafka acks, against a bare aiohttp baseline.

Both servers run as single processes on this machine and are loaded by ``wrk``
(Debian package, installed when missing) with the same pixel requests, alternating
so that machine noise hits both alike. Two measurements:

1. Closed loop: ``--connections`` (32) connections send back to back. Printed:
   requests/s, p50/p99 latency, CPU time per request of the server process and of
   the Kafka broker. This is latency-bound for the collector (every answer waits for
   an acks=all round trip), so it measures latency more than capacity.
2. Capacity at the latency target (judged): browsers are independent clients, so
   requests arrive at a rate, not when earlier answers came back. wrk paces requests
   to an offered rate (one schedule shared by the connections, LuaJIT clock); a rate
   is sustained when wrk completes >= 97% of it with p99 < 20 ms. For each server the
   rate climbs by 12% steps from half its closed-loop rate until it is not sustained,
   then one step halves the last gap. Capacity = highest sustained rate; the ratio of
   the two capacities is the figure judged against the target (>= 0.60).

    .venv/bin/python benchmarks/collector.py [--duration 10] [--connections 32] [--rounds 3]
                                             [--step-duration 6] [--capacity-rounds 2] [--without-kafka]

Needs the local Kafka broker (started here via the stack if it is not running).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIF = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)

LUA = """
local site = "00000000-0000-4000-8000-000000000001"
request = function()
  return wrk.format(nil, "/t.gif?site_id=" .. site .. "&visitor_id=v" .. math.random(1, 100000)
    .. "&page_url=https%3A%2F%2Fexample.com%2Fpage%2F" .. math.random(1, 50))
end
"""

# The same requests at an offered rate (first script argument): every request takes the
# next slot of one schedule shared by the thread's connections; a connection whose slot
# has passed sends at once (wrk's delay() has 1 ms resolution: sub-ms slots go out in
# small bursts). A schedule more than a second behind restarts at now, so an overloaded
# server shows as completed < offered rather than as an ever-growing backlog.
PACED_LUA = LUA + """
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } bench_ts; int clock_gettime(int, bench_ts*); ]]
local ts = ffi.new("bench_ts")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local gap, next_at
function init(args) gap = 1000 / tonumber(args[1]) end
function delay()
  local t = now_ms()
  if next_at == nil or next_at < t - 1000 then next_at = t end
  local d = next_at - t
  next_at = next_at + gap
  if d <= 0 then return 0 end
  return d
end
"""
# wrk sends every connection's first request at once, unpaced; that burst must stay a
# negligible share of a step's requests (or it alone decides p99). So connections are
# sized to the rate: enough for 10 ms of requests in flight (past that latency the rate
# is not sustained anyway), within [32, 256].
PACED_IN_FLIGHT_S = 0.010
SUSTAINED_SHARE = 0.97
P99_TARGET_MS = 20.0
RATE_STEP = 1.12


def serve_bare(port: int) -> None:
    """The baseline: the smallest aiohttp handler answering the same pixel."""
    from aiohttp import web

    headers = {"Cache-Control": "no-store, no-cache, must-revalidate, max-age=0", "Pragma": "no-cache"}

    async def pixel(request: web.Request) -> web.Response:
        return web.Response(body=GIF, content_type="image/gif", headers=headers)

    app = web.Application()
    app.router.add_get("/t.gif", pixel)
    app.router.add_get("/healthz", lambda r: web.Response(text="ok"))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_without_kafka() -> None:
    """Diagnostic (--without-kafka): the collector with a publish that returns at once.
    What it costs beside the bare handler is the collector's own work (parsing,
    validation, stamps, envelope, metrics, CORS); the rest of its cost is Kafka's."""
    from ingest.publisher import Publisher
    from pipeline import settings as cfg
    from ingest.app import run

    async def publish(self: Publisher, records: object, timestamp_ms: int) -> None:
        return None

    async def nothing(self: Publisher, *args: object) -> bool:
        return True

    Publisher.publish = publish  # type: ignore[method-assign]
    Publisher.start = nothing  # type: ignore[method-assign]
    Publisher.kafka_reachable = nothing  # type: ignore[method-assign]
    run(cfg.load(cfg.CollectorSettings), cfg.load(cfg.KafkaSettings))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, duration: int, connections: int, script: str,
            pids: dict[str, int | None] | None = None, rate: float | None = None) -> dict[str, float]:
    pids = pids or {}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script, url]
    if rate is not None:
        cmd += ["--", str(int(rate))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def latency_ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    # CPU microseconds per request of each process watched (server, broker)
    cpu = {f"cpu_{name}": (cpu_seconds(pid) - before[name]) * 1e6 / max(requests, 1) for name, pid in pids.items()}
    return {
        **cpu,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": requests,
        "p50": latency_ms("50"),
        "p99": latency_ms("99"),
        "errors": int(non2xx.group(1)) if non2xx else 0,
    }


def sustained(r: dict[str, float], rate: float) -> bool:
    return r["errors"] == 0 and r["rps"] >= SUSTAINED_SHARE * rate and r["p99"] < P99_TARGET_MS


def capacity(name: str, url: str, start: float, step_s: int, script: str,
             runs: list[dict[str, float]]) -> float:
    """Highest offered rate the server sustains at p99 < 20 ms (see the module docstring)."""
    def attempt(rate: float) -> bool:
        connections = min(256, max(32, math.ceil(rate * PACED_IN_FLIGHT_S)))
        r = run_wrk(url, step_s, connections, script, rate=rate)
        runs.append(r)
        ok = sustained(r, rate)
        print(f"  {name:<9} offered {rate:7.0f}/s: completed {r['rps']:7.0f}/s  p50 {r['p50']:6.2f} ms  "
              f"p99 {r['p99']:6.2f} ms  non-2xx {r['errors']}  {'sustained' if ok else 'not sustained'}", flush=True)
        return ok

    good, rate = 0.0, start
    while attempt(rate):
        good, rate = rate, rate * RATE_STEP
    if good == 0.0:  # not even the start: halve until sustained (bounded)
        for _ in range(6):
            rate /= 2
            if attempt(rate):
                return rate
        return 0.0
    middle = (good + rate) / 2
    return middle if attempt(middle) else good


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per round")
    ap.add_argument("--connections", type=int, default=32, help="concurrent connections")
    ap.add_argument("--rounds", type=int, default=3, help="alternating closed-loop rounds per server")
    ap.add_argument("--step-duration", type=int, default=6, help="seconds per offered rate (capacity search)")
    ap.add_argument("--capacity-rounds", type=int, default=2,
                    help="capacity searches per server, alternating (0: closed loop only)")
    ap.add_argument("--without-kafka", action="store_true",
                    help="also measure the collector with a no-op publish (what Kafka costs it)")
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--serve-without-kafka", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    if args.serve_without_kafka:
        serve_without_kafka()
        return 0

    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)

    from pipeline import settings as cfg
    from pipeline.stack import Kafka
    from pipeline.topics import create_topics, topic_size

    kafka = Kafka(cfg.load(cfg.StackSettings), cfg.load(cfg.KafkaSettings))
    kafka.up()
    topic = f"bench-collector-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(kafka.bootstrap, {topic: 6}))

    env = dict(os.environ, LOG_LEVEL="WARNING", KAFKA_BOOTSTRAP=kafka.bootstrap, EVENTS_TOPIC=topic,
               PYTHONUNBUFFERED="1")
    # name -> command; each gets a free port (COLLECTOR_PORT, or --serve-bare's argument)
    commands = {"bare": [sys.executable, __file__, "--serve-bare"],
                "collector": [sys.executable, "-m", "pipeline.cli", "collector"]}
    if args.without_kafka:
        commands["no-kafka"] = [sys.executable, __file__, "--serve-without-kafka"]
    ports = {name: free_port() for name in commands}
    procs = {
        name: subprocess.Popen(cmd + ([str(ports[name])] if name == "bare" else []),
                               env=dict(env, COLLECTOR_PORT=str(ports[name])), cwd=ROOT)
        for name, cmd in commands.items()
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    capacities: dict[str, list[float]] = {name: [] for name in commands}
    paced_runs: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
    try:
        for name, port in ports.items():
            wait_http(f"http://127.0.0.1:{port}/{'healthz' if name == 'bare' else 'readyz'}")
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(LUA)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as paced:
            paced.write(PACED_LUA)
        targets = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        # Warm-up (JIT-free Python, but connections, producer batches and page cache).
        for url in targets.values():
            run_wrk(url, 2, args.connections, f.name)
        broker_pid = int(kafka.pid_file.read_text().split()[0]) if kafka.pid_file.exists() else None
        watch = {name: {"server": proc.pid, "broker": broker_pid} for name, proc in procs.items()}
        for rnd in range(args.rounds):
            for name, url in targets.items():
                r = run_wrk(url, args.duration, args.connections, f.name, watch[name])
                results[name].append(r)
                print(f"round {rnd + 1} {name:<9} {r['rps']:>8.0f} req/s  p50 {r['p50']:6.2f} ms  "
                      f"p99 {r['p99']:6.2f} ms  non-2xx {r['errors']}  CPU/request: server "
                      f"{r['cpu_server']:5.1f} us, broker {r['cpu_broker']:5.1f} us", flush=True)
        for rnd in range(args.capacity_rounds):
            print(f"capacity search {rnd + 1}", flush=True)
            for name, url in targets.items():
                start = statistics.median(r["rps"] for r in results[name]) / 2
                capacities[name].append(
                    capacity(name, url, start, args.step_duration, paced.name, paced_runs[name]))
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    closed_ratio = med("collector", "rps") / med("bare", "rps")
    p99 = med("collector", "p99")
    sent_2xx = sum(r["requests"] - r["errors"] for r in results["collector"] + paced_runs["collector"])
    in_kafka = asyncio.run(topic_size(kafka.bootstrap, topic))
    print()
    print(f"bare aiohttp handler : {med('bare', 'rps'):8.0f} req/s  p50 {med('bare', 'p50'):.2f} ms  "
          f"p99 {med('bare', 'p99'):.2f} ms")
    print(f"collector + Kafka    : {med('collector', 'rps'):8.0f} req/s  p50 {med('collector', 'p50'):.2f} ms  "
          f"p99 {p99:.2f} ms")
    print(f"CPU per request      : bare server {med('bare', 'cpu_server'):.1f} us; collector {med('collector', 'cpu_server'):.1f} us "
          f"+ Kafka broker {med('collector', 'cpu_broker'):.1f} us (2 cores shared with wrk and the broker)")
    if args.without_kafka:
        print(f"collector, no Kafka  : {med('no-kafka', 'rps'):8.0f} req/s  p50 {med('no-kafka', 'p50'):.2f} ms  "
              f"p99 {med('no-kafka', 'p99'):.2f} ms  CPU per request {med('no-kafka', 'cpu_server'):.1f} us")
    print(f"closed loop ({args.connections} connections): ratio collector/bare {closed_ratio:.2f}; "
          f"collector p99 {p99:.1f} ms")
    if args.capacity_rounds:
        bare_cap, coll_cap = statistics.median(capacities["bare"]), statistics.median(capacities["collector"])
        ratio = coll_cap / bare_cap if bare_cap else 0.0
        print(f"capacity at p99 < {P99_TARGET_MS:.0f} ms: bare {bare_cap:.0f}/s, collector {coll_cap:.0f}/s "
              f"(searches: bare {', '.join(f'{c:.0f}' for c in capacities['bare'])}; "
              f"collector {', '.join(f'{c:.0f}' for c in capacities['collector'])})")
        if args.without_kafka:
            print(f"capacity without Kafka: {statistics.median(capacities['no-kafka']):.0f}/s, ratio to bare "
                  f"{statistics.median(capacities['no-kafka']) / bare_cap if bare_cap else 0:.2f}")
        print(f"ratio collector/bare : {ratio:.2f}  (target >= 0.60 at p99 < 20 ms: {'met' if ratio >= 0.6 else 'NOT met'})")
    # Every 2xx answered after the warm-up must be in Kafka (the warm-up adds a few more).
    print(f"events in Kafka: {in_kafka} >= 2xx answers after the warm-up: {sent_2xx} -> "
          f"{'ok' if in_kafka >= sent_2xx else 'LOST EVENTS'}")
    return 0 if in_kafka >= sent_2xx else 1


if __name__ == "__main__":
    sys.exit(main())
