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
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from typing import NamedTuple

from processors.urls import CLICK_IDS, NO_PAGE, NO_PARAMS, PageURL, parse_page

RUNNING = frozenset({"running", "active"})
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
_TERM_KEYS = ("utm_term", "utm_campaign", "utm_content")  # searched for segment keywords
# Pages whose anonymous-hit attribution a site keeps (see SiteRefs.pages).
PAGE_CACHE_SIZE = 2048  # per site, and per language group for pages that depend on it
LANGUAGE_MEMO = 256  # browser languages per site mapped to their group without recomputing


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
    active: bool = field(init=False, default=False)  # status is running or active

    def __post_init__(self) -> None:
        object.__setattr__(self, "active", (self.status or "").lower() in RUNNING)

    def running_at(self, t: datetime) -> bool:
        return self.active and (self.start is None or self.start <= t) and (self.end is None or t < self.end)


@dataclass(slots=True, eq=False)
class SiteRefs:
    """What attribution needs of one site. Read-only once attribution uses it: the
    worker builds a new one whenever the site's reference data changes."""

    site: Site
    time_zone: str | None = None  # pipeline.site_settings; None: the default
    segments: tuple[Segment, ...] = ()  # active ones, in tie-break order
    experiments: dict[str, Experiment] = field(default_factory=dict)
    experiments_by_name: dict[str, Experiment] = field(default_factory=dict)
    # page_url ("" for none) -> (the Attribution of a hit there that names nothing else,
    # NO_VISITOR): what ``attribute`` returns for such a hit of a visitor without state,
    # shared, so that the common case allocates nothing. Pages repeat a lot, so most events
    # cost this one lookup: keyed by the URL string alone (faster than (url, language)
    # tuples), as most pages' result does not depend on the browser language. The value is
    # None for a page whose result does (a language-rule segment can match it): that page's
    # results are kept per language group, in ``language_pages``.
    pages: dict[str, PageResult | None] = field(default_factory=dict, repr=False)
    # Browser language as attribution gets it ("es-mx") -> the page results of its language
    # group: the primary subtag when a segment rule names it ("es"), else the group of all
    # other languages. One dict per group, not per language: results differ only between groups.
    language_pages: dict[str | None, dict[str, PageResult]] = field(default_factory=dict, repr=False)
    matcher: SegmentMatcher = field(init=False, repr=False)
    by_language: bool = field(init=False, repr=False)  # some segment has a language rule
    nothing: Attribution = field(init=False, repr=False)  # the result when nothing matches
    _groups: dict[str | None, dict[str, PageResult]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.nothing = Attribution(self.site.owner, None, None, None, None, NO_PARAMS, (), None)
        self._compile()

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name == "segments" and hasattr(self, "nothing"):  # replaced after construction
            self._compile()

    def _compile(self) -> None:
        # Once per site and load of its reference data, not per event.
        self.matcher = SegmentMatcher(self.segments)
        self.by_language = self.matcher.by_language
        self.pages.clear()
        self.language_pages.clear()
        self._groups = {None: {}}

    def pages_for(self, language: str | None) -> dict[str, PageResult]:
        """The page results for browsers in ``language`` (see ``language_pages``)."""
        pages = self.language_pages.get(language)
        if pages is None:
            group = language.split("-", 1)[0] if language else None
            if not self.matcher.has_language(group):
                group = None
            pages = self._groups.get(group)
            if pages is None:
                pages = self._groups[group] = {}
            if len(self.language_pages) < LANGUAGE_MEMO:  # bounded: languages are client input
                self.language_pages[language] = pages
        return pages

    def page(self, page_url: str | None, language: str | None) -> Attribution:
        """Segment (by page and language), campaign (by UTM) and the raw UTM values of a
        hit that names nothing else: what an anonymous visitor's plain hit gets."""
        hit = self.pages.get(page_url or "")
        return (self.page_miss(page_url, language) if hit is None else hit)[0]

    def page_miss(self, page_url: str | None, language: str | None) -> PageResult:
        """``page``'s result (with NO_VISITOR) when ``pages`` does not hold it: a page seen
        for the first time, or one whose result depends on the language group."""
        key = page_url or ""
        by_group = self.pages_for(language) if self.by_language and key in self.pages else None
        if by_group is not None:
            hit = by_group.get(key)
            if hit is not None:
                return hit
        page = parse_page(page_url) if page_url else NO_PAGE
        params = page.params
        segment_id = self.matcher.match(page, language)
        campaign_id = _utm_campaign(self, params) if params else None
        custom = {f"${k}": params[k] for k in UTM_KEYS if params.get(k)} if params else NO_PARAMS
        if segment_id is None and campaign_id is None and not custom and page is NO_PAGE:
            a = self.nothing
        else:
            a = _new(Attribution, (self.site.owner, None, segment_id, None, campaign_id, custom or NO_PARAMS, (),
                                   None, page))
        hit = (a, NO_VISITOR)
        if params and any(c in params for c in CLICK_IDS):
            # A URL with an ad click id is new on every click: caching it would only push
            # out pages that repeat (and give the garbage collector more to walk).
            return hit
        if by_group is None and self.by_language and self.matcher.depends_on_language(page):
            by_group = self.pages_for(language)
            _bounded_put(self.pages, key, None)
        if by_group is not None:
            _bounded_put(by_group, key, hit)
        else:
            _bounded_put(self.pages, key, hit)
        return hit


def _bounded_put(pages: dict, key: str, value: object) -> None:
    if len(pages) >= PAGE_CACHE_SIZE:
        # Bounded: drop the oldest quarter (dicts keep insertion order); no LRU
        # bookkeeping on the hits, which are most events.
        for old in list(islice(pages, PAGE_CACHE_SIZE // 4)):
            del pages[old]
    pages[key] = value


class Attribution(NamedTuple):
    """What attribution gives an event. A NamedTuple: immutable (results are shared
    between events), and built on the per-event path without a Python-level call."""

    user_id: str | None
    lead_id: str | None
    segment_id: str | None
    experiment_id: str | None
    campaign_id: str | None
    custom: dict  # keys to add to custom_data (read-only: may be shared)
    dropped: tuple[str, ...]  # what the event named but could not keep: lead, experiment, campaign
    backfill_lead: str | None  # set when this event linked the visitor to a (new) lead
    # The page URL as parsed here, handed on so that sessionization need not look it up again.
    page: PageURL | None = None


class VisitorAttribution(NamedTuple):
    """Per-visitor attribution state, stored with the session state. A NamedTuple:
    immutable like a frozen dataclass, but built in a fraction of the time."""

    lead_id: str | None = None
    variants: tuple[tuple[str, str], ...] = ()  # (experiment id, variant), sticky

    def variant(self, experiment_id: str) -> str | None:
        for eid, v in self.variants:
            if eid == experiment_id:
                return v
        return None


NO_VISITOR = VisitorAttribution()  # the state of a visitor linked to nothing (shared)
PageResult = tuple[Attribution, VisitorAttribution]  # see SiteRefs.pages

# tuple.__new__(NamedTupleClass, (fields...)) builds one without a Python-level call.
_new = tuple.__new__


# ---------------------------------------------------------------------------


def order_segments(segments: list[Segment]) -> tuple[Segment, ...]:
    """Tie-break order: more rules, longer url, older (undated last), smaller id."""
    return tuple(sorted(segments, key=lambda s: (
        -s.rules, -len(s.url or ""), s.created_at is None, s.created_at or _EPOCH, s.id)))


def _normalise_rule(rule: str) -> str:
    rule = rule.strip().lower()
    for prefix in ("https://", "http://"):
        if rule.startswith(prefix):
            rule = rule[len(prefix):]
    return rule[4:] if rule.startswith("www.") else rule


class SegmentMatcher:
    """A site's segment rules, compiled once when its reference data is loaded.

    Rule-less segments are left out, ``*`` patterns are compiled to regular expressions,
    and the candidates for each language a rule names are listed ahead, in tie-break
    order, so a match is one pass over the segments that can still match, stopping at
    the first (the winner: ``segments`` come in tie-break order).
    """

    __slots__ = ("segments", "by_language", "_any_language", "_by_language")

    def __init__(self, segments: tuple[Segment, ...]) -> None:
        self.segments = segments
        # (id, prefix or None, compiled pattern or None, applies to the path, keywords, language)
        checks = []
        for seg in segments:
            if seg.rules == 0:
                continue  # a segment defining no rule never matches
            prefix = pattern = None
            if seg.url:
                if "*" in seg.url:
                    # What fnmatch.fnmatchcase does per call, done once.
                    pattern = re.compile(fnmatch.translate(seg.url)).match
                else:
                    prefix = seg.url
            checks.append((seg.id, prefix, pattern, bool(seg.url) and seg.url.startswith("/"), seg.keywords,
                           seg.language))
        self._any_language = tuple(c[:5] for c in checks if not c[5])
        self._by_language = {lang: tuple(c[:5] for c in checks if not c[5] or c[5] == lang)
                             for lang in {c[5] for c in checks if c[5]}}
        self.by_language = bool(self._by_language)  # whether the browser language can matter

    def depends_on_language(self, page: PageURL) -> bool:
        """Whether hits on ``page`` get different segments for different browser languages."""
        anyone = self.match(page, None)
        return any(self.match(page, language) != anyone for language in self._by_language)

    def has_language(self, primary: str | None) -> bool:
        """Whether a rule names this language (primary subtag): its browsers are a group."""
        return primary in self._by_language

    def match(self, page: PageURL, language: str | None) -> str | None:
        """The winning segment's id for a hit on ``page`` (keywords are also looked for in
        its utm_term, utm_campaign and utm_content) with browser language ``language``."""
        candidates = self._any_language
        if language and self._by_language:
            candidates = self._by_language.get(language.split("-", 1)[0], candidates)
        haystack = None
        for seg_id, prefix, pattern, on_path, keywords in candidates:
            if prefix is not None:
                if not (page.path if on_path else page.bare).startswith(prefix):
                    continue
            elif pattern is not None and pattern(page.path if on_path else page.bare) is None:
                continue
            if keywords:
                if haystack is None:
                    params = page.params
                    haystack = page.bare + " " + " ".join(params.get(k, "") for k in _TERM_KEYS).lower()
                if not any(k in haystack for k in keywords):
                    continue
            return seg_id
        return None


def match_segment(segments: tuple[Segment, ...], page_url: str | None, params: Mapping[str, str],
                  language: str | None) -> str | None:
    """The winning segment of ``segments`` (in tie-break order) for a page, its UTM
    ``params`` and a browser language (compiles the rules: for one-off use)."""
    page = parse_page(page_url) if page_url else NO_PAGE
    return SegmentMatcher(segments).match(page._replace(params=params), language)


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


def _names_something(custom: object) -> bool:
    """Whether custom_data may name an email or experiment (usual click or step data does not)."""
    return bool(custom) and (type(custom) is not dict or "email" in custom or "experiment" in custom)


def attribute(event: Mapping, refs: SiteRefs, leads: RefSnapshot, visitor: VisitorAttribution,
              t: datetime, language: str | None) -> tuple[Attribution, VisitorAttribution]:
    """Attribute one event of an existing site. ``leads`` is the batch's reference data
    (already loaded); its lead lookup is fetched only for an event that needs it.

    The Attribution returned may be shared between events: read-only."""
    # What the page gives a hit that names nothing else (cached per site; see SiteRefs.pages).
    page_url = event.get("page_url")
    hit = refs.pages.get(page_url or "")
    if hit is None:  # not seen yet, or its result depends on the language
        hit = refs.page_miss(page_url, language)
    # ``in`` rather than get(): cheaper, and a key present but empty takes the full path,
    # which gives such an event the page's result too.
    if (visitor is NO_VISITOR or not (visitor.lead_id or visitor.variants)) and not (
            "lead_id" in event or "experiment_id" in event or "campaign_id" in event
            or ("custom_data" in event and _names_something(event["custom_data"]))):
        # The common case: an anonymous visitor's hit naming no lead, email, experiment or
        # campaign gets the page's result, as the very pair returned (nothing allocated).
        return hit if visitor is NO_VISITOR else (hit[0], visitor)
    base = hit[0]  # the rest overrides it
    custom_in = event.get("custom_data")
    if type(custom_in) is not dict:
        custom_in = NO_PARAMS
    dropped: tuple[str, ...] = ()

    # Lead: named by id, or by email; else the one the visitor was linked to before.
    lead: Lead | None = None
    lead_id = visitor.lead_id
    named = event.get("lead_id")
    # Fetched only when a lead is involved (experiment-only events are most of this path).
    lookup_lead = (leads.lookup_lead(refs.site.id) if named or lead_id is not None or "email" in custom_in
                   else None)
    if named:
        lead = lookup_lead(named, None)
        if lead is None or lead.site_id != refs.site.id:
            dropped = ("lead",)
            lead = None
    if lead is None and "email" in custom_in:
        email = custom_in["email"]
        if isinstance(email, str) and "@" in email:
            lead = lookup_lead(None, email.strip().lower())
    backfill = None
    if lead is not None:
        if lead.id != lead_id:
            backfill = lead_id = lead.id
            visitor = _new(VisitorAttribution, (lead_id, visitor.variants))
    elif lead_id is not None:
        lead = lookup_lead(lead_id, None)

    # Segment: the lead's, else the page's.
    segment_id = lead.segment_id if lead is not None and lead.segment_id else base.segment_id

    # Experiment: named on the event, else the visitor's running one.
    custom = base.custom  # shared: copied before adding to it
    experiment_id = None
    named_exp = event.get("experiment_id") or (
        as_uuid(custom_in["experiment"]) if "experiment" in custom_in else None)
    if named_exp:
        exp = refs.experiments.get(named_exp)
        if exp is not None and exp.running_at(t):
            experiment_id = exp.id
            for eid, variant in visitor.variants:
                if eid == experiment_id:
                    break
            else:
                variant = str(custom_in.get("variant", ""))
                visitor = _new(VisitorAttribution, (visitor.lead_id, visitor.variants + ((experiment_id, variant),)))
            custom = {**custom, "$variant": variant}
        else:
            dropped += ("experiment",)
    elif visitor.variants:
        for eid, variant in reversed(visitor.variants):
            exp = refs.experiments.get(eid)
            if exp is not None and exp.running_at(t):
                experiment_id = eid
                custom = {**custom, "$variant": variant}
                break

    # Campaign: named on the event, else the page's UTM campaign.
    campaign_id = base.campaign_id
    named_campaign = event.get("campaign_id")
    if named_campaign:
        if named_campaign in refs.experiments:
            campaign_id = named_campaign
        else:
            campaign_id = None
            dropped += ("campaign",)

    if lead_id is None and experiment_id is None and campaign_id == base.campaign_id and not dropped:
        return base, visitor  # named nothing that counts: the page's result
    return _new(Attribution, (refs.site.owner, lead_id, segment_id, experiment_id, campaign_id, custom,
                              dropped, backfill, base.page)), visitor


@dataclass
class RefSnapshot:
    """The reference data one batch needs, loaded by the worker before attribution.

    A key present with value None was looked up and does not exist."""

    sites: dict[str, SiteRefs | None] = field(default_factory=dict)
    leads: dict[str, Lead | None] = field(default_factory=dict)  # by id
    emails: dict[tuple[str, str], Lead | None] = field(default_factory=dict)  # (site, lower email)
    # Built on first use (the snapshot is read-only by then): one lookup per site, and
    # the leads found by email indexed by id.
    _lookups: dict[str, LeadLookup] = field(default_factory=dict, repr=False, compare=False)
    _email_leads: dict[str, Lead] | None = field(default=None, repr=False, compare=False)

    def lookup_lead(self, site_id: str) -> LeadLookup:
        lookup = self._lookups.get(site_id)
        if lookup is not None:
            return lookup

        def lookup(lead_id: str | None, email: str | None) -> Lead | None:
            if lead_id is not None:
                lead = self.leads.get(lead_id)
                if lead is None:  # linked by email earlier in this same batch
                    if self._email_leads is None:
                        self._email_leads = {}
                        for x in self.emails.values():
                            if x is not None:
                                self._email_leads.setdefault(x.id, x)
                    lead = self._email_leads.get(lead_id)
                return lead
            return self.emails.get((site_id, email or ""))

        self._lookups[site_id] = lookup
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
