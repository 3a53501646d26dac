// sandcast `bench view`: a headless Chromium viewer driven over stdin/stdout.
//
//   node bench/latency/view-driver.mjs
//
// Prints {"ready":true} once the browser runs, then answers one JSON line
// per JSON command line:
//   {"cmd":"open","url":VIEWER_URL,"mode":"webrtc"|"ws"|"vnc","width":1280,"height":720,
//    "timeoutMs":30000,"warmupMs":0,"clock":false}
//       opens the real viewer page (`?mode=` must already be in the URL) in a
//       new browser context and waits for its first frame (and with clock,
//       for the first readable clock too); answers
//       {ok, mode, state, t: {nav, loaded, ready, connected, firstFrame, firstClock}}
//       with wall-clock times in ms (Date.now(), the same clock as the remote
//       page's, both run on this host).
//   {"cmd":"measure","seconds":10}
//       samples glass-to-glass latency on every new clock for that long, in
//       every mode at the same point: the viewer page's rendering update
//       (requestAnimationFrame) that first finds it in the <video>, the
//       WebSocket stream's canvas or the noVNC canvas; answers {ok, latency: {samples, p50, p95, min, max,
//       mean}, freezes: {count, totalMs, longestMs} (gaps over 250 ms between
//       new clocks), presented, toReceive, toCapture, rates} (see view-stats.js).
//       WebRTC only: presented is drawn time to the video frame callback
//       (the compositor has shown it), toReceive to the arrival of the
//       frame's last packet, toCapture to the capture (its RTP time).
//   {"cmd":"prepare","width":1280,"height":720}
//       a new browser context and tab (empty cache) that the next `open` of
//       that size uses, so the time after a POST is the viewer page's own.
//   {"cmd":"warm","url":URL}  loads a page once, so the browser is warm.
//   {"cmd":"close"}    closes the viewer.       {"cmd":"quit"}  ends.
// Errors answer {ok:false, error}. Uses playwright-core from tests/browser.
// SANDCAST_BENCH_SECURE_ORIGIN=<origin>: treat that plain-HTTP origin as
// secure (the server behind `--impair`, as if it were on HTTPS).

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { summarizeLatency, rates, freezes } from './view-stats.js';
import { VIEWER_ARGS } from '../../tests/browser/chromium-args.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, '../../tests/browser/package.json'));
const { chromium } = require('playwright-core');

// decode.js as a classic script: the page's own modules cannot import it.
const decodeSource = readFileSync(join(here, 'decode.js'), 'utf8').replace(/^export /gm, '');

// Runs in the viewer page before its own scripts: counts WebSocket bytes,
// finds <sandcast-viewer>'s <video> and noVNC canvas, and records when the
// first frame and the first readable clock appear, and every new clock value.
function instrument() {
  const D = window.__sandcastBenchDecode;
  const B = {
    t: { start: Date.now(), loaded: null, ready: null, connected: null, firstFrame: null, firstClock: null },
    measuring: false, samples: [], shownAt: [], presented: [], toReceive: [], toCapture: [], frames: 0, clocks: 0, last: null, lastPresented: null,
    wsBytes: 0, vnc: { decodeMs: 0, updates: 0 },
  };
  window.__sandcastBench = B;
  addEventListener('load', () => { B.t.loaded = Date.now(); });

  // A plain native WebSocket comes back (noVNC checks its prototype's own
  // properties), with a listener that counts what arrives.
  const Native = window.WebSocket;
  function CountingWebSocket(...args) {
    const ws = new Native(...args);
    ws.addEventListener('message', (e) => {
      const d = e.data;
      B.wsBytes += typeof d === 'string' ? d.length : (d.byteLength ?? d.size ?? 0);
    });
    return ws;
  }
  CountingWebSocket.prototype = Native.prototype;
  Object.setPrototypeOf(CountingWebSocket, Native);
  window.WebSocket = CountingWebSocket;

  const scratch = new OffscreenCanvas(1, 1);
  // `received`: when the frame's last packet arrived (WebRTC only), on the
  // Date.now() clock; splits the latency into the remote's and network's
  // share (drawn to received) and the viewer's (received to shown).
  // Both modes are sampled at the same point: the page's rendering update
  // (requestAnimationFrame) that first finds a new clock in the element, as
  // a page script drawing or reading it would. WebRTC's frame callback
  // (`presented`) comes when the compositor has shown the frame.
  const seen = (drawn, isFrame) => {
    if (drawn === null) return;
    const now = Date.now();
    if (B.t.firstClock === null) B.t.firstClock = now;
    if (drawn === B.last) return;
    B.last = drawn;
    B.clocks++;
    if (isFrame) B.frames++;
    if (B.measuring) {
      B.samples.push(now - drawn);
      B.shownAt.push(now);
    }
  };
  const presented = (drawn, received, rtp) => {
    if (drawn === null || drawn === B.lastPresented) return;
    B.lastPresented = drawn;
    if (B.measuring) {
      B.presented.push(Date.now() - drawn);
      if (received !== null) B.toReceive.push(received - drawn);
      if (rtp !== null) {
        // sandcast's RTP time is the capture time in 90 kHz ticks since the
        // epoch, modulo 2^32: unwrap it next to the drawn time.
        const wrap = 2 ** 32;
        const ticks = drawn * 90;
        let cap = Math.floor(ticks / wrap) * wrap + rtp;
        if (cap - ticks > wrap / 2) cap -= wrap;
        if (ticks - cap > wrap / 2) cap += wrap;
        B.toCapture.push(cap / 90 - drawn);
      }
    }
  };
  const read = (source) => {
    try { return D.decodeFrom(source, { canvas: scratch }); } catch (_) { return null; }
  };
  const opaque = (canvas) => {
    const c = new OffscreenCanvas(1, 1);
    const ctx = c.getContext('2d', { willReadFrequently: true });
    ctx.drawImage(canvas, Math.floor(canvas.width / 2), Math.floor(canvas.height / 2), 1, 1, 0, 0, 1, 1);
    return ctx.getImageData(0, 0, 1, 1).data[3] > 0;
  };

  let video = null;
  let rfb = null;
  const onVideoFrame = (_now, meta) => {
    if (B.t.firstFrame === null) B.t.firstFrame = Date.now();
    B.frames++;
    const received = typeof meta?.receiveTime === 'number' ? performance.timeOrigin + meta.receiveTime : null;
    presented(read(video), received, typeof meta?.rtpTimestamp === 'number' ? meta.rtpTimestamp : null);
    video.requestVideoFrameCallback(onVideoFrame);
  };
  // noVNC decodes in JavaScript: time its framebuffer-update handler.
  const timeVnc = (r) => {
    const inner = r._framebufferUpdate;
    if (typeof inner !== 'function') return;
    r._framebufferUpdate = function timed() {
      const t0 = performance.now();
      const done = inner.call(this);
      B.vnc.decodeMs += performance.now() - t0;
      if (done) B.vnc.updates++;
      return done;
    };
  };
  const tick = () => {
    const st = window.sandcast;
    if (st) {
      if (st.state === 'ready' && B.t.ready === null) B.t.ready = Date.now();
      if (st.connected && B.t.connected === null) B.t.connected = Date.now();
      const el = st.element;
      const root = el?.shadowRoot;
      if (root && !video) {
        video = root.querySelector('video');
        if (video) video.requestVideoFrameCallback(onVideoFrame);
      }
      if (el?._rfb && el._rfb !== rfb) {
        rfb = el._rfb;
        timeVnc(rfb);
      }
      if (st.mode === 'webrtc' && video && video.readyState >= 2) seen(read(video), false);
      if (st.mode === 'ws' && el?._ws?.size()) {
        const canvas = root.querySelector('canvas.ws');
        if (B.t.firstFrame === null) B.t.firstFrame = Date.now();
        seen(read(canvas), true);
      }
      if (st.mode === 'vnc') {
        const canvas = root?.querySelector('.vnc canvas');
        if (canvas && canvas.width > 0 && canvas.height > 0) {
          if (B.t.firstFrame === null && opaque(canvas)) B.t.firstFrame = Date.now();
          if (B.t.firstFrame !== null) seen(read(canvas), true);
        }
      }
    }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}

// Runs in the page: a snapshot for view-stats.js `rates`.
async function snapshotInPage() {
  const B = window.__sandcastBench;
  const pc = window.sandcast?.element?.peerConnection ?? null;
  let rtc = null;
  if (pc) {
    const report = await pc.getStats();
    rtc = [];
    report.forEach((s) => {
      if (s.type === 'inbound-rtp' || s.type === 'transport' || s.type === 'codec') rtc.push(s);
    });
  }
  const ws = window.sandcast?.element?._ws ?? null;
  return {
    t: performance.now(), frames: B.frames, clocks: B.clocks, wsBytes: B.wsBytes,
    vnc: { ...B.vnc }, rtc,
    ws: ws ? { framesDecoded: ws._t.framesDecoded, decodeMs: ws._t.decodeMs, codec: ws._codec, ...(ws.size() ?? {}) } : null,
  };
}

const prelude = `(() => {\n${decodeSource}\nwindow.__sandcastBenchDecode = { decodeFrom, percentile };\n})();\n`
  + `(${instrument.toString()})();\nwindow.__sandcastBenchSnapshot = ${snapshotInPage.toString()};\n`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  // Behind `--impair` the server is reached over plain HTTP at an address
  // that is not localhost: the origin counts as secure here, as an HTTPS
  // server's would (WebCodecs, the clipboard).
  args: process.env.SANDCAST_BENCH_SECURE_ORIGIN
    ? [...VIEWER_ARGS, `--unsafely-treat-insecure-origin-as-secure=${process.env.SANDCAST_BENCH_SECURE_ORIGIN}`]
    : VIEWER_ARGS,
});

let ctx = null;
let page = null;
let mode = null;
let consoleErrors = [];

let prepared = null;

async function closeViewer() {
  const c = ctx;
  ctx = null;
  page = null;
  if (c) await c.close().catch(() => {});
}

const commands = {
  async open({ url, mode: want, width = 1280, height = 720, timeoutMs = 30000, warmupMs = 0, clock = false }) {
    if (!url) throw new Error('open needs url');
    if (!['webrtc', 'ws', 'vnc'].includes(want)) throw new Error(`mode must be webrtc, ws or vnc, not ${JSON.stringify(want)}`);
    await closeViewer();
    consoleErrors = [];
    mode = want;
    const ready = prepared?.width === width && prepared?.height === height ? prepared : null;
    if (prepared && !ready) await prepared.ctx.close().catch(() => {});
    prepared = null;
    ctx = ready ? ready.ctx : await browser.newContext({ viewport: { width, height } });
    if (!ready) await ctx.addInitScript({ content: prelude });
    page = ready ? ready.page : await ctx.newPage();
    page.on('pageerror', (e) => consoleErrors.push(e.message));
    page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
    const nav = Date.now();
    await page.goto(url, { waitUntil: 'commit' });
    try {
      await page.waitForFunction(() => window.__sandcastBench?.t.firstFrame != null, null, { timeout: timeoutMs, polling: 20 });
    } catch (e) {
      const st = await page.evaluate(() => ({ state: window.sandcast?.state, mode: window.sandcast?.mode, reason: window.sandcast?.reason })).catch(() => ({}));
      throw new Error(`no frame within ${timeoutMs} ms (viewer state ${st.state}, mode ${st.mode}, reason ${st.reason}; page errors: ${consoleErrors.slice(0, 3).join(' | ') || 'none'})`);
    }
    if (clock) {
      await page.waitForFunction(() => window.__sandcastBench.t.firstClock != null, null, { timeout: timeoutMs, polling: 20 })
        .catch(() => { throw new Error(`frames arrive but no readable clock within ${timeoutMs} ms`); });
    }
    if (warmupMs > 0) await page.waitForTimeout(warmupMs);
    const out = await page.evaluate(() => ({ t: window.__sandcastBench.t, mode: window.sandcast?.mode, state: window.sandcast?.state }));
    if (out.mode !== want) throw new Error(`the viewer streams with ${out.mode}, not ${want}`);
    return { mode: out.mode, state: out.state, t: { nav, ...out.t } };
  },

  async measure({ seconds = 10 }) {
    if (!page) throw new Error('no viewer open');
    const res = await page.evaluate(async (ms) => {
      const snap = window.__sandcastBenchSnapshot;
      const B = window.__sandcastBench;
      const a = await snap();
      B.samples = [];
      B.shownAt = [];
      B.presented = [];
      B.toReceive = [];
      B.toCapture = [];
      B.measuring = true;
      await new Promise((r) => setTimeout(r, ms));
      B.measuring = false;
      const b = await snap();
      return { a, b, samples: B.samples, shownAt: B.shownAt, presented: B.presented, toReceive: B.toReceive, toCapture: B.toCapture };
    }, seconds * 1000);
    return {
      mode,
      latency: summarizeLatency(res.samples),
      freezes: freezes(res.shownAt),
      presented: summarizeLatency(res.presented),
      toReceive: summarizeLatency(res.toReceive),
      toCapture: summarizeLatency(res.toCapture),
      rates: rates(res.a, res.b, mode),
    };
  },

  // A tab of its own, empty cache and all, ready for the next `open` of
  // this size: a person's browser is running before a session is made,
  // so what comes after the POST is the viewer page's own load.
  async prepare({ width = 1280, height = 720 }) {
    await closeViewer();
    if (prepared) await prepared.ctx.close().catch(() => {});
    const c = await browser.newContext({ viewport: { width, height } });
    await c.addInitScript({ content: prelude });
    prepared = { ctx: c, page: await c.newPage(), width, height };
    return {};
  },

  // Loads `url` once in a throw-away context, so the first measured page
  // does not pay for the browser's own start.
  async warm({ url }) {
    const c = await browser.newContext();
    try {
      const p = await c.newPage();
      await p.goto(url, { waitUntil: 'load' });
    } finally {
      await c.close();
    }
    return {};
  },

  async close() {
    await closeViewer();
    return {};
  },
};

const reply = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
reply({ ready: true });
const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    reply({ ok: false, error: `bad command line: ${e.message}` });
    continue;
  }
  if (cmd.cmd === 'quit') break;
  const fn = commands[cmd.cmd];
  if (!fn) {
    reply({ ok: false, error: `unknown command ${JSON.stringify(cmd.cmd)}` });
    continue;
  }
  try {
    reply({ ok: true, ...(await fn(cmd)) });
  } catch (e) {
    reply({ ok: false, error: String(e?.message ?? e) });
  }
}
await closeViewer();
await browser.close();
