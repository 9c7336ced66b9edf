"""The visitor event: client-side validation rules and the Kafka envelope.

Shared by the collector (validates what browsers send, wraps it in an envelope)
and the stream workers (decode the envelope, re-check it, write ``visitor_events``).
Pure: no I/O, no clock, no randomness. It sits on the collector's hot path, so
checks are ordered cheapest first and all patterns are compiled once at import.

Input rules (``validate_event``)
--------------------------------
Field names are the ``visitor_events`` columns a client may set, plus ``event_id``
(client-chosen UUID so a retried hit keeps its id) and ``client_ts``.

* ``null`` or ``""`` means "not given" (pixels send ``ref=`` for an empty referrer).
* Keys starting with ``_`` are ignored (cache-busters such as ``_=1700000000``).
* Server-owned columns (``ip_address``, ``created_at``, ...) and any other unknown key
  are rejected, naming the key.
* Text must not contain NUL or lone surrogates (PostgreSQL rejects both); limits are
  UTF-8 bytes, so a value always fits the column whatever its encoding.
* Numbers and ``custom_data`` may arrive as strings (everything is a string in a
  pixel query), so the string forms are accepted wherever the JSON form is.

Normalised output: ``site_id`` and ``event_type`` are always present; other fields
only when given. UUIDs are lowercase and hyphenated, ``duration_seconds`` is an int,
``custom_data`` a dict, ``client_ts`` an int in epoch milliseconds (UTC). Validation
is idempotent: ``validate_event(validate_event(x)) == validate_event(x)``.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, NotRequired, TypedDict

import orjson

__all__ = [
    "CLIENT_FIELDS",
    "COOKIELESS_PREFIX",
    "ENVELOPE_VERSION",
    "Envelope",
    "EnvelopeError",
    "EventError",
    "EventFields",
    "SERVER_OWNED_FIELDS",
    "decode_envelope",
    "encode_envelope",
    "kafka_key",
    "validate_event",
]

# --------------------------------------------------------------------------- limits

MAX_ID_BYTES: Final = 128  # visitor_id, session_id
MAX_URL_BYTES: Final = 8 * 1024  # page_url, referrer_url
MAX_CUSTOM_DATA_BYTES: Final = 16 * 1024  # custom_data, compact JSON
MAX_CUSTOM_DATA_DEPTH: Final = 8  # the top-level object counts as 1
MAX_DURATION_SECONDS: Final = 2_147_483_647  # PostgreSQL int4
# client_ts plausibility window; it also catches epoch *seconds* sent as milliseconds.
MIN_CLIENT_TS_MS: Final = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_CLIENT_TS_MS: Final = 4_102_444_800_000  # 2100-01-01T00:00:00Z
_MAX_ISO_LEN: Final = 64

# Prefix of visitor ids the collector derives for cookieless hits, so they are
# recognisable downstream (and never collide with a UUID-shaped client id).
COOKIELESS_PREFIX: Final = "cl_"

SERVER_OWNED_FIELDS: Final = frozenset(
    {
        "id", "ip_address", "user_agent", "device_type", "country", "region", "city",
        "location", "user_id", "created_at", "updated_at",
    }
)

Reason = Literal[
    "not_object", "missing", "invalid", "too_long", "out_of_range", "unknown_field", "server_owned",
    "unknown_site",  # only with COLLECTOR_REJECT_UNKNOWN_SITES (ingest/sites.py)
]


class EventError(ValueError):
    """One event is invalid. ``field`` names the offending key (None: the event as a whole).

    ``reason`` is a short, fixed code (safe as a metrics label); ``message`` is for humans.
    """

    __slots__ = ("field", "reason", "message")

    def __init__(self, field: str | None, reason: Reason, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = reason
        self.message = message

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field, "reason": self.reason}


class EventFields(TypedDict):
    """A validated event, as ``validate_event`` returns it."""

    site_id: str
    event_type: str
    event_id: NotRequired[str]  # the collector moves it to Envelope.id
    visitor_id: NotRequired[str]
    session_id: NotRequired[str]
    page_url: NotRequired[str]
    referrer_url: NotRequired[str]
    duration_seconds: NotRequired[int]
    custom_data: NotRequired[dict[str, Any]]
    campaign_id: NotRequired[str]
    lead_id: NotRequired[str]
    experiment_id: NotRequired[str]
    segment_id: NotRequired[str]
    client_ts: NotRequired[int]


# --------------------------------------------------------------------------- field checks

_UUID36 = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_UUID32 = re.compile(r"[0-9a-fA-F]{32}")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_ONE_MS = _dt.timedelta(milliseconds=1)


def _uuid(field: str, value: Any) -> str:
    if type(value) is str:
        n = len(value)
        if n == 36 and _UUID36.fullmatch(value):
            return value.lower()
        if n == 32 and _UUID32.fullmatch(value):
            v = value.lower()
            return f"{v[:8]}-{v[8:12]}-{v[12:16]}-{v[16:20]}-{v[20:]}"
    raise EventError(field, "invalid", "must be a UUID (e.g. 0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b)")


def _check_text(field: str, value: str, limit: int) -> None:
    # len() counts code points, never more than the UTF-8 byte count: a cheap first cut.
    if len(value) > limit:
        raise EventError(field, "too_long", f"longer than {limit} bytes")
    if "\x00" in value:
        raise EventError(field, "invalid", "contains a NUL character")
    if not value.isascii():
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise EventError(field, "invalid", "contains a lone surrogate (invalid Unicode)") from None
        if size > limit:
            raise EventError(field, "too_long", f"longer than {limit} bytes")


def _text(limit: int) -> Callable[[str, Any], str]:
    def check(field: str, value: Any) -> str:
        if type(value) is not str:
            raise EventError(field, "invalid", "must be a string")
        _check_text(field, value, limit)
        return value

    return check


def _event_type(field: str, value: Any) -> str:
    if type(value) is str and _EVENT_TYPE.fullmatch(value):
        return value
    raise EventError(field, "invalid", "must be 1-64 characters of A-Z a-z 0-9 _ . : -")


def _duration(field: str, value: Any) -> int:
    t = type(value)
    if t is int:
        n = value
    elif t is str and 0 < len(value) <= 10 and value.isascii() and value.isdigit():
        n = int(value)
    elif t is float and value.is_integer():  # JSON has no int/float split: 12.0 is 12
        n = int(value)
    else:  # also bool: True is an int subclass but never a duration
        raise EventError(field, "invalid", "must be a whole number of seconds")
    if 0 <= n <= MAX_DURATION_SECONDS:
        return n
    raise EventError(field, "out_of_range", f"must be between 0 and {MAX_DURATION_SECONDS}")


def _check_tree(field: str, root: dict[str, Any]) -> None:
    # Iterative walk (no recursion limit to hit) checking depth and NULs, which jsonb refuses.
    stack: list[tuple[Any, int]] = [(root, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > MAX_CUSTOM_DATA_DEPTH:
            raise EventError(field, "invalid", f"nested deeper than {MAX_CUSTOM_DATA_DEPTH} levels")
        if type(node) is dict:
            if any("\x00" in k for k in node):
                raise EventError(field, "invalid", "contains a NUL character")
            node = node.values()
        for v in node:
            t = type(v)
            if t is str:
                if "\x00" in v:
                    raise EventError(field, "invalid", "contains a NUL character")
            elif t is dict or t is list:
                push((v, depth + 1))


def _custom_data(field: str, value: Any) -> dict[str, Any]:
    if type(value) is str:  # the pixel sends it JSON-encoded
        # Bound the parse work before parsing: the raw text obeys the same size limit.
        if len(value) > MAX_CUSTOM_DATA_BYTES:
            raise EventError(field, "too_long", f"larger than {MAX_CUSTOM_DATA_BYTES} bytes")
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise EventError(field, "invalid", "is not valid JSON") from None
    if type(value) is not dict:
        raise EventError(field, "invalid", "must be a JSON object")
    try:
        # Also rejects lone surrogates and absurd nesting, which orjson refuses to encode.
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        raise EventError(field, "invalid", "cannot be encoded as JSON (invalid text or nesting)") from None
    if size > MAX_CUSTOM_DATA_BYTES:
        raise EventError(field, "too_long", f"larger than {MAX_CUSTOM_DATA_BYTES} bytes")
    _check_tree(field, value)
    return value


def _client_ts(field: str, value: Any) -> int:
    t = type(value)
    if t is int:
        ms = value
    elif t is float and value.is_integer():  # Date.now() is integral; keep floats strict
        ms = int(value)
    elif t is str and 0 < len(value) <= _MAX_ISO_LEN:
        if value.isascii() and value.isdigit():
            ms = int(value)
        else:
            # fromisoformat() tolerates a trailing NUL; ISO 8601 is printable ASCII.
            if not (value.isascii() and value.isprintable()):
                raise EventError(field, "invalid", "must be ISO 8601 or epoch milliseconds")
            try:
                when = _dt.datetime.fromisoformat(value)
            except ValueError:
                raise EventError(field, "invalid", "must be ISO 8601 or epoch milliseconds") from None
            if when.tzinfo is None:  # a naive timestamp is taken as UTC
                when = when.replace(tzinfo=_dt.timezone.utc)
            ms = (when - _EPOCH) // _ONE_MS
    else:
        raise EventError(field, "invalid", "must be ISO 8601 or epoch milliseconds")
    if MIN_CLIENT_TS_MS <= ms < MAX_CLIENT_TS_MS:
        return ms
    raise EventError(field, "out_of_range", "must be between 2000-01-01 and 2100-01-01 (epoch milliseconds)")


_VALIDATORS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "site_id": _uuid,
    "event_type": _event_type,
    "visitor_id": _text(MAX_ID_BYTES),
    "session_id": _text(MAX_ID_BYTES),
    "page_url": _text(MAX_URL_BYTES),
    "referrer_url": _text(MAX_URL_BYTES),
    "duration_seconds": _duration,
    "custom_data": _custom_data,
    "campaign_id": _uuid,
    "lead_id": _uuid,
    "experiment_id": _uuid,
    "segment_id": _uuid,
    "event_id": _uuid,
    "client_ts": _client_ts,
}

CLIENT_FIELDS: Final = frozenset(_VALIDATORS)
DEFAULT_EVENT_TYPE: Final = "pageview"


def validate_event(raw: Any) -> EventFields:
    """Validate one client event and return its normalised fields.

    Raises ``EventError`` naming the first offending field. See the module docstring.
    """
    if type(raw) is not dict:
        if not isinstance(raw, Mapping):
            raise EventError(None, "not_object", "event must be a JSON object")
        raw = dict(raw)
    out: dict[str, Any] = {}
    validators = _VALIDATORS
    for key, value in raw.items():
        check = validators.get(key)
        if check is None:
            if type(key) is str and key[:1] == "_":
                continue
            if key in SERVER_OWNED_FIELDS:
                raise EventError(key, "server_owned", "is set by the collector; clients must not send it")
            raise EventError(str(key), "unknown_field", "unknown field")
        if value is None or value == "":
            continue
        out[key] = check(key, value)
    if "site_id" not in out:
        raise EventError("site_id", "missing", "is required")
    if "event_type" not in out:
        out["event_type"] = DEFAULT_EVENT_TYPE
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- envelope

ENVELOPE_VERSION: Final = 1
Source = Literal["pixel", "beacon"]


class Envelope(TypedDict):
    """One Kafka record value (orjson-encoded), version 1.

    ``v``            int, always ``ENVELOPE_VERSION``; bump on incompatible change.
    ``id``           str, the event id: the client's ``event_id`` when given (so retries
                     de-duplicate), else a collector-made UUIDv7; lowercase, hyphenated.
    ``received_at``  int, epoch milliseconds (UTC) when the collector received the hit;
                     the Kafka record timestamp is the same value.
    ``ip``           str | None, client IP after trusted-proxy resolution.
    ``ua``           str | None, User-Agent (invalid UTF-8 replaced, at most 1024 chars).
    ``hints``        dict: lowercase header name -> value for the Sec-CH-UA* client
                     hints and ``accept-language`` (only those sent, at most 512 chars
                     each), plus ``dnt`` / ``gpc`` booleans when those headers were sent.
    ``source``       ``"pixel"`` or ``"beacon"``.
    ``event``        the validated fields (``EventFields`` minus ``event_id``);
                     ``visitor_id`` is always set (derived, ``cl_``-prefixed, if the
                     client sent none).

    The Kafka record key is ``f"{site_id}:{visitor_id}"`` (UTF-8), see ``kafka_key``.
    """

    v: int
    id: str
    received_at: int
    ip: str | None
    ua: str | None
    hints: dict[str, str | bool]
    source: Source
    event: EventFields


class EnvelopeError(ValueError):
    """A Kafka record value is not a valid envelope (for the worker's dead-letter path)."""


def kafka_key(site_id: str, visitor_id: str) -> bytes:
    return f"{site_id}:{visitor_id}".encode()


def encode_envelope(envelope: Envelope) -> bytes:
    return orjson.dumps(envelope)


_ENVELOPE_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "id": (str,),
    "received_at": (int,),
    "ip": (str, type(None)),
    "ua": (str, type(None)),
    "hints": (dict,),
    "source": (str,),
    "event": (dict,),
}


def decode_envelope(data: bytes, *, revalidate: bool = True) -> Envelope:
    """Parse a Kafka record value; raise ``EnvelopeError`` if it is not a v1 envelope.

    With ``revalidate`` the event is checked again with ``validate_event`` (a no-op for
    what the collector wrote; it guards against anything else writing to the topic).
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"not JSON: {exc}") from None
    if type(doc) is not dict:
        raise EnvelopeError("not a JSON object")
    if doc.get("v") != ENVELOPE_VERSION:
        raise EnvelopeError(f"unsupported envelope version {doc.get('v')!r}")
    for name, types in _ENVELOPE_TYPES.items():
        if name not in doc:
            raise EnvelopeError(f"missing {name}")
        if type(doc[name]) not in types:
            raise EnvelopeError(f"{name} has the wrong type")
    if doc["source"] not in ("pixel", "beacon"):
        raise EnvelopeError("unknown source")
    try:
        _uuid("id", doc["id"])
    except EventError:
        raise EnvelopeError("id is not a UUID") from None
    if revalidate:
        try:
            doc["event"] = validate_event(doc["event"])
        except EventError as exc:
            raise EnvelopeError(f"invalid event: {exc}") from None
        if "event_id" in doc["event"]:
            raise EnvelopeError("event_id belongs in the envelope id")
        if "visitor_id" not in doc["event"]:
            raise EnvelopeError("event has no visitor_id")
    return doc  # type: ignore[return-value]
