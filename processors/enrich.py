"""The worker's pure stages: decode -> validate -> enrich -> attribute -> sessionize -> row.

Everything here is a function of the Kafka record values and reference data passed
in (GeoIP database, device detector, session state, site time zones); the worker
does the I/O around it. A record that cannot become a row is returned as a
``DeadLetter`` with a reason, never raised.

Where the enrichments go (see docs/worker.md):
  * geo -> country, region, city, location (jsonb)
  * device -> device_type; browser/OS/device details -> reserved ``$``-keys in custom_data
  * ip_address -> stored as configured (anonymized by default)
  * sessions -> session_id (the client's own session id, if sent, is kept as
    ``custom_data["$client_session_id"]``)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from processors import sessions as sess
from processors.device import DeviceDetector
from processors.geo import GeoLookup
from processors.privacy import ip_storer
from schemas.event import Envelope, EnvelopeError, decode_envelope

VisitorKey = tuple[str, str]
UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    index: int  # position of the record in the batch
    reason: str  # decode_error | invalid_envelope | store_failed
    detail: str


@dataclass
class Built:
    rows: list[tuple] = field(default_factory=list)
    row_index: list[int] = field(default_factory=list)  # record position of each row
    received_at: list[int] = field(default_factory=list)  # epoch ms, per row
    states: dict[VisitorKey, sess.VisitorState] = field(default_factory=dict)  # changed states
    dead: list[DeadLetter] = field(default_factory=list)


def uuid7_ms(event_id: str) -> int | None:
    """The creation time embedded in a UUIDv7 (RFC 9562), else None."""
    if len(event_id) == 36 and event_id[14] == "7":
        return int(event_id[:8] + event_id[9:13], 16)
    return None


def event_time_ms(env: Envelope, max_past_ms: int, max_future_ms: int) -> int:
    """When the event happened: the UUIDv7 time of its id, else the client's timestamp,
    else the receive time; a client time implausibly far from the receive time is
    replaced by the receive time.

    Being a function of the event id first makes ``created_at`` identical for a client's
    retries, so the (id, created_at) primary key recognises them as one event.
    """
    received = env["received_at"]
    t = uuid7_ms(env["id"]) or env["event"].get("client_ts") or received
    if not received - max_past_ms <= t <= received + max_future_ms:
        return received
    return t


def _ms_to_dt(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


def _primary_language(accept_language: Any) -> str | None:
    if not isinstance(accept_language, str) or not accept_language:
        return None
    first = accept_language.split(",", 1)[0].split(";", 1)[0].strip().lower()
    return first[:35] or None


def _safe_text(value: Any, limit: int = 1024) -> str | None:
    """Text Postgres will take: no NUL, no lone surrogates."""
    if not isinstance(value, str):
        return None
    value = value[:limit]
    if "\x00" in value:
        value = value.replace("\x00", "")
    try:
        value.encode()
    except UnicodeEncodeError:
        value = value.encode(errors="replace").decode()
    return value


class Enricher:
    def __init__(self, *, geo: GeoLookup | None, device: DeviceDetector, ip_mode: str,
                 session_timeout_ms: int, default_tz: str, max_past_ms: int, max_future_ms: int) -> None:
        self.geo = geo
        self.device = device
        self.store_ip = ip_storer(ip_mode)  # a bad mode fails here, at start-up
        self.timeout_ms = session_timeout_ms
        self.default_tz = ZoneInfo(default_tz)
        self.max_past_ms = max_past_ms
        self.max_future_ms = max_future_ms

    @classmethod
    def from_settings(cls, enrich, worker) -> Enricher:
        return cls(
            geo=GeoLookup(str(enrich.geoip_city_db)) if enrich.geoip_city_db else None,
            device=DeviceDetector(enrich.ua_cache_size),
            ip_mode=enrich.ip_storage,
            session_timeout_ms=worker.session_timeout_min * 60_000,
            default_tz=worker.session_default_tz,
            max_past_ms=worker.max_past_days * 86_400_000,
            max_future_ms=worker.max_future_s * 1000,
        )

    # -- stage 1: decode + validate --------------------------------------------

    def decode(self, values: list[bytes | None]) -> tuple[list[tuple[int, Envelope]], list[DeadLetter]]:
        ok: list[tuple[int, Envelope]] = []
        dead: list[DeadLetter] = []
        for i, value in enumerate(values):
            if value is None:
                dead.append(DeadLetter(i, "decode_error", "record has no value"))
                continue
            try:
                ok.append((i, decode_envelope(value)))
            except EnvelopeError as exc:
                reason = "decode_error" if str(exc).startswith(("not JSON", "not a JSON")) else "invalid_envelope"
                dead.append(DeadLetter(i, reason, str(exc)))
        return ok, dead

    @staticmethod
    def visitor_key(env: Envelope) -> VisitorKey:
        return env["event"]["site_id"], env["event"]["visitor_id"]

    # -- stage 2: enrich + attribute + sessionize -> rows ---------------------------

    def build(self, decoded: list[tuple[int, Envelope]], states: Mapping[VisitorKey, sess.VisitorState],
              site_tz: Mapping[str, ZoneInfo], now: dt.datetime | None = None) -> Built:
        out = Built()
        now = now or dt.datetime.now(UTC)
        current = dict(states)
        for index, env in decoded:
            ev = env["event"]
            key = (ev["site_id"], ev["visitor_id"])
            t_ms = event_time_ms(env, self.max_past_ms, self.max_future_ms)
            source = sess.traffic_source(ev.get("page_url"), ev.get("referrer_url"), ev.get("campaign_id"))
            session_id, current[key] = sess.assign(
                current.get(key, ()), site_id=key[0], visitor_id=key[1], t_ms=t_ms, source=source,
                tz=site_tz.get(key[0], self.default_tz), timeout_ms=self.timeout_ms,
            )
            out.states[key] = current[key]
            out.rows.append(self._row(env, session_id, t_ms, now))
            out.row_index.append(index)
            out.received_at.append(env["received_at"])
        return out

    def _row(self, env: Envelope, session_id: str, t_ms: int, now: dt.datetime) -> tuple:
        ev = env["event"]
        hints = env["hints"]
        private = hints.get("dnt") is True or hints.get("gpc") is True
        ua = _safe_text(env["ua"])
        device = self.device.detect(ua, hints)
        geo = self.geo.lookup(env["ip"]) if self.geo is not None else None

        custom = dict(ev.get("custom_data") or {})
        for k, v in (device.details or {}).items():  # $browser, $os, $device
            custom[f"${k}"] = v
        lang = _primary_language(hints.get("accept-language"))
        if lang:
            custom["$lang"] = lang
        if "session_id" in ev:
            custom["$client_session_id"] = ev["session_id"]

        country = region = city = location = None
        if geo is not None:
            country = geo.country
            if not private:  # Do-Not-Track / GPC: country only, no finer location
                region, city = geo.region, geo.city
                location = orjson.dumps(geo.location).decode() if geo.location else None
        ip = None if private else self.store_ip(env["ip"])

        return (
            env["id"], ev["event_type"], ev.get("page_url"), ev.get("referrer_url"), ev["visitor_id"],
            session_id, ip, ua, device.device_type, country, region, city, ev.get("duration_seconds"),
            orjson.dumps(custom).decode() if custom else None,
            ev.get("lead_id"), ev.get("segment_id"), ev.get("experiment_id"), ev["site_id"],
            None,  # user_id: the site's owner, filled by attribution
            _ms_to_dt(t_ms), now, location, ev.get("campaign_id"),
        )
