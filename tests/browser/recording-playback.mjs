// Plays a session's recording in headless Chromium's <video>, straight from
// the server (the element's own range requests; the API key added to them
// by the test, as an operator's proxy would), seeks to each of `at` seconds
// and reads the clock page's time from the picture with
// bench/latency/decode.js.
//
//   node recording-playback.mjs '{"base":"http://127.0.0.1:PORT","path":"/api/sessions/ID/recording","key":"…","at":[5,15]}'
//
// Prints `RESULT {"ok","duration","width","height","clocks":[ms|null…],"times":[s…],"ranges":n}`
// (`times`: where each clock was read; a frame caught mid-paint is
// unreadable, so a read may be a tenth of a second or a few on).
import { chromium } from 'playwright-core';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { VIEWER_ARGS } from './chromium-args.mjs';

const arg = JSON.parse(process.argv[2]);
const here = dirname(fileURLToPath(import.meta.url));
// decode.js as a classic script, as the latency benchmark's driver loads it.
const decodeSource = readFileSync(join(here, '../../bench/latency/decode.js'), 'utf8')
  .replace(/^export /gm, '');

const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: VIEWER_ARGS });
let result;
try {
  const page = await browser.newPage();
  let ranges = 0;
  await page.route(`**${arg.path}*`, (route) => {
    const headers = { ...route.request().headers(), authorization: `Bearer ${arg.key}` };
    if (headers.range) ranges++;
    return route.continue({ headers });
  });
  await page.goto(`${arg.base}/health`);
  await page.addScriptTag({ content: decodeSource });
  const played = await page.evaluate(async ({ url, at }) => {
    const video = document.createElement('video');
    video.muted = true;
    document.body.append(video);
    const once = (name) => new Promise((resolve, reject) => {
      video.addEventListener(name, resolve, { once: true });
      video.addEventListener('error', () => reject(new Error(`video error ${video.error?.code}: ${video.error?.message}`)), { once: true });
    });
    const loaded = once('loadeddata');
    video.src = url;
    await loaded;
    const clocks = [];
    const times = [];
    const painted = () => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    for (const t of at) {
      // `seeked` may come before the frame is on screen; and a frame caught
      // mid-paint by the capture is unreadable: try a few frames on.
      let clock = null;
      for (let k = 0; k < 5 && clock === null; k++) {
        const seeked = once('seeked');
        video.currentTime = t + k * 0.1;
        await seeked;
        await painted();
        clock = decodeFrom(video, {});
      }
      clocks.push(clock);
      times.push(video.currentTime);
    }
    return { duration: video.duration, width: video.videoWidth, height: video.videoHeight, clocks, times };
  }, { url: `${arg.base}${arg.path}`, at: arg.at });
  result = { ok: true, ...played, ranges };
} catch (e) {
  result = { ok: false, error: String(e) };
} finally {
  await browser.close();
}
console.log(`RESULT ${JSON.stringify(result)}`);
