// Parlor browser client: the app controller. Speaks protocol v1 (docs/PROTOCOL.md) over /ws,
// keeps the state in store.js shapes, and asks ui.js to draw it.

import { Connection, wsUrl, newRef } from './protocol.js';
import {
  roomKey, dmKey, lc, keyOfMessage, newConv, addMessages, lastId, firstId, setTyping,
  clearMessages, applyEdit, applyDelete, applyReaction, hasReacted, recountUnread,
} from './store.js';
import { parseCommand, HELP, ROOM_RE, USER_RE, normalizeRoom } from './commands.js';
import { loadPrefs, savePrefs, wantsAlert, store } from './prefs.js';
import { mentions, plainPreview } from './render.js';
import { chime, unlockAudio } from './sound.js';
import { UI } from './ui.js';

const PAGE = 50;
// The server forwards one `typing` per user and target per this long (its default
// `--typing-interval` of 2 s, plus a margin).
const SERVER_TYPING_INTERVAL = 2200;
const MAX_TEXT = 4000;
const DISABLED = 'This account has been disabled. Ask the server\u2019s administrator.';
// Frames that are events of the server's ordered log (they carry `seq`; see `catchup`).
const LOG_EVENTS = new Set(['message', 'edited', 'deleted', 'reaction']);

class App {
  constructor() {
    this.prefs = loadPrefs();
    this.me = null;            // {user, nick}
    this.convs = new Map();    // key → conv
    this.current = null;       // key
    this.users = new Map();    // lc(user) → {user, nick, online, last_seen}
    this.requests = new Map(); // ref → {kind, ...}
    this.lastTypingSent = new Map();
    this.typingAfterSend = new Map(); // key → true: a message went out since the last `typing`
    this.typingTimers = new Map();
    // Read state from the server (welcome.conversations): counts are the server's, and only
    // messages after the welcome (by `seq`) are counted here on top of them.
    this.serverCounts = false;
    this.welcomeSeq = null;
    this.readTimers = new Map();   // key → debounce timer of a `read` frame
    this.joinIntents = new Set(); // rooms the user asked to join (in case a reply lacks its ref)
    this.authPending = false;
    this.loggingOut = false;
    // Outbox: say/dm go out one at a time, in the order they were typed (`seq`), so that a
    // message refused with `rate_limited` and retried can never be overtaken by a later one.
    this.seq = 0;
    this.inflight = null;      // ref of the message sent and not yet acked or refused
    this.holdUntil = 0;        // after `rate_limited`: send nothing before this time
    this.rateStrikes = 0;      // consecutive `rate_limited` refusals (backoff grows with them)
    this.holdTimer = null;
    // A `resume` refused for a passing reason (e.g. `rate_limited`): the token is kept and
    // the resume is tried again at `authRetryAt`, with a growing delay.
    this.authRetries = 0;
    this.authRetryAt = 0;
    this.authTimer = null;
    // The server's event log: `evSeq` is the highest `seq` applied (null: none known yet, e.g.
    // before the first welcome). After a reconnect `catchup` asks for what came after it;
    // while that runs (`catching`), live log events wait in its buffer, to be applied after the
    // backlog so that everything applies in `seq` order.
    this.evSeq = null;
    this.catching = null;      // {buffer: [frames]} while a catch-up is under way
    this.catchupLimit = 500;   // events per `catchup` page
    this.conn = new Connection(wsUrl());
    this.ui = new UI(this);

    this.conn.addEventListener('status', (e) => this.ui.renderStatus(e.detail));
    this.conn.addEventListener('open', () => this.onOpen());
    this.conn.addEventListener('close', (e) => this.onClose(e.detail));
    this.conn.addEventListener('frame', (e) => this.onFrame(e.detail.frame));
    document.addEventListener('visibilitychange', () => this.onVisible());
    window.addEventListener('focus', () => this.onVisible());
    window.addEventListener('pagehide', () => this.flushReads());
    setInterval(() => this.tick(), 1000);
  }

  start() {
    const token = store.get('token');
    if (token) this.ui.showBooting();
    else this.ui.showLogin();
    this.conn.start();
    this.loadServerInfo();
  }

  // What the server tells before sign-in (GET /api/server): whether accounts can be created.
  async loadServerInfo() {
    try {
      const r = await fetch('/api/server', { cache: 'no-store' });
      if (!r.ok) return;
      const info = await r.json();
      this.ui.setRegistrationOpen(info.registration !== 'closed');
    } catch {
      // An older server without the endpoint: keep the form as it is.
    }
  }

  // ---------- connection lifecycle ----------

  onOpen() {
    if (this.pendingAuth) {
      const { frame, info } = this.pendingAuth;
      this.pendingAuth = null;
      this.request(frame, info, true);
      return;
    }
    if (!this.resume()) {
      this.ui.showLogin();
      this.ui.loginStatus('');
    }
  }

  /** Sends `resume` with the stored token, if there is one; false if there is none. */
  resume() {
    clearTimeout(this.authTimer);
    this.authTimer = null;
    this.authRetryAt = 0;
    const token = store.get('token');
    if (!token || this.loggingOut) return false;
    this.authPending = true;
    this.request({ type: 'resume', token }, { kind: 'auth', how: 'resume' }, true);
    this.ui.renderStatus();
    return true;
  }

  /** The server refused `resume` for a passing reason: keep the token, try again later. */
  retryResumeLater(code) {
    this.authRetries += 1;
    // 2 s, 4 s, 8 s, … up to a minute, with some jitter so that many tabs don't stampede.
    const d = Math.min(60000, 2000 * 2 ** Math.min(this.authRetries - 1, 5));
    const delay = Math.round(d * (0.75 + Math.random() * 0.25));
    this.authRetryAt = Date.now() + delay;
    this.authRetryCode = code;
    clearTimeout(this.authTimer);
    this.authTimer = setTimeout(() => {
      this.authTimer = null;
      if (this.conn.isOpen && this.conn.state !== 'ready') this.resume();
      // (if the socket closed meanwhile, its reconnect sends `resume` by itself)
    }, delay);
    this.ui.renderStatus();
  }

  onClose({ code }) {
    this.authPending = false;
    clearTimeout(this.authTimer);
    this.authTimer = null;
    this.authRetryAt = 0;
    this.inflight = null;
    // A catch-up cut short: what it had applied is counted in `evSeq`; the next one resumes
    // from there, and brings the buffered live events again.
    this.catching = null;
    if (this.loggingOut) {
      this.finishLogout();
      return;
    }
    if (!this.me) this.ui.loginBusy(false); // an unanswered login: let the person try again
    // Messages in flight may or may not have been stored: show them as failed until the
    // reconnect resends them with the same ref (the server deduplicates by ref).
    for (const conv of this.convs.values()) {
      for (const p of conv.pending) {
        if (p.state === 'sending') Object.assign(p, { state: 'failed', error: 'Connection lost — will retry', auto: true });
      }
      conv.typing.clear();
    }
    this.ui.renderAll();
    if (!this.me) this.ui.loginStatus(code === 1006 ? 'Cannot reach the server, retrying…' : 'Reconnecting…');
  }

  request(frame, info, beforeAuth = false) {
    const ref = frame.ref || newRef(info.kind[0]);
    frame.ref = ref;
    this.requests.set(ref, { ...info, at: Date.now() });
    if (this.requests.size > 2000) {
      const cutoff = Date.now() - 10 * 60 * 1000;
      for (const [r, v] of this.requests) if (v.at < cutoff) this.requests.delete(r);
    }
    if (beforeAuth) return this.conn.sendNow(frame);
    return this.conn.send(frame);
  }

  // ---------- auth ----------

  login(user, password, register) {
    unlockAudio();
    if (!USER_RE.test(user)) return this.ui.loginError('User names are 1–32 of letters, digits, “_”, “.” and “-”.');
    if (register && new TextEncoder().encode(password).length < 8) return this.ui.loginError('Choose a password of at least 8 characters.');
    if (!password) return this.ui.loginError('Enter your password.');
    this.ui.loginError('');
    this.ui.loginBusy(true);
    this.authPending = true;
    const frame = { type: register ? 'register' : 'login', user, password };
    const info = { kind: 'auth', how: register ? 'register' : 'login' };
    if (this.conn.isOpen) {
      this.request(frame, info, true);
      this.ui.loginStatus('Signing in…');
    } else {
      // Not connected (yet): send it as soon as the socket opens.
      this.pendingAuth = { frame, info };
      this.ui.loginStatus('Connecting to the server…');
    }
    return undefined;
  }

  logout() {
    if (!this.me) return;
    this.loggingOut = true;
    this.conn.clearQueue();
    const sent = this.conn.sendNow({ type: 'logout', ref: newRef('o') });
    store.remove('token');
    if (!sent) {
      this.finishLogout();
      return;
    }
    // The server closes with 1000 once the token is revoked; don't wait for ever if it doesn't.
    setTimeout(() => { if (this.loggingOut) this.finishLogout(); }, 3000);
  }

  finishLogout() {
    this.loggingOut = false;
    this.resetSession();
    this.ui.showLogin();
    this.conn.restart(); // a fresh, unauthenticated connection for the next login
  }

  resetSession() {
    this.me = null;
    this.convs.clear();
    this.users.clear();
    this.current = null;
    this.requests.clear();
    this.inflight = null;
    this.holdUntil = 0;
    this.rateStrikes = 0;
    this.evSeq = null;
    this.catching = null;
    this.ui.reset();
  }

  onWelcome(f) {
    const firstTime = !this.me || lc(this.me.user) !== lc(f.user);
    if (firstTime && this.me) this.resetSession();
    this.me = { user: f.user, nick: f.nick || f.user };
    this.authPending = false;
    this.authRetries = 0;
    this.authRetryAt = 0;
    if (f.token) store.set('token', f.token);
    this.conn.markReady();
    this.ui.loginBusy(false);

    const rooms = new Set((f.rooms || []).map(String));
    // Rooms left from another device while we were away.
    for (const conv of [...this.convs.values()]) {
      if (conv.kind === 'room' && !rooms.has(conv.name)) this.convs.delete(conv.key);
    }
    for (const room of rooms) this.ensureConv(roomKey(room));
    for (const u of store.get(`dms.${lc(f.user)}`, [])) this.ensureConv(dmKey(u));
    this.serverCounts = Array.isArray(f.conversations);
    this.welcomeSeq = typeof f.seq === 'number' ? f.seq : null;
    for (const c of f.conversations || []) this.applyConversationState(c);

    // Catching up. A page that starts (or reloads) has no messages in memory: it loads its
    // conversations with `join`/`history` — snapshots of their current state — and follows the
    // event log from the welcome's `seq`. A reconnect of a running page asks `catchup` for
    // every event after the last one it applied (new messages, edits, deletions, reactions).
    const hasSeq = typeof f.seq === 'number';
    const resumed = !firstTime && hasSeq && this.evSeq !== null;
    if (hasSeq && !resumed) this.setSeq(f.seq);
    for (const conv of this.convs.values()) {
      if (conv.kind === 'room' && !conv.loaded) {
        this.request({ type: 'join', room: conv.name }, { kind: 'join', key: conv.key, initial: true });
        continue;
      }
      // Not loaded yet: its newest page. Loaded, without a log to catch up from (a server
      // without `seq`): what came after its last message, as `history … after`.
      if (!conv.loaded || !resumed) this.loadHistory(conv);
      // Presence may have changed while we were away.
      if (conv.kind === 'room') this.request({ type: 'who', room: conv.name }, { kind: 'who', key: conv.key });
    }
    if (resumed) this.startCatchup();
    this.resendPending();

    // http://host/#rust opens (joining if needed) #rust.
    const wanted = normalizeRoom(decodeURIComponent(location.hash.slice(1)));
    if (firstTime && ROOM_RE.test(wanted)) {
      if (this.convs.has(roomKey(wanted))) this.current = roomKey(wanted);
      else this.join(wanted);
      history.replaceState(null, '', location.pathname);
    }
    if (!this.current || !this.convs.has(this.current)) {
      const saved = store.get(`last.${lc(f.user)}`);
      const first = [...this.convs.keys()].find((k) => k.startsWith('#'));
      this.current = (saved && this.convs.has(saved)) ? saved : (first || [...this.convs.keys()][0] || null);
    }
    if (firstTime && this.conv) this.markDivider(this.conv);
    this.ui.showApp();
    this.ui.renderAll();
    if (firstTime) this.ui.focusComposer();
  }

  /** One entry of `welcome.conversations`: read marker, unread and mention counts, level. */
  applyConversationState(c) {
    let key = null;
    if (typeof c.room === 'string') key = roomKey(c.room);
    else if (typeof c.with === 'string' && this.me && lc(c.with) !== lc(this.me.user)) key = dmKey(c.with);
    if (!key) return;
    if (key.startsWith('#') && !this.convs.has(key)) return; // not in `rooms`: not a member
    const conv = this.ensureConv(key);
    if (typeof c.read === 'number') {
      conv.read = Math.max(conv.read ?? c.read, c.read);
      // (a marker moved here but not sent yet, e.g. while offline, still goes out)
      conv.readSent = Math.max(conv.readSent ?? c.read, c.read);
    }
    if (typeof c.unread === 'number') conv.unread = c.unread;
    if (typeof c.mentions === 'number') conv.mentions = c.mentions;
    if (['all', 'mentions', 'none'].includes(c.notify)) conv.notify = c.notify;
  }

  /** The newest page of a conversation, or (known conversation, server without `seq`) what came after its last message. */
  loadHistory(conv, extra = {}) {
    const target = conv.kind === 'room' ? { room: conv.name } : { with: conv.name };
    const after = lastId(conv);
    if (after === null) {
      // No `before`: the newest page.
      this.request({ type: 'history', ...target, limit: PAGE }, { kind: 'history', key: conv.key, dir: 'latest' });
    } else {
      this.request({ type: 'history', ...target, after, limit: 200 }, { kind: 'history', key: conv.key, dir: 'after', ...extra });
    }
  }

  // ---------- the event log: seq and catch-up ----------

  /** Remembers `seq` as the highest applied (per user, so a reload knows it too). */
  setSeq(seq) {
    this.evSeq = seq;
    if (this.me) store.set(`seq.${lc(this.me.user)}`, seq);
  }

  noteSeq(seq) {
    if (typeof seq === 'number' && (this.evSeq === null || seq > this.evSeq)) this.setSeq(seq);
  }

  startCatchup() {
    this.catching = { buffer: [] };
    this.requestCatchup();
  }

  requestCatchup() {
    this.request({ type: 'catchup', since: this.evSeq, limit: this.catchupLimit }, { kind: 'catchup', since: this.evSeq });
  }

  on_catchup(f) {
    const info = this.requests.get(f.ref);
    this.requests.delete(f.ref);
    if (!this.catching || !this.me) return;
    if (f.reset) {
      this.resync(f.seq);
      return;
    }
    for (const ev of f.events || []) this.applyEvent(ev, { backlog: true });
    if (typeof f.seq === 'number') this.noteSeq(f.seq);
    const since = info?.since ?? -Infinity;
    if (f.more && typeof f.seq === 'number' && f.seq > since) {
      this.requestCatchup();
      return;
    }
    this.finishCatchup();
  }

  /** The backlog is applied: now the live events that came meanwhile, those it did not hold. */
  finishCatchup() {
    const buffer = this.catching ? this.catching.buffer : [];
    this.catching = null;
    const upTo = this.evSeq;
    for (const ev of buffer) {
      if (typeof ev.seq === 'number' && upTo !== null && ev.seq <= upTo) continue;
      this.applyEvent(ev, { backlog: false });
    }
    this.ui.renderAll();
  }

  /**
   * The server cannot say what changed since `evSeq` (too long ago, or another server): reload
   * every conversation as a fresh page does (join / history) and follow the log from `seq`.
   */
  resync(seq) {
    const buffer = this.catching ? this.catching.buffer : [];
    this.catching = null;
    if (typeof seq === 'number') this.setSeq(seq);
    for (const conv of this.convs.values()) {
      clearMessages(conv);
      if (conv.kind === 'room') this.request({ type: 'join', room: conv.name }, { kind: 'join', key: conv.key });
      else this.loadHistory(conv);
    }
    for (const ev of buffer) {
      if (typeof ev.seq === 'number' && ev.seq <= this.evSeq) continue;
      this.applyEvent(ev, { backlog: false });
    }
    this.ui.renderAll({ scrollToBottom: true });
  }

  /** One event of the log, from a live frame or a catch-up page. */
  applyEvent(ev, { backlog }) {
    switch (ev.type) {
      case 'message': this.on_message(ev, { backlog }); break;
      case 'edited': this.on_edited(ev); break;
      case 'deleted': this.on_deleted(ev); break;
      case 'reaction': this.on_reaction(ev); break;
      default: break;
    }
  }

  /** The loaded message an event is about (or null: not loaded here, so nothing to change). */
  findMessage(f) {
    if (!this.me || typeof f.id !== 'number') return null;
    const conv = this.convs.get(keyOfMessage(f, this.me.user));
    if (conv?.byId.has(f.id)) return { conv, m: conv.byId.get(f.id) };
    for (const c of this.convs.values()) if (c.byId.has(f.id)) return { conv: c, m: c.byId.get(f.id) };
    return null;
  }

  on_edited(f) {
    const hit = this.findMessage(f);
    if (hit && applyEdit(hit.m, f)) this.ui.renderAll();
    this.noteSeq(f.seq);
  }

  on_deleted(f) {
    const hit = this.findMessage(f);
    if (hit && applyDelete(hit.m)) {
      this.ui.messageGone(hit.conv.key, hit.m.id);
      this.ui.renderAll();
    }
    this.noteSeq(f.seq);
  }

  on_reaction(f) {
    const hit = this.findMessage(f);
    if (hit && applyReaction(hit.m, f)) this.ui.renderAll();
    this.noteSeq(f.seq);
  }

  // ---------- changing messages: edit, delete, react ----------

  /** Sends an edit of message `id` (one's own). Returns false when there is nothing to send. */
  editMessage(key, id, text) {
    const conv = this.convs.get(key);
    const m = conv?.byId.get(id);
    if (!m || m.deleted) { this.ui.toast('That message is no longer there.', 'error'); return false; }
    if ([...text].length > MAX_TEXT) {
      this.ui.toast(`Messages are limited to ${MAX_TEXT} characters.`, 'error');
      return false;
    }
    if (text === m.text) return true; // unchanged: nothing to do
    this.request({ type: 'edit', id, text }, { kind: 'edit', key, id });
    return true;
  }

  deleteMessage(key, id) {
    const m = this.convs.get(key)?.byId.get(id);
    if (!m || m.deleted) return;
    this.request({ type: 'delete', id }, { kind: 'delete', key, id });
  }

  /** Adds (`on`) or removes one's reaction `emoji` on message `id`; without `on`, toggles it. */
  react(key, id, emoji, on) {
    const m = this.convs.get(key)?.byId.get(id);
    if (!m || m.deleted || !this.me) return;
    const want = on ?? !hasReacted(m, emoji, this.me.user);
    if (want) this.noteEmoji(emoji);
    this.request({ type: 'react', id, emoji, on: want }, { kind: 'react', key, id, emoji });
  }

  /** Counts this user's use of an emoji (the picker offers the most used first). */
  noteEmoji(emoji) {
    if (!this.me) return;
    const k = `emoji.${lc(this.me.user)}`;
    const used = store.get(k, {}) || {};
    const [n = 0] = Array.isArray(used[emoji]) ? used[emoji] : [];
    used[emoji] = [n + 1, Date.now()];
    // Keep the list small: the 40 most used.
    const keep = Object.entries(used).sort((a, b) => b[1][0] - a[1][0] || b[1][1] - a[1][1]).slice(0, 40);
    store.set(k, Object.fromEntries(keep));
  }

  /** This user's most used emoji, most used (then most recent) first. */
  topEmoji(n = 6) {
    if (!this.me) return [];
    const used = store.get(`emoji.${lc(this.me.user)}`, {}) || {};
    return Object.entries(used)
      .filter(([e, v]) => typeof e === 'string' && Array.isArray(v))
      .sort((a, b) => b[1][0] - a[1][0] || b[1][1] - a[1][1])
      .slice(0, n)
      .map(([e]) => e);
  }

  // ---------- conversations ----------

  ensureConv(key, extra) {
    let conv = this.convs.get(key);
    if (!conv) {
      conv = newConv(key, extra);
      if (conv.kind === 'dm') {
        conv.loaded = false;
        this.rememberDm(conv.name);
      }
      this.convs.set(key, conv);
    }
    return conv;
  }

  rememberDm(user) {
    if (!this.me) return;
    const k = `dms.${lc(this.me.user)}`;
    const list = store.get(k, []);
    if (!list.includes(lc(user))) store.set(k, [...list, lc(user)]);
  }

  forgetDm(user) {
    if (!this.me) return;
    const k = `dms.${lc(this.me.user)}`;
    store.set(k, store.get(k, []).filter((u) => u !== lc(user)));
  }

  select(key) {
    if (!this.convs.has(key)) return;
    this.current = key;
    this.ui.leaveCompose(key);
    const conv = this.convs.get(key);
    this.markDivider(conv);
    this.ui.highlight = null;
    if (this.me) store.set(`last.${lc(this.me.user)}`, key);
    this.ui.closeDrawers();
    this.ui.renderAll({ scrollToBottom: true });
    this.ui.focusComposer();
  }

  get conv() { return this.current ? this.convs.get(this.current) : null; }

  join(room) {
    const name = normalizeRoom(room);
    if (!ROOM_RE.test(name)) { this.ui.toast('Room names are 1–32 of a–z, 0–9, “_” and “-”.', 'error'); return false; }
    if (this.convs.has(roomKey(name)) && this.convs.get(roomKey(name)).loaded) { this.select(roomKey(name)); return true; }
    this.joinIntents.add(name);
    this.request({ type: 'join', room: name }, { kind: 'join', key: roomKey(name), select: true });
    return true;
  }

  leave(room) {
    const conv = room ? this.convs.get(roomKey(room)) : this.conv;
    if (!conv) return;
    if (conv.kind === 'dm') { this.closeDm(conv.key); return; }
    this.request({ type: 'leave', room: conv.name }, { kind: 'leave', key: conv.key });
  }

  closeDm(key) {
    const conv = this.convs.get(key);
    if (!conv) return;
    this.forgetDm(conv.name);
    this.convs.delete(key);
    if (this.current === key) this.current = [...this.convs.keys()][0] || null;
    this.ui.renderAll({ scrollToBottom: true });
  }

  openDm(user, { select = true } = {}) {
    if (!USER_RE.test(user)) { this.ui.toast(`“${user}” is not a valid user name.`, 'error'); return null; }
    if (this.me && lc(user) === lc(this.me.user)) { this.ui.toast('That’s you!', 'info'); return null; }
    const key = dmKey(user);
    const existed = this.convs.has(key);
    const conv = this.ensureConv(key);
    const known = this.users.get(lc(user));
    if (known) conv.display = known.nick || known.user;
    if (!existed) this.loadHistory(conv);
    if (select) this.select(key);
    else this.ui.renderAll();
    return conv;
  }

  setNick(nick) {
    const n = String(nick).trim();
    const parsed = parseCommand(`/nick ${n}`);
    if (parsed.type === 'error') { this.ui.toast(parsed.message, 'error'); return; }
    this.request({ type: 'nick', nick: parsed.nick }, { kind: 'nick', nick: parsed.nick });
  }

  loadOlder() {
    const conv = this.conv;
    if (!conv || !conv.loaded || !conv.more || conv.loadingOlder) return;
    const before = firstId(conv);
    if (before === null) { conv.more = false; return; }
    conv.loadingOlder = true;
    this.ui.renderHistoryTop();
    const target = conv.kind === 'room' ? { room: conv.name } : { with: conv.name };
    this.request({ type: 'history', ...target, before, limit: PAGE }, { kind: 'history', key: conv.key, dir: 'before' });
  }

  // ---------- composer ----------

  /** The composer's text. `replyTo`: the id of the message it answers (reply mode). */
  submit(text, { replyTo } = {}) {
    unlockAudio();
    const cmd = parseCommand(text);
    switch (cmd.type) {
      case 'say': {
        if (!cmd.text.trim()) return false;
        if (!this.conv) { this.ui.toast('Join a room first (/join ROOM).', 'error'); return false; }
        return this.sendMessage(this.conv, cmd.text, replyTo ? { reply_to: replyTo } : {});
      }
      case 'nick': this.setNick(cmd.nick); return true;
      case 'join': return this.join(cmd.room);
      case 'leave': this.leave(cmd.room); return true;
      case 'msg': {
        const from = this.current;
        const conv = this.openDm(cmd.to, { select: true });
        if (!conv) return false;
        // `typed`: what to give back to the composer if the server says there is no such user.
        return this.sendMessage(conv, cmd.text, { typed: text, back: from });
      }
      case 'help':
        this.ui.showHelp(HELP);
        return true;
      default:
        this.ui.toast(cmd.message, 'error');
        return false;
    }
  }

  sendMessage(conv, text, extra = {}) {
    if ([...text].length > MAX_TEXT) {
      this.ui.toast(`Messages are limited to ${MAX_TEXT} characters.`, 'error');
      return false;
    }
    this.seq += 1;
    const p = {
      ref: newRef('m'), seq: this.seq, text, ts: Date.now(), state: 'queued', from: this.me.user, nick: this.me.nick, ...extra,
    };
    conv.pending.push(p);
    this.pump();
    // Typing on right after sending must be announced again (the others cleared the indicator
    // when the message came): see typing().
    this.typingAfterSend.set(conv.key, true);
    this.ui.renderAll({ scrollToBottom: true });
    return true;
  }

  /**
   * Sends the next message of the outbox, if nothing is in flight and sending is not paused.
   * One say/dm at a time, the earliest typed first: the server's rate limit may refuse any
   * message, and a later one must never be stored before an earlier refused one.
   */
  pump() {
    if (this.inflight || !this.conn.isReady) return;
    const wait = this.holdUntil - Date.now();
    if (wait > 0) {
      if (!this.holdTimer) this.holdTimer = setTimeout(() => { this.holdTimer = null; this.pump(); }, wait);
      return;
    }
    let next = null;
    let nextConv = null;
    for (const conv of this.convs.values()) {
      for (const p of conv.pending) {
        if (p.state !== 'queued' && !(p.state === 'failed' && p.auto)) continue;
        if (!next || p.seq < next.seq) { next = p; nextConv = conv; }
      }
    }
    if (!next) return;
    const frame = nextConv.kind === 'room'
      ? { type: 'say', room: nextConv.name, text: next.text, ref: next.ref }
      : { type: 'dm', to: nextConv.name, text: next.text, ref: next.ref };
    if (typeof next.reply_to === 'number') frame.reply_to = next.reply_to;
    this.requests.set(next.ref, { kind: 'msg', key: nextConv.key, at: Date.now() });
    if (!this.conn.sendNow(frame)) return;
    this.inflight = next.ref;
    Object.assign(next, { state: 'sending', error: null, auto: false, sentAt: Date.now() });
    this.ui.renderAll();
  }

  /** The in-flight message got its answer (`ack` or `error`): the next one may go. */
  settled(ref) {
    if (this.inflight !== ref) return;
    this.inflight = null;
    queueMicrotask(() => this.pump());
  }

  retry(key, ref) {
    const conv = this.convs.get(key);
    const p = conv?.pending.find((x) => x.ref === ref);
    if (!p || p.state === 'sending') return;
    Object.assign(p, { state: 'queued', error: null, auto: false });
    this.pump();
    this.ui.renderAll();
  }

  discard(key, ref) {
    const conv = this.convs.get(key);
    if (!conv) return;
    conv.pending = conv.pending.filter((x) => x.ref !== ref);
    this.settled(ref);
    this.ui.renderAll();
  }

  /** After (re)authenticating: messages not known to be stored go out again, same refs. */
  resendPending() {
    this.inflight = null;
    for (const conv of this.convs.values()) {
      for (const p of conv.pending) {
        if (p.state === 'sending' || (p.state === 'failed' && p.auto)) Object.assign(p, { state: 'queued', error: null, auto: false });
      }
    }
    this.pump();
  }

  /**
   * The user types in the composer: tell the others, at most every 3 s. After a message was
   * sent, the next keystroke announces typing again at once — but the server forwards at most
   * one `typing` per 2 s (`--typing-interval`) and silently drops the rest, so a frame sent
   * within that interval of the previous one is held back until the interval has passed.
   */
  typing() {
    const conv = this.conv;
    if (!conv || !this.conn.isReady) return;
    const now = Date.now();
    const last = this.lastTypingSent.get(conv.key) || 0;
    if (this.typingAfterSend.get(conv.key)) {
      this.typingAfterSend.delete(conv.key);
      const wait = last + SERVER_TYPING_INTERVAL - now;
      if (wait <= 0) { this.sendTyping(conv); return; }
      clearTimeout(this.typingTimers.get(conv.key));
      this.typingTimers.set(conv.key, setTimeout(() => {
        this.typingTimers.delete(conv.key);
        // Still typing there (something in the composer of that conversation)?
        if (this.current === conv.key && this.ui.composerHasText()) this.sendTyping(conv);
      }, wait));
      return;
    }
    if (this.typingTimers.has(conv.key)) return;
    if (now - last < 3000) return;
    this.sendTyping(conv);
  }

  sendTyping(conv) {
    if (!this.conn.isReady) return;
    this.lastTypingSent.set(conv.key, Date.now());
    this.conn.sendNow(conv.kind === 'room' ? { type: 'typing', room: conv.name } : { type: 'typing', to: conv.name });
  }

  // ---------- server frames ----------

  onFrame(f) {
    // During a catch-up, live log events wait until the backlog before them is applied.
    if (this.catching && LOG_EVENTS.has(f.type)) {
      this.catching.buffer.push(f);
      return;
    }
    const h = this[`on_${f.type}`];
    if (h) h.call(this, f);
  }

  on_welcome(f) { this.onWelcome(f); }

  on_joined(f) {
    const key = roomKey(f.room);
    const info = this.requests.get(f.ref) || (this.joinIntents.has(f.room) ? { select: true } : {});
    this.joinIntents.delete(f.room);
    this.requests.delete(f.ref);
    const conv = this.ensureConv(key);
    conv.members = new Map((f.members || []).map((m) => [lc(m.user), { ...m }]));
    for (const m of f.members || []) this.noteUser(m);
    const hist = f.history || [];
    addMessages(conv, hist, { merge: true });
    if (!conv.loaded) conv.more = hist.length >= PAGE;
    conv.loaded = true;
    this.request({ type: 'who', room: f.room }, { kind: 'who', key });
    if (info.select || !this.current) this.select(key);
    else this.ui.renderAll();
    if (info.select) this.ui.announce(`Joined #${f.room}`);
  }

  on_left(f) {
    const key = roomKey(f.room);
    if (!this.convs.has(key)) return;
    this.convs.delete(key);
    if (this.current === key) {
      this.current = [...this.convs.keys()].find((k) => k.startsWith('#')) || [...this.convs.keys()][0] || null;
    }
    const undo = document.createElement('span');
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'link-btn';
    b.textContent = 'Rejoin';
    b.addEventListener('click', () => { b.closest('.toast')?.remove(); this.join(f.room); });
    undo.append(`You left #${f.room}. `, b);
    this.ui.toast(undo, 'info', 8000);
    this.ui.renderAll({ scrollToBottom: true });
  }

  on_rooms(f) { this.ui.renderRoomBrowser(f.rooms || []); }

  on_who(f) {
    const conv = this.convs.get(roomKey(f.room));
    for (const m of f.members || []) this.noteUser(m);
    if (conv) conv.members = new Map((f.members || []).map((m) => [lc(m.user), { ...m }]));
    this.ui.renderAll();
  }

  noteUser(m) {
    const k = lc(m.user);
    const u = this.users.get(k) || { user: m.user };
    if (m.nick) u.nick = m.nick;
    if (typeof m.online === 'boolean') u.online = m.online;
    if (m.last_seen) u.last_seen = m.last_seen;
    this.users.set(k, u);
    const dm = this.convs.get(dmKey(m.user));
    if (dm && u.nick) dm.display = u.nick;
    return u;
  }

  on_presence(f) {
    const k = lc(f.user);
    if (f.event === 'online' || f.event === 'offline') {
      const online = f.event === 'online';
      const u = this.noteUser({ user: f.user, nick: f.nick, online, last_seen: online ? undefined : (f.last_seen || Date.now()) });
      let known = false;
      for (const conv of this.convs.values()) {
        const m = conv.members.get(k);
        if (m) { known = true; Object.assign(m, { online, nick: u.nick || m.nick, last_seen: u.last_seen }); }
      }
      // Someone sharing a room with us whom no member list has (e.g. a brand-new account,
      // which is put in #general without a `join` presence): refresh the member lists.
      if (!known && online) this.refreshMembersSoon();
    } else if (f.room && this.me && k === lc(this.me.user)) {
      // Our own join/leave, done on another connection (phone and laptop): follow it here.
      const key = roomKey(f.room);
      if (f.event === 'join' && !this.convs.has(key)) {
        this.request({ type: 'join', room: f.room }, { kind: 'join', key });
      } else if (f.event === 'leave' && this.convs.has(key)) {
        this.convs.delete(key);
        if (this.current === key) this.current = [...this.convs.keys()].find((x) => x.startsWith('#')) || null;
      }
    } else if (f.room) {
      const conv = this.convs.get(roomKey(f.room));
      if (!conv) return;
      if (f.event === 'join') {
        const had = conv.members.has(k);
        conv.members.set(k, { user: f.user, nick: f.nick || f.user, online: true });
        this.noteUser({ user: f.user, nick: f.nick, online: true });
        if (!had) this.systemLine(conv, `${f.nick || f.user} joined #${f.room}`);
      } else if (f.event === 'leave') {
        if (conv.members.delete(k)) this.systemLine(conv, `${f.nick || f.user} left #${f.room}`);
      }
    }
    this.ui.renderAll();
  }

  refreshMembersSoon() {
    if (this.whoTimer) return;
    this.whoTimer = setTimeout(() => {
      this.whoTimer = null;
      for (const conv of this.convs.values()) {
        if (conv.kind === 'room' && conv.loaded) this.request({ type: 'who', room: conv.name }, { kind: 'who', key: conv.key });
      }
    }, 250);
  }

  systemLine(conv, text) {
    conv.system.push({ afterId: lastId(conv), afterPending: conv.pending.length, ts: Date.now(), text });
    if (conv.system.length > 100) conv.system.shift();
  }

  on_message(f, { backlog = false } = {}) {
    if (!this.me) return;
    this.noteSeq(f.seq);
    const key = keyOfMessage(f, this.me.user);
    const isNewConv = !this.convs.has(key);
    const conv = this.ensureConv(key);
    if (isNewConv && conv.kind === 'dm') {
      conv.display = f.from && lc(f.from) !== lc(this.me.user) ? (f.nick || f.from) : conv.name;
      this.loadHistory(conv); // older messages of this conversation, if any
    }
    if (f.from) this.noteUser({ user: f.from, nick: f.nick });
    const fresh = addMessages(conv, [f], { merge: backlog });
    if (!fresh.length) {
      if (backlog) this.ui.renderAll();
      return;
    }
    conv.typing.delete(lc(f.from));
    if (lc(f.from) !== lc(this.me.user)) {
      if (!backlog) this.alert(conv, f);
      else if (!f.deleted && this.countable(conv, f)) {
        this.countUnread(conv, f); // missed while disconnected: unread, without a sound for a backlog
      }
    }
    this.ui.renderAll({ newMessage: true, key });
  }

  /**
   * Is a message from someone else to be counted as unread here? Not when it is at or before
   * the read marker, nor when the welcome's counts already hold it (its `seq` is not after the
   * welcome's).
   */
  countable(conv, m) {
    if (conv.read !== null && m.id <= conv.read) return false;
    if (this.serverCounts && this.welcomeSeq !== null && (typeof m.seq !== 'number' || m.seq <= this.welcomeSeq)) return false;
    return true;
  }

  countUnread(conv, m) {
    conv.unread += 1;
    if (conv.kind === 'dm' || this.isMention(m)) conv.mentions += 1;
  }

  isMention(m) {
    return Boolean(this.me && !m.deleted && mentions(m.text || '', [this.me.user, this.me.nick]));
  }

  /** The conversation's notification level (the server's, else its default). */
  levelOf(conv) {
    return conv.notify || (conv.kind === 'dm' ? 'all' : 'mentions');
  }

  alert(conv, m) {
    const visible = !document.hidden && document.hasFocus();
    const here = conv.key === this.current;
    const mention = mentions(m.text, [this.me.user, this.me.nick]);
    const dm = conv.kind === 'dm';
    const seen = here && document.visibilityState === 'visible' && this.ui.nearBottom();
    if (!seen && this.countable(conv, m)) this.countUnread(conv, m);
    const who = m.nick || m.from;
    if (here) this.ui.announce(`${who}: ${plainPreview(m.text, 200)}`);
    else this.ui.announce(`New message from ${who} in ${conv.kind === 'room' ? `#${conv.name}` : 'a direct message'}`);
    if ((!here || !visible) && wantsAlert(this.prefs, { mention, dm, level: this.levelOf(conv) })) {
      if (this.prefs.sound) chime(this.prefs.volume, { mention: mention || dm });
      if (this.prefs.desktop && document.hidden && 'Notification' in window && Notification.permission === 'granted') {
        try {
          const n = new Notification(conv.kind === 'room' ? `${who} in #${conv.name}` : who, {
            body: plainPreview(m.text, 160), tag: conv.key, icon: 'img/icon.svg', silent: true,
          });
          n.onclick = () => { window.focus(); this.select(conv.key); n.close(); };
        } catch { /* not supported here */ }
      }
    }
  }

  on_ack(f) {
    if (this.inflight === f.ref) this.rateStrikes = 0;
    this.settled(f.ref);
    const info = this.requests.get(f.ref);
    if (info && (info.kind === 'edit' || info.kind === 'delete' || info.kind === 'react')) {
      // The change itself arrives as `edited` / `deleted` / `reaction` (to this connection too).
      this.requests.delete(f.ref);
      return;
    }
    const convs = info?.key && this.convs.has(info.key) ? [this.convs.get(info.key)] : [...this.convs.values()];
    for (const conv of convs) {
      const p = conv.pending.find((x) => x.ref === f.ref);
      if (!p) continue;
      p.id = f.id;
      if (!conv.ids.has(f.id)) {
        const base = { id: f.id, from: this.me.user, nick: this.me.nick, text: p.text, ts: f.ts || Date.now() };
        if (typeof p.reply_to === 'number') base.reply_to = p.reply_to;
        addMessages(conv, [conv.kind === 'room' ? { ...base, room: conv.name } : { ...base, to: conv.name }]);
      } else {
        conv.pending = conv.pending.filter((x) => x !== p);
      }
      this.requests.delete(f.ref);
      this.ui.renderAll();
      return;
    }
  }

  on_history(f) {
    const info = this.requests.get(f.ref);
    let key = info?.key;
    if (!key) key = f.room ? roomKey(f.room) : (f.with ? dmKey(f.with) : null);
    const conv = key && this.convs.get(key);
    if (!conv) return;
    const msgs = f.messages || [];
    const dir = info?.dir || (conv.loadingOlder ? 'before' : conv.loaded ? 'after' : 'latest');
    this.requests.delete(f.ref);
    if (dir === 'jump') {
      // The page that ends with a message to jump to (a search result): then what came
      // after it, up to the newest, as `history … after`.
      for (const m of msgs) if (m.from) this.noteUser({ user: m.from, nick: m.nick });
      addMessages(conv, msgs, { merge: true });
      conv.more = Boolean(f.more);
      conv.loaded = true;
      if (lastId(conv) !== null) this.loadHistory(conv, { target: info.target });
      this.ui.renderAll({ jumpTo: key === this.current ? info.target : undefined });
      return;
    }
    const anchor = dir === 'before' ? this.ui.scrollAnchor() : null;
    for (const m of msgs) if (m.from) this.noteUser({ user: m.from, nick: m.nick });
    const fresh = addMessages(conv, msgs, { merge: true });
    if (dir === 'after' && this.me && !this.serverCounts) {
      // Missed while disconnected: count as unread (no sound for a backlog).
      const visible = !document.hidden && document.hasFocus();
      const missed = fresh.filter((m) => lc(m.from) !== lc(this.me.user)).length;
      if (missed && (key !== this.current || !visible)) conv.unread += missed;
    }
    if (dir === 'before') {
      conv.more = Boolean(f.more);
      conv.loadingOlder = false;
    } else if (dir === 'latest') {
      conv.more = Boolean(f.more);
      conv.loaded = true;
    } else if (dir === 'after') {
      conv.loaded = true;
      if (f.more && msgs.length) this.loadHistory(conv, info?.target !== undefined ? { target: info.target } : {}); // more missed than one page
    }
    if (conv.kind === 'dm') {
      const other = msgs.find((m) => lc(m.from) === conv.name);
      if (other?.nick) conv.display = other.nick;
    }
    // (the rest of the history after a search result: stay at that message)
    const jumpTo = dir === 'after' && key === this.current && this.ui.highlight?.id === info?.target ? info.target : undefined;
    this.ui.renderAll({ anchor, scrollToBottom: dir === 'latest' && key === this.current, jumpTo });
  }

  on_nick(f) {
    const k = lc(f.user);
    const isMe = this.me && k === lc(this.me.user);
    const old = this.users.get(k)?.nick || (isMe ? this.me.nick : f.user);
    if (isMe) {
      this.me.nick = f.nick;
      this.ui.closeDialog('nick-dialog');
    }
    this.noteUser({ user: f.user, nick: f.nick });
    const text = isMe ? `You are now known as ${f.nick}` : `${old} is now known as ${f.nick}`;
    for (const conv of this.convs.values()) {
      const m = conv.members.get(k);
      if (m) m.nick = f.nick;
      if (m || (conv.kind === 'dm' && conv.name === k) || (isMe && conv.kind === 'room')) {
        if (old !== f.nick) this.systemLine(conv, text);
      }
    }
    if (old !== f.nick) this.ui.announce(text);
    this.ui.renderAll();
  }

  on_typing(f) {
    if (!this.me || lc(f.user) === lc(this.me.user)) return;
    const key = f.room ? roomKey(f.room) : dmKey(f.user);
    const conv = this.convs.get(key);
    if (!conv) return;
    setTyping(conv, f.user, f.nick);
    this.ui.renderTyping();
  }

  on_error(f) {
    const info = f.ref ? this.requests.get(f.ref) : null;
    const msg = f.message || f.code;
    if (!info) {
      if (f.code === 'unauthenticated' || f.code === 'account_disabled') {
        // account_disabled: an administrator disabled this account; the server closes the
        // connection next and would refuse the token anyway.
        store.remove('token');
        this.resetSession();
        this.ui.showLogin();
        if (f.code === 'account_disabled') this.ui.loginError(DISABLED);
      } else if (f.code === 'rate_limited') {
        this.ui.toast('Slow down a little — too many messages.', 'error');
      } else {
        this.ui.toast(`Server: ${msg}`, 'error');
      }
      return;
    }
    this.requests.delete(f.ref);
    switch (info.kind) {
      case 'auth': {
        this.authPending = false;
        this.ui.loginBusy(false);
        if (info.how === 'resume' && f.code !== 'auth_failed' && f.code !== 'account_disabled') {
          // Not a verdict on the token (too many sign-ins from this address, the server could
          // not answer, …): keep it and try again later; the person stays signed in.
          this.retryResumeLater(f.code);
        } else if (info.how === 'resume') {
          // The token is invalid, expired or revoked: only now is the session over.
          store.remove('token');
          this.resetSession();
          this.ui.showLogin();
          this.ui.loginStatus('');
          this.ui.loginError(f.code === 'account_disabled' ? DISABLED : 'Your session has ended. Please log in again.');
        } else {
          this.ui.loginStatus('');
          const text = {
            auth_failed: 'Wrong user name or password.',
            user_taken: 'That user name is taken. Log in instead, or pick another name.',
            weak_password: 'That password is too weak: use at least 8 characters.',
            rate_limited: 'Too many attempts. Wait a little and try again.',
            registration_closed: 'This server does not accept new accounts. Ask its administrator for one.',
            account_disabled: DISABLED,
            bad_request: msg,
          }[f.code] || msg;
          if (f.code === 'registration_closed') this.ui.setRegistrationOpen(false);
          this.ui.loginError(text);
        }
        break;
      }
      case 'msg': {
        const conv = this.convs.get(info.key);
        const p = conv?.pending.find((x) => x.ref === f.ref);
        if (p) {
          const text = {
            not_member: 'You are not a member of this room.',
            no_such_user: 'There is no user with that name.',
            too_long: 'Too long.',
            rate_limited: 'Sending too fast.',
          }[f.code] || msg;
          if (f.code === 'rate_limited') {
            // Too fast (e.g. typed quickly, or a burst queued while offline): pause the whole
            // outbox, then resend this one first and the later ones after it, in typed order.
            this.rateStrikes += 1;
            this.holdUntil = Date.now() + Math.min(8000, 500 * 2 ** Math.min(this.rateStrikes - 1, 4));
            Object.assign(p, { state: 'queued', error: 'Sending too fast — will retry', auto: false });
          } else {
            Object.assign(p, { state: 'failed', error: text, auto: false });
          }
        }
        this.settled(f.ref);
        if (p && f.code === 'no_such_user' && conv.kind === 'dm') this.noSuchDmUser(conv);
        this.ui.renderAll();
        break;
      }
      case 'join':
        this.ui.toast(`Could not join #${info.key.slice(1)}: ${msg}`, 'error');
        if (info.initial) this.convs.delete(info.key);
        this.ui.renderAll();
        break;
      case 'nick': {
        const text = f.code === 'nick_taken' ? `The nick “${info.nick}” is taken.` : msg;
        this.ui.nickError(text);
        this.ui.toast(text, 'error');
        break;
      }
      case 'edit':
      case 'delete':
      case 'react': {
        const what = { edit: 'edit', delete: 'delete', react: 'react to' }[info.kind];
        const why = {
          not_found: 'it was deleted, or is not there any more',
          forbidden: 'only its author may do that',
          too_long: `messages are limited to ${MAX_TEXT} characters`,
          rate_limited: 'too fast — wait a moment and try again',
        }[f.code] || msg;
        this.ui.toast(`Could not ${what} the message: ${why}.`, 'error');
        break;
      }
      case 'search':
        if (f.ref === this.searchRef) this.ui.searchError(f.code === 'bad_request' ? 'Type a word to search for.' : msg);
        break;
      case 'catchup':
        if (f.code === 'rate_limited' && this.catching) {
          setTimeout(() => { if (this.catching && this.conn.isReady) this.requestCatchup(); }, 1000);
        } else if (this.catching) {
          this.resync(this.evSeq); // cannot catch up: reload the conversations instead
        }
        break;
      case 'history': {
        const conv = this.convs.get(info.key);
        if (conv) {
          conv.loadingOlder = false;
          if (conv.kind === 'dm' && f.code === 'no_such_user') {
            this.noSuchDmUser(conv);
          } else if (info.dir === 'before') {
            conv.more = false;
          }
        }
        this.ui.renderAll();
        break;
      }
      default:
        this.ui.toast(msg, 'error');
    }
  }

  /**
   * The server says the other side of a DM does not exist (a mistyped `/msg NAME text`): say so,
   * close the conversation if it is empty, go back to where the person was, and give what they
   * typed back to the composer so that they can correct the name instead of retyping it all.
   */
  noSuchDmUser(conv) {
    if (this.convs.get(conv.key) !== conv) return; // already handled (history and dm both fail)
    this.ui.toast(`There is no user called “${conv.name}”.`, 'error');
    const typed = conv.pending.filter((p) => p.typed !== undefined);
    conv.pending = conv.pending.filter((p) => p.typed === undefined);
    for (const p of typed) this.settled(p.ref);
    const back = typed.find((p) => p.back)?.back;
    if (!conv.messages.length && !conv.pending.length) {
      this.closeDm(conv.key);
      if (back && this.convs.has(back)) this.select(back);
    }
    if (typed.length) this.ui.restoreComposer(typed.map((p) => p.typed).join('\n'));
    this.ui.renderAll();
  }

  // ---------- misc ----------

  onVisible() {
    if (document.hidden) return;
    this.maybeRead();
  }

  // ---------- search ----------

  /** Full-text search over every conversation (`before`: older results, for "more"). */
  search(q, before) {
    const frame = { type: 'search', q, limit: 30 };
    if (typeof before === 'number') frame.before = before;
    this.searchRef = frame.ref = newRef('s');
    this.request(frame, { kind: 'search', q, append: typeof before === 'number' });
  }

  on_search(f) {
    const info = this.requests.get(f.ref);
    this.requests.delete(f.ref);
    if (!info || f.ref !== this.searchRef || !this.me) return; // a stale answer
    const results = (f.results || []).filter((m) => typeof m.id === 'number');
    for (const m of results) if (m.from) this.noteUser({ user: m.from, nick: m.nick });
    this.ui.renderSearchResults(results.map((m) => ({ ...m, key: keyOfMessage(m, this.me.user) })), Boolean(f.more), info.append);
  }

  /** Opens conversation `key` at message `id` (loading the history around it) and highlights it. */
  jumpTo(key, id) {
    let conv = this.convs.get(key);
    if (!conv && key.startsWith('@')) conv = this.openDm(key.slice(1), { select: false });
    if (!conv) { this.ui.toast('You are no longer in that conversation.', 'error'); return; }
    this.select(key);
    this.ui.highlight = { key, id };
    if (conv.byId.has(id)) {
      this.ui.renderAll({ jumpTo: id });
      return;
    }
    // Not loaded: load the page that ends with it, then the rest up to the newest.
    clearMessages(conv);
    const target = conv.kind === 'room' ? { room: conv.name } : { with: conv.name };
    this.request({ type: 'history', ...target, before: id + 1, limit: PAGE }, { kind: 'history', key, dir: 'jump', target: id });
    this.ui.renderAll();
  }

  // ---------- read state ----------

  /** Opening a conversation with unread messages: a "New" divider above the first of them. */
  markDivider(conv) {
    conv.divider = conv.unread > 0 && conv.read !== null ? conv.read : null;
  }

  /**
   * The user sees the newest message of the open conversation (tab visible, scrolled to the
   * bottom): move the read marker there, clear its counts and tell the server (debounced).
   */
  maybeRead() {
    const conv = this.conv;
    if (!conv || !this.me || !conv.loaded || document.visibilityState !== 'visible') return;
    if (!this.ui.nearBottom()) return;
    const newest = lastId(conv);
    if (newest === null) return;
    const moved = conv.read === null || newest > conv.read;
    if (!moved && !conv.unread && !conv.mentions) return;
    if (moved) conv.read = newest;
    conv.unread = 0;
    conv.mentions = 0;
    this.ui.renderAll();
    if (moved) this.sendReadSoon(conv);
  }

  sendReadSoon(conv) {
    if (this.readTimers.has(conv.key)) return;
    this.readTimers.set(conv.key, setTimeout(() => this.sendRead(conv), 300));
  }

  sendRead(conv) {
    clearTimeout(this.readTimers.get(conv.key));
    this.readTimers.delete(conv.key);
    if (this.convs.get(conv.key) !== conv || conv.read === null) return;
    if (conv.readSent !== null && conv.read <= conv.readSent) return;
    conv.readSent = conv.read;
    const target = conv.kind === 'room' ? { room: conv.name } : { with: conv.name };
    this.conn.send({ type: 'read', ...target, id: conv.read });
  }

  /** The page goes away (reload, tab closed): read markers still waiting for their debounce go out now. */
  flushReads() {
    for (const key of [...this.readTimers.keys()]) {
      const conv = this.convs.get(key);
      if (conv) this.sendRead(conv);
      else { clearTimeout(this.readTimers.get(key)); this.readTimers.delete(key); }
    }
  }

  /** Another device of this user read a conversation up to `id`. */
  on_read(f) {
    if (!this.me || typeof f.id !== 'number') return;
    const key = f.room ? roomKey(f.room) : (f.with ? dmKey(f.with) : null);
    const conv = key && this.convs.get(key);
    if (!conv) return;
    if (conv.read !== null && f.id <= conv.read) return;
    conv.read = f.id;
    conv.readSent = Math.max(conv.readSent ?? -Infinity, f.id);
    recountUnread(conv, this.me.user, (m) => this.isMention(m));
    this.ui.renderAll();
  }

  // ---------- notification levels ----------

  setNotify(key, level) {
    const conv = this.convs.get(key);
    if (!conv || !['all', 'mentions', 'none'].includes(level)) return;
    conv.notify = level;
    const target = conv.kind === 'room' ? { room: conv.name } : { with: conv.name };
    this.request({ type: 'notify', ...target, level }, { kind: 'notify', key });
    this.ui.renderAll();
  }

  on_notify(f) {
    if (f.ref) this.requests.delete(f.ref);
    if (!this.me || !['all', 'mentions', 'none'].includes(f.level)) return;
    const key = f.room ? roomKey(f.room) : (f.with ? dmKey(f.with) : null);
    const conv = key && this.convs.get(key);
    if (!conv) return;
    conv.notify = f.level;
    this.ui.renderAll();
  }

  tick() {
    this.ui.renderTyping();
    this.ui.tick();
  }

  setPrefs(patch) {
    this.prefs = savePrefs({ ...this.prefs, ...patch });
    return this.prefs;
  }

  listRooms() { this.request({ type: 'rooms' }, { kind: 'rooms' }); }
}

const app = new App();
window.parlor = app; // handy for debugging from the console
app.start();
