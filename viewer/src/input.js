// sandcast viewer: capture input on an element and send it to the session.
//
//   const detach = attachInput(videoElement, connection, { displaySize: { width: 1280, height: 720 } });
//
// Pointer positions are mapped to remote display pixels, allowing for the
// letterboxing of `object-fit: contain`. The display size follows
// `display_size` messages from the server. Options:
//   displaySize   initial remote size (else the video's intrinsic size)
//   resize        send the element's size as the wanted display size (default true)
//   resizeDebounceMs  (default 250)
//   clipboard     mirror the remote clipboard into the local one (default true)

const BUTTONS = ['left', 'middle', 'right', 'back', 'forward'];
const LINE_PX = 16;

/** Maps a client position to remote pixels; null when outside the picture. */
export function mapPointer(clientX, clientY, rect, display) {
  const { width: dw, height: dh } = display;
  if (!dw || !dh || rect.width <= 0 || rect.height <= 0) return null;
  const scale = Math.min(rect.width / dw, rect.height / dh);
  const offX = (rect.width - dw * scale) / 2;
  const offY = (rect.height - dh * scale) / 2;
  const x = Math.floor((clientX - rect.left - offX) / scale);
  const y = Math.floor((clientY - rect.top - offY) / scale);
  if (x < 0 || y < 0 || x >= dw || y >= dh) return null;
  return { x, y };
}

/** Converts a WheelEvent's deltas to whole pixels, keeping the remainder. */
export function wheelPixels(ev, pageHeight, carry) {
  const unit = ev.deltaMode === 1 ? LINE_PX : ev.deltaMode === 2 ? pageHeight : 1;
  carry.x += ev.deltaX * unit;
  carry.y += ev.deltaY * unit;
  const dx = Math.trunc(carry.x);
  const dy = Math.trunc(carry.y);
  carry.x -= dx;
  carry.y -= dy;
  return { dx, dy };
}

/** How long V of Ctrl+V waits for the browser's paste event. */
const PASTE_WAIT_MS = 150;

/** Ctrl/Cmd+V (not with Alt): the host browser pastes, then the remote does. */
export function isPasteShortcut(ev) {
  return (ev.ctrlKey || ev.metaKey) && !ev.altKey && ev.code === 'KeyV';
}

/** Keys the host browser keeps: paste (so the paste event fires) and devtools. */
export function keepsLocal(ev) {
  return isPasteShortcut(ev) || ev.code === 'F12';
}

/** Starts capturing; returns a function that stops it. */
export function attachInput(element, connection, options = {}) {
  const opts = { resize: true, resizeDebounceMs: 250, clipboard: true, ...options };
  let display = opts.displaySize ?? null;
  const carry = { x: 0, y: 0 };
  const send = (obj) => connection.send(obj);
  const cleanups = [];
  const on = (target, type, fn, o) => {
    target.addEventListener(type, fn, o);
    cleanups.push(() => target.removeEventListener(type, fn, o));
  };
  const currentDisplay = () => display
    ?? (element.videoWidth ? { width: element.videoWidth, height: element.videoHeight } : null);

  if (!element.hasAttribute('tabindex')) element.tabIndex = 0;
  element.style.touchAction = 'none';

  const prevOnMessage = connection.onMessage;
  connection.onMessage = (msg) => {
    if (msg && msg.kind === 'display_size') display = { width: msg.width, height: msg.height };
    if (msg && msg.kind === 'clipboard' && opts.clipboard && navigator.clipboard?.writeText) {
      navigator.clipboard.writeText(msg.text).catch(() => { /* not permitted without focus */ });
    }
    if (prevOnMessage) prevOnMessage(msg);
  };
  cleanups.push(() => { connection.onMessage = prevOnMessage; });

  const move = (ev) => {
    const d = currentDisplay();
    if (!d) return;
    const p = mapPointer(ev.clientX, ev.clientY, element.getBoundingClientRect(), d);
    if (p) send({ kind: 'pointer_move', x: p.x, y: p.y });
  };
  on(element, 'pointermove', move);
  on(element, 'pointerdown', (ev) => {
    element.focus({ preventScroll: true });
    try { element.setPointerCapture(ev.pointerId); } catch (_) { /* synthetic events */ }
    move(ev);
    const button = BUTTONS[ev.button];
    if (button) send({ kind: 'pointer_button', button, down: true });
    ev.preventDefault();
  });
  on(element, 'pointerup', (ev) => {
    move(ev);
    const button = BUTTONS[ev.button];
    if (button) send({ kind: 'pointer_button', button, down: false });
    ev.preventDefault();
  });
  on(element, 'contextmenu', (ev) => ev.preventDefault());
  on(element, 'wheel', (ev) => {
    const { dx, dy } = wheelPixels(ev, element.clientHeight || 600, carry);
    if (dx || dy) send({ kind: 'wheel', dx, dy });
    ev.preventDefault();
  }, { passive: false });

  // Paste: the V of Ctrl/Cmd+V waits for the browser's "paste" event, so the
  // remote clipboard holds the local text before the remote app pastes it
  // (both travel on the same ordered channel). Without a paste event (no
  // text on the local clipboard) V goes on alone after a moment, so a copy
  // and paste inside the remote still works.
  let pasteTimer = null;
  let vHeldForPaste = false;
  const typeV = () => {
    send({ kind: 'key', code: 'KeyV', key: 'v', down: true });
    send({ kind: 'key', code: 'KeyV', key: 'v', down: false });
  };
  cleanups.push(() => clearTimeout(pasteTimer));
  on(element, 'keydown', (ev) => {
    if (ev.isComposing) return;
    if (isPasteShortcut(ev)) {
      vHeldForPaste = true;
      clearTimeout(pasteTimer);
      pasteTimer = setTimeout(() => { pasteTimer = null; typeV(); }, PASTE_WAIT_MS);
      return;
    }
    send({ kind: 'key', code: ev.code || ev.key, key: ev.key, down: true });
    if (!keepsLocal(ev)) ev.preventDefault();
  });
  on(element, 'keyup', (ev) => {
    if (ev.isComposing) return;
    // No paste event yet and a key goes up (Ctrl, say): V goes first, while
    // the remote still holds Ctrl down.
    if (pasteTimer !== null) {
      clearTimeout(pasteTimer);
      pasteTimer = null;
      typeV();
    }
    if (ev.code === 'KeyV' && vHeldForPaste) {
      // Its down and up went (or go) out with the paste.
      vHeldForPaste = false;
      return;
    }
    send({ kind: 'key', code: ev.code || ev.key, key: ev.key, down: false });
    if (!keepsLocal(ev)) ev.preventDefault();
  });
  // Input methods and dead keys end in composed text.
  on(element, 'compositionend', (ev) => { if (ev.data) send({ kind: 'text', text: ev.data }); });
  on(element, 'paste', (ev) => {
    const text = ev.clipboardData?.getData('text/plain');
    if (text) send({ kind: 'clipboard', text });
    if (pasteTimer !== null) {
      clearTimeout(pasteTimer);
      pasteTimer = null;
      typeV();
    }
    ev.preventDefault();
  });
  on(element, 'blur', () => send({ kind: 'release_all' }));

  // Keyboard Lock: in fullscreen, shortcuts such as Ctrl+W go to the remote.
  on(document, 'fullscreenchange', () => {
    const kb = navigator.keyboard;
    if (!kb?.lock) return;
    if (document.fullscreenElement && document.fullscreenElement.contains(element)) {
      kb.lock().catch(() => { /* not allowed here */ });
    } else {
      kb.unlock();
    }
  });

  if (opts.resize && typeof ResizeObserver !== 'undefined') {
    let timer;
    let last = '';
    const ro = new ResizeObserver((entries) => {
      const box = entries[entries.length - 1].contentRect;
      clearTimeout(timer);
      timer = setTimeout(() => {
        const width = Math.max(200, Math.min(3840, Math.round(box.width / 2) * 2));
        const height = Math.max(200, Math.min(2160, Math.round(box.height / 2) * 2));
        const key = `${width}x${height}`;
        if (key !== last) {
          last = key;
          send({ kind: 'resize', width, height });
        }
      }, opts.resizeDebounceMs);
    });
    ro.observe(element);
    cleanups.push(() => { clearTimeout(timer); ro.disconnect(); });
  }

  return () => cleanups.splice(0).forEach((f) => f());
}
