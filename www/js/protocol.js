// The WebSocket connection: connect, automatic reconnect with exponential backoff and jitter,
// a queue for frames sent while offline (flushed once the session is authenticated again).
// It knows protocol v1 only as far as "JSON text frames with a type"; the app does the rest.

export function wsUrl(loc = globalThis.location) {
  return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}/ws`;
}

/** Delay before reconnect attempt `n` (0-based): exponential, capped, with "equal jitter". */
export function backoffDelay(n, { base = 500, max = 15000, random = Math.random } = {}) {
  const d = Math.min(max, base * 2 ** Math.min(n, 16));
  return Math.round(d / 2 + random() * (d / 2));
}

let refCounter = 0;
const refPrefix = Math.random().toString(36).slice(2, 8);

/** A fresh client `ref`. Message refs must be unique for this user across tabs and reloads. */
export function newRef(kind = 'r') {
  refCounter += 1;
  if (kind === 'm' && globalThis.crypto?.randomUUID) return `m-${crypto.randomUUID()}`;
  return `${kind}-${refPrefix}-${Date.now().toString(36)}-${refCounter}`;
}

/**
 * Events (CustomEvent, detail):
 *   'status'  {state, attempt, retryAt}  state: connecting | open | ready | waiting | stopped
 *   'open'    {}                       the socket is open (not yet authenticated)
 *   'frame'   {frame}                  a parsed server frame
 *   'close'   {code, reason}
 */
export class Connection extends EventTarget {
  constructor(url, opts = {}) {
    super();
    this.url = url;
    this.opts = opts;
    this.ws = null;
    this.state = 'stopped';
    this.attempt = 0;
    this.timer = null;
    this.queue = [];
    this.retryAt = 0;
    this.onOnline = () => { if (this.state === 'waiting') this.retryNow(); };
    globalThis.addEventListener?.('online', this.onOnline);
  }

  emit(type, detail = {}) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  setState(state) {
    this.state = state;
    this.emit('status', { state, attempt: this.attempt, retryAt: this.retryAt });
  }

  start() {
    if (this.state !== 'stopped' && this.state !== 'waiting') return;
    clearTimeout(this.timer);
    this.setState('connecting');
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.setState('open');
      this.emit('open');
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws || typeof ev.data !== 'string') return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; }
      if (frame && typeof frame.type === 'string') this.emit('frame', { frame });
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.emit('close', { code: ev.code, reason: ev.reason });
      if (this.state !== 'stopped') this.scheduleReconnect();
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  scheduleReconnect(delay) {
    clearTimeout(this.timer);
    const d = delay ?? backoffDelay(this.attempt, this.opts);
    this.attempt += 1;
    this.retryAt = Date.now() + d;
    this.setState('waiting');
    this.timer = setTimeout(() => { this.state = 'waiting'; this.start(); }, d);
  }

  /** Reconnect at once (the "Reconnect now" button, or the browser came back online). */
  retryNow() {
    if (this.state === 'waiting') {
      clearTimeout(this.timer);
      this.start();
    }
  }

  /** The app authenticated the socket: reset the backoff and flush frames queued meanwhile. */
  markReady() {
    this.attempt = 0;
    this.setState('ready');
    const q = this.queue;
    this.queue = [];
    q.forEach((f) => this.sendNow(f));
  }

  get isOpen() { return this.ws && this.ws.readyState === WebSocket.OPEN; }
  get isReady() { return this.state === 'ready' && this.isOpen; }

  /** Sends on the open socket now, whatever the auth state (used for register/login/resume). */
  sendNow(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Sends once authenticated; queues while not. */
  send(frame) {
    if (this.isReady) return this.sendNow(frame);
    this.queue.push(frame);
    return false;
  }

  /** Drops queued frames (e.g. at logout). */
  clearQueue() { this.queue = []; }

  /** Closes the socket and reconnects right away (used after logout to get a fresh session). */
  restart() {
    const ws = this.ws;
    this.ws = null;
    if (ws) { try { ws.close(1000); } catch { /* ignore */ } }
    this.state = 'stopped';
    this.start();
  }

  stop() {
    clearTimeout(this.timer);
    this.state = 'stopped';
    const ws = this.ws;
    this.ws = null;
    if (ws) { try { ws.close(1000); } catch { /* ignore */ } }
    this.setState('stopped');
  }
}
