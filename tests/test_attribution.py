"""Attribution rules (pure): leads, segments, experiments, campaigns."""

from datetime import datetime, timedelta, timezone

import pytest

from processors.attribution import (
    Experiment,
    Lead,
    RefSnapshot,
    Segment,
    Site,
    SiteRefs,
    VisitorAttribution,
    attribute,
    match_segment,
    order_segments,
)

UTC = timezone.utc
T = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SITE, OWNER = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
LEAD, OTHER_LEAD = "33333333-3333-4333-8333-333333333333", "44444444-4444-4444-8444-444444444444"
SEG_LEAD, SEG_BLOG, SEG_ES = ("55555555-5555-4555-8555-55555555555" + c for c in "abc")
EXP, EXP_OLD, EXP_OTHER = ("66666666-6666-4666-8666-66666666666" + c for c in "abc")


def refs(segments=(), experiments=()) -> SiteRefs:
    r = SiteRefs(Site(SITE, OWNER), segments=order_segments(list(segments)))
    for e in experiments:
        r.experiments[e.id] = e
        r.experiments_by_name[e.name.lower()] = e
    return r


def snapshot() -> RefSnapshot:
    return RefSnapshot(
        leads={LEAD: Lead(LEAD, SITE, SEG_LEAD), OTHER_LEAD: Lead(OTHER_LEAD, "elsewhere", None)},
        emails={(SITE, "ana@example.com"): Lead(LEAD, SITE, SEG_LEAD)},
    )


def run(event, site_refs=None, visitor=VisitorAttribution(), t=T, lang=None):
    event = {"site_id": SITE, "event_type": "pageview", "visitor_id": "v1", **event}
    return attribute(event, site_refs or refs(), snapshot(), visitor, t, lang)


def test_user_id_is_the_site_owner():
    a, _ = run({})
    assert a.user_id == OWNER and a.lead_id is None and a.dropped == ()


def test_lead_by_id_links_the_visitor_and_asks_for_backfill():
    a, visitor = run({"event_type": "identify", "lead_id": LEAD})
    assert a.lead_id == LEAD and a.backfill_lead == LEAD and visitor.lead_id == LEAD
    a2, _ = run({}, visitor=visitor)  # later events carry the lead, no second back-fill
    assert a2.lead_id == LEAD and a2.backfill_lead is None


def test_lead_by_email_case_insensitive():
    a, visitor = run({"event_type": "identify", "custom_data": {"email": " Ana@Example.com "}})
    assert a.lead_id == LEAD and visitor.lead_id == LEAD


def test_unknown_email_or_foreign_lead_is_not_linked():
    a, visitor = run({"custom_data": {"email": "nobody@example.com"}})
    assert a.lead_id is None and visitor.lead_id is None and a.dropped == ()
    a, visitor = run({"lead_id": OTHER_LEAD})  # a lead of another site
    assert a.lead_id is None and a.dropped == ("lead",)
    a, _ = run({"lead_id": "77777777-7777-4777-8777-777777777777"})
    assert a.lead_id is None and a.dropped == ("lead",)


def test_segment_comes_from_the_lead_first():
    blog = Segment(SEG_BLOG, "https://shop.example/blog", (), None, T)
    a, _ = run({"lead_id": LEAD, "page_url": "https://shop.example/blog/x"}, site_refs=refs([blog]))
    assert a.segment_id == SEG_LEAD


@pytest.mark.parametrize("url_rule, page, hit", [
    ("https://shop.example/blog", "https://shop.example/blog/post-1", True),
    ("https://shop.example/blog", "http://www.shop.example/blog", True),
    ("https://shop.example/blog", "https://shop.example/shop", False),
    ("/blog", "https://any.example/blog/x?y=1", True),
    ("/blog", "https://any.example/x/blog", False),
    ("shop.example/*/pricing", "https://shop.example/en/pricing", True),
    ("shop.example/*/pricing", "https://shop.example/en/about", False),
])
def test_segment_url_rule(url_rule, page, hit):
    seg = Segment(SEG_BLOG, url_rule, (), None, T)
    assert (match_segment((seg,), page, {}, None) == SEG_BLOG) is hit


def test_segment_keywords_match_url_or_utm_terms():
    seg = Segment(SEG_BLOG, None, ("shoes", "sneakers"), None, T)
    assert match_segment((seg,), "https://a.example/red-shoes", {}, None) == SEG_BLOG
    assert match_segment((seg,), "https://a.example/", {"utm_term": "Sneakers sale"}, None) == SEG_BLOG
    assert match_segment((seg,), "https://a.example/hats", {"utm_source": "shoes"}, None) is None


def test_segment_language_and_all_rules_must_match():
    es = Segment(SEG_ES, "/blog", (), "es", T)
    assert match_segment((es,), "https://a.example/blog", {}, "es-mx") == SEG_ES
    assert match_segment((es,), "https://a.example/blog", {}, "en-gb") is None
    assert match_segment((es,), "https://a.example/shop", {}, "es") is None
    assert match_segment((Segment(SEG_ES, None, (), None, T),), "https://a.example/", {}, "es") is None


def test_segment_tie_break_more_rules_then_longer_url_then_older():
    broad = Segment(SEG_BLOG, "/blog", (), None, T - timedelta(days=9))
    narrow = Segment(SEG_ES, "/blog/es", (), None, T)
    two_rules = Segment(SEG_LEAD, "/blog", ("es",), None, T)
    page = "https://a.example/blog/es/hola"
    assert match_segment(order_segments([broad, narrow]), page, {}, None) == SEG_ES
    assert match_segment(order_segments([broad, narrow, two_rules]), page, {}, None) == SEG_LEAD
    older = Segment(SEG_ES, "/blog", (), None, T - timedelta(days=30))
    assert match_segment(order_segments([broad, older]), page, {}, None) == SEG_ES


def running(eid=EXP, name="Checkout test", status="running", start=T - timedelta(days=1), end=None):
    return Experiment(eid, SITE, name, status, start, end)


def test_experiment_kept_only_when_of_the_site_and_running():
    site = refs(experiments=[running(), running(EXP_OLD, "Old", end=T - timedelta(hours=1)),
                             running(EXP_OTHER, "Draft", status="draft")])
    a, visitor = run({"experiment_id": EXP, "custom_data": {"variant": "B"}}, site_refs=site)
    assert a.experiment_id == EXP and a.custom["$variant"] == "B" and visitor.variant(EXP) == "B"
    for stale in (EXP_OLD, EXP_OTHER, "77777777-7777-4777-8777-777777777777"):
        a, _ = run({"experiment_id": stale}, site_refs=site)
        assert a.experiment_id is None and a.dropped == ("experiment",)
    a, _ = run({"experiment_id": EXP}, site_refs=site, t=T - timedelta(days=2))  # before its start
    assert a.experiment_id is None


def test_experiment_from_custom_data_and_sticky_variant():
    site = refs(experiments=[running()])
    _, visitor = run({"custom_data": {"experiment": EXP, "variant": "A"}}, site_refs=site)
    a, visitor = run({"experiment_id": EXP, "custom_data": {"variant": "B"}}, site_refs=site, visitor=visitor)
    assert a.custom["$variant"] == "A"  # the first assignment sticks
    a, _ = run({}, site_refs=site, visitor=visitor)  # later events carry it while it runs
    assert a.experiment_id == EXP
    a, _ = run({}, site_refs=site, visitor=visitor, t=T - timedelta(days=3))
    assert a.experiment_id is None


def test_campaign_explicit_then_utm_by_id_or_name():
    site = refs(experiments=[running(), running(EXP_OLD, "Spring Sale")])
    a, _ = run({"campaign_id": EXP}, site_refs=site)
    assert a.campaign_id == EXP
    a, _ = run({"campaign_id": "77777777-7777-4777-8777-777777777777"}, site_refs=site)
    assert a.campaign_id is None and a.dropped == ("campaign",)
    a, _ = run({"page_url": "https://a.example/?utm_campaign=spring%20sale&utm_source=news"}, site_refs=site)
    assert a.campaign_id == EXP_OLD
    assert a.custom == {"$utm_campaign": "spring sale", "$utm_source": "news"}
    a, _ = run({"page_url": f"https://a.example/?utm_campaign={EXP}"}, site_refs=site)
    assert a.campaign_id == EXP
    a, _ = run({"page_url": "https://a.example/?utm_campaign=unknown"}, site_refs=site)
    assert a.campaign_id is None and a.custom["$utm_campaign"] == "unknown"


# -- the compiled segment matcher and the per-page cache ---------------------------------

import fnmatch  # noqa: E402
import random  # noqa: E402

from processors.attribution import PAGE_CACHE_SIZE, SegmentMatcher  # noqa: E402
from processors.sessions import traffic_source  # noqa: E402
from processors.urls import parse_page  # noqa: E402


def reference_segment(segments, page_url, params, language):
    """docs/attribution.md's segment rules, read literally: every segment whose rules all
    match, the winner by the tie-break (more rules, longer url, older, smaller id)."""
    page = parse_page(page_url) if page_url else None
    bare, path = (page.bare, page.path) if page else ("", "")
    terms = " ".join(params.get(k, "") for k in ("utm_term", "utm_campaign", "utm_content")).lower()
    matching = []
    for seg in segments:
        if not (seg.url or seg.keywords or seg.language):
            continue
        if seg.url:
            target = path if seg.url.startswith("/") else bare
            if not (fnmatch.fnmatchcase(target, seg.url) if "*" in seg.url else target.startswith(seg.url)):
                continue
        if seg.keywords and not any(k in bare + " " + terms for k in seg.keywords):
            continue
        if seg.language and (language or "").split("-")[0] != seg.language:
            continue
        matching.append(seg)
    if not matching:
        return None
    return min(matching, key=lambda s: (-s.rules, -len(s.url or ""), s.created_at is None,
                                        s.created_at or datetime.min.replace(tzinfo=UTC), s.id)).id


def matcher_segment(segments, page_url, params, language):
    page = parse_page(page_url) if page_url else parse_page("")
    return SegmentMatcher(order_segments(list(segments))).match(page._replace(params=params), language)


def test_matcher_positive_and_negative_cases():
    blog = Segment(SEG_BLOG, "https://www.Shop.example/blog", (), None, T)
    es = Segment(SEG_ES, "/es/*", ("hola",), "es", T)
    m = SegmentMatcher(order_segments([blog, es]))
    assert m.by_language
    assert m.match(parse_page("http://shop.example/blog/x"), None) == SEG_BLOG
    assert m.match(parse_page("https://other.example/blog/x"), None) is None
    assert m.match(parse_page("https://a.example/es/blog/hola"), "es-mx") == SEG_ES
    assert m.match(parse_page("https://a.example/es/blog/hola"), "en") is None  # language
    assert m.match(parse_page("https://a.example/es/blog/adios"), "es") is None  # keyword
    assert m.match(parse_page("https://a.example/en/es/hola"), "es") is None  # pattern over the whole path
    page = parse_page("https://a.example/es/x?utm_term=HOLA")
    assert m.match(page, "es") == SEG_ES  # keyword in a UTM term
    assert not SegmentMatcher(order_segments([blog])).by_language
    assert SegmentMatcher(()).match(page, "es") is None
    assert SegmentMatcher((Segment(SEG_ES, None, (), None, T),)).match(page, "es") is None  # no rules


def test_matcher_tie_break():
    page = parse_page("https://a.example/blog/es/hola")
    broad = Segment(SEG_BLOG, "/blog", (), None, T - timedelta(days=9))
    narrow = Segment(SEG_ES, "/blog/es", (), None, T)
    two_rules = Segment(SEG_LEAD, "/blog", ("hola",), None, T)
    assert SegmentMatcher(order_segments([broad, narrow])).match(page, None) == SEG_ES  # longer url
    assert SegmentMatcher(order_segments([narrow, two_rules])).match(page, None) == SEG_LEAD  # more rules
    older = Segment(SEG_ES, "/blog", (), None, T - timedelta(days=30))
    assert SegmentMatcher(order_segments([broad, older])).match(page, None) == SEG_ES  # older
    twin = Segment(SEG_ES, "/blog", (), None, T - timedelta(days=9))
    assert SegmentMatcher(order_segments([twin, broad])).match(page, None) == SEG_BLOG  # smaller id
    # A language rule counts as a rule: with Spanish it wins, otherwise the next one does.
    lang = Segment(SEG_LEAD, "/blog", (), "es", T)
    assert SegmentMatcher(order_segments([narrow, lang])).match(page, "es") == SEG_LEAD
    assert SegmentMatcher(order_segments([narrow, lang])).match(page, "de") == SEG_ES


def test_matcher_agrees_with_the_rules_on_random_cases():
    rng = random.Random(4)
    urls = [None, "/blog", "/blog/es", "/b", "/*/hola", "/blog*", "shop.example", "https://www.shop.example/blog",
            "shop.example/*/pricing", "*.example/es*", "/ES", "other.example/", "shop.example/blog?x=1"]
    keywords = [(), (), ("shoes",), ("hola", "sale"), ("blog",), ("spring sale",)]
    languages = [None, None, "es", "en", "pt"]
    pages = ["https://shop.example/blog/es/hola", "http://www.shop.example/blog", "https://shop.example/en/pricing",
             "https://other.example/es/shoes", "https://shop.example/blog?x=1&utm_term=Sale", "/relative/blog",
             "https://[broken/blog", "https://SHOP.example/Blog/ES", None]
    params_pool = [{}, {"utm_term": "Shoes"}, {"utm_campaign": "spring sale", "utm_content": "x"},
                   {"utm_source": "blog"}]
    ids = [f"5555555{i}-5555-4555-8555-555555555555" for i in range(8)]
    for _ in range(3000):
        segments = [Segment(rng.choice(ids), rng.choice(urls), rng.choice(keywords), rng.choice(languages),
                            rng.choice([None, T, T - timedelta(days=rng.randrange(1, 5))]))
                    for _ in range(rng.randrange(0, 7))]
        segments = list({s.id: s for s in segments}.values())  # ids are unique
        page, params = rng.choice(pages), rng.choice(params_pool)
        language = rng.choice([None, "es", "es-mx", "en-gb", "pt"])
        expected = reference_segment(segments, page, params, language)
        assert matcher_segment(segments, page, params, language) == expected, (segments, page, params, language)
        assert match_segment(order_segments(segments), page, params, language) == expected


def test_page_results_are_cached_per_page_and_language_and_bounded():
    es = Segment(SEG_ES, "/blog", (), "es", T)
    site = refs([es])
    a, _ = run({"page_url": "https://a.example/blog/x?utm_source=news"}, site_refs=site, lang="es-es")
    b, _ = run({"page_url": "https://a.example/blog/x?utm_source=news", "custom_data": {"element": "cta"}},
               site_refs=site, lang="es-es")
    assert a is b and a.segment_id == SEG_ES and a.custom == {"$utm_source": "news"}
    c, _ = run({"page_url": "https://a.example/blog/x?utm_source=news"}, site_refs=site, lang="en")
    assert c.segment_id is None and c.custom == a.custom  # keyed by language too
    for i in range(PAGE_CACHE_SIZE + 10):
        site.page(f"https://a.example/{i}", None)
    assert len(site.pages) <= PAGE_CACHE_SIZE
    assert site.pages_for("es-mx") is site.pages_for("es") is not site.pages_for("en")  # one cache per group
    assert site.pages_for("en") is site.pages_for(None) is site.pages_for("español")
    site.segments = order_segments([Segment(SEG_BLOG, "/blog", (), None, T)])  # recompiled, cache dropped
    assert not site.by_language and not site.pages
    assert site.page("https://a.example/blog/x", "es").segment_id == SEG_BLOG


def test_events_naming_something_get_what_the_plain_hit_gets_plus_that():
    site = refs([Segment(SEG_BLOG, "/blog", (), None, T)], experiments=[running()])
    plain, _ = run({"page_url": "https://a.example/blog?utm_campaign=checkout%20test"}, site_refs=site)
    assert plain.segment_id == SEG_BLOG and plain.campaign_id == EXP
    a, visitor = run({"page_url": "https://a.example/blog?utm_campaign=checkout%20test", "experiment_id": EXP,
                      "custom_data": {"variant": "B", "email": "nobody@example.com"}}, site_refs=site)
    assert (a.segment_id, a.campaign_id, a.experiment_id) == (SEG_BLOG, EXP, EXP)
    assert a.custom == {"$utm_campaign": "checkout test", "$variant": "B"}
    assert plain.custom == {"$utm_campaign": "checkout test"}  # the shared result is left alone
    a, _ = run({"page_url": "https://a.example/blog?utm_campaign=checkout%20test"}, site_refs=site, visitor=visitor)
    assert a.experiment_id == EXP and a.custom["$variant"] == "B"
    a, _ = run({"page_url": "https://a.example/blog", "custom_data": {"email": "nobody@example.com"}},
               site_refs=site)
    assert a is site.page("https://a.example/blog", None)  # named nothing that counts


def test_parse_page_and_the_session_source_it_carries():
    p = parse_page("HTTPS://WWW.Shop.example:8080/Blog/X?utm_source=News&utm_medium=email&gclid=1&e=")
    assert p.ok and p.bare == "shop.example:8080/blog/x?utm_source=news&utm_medium=email&gclid=1&e="
    assert p.path == "/blog/x" and p.host == "shop.example" and p.params["utm_source"] == "News"
    assert "e" not in p.params and p.source == "utm:news/email/"
    assert parse_page("https://a.example/?fbclid=x").source == "click:fbclid"
    broken = parse_page("https://[broken/Blog")
    assert not broken.ok and broken.bare == "https://[broken/blog" and broken.host is None and broken.source is None
    for page, ref in [("https://a.example/x?utm_source=y", None), ("https://www.a.example/", "https://a.example/y"),
                      ("https://a.example/", "https://google.com/"), ("https://[broken/", "https://b.example/")]:
        assert traffic_source(page, ref, None, parse_page(page)) == traffic_source(page, ref)


def test_lookup_is_built_once_per_site_and_finds_leads_linked_by_email_in_the_batch():
    snap = snapshot()
    lookup = snap.lookup_lead(SITE)
    assert snap.lookup_lead(SITE) is lookup
    del snap.leads[LEAD]
    assert lookup(LEAD, None) == Lead(LEAD, SITE, SEG_LEAD)  # linked by email earlier in the batch
    assert lookup(None, "ana@example.com").id == LEAD and lookup(None, "x@example.com") is None


# -- the cheap paths give exactly what the full computation gives -------------------------

from processors.attribution import LANGUAGE_MEMO, NO_VISITOR, Needs, as_uuid, needs_of  # noqa: E402
from processors.urls import NO_PAGE  # noqa: E402
from processors.enrich import Enricher, VisitorState  # noqa: E402
from processors.device import DeviceDetector  # noqa: E402


def mixed_events(rng, n):
    """Events of five visitors mixing everything attribution looks at, including keys
    present but empty, URLs with ad click ids, and no page at all."""
    pages = ["https://a.example/blog/x", "https://a.example/es/hola", "https://a.example/shop?utm_term=shoes",
             "https://a.example/?utm_campaign=checkout%20test&utm_source=news", "https://a.example/?gclid=1",
             "https://a.example/blog?fbclid=2&utm_source=ads", None, ""]
    customs = [None, {}, {"element": "cta"}, {"email": " Ana@Example.com "}, {"email": "nobody@example.com"},
               {"experiment": EXP, "variant": "A"}, {"variant": "B"}, "not a dict"]
    for _ in range(n):
        event = {"site_id": SITE, "event_type": "pageview", "visitor_id": f"v{rng.randrange(5)}"}
        for key, values in (("page_url", pages), ("custom_data", customs),
                            ("lead_id", [None] * 8 + [LEAD, OTHER_LEAD, ""]),
                            ("experiment_id", [None] * 6 + [EXP, EXP_OLD, ""]),
                            ("campaign_id", [None] * 8 + [EXP, "77777777-7777-4777-8777-777777777777", ""])):
            value = rng.choice(values)
            if value is not None:
                event[key] = value
        yield event, rng.choice([None, "es", "es-mx", "en-gb", "pt"]), T + timedelta(hours=rng.randrange(-30, 30))


def reference_attribute(event, site, leads, visitor, t, language):
    """docs/attribution.md's rules read literally, everything computed for every event."""
    lookup = leads.lookup_lead(SITE)
    custom_in = event.get("custom_data") if isinstance(event.get("custom_data"), dict) else {}
    page = parse_page(event["page_url"]) if event.get("page_url") else None
    params = page.params if page else {}
    lead, dropped, backfill, lead_id = None, (), None, visitor.lead_id
    if event.get("lead_id"):
        lead = lookup(event["lead_id"], None)
        if lead is None or lead.site_id != SITE:
            lead, dropped = None, ("lead",)
    email = custom_in.get("email")
    if lead is None and isinstance(email, str) and "@" in email:
        lead = lookup(None, email.strip().lower())
    if lead is not None and lead.id != lead_id:
        backfill = lead_id = lead.id
    elif lead is None and lead_id:
        lead = lookup(lead_id, None)
    variants = visitor.variants
    segment = lead.segment_id if lead and lead.segment_id else match_segment(
        site.segments, event.get("page_url"), params, language)
    custom = {f"${k}": params[k] for k in ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
              if params.get(k)}
    utm = (params.get("utm_campaign") or "").strip().lower()
    by_utm = site.experiments.get(utm) or site.experiments_by_name.get(utm) if utm else None
    experiment = None
    named = event.get("experiment_id") or (as_uuid(custom_in["experiment"]) if "experiment" in custom_in else None)
    if named:
        exp = site.experiments.get(named)
        if exp is not None and exp.running_at(t):
            experiment = exp.id
            if visitor.variant(experiment) is None:
                variants += ((experiment, str(custom_in.get("variant", ""))),)
            custom["$variant"] = dict(variants)[experiment]
        else:
            dropped += ("experiment",)
    else:
        for eid, variant in reversed(variants):
            if eid in site.experiments and site.experiments[eid].running_at(t):
                experiment, custom["$variant"] = eid, variant
                break
    campaign = by_utm.id if by_utm else None
    if event.get("campaign_id"):
        campaign = event["campaign_id"] if event["campaign_id"] in site.experiments else None
        dropped += () if campaign else ("campaign",)
    return (OWNER, lead_id, segment, experiment, campaign, custom, dropped, backfill, page), \
        VisitorAttribution(lead_id, variants)


def test_cached_and_shared_results_are_what_the_rules_give_on_a_mixed_stream():
    segments = [Segment(SEG_BLOG, "/blog", (), None, T), Segment(SEG_ES, "/es", (), "es", T),
                Segment(SEG_LEAD, None, ("shoes",), None, T)]
    experiments = [running(), running(EXP_OLD, "Old", end=T)]
    warm = refs(segments, experiments)  # shared by all events, as in the worker
    warm_states: dict = {}
    ref_states: dict = {}
    for event, language, t in mixed_events(random.Random(7), 3000):
        v = event["visitor_id"]
        a, visitor = attribute(event, warm, snapshot(), warm_states.get(v, NO_VISITOR), t, language)
        # The reference gets an equal visitor state, but not the shared NO_VISITOR.
        want, want_visitor = reference_attribute(event, warm, snapshot(), ref_states.get(v, VisitorAttribution()),
                                                 t, language)
        assert (*a[:8], a.page if a.page is not NO_PAGE else None) == want, (event, language)
        assert visitor == want_visitor
        warm_states[v], ref_states[v] = visitor, want_visitor
    assert warm.pages and not any("clid=" in url for pages in (warm.pages, *warm._groups.values()) for url in pages)
    # Only the pages a language-rule segment can match are kept per language group.
    assert warm.pages["https://a.example/es/hola"] is None and warm.pages["https://a.example/blog/x"] is not None


def test_a_page_is_cached_per_language_group_only_when_its_segment_depends_on_the_language():
    site = refs([Segment(SEG_BLOG, "/blog", (), None, T), Segment(SEG_ES, "/blog/es", (), "es", T)])
    blog = site.page("https://a.example/blog/x", "es-mx")
    assert blog.segment_id == SEG_BLOG and site.pages["https://a.example/blog/x"][0] is blog
    assert site.page("https://a.example/blog/x", "en") is blog  # the same for every language
    assert site.page("https://a.example/blog/es/x", "es-mx").segment_id == SEG_ES
    assert site.page("https://a.example/blog/es/x", "en").segment_id == SEG_BLOG
    assert site.pages["https://a.example/blog/es/x"] is None  # see the language groups
    assert site.page("https://a.example/blog/es/x", "es").segment_id == SEG_ES


def test_pages_with_ad_click_ids_are_not_cached():
    site = refs([Segment(SEG_BLOG, "/blog", (), None, T)])
    a, _ = run({"page_url": "https://a.example/blog?gclid=123"}, site_refs=site)
    assert a.segment_id == SEG_BLOG and a.page.source == "click:gclid" and not site.pages


def test_language_groups_are_memoised_boundedly():
    site = refs([Segment(SEG_ES, "/es", (), "es", T)])
    others = site.pages_for(None)
    for i in range(LANGUAGE_MEMO + 50):
        assert site.pages_for(f"x{i}") is others
    assert len(site.language_pages) == LANGUAGE_MEMO
    assert site.page("https://a.example/es/x", "es-419").segment_id == SEG_ES


def test_a_visitor_state_linked_to_nothing_is_the_shared_one():
    assert VisitorState.from_json({"s": [], "l": None, "x": []}).attribution is NO_VISITOR
    assert VisitorState.from_json([]).attribution is NO_VISITOR
    state = VisitorState.from_json({"s": [], "l": LEAD, "x": [[EXP, "A"]]})
    assert state.attribution == VisitorAttribution(LEAD, ((EXP, "A"),))
    assert VisitorState.from_json(state.to_json()) == state


def test_enricher_needs_collects_what_each_event_names():
    enricher = Enricher(geo=None, device=DeviceDetector(16), ip_mode="full", session_timeout_ms=1_800_000,
                        default_tz="UTC", max_past_ms=10**12, max_future_ms=10**6)
    events = [event for event, _, _ in mixed_events(random.Random(3), 500)]
    events += [{"site_id": "other", "visitor_id": "w", "lead_id": OTHER_LEAD, "custom_data": {"email": "a@B.c"}}]
    states = {(SITE, "v1"): VisitorState(attribution=VisitorAttribution(LEAD)), (SITE, "v2"): VisitorState()}
    want = Needs()
    for event in events:
        needs_of(event, NO_VISITOR, want)
    want.leads.add(LEAD)
    assert enricher.needs([(i, {"event": e}) for i, e in enumerate(events)], states) == want
    assert want.emails == {(SITE, "ana@example.com"), (SITE, "nobody@example.com"), ("other", "a@b.c")}
