"""Sessionization: a pure function of a visitor's session state and one event.

A visitor's events form one session until
  * the visitor is inactive for longer than the timeout (default 30 minutes),
  * the local date in the site's time zone changes (midnight), or
  * the traffic source changes: the event carries a campaign, UTM parameters, a
    click id or an external referrer different from the session's own source.
    Internal navigation and direct hits carry no source and never split a session.

``session_id`` is a UUIDv5 of (site, visitor, time of the session's first event),
so replaying the same partition gives the same ids.

Late and out-of-order events: the state keeps the visitor's few most recent
sessions; an event older than the newest one joins the session whose window
(start - timeout .. last + timeout, same local day) contains it, and otherwise
starts a session of its own, so a late event never splits a session that exists.
"""

from __future__ import annotations

import uuid
from functools import lru_cache
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from processors.urls import NO_PAGE, PageURL, parse_page

# Sessions remembered per visitor: enough for out-of-order delivery, small in Postgres.
RECENT_SESSIONS = 6

_NAMESPACE = uuid.UUID("6f0c8a4e-8b1e-4e55-9a53-7a3c2f6d1b90")

# The sources a page's own query names (UTM tags, ad click ids) are read by
# processors/urls.py, whose parse of the page attribution shares.


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    start_ms: int  # earliest event seen in the session
    last_ms: int  # latest event seen in the session
    day: int  # proleptic ordinal of the local date the session started on
    source: str  # traffic source that opened it ("" = direct or unknown)

    def to_json(self) -> list:
        return [self.id, self.start_ms, self.last_ms, self.day, self.source]

    @classmethod
    def from_json(cls, value: list) -> Session:
        sid, start, last, day, source = value
        return cls(sid, int(start), int(last), int(day), source)


# A visitor's state: recent sessions, oldest first.
VisitorState = tuple[Session, ...]


def state_to_json(state: VisitorState) -> list:
    return [s.to_json() for s in state]


def state_from_json(value: list | None) -> VisitorState:
    return tuple(Session.from_json(v) for v in value or ())


def session_uuid(site_id: str, visitor_id: str, start_ms: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{site_id}|{visitor_id}|{start_ms}"))


def local_day(t_ms: int, tz: ZoneInfo | timezone) -> int:
    return datetime.fromtimestamp(t_ms / 1000, tz).toordinal()


def traffic_source(page_url: str | None, referrer_url: str | None, campaign_id: str | None = None,
                   page: PageURL | None = None) -> str | None:
    """What brought the visitor, or None when the hit says nothing new (internal or direct).

    Precedence: explicit campaign, UTM tags, ad click id, external referrer host.
    ``page`` is ``page_url`` already parsed (attribution passes it on), else it is parsed here.
    """
    if campaign_id:
        return f"campaign:{campaign_id}"
    if page is None:
        page = parse_page(page_url) if page_url else NO_PAGE
    page_host = page.host
    if page.source:
        return page.source
    ref_host = _host(referrer_url) if referrer_url else None
    if ref_host is None or ref_host == page_host:
        return None  # direct, unknown, or internal navigation
    return f"ref:{ref_host}"


@lru_cache(maxsize=16384)
def _host(url: str) -> str | None:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return _bare_host(host) if host else None


def _bare_host(host: str) -> str:
    host = host.lower()
    return host[4:] if host.startswith("www.") else host


def assign(
    state: VisitorState,
    *,
    site_id: str,
    visitor_id: str,
    t_ms: int,
    source: str | None,
    tz: ZoneInfo | timezone,
    timeout_ms: int,
) -> tuple[str, VisitorState]:
    """The session of an event at ``t_ms``, and the visitor's new state."""
    day = local_day(t_ms, tz)
    if state:
        newest = state[-1]
        if t_ms >= newest.last_ms:
            # In order (the common case): continue the newest session unless a rule splits it.
            if (
                t_ms - newest.last_ms <= timeout_ms
                and day == newest.day
                and (source is None or source == newest.source)
            ):
                return newest.id, state[:-1] + (replace(newest, last_ms=t_ms),)
        else:
            # Late: join the session whose window holds it, whatever its source.
            for i in range(len(state) - 1, -1, -1):
                s = state[i]
                if s.start_ms - timeout_ms <= t_ms <= s.last_ms + timeout_ms and day == s.day:
                    grown = replace(s, start_ms=min(s.start_ms, t_ms), last_ms=max(s.last_ms, t_ms))
                    return s.id, state[:i] + (grown,) + state[i + 1:]
    new = Session(session_uuid(site_id, visitor_id, t_ms), t_ms, t_ms, day, source or "")
    merged = sorted(state + (new,), key=lambda s: s.last_ms)
    return new.id, tuple(merged[-RECENT_SESSIONS:])
