// Demo site glue. A real site pastes the static tag
//   <script async src="https://collector.example/t.js" data-site="SITE_UUID"></script>
// here it is built from the query string, so tests (and you) can pick the site and the
// privacy switches: ?site=UUID&collector=http://host:port&cookieless&require-consent&respect-dnt&debug
(() => {
  const q = new URLSearchParams(location.search);
  window.vq = window.vq || []; // the queue stub: calls made before t.js arrives wait here
  const s = document.createElement('script');
  s.async = true;
  s.src = (q.get('collector') || '') + '/t.js';
  s.dataset.site = q.get('site') || '00000000-0000-4000-8000-000000000001';
  for (const f of ['cookieless', 'require-consent', 'respect-dnt', 'debug']) {
    if (q.has(f)) s.setAttribute('data-' + f, q.get(f) || 'true');
  }
  document.head.appendChild(s);

  const say = (text) => { const el = document.getElementById('status'); if (el) el.textContent = text; };

  // "SPA" views of the home page: ?view=NAME, switched with pushState (no reload).
  const views = {
    home: 'Welcome to the Acme demo shop. Browse, sign up, change views: every step is an event.',
    features: 'Features: page views, SPA navigation, custom events, identify, time on page.',
    docs: 'Docs: see docs/snippet.md in the repository for the API and the privacy switches.',
  };
  const render = () => {
    const el = document.getElementById('view');
    if (!el) return;
    const name = new URLSearchParams(location.search).get('view') || 'home';
    el.textContent = views[name] || views.home;
    el.dataset.view = name;
  };
  const go = (name) => {
    const u = new URL(location.href);
    if (name === 'home') u.searchParams.delete('view'); else u.searchParams.set('view', name);
    history.pushState({ view: name }, '', u);
    render();
  };
  addEventListener('popstate', render);

  document.addEventListener('DOMContentLoaded', () => {
    render();
    // Links to the other pages keep the demo's settings (site, switches), not the view or UTM tags.
    for (const a of document.querySelectorAll('a.page')) {
      const keep = new URLSearchParams(location.search);
      for (const k of [...keep.keys()]) if (k === 'view' || k.startsWith('utm_')) keep.delete(k);
      a.search = keep.toString();
    }
    for (const b of document.querySelectorAll('[data-view]')) {
      if (b.tagName === 'BUTTON') b.addEventListener('click', () => go(b.dataset.view));
    }
    document.getElementById('signup')?.addEventListener('click', () => {
      vq.push(['track', 'signup_click', { plan: 'pro', place: 'hero' }]);
      say('Thanks! (a signup_click event was sent)');
    });
    document.getElementById('trial')?.addEventListener('click', () => {
      vq.push(['track', 'trial_start', { plan: 'team', seats: 5 }]);
      say('Trial started (a trial_start event was sent)');
    });
    document.getElementById('identify')?.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const email = ev.target.elements.email.value.trim();
      if (email) vq.push(['identify', email, { newsletter: ev.target.elements.newsletter.checked }]);
      say('Hello ' + email + ' (an identify event was sent)');
    });
    document.getElementById('optout')?.addEventListener('click', () => { vq.push(['optOut']); say('Opted out: nothing more is sent.'); });
    document.getElementById('optin')?.addEventListener('click', () => { vq.push(['optIn']); say('Opted in again.'); });
    const banner = document.getElementById('consent');
    if (banner && q.has('require-consent')) {
      banner.hidden = false;
      for (const [id, yes] of [['accept', true], ['decline', false]]) {
        document.getElementById(id).addEventListener('click', () => { vq.push(['consent', yes]); banner.hidden = true; });
      }
    }
  });
})();
