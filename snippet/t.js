/* Website snippet of the visitor-event pipeline (docs/snippet.md).
   <script async src="https://collector.example/t.js" data-site="SITE_UUID"></script> */
(() => {
  'use strict';
  const P = '_vq_', MAX_N = 100, MAX_BYTES = 65536, WEEK = 6048e5;
  const UUID = /^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$/i;
  const now = () => Date.now();

  const hex = (b) => [...b].map((x, i) => ([4, 6, 8, 10].includes(i) ? '-' : '') + (x + 256).toString(16).slice(1)).join('');

  // RFC 9562 UUIDv7 from 16 random bytes. Within one millisecond (or a small clock step
  // back) a counter in rand_a keeps ids increasing; the worker dates events by this time.
  let last = 0, seq = 0;
  const uuidv7 = (t, b) => {
    if (t > last || last - t > 1e4) { last = t; seq = (b[6] & 7) << 8 | b[7]; }
    else if (++seq > 4095) { last++; seq = 0; }
    for (let i = 5, v = last; i >= 0; i--, v = Math.floor(v / 256)) b[i] = v % 256;
    b[6] = 0x70 | seq >> 8; b[7] = seq & 255; b[8] = 0x80 | b[8] & 63;
    return hex(b);
  };

  // utm_* query parameters of a URL (they stay in page_url too: the worker parses them).
  const utm = (href) => {
    const out = {};
    try { new URL(href).searchParams.forEach((v, k) => { if (/^utm_/.test(k) && v) out[k] = v.slice(0, 256); }); } catch (e) {}
    return out;
  };

  // Collector base URL from the snippet's own src: ".../a1/t.js" -> ".../a1/".
  const apiBase = (src) => String(src).replace(/[?#].*$/, '').replace(/[^/]*$/, '');

  // Request bodies within the collector's limits; an event too big to ever fit is dropped.
  const pack = (events, maxN, maxBytes) => {
    const out = [], enc = new TextEncoder();
    let cur, size = 0;
    for (const e of events) {
      const s = JSON.stringify(e), n = enc.encode(s).length + 1;
      if (n + 12 > maxBytes) continue;
      if (!cur || cur.events.length >= maxN || size + n + 12 > maxBytes) { out.push(cur = { events: [], s: [] }); size = 0; }
      cur.events.push(e); cur.s.push(s); size += n;
    }
    return out.map((c) => ({ events: c.events, body: '{"batch":[' + c.s.join() + ']}' }));
  };

  const backoff = (n, r) => Math.min(6e4, 1e3 * 2 ** n) * (0.5 + r / 2);

  const start = (win) => {
    const doc = win.document, nav = win.navigator || {}, loc = win.location, hist = win.history;
    const el = doc.currentScript || doc.querySelector('script[data-site]');
    const opt = (n) => !/^(false|0|null)$/.test(el.getAttribute('data-' + n)); // a bare attribute is on
    const debug = el && opt('debug');
    const warn = (m, e) => debug && win.console.warn('[vq] ' + m, e ?? '');
    const safe = (f) => function () { try { return f.apply(this, arguments); } catch (e) { warn('error', e); } };
    const pre = win.vq || [];
    if (!el || !Array.isArray(pre)) return; // no config, or loaded twice
    const site = el.getAttribute('data-site'), api = apiBase(el.getAttribute('data-api') || el.src);
    const cookieless = opt('cookieless'), needConsent = opt('require-consent');
    const blocked = opt('respect-dnt') && (nav.doNotTrack == '1' || win.doNotTrack == '1' || nav.globalPrivacyControl === true);
    const rnd = () => win.crypto.getRandomValues(new Uint8Array(16));
    const idOf = (e) => e.event_id;

    // First-party storage: localStorage, else a cookie (the retry queue then stays in memory).
    let ls;
    try { ls = win.localStorage; ls.setItem(P, 1); ls.removeItem(P); } catch (e) { ls = null; }
    const get = (k) => {
      try {
        if (ls) return ls.getItem(P + k);
        const m = ('; ' + doc.cookie).split('; ' + P + k + '=')[1];
        return m ? decodeURIComponent(m.split(';')[0]) : null;
      } catch (e) { return null; }
    };
    const set = (k, v, keep) => {
      if (cookieless && !keep) return; // cookieless stores nothing (but an opt-out)
      try {
        if (ls) return v == null ? ls.removeItem(P + k) : ls.setItem(P + k, v);
        doc.cookie = P + k + '=' + (v == null ? ';max-age=0' : encodeURIComponent(v) + ';max-age=63072000') + ';path=/;SameSite=Lax';
      } catch (e) {}
    };

    let optedOut = get('optout') == '1', consented = !needConsent || get('consent') == '1';
    const newId = () => { const b = rnd(); b[6] = 64 | b[6] & 15; b[8] = 128 | b[8] & 63; return hex(b); }; // v4
    let visitor = (!cookieless && get('id')) || newId();
    const allowed = () => !blocked && !optedOut && consented;
    const keepId = () => { if (allowed()) { set('id', visitor); return true; } }; // true: tracking is on

    let outbox = [], held = [], timer, retryTimer, tries = 0, memQueue = [];
    const inflight = {};
    const loadQ = () => {
      let q;
      try { q = cookieless || !ls ? memQueue : JSON.parse(ls.getItem(P + 'q') || '[]'); } catch (e) { q = []; }
      return q.filter((e) => e.client_ts > now() - WEEK); // the worker only trusts recent client times
    };
    const saveQ = (q) => { if (cookieless || !ls) memQueue = q; else set('q', q.length ? JSON.stringify(q) : null); };

    const send = (type, data, fields) => {
      if (blocked || optedOut || !site) return;
      const t = now(), e = { site_id: site, event_type: String(type).replace(/[^\w.:-]/g, '_').slice(0, 64),
        event_id: uuidv7(t, rnd()), client_ts: t, page_url: loc.href };
      if (!cookieless) e.visitor_id = visitor;
      for (const k in fields) if (fields[k] != null && fields[k] !== '') e[k] = fields[k];
      try { data = data && JSON.parse(JSON.stringify(data)); } catch (x) { warn('bad custom_data', x); data = 0; }
      if (data && typeof data == 'object' && !Array.isArray(data) && Object.keys(data).length) e.custom_data = data;
      if (!consented) { if (held.length < MAX_N) held.push(e); return; } // until consent(true)
      outbox.push(e);
      later();
    };

    // Events of one moment go out together, in one request.
    const later = () => { timer = timer || win.setTimeout(safe(() => { timer = 0; flush(); }), 50); };

    const flush = (unloading) => {
      if (!allowed() || !outbox.length) return;
      const evs = outbox;
      outbox = [];
      if (nav.onLine === false) return failed(evs); // kept for the 'online' event
      for (const p of pack(evs, MAX_N, MAX_BYTES)) transmit(p, unloading);
    };

    const transmit = (p, unloading) => {
      const url = api + 'collect', evs = p.events;
      evs.forEach((e) => { inflight[idOf(e)] = 1; });
      // A page being left may not live to see an answer: hand the request to the browser.
      if (unloading && nav.sendBeacon?.(url, p.body)) return done(evs, 1);
      if (win.fetch) {
        return win.fetch(url, { method: 'POST', body: p.body, keepalive: !!unloading, credentials: 'omit' }).then(
          safe((r) => r.status >= 500 || r.status == 429 ? failed(evs, after(r)) : done(evs, r.status < 300)),
          safe(() => failed(evs)));
      }
      for (const e of evs) { // last resort: one pixel GET per event
        new win.Image().src = api + 't.gif?' + Object.keys(e).map((k) => k + '=' + encodeURIComponent(k == 'custom_data' ? JSON.stringify(e[k]) : e[k])).join('&');
      }
      done(evs, 1);
    };

    // Answered (stored, or refused as invalid: resending cannot help): forget them.
    const done = (evs, ok) => {
      if (!ok) warn('refused', evs);
      const sent = new Set(evs.map(idOf)), q = loadQ(), rest = q.filter((e) => !sent.has(idOf(e)));
      sent.forEach((id) => delete inflight[id]);
      if (rest.length != q.length) saveQ(rest);
      if (ok && rest.length && tries) { tries = 0; retry(); } // the collector is back
    };

    // The collector's Retry-After (seconds) on a 503/429, if readable: waited at least.
    const after = (r) => Math.min(36e5, 1e3 * (+r.headers?.get?.('Retry-After') || 0));

    // Offline, 503 or a network error: keep them (once per id) and retry with backoff,
    // or after the Retry-After the collector asked for, whichever is later.
    const failed = (evs, wait = 0) => {
      if (!allowed()) return; // opted out meanwhile: keep nothing
      const q = loadQ(), have = new Set(q.map(idOf));
      for (const e of evs) { delete inflight[idOf(e)]; if (!have.has(idOf(e))) q.push(e); }
      saveQ(q.slice(-500));
      retryTimer = retryTimer || win.setTimeout(safe(() => { retryTimer = 0; retry(); }), Math.max(wait, backoff(tries++, Math.random())));
    };

    const retry = () => {
      if (!allowed()) return;
      for (const e of loadQ()) if (!inflight[idOf(e)]) { inflight[idOf(e)] = 1; outbox.push(e); }
      later();
    };

    // Page views, SPA navigation and the visible time spent on each view.
    let view, shown = doc.visibilityState != 'hidden' && now(), spent = 0;
    const key = (u) => u.split('#')[0]; // a new #fragment is no new view
    const duration = () => {
      const s = Math.round((spent + (shown ? now() - shown : 0)) / 1e3);
      spent = 0; shown = shown && now();
      if (view && s > 0) send('duration', 0, { page_url: view, duration_seconds: s });
    };
    const pageview = () => {
      const url = loc.href, ref = view || doc.referrer, s = win.screen || {}, d = utm(url);
      if (view && key(view) == key(url)) return;
      duration();
      d.screen = s.width + 'x' + s.height; d.language = nav.language;
      view = url;
      send('pageview', d, { referrer_url: ref });
    };
    const hide = () => {
      if (shown) { spent += now() - shown; shown = 0; }
      duration(); flush(1);
    };
    for (const m of ['pushState', 'replaceState']) {
      const orig = hist?.[m];
      if (orig) hist[m] = function () {
        const path = loc.pathname, r = orig.apply(this, arguments);
        // replaceState often only tidies the query (e.g. drops utm_*): a new view only on a new path.
        if (m == 'pushState' || loc.pathname != path) safe(pageview)();
        return r;
      };
    }
    const on = (t, f, target = win) => target.addEventListener(t, safe(f));
    on('popstate', pageview);
    on('visibilitychange', () => { if (doc.visibilityState == 'hidden') hide(); else shown = shown || now(); }, doc);
    on('pagehide', hide);
    on('online', () => { tries = 0; retry(); });

    const uuidOr = (v, f, k, d, dk) => { v = String(v); if (UUID.test(v)) f[k] = v.toLowerCase(); else d[dk] = v; };
    const vq = {
      track: (type, data) => type ? send(type, data) : warn('no event type'),
      identify: (who, traits) => {
        const d = { ...traits }, f = {};
        if (String(who).includes('@')) d.email = String(who); else uuidOr(who, f, 'lead_id', d, 'external_id');
        send('identify', d, f);
      },
      experiment: (id, variant) => {
        const d = { variant: String(variant) }, f = {};
        uuidOr(id, f, 'experiment_id', d, 'experiment');
        send('experiment', d, f);
      },
      optOut: () => {
        optedOut = true; outbox = []; held = []; visitor = newId(); // opting in again: a new visitor
        saveQ([]); set('id'); set('consent'); set('optout', '1', 1);
      },
      optIn: () => { optedOut = false; set('optout', null, 1); keepId(); },
      consent: (yes) => {
        consented = !!yes;
        if (!yes) { held = []; outbox = []; visitor = newId(); saveQ([]); set('consent'); set('id'); return; }
        set('consent', '1');
        if (keepId()) { outbox.push(...held); held = []; retry(); } // retry() sends them too
      },
      push: safe((...cmds) => {
        for (const c of cmds) {
          const f = c && c[0] != 'push' && vq[c[0]];
          if (f) safe(f)(...[].slice.call(c, 1)); else warn('unknown command', c);
        }
      }),
    };
    win.vq = vq;
    keepId();
    // Privacy choices queued before the script loaded apply before the first page view.
    const first = (c) => /^(consent|optOut|optIn)$/.test(c?.[0]);
    vq.push(...pre.filter(first));
    pageview();
    vq.push(...pre.filter((c) => !first(c)));
    retry(); // what earlier pages could not send
  };

  if (typeof window == 'object' && window.document) try { start(window); } catch (e) {}
  else if (typeof module == 'object') module.exports = { uuidv7, utm, apiBase, pack, backoff, start };
})();
