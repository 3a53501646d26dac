// viewer/src/input.js with real DOM events in headless Chromium.
//   node --test tests/browser/webrtc-input.test.mjs
// Files are served to the page through request interception: no server, no network.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { dirname, join, normalize } from 'node:path';
import { chromium } from 'playwright-core';

const root = normalize(join(dirname(fileURLToPath(import.meta.url)), '../..'));
const ORIGIN = 'http://sandcast.test';
let browser;
let page;

const PAGE = `<!doctype html><html><body style="margin:0">
<div id="el" style="position:absolute;left:0;top:0;width:800px;height:600px;background:#222"></div>
<script type="module">
  import { attachInput, mapPointer } from '/viewer/src/input.js';
  const sent = [];
  const conn = { send: (m) => sent.push(m), onMessage: null };
  window.sent = sent;
  window.conn = conn;
  window.mapPointer = mapPointer;
  // A 1600x900 display letterboxed into 800x600: scale 0.5, 75 px bars top and bottom.
  window.detach = attachInput(document.getElementById('el'), conn, { displaySize: { width: 1600, height: 900 }, resizeDebounceMs: 50 });
  window.ready = true;
</script></body></html>`;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  page = await openPage(await browser.newContext({ viewport: { width: 1000, height: 700 } }));
});

/** The test page in a new page of `context`, its files served from the repository. */
async function openPage(context) {
  const p = await context.newPage();
  await p.route(`${ORIGIN}/**`, async (route) => {
    const path = new URL(route.request().url()).pathname;
    if (path === '/') return route.fulfill({ contentType: 'text/html', body: PAGE });
    const file = normalize(join(root, path));
    if (!file.startsWith(root)) return route.fulfill({ status: 403 });
    return route.fulfill({ contentType: 'text/javascript', body: await readFile(file, 'utf8') });
  });
  await p.goto(`${ORIGIN}/`);
  await p.waitForFunction(() => window.ready === true);
  return p;
}

/** The test page on an emulated touch screen, closed after test `t`. */
async function openTouchPage(t) {
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 700 }, hasTouch: true });
  t.after(() => ctx.close());
  return openPage(ctx);
}

after(async () => { await browser?.close(); });

const take = () => page.evaluate(() => window.sent.splice(0));
const until = (pred) => page.waitForFunction(pred, null, { timeout: 5000 });

test('the initial size is sent as a resize, debounced', async () => {
  await until(() => window.sent.some((m) => m.kind === 'resize'));
  const msgs = await take();
  assert.deepEqual(msgs.filter((m) => m.kind === 'resize'), [{ kind: 'resize', width: 800, height: 600 }]);
});

test('pointer positions map to display pixels through the letterbox', async () => {
  await page.mouse.move(400, 300);
  await page.mouse.move(10, 20); // in the top bar: outside the picture, not sent
  await page.mouse.move(799, 524);
  const moves = (await take()).filter((m) => m.kind === 'pointer_move');
  assert.deepEqual(moves.at(0), { kind: 'pointer_move', x: 800, y: 450 });
  assert.deepEqual(moves.at(-1), { kind: 'pointer_move', x: 1598, y: 898 });
  assert.ok(!moves.some((m) => m.y < 0 || m.y >= 900), JSON.stringify(moves));
});

test('buttons, right click and wheel (both axes)', async () => {
  await page.mouse.move(100, 100);
  await page.mouse.down({ button: 'left' });
  await page.mouse.up({ button: 'left' });
  await page.mouse.down({ button: 'right' });
  await page.mouse.up({ button: 'right' });
  await page.mouse.wheel(0, 120);
  await page.mouse.wheel(-40, 0);
  await until(() => window.sent.filter((m) => m.kind === 'wheel').length >= 2);
  const msgs = (await take()).filter((m) => m.kind !== 'pointer_move');
  assert.deepEqual(msgs, [
    { kind: 'pointer_button', button: 'left', down: true },
    { kind: 'pointer_button', button: 'left', down: false },
    { kind: 'pointer_button', button: 'right', down: true },
    { kind: 'pointer_button', button: 'right', down: false },
    { kind: 'wheel', dx: 0, dy: 120 },
    { kind: 'wheel', dx: -40, dy: 0 },
  ]);
});

test('keys carry code and key, and the host browser does not act on them', async () => {
  await page.mouse.click(200, 200);
  await take();
  const prevented = await page.evaluate(() => {
    const el = document.getElementById('el');
    const ev = new KeyboardEvent('keydown', { code: 'KeyW', key: 'w', ctrlKey: true, bubbles: true, cancelable: true });
    el.dispatchEvent(ev);
    return ev.defaultPrevented;
  });
  assert.equal(prevented, true, 'Ctrl+W goes to the remote, not the host');
  await page.keyboard.press('Shift+KeyA');
  const keys = (await take()).filter((m) => m.kind === 'key');
  assert.deepEqual(keys, [
    { kind: 'key', code: 'KeyW', key: 'w', down: true },
    { kind: 'key', code: 'ShiftLeft', key: 'Shift', down: true },
    { kind: 'key', code: 'KeyA', key: 'A', down: true },
    { kind: 'key', code: 'KeyA', key: 'A', down: false },
    { kind: 'key', code: 'ShiftLeft', key: 'Shift', down: false },
  ]);
});

test('paste sends the clipboard text; losing focus releases everything', async () => {
  await page.evaluate(() => {
    const dt = new DataTransfer();
    dt.setData('text/plain', 'pasted ✓');
    document.getElementById('el').dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true }));
    document.activeElement?.blur();
  });
  const msgs = await take();
  assert.deepEqual(msgs, [{ kind: 'clipboard', text: 'pasted ✓' }, { kind: 'release_all' }]);
});

test('Ctrl+V puts the local text on the remote clipboard before the V that pastes it', async () => {
  // The host clipboard gets its text from a real Ctrl+C (no permission needed).
  await page.evaluate(() => document.addEventListener('copy', (e) => {
    e.clipboardData.setData('text/plain', 'from the host');
    e.preventDefault();
  }, { once: true }));
  // Copy outside the viewer element, which would send Ctrl+C to the remote.
  await page.evaluate(() => document.activeElement?.blur());
  await page.keyboard.press('Control+KeyC');
  await page.focus('#el');
  await take();
  await page.keyboard.press('Control+KeyV');
  await until(() => window.sent.some((m) => m.code === 'ControlLeft' && !m.down));
  assert.deepEqual(await take(), [
    { kind: 'key', code: 'ControlLeft', key: 'Control', down: true },
    { kind: 'clipboard', text: 'from the host' },
    { kind: 'key', code: 'KeyV', key: 'v', down: true },
    { kind: 'key', code: 'KeyV', key: 'v', down: false },
    { kind: 'key', code: 'ControlLeft', key: 'Control', down: false },
  ]);
});

test('Ctrl+V with nothing to paste still pastes inside the remote, before Ctrl goes up', async () => {
  // A copy that leaves no text: the paste event (if any) carries none.
  await page.evaluate(() => document.addEventListener('copy', (e) => {
    e.clipboardData.setData('text/html', '<b>no text</b>');
    e.preventDefault();
  }, { once: true }));
  // Copy outside the viewer element, which would send Ctrl+C to the remote.
  await page.evaluate(() => document.activeElement?.blur());
  await page.keyboard.press('Control+KeyC');
  await page.focus('#el');
  await take();
  await page.keyboard.down('Control');
  await page.keyboard.down('KeyV');
  await page.keyboard.up('KeyV');
  await page.keyboard.up('Control');
  await until(() => window.sent.some((m) => m.code === 'ControlLeft' && !m.down));
  const msgs = await take();
  assert.deepEqual(msgs.filter((m) => m.kind === 'key'), [
    { kind: 'key', code: 'ControlLeft', key: 'Control', down: true },
    { kind: 'key', code: 'KeyV', key: 'v', down: true },
    { kind: 'key', code: 'KeyV', key: 'v', down: false },
    { kind: 'key', code: 'ControlLeft', key: 'Control', down: false },
  ]);
});

test('display_size messages change the mapping; resizing the element sends a resize', async () => {
  await page.evaluate(() => window.conn.onMessage({ kind: 'display_size', width: 800, height: 600 }));
  await page.mouse.move(100, 50);
  assert.deepEqual((await take()).filter((m) => m.kind === 'pointer_move').at(-1), { kind: 'pointer_move', x: 100, y: 50 });
  await page.evaluate(() => { document.getElementById('el').style.width = '640px'; document.getElementById('el').style.height = '480px'; });
  await until(() => window.sent.some((m) => m.kind === 'resize'));
  assert.deepEqual((await take()).filter((m) => m.kind === 'resize'), [{ kind: 'resize', width: 640, height: 480 }]);
});

test('detaching stops capture', async () => {
  await page.evaluate(() => window.detach());
  await page.mouse.move(300, 300);
  await page.mouse.click(300, 300);
  assert.deepEqual(await take(), []);
});

// The keyboard text area: text that comes without keys.
test('text without keys (insertText, an input method, a dead key) is sent as text, once', async () => {
  await page.goto(`${ORIGIN}/`);
  await page.waitForFunction(() => window.ready === true);
  await page.mouse.click(300, 300);
  await take();
  const cdp = await page.context().newCDPSession(page);
  // Dictation, an on-screen keyboard, automation: text, no key events.
  await cdp.send('Input.insertText', { text: 'Grüße 😀' });
  // An input method: intermediate states stay local, the commit goes once.
  for (const text of ['n', 'ni', '你']) await cdp.send('Input.imeSetComposition', { text, selectionStart: text.length, selectionEnd: text.length });
  await cdp.send('Input.insertText', { text: '你好' });
  // A dead key is not a key of its own; its composition commits the result.
  await cdp.send('Input.dispatchKeyEvent', { type: 'rawKeyDown', key: 'Dead', code: 'BracketLeft' });
  await cdp.send('Input.dispatchKeyEvent', { type: 'keyUp', key: 'Dead', code: 'BracketLeft' });
  await cdp.send('Input.imeSetComposition', { text: '´', selectionStart: 1, selectionEnd: 1 });
  await cdp.send('Input.insertText', { text: 'é' });
  await until(() => window.sent.filter((m) => m.kind === 'text').length === 3);
  assert.deepEqual((await take()).filter((m) => m.kind !== 'resize'), [
    { kind: 'text', text: 'Grüße 😀' },
    { kind: 'text', text: '你好' },
    { kind: 'text', text: 'é' },
  ]);
  // Nothing stays behind in the text area for the next composition.
  assert.equal(await page.evaluate(() => document.querySelector('textarea.sandcast-keyboard').value), '');
});

test('an on-screen keyboard\'s Enter and Backspace without key events arrive as keys', async () => {
  await page.mouse.click(300, 300);
  await take();
  await page.evaluate(() => {
    const sink = document.querySelector('textarea.sandcast-keyboard');
    for (const inputType of ['deleteContentBackward', 'insertLineBreak']) {
      sink.dispatchEvent(new InputEvent('beforeinput', { inputType, bubbles: true, cancelable: true }));
    }
  });
  assert.deepEqual(await take(), [
    { kind: 'key', code: 'Backspace', key: 'Backspace', down: true },
    { kind: 'key', code: 'Backspace', key: 'Backspace', down: false },
    { kind: 'key', code: 'Enter', key: 'Enter', down: true },
    { kind: 'key', code: 'Enter', key: 'Enter', down: false },
  ]);
});

test('long text goes in pieces within the protocol limit, never inside a character', async () => {
  const pieces = await page.evaluate(async () => {
    const { textPieces } = await import('/viewer/src/input.js');
    return textPieces('a😀'.repeat(5), 5);
  });
  assert.deepEqual(pieces, ['a😀', 'a😀', 'a😀', 'a😀', 'a😀']);
});

test('touch: a tap clicks, a drag scrolls, a long press right-clicks, a pinch zooms the local view', async (t) => {
  const p = await openTouchPage(t);
  const cdp = await p.context().newCDPSession(p);
  const touch = (type, points) => cdp.send('Input.dispatchTouchEvent', { type, touchPoints: points.map(([x, y], id) => ({ x, y, id })) });
  const sent = () => p.evaluate(() => window.sent.splice(0).filter((m) => m.kind !== 'resize'));
  const buttons = (msgs) => msgs.filter((m) => m.kind === 'pointer_button').map((m) => `${m.button}${m.down ? '↓' : '↑'}`);

  // A tap at (400, 300): display pixel (800, 450) of the 1600x900 display.
  await p.touchscreen.tap(400, 300);
  await p.waitForFunction(() => window.sent.some((m) => m.kind === 'pointer_button' && !m.down));
  let msgs = await sent();
  assert.deepEqual(buttons(msgs), ['left↓', 'left↑']);
  assert.deepEqual(msgs.find((m) => m.kind === 'pointer_move'), { kind: 'pointer_move', x: 800, y: 450 });

  // A finger going up 100 px scrolls the page down by 200 display pixels,
  // with no button pressed.
  await touch('touchStart', [[400, 400]]);
  for (let y = 380; y >= 300; y -= 20) await touch('touchMove', [[400, y]]);
  await touch('touchEnd', []);
  msgs = await sent();
  assert.deepEqual(buttons(msgs), []);
  const wheel = msgs.filter((m) => m.kind === 'wheel').reduce((a, m) => ({ dx: a.dx + m.dx, dy: a.dy + m.dy }), { dx: 0, dy: 0 });
  assert.deepEqual(wheel, { dx: 0, dy: 200 });

  // A long press is a right click.
  await touch('touchStart', [[300, 300]]);
  await p.waitForFunction(() => window.sent.some((m) => m.kind === 'pointer_button' && m.button === 'right' && !m.down), null, { timeout: 5000 });
  await touch('touchEnd', []);
  assert.deepEqual(buttons(await sent()), ['right↓', 'right↑']);

  // Two fingers moving apart zoom the local view, and send nothing.
  await touch('touchStart', [[350, 300], [450, 300]]);
  await touch('touchMove', [[300, 300], [500, 300]]);
  await touch('touchEnd', []);
  assert.match(await p.evaluate(() => document.getElementById('el').style.transform), /scale\(2\)/);
  assert.deepEqual(buttons(await sent()), []);
});

test('the remote focus places the keyboard at the remote field and, after a touch, asks for the on-screen keyboard', async (t) => {
  const p = await openTouchPage(t);
  const sink = () => p.evaluate(() => {
    const s = document.querySelector('textarea.sandcast-keyboard');
    return { mode: s.inputMode, left: s.style.left, top: s.style.top, focused: document.activeElement === s };
  });
  // A tap where nothing editable has the focus: no on-screen keyboard.
  await p.touchscreen.tap(400, 300);
  assert.equal((await sink()).mode, 'none');
  // The session says a field at display pixel (800, 450) has the focus:
  // client (400, 300) on this 1600x900 display letterboxed into 800x600.
  await p.evaluate(() => window.conn.onMessage({ kind: 'focus', editable: true, x: 800, y: 450 }));
  assert.deepEqual(await sink(), { mode: 'text', left: '400px', top: '300px', focused: true });
  await p.evaluate(() => window.conn.onMessage({ kind: 'focus', editable: false }));
  assert.equal((await sink()).mode, 'none');
  // With a mouse, the on-screen keyboard is not the viewer's business.
  await p.mouse.click(400, 300);
  await p.evaluate(() => window.conn.onMessage({ kind: 'focus', editable: true, x: 0, y: 0 }));
  assert.equal((await sink()).mode, '');
});
