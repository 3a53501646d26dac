// Benchmark of the viewer page's noVNC path against Xvfb + x11vnc and the
// viewer-fixture.mjs stand-in server (all on 127.0.0.1):
//   cd tests/browser && node viewer-bench.mjs [runs]
// Reports medians and p95 of
//   - page load to the first remote pixel on the noVNC canvas (?mode=vnc);
//   - the same in auto mode when the WebRTC offer is refused (fallback cost);
//   - an X display change (xsetroot) to the new colour on the canvas.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { chromium } from 'playwright-core';
import { startDisplay, startServer, CHROMIUM_ARGS } from './viewer-fixture.mjs';

const run = promisify(execFile);
const runs = Number(process.argv[2] ?? 15);
const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(p * s.length))]; };
const summary = (name, xs) => console.log(`${name}: median ${pct(xs, 0.5).toFixed(1)} ms, p95 ${pct(xs, 0.95).toFixed(1)} ms (n=${xs.length})`);

// Resolves with Date.now() of the first animation frame whose canvas centre
// has the given colour.
const WATCH = ([r, g, b]) => new Promise((resolve) => {
  const tick = () => {
    const canvas = document.querySelector('sandcast-viewer')?.shadowRoot.querySelector('.vnc canvas');
    if (canvas && canvas.width) {
      const d = canvas.getContext('2d', { willReadFrequently: true }).getImageData(canvas.width / 2, canvas.height / 2, 1, 1).data;
      if (Math.abs(d[0] - r) < 16 && Math.abs(d[1] - g) < 16 && Math.abs(d[2] - b) < 16) { resolve(Date.now()); return; }
    }
    requestAnimationFrame(tick);
  };
  tick();
});

const display = await startDisplay();
const fixture = await startServer({ vncPort: display.vncPort });
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: CHROMIUM_ARGS });
try {
  await display.setColour('#ff0000');
  for (const [name, query] of [['load to first pixel, mode=vnc', '?mode=vnc'], ['load to first pixel, auto with refused offer', '']]) {
    const xs = [];
    for (let i = 0; i < runs; i++) {
      const page = await browser.newPage({ viewport: { width: 800, height: 600 } });
      await page.goto(fixture.viewerUrl(query));
      const [seen, origin] = await page.evaluate(async (f) => [await (0, eval)(f)([255, 0, 0]), performance.timeOrigin], WATCH.toString());
      xs.push(seen - origin);
      await page.close();
    }
    summary(name, xs);
  }
  const page = await browser.newPage({ viewport: { width: 800, height: 600 } });
  await page.goto(fixture.viewerUrl('?mode=vnc'));
  await page.waitForFunction(() => window.sandcast?.connected === true);
  const xs = [];
  const colours = [['#0000ff', [0, 0, 255]], ['#ff0000', [255, 0, 0]]];
  for (let i = 0; i < runs * 2; i++) {
    const [hex, rgb] = colours[i % 2];
    // Armed before the change, so the change cannot be missed.
    await page.evaluate(([f, c]) => { window.seen = (0, eval)(f)(c); }, [WATCH.toString(), rgb]);
    const t0 = Date.now();
    await display.setColour(hex);
    const watch = page.evaluate(() => window.seen);
    xs.push((await watch) - t0);
  }
  summary('X change to noVNC canvas (incl. xsetroot start)', xs);
  await page.close();
} finally {
  await browser.close();
  await fixture.stop();
  await display.stop();
}
