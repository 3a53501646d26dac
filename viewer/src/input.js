// sandcast viewer: capture input on an element and send it to the session.
//
//   const detach = attachInput(videoElement, connection, { displaySize: { width: 1280, height: 720 } });
//
// Pointer positions are mapped to remote display pixels, allowing for the
// letterboxing of `object-fit: contain`. The display size follows
// `display_size` messages from the server. Options:
//   displaySize   initial remote size (else the video's intrinsic size)
//   display       a function giving the remote size, when displaySize and the
//                 element cannot (noVNC's canvas)
//   keyboardHost  where the hidden keyboard text area goes (default: the
//                 element's parent)
//   resize        send the element's size as the wanted display size (default true)
//   resizeDebounceMs  (default 250)
//   clipboard     mirror the remote clipboard into the local one (default true)
//   touch         what a one-finger drag does: "scroll" (default) or "drag"

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

/** Maps a remote display pixel to a client position (the inverse of `mapPointer`). */
export function displayToClient(x, y, rect, display) {
  const { width: dw, height: dh } = display;
  if (!dw || !dh || rect.width <= 0 || rect.height <= 0) return null;
  const scale = Math.min(rect.width / dw, rect.height / dh);
  return {
    x: rect.left + (rect.width - dw * scale) / 2 + x * scale,
    y: rect.top + (rect.height - dh * scale) / 2 + y * scale,
  };
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

/** Editing commands a keyboard without key events (an on-screen one) sends, as keys. */
const EDITS = {
  insertLineBreak: { code: 'Enter', key: 'Enter' },
  insertParagraph: { code: 'Enter', key: 'Enter' },
  deleteContentBackward: { code: 'Backspace', key: 'Backspace' },
  deleteContentForward: { code: 'Delete', key: 'Delete' },
};

/** Longest text one message carries, in UTF-8 bytes (the protocol's limit is 64 KiB). */
export const MAX_TEXT_BYTES = 60 * 1024;

/** Splits text into pieces of at most `max` UTF-8 bytes, never inside a character. */
export function textPieces(text, max = MAX_TEXT_BYTES) {
  const utf8 = new TextEncoder();
  const out = [];
  let piece = '';
  let bytes = 0;
  for (const ch of text) {
    const n = utf8.encode(ch).length;
    if (bytes + n > max && piece) {
      out.push(piece);
      piece = '';
      bytes = 0;
    }
    piece += ch;
    bytes += n;
  }
  if (piece) out.push(piece);
  return out;
}

/** The hidden text area that receives the keyboard, or null without a place for it. */
function keyboardSink(element, host) {
  if (!host || typeof document === 'undefined') return null;
  const sink = document.createElement('textarea');
  sink.className = 'sandcast-keyboard';
  sink.setAttribute('part', 'keyboard');
  sink.setAttribute('aria-label', 'remote keyboard');
  for (const [k, v] of Object.entries({ autocapitalize: 'off', autocomplete: 'off', autocorrect: 'off', spellcheck: 'false' })) {
    sink.setAttribute(k, v);
  }
  Object.assign(sink.style, {
    position: 'absolute', left: '0px', top: '0px', width: '2px', height: '1.2em', padding: '0', border: '0',
    margin: '0', opacity: '0', resize: 'none', overflow: 'hidden', zIndex: '2', pointerEvents: 'none',
    caretColor: 'transparent', background: 'transparent', color: 'transparent', fontSize: '16px', outline: 'none',
  });
  host.appendChild(sink);
  return sink;
}

/** Moves the text area to a client position (relative to its host). */
function placeSink(sink, element, clientX, clientY) {
  const host = sink.offsetParent ?? sink.parentNode;
  const base = host?.getBoundingClientRect?.() ?? element.getBoundingClientRect();
  sink.style.left = `${Math.max(0, Math.round(clientX - base.left))}px`;
  sink.style.top = `${Math.max(0, Math.round(clientY - base.top))}px`;
}

/** Finger travel (CSS px) under which a touch is a tap, not a drag. */
export const TAP_SLOP_PX = 10;
/** A touch held this long without moving is a right click. */
export const LONG_PRESS_MS = 500;
/** Largest local zoom a pinch gives. */
export const MAX_ZOOM = 4;

/**
 * Touch: a tap clicks, a drag scrolls the remote page (mode "scroll") or
 * drags with the left button (mode "drag"), a long press right-clicks, and
 * a pinch zooms the local view (the remote display keeps its size).
 */
function attachTouch(element, { on, send, moveTo, at, mode, cleanups }) {
  const fingers = new Map();
  let one = null; // the single finger's gesture
  let pinch = null;
  let zoom = 1;
  const click = (button) => {
    send({ kind: 'pointer_button', button, down: true });
    send({ kind: 'pointer_button', button, down: false });
  };
  const endOne = () => {
    if (!one) return;
    clearTimeout(one.timer);
    if (one.moved && mode === 'drag') send({ kind: 'pointer_button', button: 'left', down: false });
    one = null;
  };
  cleanups.push(endOne);
  const setZoom = (z, cx, cy) => {
    zoom = Math.max(1, Math.min(MAX_ZOOM, z));
    const r = element.getBoundingClientRect();
    const s = zoom === 1 ? '' : `scale(${zoom})`;
    if (zoom !== 1 && !element.style.transform) {
      // The pinch's centre stays under the fingers.
      element.style.transformOrigin = `${cx - r.left}px ${cy - r.top}px`;
    }
    element.style.transform = s;
  };
  cleanups.push(() => { element.style.transform = ''; });
  on(element, 'pointerdown', (ev) => {
    if (ev.pointerType !== 'touch') return;
    ev.preventDefault();
    fingers.set(ev.pointerId, { x: ev.clientX, y: ev.clientY });
    if (fingers.size === 2) {
      endOne();
      const [a, b] = [...fingers.values()];
      pinch = { d0: Math.hypot(a.x - b.x, a.y - b.y) || 1, z0: zoom };
      return;
    }
    if (fingers.size > 2 || pinch) return;
    one = { id: ev.pointerId, x0: ev.clientX, y0: ev.clientY, x: ev.clientX, y: ev.clientY, moved: false, long: false, carry: { x: 0, y: 0 } };
    one.timer = setTimeout(() => {
      if (!one || one.moved || !moveTo(one.x0, one.y0)) return;
      one.long = true;
      click('right');
    }, LONG_PRESS_MS);
  });
  on(element, 'pointermove', (ev) => {
    if (ev.pointerType !== 'touch' || !fingers.has(ev.pointerId)) return;
    fingers.set(ev.pointerId, { x: ev.clientX, y: ev.clientY });
    if (pinch && fingers.size === 2) {
      const [a, b] = [...fingers.values()];
      setZoom(pinch.z0 * Math.hypot(a.x - b.x, a.y - b.y) / pinch.d0, (a.x + b.x) / 2, (a.y + b.y) / 2);
      return;
    }
    if (!one || one.id !== ev.pointerId || one.long) return;
    if (!one.moved && Math.hypot(ev.clientX - one.x0, ev.clientY - one.y0) >= TAP_SLOP_PX) {
      one.moved = true;
      clearTimeout(one.timer);
      if (mode === 'drag' && moveTo(one.x0, one.y0)) send({ kind: 'pointer_button', button: 'left', down: true });
    }
    if (one.moved) {
      if (mode === 'drag') {
        moveTo(ev.clientX, ev.clientY);
      } else {
        // Content follows the finger: a finger going up scrolls down, by
        // as many remote pixels as the finger travelled over the picture.
        const p0 = at(one.x, one.y);
        const p1 = at(ev.clientX, ev.clientY);
        if (p0 && p1) {
          one.carry.x += p0.x - p1.x;
          one.carry.y += p0.y - p1.y;
          const dx = Math.trunc(one.carry.x);
          const dy = Math.trunc(one.carry.y);
          one.carry.x -= dx;
          one.carry.y -= dy;
          if (dx || dy) {
            moveTo(one.x0, one.y0);
            send({ kind: 'wheel', dx, dy });
          }
        }
      }
    }
    one.x = ev.clientX;
    one.y = ev.clientY;
  });
  const up = (ev) => {
    if (ev.pointerType !== 'touch' || !fingers.delete(ev.pointerId)) return;
    ev.preventDefault();
    if (pinch) {
      if (fingers.size === 0) pinch = null;
      return;
    }
    if (one && one.id === ev.pointerId) {
      if (ev.type === 'pointerup' && !one.moved && !one.long && moveTo(one.x0, one.y0)) click('left');
      endOne();
    }
  };
  on(element, 'pointerup', up);
  on(element, 'pointercancel', up);
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
    ?? opts.display?.()
    ?? (element.videoWidth ? { width: element.videoWidth, height: element.videoHeight } : null);

  if (!element.hasAttribute('tabindex')) element.tabIndex = 0;
  element.style.touchAction = 'none';

  const prevOnMessage = connection.onMessage;
  let onFocusMessage = null;
  connection.onMessage = (msg) => {
    if (msg && msg.kind === 'display_size') display = { width: msg.width, height: msg.height };
    if (msg && msg.kind === 'focus' && onFocusMessage) onFocusMessage(msg);
    if (msg && msg.kind === 'clipboard' && opts.clipboard && navigator.clipboard?.writeText) {
      navigator.clipboard.writeText(msg.text).catch(() => { /* not permitted without focus */ });
    }
    if (prevOnMessage) prevOnMessage(msg);
  };
  cleanups.push(() => { connection.onMessage = prevOnMessage; });

  const at = (x, y) => {
    const d = currentDisplay();
    return d ? mapPointer(x, y, element.getBoundingClientRect(), d) : null;
  };
  const moveTo = (x, y) => {
    const p = at(x, y);
    if (p) send({ kind: 'pointer_move', x: p.x, y: p.y });
    return p;
  };
  const move = (ev) => moveTo(ev.clientX, ev.clientY);
  const isTouch = (ev) => ev.pointerType === 'touch';
  on(element, 'pointermove', (ev) => { if (!isTouch(ev)) move(ev); });
  on(element, 'pointerdown', (ev) => {
    if (isTouch(ev)) return;
    try { element.setPointerCapture(ev.pointerId); } catch (_) { /* synthetic events */ }
    move(ev);
    const button = BUTTONS[ev.button];
    if (button) send({ kind: 'pointer_button', button, down: true });
    ev.preventDefault();
  });
  on(element, 'pointerup', (ev) => {
    if (isTouch(ev)) return;
    move(ev);
    const button = BUTTONS[ev.button];
    if (button) send({ kind: 'pointer_button', button, down: false });
    ev.preventDefault();
  });
  attachTouch(element, { on, send, moveTo, at, mode: opts.touch ?? 'scroll', cleanups });
  on(element, 'contextmenu', (ev) => ev.preventDefault());
  on(element, 'wheel', (ev) => {
    const { dx, dy } = wheelPixels(ev, element.clientHeight || 600, carry);
    if (dx || dy) send({ kind: 'wheel', dx, dy });
    ev.preventDefault();
  }, { passive: false });

  // The keyboard: a hidden text area over the picture holds the focus, so
  // the host browser delivers text that comes without keys (input methods,
  // dictation, on-screen keyboards, dead keys) as editing events there. It
  // sits where the pointer last went down, where the remote caret usually
  // is, so an input method's window opens next to it.
  const sink = keyboardSink(element, opts.keyboardHost ?? element.parentNode);
  const targets = sink ? [element, sink] : [element];
  const focusKeyboard = () => (sink ?? element).focus({ preventScroll: true });
  if (sink) {
    on(element, 'focus', focusKeyboard);
    on(element, 'pointerdown', (ev) => {
      placeSink(sink, element, ev.clientX, ev.clientY);
      // On a touch screen the on-screen keyboard opens only while the
      // remote page has an editable element focused (the session reports
      // it); elsewhere a tap should not cover half the screen with it.
      touchLast = ev.pointerType === 'touch';
      if (touchLast) sink.inputMode = remoteEditable ? 'text' : 'none';
      else sink.removeAttribute('inputmode');
    });
  }
  on(element, 'pointerdown', focusKeyboard);
  let touchLast = false;
  let remoteEditable = false;
  // The remote page's focus: an editable element focused opens a touch
  // screen's keyboard and puts the text area (and so an input method's
  // window) at the element.
  onFocusMessage = (msg) => {
    remoteEditable = msg.editable === true;
    if (!sink) return;
    const d = currentDisplay();
    if (remoteEditable && Number.isFinite(msg.x) && Number.isFinite(msg.y) && d) {
      const p = displayToClient(msg.x, msg.y, element.getBoundingClientRect(), d);
      if (p) placeSink(sink, element, p.x, p.y);
    }
    if (touchLast) {
      sink.inputMode = remoteEditable ? 'text' : 'none';
      if (remoteEditable && document.activeElement !== sink && sink.getRootNode().activeElement !== sink) focusKeyboard();
    }
  };

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
  // Codes whose press went to the remote: only their releases follow.
  const down = new Set();
  let composing = false;
  const sendText = (text) => {
    // Text events are bounded by the protocol; longer text goes in pieces
    // that never split a character.
    for (const piece of textPieces(text)) send({ kind: 'text', text: piece });
  };
  const clearSink = () => { if (sink && !composing) sink.value = ''; };
  for (const target of targets) {
    on(target, 'keydown', (ev) => {
      // An input method or a dead key is composing: its result comes as
      // text when the composition ends.
      if (ev.isComposing || composing || ev.keyCode === 229 || ev.key === 'Process') return;
      if (ev.key === 'Dead') return;
      if (isPasteShortcut(ev)) {
        vHeldForPaste = true;
        clearTimeout(pasteTimer);
        pasteTimer = setTimeout(() => { pasteTimer = null; typeV(); }, PASTE_WAIT_MS);
        return;
      }
      const code = ev.code || ev.key;
      down.add(code);
      send({ kind: 'key', code, key: ev.key, down: true });
      if (!keepsLocal(ev)) ev.preventDefault();
    });
    on(target, 'keyup', (ev) => {
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
      const code = ev.code || ev.key;
      if (!down.delete(code)) return;
      send({ kind: 'key', code, key: ev.key, down: false });
      if (!keepsLocal(ev)) ev.preventDefault();
    });
    on(target, 'compositionstart', () => { composing = true; });
    // Input methods and dead keys end in composed text, sent once.
    on(target, 'compositionend', (ev) => {
      composing = false;
      if (ev.data) sendText(ev.data);
      clearSink();
    });
    // Text without keys: dictation, on-screen keyboards, an input method
    // that commits without composing, automation's insertText.
    on(target, 'beforeinput', (ev) => {
      if (ev.isComposing || composing) return;
      const edit = EDITS[ev.inputType];
      if (ev.inputType === 'insertText' || ev.inputType === 'insertReplacementText') {
        const text = ev.data ?? ev.dataTransfer?.getData('text/plain');
        if (text) sendText(text);
      } else if (edit) {
        send({ kind: 'key', code: edit.code, key: edit.key, down: true });
        send({ kind: 'key', code: edit.code, key: edit.key, down: false });
      } else if (ev.inputType === 'insertFromPaste') {
        return; // the paste event below handles it
      }
      ev.preventDefault();
    });
    on(target, 'input', clearSink);
    on(target, 'paste', (ev) => {
      const text = ev.clipboardData?.getData('text/plain');
      if (text) send({ kind: 'clipboard', text });
      if (pasteTimer !== null) {
        clearTimeout(pasteTimer);
        pasteTimer = null;
        typeV();
      }
      ev.preventDefault();
    });
    on(target, 'blur', (ev) => {
      if (targets.includes(ev.relatedTarget)) return;
      composing = false;
      down.clear();
      clearSink();
      send({ kind: 'release_all' });
    });
  }
  // Removed after its listeners: detaching sends nothing.
  if (sink) cleanups.push(() => sink.remove());

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
