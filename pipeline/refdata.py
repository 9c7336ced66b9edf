"""The worker's cache of reference data: sites, their segments, experiments and time
zone, and leads (by id and by email).

* Loaded on demand: a batch's misses are fetched together, one query per kind.
* Kept fresh without polling: triggers NOTIFY ``pipeline_refdata`` on every change
  (migration 0030) and a listening connection drops the entries concerned, so the next
  batch reloads them (well within a second). Entries also expire after ``ttl`` as a
  safety net, and everything is dropped when the listening connection is lost (a
  notification may have been missed).
* Unknown keys are remembered as unknown for ``negative_ttl`` (a NOTIFY for a new row
  clears that at once), so a flood of events for a bogus site costs one query.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import asyncpg
import orjson

from processors.attribution import (
    Experiment, Lead, Needs, RefSnapshot, Segment, Site, SiteRefs, as_uuid, order_segments,
)

log = logging.getLogger("pipeline.refdata")

CHANNEL = "pipeline_refdata"


class RefCache:
    def __init__(self, pool: asyncpg.Pool, dsn: str, *, ttl: float = 300.0, negative_ttl: float = 30.0) -> None:
        self._pool = pool
        self._dsn = dsn
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._sites: dict[str, tuple[SiteRefs | None, float]] = {}
        self._leads: dict[str, tuple[Lead | None, float]] = {}
        self._emails: dict[tuple[str, str], tuple[Lead | None, float]] = {}
        self._listener: asyncpg.Connection | None = None
        # lookups served from the cache / loaded, per kind (site, lead, email)
        self.hits = {"site": 0, "lead": 0, "email": 0}
        self.misses = {"site": 0, "lead": 0, "email": 0}

    # -- invalidation -----------------------------------------------------------

    async def listen(self) -> None:
        """(Re)connect the listening connection; safe to call again after a loss."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self.clear()  # notifications may have been missed meanwhile
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(CHANNEL, self._on_notify)
        conn.add_termination_listener(lambda _c: self.clear())
        self._listener = conn

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    def clear(self) -> None:
        self._sites.clear()
        self._leads.clear()
        self._emails.clear()

    def _on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.clear()
            return
        table, row_id, site = msg.get("t"), msg.get("id"), msg.get("site")
        if table == "leads":
            self._leads.pop(row_id, None)
            for key in [k for k in self._emails if k[0] == site]:
                del self._emails[key]
            # A lead's segment is read through the lead: nothing else to drop.
        else:  # sites, segments, experiments, site_settings: the site's entry
            self._sites.pop(site, None)
            if table == "sites":  # a deleted or new site: its leads follow
                for key in [k for k, (lead, _) in self._leads.items() if lead is None or lead.site_id == site]:
                    del self._leads[key]

    # -- lookups ----------------------------------------------------------------

    def _fresh(self, entry: tuple[Any, float] | None, now: float) -> bool:
        return entry is not None and entry[1] > now

    async def snapshot(self, needs: Needs) -> RefSnapshot:
        """Everything ``needs`` names, from the cache or loaded now."""
        now = time.monotonic()
        if self._listener is None or self._listener.is_closed():
            try:
                await self.listen()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("refdata.listen_failed", extra={"detail": str(exc)})
        missing_sites = [s for s in needs.sites if not self._fresh(self._sites.get(s), now)]
        missing_leads = [k for k in needs.leads if not self._fresh(self._leads.get(k), now)]
        missing_emails = [k for k in needs.emails if not self._fresh(self._emails.get(k), now)]
        for kind, wanted, missing in (("site", needs.sites, missing_sites), ("lead", needs.leads, missing_leads),
                                      ("email", needs.emails, missing_emails)):
            self.hits[kind] += len(wanted) - len(missing)
            self.misses[kind] += len(missing)
        if missing_sites or missing_leads or missing_emails:
            async with self._pool.acquire() as conn:
                if missing_sites:
                    await self._load_sites(conn, missing_sites, now)
                if missing_leads:
                    await self._load_leads(conn, missing_leads, now)
                if missing_emails:
                    await self._load_emails(conn, missing_emails, now)
        snap = RefSnapshot()
        for s in needs.sites:
            snap.sites[s] = self._sites[s][0]
        for k in needs.leads:
            snap.leads[k] = self._leads[k][0]
        for k in needs.emails:
            snap.emails[k] = self._emails[k][0]
        return snap

    def _expiry(self, value: object, now: float) -> float:
        return now + (self._ttl if value is not None else self._negative_ttl)

    async def _load_sites(self, conn: asyncpg.Connection, ids: list[str], now: float) -> None:
        sites = await conn.fetch(
            "SELECT s.id::text AS id, s.user_id::text AS owner, ss.time_zone FROM public.sites s "
            "LEFT JOIN pipeline.site_settings ss ON ss.site_id = s.id WHERE s.id = ANY($1::uuid[])", ids)
        segments = await conn.fetch(
            "SELECT id::text, site_id::text, url, keywords, language::text, created_at FROM public.segments "
            "WHERE site_id = ANY($1::uuid[]) AND is_active", ids)
        experiments = await conn.fetch(
            "SELECT id::text, site_id::text, name, status, start_date, end_date FROM public.experiments "
            "WHERE site_id = ANY($1::uuid[])", ids)
        by_site: dict[str, list[Segment]] = {}
        for r in segments:
            by_site.setdefault(r["site_id"], []).append(Segment(
                r["id"], r["url"] or None, _keywords(r["keywords"]), (r["language"] or "").lower() or None,
                r["created_at"]))
        # Built with its segments: SiteRefs compiles their rules once, here.
        refs: dict[str, SiteRefs] = {
            r["id"]: SiteRefs(Site(r["id"], r["owner"]), time_zone=r["time_zone"],
                              segments=order_segments(by_site.get(r["id"], [])))
            for r in sites}
        for r in experiments:
            ref = refs.get(r["site_id"])
            if ref is None:
                continue
            exp = Experiment(r["id"], r["site_id"], r["name"], r["status"], r["start_date"], r["end_date"])
            ref.experiments[exp.id] = exp
            if exp.name:
                ref.experiments_by_name.setdefault(exp.name.strip().lower(), exp)
        for site_id in ids:
            value = refs.get(site_id)
            self._sites[site_id] = (value, self._expiry(value, now))

    async def _load_leads(self, conn: asyncpg.Connection, ids: list[str], now: float) -> None:
        rows = await conn.fetch(
            "SELECT id::text, site_id::text, segment_id::text FROM public.leads WHERE id = ANY($1::uuid[])",
            [i for i in ids if as_uuid(i) is not None])
        leads = {r["id"]: Lead(r["id"], r["site_id"], r["segment_id"]) for r in rows}
        for i in ids:
            value = leads.get(i)
            self._leads[i] = (value, self._expiry(value, now))

    async def _load_emails(self, conn: asyncpg.Connection, keys: list[tuple[str, str]], now: float) -> None:
        rows = await conn.fetch(
            "SELECT DISTINCT ON (site_id, lower(email)) id::text, site_id::text, segment_id::text, "
            "lower(email) AS email FROM public.leads "
            "WHERE (site_id, lower(email)) IN (SELECT * FROM unnest($1::uuid[], $2::text[])) "
            "ORDER BY site_id, lower(email), created_at",
            [k[0] for k in keys], [k[1] for k in keys])
        found = {(r["site_id"], r["email"]): Lead(r["id"], r["site_id"], r["segment_id"]) for r in rows}
        for k in keys:
            value = found.get(k)
            self._emails[k] = (value, self._expiry(value, now))


def _keywords(value: Any) -> tuple[str, ...]:
    """segments.keywords is jsonb: an array of strings (anything else is ignored)."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return ()
    if not isinstance(value, list):
        return ()
    return tuple(k.strip().lower() for k in value if isinstance(k, str) and k.strip())
