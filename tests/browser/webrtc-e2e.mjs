// Drives tests/browser/webrtc-page.html in headless Chromium:
//   node tests/browser/webrtc-e2e.mjs <base-url> <scenario>
// Prints one line "RESULT <json>" and exits 0 when the scenario ran.
import { chromium } from 'playwright-core';

const [base, scenario] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--allow-loopback-in-peer-connection',
    '--autoplay-policy=no-user-gesture-required'],
});
try {
  const page = await browser.newPage();
  page.on('console', (m) => { if (m.type() === 'error') console.error('page:', m.text()); });
  await page.goto(`${base}/test/webrtc-page.html`);
  await page.waitForFunction(() => window.pageReady === true);
  const res = await page.evaluate((s) => window.runScenario(s), scenario);
  console.log('RESULT ' + JSON.stringify(res));
} finally {
  await browser.close();
}
