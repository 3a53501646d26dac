// The viewer's WebRTC path in headless Chromium: a second page of the same
// browser stands in for the gateway (answers the offer, sends a canvas as
// video, receives the data channels), served through viewer-fixture.mjs.
//
// Everything runs in a network namespace of its own: Chromium gathers no ICE
// candidates on loopback alone, so the namespace gets a TAP device with a
// private address, and no test traffic can leave it. Needs root, `unshare`,
// `ip` and python3 (to hold the TAP device open).
//   cd tests/browser && node --test viewer-webrtc.test.mjs
import { test, before, after, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, CHROMIUM_ARGS } from './viewer-fixture.mjs';

const INNER = process.env.SANDCAST_VIEWER_NETNS === '1';

if (!INNER) {
  test('WebRTC viewer tests in their own network namespace', async () => {
    // A fresh test runner: without NODE_TEST_CONTEXT it runs the file itself.
    const { NODE_TEST_CONTEXT: _, ...env } = process.env;
    const child = spawn('unshare', ['--net', '--', process.execPath, '--test', '--test-reporter=tap', fileURLToPath(import.meta.url)], {
      env: { ...env, SANDCAST_VIEWER_NETNS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    const code = await new Promise((r) => child.on('exit', r));
    console.log(out);
    assert.equal(code, 0, 'the tests inside the namespace failed (output above)');
    assert.match(out, /^# pass 3$/m, 'all three tests ran inside the namespace');
    assert.match(out, /^# fail 0$/m);
  });
} else {
  defineInnerTests();
}

// Creates a TAP device and holds it open (a TAP without an owner has no
// carrier), then gives it an address and a default route.
async function setUpNamespace() {
  const ip = (...args) => execFileSync('ip', args);
  ip('link', 'set', 'lo', 'up');
  const holder = spawn('/usr/bin/python3', ['-c', [
    'import fcntl, os, struct, sys',
    "fd = os.open('/dev/net/tun', os.O_RDWR)",
    "fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', b'vw0', 0x0002 | 0x1000))",
    "print('ready', flush=True)",
    'sys.stdin.read()',
  ].join('\n')], { stdio: ['pipe', 'pipe', 'inherit'] });
  await new Promise((resolve, reject) => {
    holder.stdout.once('data', resolve);
    holder.once('exit', (c) => reject(new Error(`TAP holder exited with ${c}`)));
  });
  // No IPv6 link-local address: its appearance a moment after the link comes
  // up makes Chromium abort requests in flight (ERR_NETWORK_CHANGED).
  ip('link', 'set', 'vw0', 'addrgenmode', 'none');
  ip('addr', 'add', '10.214.0.1/24', 'dev', 'vw0');
  ip('link', 'set', 'vw0', 'up');
  ip('route', 'add', 'default', 'dev', 'vw0');
  return () => { holder.stdin.end(); holder.kill(); };
}

// The gateway stand-in: answers an offer with a magenta canvas as video and
// records what arrives on the data channels.
const GATEWAY_PAGE = `<!doctype html><canvas id="c" width="320" height="240"></canvas><script>
  const c = document.getElementById('c');
  const g = c.getContext('2d');
  let n = 0;
  setInterval(() => { g.fillStyle = '#ff00ff'; g.fillRect(0, 0, 320, 240); g.fillStyle = '#ff00fe'; g.fillRect(n++ % 2, 0, 1, 1); }, 33);
  window.received = [];
  window.peers = [];
  window.channels = [];
  window.answer = async (offer) => {
    const pc = new RTCPeerConnection();
    window.peers.push(pc);
    pc.ondatachannel = (ev) => {
      ev.channel.onmessage = (m) => window.received.push({ label: ev.channel.label, msg: JSON.parse(m.data) });
      if (ev.channel.label === 'input') window.channels.push(ev.channel);
      if (ev.channel.label === 'input') ev.channel.onopen = () => ev.channel.send(JSON.stringify({ kind: 'display_size', width: 320, height: 240 }));
    };
    await pc.setRemoteDescription(offer);
    const track = c.captureStream(30).getVideoTracks()[0];
    const tr = pc.getTransceivers().find((t) => t.receiver.track.kind === 'video');
    tr.direction = 'sendonly';
    await tr.sender.replaceTrack(track);
    await pc.setLocalDescription(await pc.createAnswer());
    if (pc.iceGatheringState !== 'complete') {
      await new Promise((r) => pc.addEventListener('icegatheringstatechange', () => { if (pc.iceGatheringState === 'complete') r(); }));
    }
    return { type: 'answer', sdp: pc.localDescription.sdp, viewer_id: String(window.peers.length) };
  };
</script>`;

function defineInnerTests() {
  let teardownNs;
  let browser;
  let fixture;
  let gateway;
  let page;

  before(async () => {
    teardownNs = await setUpNamespace();
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
      // Both peers are in this browser: plain host candidates, no mDNS names.
      args: [...CHROMIUM_ARGS, '--disable-features=WebRtcHideLocalIpsWithMdns'],
    });
  });

  after(async () => {
    await browser?.close();
    teardownNs?.();
  });

  beforeEach(async () => {
    fixture = await startServer({ vncPort: 9 });
    gateway = await browser.newPage();
    await gateway.route('http://gateway.test/', (r) => r.fulfill({ contentType: 'text/html', body: GATEWAY_PAGE }));
    await gateway.goto('http://gateway.test/');
    fixture.offer = (offer) => gateway.evaluate((o) => window.answer(o), offer);
    page = await browser.newPage({ viewport: { width: 800, height: 600 } });
    page.log = [];
    page.on('pageerror', (e) => page.log.push(`page error: ${e.message}`));
    page.on('requestfailed', (r) => page.log.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
    page.on('console', (m) => page.log.push(`console: ${m.text()}`));
  });

  afterEach(async () => {
    await page?.close();
    await gateway?.close();
    await fixture?.stop();
  });

  const videoPixel = () => page.evaluate(() => {
    const v = document.querySelector('sandcast-viewer').shadowRoot.querySelector('video');
    if (!v.videoWidth) return null;
    const c = new OffscreenCanvas(v.videoWidth, v.videoHeight);
    const g = c.getContext('2d');
    g.drawImage(v, 0, 0);
    return [...g.getImageData(v.videoWidth / 2, v.videoHeight / 2, 1, 1).data.slice(0, 3)];
  });

  // Waits for the viewer to connect; on timeout says what the viewer saw.
  const connected = async (ms = 20000) => {
    try {
      await page.waitForFunction(() => window.sandcast?.connected === true, null, { timeout: ms });
    } catch (e) {
      const s = await page.evaluate(() => { const { element, ...rest } = window.sandcast ?? {}; return rest; });
      throw new Error(`viewer did not connect: ${JSON.stringify(s)}\n${page.log.join('\n')}`);
    }
  };

  test('auto mode plays WebRTC video, sends input, shows WebRTC stats', async () => {
    // A generous timeout: this asserts the WebRTC path, not its speed on a busy machine.
    await page.goto(fixture.viewerUrl('?webrtc-timeout=15000'));
    await connected();
    const s = await page.evaluate(() => ({ mode: window.sandcast.mode, path: window.sandcast.path }));
    assert.deepEqual(s, { mode: 'webrtc', path: null });
    assert.equal(fixture.vncConnections, 0, 'no noVNC when WebRTC connects');
    const offer = JSON.parse(fixture.offers[0]);
    assert.equal(offer.type, 'offer');
    assert.match(offer.sdp, /m=video/);
    const label = await page.evaluate(() => document.querySelector('sandcast-viewer').shadowRoot.querySelector('.path').textContent);
    assert.equal(label, 'WebRTC');

    await page.waitForFunction(() => document.querySelector('sandcast-viewer').shadowRoot.querySelector('video').videoWidth > 0, null, { timeout: 10000 });
    const px = await videoPixel();
    assert.ok(Math.abs(px[0] - 255) < 40 && px[1] < 40 && Math.abs(px[2] - 255) < 40, `magenta expected, got ${px}`);

    await page.mouse.click(400, 300);
    await gateway.waitForFunction(() => window.received.some((r) => r.msg.kind === 'pointer_button' && r.msg.down), null, { timeout: 5000 });
    const buttons = await gateway.evaluate(() => window.received.filter((r) => r.msg.kind === 'pointer_button').map((r) => r.msg));
    assert.deepEqual(buttons, [{ kind: 'pointer_button', button: 'left', down: true }, { kind: 'pointer_button', button: 'left', down: false }]);

    await page.keyboard.press('Control+Alt+Shift+KeyS');
    await page.waitForFunction(() => /^WebRTC · \d+ fps/.test(document.querySelector('sandcast-viewer').shadowRoot.querySelector('.stats').textContent), null, { timeout: 5000 });
    const stats = await page.evaluate(() => window.sandcast.element.stats());
    assert.equal(stats.mode, 'webrtc');
    assert.ok(stats.framesDecoded > 0);
    assert.equal(stats.protocol, 'udp');
    assert.equal(await page.evaluate(() => window.sandcast.element.peerConnection.connectionState), 'connected');
  });

  test('a dropped WebRTC connection is made again while the session is ready', async () => {
    await page.goto(fixture.viewerUrl('?mode=webrtc&webrtc-timeout=15000'));
    await connected();
    assert.equal(fixture.offers.length, 1);
    await gateway.evaluate(() => window.peers[0].close());
    await page.waitForFunction(() => window.sandcast?.connected === false, null, { timeout: 30000 });
    await page.waitForFunction(() => window.sandcast?.connected === true, null, { timeout: 20000 });
    assert.equal(fixture.offers.length, 2);
    assert.equal(await page.evaluate(() => window.sandcast.mode), 'webrtc');
  });

  test('a session_state "ended" message ends the viewer; control is shown', async () => {
    await page.goto(fixture.viewerUrl('?mode=webrtc&webrtc-timeout=15000'));
    await connected();
    await gateway.evaluate(() => window.channels[0].send(JSON.stringify({ kind: 'control', granted: false })));
    await page.waitForFunction(() => window.sandcast?.control === false, null, { timeout: 5000 });
    const label = await page.evaluate(() => document.querySelector('sandcast-viewer').shadowRoot.querySelector('.path').textContent);
    assert.equal(label, 'WebRTC · view only');
    await gateway.evaluate(() => window.channels[0].send(JSON.stringify({ kind: 'session_state', state: 'ended', reason: 'ttl expired' })));
    await page.waitForFunction(() => window.sandcast?.state === 'stopped', null, { timeout: 5000 });
    const o = await page.evaluate(() => {
      const r = document.querySelector('sandcast-viewer').shadowRoot;
      return [r.querySelector('.overlay .title').textContent, r.querySelector('.overlay .detail').textContent];
    });
    assert.deepEqual(o, ['session ended', 'ttl expired']);
    assert.equal(await page.evaluate(() => window.sandcast.connected), false);
  });
}
