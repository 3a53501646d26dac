// Regenerates the Chromium offer fixtures used by sandcast-webrtc's unit tests:
//   node tests/browser/webrtc-capture-offers.mjs crates/sandcast-webrtc/tests/fixtures
import { chromium } from 'playwright-core';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

const out = process.argv[2] ?? '.';
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run'],
});
const page = await browser.newPage();
const offers = await page.evaluate(async () => {
  async function offer(filter) {
    const pc = new RTCPeerConnection();
    const t = pc.addTransceiver('video', { direction: 'recvonly' });
    pc.createDataChannel('input', { ordered: true });
    if (filter) {
      const codecs = RTCRtpReceiver.getCapabilities('video').codecs.filter(filter);
      t.setCodecPreferences(codecs);
    }
    const o = await pc.createOffer();
    pc.close();
    return o.sdp;
  }
  const isVp9 = (c) => /VP9|AV1|rtx|red|ulpfec|flexfec/i.test(c.mimeType);
  return {
    default: await offer(null),
    vp8: await offer((c) => /VP8|rtx/i.test(c.mimeType)),
    nocodec: await offer(isVp9),
  };
});
for (const [name, sdp] of Object.entries(offers)) {
  writeFileSync(join(out, `chromium-offer-${name}.sdp`), sdp);
}
console.log('chromium', browser.version());
await browser.close();
