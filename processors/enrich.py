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

from processors import attribution as attr
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


@dataclass(frozen=True, slots=True)
class VisitorState:
    """What the worker remembers of a visitor between batches (pipeline.visitor_sessions)."""

    sessions: sess.VisitorState = ()
    attribution: attr.VisitorAttribution = attr.NO_VISITOR

    def to_json(self) -> dict:
        a = self.attribution
        return {"s": sess.state_to_json(self.sessions), "l": a.lead_id, "x": [list(v) for v in a.variants]}

    @classmethod
    def from_json(cls, value: list | dict | None) -> VisitorState:
        if isinstance(value, list):  # sessions only (the first format)
            return cls(sess.state_from_json(value))
        value = value or {}
        lead, variants = value.get("l"), tuple(tuple(v) for v in value.get("x") or ())
        # A visitor linked to nothing gets the shared NO_VISITOR: attribution's fast path
        # recognises it by identity.
        return cls(sess.state_from_json(value.get("s")),
                   attr.NO_VISITOR if lead is None and not variants else attr.VisitorAttribution(lead, variants))


NO_STATE = VisitorState()


@dataclass
class Built:
    rows: list[tuple] = field(default_factory=list)
    row_index: list[int] = field(default_factory=list)  # record position of each row
    received_at: list[int] = field(default_factory=list)  # epoch ms, per row
    states: dict[VisitorKey, VisitorState] = field(default_factory=dict)  # changed states
    dead: list[DeadLetter] = field(default_factory=list)
    # (site_id, visitor_id, lead_id, earliest created_at to back-fill) per newly linked visitor
    backfills: list[tuple[str, str, str, dt.datetime]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # attribution refs dropped, by kind


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
                 session_timeout_ms: int, default_tz: str, max_past_ms: int, max_future_ms: int,
                 backfill_days: int = 30) -> None:
        self.geo = geo
        self.device = device
        self.store_ip = ip_storer(ip_mode)  # a bad mode fails here, at start-up
        self.timeout_ms = session_timeout_ms
        self.default_tz = ZoneInfo(default_tz)
        self.max_past_ms = max_past_ms
        self.max_future_ms = max_future_ms
        self.backfill = dt.timedelta(days=backfill_days)
        self._zones: dict[str, ZoneInfo] = {}

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
            backfill_days=worker.lead_backfill_days,
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

    def needs(self, decoded: list[tuple[int, Envelope]],
              states: Mapping[VisitorKey, VisitorState]) -> attr.Needs:
        """The reference data keys the batch refers to (for the worker to load).
        ``states``: those of the batch's visitors (any other only adds its lead to load)."""
        needs = attr.Needs()
        add_site = needs.sites.add
        no_visitor = NO_STATE.attribution
        for _, env in decoded:
            ev = env["event"]
            add_site(ev["site_id"])
            # Most events name no lead and no email (custom_data is a dict: decode checks it).
            if "lead_id" in ev or ("custom_data" in ev and "email" in ev["custom_data"]):
                attr.needs_of(ev, no_visitor, needs)
        for state in states.values():  # linked leads: once per visitor, not per event
            if state.attribution.lead_id:
                needs.leads.add(state.attribution.lead_id)
        return needs

    def _zone(self, name: str | None) -> ZoneInfo:
        if not name:
            return self.default_tz
        zone = self._zones.get(name)
        if zone is None:
            try:
                zone = ZoneInfo(name)
            except (KeyError, ValueError):
                zone = self.default_tz
            self._zones[name] = zone
        return zone

    def build(self, decoded: list[tuple[int, Envelope]], states: Mapping[VisitorKey, VisitorState],
              refs: attr.RefSnapshot, now: dt.datetime | None = None) -> Built:
        out = Built()
        now = now or dt.datetime.now(UTC)
        current = dict(states)
        for index, env in decoded:
            ev = env["event"]
            key = (ev["site_id"], ev["visitor_id"])
            site = refs.sites.get(key[0])
            if site is None:
                out.dead.append(DeadLetter(index, "unknown_site", f"site {key[0]} does not exist"))
                continue
            state = current.get(key, NO_STATE)
            t_ms = event_time_ms(env, self.max_past_ms, self.max_future_ms)
            t = _ms_to_dt(t_ms)
            lang = _primary_language(env["hints"].get("accept-language"))
            a, visitor = attr.attribute(ev, site, refs, state.attribution, t, lang)
            source = sess.traffic_source(ev.get("page_url"), ev.get("referrer_url"), a.campaign_id, a.page)
            session_id, sessions = sess.assign(
                state.sessions, site_id=key[0], visitor_id=key[1], t_ms=t_ms, source=source,
                tz=self._zone(site.time_zone), timeout_ms=self.timeout_ms,
            )
            current[key] = out.states[key] = VisitorState(sessions, visitor)
            if a.backfill_lead:
                out.backfills.append((key[0], key[1], a.backfill_lead, t - self.backfill))
            for what in a.dropped:
                out.dropped[what] = out.dropped.get(what, 0) + 1
            out.rows.append(self._row(env, session_id, t, now, a, lang))
            out.row_index.append(index)
            out.received_at.append(env["received_at"])
        return out

    def _row(self, env: Envelope, session_id: str, t: dt.datetime, now: dt.datetime, a: attr.Attribution,
             lang: str | None) -> tuple:
        ev = env["event"]
        hints = env["hints"]
        private = hints.get("dnt") is True or hints.get("gpc") is True
        ua = _safe_text(env["ua"])
        device = self.device.detect(ua, hints)
        geo = self.geo.lookup(env["ip"]) if self.geo is not None else None

        custom = dict(ev.get("custom_data") or {})
        for k, v in (device.details or {}).items():  # $browser, $os, $device
            custom[f"${k}"] = v
        if lang:
            custom["$lang"] = lang
        custom.update(a.custom)
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
            a.lead_id, a.segment_id, a.experiment_id, ev["site_id"], a.user_id,
            t, now, location, a.campaign_id,
        )
