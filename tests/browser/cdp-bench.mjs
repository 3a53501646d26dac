// What the DevTools tunnel costs an automation client: connectOverCDP's
// time to a usable browser, and the round trip of a trivial command
// (page.evaluate) through sandcast, each as medians.
//   node tests/browser/cdp-bench.mjs '{"endpoint": "http://127.0.0.1:8080/api/sessions/<id>/cdp",
//                                      "key": "<API key>", "connects": 5, "calls": 300}'
// Prints one line "RESULT <json>" with the medians and 95th percentiles in ms.
import { chromium } from 'playwright-core';

const arg = JSON.parse(process.argv[2]);
const headers = { Authorization: `Bearer ${arg.key}` };
const quantile = (xs, q) => {
  const s = [...xs].sort((a, b) => a - b);
  return +s[Math.min(s.length - 1, Math.floor(q * s.length))].toFixed(2);
};

const connects = [];
for (let i = 0; i < (arg.connects ?? 5); i++) {
  const t0 = performance.now();
  const b = await chromium.connectOverCDP(arg.endpoint, { headers });
  connects.push(performance.now() - t0);
  if (i < (arg.connects ?? 5) - 1) await b.close().catch(() => {});
  else {
    const page = await b.contexts()[0].newPage();
    await page.goto('about:blank');
    const calls = [];
    for (let j = 0; j < (arg.calls ?? 300); j++) {
      const t = performance.now();
      await page.evaluate(() => 1);
      calls.push(performance.now() - t);
    }
    await page.close();
    console.log('RESULT ' + JSON.stringify({
      connect_ms: { p50: quantile(connects, 0.5), max: quantile(connects, 1) },
      evaluate_ms: { p50: quantile(calls, 0.5), p95: quantile(calls, 0.95), n: calls.length },
    }));
  }
}
process.exit(0);
