"""Collector tests: the real app on a real port, publishing to the real Kafka broker.

Every test gets its own 6-partition topic. Kafka contents are read up to the topic's
end offsets (``read_topic``), so "exactly these events and nothing else" is a
deterministic assertion, not a wait-and-hope one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import signal
import socket
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from confluent_kafka import KafkaError, KafkaException
from multidict import CIMultiDict

from ingest import PUBLISHER, TRANSPARENT_GIF, create_app
from ingest.clientip import MAX_HOPS, ClientIPResolver, parse_hop
from ingest.cookieless import CookielessIds
from ingest.publisher import PROBE_MAX_S, producer_options
from ingest.rdkafka import RdKafkaProducer
from collector_support import (
    create_topic, delete_topic, metric_samples, read_topic, running_collector, send_events,
)
from pipeline.settings import PROJECT_ROOT, CollectorSettings, KafkaSettings

PARTITIONS = 6
SECRET = "test-secret"
UA = "Mozilla/5.0 (X11; Linux x86_64) TestBrowser/1.0"
ORIGIN = "https://shop.example"


# --------------------------------------------------------------------------- fixtures / helpers


def settings(**over: Any) -> CollectorSettings:
    return CollectorSettings(**{"host": "127.0.0.1", "port": 0, "cookieless_secret": SECRET, **over})


def new_id() -> str:
    return str(uuid.uuid4())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def topic(kafka_bootstrap: str, unique_topic: str):
    await create_topic(kafka_bootstrap, unique_topic, PARTITIONS)
    yield unique_topic
    try:
        await delete_topic(kafka_bootstrap, unique_topic)
    except Exception:  # noqa: BLE001 - tidying only
        pass


@pytest.fixture
def kafka(kafka_bootstrap: str, topic: str) -> KafkaSettings:
    return KafkaSettings(bootstrap=kafka_bootstrap, events_topic=topic)


@pytest.fixture
async def collector(kafka: KafkaSettings):
    async with running_collector(settings(), kafka) as svc:
        yield svc


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def topic_records(kafka: KafkaSettings):
    return await read_topic(kafka.bootstrap, kafka.events_topic)


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def post(http: aiohttp.ClientSession, url: str, doc: Any, **kw: Any) -> tuple[int, Any, Any]:
    headers = CIMultiDict(kw.pop("headers", {}))  # keeps repeated headers
    headers.setdefault("Content-Type", "application/json")
    async with http.post(url, data=orjson.dumps(doc), headers=headers, **kw) as r:
        body = await r.read()
        return r.status, r.headers, (orjson.loads(body) if body and r.content_type == "application/json" else body)


async def raw_request(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes aiohttp's client would refuse to send (invalid UTF-8 in headers ...)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def metrics(http: aiohttp.ClientSession, svc) -> dict[tuple[str, tuple], float]:
    async with http.get(svc.base_url + "/metrics") as r:
        assert r.status == 200
        return metric_samples(await r.text())


class GatedProducer(RdKafkaProducer):
    """A real producer whose delivery reports the test can hold back.

    Records go to Kafka as usual; after ``hold()`` their reports reach the collector
    only at ``release()`` (a slow or stalled cluster, seen from the collector).
    ``fail_with`` makes ``send`` raise, like librdkafka refusing a record.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.holding = False
        self.held: list[tuple[Callable, Any, Any]] = []
        self.fail_with: BaseException | None = None

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for on_delivery, err, msg in held:
            on_delivery(err, msg)

    def send(self, topic, value, key, timestamp_ms, on_delivery) -> None:
        if self.fail_with is not None:
            raise self.fail_with

        def report(err, msg) -> None:
            if self.holding:
                self.held.append((on_delivery, err, msg))
            else:
                on_delivery(err, msg)

        super().send(topic, value, key, timestamp_ms, report)


def gated_factory(collector: CollectorSettings, kafka: KafkaSettings) -> Callable[[], GatedProducer]:
    return lambda: GatedProducer(producer_options(collector, kafka))


def beacon_event(site: str, **fields: Any) -> dict[str, Any]:
    return {"site_id": site, "event_id": new_id(), "visitor_id": "v1", **fields}


# --------------------------------------------------------------------------- happy paths


async def test_pixel_hit_is_published_with_server_stamps(collector, http, kafka):
    site, campaign = new_id(), new_id()
    params = {
        "site_id": site,
        "visitor_id": "visitor-1",
        "session_id": "session-1",
        "page_url": "https://shop.example/p?a=1&b=2",
        "referrer_url": "",  # document.referrer is "" for direct visits: means absent
        "duration_seconds": "15",
        "custom_data": '{"ab":"B","n":[1,2]}',
        "campaign_id": campaign.upper(),
        "client_ts": "2024-05-01T12:00:00Z",
        "_": "1714564800123",  # cache-buster: ignored
    }
    headers = {
        "User-Agent": UA,
        "Sec-CH-UA": '"Chromium";v="130", "Not?A_Brand";v="99"',
        "Sec-CH-UA-Mobile": "?0",
        "Sec-CH-UA-Platform": '"Linux"',
        "Accept-Language": "de-DE,de;q=0.9",
        "DNT": "1",
        "Sec-GPC": "1",
    }
    before = now_ms()
    async with http.get(collector.pixel_url, params=params, headers=headers) as r:
        body = await r.read()
        assert r.status == 200
        assert r.headers["Content-Type"] == "image/gif"
        assert "no-store" in r.headers["Cache-Control"] and "no-cache" in r.headers["Cache-Control"]
        assert r.headers["Pragma"] == "no-cache"
        assert r.headers["Expires"] == "0"
    after = now_ms()
    assert body == TRANSPARENT_GIF and len(body) == 43 and body.startswith(b"GIF89a") and body.endswith(b";")

    [rec] = await topic_records(kafka)
    env = rec.envelope
    assert rec.key == f"{site}:visitor-1".encode()
    assert rec.partition == zlib.crc32(rec.key) % PARTITIONS
    assert env["v"] == 1 and env["source"] == "pixel"
    assert uuid.UUID(env["id"]).version == 7
    assert before <= env["received_at"] <= after
    assert rec.timestamp == env["received_at"]
    assert env["ip"] == "127.0.0.1"
    assert env["ua"] == UA
    assert env["hints"] == {
        "sec-ch-ua": '"Chromium";v="130", "Not?A_Brand";v="99"',
        "sec-ch-ua-mobile": "?0",
        "sec-ch-ua-platform": '"Linux"',
        "accept-language": "de-DE,de;q=0.9",
        "dnt": True,
        "gpc": True,
    }
    assert env["event"] == {
        "site_id": site,
        "event_type": "pageview",
        "visitor_id": "visitor-1",
        "session_id": "session-1",
        "page_url": "https://shop.example/p?a=1&b=2",
        "duration_seconds": 15,
        "custom_data": {"ab": "B", "n": [1, 2]},
        "campaign_id": campaign,
        "client_ts": 1714564800000,
    }


@pytest.mark.parametrize(
    "content_type", ["application/json", "text/plain;charset=UTF-8", "Application/JSON; charset=utf-8", None]
)
async def test_beacon_hit_is_published(collector, http, kafka, content_type):
    site = new_id()
    event = {"site_id": site, "visitor_id": "v-7", "event_type": "click", "page_url": "https://shop.example/"}
    headers = {"User-Agent": UA, "Sec-GPC": "0"}
    skip = []
    if content_type is None:  # sendBeacon(url, arrayBuffer) sends no Content-Type at all
        skip = ["Content-Type"]
    else:
        headers["Content-Type"] = content_type
    async with http.post(collector.beacon_url, data=orjson.dumps(event), headers=headers, skip_auto_headers=skip) as r:
        assert r.status == 204, await r.text()
        assert await r.read() == b""
    [rec] = await topic_records(kafka)
    assert rec.key == f"{site}:v-7".encode()
    assert rec.envelope["source"] == "beacon"
    assert rec.envelope["ua"] == UA
    assert rec.envelope["hints"] == {"gpc": False}
    assert rec.envelope["event"] == {**event, "event_type": "click"}


async def test_client_event_id_is_the_envelope_id(collector, http, kafka):
    site, beacon_id, pixel_id = new_id(), new_id(), new_id()
    status, _, _ = await post(http, collector.beacon_url, {"site_id": site, "event_id": beacon_id.upper()})
    assert status == 204
    async with http.get(collector.pixel_url, params={"site_id": site, "event_id": pixel_id}) as r:
        assert r.status == 200
    records = await topic_records(kafka)
    assert sorted(r.envelope["id"] for r in records) == sorted([beacon_id, pixel_id])
    assert all("event_id" not in r.envelope["event"] for r in records)


async def test_batch_is_published_in_one_request(collector, http, kafka):
    site = new_id()
    batch = [beacon_event(site, visitor_id=f"v{i}") for i in range(5)]
    status, _, _ = await post(http, collector.beacon_url, {"batch": batch, "_": "1"})
    assert status == 204
    records = await topic_records(kafka)
    assert sorted(r.envelope["id"] for r in records) == sorted(e["event_id"] for e in batch)
    assert {r.key for r in records} == {f"{site}:v{i}".encode() for i in range(5)}


async def test_batch_with_bad_events_publishes_the_good_ones(collector, http, kafka):
    site = new_id()
    good = [beacon_event(site), beacon_event(site, event_type="scroll")]
    batch = [good[0], {"site_id": "nope", "event_id": new_id()}, good[1], {"site_id": site, "ip_address": "1.2.3.4"}, 7]
    status, _, doc = await post(http, collector.beacon_url, {"batch": batch})
    assert status == 200
    assert doc["accepted"] == 2
    assert [(r["index"], r["field"], r["reason"]) for r in doc["rejected"]] == [
        (1, "site_id", "invalid"),
        (3, "ip_address", "server_owned"),
        (4, None, "not_object"),
    ]
    assert all(r["error"] for r in doc["rejected"])
    records = await topic_records(kafka)
    assert sorted(r.envelope["id"] for r in records) == sorted(e["event_id"] for e in good)


async def test_batch_with_only_bad_events_is_400_and_publishes_nothing(collector, http, kafka):
    status, _, doc = await post(http, collector.beacon_url, {"batch": [{"site_id": "x"}, {"event_type": "a b"}]})
    assert status == 400
    assert doc["field"] == "site_id" and doc["accepted"] == 0
    assert [(r["index"], r["field"]) for r in doc["rejected"]] == [(0, "site_id"), (1, "event_type")]
    assert await topic_records(kafka) == []


async def test_cookieless_visitor_id(collector, http, kafka):
    site, other_site = new_id(), new_id()
    hits = [(site, UA), (site, UA), (site, UA + " other"), (other_site, UA)]
    for s, ua in hits:
        status, _, _ = await post(http, collector.beacon_url, {"site_id": s, "event_id": new_id()}, headers={"User-Agent": ua})
        assert status == 204
    records = await topic_records(kafka)
    by_id = {r.envelope["id"]: r for r in records}
    assert len(by_id) == 4
    ids = {}
    for r in records:
        env = r.envelope
        vid = env["event"]["visitor_id"]
        # The documented formula, recomputed independently.
        day = time.strftime("%Y-%m-%d", time.gmtime(env["received_at"] / 1000))
        msg = "\x1f".join([day, env["event"]["site_id"], env["ip"], env["ua"]]).encode()
        assert vid == "cl_" + hmac.new(SECRET.encode(), msg, hashlib.sha256).hexdigest()[:32]
        assert r.key == f"{env['event']['site_id']}:{vid}".encode()
        ids.setdefault((env["event"]["site_id"], env["ua"]), set()).add(vid)
    assert all(len(v) == 1 for v in ids.values())  # same site+IP+UA+day: same id
    assert len(set().union(*ids.values())) == 3  # other UA or other site: other id


def test_cookieless_id_rotates_daily():
    ids = CookielessIds("s")
    day = 1_714_521_600_000  # 2024-05-01T00:00:00Z
    a = ids.visitor_id(day + 1, "site", "1.2.3.4", "ua")
    assert a == ids.visitor_id(day + 86_399_999, "site", "1.2.3.4", "ua")
    assert a != ids.visitor_id(day + 86_400_000, "site", "1.2.3.4", "ua")
    assert a != CookielessIds("other secret").visitor_id(day + 1, "site", "1.2.3.4", "ua")
    assert a.startswith("cl_") and len(a) == 35
    assert ids.visitor_id(day, "site", None, None).startswith("cl_")


async def test_path_prefix_and_custom_paths(kafka, http):
    cfg = settings(path_prefix="/a1/", pixel_path="p.gif", beacon_path="/b")
    async with running_collector(cfg, kafka) as svc:
        assert svc.pixel_url.endswith("/a1/p.gif") and svc.beacon_url.endswith("/a1/b")
        site = new_id()
        async with http.get(svc.pixel_url, params={"site_id": site}) as r:
            assert r.status == 200
        status, _, _ = await post(http, svc.beacon_url, {"site_id": site})
        assert status == 204
        for path in ("/t.gif", "/collect", "/p.gif", "/a1/t.gif"):
            async with http.get(svc.base_url + path) as r:
                assert r.status == 404, path
        async with http.get(svc.base_url + "/healthz") as r:
            assert r.status == 200
    assert len(await topic_records(kafka)) == 2


async def test_send_events_helper_reports_acknowledged_events(collector, kafka):
    site = new_id()
    report = await send_events(collector.beacon_url, site, 300, concurrency=50)
    assert len(report.acked) == 300 and not report.refused and not report.failed
    records = await topic_records(kafka)
    ids = [r.envelope["id"] for r in records]
    assert sorted(ids) == sorted(report.acked)  # each exactly once
    for r in records:  # one visitor's events share a partition
        assert r.partition == zlib.crc32(r.key) % PARTITIONS


# --------------------------------------------------------------------------- client errors


SITE = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


def _j(doc: Any) -> bytes:
    return orjson.dumps(doc)


CLIENT_ERRORS = [
    # (id, method, path ("beacon"/"pixel"/literal), kwargs, status, field)
    ("malformed-json", "POST", "beacon", {"data": b'{"site_id": '}, 400, None),
    ("empty-body", "POST", "beacon", {"data": b""}, 400, None),
    ("json-array", "POST", "beacon", {"data": b"[]"}, 400, None),
    ("invalid-field", "POST", "beacon", {"data": _j({"site_id": "x"})}, 400, "site_id"),
    ("missing-site", "POST", "beacon", {"data": _j({"page_url": "https://a/"})}, 400, "site_id"),
    ("unknown-field", "POST", "beacon", {"data": _j({"site_id": SITE, "colour": "red"})}, 400, "colour"),
    ("server-owned", "POST", "beacon", {"data": _j({"site_id": SITE, "country": "DE"})}, 400, "country"),
    ("bad-duration", "POST", "beacon", {"data": _j({"site_id": SITE, "duration_seconds": -5})}, 400, "duration_seconds"),
    ("batch-not-list", "POST", "beacon", {"data": _j({"batch": {"site_id": SITE}})}, 400, "batch"),
    ("batch-empty", "POST", "beacon", {"data": _j({"batch": []})}, 400, "batch"),
    ("batch-extra-key", "POST", "beacon", {"data": _j({"batch": [{"site_id": SITE}], "site_id": SITE})}, 400, "site_id"),
    ("too-many-events", "POST", "beacon", {"data": _j({"batch": [{"site_id": SITE}] * 6})}, 413, "batch"),
    ("body-too-large", "POST", "beacon", {"data": _j({"site_id": SITE, "page_url": "x" * 2000})}, 413, None),
    ("xml", "POST", "beacon", {"data": b"<e/>", "headers": {"Content-Type": "application/xml"}}, 415, None),
    ("form", "POST", "beacon", {"data": b"site_id=1", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415, None),
    ("octet-stream", "POST", "beacon", {"data": b"{}", "headers": {"Content-Type": "application/octet-stream"}}, 415, None),
    ("pixel-invalid", "GET", "pixel", {"params": {"site_id": "nope"}}, 400, "site_id"),
    ("pixel-missing-site", "GET", "pixel", {}, 400, "site_id"),
    ("pixel-server-owned", "GET", "pixel", {"params": {"site_id": SITE, "user_agent": "x"}}, 400, "user_agent"),
    ("pixel-repeated", "GET", "pixel?site_id=" + SITE + "&site_id=" + SITE, {}, 400, "site_id"),
    ("pixel-bad-custom-data", "GET", "pixel", {"params": {"site_id": SITE, "custom_data": "[1]"}}, 400, "custom_data"),
    ("unknown-path", "GET", "/nope", {}, 404, None),
    ("pixel-subpath", "GET", "/t.gif/x", {}, 404, None),
    ("trailing-slash", "POST", "/collect/", {"data": b"{}"}, 404, None),
    ("put-beacon", "PUT", "beacon", {"data": b"{}"}, 405, None),
    ("delete-beacon", "DELETE", "beacon", {}, 405, None),
    ("get-beacon", "GET", "beacon", {}, 405, None),
    ("post-pixel", "POST", "pixel", {"data": b"{}"}, 405, None),
    ("head-pixel", "HEAD", "pixel", {}, 405, None),
    ("post-healthz", "POST", "/healthz", {}, 405, None),
]


@pytest.fixture
async def strict_collector(kafka):
    async with running_collector(settings(max_body_bytes=1024, max_batch_events=5), kafka) as svc:
        yield svc


def _url(svc, path: str) -> str:
    if path.startswith("beacon"):
        return svc.beacon_url + path[len("beacon"):]
    if path.startswith("pixel"):
        return svc.pixel_url + path[len("pixel"):]
    return svc.base_url + path


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    [case[1:] for case in CLIENT_ERRORS],
    ids=[case[0] for case in CLIENT_ERRORS],
)
async def test_client_errors(strict_collector, http, kafka, method, path, kwargs, status, field):
    kwargs = dict(kwargs)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    async with http.request(method, _url(strict_collector, path), headers=headers, **kwargs) as r:
        body = await r.read()
        assert r.status == status, body
        if method == "HEAD":
            return
        assert r.content_type == "application/json"
        doc = orjson.loads(body)
        assert isinstance(doc["error"], str) and doc["error"]
        assert doc["field"] == field
        if status == 405:
            assert r.headers["Allow"]
    assert await topic_records(kafka) == []


async def test_chunked_body_over_the_limit_is_413(strict_collector, http, kafka):
    async def chunks():
        yield b'{"site_id": "' + SITE.encode() + b'", "page_url": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    async with http.post(strict_collector.beacon_url, data=chunks(), headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
        assert orjson.loads(await r.read())["field"] is None
    assert await topic_records(kafka) == []


async def test_batch_at_the_limit_is_accepted(strict_collector, http, kafka):
    batch = [beacon_event(SITE) for _ in range(5)]
    status, _, _ = await post(http, strict_collector.beacon_url, {"batch": batch})
    assert status == 204
    assert len(await topic_records(kafka)) == 5


def _hostile_bodies() -> list[bytes]:
    rnd = random.Random(20240501)
    s = SITE.encode()
    bodies = [rnd.randbytes(rnd.randint(1, 4000)) for _ in range(20)]
    bodies += [
        b"\xff\xfe\xfd",
        b'{"site_id": "\xff\xfe"}',
        b'{"site_id": "' + s + b'", "page_url": "\xed\xa0\x80"}',  # UTF-8-encoded surrogate
        b"\x00" * 100,
        b'{"site_id": "' + s + b'\x00"}',
        b"\xef\xbb\xbf" + _j({"site_id": SITE}),  # BOM
        b"[" * 30000 + b"]" * 30000,
        b'{"a":' * 10000 + b"1" + b"}" * 10000,
        b'{"site_id": "' + s + b'", "custom_data": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
        b'{"site_id": "' + s + b'", "custom_data": "' + b"[" * 5000 + b'"}',
        b'{"site_id": "' + s + b'", "duration_seconds": 1e999}',
        b'{"site_id": "' + s + b'", "duration_seconds": 123456789012345678901234567890}',
        b'{"site_id": "' + s + b'", "duration_seconds": -1e308}',
        b'{"site_id": "' + s + b'", "client_ts": -99999999999999999999999999}',
        b'{"site_id": "' + s + b'", "client_ts": "99999-99-99T99:99:99"}',
        b'{"site_id": "' + s + b'", "page_url": "a\\u0000b"}',
        b'{"site_id": "' + s + b'", "page_url": "\\ud800"}',
        b'{"site_id": "' + s + b'", "custom_data": {"a": "\\u0000"}}',
        b'{"site_id": "' + s + b'", "custom_data": "{\\"a\\": \\"\\\\u0000\\"}"}',
        b'{"site_id": "' + s + b'", "visitor_id": {"$gt": ""}}',
        b'{"' + b"k" * 50000 + b'": 1}',
        b'{"batch": [1, "x", null, [], {}, true]}',
        b'{"batch": null}',
        b'{"site_id": 1e999}',
        b"NaN", b"Infinity", b"null", b"true", b'"str"', b"1e999", b"-0", b"{}", b'{"batch": [[[[[]]]]]}',
    ]
    return bodies


async def test_hostile_bodies_never_cause_5xx(collector, http, kafka):
    for body in _hostile_bodies():
        for ctype in ("application/json", "text/plain"):
            async with http.post(collector.beacon_url, data=body, headers={"Content-Type": ctype}) as r:
                payload = await r.read()
                assert 400 <= r.status < 500, (body[:80], r.status, payload[:200])
                doc = orjson.loads(payload)
                assert "error" in doc and "field" in doc
    hostile_queries = [
        "site_id=%ff%fe", "site_id=%00", f"site_id={SITE}&page_url=%00",
        f"site_id={SITE}&custom_data=" + "%5B" * 3000, f"site_id={SITE}&custom_data=%7B%22a%22%3A%22%5Cu0000%22%7D",
        f"site_id={SITE}&duration_seconds=99999999999999999999", f"site_id={SITE}&client_ts=%ed%a0%80",
        f"site_id={SITE}&duration_seconds=%EF%BC%91",  # fullwidth digit one
        f"site_id={SITE}&visitor_id=" + "v" * 200, "%ff=1", "=", "&&&", "site_id", f"site_id={SITE}&id=1",
    ]
    for query in hostile_queries:
        async with http.get(collector.pixel_url + "?" + query) as r:
            assert 400 <= r.status < 500, (query[:80], r.status)
    samples = await metrics(http, collector)
    assert not [k for k in samples if k[0] == "collector_requests_total" and dict(k[1])["status"].startswith("5")]
    assert await topic_records(kafka) == []
    async with http.get(collector.base_url + "/healthz") as r:
        assert r.status == 200


async def test_hostile_headers_are_sanitised(kafka, http):
    cfg = settings(trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")])
    async with running_collector(cfg, kafka) as svc:
        site, event_id = new_id(), new_id()
        body = _j({"site_id": site, "event_id": event_id})
        path = svc.beacon_url.split("//", 1)[1].split("/", 1)[1]
        request = (
            b"POST /" + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: text/plain\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
            b"User-Agent: Moz\xff\xfeilla/5.0\r\n"
            b"Origin: https://\xc3\xa9\xff.example\r\n"
            b"Sec-CH-UA: \"Brand\xff\";v=\"1\"\r\n"
            b"Accept-Language: " + b"de," * 2000 + b"\r\n"  # < aiohttp's 8190-byte line limit
            b"Forwarded: for=\xff\xfe;;;===,,for=\"[::1\r\n"
            b"X-Forwarded-For: \xff, 1.2.3.4.5, [::1]:x, ::ffff:\r\n"
            b"DNT: \xff\r\n"
            b"\r\n" + body
        )
        status, headers, _ = await raw_request(svc.base_url, request)
        assert status == 204
        assert "access-control-allow-origin" not in headers  # never echo a non-ASCII origin
        assert headers.get("vary") == "Origin"
        [rec] = await topic_records(kafka)
        env = rec.envelope
        assert env["id"] == event_id
        assert env["ua"] == "Moz??illa/5.0"
        assert env["hints"]["sec-ch-ua"] == '"Brand?";v="1"'
        assert len(env["hints"]["accept-language"]) == 512
        assert env["hints"]["dnt"] is False
        assert env["ip"] == "127.0.0.1"  # garbage chains fall back to the trusted peer


async def test_unexpected_exception_is_a_logged_500(collector, http, caplog):
    publisher = collector.publisher

    async def broken(records, timestamp_ms):
        raise RuntimeError("simulated bug")

    publisher.publish = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="ingest.app"):
        status, _, doc = await post(http, collector.beacon_url, {"site_id": SITE})
    assert status == 500
    assert doc == {"error": "internal error", "field": None}
    [record] = [r for r in caplog.records if r.name == "ingest.app"]
    assert record.getMessage() == "collector.unhandled_error" and record.exc_info[0] is RuntimeError


# --------------------------------------------------------------------------- CORS


@pytest.mark.parametrize("which", ["beacon_url", "pixel_url"])
async def test_cors_preflight(collector, http, which):
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(getattr(collector, which), headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "content-type" in r.headers["Access-Control-Allow-Headers"].lower()
        assert int(r.headers["Access-Control-Max-Age"]) > 0
        assert r.headers["Vary"] == "Origin"


async def test_cors_on_actual_requests(collector, http):
    site = new_id()
    status, headers, _ = await post(http, collector.beacon_url, {"site_id": site}, headers={"Origin": ORIGIN})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert headers["Vary"] == "Origin"
    # The snippet reads Retry-After of a 503 (the browser hides it unless exposed).
    assert headers["Access-Control-Expose-Headers"] == "Retry-After"
    # Errors carry CORS headers too, so page scripts can read them.
    status, headers, _ = await post(http, collector.beacon_url, {"site_id": "x"}, headers={"Origin": "null"})
    assert status == 400 and headers["Access-Control-Allow-Origin"] == "null"
    async with http.get(collector.pixel_url, params={"site_id": site}, headers={"Origin": ORIGIN}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    # No Origin: nothing to echo, but caches must still key on it.
    status, headers, _ = await post(http, collector.beacon_url, {"site_id": site})
    assert status == 204 and "Access-Control-Allow-Origin" not in headers and headers["Vary"] == "Origin"
    # Ops endpoints are not for browsers.
    async with http.get(collector.base_url + "/metrics", headers={"Origin": ORIGIN}) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


# --------------------------------------------------------------------------- client IP


async def _ips_for(svc, http, kafka, cases: list[tuple[Any, str]]) -> None:
    """POST one event per header set and check the client IP each envelope got."""
    site = new_id()
    expected = {}
    for headers, ip in cases:
        event_id = new_id()
        expected[event_id] = ip
        status, _, _ = await post(http, svc.beacon_url, {"site_id": site, "event_id": event_id}, headers=headers)
        assert status == 204
    got = {r.envelope["id"]: r.envelope["ip"] for r in await topic_records(kafka)}
    assert got == expected


async def test_untrusted_peer_headers_are_ignored(kafka, http):
    async with running_collector(settings(trusted_proxies=[ipaddress.ip_network("10.0.0.0/8")]), kafka) as svc:
        await _ips_for(svc, http, kafka, [
            ({}, "127.0.0.1"),
            ({"X-Forwarded-For": "203.0.113.7"}, "127.0.0.1"),
            ({"Forwarded": "for=203.0.113.8"}, "127.0.0.1"),
        ])


async def test_default_trusts_no_proxy(collector, http, kafka):
    await _ips_for(collector, http, kafka, [({"X-Forwarded-For": "203.0.113.7", "Forwarded": "for=1.1.1.1"}, "127.0.0.1")])


async def test_trusted_peer_headers_are_honoured(kafka, http):
    cfg = settings(trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")])
    async with running_collector(cfg, kafka) as svc:
        await _ips_for(svc, http, kafka, [
            ({}, "127.0.0.1"),
            ({"X-Forwarded-For": "203.0.113.7"}, "203.0.113.7"),
            # The client wrote the left part itself: only the rightmost untrusted counts.
            ({"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}, "203.0.113.7"),
            (CIMultiDict([("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9")]), "203.0.113.9"),
            ({"X-Forwarded-For": "203.0.113.7:5555"}, "203.0.113.7"),
            ({"X-Forwarded-For": "::ffff:203.0.113.7"}, "203.0.113.7"),
            ({"X-Forwarded-For": "2001:db8::5"}, "2001:db8::5"),
            ({"Forwarded": "for=192.0.2.60;proto=http;by=203.0.113.43"}, "192.0.2.60"),
            # Forwarded wins over X-Forwarded-For.
            ({"Forwarded": 'for="[2001:db8:cafe::17]:4711"', "X-Forwarded-For": "203.0.113.7"}, "2001:db8:cafe::17"),
            # A Forwarded without any for= falls back to X-Forwarded-For.
            ({"Forwarded": "proto=https", "X-Forwarded-For": "203.0.113.9"}, "203.0.113.9"),
            # Undisclosed / garbage hops stop the walk at the last verified address.
            ({"Forwarded": "for=unknown"}, "127.0.0.1"),
            ({"Forwarded": "for=_hidden, for=203.0.113.1"}, "203.0.113.1"),
            ({"X-Forwarded-For": "garbage"}, "127.0.0.1"),
            ({"X-Forwarded-For": ""}, "127.0.0.1"),
        ])


async def test_proxy_chain_is_walked_from_the_right(kafka, http):
    trusted = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")]
    async with running_collector(settings(trusted_proxies=trusted), kafka) as svc:
        await _ips_for(svc, http, kafka, [
            ({"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 10.1.1.1, 10.2.2.2"}, "203.0.113.7"),
            ({"X-Forwarded-For": "10.1.1.1, 10.2.2.2"}, "10.1.1.1"),  # all internal: leftmost
            ({"X-Forwarded-For": "203.0.113.7, unknown, 10.2.2.2"}, "10.2.2.2"),
            ({"Forwarded": "for=198.51.100.1, for=203.0.113.7, for=10.0.0.5"}, "203.0.113.7"),
            ({"Forwarded": "for=198.51.100.1, garbage, for=10.0.0.5"}, "10.0.0.5"),
            ({"Forwarded": "for=198.51.100.1, for=10.0.0.5, garbage"}, "127.0.0.1"),
        ])


def test_client_ip_resolver_unit():
    r = ClientIPResolver([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")])
    assert r.resolve(None) is None
    assert r.resolve("203.0.113.1", None, ["1.1.1.1"]) == "203.0.113.1"
    assert r.resolve("::ffff:203.0.113.1") == "203.0.113.1"
    assert r.resolve("/tmp/sock") == "/tmp/sock"
    assert r.resolve("10.0.0.1", None, ["1.1.1.1, 2.2.2.2"]) == "2.2.2.2"
    assert r.resolve("2001:db8::1", [{"for": "[2001:db8::2]"}, {"for": "198.51.100.3:80"}]) == "198.51.100.3"
    assert r.resolve("10.0.0.1", [{"for": "1.1.1.1"}, {"proto": "https"}]) == "10.0.0.1"  # undisclosed hop
    assert r.resolve("10.0.0.1", [{"proto": "https"}, {"for": "1.1.1.1"}]) == "1.1.1.1"
    assert r.resolve("10.0.0.1", [], []) == "10.0.0.1"
    chain = ["10.0.0.9"] * (MAX_HOPS + 10) + ["10.0.0.2"]
    assert r.resolve("10.0.0.1", None, [", ".join(["1.1.1.1"] + chain)]) == "10.0.0.9"  # bounded walk
    for raw, want in [
        ("1.2.3.4", "1.2.3.4"), (" 1.2.3.4 ", "1.2.3.4"), ('"1.2.3.4"', "1.2.3.4"), ("1.2.3.4:80", "1.2.3.4"),
        ("[::1]", "::1"), ("[::1]:80", "::1"), ("::1", "::1"), ("::ffff:1.2.3.4", "1.2.3.4"),
        ("unknown", None), ("_hidden", None), ("", None), ("[::1", None), ("1.2.3.4.5", None), ("x" * 5000, None),
    ]:
        ip = parse_hop(raw)
        assert (str(ip) if ip else None) == want, raw


# --------------------------------------------------------------------------- ops endpoints


async def test_health_ready_and_metrics(collector, http):
    async with http.get(collector.base_url + "/healthz") as r:
        assert r.status == 200 and orjson.loads(await r.read()) == {"status": "ok"}
    async with http.get(collector.base_url + "/readyz") as r:
        assert r.status == 200 and orjson.loads(await r.read()) == {"status": "ready"}
    site = new_id()
    async with http.get(collector.pixel_url, params={"site_id": site}) as r:
        assert r.status == 200
    async with http.get(collector.pixel_url, params={"site_id": "bad"}) as r:
        assert r.status == 400
    status, _, _ = await post(http, collector.beacon_url, {"batch": [{"site_id": site}, {"site_id": site}]})
    assert status == 204
    async with http.get(collector.base_url + "/nope/" + "x" * 50) as r:
        assert r.status == 404

    async with http.get(collector.base_url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    m = metric_samples(text)

    def req(route: str, status: int) -> float:
        return m.get(("collector_requests_total", (("route", route), ("status", str(status)))), 0.0)

    assert req("pixel", 200) == 1 and req("pixel", 400) == 1 and req("beacon", 204) == 1
    assert req("healthz", 200) == 1 and req("readyz", 200) == 1 and req("unmatched", 404) == 1
    assert "x" * 50 not in text  # raw paths never become labels
    assert m[("collector_events_accepted_total", (("source", "pixel"),))] == 1
    assert m[("collector_events_accepted_total", (("source", "beacon"),))] == 2
    assert m[("collector_events_rejected_total", (("reason", "invalid"),))] == 1
    assert m[("collector_publish_latency_seconds_count", ())] == 2
    assert m[("collector_inflight_events", ())] == 0
    assert m[("collector_inflight_bytes", ())] == 0
    assert m[("collector_producer_started", ())] == 1
    assert ("process_resident_memory_bytes", ()) in m


async def test_each_app_has_its_own_registry(collector, http, kafka):
    async with http.get(collector.pixel_url, params={"site_id": SITE}) as r:
        assert r.status == 200
    async with running_collector(settings(), kafka) as other:
        m = await metrics(http, other)
        assert ("collector_events_accepted_total", (("source", "pixel"),)) not in m
    m = await metrics(http, collector)
    assert m[("collector_events_accepted_total", (("source", "pixel"),))] == 1


# --------------------------------------------------------------------------- Kafka trouble


async def test_kafka_unreachable_answers_503(http):
    dead = KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", events_topic="never-created")
    cfg = settings(publish_timeout_s=2.0, retry_after_s=7)
    async with running_collector(cfg, dead) as svc:  # the app starts anyway
        async with http.get(svc.base_url + "/healthz") as r:
            assert r.status == 200
        started = time.monotonic()
        async with http.get(svc.base_url + "/readyz") as r:
            assert r.status == 503
            assert orjson.loads(await r.read())["producer_started"] is False
        async with http.get(svc.pixel_url, params={"site_id": SITE}) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "7"
            doc = orjson.loads(await r.read())
            assert doc["reason"] == "kafka_not_ready" and doc["retry_after"] == 7 and doc["error"]
        status, headers, doc = await post(http, svc.beacon_url, {"site_id": SITE})
        assert status == 503 and headers["Retry-After"] == "7" and doc["reason"] == "kafka_not_ready"
        report = await send_events(svc.beacon_url, SITE, 10)
        assert not report.acked and set(report.refused.values()) == {503}
        assert set(report.retry_after.values()) == {"7"}
        assert time.monotonic() - started < cfg.publish_timeout_s + 2
        m = await metrics(http, svc)
        assert m[("collector_events_rejected_total", (("reason", "kafka_not_ready"),))] == 12
        assert m[("collector_producer_started", ())] == 0


async def test_ack_timeout_answers_503_and_keeps_the_budget_until_settled(kafka, http):
    cfg = settings(publish_timeout_s=0.5, retry_after_s=3)
    async with running_collector(cfg, kafka, producer_factory=gated_factory(cfg, kafka)) as svc:
        publisher = svc.publisher
        producer: GatedProducer = publisher.producer
        producer.hold()
        event = beacon_event(SITE)
        started = time.monotonic()
        status, headers, doc = await post(http, svc.beacon_url, event)
        elapsed = time.monotonic() - started
        assert status == 503 and headers["Retry-After"] == "3" and doc["reason"] == "publish_timeout"
        assert 0.45 <= elapsed < 3.0
        # The record is already in a producer batch: its bytes stay budgeted until the
        # ack (shielded), otherwise an outage would grow memory without bound.
        assert publisher.inflight_events == 1 and publisher.inflight_bytes > 0
        producer.release()
        await eventually(lambda: publisher.inflight_events == 0, "the held ack to settle")
        assert publisher.inflight_bytes == 0
        # At-least-once: the timed-out event did reach Kafka; a client retry with the
        # same event_id is de-duplicated downstream.
        [rec] = await topic_records(kafka)
        assert rec.envelope["id"] == event["event_id"]
        status, _, _ = await post(http, svc.beacon_url, beacon_event(SITE))
        assert status == 204


async def test_full_producer_queue_answers_503_at_once(kafka, http):
    # librdkafka's own queue is a second guard behind the byte budget: when it is full,
    # produce() refuses at once and so does the collector, leaking nothing.
    cfg = settings(publish_timeout_s=1.0)

    def factory() -> RdKafkaProducer:
        # One queued record fills it; a long linger keeps that record queued.
        return RdKafkaProducer({**producer_options(cfg, kafka), "queue.buffering.max.messages": 1, "linger.ms": 5000})

    async with running_collector(cfg, kafka, producer_factory=factory) as svc:
        publisher = svc.publisher
        first = asyncio.create_task(post(http, svc.beacon_url, beacon_event(SITE)))
        await eventually(lambda: publisher.inflight_events == 1, "the first record to be queued")
        started = time.monotonic()
        status, headers, doc = await post(http, svc.beacon_url, beacon_event(SITE))
        assert status == 503 and doc["reason"] == "backpressure" and headers["Retry-After"] == "5"
        assert time.monotonic() - started < 0.5
        assert publisher.inflight_events == 1  # the refused record was never budgeted
        status, _, doc = await first  # still lingering at its deadline
        assert status == 503 and doc["reason"] == "publish_timeout"


async def test_cancelled_publish_is_not_a_timeout(kafka):
    cfg = settings(publish_timeout_s=10.0)
    async with running_collector(cfg, kafka, producer_factory=gated_factory(cfg, kafka)) as svc:
        publisher = svc.publisher
        publisher.producer.hold()
        task = asyncio.create_task(publisher.publish([(b"k", b"{}")], now_ms()))
        await eventually(lambda: publisher.inflight_events == 1, "the record to be in flight")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert publisher.inflight_events == 1  # still owned by the (shielded) delivery future
        publisher.producer.release()
        await eventually(lambda: publisher.inflight_events == 0 and publisher.inflight_bytes == 0, "settling")


async def test_inflight_budget_exhausted_answers_503_at_once(kafka, http):
    cfg = settings(max_inflight_bytes=1000, publish_timeout_s=10.0)
    async with running_collector(cfg, kafka, producer_factory=gated_factory(cfg, kafka)) as svc:
        publisher = svc.publisher
        producer: GatedProducer = publisher.producer
        producer.hold()
        first = beacon_event(SITE)
        pending = asyncio.create_task(post(http, svc.beacon_url, first))
        await eventually(lambda: publisher.inflight_events == 1, "the first event to be in flight")
        one_event = publisher.inflight_bytes
        assert 0 < one_event <= 1000 < 2 * one_event  # the premise of this test

        refused = beacon_event(SITE)
        started = time.monotonic()
        status, headers, doc = await post(http, svc.beacon_url, refused)
        assert status == 503 and doc["reason"] == "backpressure" and headers["Retry-After"] == "5"
        assert time.monotonic() - started < 1.0  # refused at once, not after a timeout
        assert publisher.inflight_bytes == one_event  # nothing queued for the refused one
        assert not pending.done()

        producer.release()
        status, _, _ = await asyncio.wait_for(pending, 10)
        assert status == 204
        await eventually(lambda: publisher.inflight_bytes == 0, "the budget to drain")
        last = beacon_event(SITE)
        status, _, _ = await post(http, svc.beacon_url, last)
        assert status == 204
        ids = sorted(r.envelope["id"] for r in await topic_records(kafka))
        assert ids == sorted([first["event_id"], last["event_id"]])
        m = await metrics(http, svc)
        assert m[("collector_events_rejected_total", (("reason", "backpressure"),))] == 1


async def test_producer_error_answers_503(kafka, http):
    cfg = settings()
    async with running_collector(cfg, kafka, producer_factory=gated_factory(cfg, kafka)) as svc:
        publisher = svc.publisher
        publisher.producer.fail_with = KafkaException(KafkaError(KafkaError._TRANSPORT, "simulated: broker lost"))
        status, headers, doc = await post(http, svc.beacon_url, {"batch": [beacon_event(SITE), beacon_event(SITE)]})
        assert status == 503 and doc["reason"] == "kafka_error" and headers["Retry-After"] == "5"
        assert publisher.inflight_bytes == 0 and publisher.inflight_events == 0  # nothing leaked
        publisher.producer.fail_with = None
        status, _, _ = await post(http, svc.beacon_url, beacon_event(SITE))
        assert status == 204
        assert len(await topic_records(kafka)) == 1


async def test_readyz_is_503_when_brokers_stop_answering(collector, http):
    producer = collector.publisher.producer
    original = producer.metadata

    async def hang(timeout_s: float):
        await asyncio.Event().wait()

    producer.metadata = hang
    try:
        started = time.monotonic()
        async with http.get(collector.base_url + "/readyz") as r:
            assert r.status == 503
        assert time.monotonic() - started < 2.5  # bounded by the ~1 s probe timeout
    finally:
        producer.metadata = original
    # The stuck probe is abandoned after PROBE_MAX_S; readiness then recovers by itself.
    deadline = time.monotonic() + PROBE_MAX_S + 5
    while True:
        async with http.get(collector.base_url + "/readyz") as r:
            if r.status == 200:
                break
        assert time.monotonic() < deadline, "readiness never recovered"
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_lets_in_flight_requests_finish(kafka, http):
    cfg = settings(publish_timeout_s=10.0)
    app = create_app(cfg, kafka, producer_factory=gated_factory(cfg, kafka))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    publisher = app[PUBLISHER]
    producer: GatedProducer = publisher.producer
    producer.hold()
    event = beacon_event(SITE)
    pending = asyncio.create_task(post(http, f"http://127.0.0.1:{port}/collect", event))
    await eventually(lambda: publisher.inflight_events == 1, "the event to be in flight")

    cleanup = asyncio.create_task(runner.cleanup())

    def refused() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    await eventually(refused, "the listener to close")
    assert not pending.done() and not cleanup.done()
    producer.release()
    status, _, _ = await asyncio.wait_for(pending, 10)
    assert status == 204
    await asyncio.wait_for(cleanup, 15)
    assert publisher.producer is None  # flushed and stopped
    [rec] = await topic_records(kafka)
    assert rec.envelope["id"] == event["event_id"]


class UncheckedProducer(RdKafkaProducer):
    """Starts without waiting for a broker's answer."""

    async def start(self, timeout_s: float) -> None:
        self.open()


async def test_producer_flush_on_shutdown_is_bounded(kafka, http, caplog):
    # A "broker" that accepts connections and never answers: records stay queued, and
    # librdkafka would retry them for message.timeout.ms. Shutdown must not wait that long.
    async def silent(reader, writer):
        await reader.read()  # until the client goes away
        writer.close()

    blackhole = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = "127.0.0.1:%d" % blackhole.sockets[0].getsockname()[1]
    cfg = settings(shutdown_timeout_s=0.5, publish_timeout_s=0.3)
    factory = lambda: UncheckedProducer({**producer_options(cfg, kafka), "bootstrap.servers": address})  # noqa: E731
    app = create_app(cfg, kafka, producer_factory=factory)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    publisher = app[PUBLISHER]
    try:
        status, _, doc = await post(http, f"http://127.0.0.1:{runner.addresses[0][1]}/collect", beacon_event(SITE))
        assert status == 503 and doc["reason"] == "publish_timeout"
        assert publisher.inflight_events == 1  # still queued in librdkafka
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="ingest.publisher"):
            await asyncio.wait_for(runner.cleanup(), 10)
        assert time.monotonic() - started < 3
        assert any(r.getMessage() == "collector.kafka_flush_timeout" for r in caplog.records)
        assert publisher.producer is None
        # Purged on the way out: the record got its (failed) report, so nothing is
        # left budgeted.
        assert publisher.inflight_events == 0 and publisher.inflight_bytes == 0
    finally:
        blackhole.close()


def test_throttle_filter_limits_repeated_records():
    from ingest.logs import ThrottleFilter

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, msg, None, None)

    slow = ThrottleFilter(interval_s=3600)
    assert slow.filter(record("Error handling request from %s"))
    assert not slow.filter(record("Error handling request from %s"))
    assert not slow.filter(record("Error handling request from %s"))
    assert slow.filter(record("another message"))
    fast = ThrottleFilter(interval_s=0)
    assert fast.filter(record("x")) and fast.filter(r := record("x")) and r.suppressed == 0


async def test_run_serves_until_sigterm_and_exits_0(kafka, http):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "COLLECTOR_HOST": "127.0.0.1",
        "COLLECTOR_PORT": str(port),
        "KAFKA_BOOTSTRAP": kafka.bootstrap,
        "EVENTS_TOPIC": kafka.events_topic,
    }
    code = (
        "from pipeline import settings as s; from ingest import run; "
        "run(s.load(s.CollectorSettings), s.load(s.KafkaSettings))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, cwd=str(PROJECT_ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.returncode is None, "collector exited early"
            try:
                async with http.get(base + "/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "collector never became ready"
            await asyncio.sleep(0.05)
        event = beacon_event(SITE)
        status, _, _ = await post(http, base + "/collect", event)
        assert status == 204
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [orjson.loads(line) for line in (await proc.stderr.read()).splitlines() if line.startswith(b"{")]
    events = [line["event"] for line in lines]
    assert events[-5:] == [
        "collector.kafka_connected", "collector.started", "collector.stopping",
        "collector.kafka_flushed", "collector.stopped",
    ], events
    assert next(line for line in lines if line["event"] == "collector.stopping")["signal"] == "SIGTERM"
    assert all({"ts", "level", "logger", "event"} <= line.keys() for line in lines)
    [rec] = await topic_records(kafka)
    assert rec.envelope["id"] == event["event_id"]
