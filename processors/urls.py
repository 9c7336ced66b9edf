"""The page URL, parsed once per distinct URL for every stage that needs it.

Attribution (segment rules, UTM values) and sessionization (host, the traffic source
the query names) both read the page URL. One shared, cached parse serves both, and
attribution hands the parsed page on to sessionization with its result, so a page
costs one lookup per event, not one per stage.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

NO_PARAMS: dict[str, str] = {}  # shared: never modified

# Sessions (processors/sessions.py): the query's own traffic source.
SOURCE_UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign")
# Ad click ids that mark paid traffic even without UTM tags.
CLICK_IDS = ("gclid", "fbclid", "msclkid", "dclid", "ttclid", "twclid", "li_fat_id", "yclid")


class PageURL(NamedTuple):
    ok: bool  # False: urlsplit refused it (the other fields are then the fallbacks below)
    bare: str  # host + path + "?query", lower case, without scheme and leading "www."
    path: str  # lower case
    params: dict[str, str]  # query parameters, blank ones left out (shared: read-only)
    host: str | None  # lower case, without "www." and port; None when there is none
    source: str | None  # "utm:source/medium/campaign" or "click:<id name>" the query names, else None


@lru_cache(maxsize=16384)
def parse_page(url: str) -> PageURL:
    """Cached: pages repeat a lot. Callers must not modify ``params``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        params = dict(parse_qsl(parts.query)) if parts.query else NO_PARAMS
    except ValueError:
        return PageURL(False, url.lower(), "", NO_PARAMS, None, None)
    bare = (parts.netloc + parts.path + ("?" + parts.query if parts.query else "")).lower()
    if bare.startswith("www."):
        bare = bare[4:]
    if host:
        host = host.lower()  # hostname keeps an IPv6 zone's case
        if host.startswith("www."):
            host = host[4:]
    source = None
    if params:
        utm = [params.get(k, "").strip().lower() for k in SOURCE_UTM_KEYS]
        if any(utm):
            source = "utm:" + "/".join(utm)
        else:
            source = next((f"click:{c}" for c in CLICK_IDS if c in params), None)
    return PageURL(True, bare, parts.path.lower(), params, host, source)


NO_PAGE = PageURL(True, "", "", NO_PARAMS, None, None)  # no page_url
