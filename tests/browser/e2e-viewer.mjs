// Opens sandcast viewer pages in headless Chromium and runs a list of steps
// against what they show:
//   node e2e-viewer.mjs '<json>'
// json: { url, kind: "canvas"|"video"|"any", viewers: 1, viewport: [w, h],
//         mode?: "webrtc"|"ws"|"vnc" (the viewer's window.sandcast.mode must be this),
//         chromiumArgs?: [...] (more flags for the viewers' browser),
//         touch?: true (the viewers' pages are on an emulated touch screen),
//         timeoutMs, steps: [...] }
// steps (run in order; actions go to the first viewer, checks to all):
//   { expect: "#rrggbb", tolerance?: 48, timeoutMs? }  the remote screen's centre has that colour
//   { click: true }                                     click the centre of the remote screen
//   { type: "text" }                                    type text
//   { copyLocal: "text" }                               put text on the viewer browser's clipboard
//                                                       (a real Ctrl+C outside the viewer)
//   { paste: true }                                     focus the remote screen, press Ctrl+V
//   { expectRemoteClipboard: "text", timeoutMs? }       the viewer element reports that text as
//                                                       the session's clipboard
//   { expectRemoteClipboardNumber: [min, max] }         ...a number in that range
//   { resize: [w, h] }                                  resize the viewer's window
//   { stats: true }                                     record the viewers' stats; WebRTC and ws ones
//                                                       must have decoded frames
//   { expectResized: { from?: [w, h], max: [w, h] } }   video/canvas size changed (from the size
//                                                       before the last resize) and fits in max
//   { signal: "/path" }                                 create that file (tells the test a step
//                                                       was reached)
//   { waitFile: "/path", timeoutMs? }                   wait until the test creates that file
//   { flood: ms }                                       type without pause for ms milliseconds
//   { press: "Control+KeyA" }                           press a key combination (playwright names)
//   { keys: [{ key, code, modifiers? }] }               key events as a keyboard of any layout sends
//                                                       them (CDP Input.dispatchKeyEvent: down, up);
//                                                       modifiers: ["Shift", "Control", "Alt", "Meta"]
//   { insertText: "text" }                              text without key events, as dictation, an
//                                                       on-screen keyboard or an IME commit gives it
//   { compose: ["n", "ni"], commit: "你" }               an input method's composition, then its commit
//   { expectControl: true|false, timeoutMs? }           the viewer's input is used (status.control)
//   { tap: [x, y] }                                     a finger's tap at that remote display pixel
//   { swipe: [[x0, y0], [x1, y1]] }                     a finger drawn between two remote pixels
//   { expectRemoteFocus: { editable, x?, y? }, timeoutMs? }  the viewer element's remoteFocus
//                                                       (x, y within 8 px)
//   { expectKeyboard: "text" | "none" }                 the viewer's keyboard text area asks for
//                                                       that on-screen keyboard (inputmode)
//   { rawInput: ["...", { textOf: "x", times: n }] }    send these messages as they are on a new
//                                                       input WebSocket of the session (/viewer/{id}/input);
//                                                       textOf: a text message of that character n times
//   { expectDownload: "name", timeoutMs? }              the viewer element lists that download
//                                                       (its `downloads`)
//   { saveDownload: "name", expectText?: "..." }        click the download's save button; the file
//                                                       the viewer's browser saves has that content
//   { armFileChooser: [{ name, text }] }                the next file chooser of the viewer page is
//                                                       answered with these files
//   { expectFileChosen: true, timeoutMs? }              ...and it was (its "choose…" button is
//                                                       clicked when the chooser waits for a gesture)
//   { expectStatus: { key: value, ... }, timeoutMs? }   the viewer element's status has these values
//   { watchDisconnect: true }                           from now on, record when the viewer element
//                                                       first reports connected: false (it must be
//                                                       connected now)
//   { expectDisconnected: true, timeoutMs? }            ...and wait for it; `got` is { at (epoch ms),
//                                                       state }
//   { expectRemoteClipboardPrefix: "text", timeoutMs? } the session's clipboard as the viewer element
//                                                       reports it starts with that text; `got` is it
//   { expectAutomation: { clients, paused }, timeoutMs? }  the viewer element's status.automation
//                                                       (programs on the DevTools endpoint)
//   { holdButton: true }                                click the automation bar's button
//                                                       ("take control" / "give back")
// Or, to check a page directly on this host (a control for isolation tests):
//   { control: "<url>", expect: "#rrggbb", timeoutMs }
// Prints one line "RESULT <json>" with { ok, steps, error?, console }.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { chromium } from 'playwright-core';
import { scenario } from './scenario.mjs';
import { VIEWER_ARGS } from './chromium-args.mjs';

const arg = JSON.parse(process.argv[2]);
const result = { ok: false, steps: [], console: [] };
const done = scenario(arg, result);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: [...VIEWER_ARGS, ...(arg.chromiumArgs ?? [])],
});

function parseColour(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function close(a, b, tol) {
  return a.every((v, i) => Math.abs(v - b[i]) <= tol);
}

// Runs in the viewer page: finds the remote screen (the largest playing
// <video> or the largest <canvas>, also inside shadow roots) and reads the
// average colour of a small square at its centre.
function sampleInPage(kind) {
  const all = (sel, root = document, out = []) => {
    root.querySelectorAll(sel).forEach((e) => out.push(e));
    root.querySelectorAll('*').forEach((e) => { if (e.shadowRoot) all(sel, e.shadowRoot, out); });
    return out;
  };
  const info = {
    videos: all('video').length, canvases: all('canvas').length,
    mode: window.sandcast?.mode ?? null, state: window.sandcast?.state ?? null,
    reason: window.sandcast?.reason ?? null,
    secureContext: window.isSecureContext, notice: window.sandcast?.notice ?? null,
  };
  let el, w, h, src;
  // "any": whatever the viewer currently streams with.
  if (kind === 'any') kind = info.mode === 'vnc' || info.mode === 'ws' ? 'canvas' : 'video';
  if (kind === 'video') {
    const vs = all('video').filter((v) => v.videoWidth > 0 && v.readyState >= 2);
    vs.sort((a, b) => b.videoWidth * b.videoHeight - a.videoWidth * a.videoHeight);
    el = vs[0];
    if (!el) return { ...info, found: false };
    w = el.videoWidth; h = el.videoHeight; src = el;
  } else {
    // Shown ones only: the WebSocket stream's canvas waits hidden in the other modes.
    const cs = all('canvas').filter((c) => c.width > 0 && c.height > 0 && !c.dataset.e2e && c.getClientRects().length > 0);
    cs.sort((a, b) => b.width * b.height - a.width * a.height);
    el = cs[0];
    if (!el) return { ...info, found: false };
    w = el.width; h = el.height; src = el;
  }
  const c = document.createElement('canvas');
  c.dataset.e2e = '1';
  c.width = 9; c.height = 9;
  const ctx = c.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(src, Math.floor(w / 2) - 4, Math.floor(h / 2) - 4, 9, 9, 0, 0, 9, 9);
  const d = ctx.getImageData(0, 0, 9, 9).data;
  const sum = [0, 0, 0];
  for (let i = 0; i < d.length; i += 4) { sum[0] += d[i]; sum[1] += d[i + 1]; sum[2] += d[i + 2]; }
  const px = d.length / 4;
  const r = el.getBoundingClientRect();
  return {
    ...info, found: true, width: w, height: h,
    rgb: sum.map((s) => Math.round(s / px)),
    centre: [r.left + r.width / 2, r.top + r.height / 2],
    box: { left: r.left, top: r.top, width: r.width, height: r.height },
    time: el.currentTime ?? null,
  };
}

// Runs in the viewer page: the viewer's public stats plus the protocol of
// the selected ICE candidate pair (from the element's peer connection).
async function statsInPage() {
  const el = window.sandcast?.element;
  if (!el) return { error: 'no window.sandcast.element' };
  const out = { ...(await el.stats()) };
  const pc = el.peerConnection ?? el._rtc?.pc;
  if (pc) {
    const report = await pc.getStats();
    let pair;
    const cands = new Map();
    report.forEach((s) => {
      if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
      if (s.type === 'local-candidate' || s.type === 'remote-candidate') cands.set(s.id, s);
    });
    if (pair) {
      out.localProtocol = cands.get(pair.localCandidateId)?.protocol ?? null;
      out.remoteProtocol = cands.get(pair.remoteCandidateId)?.protocol ?? null;
    }
  }
  return out;
}

const cdps = new Map();
async function cdpOf(page) {
  if (!cdps.has(page)) cdps.set(page, await page.context().newCDPSession(page));
  return cdps.get(page);
}

const MODIFIER_BITS = { Alt: 1, Control: 2, Meta: 4, Shift: 8 };

const MODIFIER_CODES = { Alt: 'AltLeft', Control: 'ControlLeft', Meta: 'MetaLeft', Shift: 'ShiftLeft' };

// One key press and release as the browser receives it from a keyboard:
// `key` is what the layout produces, `code` the physical key. Modifiers go
// down before it and up after it, as their own keys. A printable key
// without Control, Alt or Meta carries its text, as a real one does.
async function dispatchKey(cdp, { key, code, modifiers = [] }) {
  let bits = 0;
  for (const name of modifiers) {
    bits |= MODIFIER_BITS[name] ?? 0;
    await cdp.send('Input.dispatchKeyEvent', { type: 'rawKeyDown', key: name, code: MODIFIER_CODES[name], modifiers: bits });
  }
  const printable = [...key].length === 1 && !(bits & 7);
  const vk = key.length === 1 && /[a-z0-9]/i.test(key) ? key.toUpperCase().charCodeAt(0) : 0;
  const base = { key, code, modifiers: bits, windowsVirtualKeyCode: vk, nativeVirtualKeyCode: vk };
  await cdp.send('Input.dispatchKeyEvent', printable
    ? { ...base, type: 'keyDown', text: key, unmodifiedText: key }
    : { ...base, type: 'rawKeyDown' });
  await cdp.send('Input.dispatchKeyEvent', { ...base, type: 'keyUp' });
  for (const name of [...modifiers].reverse()) {
    bits &= ~(MODIFIER_BITS[name] ?? 0);
    await cdp.send('Input.dispatchKeyEvent', { type: 'keyUp', key: name, code: MODIFIER_CODES[name], modifiers: bits });
  }
}

async function waitColour(page, kind, want, tol, timeoutMs, mode) {
  const target = parseColour(want);
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await page.evaluate(sampleInPage, kind).catch((e) => ({ error: String(e) }));
    const modeOk = !mode || last.mode === mode;
    if (last.found && modeOk && close(last.rgb, target, tol)) return { ok: true, sample: last };
    if (Date.now() > deadline) return { ok: false, sample: last };
    await page.waitForTimeout(50);
  }
}

async function runControl() {
  const page = await browser.newPage();
  await page.goto(arg.control);
  const target = parseColour(arg.expect);
  const deadline = Date.now() + (arg.controlTimeoutMs ?? 20000);
  for (;;) {
    const bg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
    const rgb = (bg.match(/\d+/g) ?? []).slice(0, 3).map(Number);
    if (close(rgb, target, 8)) {
      result.steps.push({ control: arg.control.slice(0, 60), ok: true, rgb });
      result.title = await page.title();
      result.ok = true;
      return;
    }
    if (Date.now() > deadline) {
      result.steps.push({ control: arg.control.slice(0, 60), ok: false, rgb });
      result.title = await page.title();
      result.error = `control page has background ${bg}, wanted ${arg.expect}`;
      return;
    }
    await page.waitForTimeout(100);
  }
}

async function runViewers() {
  const [vw, vh] = arg.viewport ?? [1280, 800];
  const pages = [];
  for (let i = 0; i < (arg.viewers ?? 1); i++) {
    const ctx = await browser.newContext({
      viewport: { width: vw, height: vh }, hasTouch: arg.touch === true, acceptDownloads: true,
    });
    const page = await ctx.newPage();
    page.on('console', (m) => {
      if (m.type() === 'error' || m.type() === 'warning') result.console.push(`viewer${i}: ${m.text()}`);
    });
    page.on('pageerror', (e) => result.console.push(`viewer${i} error: ${e.message}`));
    await page.goto(arg.url);
    pages.push(page);
  }
  const clipboardPage = pages[0];
  const kind = arg.kind ?? 'video';
  let lastSize = null;
  let chooser = null; // the armed file chooser's answer, under way
  for (const step of arg.steps) {
    const t0 = Date.now();
    const rec = { step };
    result.steps.push(rec);
    if (step.expect) {
      const outs = await Promise.all(pages.map((p) =>
        waitColour(p, kind, step.expect, step.tolerance ?? 48, step.timeoutMs ?? 20000, arg.mode)));
      rec.samples = outs.map((o) => o.sample);
      rec.ok = outs.every((o) => o.ok);
    } else if (step.stats) {
      rec.stats = await Promise.all(pages.map((p) => p.evaluate(statsInPage)));
      rec.ok = rec.stats.every((st) => (st.mode !== 'webrtc' && st.mode !== 'ws') || st.framesDecoded > 0);
    } else if (step.click) {
      const s = await pages[0].evaluate(sampleInPage, kind);
      if (!s.found) { rec.ok = false; rec.error = 'no remote screen to click'; }
      else {
        await pages[0].mouse.click(s.centre[0], s.centre[1]);
        rec.ok = true;
      }
    } else if (step.type) {
      await pages[0].keyboard.type(step.type, { delay: 40 });
      rec.ok = true;
    } else if (step.copyLocal !== undefined) {
      await pages[0].evaluate((text) => {
        document.activeElement?.blur();
        document.addEventListener('copy', (e) => {
          e.clipboardData.setData('text/plain', text);
          e.preventDefault();
        }, { once: true });
      }, step.copyLocal);
      await pages[0].keyboard.press('Control+KeyC');
      rec.ok = true;
    } else if (step.paste) {
      const focused = await pages[0].evaluate(() => {
        const el = window.sandcast?.element;
        const screen = el?.shadowRoot?.querySelector('video:not([hidden])') ?? el?.querySelector?.('video');
        if (!screen) return false;
        screen.focus();
        return true;
      });
      if (!focused) { rec.ok = false; rec.error = 'no remote screen to focus'; }
      else {
        await pages[0].keyboard.press('Control+KeyV');
        rec.ok = true;
      }
    } else if (step.expectRemoteClipboardNumber) {
      const [min, max] = step.expectRemoteClipboardNumber;
      const deadline = Date.now() + (step.timeoutMs ?? 10000);
      for (;;) {
        rec.got = await clipboardPage.evaluate(() => window.sandcast?.element?.remoteClipboard ?? null);
        const n = Number(rec.got);
        if (rec.got !== null && rec.got !== '' && n >= min && n <= max) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await clipboardPage.waitForTimeout(50);
      }
    } else if (step.expectRemoteClipboard !== undefined) {
      const deadline = Date.now() + (step.timeoutMs ?? 20000);
      for (;;) {
        rec.got = await clipboardPage.evaluate(() => window.sandcast?.element?.remoteClipboard ?? null);
        if (rec.got === step.expectRemoteClipboard) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await clipboardPage.waitForTimeout(50);
      }
    } else if (step.resize) {
      const before = await pages[0].evaluate(sampleInPage, kind);
      lastSize = before.found ? [before.width, before.height] : null;
      rec.before = lastSize;
      await pages[0].setViewportSize({ width: step.resize[0], height: step.resize[1] });
      rec.ok = true;
    } else if (step.expectResized) {
      const { max } = step.expectResized;
      const from = step.expectResized.from ?? lastSize ?? [0, 0];
      const deadline = Date.now() + (step.timeoutMs ?? 20000);
      let s;
      for (;;) {
        s = await pages[0].evaluate(sampleInPage, kind);
        const changed = s.found && (s.width !== from[0] || s.height !== from[1]);
        if (changed && s.width <= max[0] && s.height <= max[1]) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await pages[0].waitForTimeout(100);
      }
      rec.sample = s;
    } else if (step.signal) {
      writeFileSync(step.signal, '');
      rec.ok = true;
    } else if (step.waitFile) {
      const deadline = Date.now() + (step.timeoutMs ?? 20000);
      while (!existsSync(step.waitFile) && Date.now() < deadline) await pages[0].waitForTimeout(50);
      rec.ok = existsSync(step.waitFile);
    } else if (step.press) {
      await pages[0].keyboard.press(step.press);
      rec.ok = true;
    } else if (step.keys) {
      const cdp = await cdpOf(pages[0]);
      for (const k of step.keys) await dispatchKey(cdp, k);
      rec.ok = true;
    } else if (step.insertText !== undefined) {
      const cdp = await cdpOf(pages[0]);
      await cdp.send('Input.insertText', { text: step.insertText });
      rec.ok = true;
    } else if (step.expectControl !== undefined) {
      const deadline = Date.now() + (step.timeoutMs ?? 10000);
      for (;;) {
        rec.got = await pages[0].evaluate(() => window.sandcast?.element?.status?.control ?? null);
        if (rec.got === step.expectControl) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await pages[0].waitForTimeout(50);
      }
    } else if (step.expectAutomation !== undefined) {
      const want = JSON.stringify(step.expectAutomation);
      const deadline = Date.now() + (step.timeoutMs ?? 10000);
      for (;;) {
        rec.got = await pages[0].evaluate(() => window.sandcast?.element?.status?.automation ?? null);
        if (JSON.stringify(rec.got) === want) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await pages[0].waitForTimeout(50);
      }
    } else if (step.holdButton) {
      const button = pages[0].locator('sandcast-viewer .automation button.hold');
      rec.label = await button.textContent();
      await button.click();
      rec.ok = true;
    } else if (step.tap || step.swipe) {
      const s = await pages[0].evaluate(sampleInPage, kind);
      if (!s.found) { rec.ok = false; rec.error = 'no remote screen to touch'; }
      else {
        // The picture fills its element's box as object-fit: contain does.
        const scale = Math.min(s.box.width / s.width, s.box.height / s.height);
        const client = ([rx, ry]) => [
          s.box.left + (s.box.width - s.width * scale) / 2 + rx * scale,
          s.box.top + (s.box.height - s.height * scale) / 2 + ry * scale,
        ];
        if (step.tap) {
          const [x, y] = client(step.tap);
          await pages[0].touchscreen.tap(x, y);
        } else {
          const cdp = await cdpOf(pages[0]);
          const [a, b] = step.swipe.map(client);
          const at = (f) => [{ x: a[0] + (b[0] - a[0]) * f, y: a[1] + (b[1] - a[1]) * f, id: 1 }];
          await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: at(0) });
          for (let i = 1; i <= 10; i++) await cdp.send('Input.dispatchTouchEvent', { type: 'touchMove', touchPoints: at(i / 10) });
          await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] });
        }
        rec.ok = true;
      }
    } else if (step.expectRemoteFocus) {
      const want = step.expectRemoteFocus;
      const deadline = Date.now() + (step.timeoutMs ?? 10000);
      for (;;) {
        rec.got = await pages[0].evaluate(() => window.sandcast?.element?.remoteFocus ?? null);
        const g = rec.got;
        const near = (a, b) => b === undefined || (Number.isFinite(a) && Math.abs(a - b) <= 8);
        if (g && g.editable === want.editable && near(g.x, want.x) && near(g.y, want.y)) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await pages[0].waitForTimeout(50);
      }
    } else if (step.expectKeyboard) {
      const deadline = Date.now() + (step.timeoutMs ?? 5000);
      for (;;) {
        rec.got = await pages[0].evaluate(() => window.sandcast?.element?.shadowRoot
          ?.querySelector('textarea.sandcast-keyboard')?.inputMode ?? null);
        if (rec.got === step.expectKeyboard) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await pages[0].waitForTimeout(50);
      }
    } else if (step.rawInput) {
      const messages = step.rawInput.map((m) => (typeof m === 'string' ? m
        : JSON.stringify({ kind: 'text', text: m.textOf.repeat(m.times) })));
      rec.result = await pages[0].evaluate(async (messages) => {
        const el = window.sandcast.element;
        const u = new URL(`viewer/${el.session}/input`, `${el.server}/`);
        u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
        u.searchParams.set('token', el.token);
        const ws = new WebSocket(u.href);
        await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error('input socket failed')); });
        for (const m of messages) ws.send(m);
        while (ws.bufferedAmount > 0) await new Promise((r) => setTimeout(r, 20));
        ws.close();
        return 'sent';
      }, messages);
      rec.ok = true;
    } else if (step.compose) {
      const cdp = await cdpOf(pages[0]);
      for (const text of step.compose) {
        await cdp.send('Input.imeSetComposition', { text, selectionStart: text.length, selectionEnd: text.length });
      }
      await cdp.send('Input.insertText', { text: step.commit });
      rec.ok = true;
    } else if (step.expectDownload !== undefined) {
      const deadline = Date.now() + (step.timeoutMs ?? 20000);
      for (;;) {
        rec.got = await pages[0].evaluate(() => window.sandcast?.element?.downloads ?? null);
        if (rec.got?.some((d) => d.name === step.expectDownload)) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await pages[0].waitForTimeout(100);
      }
    } else if (step.saveDownload !== undefined) {
      const item = pages[0].locator('sandcast-viewer .downloads li')
        .filter({ has: pages[0].locator('.name', { hasText: step.saveDownload }) });
      const saved = pages[0].waitForEvent('download', { timeout: step.timeoutMs ?? 20000 });
      await item.first().locator('button.save').click();
      const download = await saved;
      const text = readFileSync(await download.path(), 'utf8');
      rec.name = download.suggestedFilename();
      rec.size = Buffer.byteLength(text);
      rec.ok = step.expectText === undefined || text === step.expectText;
      if (!rec.ok) rec.got = text.slice(0, 200);
    } else if (step.armFileChooser) {
      const files = step.armFileChooser.map((f) => ({ name: f.name, mimeType: 'text/plain', buffer: Buffer.from(f.text) }));
      chooser = pages[0].waitForEvent('filechooser', { timeout: 60000 }).then(async (fc) => {
        await fc.setFiles(files);
        return { multiple: fc.isMultiple() };
      });
      chooser.catch(() => {});
      rec.ok = true;
    } else if (step.expectFileChosen) {
      if (!chooser) { rec.ok = false; rec.error = 'no armFileChooser before'; }
      else {
        const deadline = Date.now() + (step.timeoutMs ?? 20000);
        let settled = null;
        chooser.then((v) => { settled = { v }; }, (e) => { settled = { e: String(e) }; });
        // Without a gesture left the viewer waits with a button.
        while (!settled && Date.now() < deadline) {
          const button = pages[0].locator('sandcast-viewer .chooser button.choose');
          if (Date.now() > deadline - (step.timeoutMs ?? 20000) + 3000 && await button.isVisible()) {
            rec.button = true;
            await button.click();
            await pages[0].waitForTimeout(1000);
          }
          await pages[0].waitForTimeout(100);
        }
        rec.got = settled;
        rec.ok = settled?.v !== undefined;
        chooser = null;
      }
    } else if (step.expectStatus) {
      const deadline = Date.now() + (step.timeoutMs ?? 20000);
      for (;;) {
        rec.got = await pages[0].evaluate(() => window.sandcast?.element?.status ?? null);
        if (rec.got && Object.entries(step.expectStatus).every(([k, v]) => rec.got[k] === v)) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await pages[0].waitForTimeout(50);
      }
    } else if (step.watchDisconnect) {
      rec.ok = await pages[0].evaluate(() => {
        const el = window.sandcast?.element;
        if (!el) return false;
        window.e2eLost = null;
        el.addEventListener('statechange', (e) => {
          if (!e.detail.connected && window.e2eLost === null) window.e2eLost = { at: Date.now(), state: e.detail.state };
        });
        return el.status.connected === true;
      });
    } else if (step.expectDisconnected) {
      await pages[0].waitForFunction(() => window.e2eLost, null, { timeout: step.timeoutMs ?? 20000, polling: 10 })
        .catch(() => {});
      rec.got = await pages[0].evaluate(() => window.e2eLost ?? null);
      rec.ok = rec.got !== null;
    } else if (step.expectRemoteClipboardPrefix !== undefined) {
      const deadline = Date.now() + (step.timeoutMs ?? 20000);
      for (;;) {
        rec.got = await clipboardPage.evaluate(() => window.sandcast?.element?.remoteClipboard ?? null);
        if (typeof rec.got === 'string' && rec.got.startsWith(step.expectRemoteClipboardPrefix)) { rec.ok = true; break; }
        if (Date.now() > deadline) { rec.ok = false; break; }
        await clipboardPage.waitForTimeout(50);
      }
    } else if (step.flood) {
      const end = Date.now() + step.flood;
      rec.chars = 0;
      while (Date.now() < end) {
        await pages[0].keyboard.type('abcdefghij', { delay: 0 });
        rec.chars += 10;
      }
      rec.ok = true;
    } else {
      rec.ok = false;
      rec.error = 'unknown step';
    }
    rec.ms = Date.now() - t0;
    if (!rec.ok) {
      result.error = `step ${result.steps.length} failed: ${JSON.stringify(step)}`;
      return;
    }
  }
  result.ok = true;
}

try {
  if (arg.control) await runControl();
  else await runViewers();
} catch (e) {
  result.error = String(e?.stack ?? e);
}
await browser.close().catch(() => {});
done(result.ok ? 0 : 1);
