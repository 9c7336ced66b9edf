// Unit tests of the snippet's pure parts and of its command queue against a fake window
// (the real-browser tests are tests/test_browser.py). Run: node --test snippet/test/
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const zlib = require('node:zlib');
const { uuidv7, utm, apiBase, pack, backoff, start } = require('../t.js');

const V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const rand = () => crypto.getRandomValues(new Uint8Array(16));
const v7ms = (id) => parseInt(id.replace(/-/g, '').slice(0, 12), 16);

test('uuidv7: RFC 9562 layout, time prefix in milliseconds', () => {
  const t = Date.UTC(2026, 10, 26, 12, 0, 0, 123) + 1e6; // a time no other test used
  const id = uuidv7(t, rand());
  assert.match(id, V7);
  assert.equal(v7ms(id), t);
});

test('uuidv7: ids of one millisecond (and of a small clock step back) keep increasing', () => {
  const t = Date.UTC(2027, 0, 1) + 5e6;
  const ids = [];
  for (let i = 0; i < 3000; i++) ids.push(uuidv7(t, rand()));
  ids.push(uuidv7(t - 50, rand())); // NTP nudged the clock back a little
  assert.equal(new Set(ids).size, ids.length);
  assert.deepEqual([...ids].sort(), ids);
  assert.ok(ids.every((id) => V7.test(id)));
  assert.ok(v7ms(ids[ids.length - 1]) - t <= 1); // the counter overflows into the next ms at most
  // A big step back (a corrected clock) starts over from the new time.
  const later = uuidv7(t - 3600e3, rand());
  assert.equal(v7ms(later), t - 3600e3);
});

test('utm: utm_* parameters of the page URL, nothing else', () => {
  assert.deepEqual(utm('https://shop.example/p?utm_source=news&utm_medium=email&utm_campaign=spring%20sale&x=1&utm_term='),
    { utm_source: 'news', utm_medium: 'email', utm_campaign: 'spring sale' });
  assert.deepEqual(utm('https://shop.example/'), {});
  assert.deepEqual(utm('not a url'), {});
  assert.equal(utm('https://a.example/?utm_content=' + 'x'.repeat(1000)).utm_content.length, 256);
});

test('apiBase: the collector URL comes from the script src', () => {
  assert.equal(apiBase('https://collector.example/t.js'), 'https://collector.example/');
  assert.equal(apiBase('https://shop.example/a1/t.js?v=3#x'), 'https://shop.example/a1/');
  assert.equal(apiBase('http://127.0.0.1:8080/t.js'), 'http://127.0.0.1:8080/');
});

test('pack: at most 100 events and 64 KiB per request; an event that can never fit is dropped', () => {
  const ev = (n, pad = 0) => ({ event_type: 'e' + n, custom_data: { pad: 'x'.repeat(pad) } });
  const bodies = pack(Array.from({ length: 250 }, (_, n) => ev(n)), 100, 65536);
  assert.deepEqual(bodies.map((b) => b.events.length), [100, 100, 50]);
  assert.deepEqual(JSON.parse(bodies[1].body).batch.map((e) => e.event_type), bodies[1].events.map((e) => e.event_type));

  const big = pack([ev(1, 30000), ev(2, 30000), ev(3, 30000), ev(4, 70000), ev(5)], 100, 65536);
  assert.ok(big.every((b) => Buffer.byteLength(b.body) <= 65536));
  assert.deepEqual(big.map((b) => b.events.map((e) => e.event_type)), [['e1', 'e2'], ['e3', 'e5']]);
  // Multi-byte text is measured in bytes, as the collector does.
  const wide = pack([ev(1), { event_type: 'w', custom_data: { s: '€'.repeat(21000) } }], 100, 65536);
  assert.equal(wide.length, 1);
  assert.ok(Buffer.byteLength(wide[0].body) <= 65536);
  assert.equal(pack([{ custom_data: { s: '€'.repeat(22000) } }], 100, 65536).length, 0);
});

test('backoff: doubles from ~1 s, jittered, capped at a minute', () => {
  assert.equal(backoff(0, 1), 1000);
  assert.equal(backoff(0, 0), 500);
  assert.equal(backoff(3, 1), 8000);
  assert.equal(backoff(20, 1), 60000);
});

// --------------------------------------------------------------------------------------
// A fake browser window: enough DOM for start(), fetch and timers under the test's control.

function fakeWindow({ attrs = {}, href = 'https://shop.example/?utm_source=news', storage = new Map(), responses = [],
  online = true, dnt = null, vq } = {}) {
  const listeners = {};
  const timers = [];
  const sent = [];
  const loc = {
    href,
    get pathname() { return new URL(this.href).pathname; },
  };
  const script = {
    src: 'https://collector.example/a1/t.js',
    getAttribute: (n) => ({ 'data-site': 'site-1', ...attrs })[n] ?? null,
  };
  const on = (target) => (type, f) => { (listeners[target + type] ||= []).push(f); };
  const win = {
    document: {
      currentScript: script, querySelector: () => script, cookie: '', visibilityState: 'visible', referrer: 'https://ref.example/',
      addEventListener: on('doc:'),
    },
    navigator: { language: 'en-GB', onLine: online, doNotTrack: dnt, sendBeacon: (url, body) => { sent.push({ url, body, beacon: true }); return true; } },
    location: loc,
    history: {
      pushState(s, t, url) { loc.href = new URL(url, loc.href).href; },
      replaceState(s, t, url) { loc.href = new URL(url, loc.href).href; },
    },
    screen: { width: 1440, height: 900 },
    crypto: globalThis.crypto,
    console: { warn() {} },
    localStorage: {
      getItem: (k) => (storage.has(k) ? storage.get(k) : null),
      setItem: (k, v) => storage.set(k, String(v)),
      removeItem: (k) => storage.delete(k),
    },
    addEventListener: on('win:'),
    setTimeout: (f, ms) => { timers.push({ f, ms }); return timers.length; },
    fetch: (url, init) => {
      sent.push({ url, body: init.body, init });
      const r = responses.length ? responses.shift() : 204;
      if (r === 'network') return Promise.reject(new TypeError('Failed to fetch'));
      const [status, headers] = typeof r == 'number' ? [r, {}] : r; // [status, {header: value}]
      return Promise.resolve({ status, headers: { get: (k) => headers[k] ?? null } });
    },
    vq,
  };
  const settle = () => new Promise((r) => setImmediate(r));
  return {
    win, storage, sent, timers,
    // Runs every pending timer once (time is the test's), lets fetch promises settle, and
    // chases the short batching timers that this started; retry backoffs wait for the next tick.
    async tick() {
      let due = timers.splice(0);
      for (let round = 0; due.length && round < 10; round++) {
        due.forEach((t) => t.f());
        await settle(); await settle();
        due = timers.filter((t) => t.ms <= 50);
        timers.splice(0, timers.length, ...timers.filter((t) => t.ms > 50));
      }
    },
    fire(target, type) { for (const f of listeners[target + type] || []) f({}); },
    events: () => sent.flatMap((s) => JSON.parse(s.body).batch),
  };
}

test('queue stub: calls made before load run in order, after the page view, in one batch', async () => {
  const w = fakeWindow({ vq: [['track', 'signup', { plan: 'pro' }], ['identify', 'Ann@Example.com', { vip: true }],
    ['experiment', '0190f5c2-8d4e-7a00-9c1e-0123456789ab', 'B'], ['nonsense'], null] });
  start(w.win);
  assert.equal(w.sent.length, 0); // batched: sent a moment later
  await w.tick();
  assert.equal(w.sent.length, 1);
  assert.equal(w.sent[0].url, 'https://collector.example/a1/collect');
  assert.equal(w.sent[0].init.keepalive, false);
  const [pv, signup, ident, exp] = w.events();
  assert.deepEqual([pv, signup, ident, exp].map((e) => e.event_type), ['pageview', 'signup', 'identify', 'experiment']);
  assert.equal(w.events().length, 4);
  assert.equal(pv.site_id, 'site-1');
  assert.equal(pv.page_url, 'https://shop.example/?utm_source=news');
  assert.equal(pv.referrer_url, 'https://ref.example/');
  assert.deepEqual(pv.custom_data, { utm_source: 'news', screen: '1440x900', language: 'en-GB' });
  assert.deepEqual(signup.custom_data, { plan: 'pro' });
  assert.deepEqual(ident.custom_data, { vip: true, email: 'Ann@Example.com' });
  assert.equal(exp.experiment_id, '0190f5c2-8d4e-7a00-9c1e-0123456789ab');
  assert.deepEqual(exp.custom_data, { variant: 'B' });
  for (const e of w.events()) {
    assert.match(e.event_id, V7);
    assert.ok(Math.abs(v7ms(e.event_id) - e.client_ts) <= 1);
    assert.equal(e.visitor_id, pv.visitor_id);
  }
  assert.equal(w.storage.get('_vq_id'), pv.visitor_id); // first-party, survives the page
  // After load, vq.push and the methods run at once; garbage never throws.
  w.win.vq.push(['track', 'later']);
  w.win.vq.track('bad type!', { n: 1 });
  w.win.vq.identify('0190f5c2-8d4e-7a00-9c1e-00000000000a');
  w.win.vq.push(undefined, ['track'], 42);
  const circular = {}; circular.self = circular;
  w.win.vq.track('circular', circular);
  await w.tick();
  const more = w.events().slice(4);
  assert.deepEqual(more.map((e) => e.event_type), ['later', 'bad_type_', 'identify', 'circular']);
  assert.equal(more[2].lead_id, '0190f5c2-8d4e-7a00-9c1e-00000000000a');
  assert.equal(more[3].custom_data, undefined); // dropped, the event kept
});

test('the visitor id is kept across pages; cookieless mode stores nothing and sends no visitor_id', async () => {
  const storage = new Map();
  const a = fakeWindow({ storage });
  start(a.win); await a.tick();
  const b = fakeWindow({ storage });
  start(b.win); await b.tick();
  assert.equal(a.events()[0].visitor_id, b.events()[0].visitor_id);

  const c = fakeWindow({ attrs: { 'data-cookieless': '' } });
  start(c.win); c.win.vq.track('x'); await c.tick();
  assert.equal(c.storage.size, 0);
  assert.equal(c.win.document.cookie, '');
  assert.ok(c.events().every((e) => !('visitor_id' in e)));
});

test('SPA navigation: pushState and popstate are page views; replaceState of the query is not', async () => {
  const w = fakeWindow({ href: 'https://shop.example/' });
  start(w.win); await w.tick();
  w.win.history.pushState({}, '', '/features');
  w.win.history.replaceState({}, '', '/features?utm_source=x'); // same path: tidying
  w.win.history.pushState({}, '', '/features#part'); // fragment only
  w.win.location.href = 'https://shop.example/';
  w.fire('win:', 'popstate');
  await w.tick();
  const views = w.events().filter((e) => e.event_type === 'pageview');
  assert.deepEqual(views.map((e) => [e.page_url, e.referrer_url]), [
    ['https://shop.example/', 'https://ref.example/'],
    ['https://shop.example/features', 'https://shop.example/'],
    ['https://shop.example/', 'https://shop.example/features'],
  ]);
});

test('hiding the page sends the time on page with sendBeacon', async () => {
  const w = fakeWindow();
  const t0 = Date.now();
  const realNow = Date.now;
  try {
    start(w.win); await w.tick();
    Date.now = () => t0 + 4600;
    w.win.document.visibilityState = 'hidden';
    w.fire('doc:', 'visibilitychange');
    w.fire('win:', 'pagehide'); // follows when the tab closes: nothing more to send
  } finally { Date.now = realNow; }
  const beacons = w.sent.filter((s) => s.beacon);
  assert.equal(beacons.length, 1);
  const [d] = JSON.parse(beacons[0].body).batch;
  assert.equal(d.event_type, 'duration');
  assert.equal(d.duration_seconds, 5);
  assert.equal(d.page_url, 'https://shop.example/?utm_source=news');
});

test('failed sends are kept in storage and retried with the same ids, once each', async () => {
  const storage = new Map();
  const w = fakeWindow({ storage, responses: [503, 'network'] });
  start(w.win);
  w.win.vq.track('a');
  await w.tick(); // 503
  const first = w.events().map((e) => e.event_id);
  assert.equal(first.length, 2);
  assert.equal(JSON.parse(storage.get('_vq_q')).length, 2);
  await w.tick(); // backoff timer: network error
  await w.tick(); // next backoff: 204
  const ids = w.events().map((e) => e.event_id);
  assert.deepEqual(ids, [...first, ...first, ...first]);
  assert.equal(storage.has('_vq_q'), false);
  await w.tick();
  assert.equal(w.sent.length, 3); // nothing left to send
  // A later page sends what an earlier one could not.
  const storage2 = new Map();
  const x = fakeWindow({ storage: storage2, responses: [503] });
  start(x.win); await x.tick();
  const y = fakeWindow({ storage: storage2 });
  start(y.win); await y.tick();
  assert.deepEqual(y.events().map((e) => e.event_type).sort(), ['pageview', 'pageview']);
  assert.ok(y.events().some((e) => e.event_id === x.events()[0].event_id));
});

test("a 503's Retry-After is waited at least; without one, the jittered backoff", async () => {
  const w = fakeWindow({ responses: [[503, { 'Retry-After': '30' }], 503] });
  start(w.win);
  await w.tick(); // the page view: 503, Retry-After 30
  assert.equal(w.timers.length, 1);
  assert.equal(w.timers[0].ms, 30000); // not the ~1 s backoff
  await w.tick(); // retried: 503 without Retry-After
  assert.ok(w.timers[0].ms >= 1000 && w.timers[0].ms <= 2000); // backoff(1, r)
  await w.tick(); // 204
  assert.equal(w.sent.length, 3);
  assert.equal(new Set(w.events().map((e) => e.event_id)).size, 1);
});

test('offline: nothing is attempted until the browser is online again', async () => {
  const w = fakeWindow({ online: false });
  start(w.win);
  w.win.vq.track('offline-click');
  await w.tick(); // the flush, then the backoff retry: both see offline
  assert.equal(w.sent.length, 0);
  assert.equal(JSON.parse(w.storage.get('_vq_q')).length, 2);
  w.win.navigator.onLine = true;
  w.fire('win:', 'online');
  await w.tick();
  assert.deepEqual(w.events().map((e) => e.event_type), ['pageview', 'offline-click']);
  assert.equal(w.storage.has('_vq_q'), false);
});

test('optOut (persisted) sends nothing; optIn resumes', async () => {
  const storage = new Map();
  const w = fakeWindow({ storage, vq: [['track', 'before'], ['optOut']] });
  start(w.win);
  w.win.vq.track('after');
  await w.tick();
  assert.equal(w.sent.length, 0);
  assert.equal(storage.get('_vq_optout'), '1');
  assert.equal(storage.has('_vq_id'), false);
  const next = fakeWindow({ storage });
  start(next.win); await next.tick();
  assert.equal(next.sent.length, 0);
  next.win.vq.optIn();
  next.win.vq.track('back');
  await next.tick();
  assert.deepEqual(next.events().map((e) => e.event_type), ['back']);
  assert.equal(storage.get('_vq_id'), next.events()[0].visitor_id); // a new id, kept from now on
  // Opting out and in again on one page gives a new, unlinked visitor too.
  next.win.vq.optOut();
  next.win.vq.optIn();
  next.win.vq.track('again');
  await next.tick();
  const [back, again] = next.events();
  assert.notEqual(again.visitor_id, back.visitor_id);
  assert.equal(storage.get('_vq_id'), again.visitor_id);
});

test('require-consent: nothing sent or stored before consent(true), then the held events go', async () => {
  const storage = new Map();
  const w = fakeWindow({ storage, attrs: { 'data-require-consent': 'true' } });
  start(w.win);
  w.win.vq.track('early');
  await w.tick();
  assert.equal(w.sent.length, 0);
  assert.equal(storage.size, 0);
  w.win.vq.consent(true);
  await w.tick();
  assert.deepEqual(w.events().map((e) => e.event_type), ['pageview', 'early']);
  assert.equal(storage.get('_vq_consent'), '1');
  // Remembered on the next page; consent(false) stops and forgets.
  const next = fakeWindow({ storage, attrs: { 'data-require-consent': 'true' } });
  start(next.win); await next.tick();
  assert.equal(next.events().length, 1);
  next.win.vq.consent(false);
  next.win.vq.track('no');
  await next.tick();
  assert.equal(next.events().length, 1);
  assert.equal(storage.size, 0);
});

test('respect-dnt: Do Not Track or Global Privacy Control switch it off', async () => {
  const w = fakeWindow({ attrs: { 'data-respect-dnt': '' }, dnt: '1' });
  start(w.win); w.win.vq.track('x'); await w.tick();
  assert.equal(w.sent.length, 0);
  assert.equal(w.storage.size, 0);
  const off = fakeWindow({ attrs: { 'data-respect-dnt': 'false' }, dnt: '1' });
  start(off.win); await off.tick();
  assert.equal(off.sent.length, 1);
});

test('served build: t.min.js is t.js minified (npm run build) and is at most 3 KB gzipped', () => {
  const dir = path.join(__dirname, '..');
  const min = fs.readFileSync(path.join(dir, 't.min.js'));
  assert.ok(zlib.gzipSync(min, { level: 9 }).length <= 3072);
  let terser;
  try { terser = require.resolve('terser', { paths: [dir] }); } catch (e) { return; } // npm ci not run: size only
  const { execFileSync } = require('node:child_process');
  const fresh = execFileSync(process.execPath, [path.join(path.dirname(terser), '..', 'bin', 'terser'),
    path.join(dir, 't.js'), '--compress', 'passes=2', '--mangle', '--comments', 'false']);
  assert.equal(fresh.toString().trim(), min.toString().trim(), 't.min.js is stale: run npm run build in snippet/');
});
