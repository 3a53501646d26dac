// sandcast viewer: the WebRTC connection to the gateway.
//
//   const conn = await connectWebRtc({ video, offerUrl, headers, iceServers, onState, timeoutMs });
//   conn.send({ kind: 'pointer_move', x: 10, y: 20 });
//   conn.onMessage = (msg) => { ... };      // {kind: 'clipboard'|'display_size'|'session_state'|'control', ...}
//   const s = await conn.stats();            // see stats.js
//   conn.close();
//
// The promise rejects with an Error whose message says why (HTTP status and
// the server's reason, ICE failure, timeout), so the page can show it and
// fall back to noVNC.

import { collectStats } from './stats.js';

/** Label of the ordered, reliable channel for input and server messages. */
export const INPUT_CHANNEL = 'input';
/** Label of the unordered channel for pointer moves (newest wins). */
export const UNRELIABLE_CHANNEL = 'input-unreliable';

function lowLatency(receiver) {
  // Ask the browser to play frames as soon as they are decoded.
  try { if ('jitterBufferTarget' in receiver) receiver.jitterBufferTarget = 0; } catch (_) { /* older browsers */ }
  try { receiver.playoutDelayHint = 0; } catch (_) { /* non-Chromium */ }
}

/**
 * Connects to the gateway and plays the session in `video`.
 * @returns {Promise<Connection>}
 */
export async function connectWebRtc({
  video,
  offerUrl,
  headers = {},
  iceServers = [],
  onState = () => {},
  timeoutMs = 8000,
} = {}) {
  if (!video || !offerUrl) throw new Error('connectWebRtc needs video and offerUrl');
  const pc = new RTCPeerConnection({ iceServers, bundlePolicy: 'max-bundle' });
  const transceiver = pc.addTransceiver('video', { direction: 'recvonly' });
  lowLatency(transceiver.receiver);
  const input = pc.createDataChannel(INPUT_CHANNEL, { ordered: true });
  const moves = pc.createDataChannel(UNRELIABLE_CHANNEL, { ordered: false, maxRetransmits: 0 });

  const conn = new Connection(pc, input, moves);
  const report = (state, detail) => { try { onState(state, detail); } catch (_) { /* page bug */ } };
  pc.addEventListener('connectionstatechange', () => report(pc.connectionState));

  pc.addEventListener('track', (ev) => {
    lowLatency(ev.receiver);
    video.srcObject = ev.streams[0] ?? new MediaStream([ev.track]);
    video.muted = true;
    video.playsInline = true;
    video.play().catch(() => { /* autoplay is allowed for muted video */ });
  });

  let timer;
  try {
    report('offering');
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    // The gateway is ICE-lite with host candidates in its answer; the
    // browser's own candidates are not needed, so no waiting for gathering.
    const res = await fetch(offerUrl, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', ...headers },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: 'offer' }),
    });
    if (!res.ok) {
      const text = (await res.text()).slice(0, 500);
      throw new Error(`offer refused: HTTP ${res.status} ${text}`);
    }
    const answer = await res.json();
    if (answer.type !== 'answer' || typeof answer.sdp !== 'string') {
      throw new Error('the server did not return an SDP answer');
    }
    await pc.setRemoteDescription(answer);
    report('connecting');

    await new Promise((resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`no WebRTC connection within ${timeoutMs} ms (state ${pc.connectionState})`)), timeoutMs);
      const check = () => {
        if (pc.connectionState === 'connected' && input.readyState === 'open') resolve();
        else if (pc.connectionState === 'failed') reject(new Error('ICE/DTLS failed: the gateway is unreachable over UDP and TCP'));
      };
      pc.addEventListener('connectionstatechange', check);
      input.addEventListener('open', check);
      check();
    });
    report('connected');
    return conn;
  } catch (e) {
    pc.close();
    report('failed', e.message);
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

/** A live connection: send input, receive server messages, read stats. */
export class Connection {
  constructor(pc, input, moves) {
    this.pc = pc;
    this.input = input;
    this.moves = moves;
    this._onMessage = null;
    // Messages can arrive before the caller has set onMessage (the channel
    // opens before the connection reports "connected"); keep them.
    this._early = [];
    input.addEventListener('message', (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      if (this._onMessage) this._onMessage(msg);
      else if (this._early.length < 256) this._early.push(msg);
    });
  }

  /** Called with each parsed server message; set it to receive them, early ones included. */
  get onMessage() {
    return this._onMessage;
  }

  set onMessage(fn) {
    this._onMessage = fn;
    if (fn) {
      const early = this._early.splice(0);
      for (const msg of early) fn(msg);
    }
  }

  /** Sends one message; pointer moves go on the unordered channel when open. */
  send(obj) {
    const json = JSON.stringify(obj);
    if (obj && obj.kind === 'pointer_move' && this.moves.readyState === 'open') {
      this.moves.send(json);
    } else if (this.input.readyState === 'open') {
      this.input.send(json);
    }
  }

  /** Sends raw text on the input channel (tests of the server's validation). */
  sendRaw(data) {
    if (this.input.readyState === 'open') this.input.send(data);
  }

  /** fps, bitrate, round-trip and decode time; see stats.js. */
  stats() {
    return collectStats(this.pc);
  }

  /** Closes the connection. */
  close() {
    this.pc.close();
  }
}
