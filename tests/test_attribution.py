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
    return attribute(event, site_refs or refs(), snapshot().lookup_lead(SITE), visitor, t, lang)


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
