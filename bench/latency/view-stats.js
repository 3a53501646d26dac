// sandcast `bench view`: the figures of one measuring window, from two
// snapshots of the viewer page taken at its start and end.
//
// A snapshot (taken in the page by view-driver.mjs) is
//   { t,            performance.now() in ms
//     frames,       frames shown: requestVideoFrameCallback calls (WebRTC) or
//                   clock changes seen on noVNC's canvas
//     clocks,       distinct clock values seen
//     wsBytes,      bytes received on the page's WebSockets (noVNC)
//     vnc: { decodeMs, updates },   JS time in noVNC's framebuffer updates, updates completed
//     rtc: [ ...RTCPeerConnection.getStats() entries ] or null }

import { percentile } from './decode.js';

/** p50/p95/min/max/mean of latency samples in ms; nulls when there are none. */
export function summarizeLatency(samples) {
  const n = samples.length;
  if (n === 0) return { samples: 0, p50: null, p95: null, min: null, max: null, mean: null };
  let min = Infinity;
  let max = -Infinity;
  let sum = 0;
  for (const v of samples) {
    if (v < min) min = v;
    if (v > max) max = v;
    sum += v;
  }
  return { samples: n, p50: percentile(samples, 50), p95: percentile(samples, 95), min, max, mean: sum / n };
}

/** A gap between two new pictures longer than this is a freeze, in ms. */
export const FREEZE_MS = 250;

/**
 * Freezes in a window: gaps over FREEZE_MS between the times (ms, in order)
 * at which a new picture was first shown, and the longest gap.
 */
export function freezes(shownAt, threshold = FREEZE_MS) {
  let count = 0;
  let totalMs = 0;
  let longestMs = null;
  for (let i = 1; i < shownAt.length; i++) {
    const gap = shownAt[i] - shownAt[i - 1];
    if (longestMs === null || gap > longestMs) longestMs = gap;
    if (gap > threshold) {
      count++;
      totalMs += gap;
    }
  }
  return { count, totalMs, longestMs };
}

/**
 * The inbound video and transport figures of a getStats() report, given as
 * an array of its entries (or a Map/RTCStatsReport). Null without inbound video.
 */
export function rtcSnapshot(entries) {
  const list = Array.isArray(entries) ? entries : [...entries.values()];
  let inbound = null;
  let transportBytes = 0;
  let haveTransport = false;
  const codecs = new Map();
  for (const s of list) {
    if (s.type === 'inbound-rtp' && s.kind === 'video') inbound = s;
    else if (s.type === 'transport' && typeof s.bytesReceived === 'number') {
      transportBytes += s.bytesReceived;
      haveTransport = true;
    } else if (s.type === 'codec') codecs.set(s.id, s.mimeType);
  }
  if (!inbound) return null;
  return {
    framesDecoded: inbound.framesDecoded ?? 0,
    framesReceived: inbound.framesReceived ?? null,
    totalDecodeTime: inbound.totalDecodeTime ?? null,
    bytesReceived: inbound.bytesReceived ?? 0,
    transportBytes: haveTransport ? transportBytes : null,
    codec: codecs.get(inbound.codecId) ?? null,
    width: inbound.frameWidth ?? null,
    height: inbound.frameHeight ?? null,
  };
}

/**
 * Rates between two snapshots of one page. `mode` is 'webrtc' or 'vnc'.
 * fps: video frames decoded (WebRTC) or framebuffer updates completed (noVNC)
 * per second; shownFps: frames shown per second; clockFps: distinct clock
 * values per second; decodeMs: mean decode time per frame (the browser's
 * decoder for WebRTC, noVNC's JavaScript for noVNC); kbps: bytes received
 * by the viewer (the WebRTC transport, or the WebSocket) in kbit/s.
 */
export function rates(before, after, mode) {
  const seconds = (after.t - before.t) / 1000;
  if (!(seconds > 0)) throw new Error(`snapshots are not in order (${before.t} then ${after.t})`);
  const per = (a, b) => (b - a) / seconds;
  const out = {
    seconds,
    fps: null,
    shownFps: per(before.frames, after.frames),
    clockFps: per(before.clocks, after.clocks),
    decodeMs: null,
    kbps: null,
    codec: null,
    width: null,
    height: null,
  };
  if (mode === 'webrtc') {
    const a = before.rtc ? rtcSnapshot(before.rtc) : null;
    const b = after.rtc ? rtcSnapshot(after.rtc) : null;
    if (!b) return out;
    const a0 = a ?? { framesDecoded: 0, totalDecodeTime: 0, bytesReceived: 0, transportBytes: 0 };
    const frames = b.framesDecoded - a0.framesDecoded;
    out.fps = frames / seconds;
    if (frames > 0 && b.totalDecodeTime !== null && a0.totalDecodeTime !== null) {
      out.decodeMs = ((b.totalDecodeTime - a0.totalDecodeTime) / frames) * 1000;
    }
    const bytes = b.transportBytes !== null && a0.transportBytes !== null
      ? b.transportBytes - a0.transportBytes
      : b.bytesReceived - a0.bytesReceived;
    out.kbps = (bytes * 8) / seconds / 1000;
    out.codec = b.codec;
    out.width = b.width;
    out.height = b.height;
  } else if (mode === 'ws') {
    // The stream's own counts: frames decoded and the time from decode()
    // to the decoder's output; bytes of every WebSocket of the page.
    const a = before.ws ?? { framesDecoded: 0, decodeMs: 0 };
    const b = after.ws;
    if (!b) return out;
    const frames = b.framesDecoded - a.framesDecoded;
    out.fps = frames / seconds;
    if (frames > 0) out.decodeMs = (b.decodeMs - a.decodeMs) / frames;
    out.kbps = ((after.wsBytes - before.wsBytes) * 8) / seconds / 1000;
    out.codec = b.codec ?? null;
    out.width = b.width ?? null;
    out.height = b.height ?? null;
  } else if (mode === 'vnc') {
    const updates = after.vnc.updates - before.vnc.updates;
    out.fps = updates / seconds;
    if (updates > 0) out.decodeMs = (after.vnc.decodeMs - before.vnc.decodeMs) / updates;
    out.kbps = ((after.wsBytes - before.wsBytes) * 8) / seconds / 1000;
  } else {
    throw new Error(`unknown mode ${JSON.stringify(mode)} (expected webrtc, ws or vnc)`);
  }
  return out;
}
