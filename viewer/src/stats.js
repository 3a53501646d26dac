// sandcast viewer: live stats from RTCPeerConnection.getStats().
//
//   const s = await collectStats(pc);
//   // { fps, bitrateKbps, rttMs, decodeMs, framesDecoded, framesDropped, packetsLost, jitterMs, codec, width, height,
//   //   protocol }   protocol: 'udp' or 'tcp' of the selected ICE candidate pair
//
// Rates are computed against the previous call for the same connection.

const previous = new WeakMap();

/** Reads inbound video stats; rates need two calls. */
export async function collectStats(pc) {
  const report = await pc.getStats();
  let inbound;
  let pair;
  const codecs = new Map();
  const candidates = new Map();
  report.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') inbound = s;
    else if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
    else if (s.type === 'codec') codecs.set(s.id, s.mimeType);
    else if (s.type === 'local-candidate') candidates.set(s.id, s);
  });
  const out = {
    fps: null, bitrateKbps: null, rttMs: null, decodeMs: null,
    framesDecoded: 0, framesDropped: 0, packetsLost: 0, jitterMs: null,
    codec: null, width: null, height: null, protocol: null,
  };
  if (pair && typeof pair.currentRoundTripTime === 'number') out.rttMs = pair.currentRoundTripTime * 1000;
  if (pair) out.protocol = candidates.get(pair.localCandidateId)?.protocol ?? null;
  if (!inbound) return out;
  out.framesDecoded = inbound.framesDecoded ?? 0;
  out.framesDropped = inbound.framesDropped ?? 0;
  out.packetsLost = inbound.packetsLost ?? 0;
  out.width = inbound.frameWidth ?? null;
  out.height = inbound.frameHeight ?? null;
  out.codec = codecs.get(inbound.codecId) ?? null;
  if (typeof inbound.jitter === 'number') out.jitterMs = inbound.jitter * 1000;
  if (inbound.framesDecoded > 0 && typeof inbound.totalDecodeTime === 'number') {
    out.decodeMs = (inbound.totalDecodeTime / inbound.framesDecoded) * 1000;
  }
  if (typeof inbound.framesPerSecond === 'number') out.fps = inbound.framesPerSecond;
  const prev = previous.get(pc);
  if (prev) {
    const dt = (inbound.timestamp - prev.timestamp) / 1000;
    if (dt > 0) {
      out.bitrateKbps = ((inbound.bytesReceived - prev.bytesReceived) * 8) / dt / 1000;
      if (out.fps === null) out.fps = (inbound.framesDecoded - prev.framesDecoded) / dt;
    }
  }
  previous.set(pc, { timestamp: inbound.timestamp, bytesReceived: inbound.bytesReceived, framesDecoded: inbound.framesDecoded });
  return out;
}

/** Formats stats for an on-screen overlay. */
export function formatStats(s) {
  const f = (v, d = 0) => (v === null || v === undefined ? '–' : Number(v).toFixed(d));
  return `${f(s.fps)} fps · ${f(s.bitrateKbps)} kbit/s · rtt ${f(s.rttMs)} ms · decode ${f(s.decodeMs, 1)} ms`
    + (s.width ? ` · ${s.width}x${s.height}` : '') + (s.codec ? ` · ${s.codec}` : '')
    + (s.protocol ? ` · ${s.protocol}` : '');
}
