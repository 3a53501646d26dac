// node --test bench/latency/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeTime, decodeBits, drawClock, decodeImageData, percentile, BLOCKS } from './decode.js';

function image(width, height, grey = 128) {
  return { width, height, data: new Uint8ClampedArray(width * height * 4).fill(grey) };
}

// A minimal 2D context over an image, enough for drawClock.
function context(img) {
  return {
    fillStyle: '#000000',
    fillRect(x, y, w, h) {
      const v = this.fillStyle === '#ffffff' ? 255 : 0;
      for (let py = y; py < y + h; py++) {
        for (let px = x; px < x + w; px++) {
          const o = (py * img.width + px) * 4;
          img.data[o] = v; img.data[o + 1] = v; img.data[o + 2] = v; img.data[o + 3] = 255;
        }
      }
    },
  };
}

// Deterministic noise, block-edge blur and a contrast squeeze, like a
// heavily quantised H.264 frame.
function degrade(img, seed = 1) {
  let s = seed;
  const rnd = () => { s = (s * 1103515245 + 12345) & 0x7fffffff; return s / 0x7fffffff; };
  const copy = Uint8ClampedArray.from(img.data);
  for (let y = 0; y < img.height; y++) {
    for (let x = 0; x < img.width; x++) {
      const o = (y * img.width + x) * 4;
      for (let c = 0; c < 3; c++) {
        let acc = 0;
        let n = 0;
        for (let dx = -2; dx <= 2; dx++) {
          const xx = Math.min(img.width - 1, Math.max(0, x + dx));
          acc += copy[(y * img.width + xx) * 4 + c];
          n++;
        }
        const blurred = acc / n;
        img.data[o + c] = 40 + blurred * 0.7 + (rnd() - 0.5) * 60;
      }
    }
  }
}

test('bits round-trip for current and edge times', () => {
  for (const t of [0, 1, 1_764_000_000_000, Date.now(), 2 ** 44 - 1]) {
    const bits = encodeTime(t);
    assert.equal(bits.length, BLOCKS);
    assert.equal(decodeBits(bits), t);
  }
});

test('a flipped bit fails the parity check', () => {
  const bits = encodeTime(Date.now());
  bits[20] = !bits[20];
  assert.equal(decodeBits(bits), null);
});

test('missing markers are rejected (grey screen, no clock)', () => {
  assert.equal(decodeBits(new Array(BLOCKS).fill(false)), null);
  assert.equal(decodeImageData(image(800, 40), {}), null);
});

test('a drawn canvas decodes, also offset and after compression-like damage', () => {
  const t = Date.now();
  for (const block of [16, 24]) {
    const img = image(BLOCKS * block + 40, block + 20);
    drawClock(context(img), t, { x: 10, y: 5, block });
    assert.equal(decodeImageData(img, { x: 10, y: 5, block }), t);
    degrade(img, block);
    assert.equal(decodeImageData(img, { x: 10, y: 5, block }), t);
  }
});

test('a pattern out of the image is not read', () => {
  const img = image(100, 16);
  assert.equal(decodeImageData(img, { block: 16 }), null);
});

test('percentiles by nearest rank', () => {
  const v = [5, 1, 4, 2, 3];
  assert.equal(percentile(v, 50), 3);
  assert.equal(percentile(v, 95), 5);
  assert.equal(percentile(v, 0), 1);
  assert.equal(percentile([], 50), null);
});
