// node --test bench/latency/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { summarizeLatency, rtcSnapshot, rates, freezes } from './view-stats.js';

test('freezes: gaps over 250 ms between new pictures, and the longest gap', () => {
  assert.deepEqual(freezes([0, 17, 33, 400, 417, 600, 650]), { count: 1, totalMs: 367, longestMs: 367 });
  assert.deepEqual(freezes([0, 260, 520]), { count: 2, totalMs: 520, longestMs: 260 });
  assert.deepEqual(freezes([5]), { count: 0, totalMs: 0, longestMs: null });
});

test('latency summary: nearest-rank percentiles, extremes, mean', () => {
  const s = summarizeLatency([40, 10, 30, 20, 100, 50, 60, 70, 80, 90]);
  assert.equal(s.samples, 10);
  assert.equal(s.p50, 50);
  assert.equal(s.p95, 100);
  assert.equal(s.min, 10);
  assert.equal(s.max, 100);
  assert.equal(s.mean, 55);
});

test('latency summary of no samples is all null, not NaN or Infinity', () => {
  assert.deepEqual(summarizeLatency([]), { samples: 0, p50: null, p95: null, min: null, max: null, mean: null });
});

const report = (frames, decodeS, bytes, transport) => [
  { id: 'T01', type: 'transport', bytesReceived: transport },
  { id: 'CIT', type: 'codec', mimeType: 'video/H264' },
  { id: 'IT', type: 'inbound-rtp', kind: 'video', codecId: 'CIT', framesDecoded: frames, totalDecodeTime: decodeS,
    bytesReceived: bytes, frameWidth: 1280, frameHeight: 720, framesReceived: frames + 1 },
  { id: 'IA', type: 'inbound-rtp', kind: 'audio', bytesReceived: 999999 },
];

test('rtcSnapshot reads inbound video, codec and transport bytes; ignores audio', () => {
  const s = rtcSnapshot(report(120, 0.6, 50000, 60000));
  assert.deepEqual(s, {
    framesDecoded: 120, framesReceived: 121, totalDecodeTime: 0.6, bytesReceived: 50000, transportBytes: 60000,
    codec: 'video/H264', width: 1280, height: 720,
  });
  assert.equal(rtcSnapshot(new Map(report(1, 0, 1, 1).map((e) => [e.id, e]))).framesDecoded, 1);
  assert.equal(rtcSnapshot([{ type: 'transport', bytesReceived: 5 }]), null);
});

const snap = (t, extra) => ({ t, frames: 0, clocks: 0, wsBytes: 0, vnc: { decodeMs: 0, updates: 0 }, rtc: null, ...extra });

test('WebRTC rates: decoded fps, decode ms per frame, transport kbit/s', () => {
  const a = snap(1000, { frames: 10, clocks: 10, rtc: report(100, 1.0, 100000, 110000) });
  const b = snap(3000, { frames: 126, clocks: 124, rtc: report(220, 1.12, 300000, 360000) });
  const r = rates(a, b, 'webrtc');
  assert.equal(r.seconds, 2);
  assert.equal(r.fps, 60);
  assert.equal(r.shownFps, 58);
  assert.equal(r.clockFps, 57);
  assert.ok(Math.abs(r.decodeMs - 1.0) < 1e-9, `decodeMs ${r.decodeMs}`);
  assert.equal(r.kbps, 1000); // 250000 bytes in 2 s
  assert.equal(r.codec, 'video/H264');
});

test('WebRTC rates fall back to RTP bytes without transport stats', () => {
  const strip = (rep) => rep.filter((e) => e.type !== 'transport');
  const r = rates(snap(0, { rtc: strip(report(0, 0, 0, 0)) }), snap(1000, { rtc: strip(report(30, 0.03, 12500, 0)) }), 'webrtc');
  assert.equal(r.kbps, 100);
  assert.equal(r.fps, 30);
});

test('noVNC rates: framebuffer updates, JS ms per update, WebSocket kbit/s', () => {
  const a = snap(0, { wsBytes: 1000, vnc: { decodeMs: 5, updates: 10 } });
  const b = snap(4000, { wsBytes: 501000, frames: 80, clocks: 80, vnc: { decodeMs: 105, updates: 210 } });
  const r = rates(a, b, 'vnc');
  assert.equal(r.fps, 50);
  assert.equal(r.decodeMs, 0.5);
  assert.equal(r.kbps, 1000);
  assert.equal(r.shownFps, 20);
});

test('WebSocket stream rates: frames decoded, ms per decode, WebSocket kbit/s', () => {
  const a = snap(0, { wsBytes: 0, ws: { framesDecoded: 100, decodeMs: 200, codec: 'avc1.42E033', width: 1280, height: 720 } });
  const b = snap(2000, { wsBytes: 250000, frames: 100, clocks: 100, ws: { framesDecoded: 220, decodeMs: 440, codec: 'avc1.42E033', width: 1280, height: 720 } });
  const r = rates(a, b, 'ws');
  assert.equal(r.fps, 60);
  assert.equal(r.decodeMs, 2);
  assert.equal(r.kbps, 1000);
  assert.equal(r.shownFps, 50);
  assert.deepEqual([r.codec, r.width, r.height], ['avc1.42E033', 1280, 720]);
  assert.equal(rates(snap(0), snap(1000), 'ws').fps, null, 'no stream yet: no figures');
});

test('an idle window has no decode time rather than NaN', () => {
  const r = rates(snap(0), snap(1000), 'vnc');
  assert.equal(r.fps, 0);
  assert.equal(r.decodeMs, null);
  assert.equal(r.kbps, 0);
});

test('bad input says what is wrong', () => {
  assert.throws(() => rates(snap(5), snap(5), 'vnc'), /not in order/);
  assert.throws(() => rates(snap(0), snap(1), 'rdp'), /unknown mode "rdp"/);
});
