"""Optional: refuse hits for sites that do not exist, at the collector (4xx).

By default the collector accepts any well-formed ``site_id`` and the workers dead-letter
events of unknown sites (``unknown_site``), so nothing is lost while a site is being
created. With ``COLLECTOR_REJECT_UNKNOWN_SITES`` the collector keeps the set of site ids
from PostgreSQL and answers 400 for others. The set is loaded at start-up and kept
current by the same NOTIFY the workers listen to (``pipeline_refdata``). While the
database cannot be reached the gate is open (fail open: the workers still check).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import orjson

log = logging.getLogger("ingest.sites")

CHANNEL = "pipeline_refdata"


class SiteGate:
    def __init__(self, dsn: str, retry_s: float = 5.0) -> None:
        self._dsn = dsn
        self._retry_s = retry_s
        self._ids: set[str] | None = None  # None: unknown, let everything through
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task | None = None
        self._rechecks: set[asyncio.Task] = set()  # the loop keeps only weak references

    def allows(self, site_id: str) -> bool:
        return self._ids is None or site_id in self._ids

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep_connected())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    async def _keep_connected(self) -> None:
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn)
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                # Listen first, then load: a site created in between is not missed.
                rows = await conn.fetch("SELECT id::text FROM public.sites")
                self._ids = {r["id"] for r in rows}
                self._conn = conn
                log.info("collector.sites_loaded", extra={"sites": len(self._ids)})
                await lost.wait()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("collector.sites_unavailable", extra={"detail": str(exc)})
            self._ids = None  # notifications may be missed from now on: open the gate
            await asyncio.sleep(self._retry_s)

    def _on_notify(self, conn, _pid, _channel, payload: str) -> None:
        try:
            msg = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if msg.get("t") == "sites" and msg.get("site"):
            task = asyncio.ensure_future(self._recheck(conn, msg["site"]))
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)

    async def _recheck(self, conn: asyncpg.Connection, site_id: str) -> None:
        """Inserted or deleted? Ask (the payload does not say)."""
        try:
            exists = await conn.fetchval("SELECT true FROM public.sites WHERE id = $1::uuid", site_id)
        except (OSError, asyncpg.PostgresError):
            return
        if self._ids is not None:
            if exists:
                self._ids.add(site_id)
            else:
                self._ids.discard(site_id)
