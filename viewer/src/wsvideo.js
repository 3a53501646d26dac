// sandcast viewer: the session's video over a WebSocket on the server's
// HTTP(S) port, decoded with WebCodecs and drawn on a canvas as soon as each
// frame is decoded. For viewers that can reach nothing but that port (UDP and
// the ICE-TCP port blocked); input goes over the input socket, as beside
// noVNC.
//
//   const conn = await connectWsVideo({ canvas, url, timeoutMs });
//   conn.onClose = (why) => { ... };   // the stream ended (server, network, decoder)
//   conn.size();                       // { width, height } of the last frame, or null
//   conn.stats();                      // { fps, bitrateKbps, decodeMs, framesDecoded, ... }
//   conn.close();
//
// Each binary message is one encoded frame: an 18-byte big-endian header
// (codec: 1 H.264 Annex B, 2 VP8; flags: bit 0 key frame; width; height;
// sequence number; capture time in µs since the epoch) and the bitstream.
// The server starts the stream at a key frame, and after a gap (the viewer
// read too slowly) resumes at the next one. Each frame is acknowledged with
// its sequence number (4 bytes, big-endian): the server holds frames back
// while one waits for its acknowledgement over 250 ms (a link slower than
// the stream), instead of letting buffers fill and the picture fall behind.

/** Bytes of the header in front of each frame. */
export const HEADER_LEN = 18;

/** The codec of each header value, as WebCodecs names it. */
const CODECS = {
  // Constrained baseline at level 5.1: what the session's encoder produces,
  // up to the largest display it allows. No `description`: Annex B.
  1: 'avc1.42E033',
  2: 'vp8',
};

/** Parses one message; null when it is too short or of an unknown codec. */
export function parseFrame(buf) {
  if (!(buf instanceof ArrayBuffer) || buf.byteLength < HEADER_LEN) return null;
  const v = new DataView(buf);
  const codec = CODECS[v.getUint8(0)];
  if (!codec) return null;
  return {
    codec,
    key: (v.getUint8(1) & 1) === 1,
    width: v.getUint16(2),
    height: v.getUint16(4),
    seq: v.getUint32(6),
    captureUs: Number(v.getBigUint64(10)),
    data: new Uint8Array(buf, HEADER_LEN),
  };
}

/** Why this browser cannot play the stream, or null when it can. */
export async function wsVideoUnsupported() {
  if (typeof globalThis.VideoDecoder !== 'function') return 'this browser has no WebCodecs';
  try {
    const { supported } = await VideoDecoder.isConfigSupported({ codec: CODECS[1], optimizeForLatency: true });
    return supported ? null : 'this browser cannot decode H.264 with WebCodecs';
  } catch (e) {
    return `WebCodecs: ${e.message}`;
  }
}

/**
 * Opens the stream and draws it on `canvas`; resolves once the socket is
 * open, rejects with an Error saying why it could not.
 * @returns {Promise<WsVideo>}
 */
export async function connectWsVideo({ canvas, url, timeoutMs = 5000 } = {}) {
  if (!canvas || !url) throw new Error('connectWsVideo needs canvas and url');
  const why = await wsVideoUnsupported();
  if (why) throw new Error(why);
  const ws = new WebSocket(url);
  ws.binaryType = 'arraybuffer';
  const conn = new WsVideo(ws, canvas);
  let timer;
  try {
    await new Promise((resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`the video socket did not open within ${timeoutMs} ms`)), timeoutMs);
      ws.addEventListener('open', resolve, { once: true });
      // A refused upgrade (401, 409, a proxy without WebSockets) is only an
      // error event to the page; the status is not visible here.
      ws.addEventListener('error', () => reject(new Error('the video socket was refused or could not connect')), { once: true });
    });
  } catch (e) {
    conn.close();
    throw e;
  } finally {
    clearTimeout(timer);
  }
  return conn;
}

/** A live stream: its canvas, its figures, its end. */
export class WsVideo {
  constructor(ws, canvas) {
    this.ws = ws;
    this.canvas = canvas;
    this._ctx = canvas.getContext('2d', { alpha: false, desynchronized: true });
    /** Called once with a reason when the stream ends by itself. */
    this.onClose = null;
    this._closed = false;
    this._decoder = null;
    this._codec = null;
    this._waitKey = true;
    this._sent = new Map(); // timestamp -> performance.now() at decode()
    this._t = { framesDecoded: 0, bytes: 0, decodeMs: 0, gaps: 0, lastSeq: null };
    this._prev = null;
    this._size = null;
    ws.addEventListener('message', (ev) => this._frame(ev.data));
    ws.addEventListener('close', (ev) => this._end(ev.reason ? `video socket closed: ${ev.reason}` : 'video socket closed'));
  }

  /** The remote display's size as the last frame gave it, or null before one. */
  size() { return this._size; }

  _decoderFor(codec) {
    if (this._decoder && this._codec === codec && this._decoder.state === 'configured') return this._decoder;
    try { this._decoder?.close(); } catch (_) { /* already closed */ }
    this._codec = codec;
    this._decoder = new VideoDecoder({
      output: (frame) => this._draw(frame),
      error: (e) => this._end(`the video could not be decoded: ${e.message}`),
    });
    this._decoder.configure({ codec, optimizeForLatency: true });
    return this._decoder;
  }

  _frame(buf) {
    if (this._closed) return;
    const f = parseFrame(buf);
    if (!f) return;
    this._t.bytes += buf.byteLength;
    if (this._t.lastSeq !== null && f.seq !== ((this._t.lastSeq + 1) >>> 0)) this._t.gaps++;
    this._t.lastSeq = f.seq;
    // The acknowledgement: the server sends no more while one waits for
    // it too long, so a slow link shows fewer pictures, not older ones.
    if (this.ws.readyState === WebSocket.OPEN) {
      const ack = new DataView(new ArrayBuffer(4));
      ack.setUint32(0, f.seq);
      this.ws.send(ack.buffer);
    }
    if (this._waitKey && !f.key) return;
    this._waitKey = false;
    let decoder;
    try {
      // A key frame may change the codec (WebRTC viewers negotiated another).
      decoder = f.key ? this._decoderFor(f.codec) : this._decoder;
      if (!decoder || decoder.state !== 'configured') { this._waitKey = true; return; }
      this._sent.set(f.captureUs, performance.now());
      decoder.decode(new EncodedVideoChunk({ type: f.key ? 'key' : 'delta', timestamp: f.captureUs, data: f.data }));
    } catch (e) {
      this._end(`the video could not be decoded: ${e.message}`);
    }
  }

  _draw(frame) {
    try {
      if (this._closed) return;
      const t0 = this._sent.get(frame.timestamp);
      this._sent.delete(frame.timestamp);
      if (t0 !== undefined) this._t.decodeMs += performance.now() - t0;
      if (this._sent.size > 64) this._sent.clear();
      const w = frame.displayWidth;
      const h = frame.displayHeight;
      if (this.canvas.width !== w || this.canvas.height !== h) {
        this.canvas.width = w;
        this.canvas.height = h;
      }
      this._size = { width: w, height: h };
      this._ctx.drawImage(frame, 0, 0);
      this._t.framesDecoded++;
    } finally {
      frame.close();
    }
  }

  /** fps, bitrate, decode time and size, against the previous call. */
  stats() {
    const now = performance.now();
    const t = this._t;
    const out = {
      fps: null, bitrateKbps: null, rttMs: null,
      decodeMs: t.framesDecoded ? t.decodeMs / t.framesDecoded : null,
      framesDecoded: t.framesDecoded, framesDropped: t.gaps, packetsLost: 0, jitterMs: null,
      codec: this._codec, width: this._size?.width ?? null, height: this._size?.height ?? null, protocol: 'websocket',
    };
    if (this._prev) {
      const dt = (now - this._prev.at) / 1000;
      if (dt > 0) {
        out.fps = (t.framesDecoded - this._prev.frames) / dt;
        out.bitrateKbps = ((t.bytes - this._prev.bytes) * 8) / dt / 1000;
      }
    }
    this._prev = { at: now, frames: t.framesDecoded, bytes: t.bytes };
    return out;
  }

  _end(why) {
    if (this._closed) return;
    this.close();
    try { this.onClose?.(why); } catch (_) { /* page bug */ }
  }

  /** Closes the socket and the decoder. */
  close() {
    if (this._closed) return;
    this._closed = true;
    try { this.ws.close(); } catch (_) { /* already closed */ }
    try { this._decoder?.close(); } catch (_) { /* already closed */ }
    this._sent.clear();
  }
}
