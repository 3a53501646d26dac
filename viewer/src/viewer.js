// sandcast viewer page: /viewer/<id>#token=<viewer token>[?mode=auto|webrtc|ws|vnc]
//
// A thin page around <sandcast-viewer>: it takes the session id from the
// path and the token from the fragment (then removes the token from the
// address bar and history), and mirrors the element's status on
// `window.sandcast` and as data- attributes on <html> for scripts and tests.

import { MODES, MODE_LABELS } from './sandcast-viewer.js';

/** Parses the session id from a /viewer/<id> path; null when absent. */
export function sessionFromPath(pathname) {
  const m = /\/viewer\/([^/]+)\/?$/.exec(pathname);
  return m ? decodeURIComponent(m[1]) : null;
}

/** Reads `token` from a URL fragment such as "#token=abc". */
export function tokenFromHash(hash) {
  return new URLSearchParams(hash.replace(/^#/, '')).get('token');
}

const STORE = 'sandcast-viewer-token:';

function main() {
  // The page loaded: a later failure to load it starts counting afresh.
  try { sessionStorage.removeItem('sandcast-viewer-reloads'); } catch (_) { /* storage disabled */ }
  const id = sessionFromPath(location.pathname);
  let token = tokenFromHash(location.hash);
  if (id && token) {
    // Kept for this tab only, so a reload still works without the fragment.
    try { sessionStorage.setItem(STORE + id, token); } catch (_) { /* storage disabled */ }
  } else if (id) {
    try { token = sessionStorage.getItem(STORE + id); } catch (_) { token = null; }
  }
  if (location.hash) history.replaceState(history.state, '', location.pathname + location.search);

  const params = new URLSearchParams(location.search);
  const el = document.createElement('sandcast-viewer');
  el.setAttribute('manual', '');
  el.setAttribute('autofocus', '');
  el.setAttribute('server', location.origin);
  el.setAttribute('session', id ?? '');
  el.setAttribute('token', token ?? '');
  const mode = params.get('mode');
  if (mode && MODES.includes(mode)) el.setAttribute('mode', mode);
  for (const p of ['webrtc-timeout', 'poll-interval']) if (params.has(p)) el.setAttribute(p, params.get(p));

  const publish = () => {
    const s = el.status;
    window.sandcast = { ...s, element: el };
    const root = document.documentElement;
    root.dataset.state = s.state;
    root.dataset.mode = s.mode ?? '';
    root.dataset.connected = String(s.connected);
    root.dataset.reason = s.reason ?? '';
    document.title = `sandcast · ${s.state}${s.mode ? ` · ${MODE_LABELS[s.mode]}` : ''}`;
  };
  el.addEventListener('statechange', publish);
  document.body.append(el);
  publish();
  el.connect(); // without an id or token this shows why nothing can be shown

}

main();
