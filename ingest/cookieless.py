"""Visitor ids for hits that carry none (no cookie, no local storage).

The id is ``"cl_"`` + the first 32 hex digits of::

    HMAC-SHA256(key=cookieless_secret, msg=utc_date | site_id | ip | user_agent)

(``|`` is the ASCII unit separator 0x1F, which cannot occur in any of the parts, so
the message is unambiguous). Like Plausible's scheme, this counts unique visitors
without storing anything on the device:

* it rotates daily: the same browser gets a new id at 00:00 UTC, so visitors cannot
  be followed across days (a visit spanning midnight is split in two);
* it is per site: one browser gets unrelated ids on different sites;
* the raw IP and User-Agent are not recoverable from it.

Unlike Plausible, which throws its daily salt away, the secret here persists: whoever
holds it can test a guessed (date, site, IP, UA) tuple. Treat it as a key, share it
across all collector instances (they must derive the same id), and rotate it from
time to time (rotation only splits the visits of that day).
"""

from __future__ import annotations

import hashlib
import hmac
import time

from schemas.event import COOKIELESS_PREFIX

_DAY_MS = 86_400_000
_SEP = "\x1f"


class CookielessIds:
    def __init__(self, secret: str) -> None:
        # Keyed once; copy() per hit skips re-deriving the HMAC pads.
        self._base = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        self._day_index = -1
        self._day = ""

    def _utc_date(self, now_ms: int) -> str:
        index = now_ms // _DAY_MS
        if index != self._day_index:
            self._day = time.strftime("%Y-%m-%d", time.gmtime(index * 86_400))
            self._day_index = index
        return self._day

    def visitor_id(self, now_ms: int, site_id: str, ip: str | None, user_agent: str | None) -> str:
        h = self._base.copy()
        h.update(
            _SEP.join((self._utc_date(now_ms), site_id, ip or "", user_agent or "")).encode(
                "utf-8", "surrogatepass"
            )
        )
        return COOKIELESS_PREFIX + h.hexdigest()[:32]
