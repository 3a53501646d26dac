// sandcast viewer: the <sandcast-viewer> custom element.
//
//   <script type="module" src="https://sandcast.example:8080/assets/src/sandcast-viewer.js"></script>
//   <sandcast-viewer session="ID" token="VIEWER_TOKEN"></sandcast-viewer>
//
// It polls the session's state, shows what is going on (starting, failed,
// ended, not authorised), and plays it over WebRTC as soon as it can, falling
// back to the video stream over a WebSocket on the server's own port
// (WebCodecs) when WebRTC does not connect in time, and to noVNC when that
// cannot play either. The full API (attributes, properties, events, methods)
// is in docs/embedding.md.

import { connectWebRtc } from './webrtc.js';
import { connectWsVideo } from './wsvideo.js';
import { attachInput } from './input.js';
import { collectStats, formatStats } from './stats.js';

/** Modes the `mode` attribute accepts. */
export const MODES = ['auto', 'webrtc', 'ws', 'vnc'];
/** How each mode is shown to the person. */
export const MODE_LABELS = { webrtc: 'WebRTC', ws: 'WebSocket', vnc: 'noVNC' };
/** Default time WebRTC gets to connect before noVNC takes over, in ms. */
export const DEFAULT_WEBRTC_TIMEOUT_MS = 5000;
/** Default interval between polls of the session's state, in ms. */
export const DEFAULT_POLL_MS = 1000;
/** While the session is starting, the state is asked for this often, so a
 * ready session starts streaming within a fraction of a second. */
export const STARTING_POLL_MS = 150;

// Session states after which nothing will ever be shown again.
// A completed session (its launch command finished, e.g. a sign-in) ended
// as it should: the element says "done", not that something went away.
const ENDED = new Set(['stopping', 'stopped', 'completed']);

const STYLE = `
:host { display: block; position: relative; overflow: hidden; background: #111; color: #eee;
  font: 14px/1.4 system-ui, sans-serif; min-height: 240px; }
.stage, video, .vnc, .vnc-input, canvas.ws { position: absolute; inset: 0; width: 100%; height: 100%; }
canvas.ws { object-fit: contain; background: #000; }
.vnc-input { z-index: 1; outline: none; }
video { object-fit: contain; background: #000; outline: none; }
[hidden] { display: none !important; }
.overlay { position: absolute; inset: 0; display: flex; flex-direction: column; align-items: center;
  justify-content: center; gap: .5em; background: rgba(17,17,17,.92); text-align: center; padding: 1em; z-index: 3; }
.overlay .title { font-size: 1.3em; }
.overlay .detail { opacity: .75; font-size: .9em; white-space: pre-line; }
.bar { position: absolute; top: 0; right: 0; display: flex; gap: .4em; align-items: center; z-index: 4;
  padding: .2em .4em; background: rgba(0,0,0,.55); border-bottom-left-radius: 6px; font-size: 12px; }
.bar button { font: inherit; color: inherit; background: #333; border: 1px solid #555; border-radius: 4px;
  padding: 0 .5em; cursor: pointer; }
.bar .notice { color: #fc6; }
.stats { position: absolute; left: 0; bottom: 0; z-index: 4; padding: .3em .6em; background: rgba(0,0,0,.7);
  font: 12px ui-monospace, monospace; }
.transfers { position: absolute; right: 0; bottom: 0; z-index: 4; display: flex; flex-direction: column; gap: .2em;
  align-items: flex-end; max-width: min(28em, 90%); font-size: 12px; }
.transfers > * { background: rgba(0,0,0,.75); border-radius: 6px 0 0 0; padding: .25em .5em; }
.transfers ul { list-style: none; margin: 0; display: flex; flex-direction: column; gap: .2em; }
.transfers li, .chooser { display: flex; gap: .4em; align-items: center; min-width: 0; }
.transfers .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; min-width: 0; }
.transfers .size, .chooser .note { opacity: .7; white-space: nowrap; }
.automation { position: absolute; left: 0; top: 0; z-index: 4; display: flex; gap: .5em; align-items: center;
  padding: .2em .5em; background: rgba(0,0,0,.75); border-bottom-right-radius: 6px; font-size: 12px; }
.automation button { font: inherit; color: inherit; background: #335; border: 1px solid #557; border-radius: 4px;
  padding: 0 .5em; cursor: pointer; }
.transfers button { font: inherit; color: inherit; background: #333; border: 1px solid #555; border-radius: 4px;
  padding: 0 .5em; cursor: pointer; }
`;

/** Downloads the element lists at once; older ones leave the list. */
export const MAX_LISTED_DOWNLOADS = 8;

/** A byte count as people read it: `512 B`, `1.5 KiB`, `20 MiB`. */
export function formatBytes(n) {
  if (!Number.isFinite(n) || n < 0) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i === 0 ? n : +n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

/** The viewer route of a download or an upload (`kind`: `downloads` or `uploads`). */
export function transferUrl(server, session, kind, name) {
  return new URL(`viewer/${encodeURIComponent(session)}/${kind}/${encodeURIComponent(name)}`,
    server.endsWith('/') ? server : `${server}/`).href;
}

const msg = (e) => (e && e.message) || String(e);

/**
 * What the viewer cannot do on a page that is not a secure context (plain
 * HTTP from another machine): the browser hides the clipboard API and
 * Keyboard Lock there. A short notice, or null in a secure context.
 */
export function insecureContextNotice(secure = globalThis.isSecureContext) {
  if (secure !== false) return null;
  return 'not a secure page (plain HTTP): text copied in the session does not reach this clipboard, '
    + 'and fullscreen cannot capture shortcuts; open the viewer over HTTPS';
}

let novnc = null;

/**
 * noVNC, loaded the first time a viewer falls back to it: most never do,
 * and its 50 modules would otherwise be half of what the page loads before
 * the first picture.
 */
function loadRfb() {
  novnc ??= Promise.all([
    import('../vendor/novnc/core/rfb.js'),
    import('../vendor/novnc/core/encodings.js'),
  ]).then(([{ default: RFB }, { encodings }]) => {
    // x11vnc (the VNC server of every session) accepts noVNC's extended
    // clipboard through libvncserver but never applies its data to the X
    // selections, so pasted text would silently vanish. Without that
    // pseudo-encoding noVNC falls back to classic cut text, which x11vnc
    // handles.
    if (!RFB.messages.clientEncodings.sandcast) {
      const send = RFB.messages.clientEncodings;
      RFB.messages.clientEncodings = Object.assign(
        (sock, encs) => send.call(RFB.messages, sock, encs.filter((e) => e !== encodings.pseudoEncodingExtendedClipboard)),
        { sandcast: true },
      );
    }
    return RFB;
  }).catch((e) => {
    novnc = null; // a later fallback tries again
    throw e;
  });
  return novnc;
}

/** Reads a positive integer attribute, else the default. */
function intAttr(el, name, fallback) {
  const raw = el.getAttribute(name);
  if (raw === null || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) {
    console.warn(`sandcast-viewer: ignoring ${name}="${raw}" (not a positive number)`);
    return fallback;
  }
  return n;
}

/** Formats the children's states as "xvfb running · browser starting". */
export function describeChildren(children) {
  if (!Array.isArray(children) || children.length === 0) return '';
  return children
    .map((c) => `${c.name}: ${c.state}${c.restarts ? ` (${c.restarts} restarts)` : ''}`)
    .join(' · ');
}

/** Builds a session's WebSocket URL (`vnc`, `input` or `video`) from the server's base URL. */
export function streamUrl(server, session, token, kind) {
  const u = new URL(`viewer/${encodeURIComponent(session)}/${kind}`, server.endsWith('/') ? server : `${server}/`);
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  u.searchParams.set('token', token);
  return u.href;
}

/** Builds the input WebSocket URL (used beside noVNC and the WebSocket stream) for a session. */
export function inputUrl(server, session, token) {
  return streamUrl(server, session, token, 'input');
}

/** Builds the noVNC WebSocket URL for a session from the server's base URL. */
export function vncUrl(server, session, token) {
  return streamUrl(server, session, token, 'vnc');
}

/** The `<sandcast-viewer>` element: one session, WebRTC first, noVNC fallback. */
export class SandcastViewer extends HTMLElement {
  /** Attributes whose change reconnects the viewer. */
  static get observedAttributes() { return ['server', 'session', 'token', 'mode']; }

  constructor() {
    super();
    const root = this.attachShadow({ mode: 'open' });
    root.innerHTML = `<style>${STYLE}</style>
      <div class="stage" part="stage">
        <video part="video" hidden autoplay muted playsinline tabindex="0"></video>
        <canvas class="ws" part="ws" hidden></canvas>
        <div class="vnc" part="vnc" hidden></div>
        <div class="vnc-input" part="vnc-input" hidden></div>
      </div>
      <div class="overlay" part="overlay" role="status" aria-live="polite"><div class="title">not connected</div><div class="detail"></div></div>
      <div class="bar" part="bar"><span class="notice" part="notice" role="note" hidden>not secure: no clipboard copy</span><span class="path"></span>
        <button type="button" class="stats-toggle" title="Stats (Ctrl+Alt+Shift+S)">stats</button></div>
      <div class="stats" part="stats" hidden></div>
      <div class="automation" part="automation" role="status" hidden><span class="note"></span>
        <button type="button" class="hold"></button></div>
      <div class="transfers" part="transfers">
        <div class="chooser" part="chooser" role="dialog" aria-label="the remote page asks for files" hidden>
          <span class="note">the page asks for a file</span>
          <button type="button" class="choose">choose…</button><button type="button" class="cancel">cancel</button></div>
        <ul class="downloads" part="downloads" aria-label="downloads" hidden></ul>
      </div>
      <input type="file" class="file-input" hidden tabindex="-1">`;
    this._video = root.querySelector('video');
    this._vncBox = root.querySelector('.vnc');
    this._wsCanvas = root.querySelector('canvas.ws');
    this._vncInput = root.querySelector('.vnc-input');
    this._overlay = root.querySelector('.overlay');
    this._pathLabel = root.querySelector('.path');
    this._statsBox = root.querySelector('.stats');
    root.querySelector('.stats-toggle').addEventListener('click', () => this.toggleStats());
    this._automationBox = root.querySelector('.automation');
    root.querySelector('.automation .hold').addEventListener('click', () => {
      const take = !this._status.automation.paused;
      (take ? this.takeControl() : this.giveBackControl()).catch((e) => {
        this._automationBox.querySelector('.note').textContent = `could not change control: ${msg(e)}`;
      });
    });
    this._downloadList = root.querySelector('.downloads');
    this._chooserBox = root.querySelector('.chooser');
    this._fileInput = root.querySelector('.file-input');
    root.querySelector('.chooser .choose').addEventListener('click', () => this._fileInput.click());
    root.querySelector('.chooser .cancel').addEventListener('click', () => this.cancelFileChooser());
    this._fileInput.addEventListener('change', () => {
      const files = [...this._fileInput.files];
      this._fileInput.value = '';
      if (files.length) this.chooseFiles(files).catch(() => { /* said in the chooser box */ });
      else this.cancelFileChooser();
    });
    this._fileInput.addEventListener('cancel', () => this.cancelFileChooser());
    this._onKey = (ev) => {
      if (ev.ctrlKey && ev.altKey && ev.shiftKey && ev.code === 'KeyS') {
        ev.preventDefault();
        ev.stopPropagation();
        this.toggleStats();
      }
    };
    const notice = insecureContextNotice();
    const noticeBox = root.querySelector('.notice');
    noticeBox.hidden = notice === null;
    noticeBox.title = notice ?? '';
    this._status = {
      state: 'idle', mode: null, connected: false, reason: null, path: null, children: [], session: null, control: true, role: null,
      secureContext: notice === null, notice,
      // Programs driving the session over its DevTools endpoint, and whether
      // the person took control from them.
      automation: { clients: 0, paused: false },
    };
    this._run = 0; // bumped on every (dis)connect so stale async work can tell it is stale
    this._timers = new Set();
    this._rtc = null;
    this._ws = null;
    this._rfb = null;
    this._detachInput = null;
    this._statsTimer = null;
    this._retries = 0;
    this._notBefore = 0; // no new stream before this time (reconnect backoff)
    this.remoteClipboard = null;
    /** The remote page's keyboard focus as last reported: `{ editable, x, y }`. */
    this.remoteFocus = null;
    /** Files the remote browser downloaded, newest last: `{ name, size }`. */
    this.downloads = [];
    // The file chooser the remote page waits on: { chooser, multiple, send }.
    this._chooser = null;
  }

  connectedCallback() {
    window.addEventListener('keydown', this._onKey, true);
    if (this._status.notice) console.warn(`sandcast-viewer: ${this._status.notice}`);
    if (!this.hasAttribute('manual')) queueMicrotask(() => { if (this.isConnected) this.connect(); });
  }

  disconnectedCallback() {
    window.removeEventListener('keydown', this._onKey, true);
    this.toggleStats(false);
    this.disconnect();
  }

  attributeChangedCallback(name, oldValue, newValue) {
    if (oldValue === newValue || this._run === 0 || !this.isConnected) return;
    if (this._status.state !== 'idle') this.connect();
  }

  /** The server's base URL: the `server` attribute, else the origin this module was loaded from. */
  get server() {
    return this.getAttribute('server') || new URL(import.meta.url).origin;
  }

  /** The session id (`session` attribute). */
  get session() { return this.getAttribute('session') || ''; }

  /** The viewer token (`token` attribute). */
  get token() { return this.getAttribute('token') || ''; }

  /** `auto` (WebRTC, then the WebSocket stream, then noVNC), `webrtc`, `ws` or `vnc`. */
  get mode() {
    const m = (this.getAttribute('mode') || 'auto').toLowerCase();
    return MODES.includes(m) ? m : 'auto';
  }

  /** The RTCPeerConnection while WebRTC is active, else null (for diagnostics). */
  get peerConnection() { return this._rtc?.pc ?? null; }

  /** A copy of the current status: `{ state, mode, connected, reason, path, children, session, control, role, secureContext, notice }`. */
  get status() { return { ...this._status, children: [...this._status.children] }; }

  /** Starts (or restarts) watching the session and streaming it once ready. */
  connect() {
    this._teardown();
    const run = ++this._run;
    this._retries = 0;
    this._notBefore = 0;
    this._webrtcFailed = null;
    this._wsFailed = null;
    const mode = (this.getAttribute('mode') || 'auto').toLowerCase();
    if (!MODES.includes(mode)) {
      this._set({ state: 'error', reason: `unknown mode "${mode}" (expected auto, webrtc, ws or vnc)` }, 'error', `unknown mode "${mode}"`);
      return;
    }
    if (!this.session) return this._set({ state: 'error', reason: 'no session attribute' }, 'error', 'no session given');
    if (!this.token) {
      return this._set({ state: 'unauthorised', reason: 'no viewer token' }, 'not authorised', 'the viewer link has no token');
    }
    this._set({ state: 'connecting', session: this.session, mode: null, connected: false, reason: null, path: null }, 'connecting…');
    this._poll(run);
  }

  /** Stops streaming and polling; the element shows "disconnected". */
  disconnect() {
    this._run++;
    this._teardown();
    if (this._status.state === 'idle') return;
    // Keep a final message (failed, ended, not authorised) rather than hiding it.
    const final = ['failed', 'stopping', 'stopped', 'completed', 'unauthorised', 'not_found', 'error'].includes(this._status.state);
    this._set({ connected: false, mode: null, path: null }, final ? undefined : 'disconnected');
  }

  /** Live figures of the active path: WebRTC's or the WebSocket stream's (see stats.js) or noVNC's framebuffer size. */
  async stats() {
    const base = { mode: this._status.mode, connected: this._status.connected };
    if (this._rtc) return { ...base, ...(await collectStats(this._rtc.pc)) };
    if (this._ws) return { ...base, ...this._ws.stats() };
    if (this._rfb) {
      const canvas = this._vncBox.querySelector('canvas');
      return { ...base, width: canvas?.width ?? null, height: canvas?.height ?? null };
    }
    return base;
  }

  /** Shows or hides the stats panel. */
  toggleStats(show = this._statsBox.hidden) {
    this._statsBox.hidden = !show;
    clearInterval(this._statsTimer);
    this._statsTimer = null;
    if (!show) return;
    const update = async () => {
      try {
        const s = await this.stats();
        if (s.mode === 'webrtc' || s.mode === 'ws') this._statsBox.textContent = `${MODE_LABELS[s.mode]} · ${formatStats(s)}`;
        else if (s.mode === 'vnc') this._statsBox.textContent = `noVNC · ${s.width ?? '–'}x${s.height ?? '–'}`;
        else this._statsBox.textContent = 'not streaming';
      } catch (e) {
        this._statsBox.textContent = `stats unavailable: ${msg(e)}`;
      }
    };
    update();
    this._statsTimer = setInterval(update, 1000);
  }

  // ---- state and overlay ----

  _set(patch, overlayTitle, overlayDetail = '') {
    const before = JSON.stringify(this._status);
    Object.assign(this._status, patch);
    // A view token only watches: the server drops its input whatever is sent.
    if (this._status.role === 'view') this._status.control = false;
    if (overlayTitle !== undefined) {
      this._overlay.hidden = overlayTitle === null;
      if (overlayTitle !== null) {
        this._overlay.querySelector('.title').textContent = overlayTitle;
        this._overlay.querySelector('.detail').textContent = overlayDetail;
      }
    }
    const s = this._status;
    this._pathLabel.textContent = (s.mode ? `${MODE_LABELS[s.mode]}${s.mode !== 'webrtc' && s.path ? ` (${s.path})` : ''}` : '')
      + (s.mode && s.control === false ? ' · view only' : '');
    this.dataset.state = s.state;
    this.dataset.mode = s.mode ?? '';
    this.dataset.connected = String(s.connected);
    if (JSON.stringify(s) !== before) this._emit('statechange', this.status);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail, bubbles: true, composed: true }));
  }

  _later(fn, ms) {
    const t = setTimeout(() => { this._timers.delete(t); fn(); }, ms);
    this._timers.add(t);
  }

  _headers() { return { Authorization: `Bearer ${this.token}` }; }

  _url(path) { return new URL(path, this.server.endsWith('/') ? this.server : `${this.server}/`).href; }

  // ---- session state polling ----

  async _poll(run) {
    if (run !== this._run) return;
    const interval = intAttr(this, 'poll-interval', DEFAULT_POLL_MS);
    let res;
    try {
      res = await fetch(this._url(`viewer/${encodeURIComponent(this.session)}/state`), { headers: this._headers(), cache: 'no-store' });
    } catch (e) {
      if (run !== this._run) return;
      if (!this._status.connected) this._set({ reason: `server unreachable: ${msg(e)}` }, 'server unreachable, retrying…', msg(e));
      this._later(() => this._poll(run), Math.min(interval * 3, 5000));
      return;
    }
    if (run !== this._run) return;
    if (res.status === 401 || res.status === 403) {
      this._teardown();
      this._set({ state: 'unauthorised', connected: false, mode: null, reason: `HTTP ${res.status}` },
        'not authorised', 'this viewer link is not valid for this session');
      return;
    }
    if (res.status === 404) {
      this._teardown();
      this._set({ state: 'not_found', connected: false, mode: null, reason: 'unknown session' }, 'session not found');
      this._emit('ended', { state: 'not_found', reason: 'unknown session' });
      return;
    }
    if (!res.ok) {
      const text = (await res.text().catch(() => '')).slice(0, 200);
      if (!this._status.connected) this._set({ reason: `HTTP ${res.status}` }, 'server error, retrying…', `HTTP ${res.status} ${text}`);
      this._later(() => this._poll(run), Math.min(interval * 3, 5000));
      return;
    }
    let body;
    try { body = await res.json(); } catch (e) { body = { state: 'error', reason: `bad state response: ${msg(e)}` }; }
    if (run !== this._run) return;
    this._onSessionState(run, body);
    const next = body.state === 'starting' ? Math.min(interval, STARTING_POLL_MS) : interval;
    if (!ENDED.has(body.state) && body.state !== 'failed') this._later(() => this._poll(run), next);
  }

  _onSessionState(run, body) {
    const children = Array.isArray(body.children) ? body.children : [];
    if (typeof body.role === 'string') this._set({ role: body.role });
    if (Number.isInteger(body.automation_clients)) {
      this._automationMessage({ kind: 'automation', clients: body.automation_clients, paused: body.control === 'person' });
    }
    this._size = body.width && body.height ? { width: body.width, height: body.height } : this._size;
    switch (body.state) {
      case 'ready':
        if (!this._rtc && !this._ws && !this._rfb && !this._starting && Date.now() >= this._notBefore) {
          this._set({ state: 'ready', children, reason: null }, 'connecting…', describeChildren(children));
          this._startStream(run);
        } else {
          this._readyWhileConnected(children);
        }
        break;
      case 'failed':
        this._run++;
        this._teardown();
        this._set({ state: 'failed', children, connected: false, mode: null, reason: body.reason || 'unknown reason' },
          `failed: ${body.reason || 'unknown reason'}`, describeChildren(children));
        this._emit('ended', { state: 'failed', reason: body.reason || null });
        break;
      case 'stopping':
      case 'stopped':
      case 'completed':
        this._ended(body.state, body.reason);
        break;
      case 'starting':
        // A poll answered before the session's `ready` message came: stale.
        if (this._status.state === 'ready') break;
        if (this._rtc || this._ws || this._starting) {
          this._set({ state: 'starting', children, reason: null });
          break;
        }
        this._set({ state: 'starting', children, reason: null }, 'starting…', describeChildren(children));
        // WebRTC and the WebSocket stream connect while the session starts,
        // so the first picture comes as soon as the browser draws, not a
        // connect later. noVNC waits for `ready` (its server starts with
        // the session).
        if (this._streamsEarly() && Date.now() >= this._notBefore) this._startStream(run);
        break;
      default:
        this._set({ state: String(body.state ?? 'unknown'), children, reason: body.reason ?? null },
          `session ${body.state ?? 'in an unknown state'}`, body.reason ?? '');
    }
  }

  /** Whether the stream this element tries next may connect before the session is ready. */
  _streamsEarly() {
    const mode = this.mode;
    return mode === 'webrtc' || mode === 'ws' || (mode === 'auto' && !(this._webrtcFailed && this._wsFailed));
  }

  /** The session became ready; a stream connected early now shows it. */
  _readyWhileConnected(children) {
    const wasStarting = this._status.state === 'starting';
    this._set(children ? { state: 'ready', children } : { state: 'ready' },
      wasStarting && this._status.connected ? null : undefined);
  }

  _ended(state, reason) {
    if (ENDED.has(this._status.state) && !this._rtc && !this._ws && !this._rfb) return;
    this._run++; // a poll still in flight must not start a stream again
    this._teardown();
    const title = state === 'completed' ? 'done' : 'session ended';
    this._set({ state, connected: false, mode: null, path: null, reason: reason ?? null }, title, reason ?? '');
    this._emit('ended', { state, reason: reason ?? null });
  }

  // ---- streaming ----

  async _startStream(run) {
    this._starting = true;
    try {
      const mode = this.mode;
      if (mode === 'vnc') return this._startVnc(run, 'forced by mode=vnc');
      if (mode === 'ws') {
        try {
          await this._startWs(run, 'forced by mode=ws');
        } catch (e) {
          if (run !== this._run) return;
          this._set({ connected: false, mode: null, reason: msg(e) }, 'the video stream did not connect, retrying…', msg(e));
          this._retry(run);
        }
        return;
      }
      // Once WebRTC has failed, reconnects go straight to the fallbacks
      // rather than waiting for the timeout again; connect() tries WebRTC
      // afresh.
      if (mode === 'auto' && this._webrtcFailed) return await this._fallback(run, this._webrtcFailed);
      const timeoutMs = intAttr(this, 'webrtc-timeout', DEFAULT_WEBRTC_TIMEOUT_MS);
      try {
        await this._startWebRtc(run, timeoutMs);
      } catch (e) {
        if (run !== this._run) return;
        const why = e && e.timeout
          ? `WebRTC did not connect within ${+(timeoutMs / 1000).toFixed(1)} s`
          : `WebRTC failed: ${msg(e)}`;
        if (mode === 'webrtc') {
          this._set({ connected: false, mode: null, reason: why }, 'WebRTC did not connect, retrying…', why);
          this._retry(run);
          return;
        }
        this._webrtcFailed = why;
        this._emit('fallback', { reason: why });
        await this._fallback(run, why);
      }
    } finally {
      this._starting = false;
    }
  }

  // After WebRTC failed (`why`): the WebSocket stream, then noVNC. Once the
  // stream has failed too, reconnects go straight to noVNC.
  async _fallback(run, why) {
    if (!this._wsFailed) {
      try {
        await this._startWs(run, why);
        return;
      } catch (e) {
        if (run !== this._run) return;
        this._wsFailed = `the video stream failed: ${msg(e)}`;
        this._emit('fallback', { reason: this._wsFailed });
      }
    }
    // noVNC needs a ready session: the next `ready` starts it.
    if (this._status.state === 'starting') return;
    this._startVnc(run, `${why}; ${this._wsFailed}`);
  }

  // The video stream over a WebSocket (WebCodecs on a canvas), with input
  // over the input socket. Throws when it cannot connect.
  async _startWs(run, why) {
    const starting = this._status.state === 'starting';
    this._set({ mode: 'ws', connected: false, path: why, reason: null }, starting ? undefined : 'connecting…', why);
    const conn = await connectWsVideo({
      canvas: this._wsCanvas,
      url: streamUrl(this.server, this.session, this.token, 'video'),
      timeoutMs: intAttr(this, 'webrtc-timeout', DEFAULT_WEBRTC_TIMEOUT_MS),
    });
    if (run !== this._run) { conn.close(); return; }
    this._ws = conn;
    this._wsCanvas.hidden = false;
    this._video.hidden = true;
    this._vncBox.hidden = true;
    conn.onClose = (reason) => this._dropped(run, conn, reason);
    this._socketInputOn(run, conn, {
      resize: true,
      display: () => conn.size() ?? this._size ?? null,
    });
    this._retries = 0;
    // Connected while the session starts: "starting…" stays until `ready`.
    this._set({ connected: true, reason: null }, this._status.state === 'starting' ? undefined : null);
    this._emit('connected', { mode: 'ws' });
    if (this.hasAttribute('autofocus')) this._vncInput.focus({ preventScroll: true });
  }

  async _iceServers() {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), 1500);
    try {
      const res = await fetch(this._url(`api/webrtc/ice-servers?session=${encodeURIComponent(this.session)}`), { headers: this._headers(), signal: ctl.signal });
      if (!res.ok) return [];
      const body = await res.json();
      return Array.isArray(body.iceServers) ? body.iceServers : [];
    } catch (_) {
      return []; // the gateway's own host candidates are enough on most networks
    } finally {
      clearTimeout(t);
    }
  }

  async _startWebRtc(run, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(Object.assign(new Error('timeout'), { timeout: true })), timeoutMs);
    });
    const attempt = (async () => {
      const iceServers = await this._iceServers();
      return connectWebRtc({
        video: this._video,
        offerUrl: this._url(`api/webrtc/session/${encodeURIComponent(this.session)}/offer`),
        headers: this._headers(),
        iceServers,
        timeoutMs: Math.max(500, deadline - Date.now()),
      });
    })();
    let conn;
    try {
      conn = await Promise.race([attempt, timeout]);
    } catch (e) {
      // A connection that completes after the deadline is not wanted any more.
      attempt.then((c) => c.close(), () => {});
      throw e;
    } finally {
      clearTimeout(timer);
    }
    if (run !== this._run) { conn.close(); return; }
    this._rtc = conn;
    this._video.hidden = false;
    this._wsCanvas.hidden = true;
    this._vncBox.hidden = true;
    // Control until the gateway says otherwise; its first word may already
    // wait among the early messages, which go to the first handler set, so
    // this element's handler comes first and the input's wraps it.
    this._set({ control: true });
    conn.onMessage = (m) => {
      if (m && m.kind === 'clipboard') this._remoteClipboard(m.text);
      if (m && m.kind === 'focus') this._remoteFocus(m);
      this._transferMessage(m, (x) => conn.send(x));
      this._automationMessage(m);
      // The gateway says "ended"; the session API says "stopping"/"stopped".
      if (m && m.kind === 'session_state' && (m.state === 'ended' || ENDED.has(m.state))) {
        this._ended(m.state === 'ended' ? 'stopped' : m.state, m.reason);
      }
      // Connected while the session started: its `ready` comes this way
      // first, before the next poll.
      if (m && m.kind === 'session_state' && m.state === 'ready') this._readyWhileConnected();
      if (m && m.kind === 'control') this._set({ control: m.granted !== false });
    };
    this._detachInput = attachInput(this._video, conn, { displaySize: this._size, touch: this._touchMode() });
    let lost;
    conn.pc.addEventListener('connectionstatechange', () => {
      const st = conn.pc.connectionState;
      clearTimeout(lost);
      if (st === 'failed' || st === 'closed') this._dropped(run, conn, `WebRTC connection ${st}`);
      // "disconnected" often heals by itself; give ICE a moment first.
      else if (st === 'disconnected') lost = setTimeout(() => this._dropped(run, conn, 'WebRTC connection lost'), 4000);
    });
    // The server closing the viewer (its token revoked) ends the data
    // channel at once; ICE would notice only seconds later.
    conn.input.addEventListener('close', () => this._dropped(run, conn, 'the server closed the connection'));
    this._retries = 0;
    // Connected while the session starts: "starting…" stays until `ready`.
    this._set({ mode: 'webrtc', connected: true, path: null, reason: null },
      this._status.state === 'starting' ? undefined : null);
    this._emit('connected', { mode: 'webrtc' });
    if (this.hasAttribute('autofocus')) this._video.focus({ preventScroll: true });
  }

  _startVnc(run, why) {
    const box = this._vncBox;
    box.replaceChildren();
    box.hidden = false;
    this._video.hidden = true;
    this._wsCanvas.hidden = true;
    this._set({ mode: 'vnc', connected: false, path: why, reason: why }, 'connecting to noVNC…', why);
    loadRfb().then((RFB) => {
      if (run !== this._run) return;
      this._openVnc(run, RFB, box);
    }, (e) => {
      if (run !== this._run) return;
      this._set({ mode: null }, 'noVNC could not be loaded', msg(e));
      this._retry(run);
    });
  }

  _openVnc(run, RFB, box) {
    let rfb;
    try {
      rfb = new RFB(box, vncUrl(this.server, this.session, this.token), { shared: true });
    } catch (e) {
      this._set({ mode: null }, 'noVNC could not start', msg(e));
      this._retry(run);
      return;
    }
    this._rfb = rfb;
    // noVNC only shows the screen (and brings the remote clipboard): input
    // goes over sandcast's own input socket, through the same code as over
    // WebRTC (any character, input methods, dead keys, touch), which
    // x11vnc's keysym handling does not do. The input overlay covers noVNC's
    // canvas, so noVNC never sees an event; its view-only mode would also
    // drop the remote clipboard.
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.background = '#000';
    rfb.addEventListener('connect', () => {
      if (run !== this._run || this._rfb !== rfb) return;
      this._retries = 0;
      this._set({ connected: true }, null);
      this._emit('connected', { mode: 'vnc' });
      this._socketInputOn(run, rfb, {
        resize: false,
        display: () => {
          const c = box.querySelector('canvas');
          return c && c.width ? { width: c.width, height: c.height } : null;
        },
      });
      if (this.hasAttribute('autofocus')) this._vncInput.focus({ preventScroll: true });
    });
    rfb.addEventListener('disconnect', (ev) => {
      if (run !== this._run || this._rfb !== rfb) return;
      this._dropped(run, rfb, ev.detail?.clean ? 'noVNC connection closed' : 'noVNC connection lost');
    });
    rfb.addEventListener('securityfailure', (ev) => {
      this._set({ reason: `VNC security failure: ${ev.detail?.reason ?? ev.detail?.status}` });
    });
    this._socketClipboard = false;
    rfb.addEventListener('clipboard', (ev) => { if (!this._socketClipboard) this._remoteClipboard(ev.detail.text); });
  }

  // The input socket beside noVNC or the WebSocket stream (`owner`): the
  // data channel's messages, as JSON text messages, on the overlay above the
  // canvas (whose picture is centred and scaled to fit, as the video is).
  // `resize`: the remote display follows the element's size (not with
  // noVNC, which scales instead).
  _socketInputOn(run, owner, { resize, display }) {
    const ws = new WebSocket(inputUrl(this.server, this.session, this.token));
    const current = () => run === this._run && (this._rfb === owner || this._ws === owner);
    const queue = [];
    const conn = {
      onMessage: null,
      send: (m) => {
        const text = JSON.stringify(m);
        if (ws.readyState === WebSocket.OPEN) ws.send(text);
        else if (ws.readyState === WebSocket.CONNECTING) queue.push(text);
      },
    };
    ws.addEventListener('open', () => queue.splice(0).forEach((t) => ws.send(t)));
    // What the server tells viewers: the clipboard in full Unicode (noVNC's
    // is Latin-1; once this one speaks, noVNC's is ignored), the focus.
    ws.addEventListener('message', (ev) => {
      if (!current()) return;
      let m;
      try { m = JSON.parse(ev.data); } catch (_) { return; }
      if (m?.kind === 'clipboard' && typeof m.text === 'string') {
        this._socketClipboard = true;
        this._remoteClipboard(m.text);
      }
      if (m?.kind === 'focus') this._remoteFocus(m);
      this._transferMessage(m, conn.send);
      this._automationMessage(m);
      conn.onMessage?.(m);
    });
    ws.addEventListener('close', () => {
      if (current()) this._dropped(run, owner, 'input connection lost');
    });
    const overlay = this._vncInput;
    overlay.hidden = false;
    const detach = attachInput(overlay, conn, {
      touch: this._touchMode(),
      resize,
      clipboard: false,
      display,
    });
    this._detachInput = () => {
      detach();
      overlay.hidden = true;
      try { ws.close(); } catch (_) { /* already closed */ }
    };
  }

  // What a one-finger drag does on a touch screen: the `touch` attribute.
  _touchMode() {
    return this.getAttribute('touch') === 'drag' ? 'drag' : 'scroll';
  }

  _remoteFocus(m) {
    this.remoteFocus = { editable: m.editable === true, x: m.x ?? null, y: m.y ?? null };
    this._emit('remotefocus', { ...this.remoteFocus });
  }

  // ---- downloads and file choosers ----

  /** Saves a download of the remote browser (`name` as in `downloads`) on this computer. */
  async saveDownload(name) {
    const res = await fetch(transferUrl(this.server, this.session, 'downloads', name), { headers: this._headers(), cache: 'no-store' });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.error || `HTTP ${res.status}`);
    }
    // The token stays in a header, never in a link the browser keeps.
    const url = URL.createObjectURL(await res.blob());
    const a = document.createElement('a');
    a.href = url;
    a.download = name;
    a.hidden = true;
    this.shadowRoot.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  /**
   * Answers the remote page's file chooser with local files (`File`s, or
   * blobs with a `name`): each is uploaded to the session, then the page's
   * input gets them. Only the first counts for a single-file input.
   */
  async chooseFiles(files) {
    const c = this._chooser;
    if (!c) throw new Error('no file chooser is waiting');
    const list = c.multiple ? [...files] : [...files].slice(0, 1);
    const note = this._chooserBox.querySelector('.note');
    const names = [];
    try {
      for (const f of list) {
        note.textContent = `uploading ${f.name}…`;
        const res = await fetch(transferUrl(this.server, this.session, 'uploads', f.name), {
          method: 'PUT', body: f, headers: { ...this._headers(), 'Content-Type': 'application/octet-stream' },
        });
        if (!res.ok) {
          const body = await res.json().catch(() => ({}));
          throw new Error(`${f.name}: ${body.error || `HTTP ${res.status}`}`);
        }
        names.push(f.name);
      }
    } catch (e) {
      // The chooser still waits: the person may pick another file.
      if (this._chooser === c) {
        note.textContent = `upload failed: ${msg(e)}`;
        this._chooserBox.hidden = false;
      }
      throw e;
    }
    if (this._chooser !== c) return; // a newer chooser replaced it meanwhile
    c.send({ kind: 'choose_files', chooser: c.chooser, names });
    this._chooser = null;
    this._chooserBox.hidden = true;
  }

  /** Tells the remote page's file chooser that nothing was chosen. */
  cancelFileChooser() {
    const c = this._chooser;
    if (!c) return;
    c.send({ kind: 'choose_files', chooser: c.chooser, names: [] });
    this._chooser = null;
    this._chooserBox.hidden = true;
  }

  // ---- automation beside the person ----

  /**
   * Takes control from programs driving the session over its DevTools
   * endpoint: their input is refused until {@link giveBackControl}.
   */
  takeControl() { return this._setHolder('person'); }

  /** Gives control back: programs' input reaches the page again. */
  giveBackControl() { return this._setHolder('shared'); }

  async _setHolder(holder) {
    const res = await fetch(this._url(`viewer/${encodeURIComponent(this.session)}/control`), {
      method: 'PUT',
      headers: { ...this._headers(), 'Content-Type': 'application/json' },
      body: JSON.stringify({ holder }),
    });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
    this._automationMessage({ kind: 'automation', clients: body.automation_clients, paused: body.holder === 'person' });
  }

  // What the session says about programs driving it: a bar offers to take
  // control while one does, and to give it back.
  _automationMessage(m) {
    if (m?.kind !== 'automation' || !Number.isInteger(m.clients)) return;
    const a = { clients: m.clients, paused: m.paused === true };
    const before = this._status.automation;
    if (before.clients === a.clients && before.paused === a.paused) return;
    this._set({ automation: a });
    this._automationBox.hidden = a.clients === 0 && !a.paused;
    this._automationBox.querySelector('.note').textContent = a.paused
      ? 'you have control; programs wait'
      : `a program is driving this browser${a.clients > 1 ? ` (${a.clients})` : ''}`;
    this._automationBox.querySelector('.hold').textContent = a.paused ? 'give back' : 'take control';
    this._emit('automation', { ...a });
  }

  // What the session says about downloads and file choosers; `send` answers
  // on the connection the message came on.
  _transferMessage(m, send) {
    if (m?.kind === 'download' && typeof m.name === 'string') {
      const d = { name: m.name, size: Number.isFinite(m.size) ? m.size : null };
      this.downloads = [...this.downloads, d].slice(-100);
      this._listDownload(d);
      this._emit('download', { ...d });
    }
    // A watcher cannot answer a chooser (the server refuses its uploads).
    if (m?.kind === 'file_chooser' && Number.isInteger(m.chooser) && this._status.role !== 'view') {
      this._chooser = { chooser: m.chooser, multiple: m.multiple === true, send };
      this._fileInput.multiple = m.multiple === true;
      const ev = new CustomEvent('filechooser', {
        detail: { chooser: m.chooser, multiple: m.multiple === true }, bubbles: true, composed: true, cancelable: true,
      });
      // An embedding page that handles it calls chooseFiles() or cancelFileChooser().
      if (!this.dispatchEvent(ev)) return;
      this._chooserBox.querySelector('.note').textContent = m.multiple ? 'the page asks for files' : 'the page asks for a file';
      this._chooserBox.hidden = false;
      // The click that opened the remote chooser is still a gesture here,
      // usually; without one the browser ignores this and the button waits.
      if (navigator.userActivation?.isActive !== false) this._fileInput.click();
    }
  }

  _listDownload(d) {
    const li = document.createElement('li');
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = d.name; // the remote page chose it: text, never markup
    name.title = d.name;
    const size = document.createElement('span');
    size.className = 'size';
    size.textContent = d.size === null ? '' : formatBytes(d.size);
    const save = document.createElement('button');
    save.type = 'button';
    save.className = 'save';
    save.textContent = 'save';
    save.title = `save ${d.name} on this computer`;
    save.addEventListener('click', () => {
      save.disabled = true;
      this.saveDownload(d.name).then(() => { save.textContent = 'saved'; }, (e) => {
        save.textContent = 'retry';
        save.title = msg(e);
      }).finally(() => { save.disabled = false; });
    });
    const close = document.createElement('button');
    close.type = 'button';
    close.className = 'dismiss';
    close.textContent = '×';
    close.title = 'remove from this list';
    close.addEventListener('click', () => {
      li.remove();
      this._downloadList.hidden = this._downloadList.children.length === 0;
    });
    li.append(name, size, save, close);
    this._downloadList.append(li);
    while (this._downloadList.children.length > MAX_LISTED_DOWNLOADS) this._downloadList.firstElementChild.remove();
    this._downloadList.hidden = false;
  }

  _remoteClipboard(text) {
    this.remoteClipboard = text;
    this._emit('clipboard', { text });
    if (navigator.clipboard?.writeText && document.hasFocus()) {
      navigator.clipboard.writeText(text).catch(() => { /* not permitted: the event still carries it */ });
    }
  }

  _dropped(run, which, why) {
    if (run !== this._run || (which !== this._rtc && which !== this._ws && which !== this._rfb)) return;
    this._teardownStreams();
    if (ENDED.has(this._status.state)) return;
    this._set({ connected: false, reason: why }, 'reconnecting…', why);
    this._retry(run);
  }

  // Checks the session again and, if it is still ready, reconnects with backoff.
  _retry(run) {
    const delay = Math.min(1000 * 2 ** this._retries, 10000);
    this._retries++;
    this._notBefore = Date.now() + delay;
    this._later(async () => {
      if (run !== this._run) return;
      let res;
      try {
        res = await fetch(this._url(`viewer/${encodeURIComponent(this.session)}/state`), { headers: this._headers(), cache: 'no-store' });
      } catch (_) { return this._retry(run); }
      if (run !== this._run) return;
      if (!res.ok) return this._retry(run);
      const body = await res.json().catch(() => ({}));
      if (run !== this._run) return;
      // A ready session with no stream starts one inside _onSessionState.
      this._onSessionState(run, body);
    }, delay);
  }

  _teardownStreams() {
    // A chooser's answer goes on the connection that asked; that one is gone.
    this._chooser = null;
    this._chooserBox.hidden = true;
    this._detachInput?.();
    this._detachInput = null;
    if (this._rtc) { const c = this._rtc; this._rtc = null; c.close(); }
    this._video.srcObject = null;
    if (this._ws) { const c = this._ws; this._ws = null; c.close(); }
    this._wsCanvas.hidden = true;
    if (this._rfb) {
      const r = this._rfb;
      this._rfb = null;
      try { r.disconnect(); } catch (_) { /* already closed */ }
    }
    this._vncBox.replaceChildren();
  }

  _teardown() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._teardownStreams();
    this._starting = false;
  }
}

if (!customElements.get('sandcast-viewer')) customElements.define('sandcast-viewer', SandcastViewer);
