// Headless Chromium viewer for the glass-to-glass benchmark:
//   node bench/latency/webrtc-measure.mjs <base-url> <seconds> [measure|hold]
// Prints "RESULT <json>": p50/p95 of (now - drawn time) in ms, or for
// "hold" the frames and bitrate of a connection held open.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

// playwright-core is installed under tests/browser (npm install there).
const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, '../../tests/browser/package.json'));
const { chromium } = require('playwright-core');

const [base, seconds = '15', mode = 'measure'] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--allow-loopback-in-peer-connection'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1300, height: 740 } });
  await page.goto(`${base}/bench/webrtc-viewer.html`);
  await page.waitForFunction(() => window.ready === true);
  const res = await page.evaluate(async ([s, m]) => {
    try { return { ok: true, result: await window[m](s) }; } catch (e) { return { ok: false, error: String(e) }; }
  }, [Number(seconds), mode]);
  console.log('RESULT ' + JSON.stringify(res));
} finally {
  await browser.close();
}
