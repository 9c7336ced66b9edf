"""Attribution: a pure function of (event, reference data, visitor state).

Fills ``user_id`` (the site's owner), ``lead_id``, ``segment_id``, ``experiment_id``
and ``campaign_id`` of a visitor_events row. The rules (docs/attribution.md):

* **Site**: must exist (else the event is dead-lettered as ``unknown_site``);
  ``user_id`` is its owner.
* **Lead**: an event naming a lead of the site by ``lead_id``, or an email
  (``custom_data.email``) equal to a lead's email (case-insensitive), links the visitor
  to that lead; every later event of the visitor carries it. The first link (or a
  change) asks for a back-fill of the visitor's earlier anonymous events. A
  ``lead_id`` that is not a lead of the site is dropped (and counted).
* **Segment**: the lead's segment when it has one; else the site's active segment whose
  rules all match (url prefix or ``*`` pattern, keywords in the page URL or UTM terms,
  language of the browser); ties go to the segment with more rules, then the longer
  url, then the older, then the smaller id.
* **Experiment**: ``experiment_id`` (or ``custom_data.experiment``) is kept only if the
  experiment belongs to the site and is running at the event's time (status running or
  active, within start/end dates); else it is dropped (and counted). The first variant a
  visitor gets in an experiment sticks for the experiment's life; later events of the
  visitor carry the experiment while it runs.
* **Campaign** (``campaign_id`` references experiments): an explicit ``campaign_id`` of
  the site wins; else ``utm_campaign`` naming an experiment of the site (by id or by
  name, case-insensitive). Raw UTM values go to ``custom_data`` as ``$utm_*``.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qsl, urlsplit

RUNNING = frozenset({"running", "active"})
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")


@dataclass(frozen=True, slots=True)
class Site:
    id: str
    owner: str | None


@dataclass(frozen=True, slots=True)
class Lead:
    id: str
    site_id: str
    segment_id: str | None


@dataclass(frozen=True, slots=True)
class Segment:
    id: str
    url: str | None  # prefix, or a pattern with *; stored normalised (see _normalise_rule)
    keywords: tuple[str, ...]  # lower case
    language: str | None  # ISO 639-1
    created_at: datetime | None
    rules: int = field(init=False, default=0)  # how many of url, keywords, language are set

    def __post_init__(self) -> None:
        # Normalised and counted once here, not per event.
        url = _normalise_rule(self.url) if self.url else None
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "rules", bool(url) + bool(self.keywords) + bool(self.language))


@dataclass(frozen=True, slots=True)
class Experiment:
    id: str
    site_id: str
    name: str | None
    status: str | None
    start: datetime | None
    end: datetime | None

    def running_at(self, t: datetime) -> bool:
        return ((self.status or "").lower() in RUNNING
                and (self.start is None or self.start <= t)
                and (self.end is None or t < self.end))


@dataclass
class SiteRefs:
    """What attribution needs of one site."""

    site: Site
    time_zone: str | None = None  # pipeline.site_settings; None: the default
    segments: tuple[Segment, ...] = ()  # active ones, in tie-break order
    experiments: dict[str, Experiment] = field(default_factory=dict)
    experiments_by_name: dict[str, Experiment] = field(default_factory=dict)
    # (page_url, language) -> matched segment: pages and languages repeat a lot
    segment_matches: dict[tuple[str | None, str | None], str | None] = field(default_factory=dict)

    def segment_for(self, page_url: str | None, params: Mapping[str, str], language: str | None) -> str | None:
        key = (page_url, language)
        try:
            return self.segment_matches[key]
        except KeyError:
            pass
        if len(self.segment_matches) > 4096:  # bounded; the cache entry is rebuilt anyway
            self.segment_matches.clear()
        hit = self.segment_matches[key] = match_segment(self.segments, page_url, params, language)
        return hit


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us per event here
class Attribution:
    user_id: str | None
    lead_id: str | None
    segment_id: str | None
    experiment_id: str | None
    campaign_id: str | None
    custom: dict  # keys to add to custom_data (read-only: may be shared)
    dropped: tuple[str, ...]  # what the event named but could not keep: lead, experiment, campaign
    backfill_lead: str | None  # set when this event linked the visitor to a (new) lead


@dataclass(frozen=True, slots=True)
class VisitorAttribution:
    """Per-visitor attribution state, stored with the session state."""

    lead_id: str | None = None
    variants: tuple[tuple[str, str], ...] = ()  # (experiment id, variant), sticky

    def variant(self, experiment_id: str) -> str | None:
        for eid, v in self.variants:
            if eid == experiment_id:
                return v
        return None


# ---------------------------------------------------------------------------


def order_segments(segments: list[Segment]) -> tuple[Segment, ...]:
    """Tie-break order: more rules, longer url, older (undated last), smaller id."""
    return tuple(sorted(segments, key=lambda s: (
        -s.rules, -len(s.url or ""), s.created_at is None, s.created_at or _EPOCH, s.id)))


_NO_PARTS: tuple[str, str, dict[str, str]] = ("", "", {})


@lru_cache(maxsize=16384)
def _url_parts(url: str | None) -> tuple[str, str, dict[str, str]]:
    """(url without scheme, lower-cased; path; query params). Cached: pages repeat a lot.
    Callers must not modify the returned dict."""
    if not url:
        return _NO_PARTS
    try:
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query)) if parts.query else {}
    except ValueError:
        return url.lower(), "", {}
    bare = (parts.netloc + parts.path + ("?" + parts.query if parts.query else "")).lower()
    if bare.startswith("www."):
        bare = bare[4:]
    return bare, parts.path.lower(), params


def _normalise_rule(rule: str) -> str:
    rule = rule.strip().lower()
    for prefix in ("https://", "http://"):
        if rule.startswith(prefix):
            rule = rule[len(prefix):]
    return rule[4:] if rule.startswith("www.") else rule


def _url_matches(rule: str, bare: str, path: str) -> bool:
    target = path if rule.startswith("/") else bare
    if "*" in rule:
        return fnmatch.fnmatchcase(target, rule)
    return target.startswith(rule)


def match_segment(segments: tuple[Segment, ...], page_url: str | None, params: Mapping[str, str],
                  language: str | None) -> str | None:
    if not segments:
        return None
    bare, path, _ = _url_parts(page_url) if page_url else _NO_PARTS
    haystack = None
    for seg in segments:  # already in tie-break order: the first match wins
        if seg.rules == 0:
            continue
        if seg.url and not _url_matches(seg.url, bare, path):
            continue
        if seg.keywords:
            if haystack is None:
                terms = " ".join(params.get(k, "") for k in ("utm_term", "utm_campaign", "utm_content"))
                haystack = bare + " " + terms.lower()
            if not any(k in haystack for k in seg.keywords):
                continue
        if seg.language and (language or "").split("-", 1)[0] != seg.language:
            continue
        return seg.id
    return None


@lru_cache(maxsize=16384)
def _utm_custom(page_url: str) -> dict[str, str]:
    """The page's UTM values as custom_data keys (shared: callers copy before changing)."""
    params = _url_parts(page_url)[2]
    return {f"${k}": params[k] for k in UTM_KEYS if params.get(k)}


def _utm_campaign(refs: SiteRefs, params: Mapping[str, str]) -> str | None:
    """utm_campaign naming an experiment of the site, by id or by name."""
    utm = params.get("utm_campaign")
    if not utm:
        return None
    lowered = utm.strip().lower()
    hit = refs.experiments.get(lowered) or refs.experiments_by_name.get(lowered)
    return hit.id if hit is not None else None


def as_uuid(value: object) -> str | None:
    """The canonical form of a UUID string, else None."""
    if not isinstance(value, str) or len(value) not in (32, 36):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


LeadLookup = Callable[..., "Lead | None"]


def attribute(event: Mapping, refs: SiteRefs, lookup_lead: LeadLookup, visitor: VisitorAttribution,
              t: datetime, language: str | None) -> tuple[Attribution, VisitorAttribution]:
    """Attribute one event of an existing site. ``lookup_lead(lead_id=…, email=…)``
    returns a ``Lead`` of this site or None (reference data, already loaded)."""
    site_id = refs.site.id
    custom_in = event.get("custom_data") or {}
    dropped: list[str] = []
    page_url = event.get("page_url")
    params = _url_parts(page_url)[2] if page_url else _NO_PARTS[2]
    utm = _utm_custom(page_url) if params else _NO_PARTS[2]

    if not (visitor.lead_id or visitor.variants or custom_in or "lead_id" in event
            or "experiment_id" in event or "campaign_id" in event):
        # The common case: an anonymous visitor's plain hit.
        return Attribution(refs.site.owner, None, refs.segment_for(page_url, params, language), None,
                           _utm_campaign(refs, params), utm, (), None), visitor
    custom = dict(utm)

    # Lead: named by id, or by email; else the one the visitor was linked to before.
    lead: Lead | None = None
    named = event.get("lead_id")
    if named:
        lead = lookup_lead(lead_id=named, email=None)
        if lead is None or lead.site_id != site_id:
            dropped.append("lead")
            lead = None
    email = custom_in.get("email") if isinstance(custom_in, dict) else None
    if lead is None and isinstance(email, str) and "@" in email:
        lead = lookup_lead(lead_id=None, email=email.strip().lower())
    backfill = None
    if lead is not None and lead.id != visitor.lead_id:
        backfill = lead.id
        visitor = VisitorAttribution(lead.id, visitor.variants)
    lead_id = lead.id if lead is not None else visitor.lead_id
    if lead is None and visitor.lead_id is not None:
        lead = lookup_lead(lead_id=visitor.lead_id, email=None)

    # Segment.
    if lead is not None and lead.segment_id:
        segment_id = lead.segment_id
    else:
        segment_id = refs.segment_for(page_url, params, language)

    # Experiment: named on the event, else the visitor's running one.
    experiment_id = None
    named_exp = event.get("experiment_id") or (
        as_uuid(custom_in.get("experiment")) if isinstance(custom_in, dict) else None)
    if named_exp:
        exp = refs.experiments.get(named_exp)
        if exp is not None and exp.running_at(t):
            experiment_id = exp.id
            variant = visitor.variant(exp.id)
            if variant is None:
                variant = str(custom_in.get("variant", "")) if isinstance(custom_in, dict) else ""
                visitor = VisitorAttribution(visitor.lead_id, visitor.variants + ((exp.id, variant),))
            custom["$variant"] = variant
        else:
            dropped.append("experiment")
    else:
        for eid, variant in reversed(visitor.variants):
            exp = refs.experiments.get(eid)
            if exp is not None and exp.running_at(t):
                experiment_id = eid
                custom["$variant"] = variant
                break

    # Campaign.
    campaign_id = None
    named_campaign = event.get("campaign_id")
    if named_campaign:
        if named_campaign in refs.experiments:
            campaign_id = named_campaign
        else:
            dropped.append("campaign")
    else:
        campaign_id = _utm_campaign(refs, params)

    return Attribution(refs.site.owner, lead_id, segment_id, experiment_id, campaign_id, custom,
                       tuple(dropped), backfill), visitor


@dataclass
class RefSnapshot:
    """The reference data one batch needs, loaded by the worker before attribution.

    A key present with value None was looked up and does not exist."""

    sites: dict[str, SiteRefs | None] = field(default_factory=dict)
    leads: dict[str, Lead | None] = field(default_factory=dict)  # by id
    emails: dict[tuple[str, str], Lead | None] = field(default_factory=dict)  # (site, lower email)

    def lookup_lead(self, site_id: str) -> LeadLookup:
        def lookup(lead_id: str | None, email: str | None) -> Lead | None:
            if lead_id is not None:
                lead = self.leads.get(lead_id)
                if lead is None:  # linked by email earlier in this same batch
                    lead = next((x for x in self.emails.values() if x is not None and x.id == lead_id), None)
                return lead
            return self.emails.get((site_id, email or ""))

        return lookup


@dataclass
class Needs:
    """Reference data keys a batch refers to."""

    sites: set[str] = field(default_factory=set)
    leads: set[str] = field(default_factory=set)
    emails: set[tuple[str, str]] = field(default_factory=set)


def needs_of(event: Mapping, visitor: VisitorAttribution, needs: Needs) -> None:
    site_id = event["site_id"]
    needs.sites.add(site_id)
    if event.get("lead_id"):
        needs.leads.add(event["lead_id"])
    if visitor.lead_id:
        needs.leads.add(visitor.lead_id)
    custom = event.get("custom_data")
    if isinstance(custom, dict) and isinstance(custom.get("email"), str) and "@" in custom["email"]:
        needs.emails.add((site_id, custom["email"].strip().lower()))
