// The viewer page (viewer/index.html + <sandcast-viewer>) in headless Chromium
// against a real Xvfb + x11vnc and a Node stand-in for the server's viewer
// routes (viewer-fixture.mjs).
//   cd tests/browser && node --test viewer-page.test.mjs
import { test, before, after, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';
import { startDisplay, startServer, until, CHROMIUM_ARGS } from './viewer-fixture.mjs';

const run = promisify(execFile);
let display;
let fixture;
let browser;
let page;

before(async () => {
  display = await startDisplay();
  await display.setColour('#ff0000');
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: CHROMIUM_ARGS });
});

after(async () => {
  await browser?.close();
  await display?.stop();
});

beforeEach(async () => {
  fixture = await startServer({ vncPort: display.vncPort });
  page = await browser.newPage({ viewport: { width: 800, height: 600 } });
  page.on('pageerror', (e) => console.error('page error:', e.message));
});

afterEach(async () => {
  await page?.close();
  await fixture?.stop();
});

const status = () => page.evaluate(() => {
  const { element, ...s } = window.sandcast ?? {};
  return s;
});

const overlay = () => page.evaluate(() => {
  const root = document.querySelector('sandcast-viewer').shadowRoot;
  const o = root.querySelector('.overlay');
  return {
    shown: !o.hidden,
    title: o.querySelector('.title').textContent,
    detail: o.querySelector('.detail').textContent,
    path: root.querySelector('.path').textContent,
  };
});

const waitFor = (fn, arg, ms = 15000) => page.waitForFunction(fn, arg, { timeout: ms, polling: 50 });

// Average colour of the middle of noVNC's canvas.
const centrePixel = () => page.evaluate(() => {
  const canvas = document.querySelector('sandcast-viewer').shadowRoot.querySelector('.vnc canvas');
  if (!canvas || !canvas.width) return null;
  const d = canvas.getContext('2d').getImageData(canvas.width / 2 - 5, canvas.height / 2 - 5, 10, 10).data;
  let r = 0; let g = 0; let b = 0;
  for (let i = 0; i < d.length; i += 4) { r += d[i]; g += d[i + 1]; b += d[i + 2]; }
  const n = d.length / 4;
  return [Math.round(r / n), Math.round(g / n), Math.round(b / n)];
});

const near = (px, rgb) => px && px.every((v, i) => Math.abs(v - rgb[i]) < 16);

test('noVNC shows the pixels of the X display and follows changes', async () => {
  await display.setColour('#ff0000');
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true && window.sandcast.mode === 'vnc');
  await until(async () => near(await centrePixel(), [255, 0, 0]), 10000, 'red on the noVNC canvas');
  await display.setColour('#0000ff');
  await until(async () => near(await centrePixel(), [0, 0, 255]), 10000, 'blue on the noVNC canvas');
  const o = await overlay();
  assert.equal(o.shown, false, 'no overlay while connected');
  assert.match(o.path, /^noVNC \(forced by mode=vnc\)$/);
  const root = await page.evaluate(() => ({ ...document.documentElement.dataset }));
  assert.equal(root.mode, 'vnc');
  assert.equal(root.connected, 'true');
  assert.equal(root.state, 'ready');
  const canvasSize = await page.evaluate(() => {
    const c = document.querySelector('sandcast-viewer').shadowRoot.querySelector('.vnc canvas');
    return [c.width, c.height];
  });
  assert.deepEqual(canvasSize, [640, 480]);
});

test('the token leaves the address bar and is sent only as bearer / ws query', async () => {
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true);
  const href = await page.evaluate(() => location.href);
  assert.ok(!href.includes(fixture.token), `token still in ${href}`);
  assert.equal(href, `${fixture.origin}/viewer/x?mode=vnc`);
  const stateReqs = fixture.requests.filter((r) => r.path === '/viewer/x/state');
  assert.ok(stateReqs.length > 0);
  assert.ok(stateReqs.every((r) => r.auth === `Bearer ${fixture.token}`));
  assert.ok(fixture.requests.some((r) => r.method === 'WS' && r.path === '/viewer/x/vnc' && r.auth === fixture.token));
  // Reloading without the fragment still works: the token is kept for this tab.
  await page.reload();
  await waitFor(() => window.sandcast?.connected === true);
});

test('starting shows the children, then failed shows the reason', async () => {
  fixture.state.body = {
    id: 'x', state: 'starting', reason: null, width: 640, height: 480,
    children: [{ name: 'xvfb', state: 'running', restarts: 0 }, { name: 'browser', state: 'starting', restarts: 0 }],
  };
  await page.goto(fixture.viewerUrl());
  await waitFor(() => window.sandcast?.state === 'starting');
  // A starting session is asked after often (150 ms), not once a second.
  const polls = () => fixture.requests.filter((r) => r.path === '/viewer/x/state').length;
  const before = polls();
  await until(() => polls() >= before + 4, 2500, 'four more state polls while starting');
  let o = await overlay();
  assert.equal(o.shown, true);
  assert.equal(o.title, 'starting…');
  assert.equal(o.detail, 'xvfb: running · browser: starting');
  fixture.state.body = { ...fixture.state.body, state: 'failed', reason: 'browser is in a crash loop' };
  await waitFor(() => window.sandcast?.state === 'failed');
  o = await overlay();
  assert.equal(o.title, 'failed: browser is in a crash loop');
  assert.equal((await status()).connected, false);
  assert.equal(fixture.vncConnections, 0, 'nothing streams from a session that never became ready');
});

test('a wrong token shows "not authorised" and stops polling', async () => {
  await page.goto(fixture.viewerUrl('', 'wrong-token'));
  await waitFor(() => window.sandcast?.state === 'unauthorised');
  const o = await overlay();
  assert.equal(o.title, 'not authorised');
  const polls = fixture.requests.filter((r) => r.path === '/viewer/x/state').length;
  assert.equal(polls, 1);
  assert.equal(await page.evaluate(() => document.documentElement.dataset.state), 'unauthorised');
});

test('a missing token shows "not authorised" without asking the server', async () => {
  await page.goto(`${fixture.origin}/viewer/x`);
  await waitFor(() => window.sandcast?.state === 'unauthorised');
  assert.equal((await overlay()).title, 'not authorised');
  assert.equal(fixture.requests.filter((r) => r.path === '/viewer/x/state').length, 0);
});

test('a stopped session shows "session ended" and closes the stream', async () => {
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true);
  await page.evaluate(() => {
    window.ended = null;
    window.sandcast.element.addEventListener('ended', (e) => { window.ended = e.detail; });
  });
  fixture.state.body = { ...fixture.state.body, state: 'stopped', reason: 'deleted by the operator' };
  await waitFor(() => window.ended !== null);
  assert.deepEqual(await page.evaluate(() => window.ended), { state: 'stopped', reason: 'deleted by the operator' });
  const o = await overlay();
  assert.equal(o.title, 'session ended');
  assert.equal((await status()).connected, false);
  await until(() => fixture.sockets.size === 0, 5000, 'the VNC tunnel to close');
});

test('a completed session shows "done", not a dead stream', async () => {
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true);
  await page.evaluate(() => {
    window.ended = null;
    window.sandcast.element.addEventListener('ended', (e) => { window.ended = e.detail; });
  });
  const reason = 'the launch command ended with exit code 0';
  fixture.state.body = { ...fixture.state.body, state: 'completed', reason };
  await waitFor(() => window.ended !== null);
  assert.deepEqual(await page.evaluate(() => window.ended), { state: 'completed', reason });
  const o = await overlay();
  assert.equal(o.title, 'done');
  assert.equal((await status()).connected, false);
  await until(() => fixture.sockets.size === 0, 5000, 'the VNC tunnel to close');
});

test('a refused WebRTC offer falls back to noVNC and says why', async () => {
  await page.goto(fixture.viewerUrl());
  await waitFor(() => window.sandcast?.connected === true && window.sandcast.mode === 'vnc');
  const offers = fixture.requests.filter((r) => r.path === '/api/webrtc/session/x/offer');
  assert.equal(offers.length, 1, 'WebRTC was tried first');
  assert.equal(offers[0].auth, `Bearer ${fixture.token}`);
  const s = await status();
  assert.match(s.path, /^WebRTC failed: offer refused: HTTP 503 /);
  assert.match((await overlay()).path, /^noVNC \(WebRTC failed: offer refused: HTTP 503 .*webrtc gateway not available/);
  await display.setColour('#00ff00');
  await until(async () => near(await centrePixel(), [0, 255, 0]), 10000, 'green on the noVNC canvas');
});

test('a WebRTC offer that never answers falls back after the timeout', async () => {
  fixture.offer = 'hang';
  await page.goto(fixture.viewerUrl('?webrtc-timeout=1500'));
  await waitFor(() => window.sandcast?.element !== undefined);
  await page.evaluate(() => {
    window.fallbacks = [];
    window.sandcast.element.addEventListener('fallback', (e) => window.fallbacks.push(e.detail.reason));
  });
  await waitFor(() => window.sandcast?.connected === true && window.sandcast.mode === 'vnc');
  // The video stream over a WebSocket came second; this stand-in server has none.
  assert.deepEqual(await page.evaluate(() => window.fallbacks), [
    'WebRTC did not connect within 1.5 s',
    'the video stream failed: the video socket was refused or could not connect',
  ]);
  assert.ok(fixture.requests.some((r) => r.method === 'WS' && r.path === '/viewer/x/video' && r.auth === fixture.token),
    'the stream was tried with the token');
  assert.equal((await overlay()).path,
    'noVNC (WebRTC did not connect within 1.5 s; the video stream failed: the video socket was refused or could not connect)');
});

test('mode=webrtc never falls back', async () => {
  await page.goto(fixture.viewerUrl('?mode=webrtc'));
  await waitFor(() => /WebRTC failed/.test(window.sandcast?.reason ?? ''));
  const o = await overlay();
  assert.equal(o.title, 'WebRTC did not connect, retrying…');
  assert.equal(fixture.vncConnections, 0);
  assert.equal((await status()).mode, null);
});

test('noVNC reconnects after the tunnel drops while the session is ready', async () => {
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true);
  assert.equal(fixture.vncConnections, 1);
  fixture.dropVnc();
  await waitFor(() => window.sandcast?.connected === false);
  assert.equal((await overlay()).title, 'reconnecting…');
  await waitFor(() => window.sandcast?.connected === true);
  assert.equal(fixture.vncConnections, 2);
});

test('Ctrl+Alt+Shift+S toggles the stats panel', async () => {
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true);
  const panel = () => page.evaluate(() => {
    const p = document.querySelector('sandcast-viewer').shadowRoot.querySelector('.stats');
    return { shown: !p.hidden, text: p.textContent };
  });
  assert.equal((await panel()).shown, false);
  await page.keyboard.press('Control+Alt+Shift+KeyS');
  await waitFor(() => document.querySelector('sandcast-viewer').shadowRoot.querySelector('.stats').textContent.length > 0);
  assert.deepEqual(await panel(), { shown: true, text: 'noVNC · 640x480' });
  const stats = await page.evaluate(() => window.sandcast.element.stats());
  assert.deepEqual(stats, { mode: 'vnc', connected: true, width: 640, height: 480 });
  await page.keyboard.press('Control+Alt+Shift+KeyS');
  assert.equal((await panel()).shown, false);
});

test('clipboard: Ctrl+V sends local text over the input socket before its V, server cut text reaches the local clipboard', async (t) => {
  const context = await browser.newContext({ viewport: { width: 800, height: 600 } });
  t.after(() => context.close());
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: fixture.origin });
  const p = await context.newPage();
  await p.goto(fixture.viewerUrl('?mode=vnc'));
  await p.waitForFunction(() => window.sandcast?.connected === true, null, { timeout: 15000 });

  // Local to remote: paste into the focused viewer. Input goes over the
  // input socket (noVNC is view-only), the text before the V that pastes it.
  fixture.inputs.length = 0;
  await p.evaluate(() => navigator.clipboard.writeText('pasted locally ✓'));
  await p.mouse.click(400, 300);
  await p.keyboard.press('Control+KeyV');
  await until(() => fixture.inputs.some((m) => m.kind === 'key' && m.code === 'KeyV' && m.down === false), 10000, 'the V of the paste');
  const clip = fixture.inputs.findIndex((m) => m.kind === 'clipboard' && m.text === 'pasted locally ✓');
  const v = fixture.inputs.findIndex((m) => m.kind === 'key' && m.code === 'KeyV' && m.down);
  assert.ok(clip >= 0 && clip < v, JSON.stringify(fixture.inputs));

  // Remote to local: a ServerCutText message (x11vnc here does not forward
  // X selection changes, so the fixture sends the message a VNC server sends).
  await fixture.serverCutText('from the remote session');
  await p.waitForFunction(() => window.sandcast.element.remoteClipboard === 'from the remote session', null, { timeout: 10000 });
  assert.equal(await p.evaluate(() => navigator.clipboard.readText()), 'from the remote session');
});

test('a page that is not a secure context says what it costs, a secure one says nothing', async (t) => {
  // Loopback is a secure context; the same page under a host name over plain
  // HTTP is not (the name resolves to 127.0.0.1 inside this browser only).
  const http = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: [...CHROMIUM_ARGS, '--host-resolver-rules=MAP sandcast.test 127.0.0.1'],
  });
  t.after(() => http.close());
  const notice = (p) => p.evaluate(() => {
    const n = document.querySelector('sandcast-viewer').shadowRoot.querySelector('.notice');
    return { shown: !n.hidden, text: n.textContent, title: n.title };
  });

  const p = await http.newPage();
  const warnings = [];
  p.on('console', (m) => { if (m.type() === 'warning') warnings.push(m.text()); });
  await p.goto(fixture.viewerUrl('?mode=vnc').replace('127.0.0.1', 'sandcast.test'));
  await p.waitForFunction(() => window.sandcast?.connected === true, null, { timeout: 15000 });
  assert.equal(await p.evaluate(() => window.isSecureContext), false);
  const s = await p.evaluate(() => ({ secure: window.sandcast.secureContext, notice: window.sandcast.notice }));
  assert.equal(s.secure, false);
  assert.match(s.notice, /clipboard/);
  assert.match(s.notice, /HTTPS/);
  const n = await notice(p);
  assert.equal(n.shown, true, 'the notice is visible in the bar');
  assert.match(n.text, /clipboard/);
  assert.equal(n.title, s.notice);
  assert.ok(warnings.some((w) => w.includes('clipboard')), `console: ${warnings}`);

  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true);
  assert.equal(await page.evaluate(() => window.sandcast.secureContext), true);
  assert.equal((await notice(page)).shown, false);
});

async function cutBuffer() {
  const { stdout } = await run('xprop', ['-display', display.display, '-root', 'CUT_BUFFER0']);
  const m = /^CUT_BUFFER0\(STRING\) = "(.*)"$/m.exec(stdout);
  return m ? m[1] : null;
}

test('with noVNC, pointer positions go over the input socket, scaled to the display', async () => {
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true);
  await until(() => fixture.inputSockets.size > 0, 5000, 'the input socket');
  // 640x480 scaled into 800x600: factor 1.25.
  for (const [px, py, x, y] of [[400, 300, 320, 240], [100, 500, 80, 400]]) {
    fixture.inputs.length = 0;
    await page.mouse.move(px, py);
    await until(() => fixture.inputs.some((m) => m.kind === 'pointer_move' && m.x === x && m.y === y), 5000,
      `a pointer move to ${x},${y} (got ${JSON.stringify(fixture.inputs)})`);
  }
  // noVNC itself sends nothing: the X pointer has not moved.
  const { stdout } = await run('xdotool', ['getmouselocation', '--shell'], { env: { ...process.env, DISPLAY: display.display } });
  assert.ok(!stdout.includes('X=80\n'), stdout);
});

test('index.html preloads exactly the modules the page loads, and noVNC only when used', async () => {
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true);
  const { loaded, preloaded, entries } = await page.evaluate(() => ({
    loaded: performance.getEntriesByType('resource').map((r) => new URL(r.name).pathname).filter((p) => p.endsWith('.js')),
    preloaded: [...document.querySelectorAll('link[rel=modulepreload]')].map((l) => new URL(l.href).pathname),
    entries: [...document.querySelectorAll('script[type=module]')].map((s) => new URL(s.src).pathname),
  }));
  const sorted = (xs) => [...new Set(xs)].sort();
  // noVNC is imported when a viewer falls back to it, not before.
  const lazy = (p) => p.startsWith('/assets/vendor/novnc/');
  assert.deepEqual(sorted(loaded.filter((p) => !lazy(p))), sorted([...preloaded, ...entries]),
    'update the modulepreload links in viewer/index.html (see viewer/README.md)');
  assert.ok(loaded.some(lazy), 'noVNC was loaded for the noVNC viewer');
  assert.ok(!preloaded.some(lazy), 'noVNC is not preloaded: most viewers never use it');
});

test('a module that fails to load once is retried by reloading the page', async () => {
  let aborted = 0;
  let served = 0;
  await page.route('**/assets/src/stats.js', (route) => {
    if (aborted === 0) {
      aborted++;
      return route.abort('internetdisconnected');
    }
    served++;
    return route.continue();
  });
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => window.sandcast?.connected === true && window.sandcast.mode === 'vnc');
  assert.equal(aborted, 1);
  assert.ok(served >= 1, 'stats.js was fetched again after the reload');
  // The page loaded, so the retry count starts afresh.
  assert.equal(await page.evaluate(() => sessionStorage.getItem('sandcast-viewer-reloads')), null);
});

test('a module that never loads says so on the page instead of staying blank', async () => {
  let loads = 0;
  page.on('request', (r) => { if (r.isNavigationRequest()) loads++; });
  await page.route('**/assets/src/stats.js', (route) => route.abort('internetdisconnected'));
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await waitFor(() => document.querySelector('.load-error')?.textContent.includes('Reload the page'), null, 20000);
  const shown = await page.evaluate(() => ({
    text: document.querySelector('.load-error').textContent,
    state: document.documentElement.dataset.state,
    reason: document.documentElement.dataset.reason,
  }));
  assert.equal(shown.state, 'error');
  assert.match(shown.reason, /^could not load \/assets\/src\//);
  assert.match(shown.text, /^The viewer could not load \/assets\/src\/.*\. Reload the page to try again\.$/);
  // The first load and three reloads, then it stops: a fourth reload
  // would come 2 s after the last one.
  await new Promise((r) => setTimeout(r, 2500));
  assert.equal(loads, 4);
});

test('after a fallback, a dropped noVNC tunnel reconnects without trying WebRTC again', async () => {
  await page.goto(fixture.viewerUrl());
  await waitFor(() => window.sandcast?.connected === true && window.sandcast.mode === 'vnc');
  const offers = () => fixture.requests.filter((r) => r.path === '/api/webrtc/session/x/offer').length;
  assert.equal(offers(), 1);
  fixture.dropVnc();
  await waitFor(() => window.sandcast?.connected === false);
  await waitFor(() => window.sandcast?.connected === true);
  assert.equal(fixture.vncConnections, 2);
  assert.equal(offers(), 1);
  assert.match((await overlay()).path, /^noVNC \(WebRTC failed: offer refused: HTTP 503/);
  // connect() tries WebRTC afresh.
  await page.evaluate(() => window.sandcast.element.connect());
  await until(() => offers() === 2, 10000, 'a second offer after connect()');
});
