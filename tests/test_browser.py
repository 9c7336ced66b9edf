"""The website snippet in a real browser, end to end: headless Chromium (Debian's
package) loads the demo site from the collector, the snippet sends events, the collector
publishes them to the real Kafka, a worker stores them in the real PostgreSQL, and each
test checks the rows of ``visitor_events``.

Chromium is driven over the DevTools protocol straight from Python (aiohttp's websocket
client): no browser download, no Node driver. One browser per module; every test gets a
fresh browser context (its own storage, like a new profile), its own topics and database.

The demo page is opened on ``http://localhost:PORT`` while the snippet and the collector
are addressed as ``http://127.0.0.1:PORT``: two origins, so the snippet's requests are
real cross-origin ones, as on a customer's site.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestServer

from conftest import create_topics, read_topic, running_worker, wait_for_count
from ingest.app import PUBLISHER, create_app
from ingest.publisher import Unavailable
from pipeline.settings import PROJECT_ROOT, CollectorSettings, KafkaSettings

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Without the background-networking switches Chromium's own outbound connections (which
# this sandbox refuses) slow it down; a fresh --user-data-dir keeps runs independent.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1280,800",
]
V7_SHAPE = "^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


# ---------------------------------------------------------------------------
# A small DevTools-protocol client


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process and its browser-level DevTools websocket."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._listeners: list[Callable[[dict], None]] = []
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        if not os.access(CHROMIUM, os.X_OK):
            pytest.fail(f"{CHROMIUM} not found: deploy/local/bootstrap.sh --test installs Debian's chromium")
        self.profile = Path(tempfile.mkdtemp(prefix="vq-chromium-"))
        self.log = open(self.profile.parent / f"{self.profile.name}.log", "wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CDPError(f"Chromium did not start (exit {self.proc.poll()}); see {self.log.name}")
            await asyncio.sleep(0.1)
        port, path = port_file.read_text().split()
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(msg.data)
            fut = self._pending.pop(data.get("id"), None) if "id" in data else None
            if fut is not None:
                if fut.done():
                    continue
                if "error" in data:
                    fut.set_exception(CDPError(f"{data['error'].get('message')}: {data['error'].get('data', '')}"))
                else:
                    fut.set_result(data.get("result", {}))
            else:
                for listener in list(self._listeners):
                    listener(data)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("DevTools connection closed"))

    async def send(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = 30) -> dict:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_str(orjson.dumps(msg).decode())  # DevTools takes text frames only
        return await asyncio.wait_for(fut, timeout)

    async def new_context(self) -> "Context":
        ctx = await self.send("Target.createBrowserContext", {"disposeOnDetach": True})
        return Context(self, ctx["browserContextId"])

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("Browser.close", timeout=5)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            # Helpers (zygote, renderers) left behind: our own process group only.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        with contextlib.suppress(Exception):
            await self.ws.close()
            await self.http.close()
            self._reader.cancel()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        shutil.rmtree(self.profile, ignore_errors=True)


class Context:
    """A browser context: separate cookies and storage, like a fresh profile."""

    def __init__(self, browser: Browser, context_id: str) -> None:
        self.browser, self.id = browser, context_id
        self.pages: list[Page] = []

    async def new_page(self) -> "Page":
        target = await self.browser.send("Target.createTarget", {"url": "about:blank", "browserContextId": self.id})
        attached = await self.browser.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self.browser, target["targetId"], attached["sessionId"])
        await page.init()
        self.pages.append(page)
        return page

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.browser.send("Target.disposeBrowserContext", {"browserContextId": self.id}, timeout=10)


class Page:
    def __init__(self, browser: Browser, target_id: str, session: str) -> None:
        self.browser, self.target_id, self.session = browser, target_id, session
        self.errors: list[str] = []  # uncaught exceptions in the page: the snippet must cause none
        self.console: list[str] = []
        browser._listeners.append(self._on_event)

    def _on_event(self, data: dict) -> None:
        if data.get("sessionId") != self.session:
            return
        method, params = data.get("method"), data.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))

    async def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        return await self.browser.send(method, params, self.session, timeout)

    async def init(self) -> None:
        await self.send("Runtime.enable")
        await self.send("Network.enable")
        await self.send("Page.enable")

    async def eval(self, expression: str) -> Any:
        res = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                   "returnByValue": True, "userGesture": True})
        if "exceptionDetails" in res:
            raise CDPError(f"{expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(CDPError):
                value = await self.eval(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.05)

    async def goto(self, url: str) -> None:
        """Navigate and wait until the snippet has loaded (it replaces the vq queue stub)."""
        res = await self.send("Page.navigate", {"url": url})
        if res.get("errorText"):
            raise CDPError(f"navigating to {url}: {res['errorText']}")
        await self.snippet_loaded()

    async def snippet_loaded(self) -> None:
        await self.wait_for("document.readyState === 'complete' && !!window.vq && !Array.isArray(window.vq)")

    async def click(self, selector: str) -> None:
        await self.eval(f"document.querySelector({orjson.dumps(selector).decode()}).click()")

    async def offline(self, offline: bool) -> None:
        await self.send("Network.emulateNetworkConditions", {
            "offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})

    async def storage(self) -> dict[str, str]:
        """What the snippet keeps in this origin's storage (localStorage and cookies)."""
        return await self.eval(
            "Object.fromEntries([...Object.entries(localStorage), ...document.cookie.split('; ')"
            ".filter(Boolean).map(c => c.split('='))].filter(([k]) => k.startsWith('_vq_')))")


# ---------------------------------------------------------------------------
# The pipeline: collector (with the demo site) and a worker, in process


class Pipeline:
    """Collector + worker around the test's topics and database; records what the
    collector published per request, and can make it answer 503 as when Kafka is down."""

    def __init__(self, server: TestServer, kafka: KafkaSettings, dsn: str, site: str) -> None:
        self.server, self.kafka, self.dsn, self.site = server, kafka, dsn, site
        self.requests: list[list[dict]] = []  # events of each request Kafka acknowledged
        self.refused: list[list[dict]] = []  # events of each request answered 503
        self.outage = False

    @property
    def collector(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def url(self, page: str = "", **params: str) -> str:
        """A demo page as a customer's site (the localhost origin), using this test's site."""
        query = {"site": self.site, "collector": self.collector, **params}
        return f"http://localhost:{self.server.port}/demo/{page}?{urlencode(query)}"

    def published(self) -> list[dict]:
        return [e for req in self.requests for e in req]

    async def rows(self, where: str = "TRUE", *args) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetch(f"SELECT * FROM visitor_events WHERE {where} ORDER BY created_at, id", *args)
        finally:
            await conn.close()

    async def wait_rows(self, n: int, where: str = "TRUE", *args, timeout: float = 30) -> list[asyncpg.Record]:
        count = await wait_for_count(self.dsn, f"SELECT count(*) FROM visitor_events WHERE {where}", n, timeout, *args)
        assert count == n, f"{count} rows where {where}, expected {n}"
        return await self.rows(where, *args)


@pytest.fixture(scope="module")
async def browser():
    b = Browser()
    await b.start()
    yield b
    await b.close()


@pytest.fixture
async def context(browser):
    ctx = await browser.new_context()
    yield ctx
    errors = [e for p in ctx.pages for e in p.errors]
    await ctx.close()
    assert not errors, f"uncaught exceptions in the page: {errors}"


@pytest.fixture
async def pipeline(kafka_bootstrap, pipeline_db):
    dsn, site = pipeline_db
    events, dead = f"test-ev-{uuid.uuid4().hex[:8]}", f"test-dlq-{uuid.uuid4().hex[:8]}"
    await create_topics(kafka_bootstrap, events, partitions=3)
    await create_topics(kafka_bootstrap, dead, partitions=1)
    kafka = KafkaSettings(bootstrap=kafka_bootstrap, events_topic=events, dlq_topic=dead)
    app = create_app(CollectorSettings(demo=True), kafka)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    pipe = Pipeline(server, kafka, dsn, site)

    publisher = app[PUBLISHER]
    real_publish = publisher.publish

    async def publish(records, now_ms):
        events = [orjson.loads(value) for _, value in records]
        if pipe.outage:
            pipe.refused.append(events)
            raise Unavailable("test_outage")  # the collector's real 503 path
        await real_publish(records, now_ms)
        pipe.requests.append(events)

    publisher.publish = publish
    try:
        async with running_worker(kafka, dsn):
            yield pipe
    finally:
        await server.close()


def custom(row) -> dict:
    return orjson.loads(row["custom_data"]) if row["custom_data"] else {}


def check_event_ids(rows) -> None:
    """Every row's id is the snippet's UUIDv7 and its created_at is that id's time."""
    for r in rows:
        assert re.match(V7_SHAPE, str(r["id"])), r["id"]
        assert abs(int(r["id"].hex[:12], 16) - r["created_at"].timestamp() * 1000) < 1


# ---------------------------------------------------------------------------
# The snippet route (no browser needed)


async def test_snippet_is_served_small_cacheable_with_etag(kafka_bootstrap):
    kafka = KafkaSettings(bootstrap=kafka_bootstrap, events_topic=f"test-{uuid.uuid4().hex[:8]}")
    minified = (PROJECT_ROOT / "snippet" / "t.min.js").read_bytes()
    for settings, path in ((CollectorSettings(), "/t.js"), (CollectorSettings(path_prefix="/a1"), "/a1/t.js")):
        server = TestServer(create_app(settings, kafka))
        await server.start_server()
        try:
            async with aiohttp.ClientSession(base_url=str(server.make_url("")), auto_decompress=False) as http:
                r = await http.get(path, headers={"Accept-Encoding": "gzip, br"})
                body = await r.read()
                assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
                assert len(body) <= 3072, f"snippet is {len(body)} bytes gzipped"
                assert gzip.decompress(body) == minified
                assert r.headers["Content-Type"].startswith("text/javascript")
                cache = r.headers["Cache-Control"]
                assert cache.startswith("public, max-age=") and int(cache.rsplit("=", 1)[1]) >= 3600
                etag = r.headers["ETag"]
                assert etag.startswith('"') and not etag.startswith("W/")  # strong
                r = await http.get(path, headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
                assert r.status == 304 and await r.read() == b"" and r.headers["ETag"] == etag
                r = await http.get(path, headers={"Accept-Encoding": "identity"})
                assert r.status == 200 and "Content-Encoding" not in r.headers and await r.read() == minified
                plain = r.headers["ETag"]
                assert plain != etag  # one strong ETag per representation
                r = await http.get(path, headers={"Accept-Encoding": "identity", "If-None-Match": f'"x", {plain}'})
                assert r.status == 304
                r = await http.get("/demo/")  # only with COLLECTOR_DEMO
                assert r.status == 404
        finally:
            await server.close()


# ---------------------------------------------------------------------------
# In the browser


async def test_page_views_spa_navigation_and_custom_event(pipeline, context):
    page = await context.new_page()
    landing = pipeline.url(utm_source="newsletter", utm_campaign="spring")
    await page.goto(landing)
    # pushState, then a custom event in the same moment: they go out in one request.
    await page.eval("document.querySelector('button[data-view=features]').click();"
                    "document.querySelector('#signup').click()")
    await page.wait_for("location.search.includes('view=features')")
    await page.eval("history.back()")  # popstate: back on the landing URL
    await page.wait_for("!location.search.includes('view=')")
    await page.click("a.page")  # a real navigation to the second page
    await page.snippet_loaded()
    pricing = await page.eval("location.href")
    screen = await page.eval("screen.width + 'x' + screen.height")

    # (Time-on-page events for the views left are checked in the next test.)
    rows = await pipeline.wait_rows(5, "event_type <> 'duration'")
    check_event_ids(rows)
    assert [(r["event_type"], r["page_url"]) for r in rows] == [
        ("pageview", landing),
        ("pageview", landing + "&view=features"),
        ("signup_click", landing + "&view=features"),
        ("pageview", landing),
        ("pageview", pricing),
    ]
    first, spa, click, back, second = rows
    assert first["referrer_url"] is None  # opened directly
    assert spa["referrer_url"] == landing and back["referrer_url"] == landing + "&view=features"
    assert second["referrer_url"] == landing  # the browser's referrer on a real navigation
    data = custom(first)
    assert data["utm_source"] == "newsletter" and data["utm_campaign"] == "spring"
    assert data["screen"] == screen and data["language"] == await page.eval("navigator.language")
    assert "utm_source" not in custom(second) and custom(second)["screen"] == screen
    assert {"plan": "pro", "place": "hero"}.items() <= custom(click).items()
    # One visitor (kept in first-party storage across the two pages), one session.
    visitor = first["visitor_id"]
    assert len(visitor) == 36 and all(r["visitor_id"] == visitor for r in rows)
    assert len({r["session_id"] for r in rows}) == 1
    assert all(str(r["site_id"]) == pipeline.site for r in rows)
    assert (await page.storage())["_vq_id"] == visitor
    together = next(req for req in pipeline.requests if any(e["id"] == str(click["id"]) for e in req))
    assert str(spa["id"]) in {e["id"] for e in together}
    assert all(r["user_agent"] and "Chrome" in r["user_agent"] for r in rows)


async def test_identify_and_time_on_page_when_hidden_and_left(pipeline, context):
    page = await context.new_page()
    await page.goto(pipeline.url("pricing.html"))
    await page.eval("document.querySelector('input[name=email]').value = 'Ann.Lee@example.com'")
    await page.eval("document.querySelector('#trial').click();"
                    "document.querySelector('#identify button[type=submit]').click()")
    rows = await pipeline.wait_rows(3)
    pv, trial, ident = rows
    assert [r["event_type"] for r in rows] == ["pageview", "trial_start", "identify"]
    assert {"plan": "team", "seats": 5}.items() <= custom(trial).items()
    assert custom(ident)["email"] == "Ann.Lee@example.com" and custom(ident)["newsletter"] is True
    assert ident["lead_id"] is None  # an email names no lead id
    # Both went out together: one request, one batch.
    assert any({str(trial["id"]), str(ident["id"])} <= {e["id"] for e in req} for req in pipeline.requests)

    # The tab goes to the background (another tab in front): the visible time is sent.
    await asyncio.sleep(2)
    other = await context.new_page()
    await other.send("Page.bringToFront")
    await page.wait_for("document.visibilityState === 'hidden'")
    hidden = await pipeline.wait_rows(1, "event_type = 'duration'")
    assert hidden[0]["duration_seconds"] >= 2 and hidden[0]["page_url"] == pv["page_url"]
    assert hidden[0]["visitor_id"] == pv["visitor_id"]
    # Back in front, then the visitor leaves: the time since is sent as the page unloads.
    await page.send("Page.bringToFront")
    await page.wait_for("document.visibilityState === 'visible'")
    await asyncio.sleep(1.2)
    await page.send("Page.navigate", {"url": "about:blank"})
    rows = await pipeline.wait_rows(2, "event_type = 'duration'")
    assert rows[1]["duration_seconds"] >= 1 and rows[1]["page_url"] == pv["page_url"]
    check_event_ids(await pipeline.rows())


async def test_offline_and_503_are_retried_without_duplicates(pipeline, context):
    page = await context.new_page()
    await page.goto(pipeline.url())
    first = await pipeline.wait_rows(1)
    queued = "(q => q.length >= 2 && q.map(e => e.event_id))(JSON.parse(localStorage.getItem('_vq_q') || '[]'))"

    # Offline: the clicks are kept in storage, and sent when the browser is online again.
    await page.offline(True)
    await page.wait_for("navigator.onLine === false")
    await page.eval("document.querySelector('#signup').click(); document.querySelector('#signup').click()")
    offline_ids = await page.wait_for(queued)
    assert len(pipeline.requests) == 1  # nothing was even attempted
    await page.offline(False)
    await page.wait_for("localStorage.getItem('_vq_q') === null")

    # The collector answers 503 (as when Kafka is unavailable): kept, retried with backoff.
    pipeline.outage = True
    await page.eval("document.querySelector('#signup').click(); document.querySelector('[data-view=docs]').click()")
    outage_ids = await page.wait_for(queued)  # the click, the SPA view (and the time on the view before)
    await asyncio.sleep(1.5)  # long enough for a retry to be refused too
    pipeline.outage = False
    await page.wait_for("localStorage.getItem('_vq_q') === null", timeout=40)
    assert len(pipeline.refused) >= 2
    assert {e["id"] for req in pipeline.refused for e in req} == set(outage_ids)  # retries: the same ids

    expected = {str(first[0]["id"]), *offline_ids, *outage_ids}
    rows = await pipeline.wait_rows(len(expected))
    assert {str(r["id"]) for r in rows} == expected
    assert sorted(r["event_type"] for r in rows if r["event_type"] != "duration") == [
        "pageview", "pageview", "signup_click", "signup_click", "signup_click"]
    check_event_ids(rows)
    # No event reached Kafka twice: each one was accepted exactly once.
    records = await read_topic(pipeline.kafka.bootstrap, pipeline.kafka.events_topic, len(expected), timeout=10)
    assert sorted(orjson.loads(r.value)["id"] for r in records) == sorted(expected)


async def test_opt_out_sends_nothing(pipeline, context):
    page = await context.new_page()
    await page.goto(pipeline.url())
    await pipeline.wait_rows(1)
    await page.click("#optout")
    await page.click("#signup")
    await page.click("button[data-view=features]")
    await page.goto(pipeline.url("pricing.html"))  # persisted: the next page sends nothing either
    await page.click("#trial")
    await asyncio.sleep(1.5)
    assert len(pipeline.published()) == 1 and not pipeline.refused
    assert await page.storage() == {"_vq_optout": "1"}  # and the visitor id is gone
    # Opting in again works (and shows the pipeline was live all along).
    await page.click("#optin")
    await page.click("#trial")
    rows = await pipeline.wait_rows(2)
    assert [r["event_type"] for r in rows] == ["pageview", "trial_start"]
    assert rows[0]["visitor_id"] != rows[1]["visitor_id"]  # a new, unlinked visitor id
    await page.goto(pipeline.url())  # ... kept from now on
    rows = await pipeline.wait_rows(3, "event_type <> 'duration'")
    assert rows[2]["event_type"] == "pageview" and rows[2]["visitor_id"] == rows[1]["visitor_id"]


async def test_consent_mode_sends_nothing_before_consent(pipeline, context):
    page = await context.new_page()
    await page.goto(pipeline.url(**{"require-consent": ""}))
    await page.wait_for("!document.getElementById('consent').hidden")
    await page.click("#signup")
    await asyncio.sleep(1.5)
    assert pipeline.published() == [] and pipeline.refused == []
    assert await page.storage() == {}  # nothing stored on the device either
    await page.click("#accept")  # consent(true): what happened on this page is sent now
    rows = await pipeline.wait_rows(2)
    assert [r["event_type"] for r in rows] == ["pageview", "signup_click"]
    assert set((await page.storage()).keys()) == {"_vq_id", "_vq_consent"}
    await page.goto(pipeline.url("pricing.html", **{"require-consent": ""}))  # remembered
    rows = await pipeline.wait_rows(3, "event_type <> 'duration'")
    assert rows[2]["event_type"] == "pageview" and rows[2]["visitor_id"] == rows[0]["visitor_id"]


async def test_cookieless_mode_stores_nothing(pipeline, context):
    page = await context.new_page()
    await page.goto(pipeline.url(cookieless=""))
    await page.click("#signup")
    rows = await pipeline.wait_rows(2)
    assert await page.storage() == {}
    # No visitor id from the device: the collector's daily hash, the same for both.
    assert rows[0]["visitor_id"].startswith("cl_") and rows[0]["visitor_id"] == rows[1]["visitor_id"]
