// Test fixture for the viewer tests: a real X display (Xvfb) with a real VNC
// server (x11vnc) on it, and a small Node HTTP + WebSocket server that
// stands in for the sandcast server's viewer routes:
//   GET  /assets/...                  files under viewer/
//   GET  /viewer/<id>                 viewer/index.html
//   GET  /viewer/<id>/state           scripted by the test (fixture.state)
//   WS   /viewer/<id>/vnc?token=...   bridged to x11vnc's TCP port
//   WS   /viewer/<id>/input?token=... records the viewer's input messages (fixture.inputs)
//   GET  /viewer/<id>/downloads/<name> a file of fixture.downloads (bearer token)
//   PUT  /viewer/<id>/uploads/<name>   kept in fixture.uploads (bearer token)
//   POST /api/webrtc/session/<id>/offer  scripted (fixture.offer)
//   GET  /api/webrtc/ice-servers
// Everything listens on 127.0.0.1 only. Not part of sandcast itself.
import { spawn, execFile } from 'node:child_process';
import { createServer } from 'node:http';
import { createConnection, createServer as createTcpServer } from 'node:net';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { dirname, extname, join, normalize, sep } from 'node:path';
import { promisify } from 'node:util';
import { WebSocketServer } from 'ws';

const run = promisify(execFile);
/** The repository's viewer/ directory. */
export const VIEWER_DIR = normalize(join(dirname(fileURLToPath(import.meta.url)), '../../viewer'));
export { CHROMIUM_ARGS } from './chromium-args.mjs';

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css', '.txt': 'text/plain', '.md': 'text/plain' };

/** Polls `pred` until it returns a truthy value or `ms` pass. */
export async function until(pred, ms = 10000, what = 'condition') {
  const end = Date.now() + ms;
  for (;;) {
    const v = await pred();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function freePort() {
  const srv = createTcpServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

function rfbBanner(port) {
  return new Promise((resolve) => {
    const s = createConnection({ host: '127.0.0.1', port });
    s.once('data', (d) => { s.destroy(); resolve(d.toString().startsWith('RFB ')); });
    s.once('error', () => resolve(false));
  });
}

/** Starts Xvfb and x11vnc; returns `{ display, vncPort, setColour(hex), stop() }`. */
export async function startDisplay({ width = 640, height = 480 } = {}) {
  const xvfb = spawn('Xvfb', ['-displayfd', '3', '-screen', '0', `${width}x${height}x24`, '-nolisten', 'tcp'],
    { stdio: ['ignore', 'ignore', 'ignore', 'pipe'] });
  const procs = [xvfb];
  const stop = async () => {
    for (const p of procs.reverse()) {
      if (p.exitCode === null && p.signalCode === null) {
        const gone = new Promise((r) => p.once('exit', r));
        p.kill('SIGTERM');
        await gone;
      }
    }
  };
  try {
    const display = await new Promise((resolve, reject) => {
      let buf = '';
      xvfb.stdio[3].on('data', (d) => {
        buf += d;
        if (buf.includes('\n')) resolve(`:${buf.trim()}`);
      });
      xvfb.once('exit', (code) => reject(new Error(`Xvfb exited with ${code}`)));
    });
    const vncPort = await freePort();
    const vnc = spawn('x11vnc', ['-display', display, '-rfbport', String(vncPort), '-localhost', '-nopw', '-forever',
      '-shared', '-quiet', '-wait', '1', '-defer', '1', '-nonap'], { stdio: 'ignore' });
    procs.push(vnc);
    await until(() => rfbBanner(vncPort), 15000, 'x11vnc to accept connections');
    const setColour = (hex) => run('xsetroot', ['-display', display, '-solid', hex]);
    return { display, vncPort, setColour, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

/**
 * Starts the HTTP + WebSocket stand-in for the viewer routes of the sandcast
 * server. Mutate `fixture.state` ({ status, body }) and `fixture.offer`
 * ({ status, body }, 'hang', or an async function from offer to answer) to
 * script it. `fixture.requests` logs
 * `{ method, path, auth }`; `fixture.vncConnections` counts tunnels.
 */
export async function startServer({ vncPort, token = 'tok-123', session = 'x', cors = false }) {
  const fixture = {
    token,
    session,
    state: { status: 200, body: { id: session, state: 'ready', reason: null, width: 640, height: 480, children: [] } },
    // { status, body }, 'hang', or async (offer) => answer.
    offer: { status: 503, body: { error: 'webrtc gateway not available' } },
    offers: [],
    requests: [],
    vncConnections: 0,
    sockets: new Set(),
    inputSockets: new Set(),
    inputs: [],
    // name -> Buffer: what the viewer may download, and what it uploaded.
    downloads: new Map(),
    uploads: new Map(),
  };
  const authorised = (h) => h === `Bearer ${token}`;
  const hanging = new Set();

  const server = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    const path = url.pathname;
    fixture.requests.push({ method: req.method, path, auth: req.headers.authorization ?? null });
    const json = (status, body) => {
      res.writeHead(status, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
      res.end(JSON.stringify(body));
    };
    if (cors) {
      res.setHeader('Access-Control-Allow-Origin', '*');
      res.setHeader('Access-Control-Allow-Headers', 'Authorization, Content-Type');
      res.setHeader('Access-Control-Allow-Methods', 'GET, POST, PUT, OPTIONS');
      if (req.method === 'OPTIONS') { res.writeHead(204); res.end(); return; }
    }
    if (path.startsWith('/assets/')) {
      const file = normalize(join(VIEWER_DIR, decodeURIComponent(path.slice('/assets/'.length))));
      if (!file.startsWith(VIEWER_DIR + sep)) return json(403, { error: 'forbidden' });
      try {
        const body = await readFile(file);
        res.writeHead(200, { 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream' });
        res.end(body);
      } catch (_) {
        json(404, { error: 'not found' });
      }
      return;
    }
    if (path === `/viewer/${session}/state`) {
      if (!authorised(req.headers.authorization)) return json(401, { error: 'unauthorised' });
      return json(fixture.state.status, fixture.state.body);
    }
    const transfer = path.match(new RegExp(`^/viewer/${session}/(downloads|uploads)/([^/]+)$`));
    if (transfer) {
      if (!authorised(req.headers.authorization)) return json(401, { error: 'unauthorised' });
      const name = decodeURIComponent(transfer[2]);
      if (transfer[1] === 'downloads' && req.method === 'GET') {
        const body = fixture.downloads.get(name);
        if (!body) return json(404, { error: 'no such download' });
        res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': body.length });
        res.end(body);
        return;
      }
      if (transfer[1] === 'uploads' && req.method === 'PUT') {
        const chunks = [];
        for await (const c of req) chunks.push(c);
        fixture.uploads.set(name, Buffer.concat(chunks));
        return json(200, { path: `~/Uploads/${name}`, size: fixture.uploads.get(name).length });
      }
    }
    if (/^\/viewer\/[^/]+$/.test(path)) {
      res.writeHead(200, { 'Content-Type': TYPES['.html'] });
      res.end(await readFile(join(VIEWER_DIR, 'index.html')));
      return;
    }
    if (path === `/api/webrtc/session/${session}/offer` && req.method === 'POST') {
      const chunks = [];
      for await (const c of req) chunks.push(c);
      fixture.offers.push(Buffer.concat(chunks).toString());
      if (!authorised(req.headers.authorization)) return json(401, { error: 'unauthorised' });
      if (fixture.offer === 'hang') { hanging.add(res); return; }
      if (typeof fixture.offer === 'function') {
        try {
          return json(200, await fixture.offer(JSON.parse(fixture.offers.at(-1))));
        } catch (e) {
          return json(500, { error: 'answerer failed', detail: String(e) });
        }
      }
      return json(fixture.offer.status, fixture.offer.body);
    }
    if (path === '/api/webrtc/ice-servers') return json(200, { iceServers: [] });
    json(404, { error: 'not found' });
  });

  const wss = new WebSocketServer({ noServer: true });
  server.on('upgrade', (req, sock, head) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    fixture.requests.push({ method: 'WS', path: url.pathname, auth: url.searchParams.get('token') });
    if (url.pathname === `/viewer/${session}/input` && url.searchParams.get('token') === token) {
      wss.handleUpgrade(req, sock, head, (ws) => {
        fixture.inputSockets.add(ws);
        ws.on('message', (d) => fixture.inputs.push(JSON.parse(d.toString())));
        ws.on('close', () => fixture.inputSockets.delete(ws));
      });
      return;
    }
    if (url.pathname !== `/viewer/${session}/vnc` || url.searchParams.get('token') !== token) {
      sock.end('HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    wss.handleUpgrade(req, sock, head, (ws) => {
      fixture.vncConnections++;
      const tcp = createConnection({ host: '127.0.0.1', port: vncPort });
      fixture.sockets.add(ws);
      ws.lastServerData = Date.now();
      tcp.on('data', (d) => { ws.lastServerData = Date.now(); if (ws.readyState === ws.OPEN) ws.send(d); });
      ws.on('message', (d) => tcp.write(d));
      const end = () => { fixture.sockets.delete(ws); tcp.destroy(); ws.terminate(); };
      tcp.on('close', end);
      tcp.on('error', end);
      ws.on('close', end);
      ws.on('error', end);
    });
  });

  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  fixture.origin = `http://127.0.0.1:${server.address().port}`;
  fixture.viewerUrl = (query = '', tok = token) => `${fixture.origin}/viewer/${session}${query}#token=${tok}`;
  /** Sends a server message (JSON) to every viewer on an input socket. */
  fixture.toViewers = (msg) => { for (const ws of fixture.inputSockets) ws.send(JSON.stringify(msg)); };
  /** Drops every VNC tunnel, as a server restart or network hiccup would. */
  fixture.dropVnc = () => { for (const ws of [...fixture.sockets, ...fixture.inputSockets]) ws.terminate(); };
  /**
   * Sends an RFB ServerCutText message to every viewer, as a VNC server does
   * when the remote clipboard changes. It waits for a quiet moment in the
   * stream so that it lands between two server messages.
   */
  fixture.serverCutText = async (text) => {
    const latin1 = Buffer.from(text, 'latin1');
    const msg = Buffer.concat([Buffer.from([3, 0, 0, 0]), Buffer.alloc(4), latin1]);
    msg.writeUInt32BE(latin1.length, 4);
    for (const ws of fixture.sockets) {
      await until(() => Date.now() - ws.lastServerData > 300, 10000, 'a quiet VNC stream');
      ws.send(msg);
    }
  };
  fixture.stop = async () => {
    for (const res of hanging) res.destroy();
    fixture.dropVnc();
    wss.close();
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  };
  return fixture;
}
