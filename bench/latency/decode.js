// sandcast latency benchmark: the clock pattern, drawn and read back.
//
// The remote page (clock.html) draws Date.now() on every animation frame as
// a row of 48 square blocks at its top-left corner:
//   block 0 white, block 1 black           start marker
//   blocks 2..45                            44 bits of the time in ms, MSB first (white = 1)
//   block 46                                even parity over the 44 bits
//   block 47 white                          end marker
// Blocks are big (16 px by default, a whole H.264 macroblock) and read at
// their centre against mid-grey, so compression does not flip them.
// The viewer reads the pattern from a <video> (each requestVideoFrameCallback)
// or a canvas (noVNC) and reports now − drawn time.

export const BLOCKS = 48;
export const DATA_BITS = 44;

/** The 48 block values (true = white) for a time in ms. */
export function encodeTime(ms) {
  const t = BigInt(Math.floor(ms));
  const bits = [true, false];
  let ones = 0;
  for (let i = DATA_BITS - 1; i >= 0; i--) {
    const b = ((t >> BigInt(i)) & 1n) === 1n;
    if (b) ones++;
    bits.push(b);
  }
  bits.push(ones % 2 === 1);
  bits.push(true);
  return bits;
}

/** The time in ms from 48 block values, or null when markers or parity fail. */
export function decodeBits(bits) {
  if (bits.length !== BLOCKS || !bits[0] || bits[1] || !bits[47]) return null;
  let t = 0n;
  let ones = 0;
  for (let i = 0; i < DATA_BITS; i++) {
    const b = bits[2 + i];
    if (b) ones++;
    t = (t << 1n) | (b ? 1n : 0n);
  }
  if ((ones % 2 === 1) !== bits[46]) return null;
  return Number(t);
}

/** Draws the pattern with a 2D context (or anything with fillStyle/fillRect). */
export function drawClock(ctx, ms, { x = 0, y = 0, block = 16 } = {}) {
  encodeTime(ms).forEach((white, i) => {
    ctx.fillStyle = white ? '#ffffff' : '#000000';
    ctx.fillRect(x + i * block, y, block, block);
  });
}

/** Reads the pattern from RGBA pixels ({width, height, data}) at (x, y). */
export function decodeImageData(img, { x = 0, y = 0, block = 16 } = {}) {
  const bits = [];
  const r = Math.max(1, Math.floor(block / 4));
  for (let i = 0; i < BLOCKS; i++) {
    const cx = x + i * block + Math.floor(block / 2);
    const cy = y + Math.floor(block / 2);
    let sum = 0;
    let n = 0;
    for (let dy = -r; dy < r; dy++) {
      for (let dx = -r; dx < r; dx++) {
        const px = cx + dx;
        const py = cy + dy;
        if (px < 0 || py < 0 || px >= img.width || py >= img.height) return null;
        const o = (py * img.width + px) * 4;
        // Rec. 601 luma
        sum += 0.299 * img.data[o] + 0.587 * img.data[o + 1] + 0.114 * img.data[o + 2];
        n++;
      }
    }
    bits.push(sum / n >= 128);
  }
  return decodeBits(bits);
}

/**
 * Reads the pattern from a video or canvas. `scale` maps page pixels of the
 * remote page to source pixels (1 when the video is not scaled).
 */
export function decodeFrom(source, { x = 0, y = 0, block = 16, scale = 1, canvas } = {}) {
  const w = Math.ceil(BLOCKS * block * scale);
  const h = Math.ceil(block * scale);
  const c = canvas ?? (typeof OffscreenCanvas !== 'undefined'
    ? new OffscreenCanvas(w, h) : Object.assign(document.createElement('canvas'), { width: w, height: h }));
  if (c.width !== w) c.width = w;
  if (c.height !== h) c.height = h;
  const ctx = c.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(source, x * scale, y * scale, w, h, 0, 0, w, h);
  return decodeImageData(ctx.getImageData(0, 0, w, h), { block: block * scale });
}

/**
 * Samples latency on every decoded video frame until `stop()` is called.
 * `onSample(latencyMs, drawnMs)` gets each frame that carries a readable pattern.
 */
export function measureVideo(video, onSample, opts = {}) {
  let active = true;
  const canvas = typeof OffscreenCanvas !== 'undefined' ? new OffscreenCanvas(1, 1) : undefined;
  const tick = () => {
    if (!active) return;
    const drawn = decodeFrom(video, { ...opts, canvas });
    if (drawn !== null) onSample(Date.now() - drawn, drawn);
    video.requestVideoFrameCallback(tick);
  };
  video.requestVideoFrameCallback(tick);
  return () => { active = false; };
}

/** The p-th percentile (0..100) of numbers, nearest rank. */
export function percentile(values, p) {
  if (values.length === 0) return null;
  const s = [...values].sort((a, b) => a - b);
  const rank = Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1));
  return s[rank];
}
