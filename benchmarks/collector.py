"""Collector throughput and latency, with real Kafka acks, against a bare aiohttp baseline.

Both servers run as single processes on this machine and are loaded by ``wrk``
(Debian package, installed when missing) with the same pixel requests, alternating
rounds so that machine noise hits both alike. Printed: requests/s, p50 and p99
latency of each, and the ratio collector/bare. Targets: ratio >= 0.60, p99 < 20 ms.

    .venv/bin/python benchmarks/collector.py [--duration 10] [--connections 32] [--rounds 3]

Needs the local Kafka broker (started here via the stack if it is not running).
"""

from __future__ import annotations

import argparse
import asyncio
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
            pids: dict[str, int | None] | None = None) -> dict[str, float]:
    pids = pids or {}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script, url],
        capture_output=True, text=True, check=True,
    ).stdout

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per round")
    ap.add_argument("--connections", type=int, default=32, help="concurrent connections")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per server")
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
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

    bare_port, coll_port = free_port(), free_port()
    env = dict(os.environ, LOG_LEVEL="WARNING", KAFKA_BOOTSTRAP=kafka.bootstrap, EVENTS_TOPIC=topic,
               COLLECTOR_PORT=str(coll_port), PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, "--serve-bare", str(bare_port)], env=env),
        subprocess.Popen([sys.executable, "-m", "pipeline.cli", "collector"], env=env, cwd=ROOT),
    ]
    results: dict[str, list[dict[str, float]]] = {"bare": [], "collector": []}
    try:
        wait_http(f"http://127.0.0.1:{bare_port}/healthz")
        wait_http(f"http://127.0.0.1:{coll_port}/readyz")
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(LUA)
        targets = {"bare": f"http://127.0.0.1:{bare_port}", "collector": f"http://127.0.0.1:{coll_port}"}
        # Warm-up (JIT-free Python, but connections, producer batches and page cache).
        for url in targets.values():
            run_wrk(url, 2, args.connections, f.name)
        broker_pid = int(kafka.pid_file.read_text().split()[0]) if kafka.pid_file.exists() else None
        watch = {"bare": {"server": procs[0].pid, "broker": broker_pid},
                 "collector": {"server": procs[1].pid, "broker": broker_pid}}
        for rnd in range(args.rounds):
            for name, url in targets.items():
                r = run_wrk(url, args.duration, args.connections, f.name, watch[name])
                results[name].append(r)
                print(f"round {rnd + 1} {name:<9} {r['rps']:>8.0f} req/s  p50 {r['p50']:6.2f} ms  "
                      f"p99 {r['p99']:6.2f} ms  non-2xx {r['errors']}  CPU/request: server "
                      f"{r['cpu_server']:5.1f} us, broker {r['cpu_broker']:5.1f} us", flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    ratio = med("collector", "rps") / med("bare", "rps")
    p99 = med("collector", "p99")
    sent_2xx = sum(r["requests"] - r["errors"] for r in results["collector"])
    in_kafka = asyncio.run(topic_size(kafka.bootstrap, topic))
    print()
    print(f"bare aiohttp handler : {med('bare', 'rps'):8.0f} req/s  p50 {med('bare', 'p50'):.2f} ms  "
          f"p99 {med('bare', 'p99'):.2f} ms")
    print(f"collector + Kafka    : {med('collector', 'rps'):8.0f} req/s  p50 {med('collector', 'p50'):.2f} ms  "
          f"p99 {p99:.2f} ms")
    print(f"CPU per request      : bare server {med('bare', 'cpu_server'):.1f} us; collector {med('collector', 'cpu_server'):.1f} us "
          f"+ Kafka broker {med('collector', 'cpu_broker'):.1f} us (2 cores shared with wrk and the broker)")
    print(f"ratio collector/bare : {ratio:.2f}  (target >= 0.60: {'met' if ratio >= 0.6 else 'NOT met'});  "
          f"p99 {p99:.1f} ms (target < 20 ms: {'met' if p99 < 20 else 'NOT met'})")
    # Every 2xx answered after the warm-up must be in Kafka (the warm-up adds a few more).
    print(f"events in Kafka: {in_kafka} >= 2xx answers in measured rounds: {sent_2xx} -> "
          f"{'ok' if in_kafka >= sent_2xx else 'LOST EVENTS'}")
    return 0 if in_kafka >= sent_2xx else 1


if __name__ == "__main__":
    sys.exit(main())
