"""Unit tests of the pure event validation and the envelope (schemas/event.py)."""

from __future__ import annotations

import uuid

import orjson
import pytest

from schemas import event as ev
from schemas.event import EnvelopeError, EventError, validate_event

SITE = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"


def ok(**fields):
    return validate_event({"site_id": SITE, **fields})


def err(raw) -> EventError:
    with pytest.raises(EventError) as info:
        validate_event(raw)
    return info.value


def bad(**fields) -> EventError:
    return err({"site_id": SITE, **fields})


# --------------------------------------------------------------------------- basics


def test_minimal_event_gets_default_event_type():
    assert validate_event({"site_id": SITE}) == {"site_id": SITE, "event_type": "pageview"}


def test_full_event_is_normalised():
    raw = {
        "site_id": SITE.upper(),
        "event_type": "signup:form.submit-1",
        "visitor_id": "v-123",
        "session_id": "s-456",
        "page_url": "https://example.com/p?q=1",
        "referrer_url": "https://ref.example/",
        "duration_seconds": "42",
        "custom_data": '{"plan": "pro", "n": [1, 2]}',
        "campaign_id": "0190A1B2C3D47E5F8A9B0C1D2E3F4A5B",
        "lead_id": str(uuid.UUID(int=1)),
        "experiment_id": str(uuid.UUID(int=2)),
        "segment_id": str(uuid.UUID(int=3)),
        "event_id": "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5C",
        "client_ts": "2024-05-01T12:00:00Z",
    }
    out = validate_event(raw)
    assert out == {
        "site_id": SITE,
        "event_type": "signup:form.submit-1",
        "visitor_id": "v-123",
        "session_id": "s-456",
        "page_url": "https://example.com/p?q=1",
        "referrer_url": "https://ref.example/",
        "duration_seconds": 42,
        "custom_data": {"plan": "pro", "n": [1, 2]},
        "campaign_id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "lead_id": "00000000-0000-0000-0000-000000000001",
        "experiment_id": "00000000-0000-0000-0000-000000000002",
        "segment_id": "00000000-0000-0000-0000-000000000003",
        "event_id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c",
        "client_ts": 1714564800000,
    }
    # Idempotent: the worker may validate again what the collector produced.
    assert validate_event(out) == out


def test_input_is_not_modified():
    raw = {"site_id": SITE.upper(), "duration_seconds": "3"}
    validate_event(raw)
    assert raw == {"site_id": SITE.upper(), "duration_seconds": "3"}


@pytest.mark.parametrize("raw", [None, [], "x", 1, [{"site_id": SITE}]])
def test_event_must_be_an_object(raw):
    e = err(raw)
    assert (e.field, e.reason) == (None, "not_object")


def test_mapping_input_is_accepted():
    from types import MappingProxyType

    assert validate_event(MappingProxyType({"site_id": SITE}))["site_id"] == SITE


# --------------------------------------------------------------------------- absent values


@pytest.mark.parametrize("empty", [None, ""])
def test_null_and_empty_mean_absent(empty):
    out = ok(visitor_id=empty, referrer_url=empty, duration_seconds=empty, custom_data=empty, campaign_id=empty)
    assert out == {"site_id": SITE, "event_type": "pageview"}


@pytest.mark.parametrize("raw", [{}, {"site_id": ""}, {"site_id": None}, {"event_type": "x"}])
def test_site_id_is_required(raw):
    e = err(raw)
    assert (e.field, e.reason) == ("site_id", "missing")


def test_empty_event_type_falls_back_to_default():
    assert ok(event_type="")["event_type"] == "pageview"


# --------------------------------------------------------------------------- unknown / reserved keys


@pytest.mark.parametrize("name", sorted(ev.SERVER_OWNED_FIELDS))
def test_server_owned_fields_are_rejected(name):
    e = bad(**{name: "x"})
    assert (e.field, e.reason) == (name, "server_owned")
    assert "collector" in e.message


@pytest.mark.parametrize("name", ["foo", "siteId", "Site_id", "batch", "ip"])
def test_unknown_fields_are_rejected_by_name(name):
    e = bad(**{name: "x"})
    assert (e.field, e.reason) == (name, "unknown_field")


def test_underscore_keys_are_ignored():
    assert ok(_="1700000000", _cb={"anything": [1]}, __x=None) == {"site_id": SITE, "event_type": "pageview"}


def test_as_dict_names_the_field():
    assert bad(page_url=1).as_dict() == {"error": "must be a string", "field": "page_url", "reason": "invalid"}


# --------------------------------------------------------------------------- UUIDs


@pytest.mark.parametrize("name", ["site_id", "campaign_id", "lead_id", "experiment_id", "segment_id", "event_id"])
@pytest.mark.parametrize(
    "value",
    [
        "not-a-uuid",
        "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5",  # 35 chars
        "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5bb",  # 37 chars
        "0190a1b2c3d4-7e5f-8a9b-0c1d2e3f4a5bb",  # hyphen misplaced
        "g190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "{0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b}",
        " 0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5\x00",
        12345,
        ["0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"],
        True,
    ],
)
def test_uuid_fields_reject_non_uuids(name, value):
    raw = {"site_id": SITE, name: value}
    e = err(raw)
    assert (e.field, e.reason) == (name, "invalid")


@pytest.mark.parametrize("value", [SITE, SITE.upper(), SITE.replace("-", ""), SITE.replace("-", "").upper()])
def test_uuid_forms_are_normalised(value):
    assert ok(campaign_id=value)["campaign_id"] == SITE


# --------------------------------------------------------------------------- event_type


@pytest.mark.parametrize("value", ["pageview", "a", "A.b:c-d_e", "x" * 64, "0"])
def test_event_type_accepts_identifiers(value):
    assert ok(event_type=value)["event_type"] == value


@pytest.mark.parametrize("value", ["x" * 65, "has space", "é", "a/b", "a\x00", "a\n", 7, ["pageview"]])
def test_event_type_rejects_others(value):
    e = bad(event_type=value)
    assert (e.field, e.reason) == ("event_type", "invalid")


# --------------------------------------------------------------------------- text fields


@pytest.mark.parametrize(("name", "limit"), [("visitor_id", 128), ("session_id", 128), ("page_url", 8192), ("referrer_url", 8192)])
def test_text_limits_are_utf8_bytes(name, limit):
    assert ok(**{name: "a" * limit})[name] == "a" * limit
    e = bad(**{name: "a" * (limit + 1)})
    assert (e.field, e.reason) == (name, "too_long")
    # Within the limit in characters but not in bytes ("é" is 2 bytes in UTF-8).
    e = bad(**{name: "é" * (limit // 2 + 1)})
    assert (e.field, e.reason) == (name, "too_long")
    assert ok(**{name: "é" * (limit // 2)})[name] == "é" * (limit // 2)


@pytest.mark.parametrize("name", ["visitor_id", "session_id", "page_url", "referrer_url"])
def test_text_rejects_nul_and_lone_surrogates(name):
    e = bad(**{name: "ab\x00c"})
    assert (e.field, e.reason) == (name, "invalid")
    assert "NUL" in e.message
    e = bad(**{name: "ab\ud800c"})
    assert (e.field, e.reason) == (name, "invalid")
    assert "surrogate" in e.message


@pytest.mark.parametrize("name", ["visitor_id", "page_url"])
@pytest.mark.parametrize("value", [1, 1.5, True, ["x"], {"x": 1}])
def test_text_must_be_strings(name, value):
    e = bad(**{name: value})
    assert (e.field, e.reason) == (name, "invalid")


def test_text_keeps_unicode_and_whitespace():
    assert ok(page_url=" https://例え.jp/ü?q=😀 ")["page_url"] == " https://例え.jp/ü?q=😀 "


# --------------------------------------------------------------------------- duration_seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (17, 17), ("17", 17), ("0042", 42), (2147483647, 2147483647), ("2147483647", 2147483647), (12.0, 12)],
)
def test_duration_accepts_whole_numbers(value, expected):
    out = ok(duration_seconds=value)["duration_seconds"]
    assert out == expected and type(out) is int


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1, "out_of_range"),
        (2147483648, "out_of_range"),
        ("2147483648", "out_of_range"),
        (10**30, "out_of_range"),
        (1e30, "out_of_range"),
        ("-1", "invalid"),
        ("+1", "invalid"),
        ("1.5", "invalid"),
        ("1e3", "invalid"),
        (" 1", "invalid"),
        ("١٢", "invalid"),  # Arabic-Indic digits: isdigit() but not ASCII
        ("²", "invalid"),
        ("12345678901", "invalid"),  # more digits than any int4
        (1.5, "invalid"),
        (float("nan"), "invalid"),
        (float("inf"), "invalid"),
        (True, "invalid"),
        (False, "invalid"),
        ([1], "invalid"),
    ],
)
def test_duration_rejects(value, reason):
    e = bad(duration_seconds=value)
    assert (e.field, e.reason) == ("duration_seconds", reason)


# --------------------------------------------------------------------------- custom_data


def test_custom_data_object_and_json_string():
    assert ok(custom_data={"a": {"b": [1, "x", None, True]}})["custom_data"] == {"a": {"b": [1, "x", None, True]}}
    assert ok(custom_data='{"a":1}')["custom_data"] == {"a": 1}
    assert ok(custom_data={})["custom_data"] == {}


@pytest.mark.parametrize("value", ['[1,2]', '"x"', "1", "null", "{bad json", "{'a': 1}", [1], 5, True])
def test_custom_data_must_be_an_object(value):
    e = bad(custom_data=value)
    assert (e.field, e.reason) == ("custom_data", "invalid")


def test_custom_data_size_limit():
    limit = ev.MAX_CUSTOM_DATA_BYTES
    filler = "x" * (limit - len('{"k":""}'))
    assert len(orjson.dumps({"k": filler})) == limit
    assert ok(custom_data={"k": filler})["custom_data"]["k"] == filler
    e = bad(custom_data={"k": filler + "x"})
    assert (e.field, e.reason) == ("custom_data", "too_long")
    e = bad(custom_data=orjson.dumps({"k": filler + "x"}).decode())
    assert (e.field, e.reason) == ("custom_data", "too_long")
    # Multi-byte text counts in bytes.
    e = bad(custom_data={"k": "é" * (limit // 2)})
    assert (e.field, e.reason) == ("custom_data", "too_long")


def _nested(depth: int):
    doc: dict = {}
    node = doc
    for _ in range(depth - 1):
        node["n"] = {}
        node = node["n"]
    return doc


def test_custom_data_nesting_is_bounded():
    limit = ev.MAX_CUSTOM_DATA_DEPTH
    assert ok(custom_data=_nested(limit))
    e = bad(custom_data=_nested(limit + 1))
    assert (e.field, e.reason) == ("custom_data", "invalid")
    assert "nested" in e.message
    # Arrays count as levels too.
    e = bad(custom_data={"a": [[[[[[[[1]]]]]]]]})
    assert (e.field, e.reason) == ("custom_data", "invalid")
    # Deeper than orjson itself can go: still a clean error, never a crash.
    deep = "[" * 5000 + "]" * 5000
    e = bad(custom_data='{"a":' + deep + "}")
    assert (e.field, e.reason) == ("custom_data", "invalid")


@pytest.mark.parametrize(
    "value",
    [
        {"a\x00": 1},
        {"a": "b\x00"},
        {"a": ["x", {"b": "\x00"}]},
        '{"a": "\\u0000"}',
        {"a": "\ud800"},
        {"\udcff": 1},
        '{"a": "\\ud800"}',
    ],
)
def test_custom_data_rejects_nul_and_surrogates(value):
    e = bad(custom_data=value)
    assert (e.field, e.reason) == ("custom_data", "invalid")


# --------------------------------------------------------------------------- client_ts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1714564800000, 1714564800000),
        ("1714564800000", 1714564800000),
        (1714564800000.0, 1714564800000),
        ("2024-05-01T12:00:00Z", 1714564800000),
        ("2024-05-01T12:00:00.123Z", 1714564800123),
        ("2024-05-01T14:00:00+02:00", 1714564800000),
        ("2024-05-01T12:00:00", 1714564800000),  # naive -> UTC
        ("2024-05-01", 1714521600000),
    ],
)
def test_client_ts_forms(value, expected):
    assert ok(client_ts=value)["client_ts"] == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (1714564800, "out_of_range"),  # epoch seconds, not milliseconds
        ("1714564800", "out_of_range"),
        (-1, "out_of_range"),
        (4102444800000, "out_of_range"),
        ("1999-12-31T23:59:59Z", "out_of_range"),
        ("0001-01-01T00:00:00+14:00", "out_of_range"),
        ("9999-12-31T23:59:59-14:00", "out_of_range"),
        ("yesterday", "invalid"),
        ("2024-13-01", "invalid"),
        ("2024-05-01T12:00:00Z\x00", "invalid"),
        ("2024-05-01\ud800", "invalid"),
        ("1" * 65, "invalid"),
        (1714564800000.5, "invalid"),
        (float("inf"), "invalid"),
        (True, "invalid"),
        ({"ts": 1}, "invalid"),
    ],
)
def test_client_ts_rejects(value, reason):
    e = bad(client_ts=value)
    assert (e.field, e.reason) == ("client_ts", reason)


# --------------------------------------------------------------------------- envelope


def _envelope(**over):
    env = {
        "v": ev.ENVELOPE_VERSION,
        "id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c",
        "received_at": 1714564800000,
        "ip": "203.0.113.9",
        "ua": "Mozilla/5.0",
        "hints": {"sec-ch-ua-mobile": "?0", "dnt": True},
        "source": "beacon",
        "event": {"site_id": SITE, "event_type": "pageview", "visitor_id": "cl_" + "0" * 32},
    }
    env.update(over)
    return env


def test_envelope_round_trip():
    env = _envelope()
    data = ev.encode_envelope(env)
    assert isinstance(data, bytes)
    assert ev.decode_envelope(data) == env


def test_kafka_key():
    assert ev.kafka_key(SITE, "v1") == f"{SITE}:v1".encode()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[1]",
        orjson.dumps(_envelope(v=2)),
        orjson.dumps({k: v for k, v in _envelope().items() if k != "received_at"}),
        orjson.dumps(_envelope(received_at="now")),
        orjson.dumps(_envelope(received_at=True)),
        orjson.dumps(_envelope(ip=5)),
        orjson.dumps(_envelope(source="carrier-pigeon")),
        orjson.dumps(_envelope(id="nope")),
        orjson.dumps(_envelope(event={"event_type": "pageview", "visitor_id": "v"})),
        orjson.dumps(_envelope(event={"site_id": SITE, "visitor_id": "v", "ip_address": "1.2.3.4"})),
        orjson.dumps(_envelope(event={"site_id": SITE})),  # no visitor_id
        orjson.dumps(_envelope(event={"site_id": SITE, "visitor_id": "v", "event_id": SITE})),
    ],
)
def test_decode_envelope_rejects(data):
    with pytest.raises(EnvelopeError):
        ev.decode_envelope(data)


def test_decode_envelope_without_revalidation_trusts_the_event():
    env = _envelope(event={"site_id": "whatever"})
    assert ev.decode_envelope(orjson.dumps(env), revalidate=False)["event"] == {"site_id": "whatever"}
