"""Sessionization rules (pure)."""

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from processors.sessions import (
    RECENT_SESSIONS,
    assign,
    session_uuid,
    state_from_json,
    state_to_json,
    traffic_source,
)

UTC = timezone.utc
MIN = 60_000
SITE, VISITOR = "00000000-0000-4000-8000-000000000001", "v1"


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def run(events, tz=UTC, timeout=30 * MIN, state=()):
    """Feed (iso time, source) pairs; return the session ids and the final state."""
    ids = []
    for t, source in events:
        sid, state = assign(state, site_id=SITE, visitor_id=VISITOR, t_ms=ms(t), source=source,
                            tz=tz, timeout_ms=timeout)
        ids.append(sid)
    return ids, state


def test_activity_within_timeout_is_one_session():
    ids, _ = run([("2026-11-26T10:00:00+00:00", None), ("2026-11-26T10:29:00+00:00", None),
                  ("2026-11-26T10:58:00+00:00", None)])
    assert len(set(ids)) == 1


def test_inactivity_beyond_timeout_starts_a_new_session():
    ids, _ = run([("2026-11-26T10:00:00+00:00", None), ("2026-11-26T10:31:00+00:00", None)])
    assert ids[0] != ids[1]


def test_timeout_is_configurable():
    events = [("2026-11-26T10:00:00+00:00", None), ("2026-11-26T10:10:00+00:00", None)]
    assert len(set(run(events, timeout=5 * MIN)[0])) == 2
    assert len(set(run(events, timeout=15 * MIN)[0])) == 1


def test_midnight_in_the_site_time_zone_splits():
    # 23:50 and 00:05 in New York (04:50 and 05:05 UTC): same UTC day, different local days.
    events = [("2026-11-27T04:50:00+00:00", None), ("2026-11-27T05:05:00+00:00", None)]
    assert len(set(run(events, tz=ZoneInfo("America/New_York"))[0])) == 2
    assert len(set(run(events, tz=UTC)[0])) == 1


def test_source_change_splits_but_no_source_continues():
    ids, _ = run([
        ("2026-11-26T10:00:00+00:00", "ref:google.com"),
        ("2026-11-26T10:01:00+00:00", None),  # internal navigation
        ("2026-11-26T10:02:00+00:00", "ref:google.com"),  # same source again
        ("2026-11-26T10:03:00+00:00", "utm:newsletter/email/nov"),
    ])
    assert ids[0] == ids[1] == ids[2] != ids[3]


def test_session_id_is_deterministic_uuid_of_first_event():
    ids1, _ = run([("2026-11-26T10:00:00+00:00", None), ("2026-11-26T10:05:00+00:00", None)])
    ids2, _ = run([("2026-11-26T10:00:00+00:00", None), ("2026-11-26T10:05:00+00:00", None)])
    assert ids1 == ids2
    assert ids1[0] == session_uuid(SITE, VISITOR, ms("2026-11-26T10:00:00+00:00"))


def test_late_event_joins_its_session_without_splitting():
    ids, state = run([
        ("2026-11-26T10:00:00+00:00", None),
        ("2026-11-26T10:20:00+00:00", None),
        ("2026-11-26T11:30:00+00:00", None),  # new session (70 min gap)
        ("2026-11-26T10:10:00+00:00", None),  # late: belongs to the first session
        ("2026-11-26T11:35:00+00:00", None),  # continues the second session
    ])
    assert ids[0] == ids[1] == ids[3]
    assert ids[2] == ids[4] != ids[0]
    assert len(state) == 2


def test_late_event_with_other_source_does_not_split_its_session():
    ids, _ = run([
        ("2026-11-26T10:00:00+00:00", "ref:google.com"),
        ("2026-11-26T10:20:00+00:00", None),
        ("2026-11-26T10:10:00+00:00", "ref:bing.com"),
    ])
    assert len(set(ids)) == 1


def test_late_event_outside_every_window_gets_its_own_session():
    ids, state = run([("2026-11-26T12:00:00+00:00", None), ("2026-11-26T09:00:00+00:00", None),
                      ("2026-11-26T09:10:00+00:00", None)])
    assert ids[0] != ids[1] and ids[1] == ids[2]
    assert [s.id for s in state] == [ids[1], ids[0]]  # ordered by time


def test_state_is_bounded_and_round_trips_through_json():
    events = [(f"2026-11-26T{h:02d}:00:00+00:00", None) for h in range(12)]
    ids, state = run(events)
    assert len(set(ids)) == 12
    assert len(state) == RECENT_SESSIONS
    assert state_from_json(state_to_json(state)) == state


def test_restored_state_continues_the_session():
    ids, state = run([("2026-11-26T10:00:00+00:00", None)])
    restored = state_from_json(state_to_json(state))
    ids2, _ = run([("2026-11-26T10:10:00+00:00", None)], state=restored)
    assert ids2 == ids


@pytest.mark.parametrize("page, ref, campaign, expected", [
    ("https://a.com/x", None, None, None),
    ("https://a.com/x", "https://www.a.com/y", None, None),
    ("https://www.a.com/x", "https://a.com/", None, None),
    ("https://a.com/x", "https://www.google.com/search?q=1", None, "ref:google.com"),
    ("https://a.com/x?utm_source=News&utm_medium=email", "https://google.com/", None, "utm:news/email/"),
    ("https://a.com/x?gclid=abc", None, None, "click:gclid"),
    ("https://a.com/x?utm_source=x", None, "11111111-1111-4111-8111-111111111111",
     "campaign:11111111-1111-4111-8111-111111111111"),
    ("not a url", "also :// not", None, None),
    (None, "https://[::1/", None, None),
])
def test_traffic_source(page, ref, campaign, expected):
    assert traffic_source(page, ref, campaign) == expected
