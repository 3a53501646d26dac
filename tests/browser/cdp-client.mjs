// An automation client of a sandcast session: Playwright's connectOverCDP
// through the sandcast server, as an operator's program would use it.
//   node cdp-client.mjs '<json>'
// json: { endpoint: "http://…/api/sessions/{id}/cdp", headers: {…},
//         goto: "<url>", fill: { selector, text }, screenshot: true,
//         waitTitle?: "text", timeoutMs }
// Opens `goto` in a new tab of the session's browser, fills the field, takes a
// screenshot (its PNG size is reported), then waits until the page's title
// is `waitTitle` (something the person in the viewer does) and reports the
// field's value. Prints one line "RESULT <json>" with { ok, steps, error? }.
import { chromium } from 'playwright-core';
import { scenario } from './scenario.mjs';

const arg = JSON.parse(process.argv[2]);
const result = { ok: false, steps: [] };
const done = scenario(arg, result);

// The width and height in a PNG's IHDR chunk.
function pngSize(buf) {
  const signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  if (!signature.every((b, i) => buf[i] === b)) return null;
  return [buf.readUInt32BE(16), buf.readUInt32BE(20)];
}

try {
  const browser = await chromium.connectOverCDP(arg.endpoint, { headers: arg.headers ?? {} });
  const version = browser.version();
  result.steps.push({ connect: true, version });
  const context = browser.contexts()[0];
  // A new tab, in front: what the person in the viewer sees. (The pages
  // already there include Chromium's own UI, such as the omnibox popup.)
  const page = await context.newPage();
  await page.bringToFront();
  await page.goto(arg.goto);
  result.steps.push({ goto: true, url: page.url().slice(0, 40) });
  if (arg.fill) {
    await page.fill(arg.fill.selector, arg.fill.text);
    result.steps.push({ fill: true });
  }
  if (arg.screenshot) {
    const png = await page.screenshot();
    result.steps.push({ screenshot: pngSize(png), bytes: png.length });
  }
  if (arg.waitTitle) {
    await page.waitForFunction((t) => document.title === t, arg.waitTitle, {
      timeout: arg.timeoutMs ?? 90000,
    });
    result.steps.push({ title: await page.title() });
  }
  if (arg.fill) {
    result.steps.push({ value: await page.inputValue(arg.fill.selector) });
  }
  result.ok = true;
  // Leaves without closing anything: the session must not care how its
  // automation client goes away.
  done(0);
} catch (e) {
  result.error = String(e?.stack ?? e);
  done(1);
}
