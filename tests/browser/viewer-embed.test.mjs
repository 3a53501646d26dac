// <sandcast-viewer> embedded in a page of another origin (an operator's
// product), against the viewer-fixture.mjs stand-in of the sandcast server.
//   cd tests/browser && node --test viewer-embed.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { chromium } from 'playwright-core';
import { startDisplay, startServer, until, CHROMIUM_ARGS } from './viewer-fixture.mjs';

let display;
let browser;

before(async () => {
  display = await startDisplay();
  await display.setColour('#00ff00');
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: CHROMIUM_ARGS });
});

after(async () => {
  await browser?.close();
  await display?.stop();
});

// The operator's own page, on its own origin.
async function operatorPage(html) {
  const srv = createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end(html);
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${srv.address().port}/`, close: () => new Promise((r) => { srv.closeAllConnections(); srv.close(r); }) };
}

const embed = (server, attrs) => `<!doctype html><html><body>
<h1>operator page</h1>
<script>
  window.events = [];
  for (const type of ['statechange', 'connected', 'fallback', 'ended']) {
    document.addEventListener(type, (e) => window.events.push({ type, detail: e.detail }));
  }
</script>
<script type="module" src="${server}/assets/src/sandcast-viewer.js"></script>
<sandcast-viewer ${attrs} style="width:640px;height:480px"></sandcast-viewer>
</body></html>`;

test('embedded on another origin: falls back, connects, emits events, disconnect() and connect() work', async (t) => {
  const fixture = await startServer({ vncPort: display.vncPort, cors: true });
  t.after(() => fixture.stop());
  // No server attribute: it defaults to the origin the module came from.
  const op = await operatorPage(embed(fixture.origin, `session="x" token="${fixture.token}" webrtc-timeout="2000"`));
  t.after(() => op.close());
  const page = await browser.newPage();
  t.after(() => page.close());
  await page.goto(op.url);
  await page.waitForFunction(() => document.querySelector('sandcast-viewer')?.dataset.connected === 'true', null, { timeout: 15000 });

  const types = await page.evaluate(() => window.events.map((e) => e.type).filter((x) => x !== 'statechange'));
  // WebRTC, then the WebSocket stream (this stand-in server has none), then noVNC.
  assert.deepEqual(types, ['fallback', 'fallback', 'connected']);
  const events = await page.evaluate(() => window.events);
  const fallbacks = events.filter((e) => e.type === 'fallback').map((e) => e.detail.reason);
  assert.match(fallbacks[0], /^WebRTC failed: offer refused: HTTP 503/);
  assert.match(fallbacks[1], /^the video stream failed: /);
  assert.deepEqual(events.find((e) => e.type === 'connected').detail, { mode: 'vnc' });
  const states = events.filter((e) => e.type === 'statechange').map((e) => e.detail.state);
  assert.equal(states[0], 'connecting');
  assert.ok(states.includes('ready'));
  const el = await page.evaluate(() => ({ ...document.querySelector('sandcast-viewer').dataset }));
  assert.deepEqual(el, { state: 'ready', mode: 'vnc', connected: 'true' });
  assert.ok(fixture.requests.some((r) => r.method === 'OPTIONS' && r.path === '/viewer/x/state'), 'a CORS preflight was made');

  await page.evaluate(() => document.querySelector('sandcast-viewer').disconnect());
  await until(() => fixture.sockets.size === 0, 5000, 'the tunnel to close after disconnect()');
  const polls = fixture.requests.filter((r) => r.path === '/viewer/x/state' && r.method === 'GET').length;
  const title = await page.evaluate(() => document.querySelector('sandcast-viewer').shadowRoot.querySelector('.overlay .title').textContent);
  assert.equal(title, 'disconnected');

  await page.evaluate(() => document.querySelector('sandcast-viewer').connect());
  await page.waitForFunction(() => document.querySelector('sandcast-viewer').dataset.connected === 'true', null, { timeout: 15000 });
  assert.ok(fixture.requests.filter((r) => r.path === '/viewer/x/state' && r.method === 'GET').length > polls);
  assert.equal(fixture.vncConnections, 2);
});

test('mode="vnc" skips WebRTC; removing the element stops everything', async (t) => {
  const fixture = await startServer({ vncPort: display.vncPort, cors: true });
  t.after(() => fixture.stop());
  const op = await operatorPage(embed(fixture.origin, `server="${fixture.origin}" session="x" token="${fixture.token}" mode="vnc"`));
  t.after(() => op.close());
  const page = await browser.newPage();
  t.after(() => page.close());
  await page.goto(op.url);
  await page.waitForFunction(() => document.querySelector('sandcast-viewer')?.dataset.connected === 'true', null, { timeout: 15000 });
  assert.equal(fixture.requests.filter((r) => r.path.startsWith('/api/webrtc/')).length, 0);
  await page.evaluate(() => document.querySelector('sandcast-viewer').remove());
  await until(() => fixture.sockets.size === 0, 5000, 'the tunnel to close after removal');
  const before = fixture.requests.length;
  await page.waitForTimeout(2500); // nothing to await: checking that polling has stopped
  assert.equal(fixture.requests.length, before, 'no more polling after removal');
});

test('without CORS headers on the server the component cannot load cross-origin', async (t) => {
  const fixture = await startServer({ vncPort: display.vncPort, cors: false });
  t.after(() => fixture.stop());
  const op = await operatorPage(embed(fixture.origin, `session="x" token="${fixture.token}"`));
  t.after(() => op.close());
  const page = await browser.newPage();
  t.after(() => page.close());
  const failed = new Promise((resolve) => page.on('console', (m) => { if (/CORS/.test(m.text())) resolve(m.text()); }));
  await page.goto(op.url);
  assert.match(await failed, /Access-Control-Allow-Origin/);
  assert.equal(await page.evaluate(() => customElements.get('sandcast-viewer')), undefined);
});

test('helpers: URL building and parsing', async (t) => {
  const fixture = await startServer({ vncPort: display.vncPort });
  t.after(() => fixture.stop());
  const page = await browser.newPage();
  t.after(() => page.close());
  await page.goto(`${fixture.origin}/viewer/x?mode=vnc`); // same origin: imports need no CORS
  const r = await page.evaluate(async () => {
    const v = await import('/assets/src/sandcast-viewer.js');
    const p = await import('/assets/src/viewer.js');
    return {
      https: v.vncUrl('https://h.example:8443', 'a b', 't&k'),
      http: v.vncUrl('http://127.0.0.1:8080/', 'id1', 'tok'),
      prefixed: v.vncUrl('https://h.example/sandcast', 'id1', 'tok'),
      children: v.describeChildren([{ name: 'xvfb', state: 'running', restarts: 0 }, { name: 'browser', state: 'restarting', restarts: 3 }]),
      none: v.describeChildren(undefined),
      id: p.sessionFromPath('/viewer/abc%2Fdef'),
      noId: p.sessionFromPath('/other/abc'),
      token: p.tokenFromHash('#token=a%2Bb&x=1'),
      noToken: p.tokenFromHash(''),
    };
  });
  assert.deepEqual(r, {
    https: 'wss://h.example:8443/viewer/a%20b/vnc?token=t%26k',
    http: 'ws://127.0.0.1:8080/viewer/id1/vnc?token=tok',
    prefixed: 'wss://h.example/sandcast/viewer/id1/vnc?token=tok',
    children: 'xvfb: running · browser: restarting (3 restarts)',
    none: '',
    id: 'abc/def',
    noId: null,
    token: 'a+b',
    noToken: null,
  });
});
