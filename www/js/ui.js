// Everything that touches the DOM. Builds nodes with createElement/textContent only.

import { renderMarkdown, mentions } from './render.js';
import { formatTime, fullDate, dayLabel, startOfDay, lastSeen } from './time.js';
import { typingNicks, typingText, sortedMembers, lc, dmKey } from './store.js';
import { chime, unlockAudio } from './sound.js';

const $ = (id) => document.getElementById(id);
const GROUP_MS = 5 * 60 * 1000;

function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

/** Stable colour class for a user's avatar. */
export function avatarClass(user) {
  let x = 0;
  for (const ch of lc(user)) x = (x * 31 + ch.codePointAt(0)) >>> 0;
  return `av-${x % 8}`;
}

function initial(name) {
  const ch = [...String(name || '?').trim()][0] || '?';
  return ch.toUpperCase();
}

function avatar(user, nick, extra = '') {
  return h('span', { class: `avatar ${avatarClass(user)} ${extra}`, 'aria-hidden': 'true', text: initial(nick || user) });
}

export class UI {
  constructor(app) {
    this.app = app;
    this.msgCache = new Map(); // id or ref → {li, sig}
    this.renderedKey = null;
    this.lastMinute = 0;
    this.frame = 0;
    this.pendingOpts = {};
    this.bind();
  }

  // ---------- views ----------

  showBooting() {
    document.body.classList.add('booting');
    $('login-view').hidden = true;
    $('app-view').hidden = true;
  }

  showLogin() {
    document.body.classList.remove('booting');
    document.body.classList.remove('signed-in');
    $('app-view').hidden = true;
    $('login-view').hidden = false;
    document.title = 'Parlor — sign in';
    const u = $('login-user');
    if (!u.value) u.focus();
    else $('login-password').focus();
  }

  showApp() {
    document.body.classList.remove('booting');
    document.body.classList.add('signed-in');
    $('login-view').hidden = true;
    $('app-view').hidden = false;
    $('login-password').value = '';
  }

  loginError(text) { $('login-error').textContent = text; }
  /** On a server with --registration closed there is no "Create account" to offer. */
  setRegistrationOpen(open) {
    $('register-submit').hidden = !open;
    $('login-lead').textContent = open
      ? 'Sign in to chat, or create an account in one step.'
      : 'Sign in to chat. New accounts are made by this server’s administrator.';
    $('pw-hint').hidden = !open;
  }
  loginStatus(text) { $('login-status').textContent = text; }
  loginBusy(busy) {
    $('login-submit').disabled = busy;
    $('register-submit').disabled = busy;
    $('login-form').classList.toggle('busy', busy);
  }

  reset() {
    this.msgCache.clear();
    this.renderedKey = null;
    $('message-list').replaceChildren();
    $('room-list').replaceChildren();
    $('dm-list').replaceChildren();
    $('user-list').replaceChildren();
    $('typing').textContent = '';
  }

  // ---------- events ----------

  bind() {
    const app = this.app;
    $('login-form').addEventListener('submit', (e) => {
      e.preventDefault();
      app.login($('login-user').value.trim(), $('login-password').value, false);
    });
    $('register-submit').addEventListener('click', () => {
      app.login($('login-user').value.trim(), $('login-password').value, true);
    });

    const composer = $('composer');
    $('composer-form').addEventListener('submit', (e) => {
      e.preventDefault();
      this.submitComposer();
    });
    composer.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && app.prefs.enterSends) {
        e.preventDefault();
        this.submitComposer();
      } else if (e.key === 'Escape') {
        composer.blur();
      }
    });
    composer.addEventListener('input', () => {
      const v = composer.value;
      if (v && !v.startsWith('/')) app.typing();
    });

    const box = $('messages');
    box.addEventListener('scroll', () => {
      if (box.scrollTop < 120) app.loadOlder();
      if (this.nearBottom()) $('jump-btn').hidden = true;
    }, { passive: true });
    $('jump-btn').addEventListener('click', () => this.scrollToBottom(true));
    // #room links in messages join (or open) the room.
    $('message-list').addEventListener('click', (e) => {
      const a = e.target.closest('a.md-room');
      if (!a) return;
      e.preventDefault();
      app.join(a.dataset.room);
    });

    $('menu-btn').addEventListener('click', () => this.toggleDrawer('drawer-open'));
    $('close-drawer').addEventListener('click', () => this.closeDrawers());
    $('members-btn').addEventListener('click', () => this.toggleDrawer('members-open'));
    $('close-members').addEventListener('click', () => this.closeDrawers());
    $('scrim').addEventListener('click', () => this.closeDrawers());
    $('leave-btn').addEventListener('click', () => {
      const conv = app.conv;
      if (!conv) return;
      app.leave();
    });

    $('add-room').addEventListener('click', () => this.openJoin());
    $('add-dm').addEventListener('click', () => this.openDmDialog());
    $('nick-btn').addEventListener('click', () => this.openNick());
    $('settings-btn').addEventListener('click', () => this.openSettings());
    $('logout-btn').addEventListener('click', () => app.logout());
    $('connection-status').addEventListener('click', () => app.conn.retryNow());

    $('join-dialog').addEventListener('close', () => {
      if ($('join-dialog').returnValue !== 'ok') return;
      const v = $('join-input').value.trim();
      if (v) app.join(v);
    });
    $('join-form').addEventListener('submit', (e) => {
      if (e.submitter?.value !== 'ok') return;
      const v = $('join-input').value.trim().replace(/^#/, '').toLowerCase();
      if (!/^[a-z0-9_-]{1,32}$/.test(v)) {
        e.preventDefault();
        $('join-error').textContent = 'Use 1–32 of a–z, 0–9, “_” and “-”.';
      }
    });
    $('dm-form').addEventListener('submit', (e) => {
      if (e.submitter?.value !== 'ok') return;
      const v = $('dm-input').value.trim().replace(/^@/, '');
      if (!/^[A-Za-z0-9_.-]{1,32}$/.test(v)) {
        e.preventDefault();
        $('dm-error').textContent = 'Enter an account name.';
      }
    });
    $('dm-dialog').addEventListener('close', () => {
      if ($('dm-dialog').returnValue !== 'ok') return;
      const v = $('dm-input').value.trim().replace(/^@/, '');
      if (v) app.openDm(v);
    });
    $('nick-form').addEventListener('submit', (e) => {
      if (e.submitter?.value !== 'ok') return;
      e.preventDefault(); // stays open until the server confirms (or refuses)
      const v = $('nick-input').value.trim();
      if (!v) { $('nick-error').textContent = 'Enter a nick.'; return; }
      $('nick-error').textContent = '';
      if (v === app.me?.nick) { $('nick-dialog').close(); return; }
      app.setNick(v);
    });

    // Settings apply immediately and persist.
    $('pref-sound').addEventListener('change', (e) => app.setPrefs({ sound: e.target.checked }));
    $('pref-volume').addEventListener('input', (e) => app.setPrefs({ volume: Number(e.target.value) }));
    for (const r of document.querySelectorAll('input[name="notifyOn"]')) {
      r.addEventListener('change', (e) => app.setPrefs({ notifyOn: e.target.value }));
    }
    $('pref-desktop').addEventListener('change', async (e) => {
      const on = e.target.checked;
      if (on && 'Notification' in window && Notification.permission !== 'granted') {
        const res = await Notification.requestPermission().catch(() => 'denied');
        if (res !== 'granted') {
          e.target.checked = false;
          $('desktop-note').textContent = 'The browser did not allow notifications for this page.';
          app.setPrefs({ desktop: false });
          return;
        }
      }
      $('desktop-note').textContent = '';
      app.setPrefs({ desktop: on });
    });
    $('test-sound').addEventListener('click', () => { unlockAudio(); chime(app.prefs.volume || 0.5); });

    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && document.body.classList.contains('drawer-open')) this.closeDrawers();
      if (e.key === 'Escape' && document.body.classList.contains('members-open')) this.closeDrawers();
      if (e.altKey && (e.key === 'ArrowUp' || e.key === 'ArrowDown')) {
        e.preventDefault();
        this.cycle(e.key === 'ArrowUp' ? -1 : 1);
      }
    });
    window.matchMedia('(max-width: 700px)').addEventListener('change', () => this.closeDrawers());
  }

  submitComposer() {
    const c = $('composer');
    const text = c.value;
    if (!text.trim()) return;
    if (this.app.submit(text)) {
      c.value = '';
    }
    c.focus();
  }

  /** Puts text that could not be sent back into the composer (before anything typed since). */
  restoreComposer(text) {
    const c = $('composer');
    c.value = c.value ? `${text}\n${c.value}` : text;
    c.focus();
    c.setSelectionRange(c.value.length, c.value.length);
  }

  focusComposer() {
    // Don't pop the keyboard up on phones when switching conversations.
    if (window.matchMedia('(pointer: coarse)').matches) return;
    $('composer').focus();
  }

  cycle(dir) {
    const keys = [...this.app.convs.keys()].sort((a, b) => (a[0] === b[0] ? a.localeCompare(b) : a[0] === '#' ? -1 : 1));
    if (!keys.length) return;
    const i = keys.indexOf(this.app.current);
    this.app.select(keys[(i + dir + keys.length) % keys.length]);
  }

  toggleDrawer(cls) {
    const other = cls === 'drawer-open' ? 'members-open' : 'drawer-open';
    document.body.classList.remove(other);
    const open = document.body.classList.toggle(cls);
    this.syncDrawer();
    if (open) {
      const target = cls === 'drawer-open' ? $('sidebar') : $('members');
      target.querySelector('button, [tabindex]')?.focus();
    }
  }

  closeDrawers() {
    const wasOpen = document.body.classList.contains('drawer-open') || document.body.classList.contains('members-open');
    document.body.classList.remove('drawer-open', 'members-open');
    this.syncDrawer();
    if (wasOpen && window.matchMedia('(max-width: 960px)').matches) $('menu-btn').focus({ preventScroll: true });
  }

  syncDrawer() {
    const b = document.body.classList;
    const narrow = window.matchMedia('(max-width: 960px)').matches;
    $('menu-btn').setAttribute('aria-expanded', String(b.contains('drawer-open')));
    $('members-btn').setAttribute('aria-expanded', String(narrow ? b.contains('members-open') : !b.contains('members-hidden')));
    $('scrim').hidden = !(b.contains('drawer-open') || b.contains('members-open'));
  }

  // ---------- dialogs ----------

  openJoin() {
    $('join-input').value = '';
    $('join-error').textContent = '';
    $('room-browser').replaceChildren(h('li', { class: 'hint', text: 'Loading…' }));
    $('join-dialog').showModal();
    this.app.listRooms();
  }

  renderRoomBrowser(rooms) {
    const list = $('room-browser');
    if (!list) return;
    const sorted = [...rooms].sort((a, b) => (b.online || 0) - (a.online || 0) || a.name.localeCompare(b.name));
    if (!sorted.length) { list.replaceChildren(h('li', { class: 'hint', text: 'No rooms yet — name one to create it.' })); return; }
    list.replaceChildren(...sorted.map((r) => {
      const mine = this.app.convs.has(`#${r.name}`);
      return h('li', {}, h('button', {
        type: 'button',
        class: 'room-pick',
        onclick: () => { $('join-dialog').close('cancel'); this.app.join(r.name); },
      }, h('span', { class: 'room-pick-name', text: `#${r.name}` }),
      h('span', { class: 'room-pick-meta', text: `${r.members} member${r.members === 1 ? '' : 's'} · ${r.online || 0} online${mine ? ' · joined' : ''}` })));
    }));
  }

  openDmDialog() {
    $('dm-input').value = '';
    $('dm-error').textContent = '';
    const known = [...this.app.users.values()].filter((u) => lc(u.user) !== lc(this.app.me?.user));
    $('known-users').replaceChildren(...known.map((u) => h('option', { value: u.user, label: u.nick || u.user })));
    $('dm-dialog').showModal();
  }

  openNick() {
    $('nick-input').value = this.app.me?.nick || '';
    $('nick-error').textContent = '';
    $('nick-dialog').showModal();
    $('nick-input').select();
  }

  nickError(text) { $('nick-error').textContent = text; }

  closeDialog(id) { if ($(id).open) $(id).close('done'); }

  openSettings() {
    const p = this.app.prefs;
    $('pref-sound').checked = p.sound;
    $('pref-volume').value = String(p.volume);
    for (const r of document.querySelectorAll('input[name="notifyOn"]')) r.checked = r.value === p.notifyOn;
    const supported = 'Notification' in window;
    $('pref-desktop').checked = p.desktop && supported && Notification.permission === 'granted';
    $('pref-desktop').disabled = !supported;
    $('desktop-note').textContent = supported ? '' : 'This browser has no desktop notifications.';
    $('settings-dialog').showModal();
  }

  showHelp(help) {
    const list = h('dl', { class: 'help-list' });
    for (const [cmd, what] of help) list.append(h('dt', {}, h('code', { text: cmd })), h('dd', { text: what }));
    this.toast(list, 'info', 12000);
  }

  // ---------- status, toasts, announcements ----------

  /** Shows the connection state (a Connection 'status' detail; none: redraw the last one). */
  renderStatus({ state, retryAt } = { state: this.statusState, retryAt: this.retryAt }) {
    if (!state) return;
    const app = this.app;
    const el = $('connection-status');
    el.dataset.state = state;
    const secs = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
    // The socket is open but not signed in: signing in, waiting to sign in again (the server
    // refused `resume` for a passing reason), or nothing (the login form is up).
    const authSecs = app.authRetryAt ? Math.max(0, Math.ceil((app.authRetryAt - Date.now()) / 1000)) : null;
    const openText = authSecs !== null ? `Signing in again in ${authSecs} s`
      : app.authPending ? 'Signing in…' : 'Not signed in';
    const text = {
      connecting: 'Connecting…',
      open: openText,
      ready: 'Connected',
      waiting: `Offline · retrying in ${secs} s`,
      stopped: 'Offline',
    }[state] || state;
    el.textContent = text;
    el.title = state === 'waiting' ? 'Click to reconnect now' : '';
    this.statusState = state;
    this.retryAt = retryAt;
    let boot = 'Connecting…';
    if (state === 'waiting') boot = `Cannot reach the server · retrying in ${secs} s`;
    else if (state === 'open' && authSecs !== null) {
      boot = app.authRetryCode === 'rate_limited'
        ? `Too many sign-ins from this address · trying again in ${authSecs} s`
        : `The server could not sign you in just now · trying again in ${authSecs} s`;
    } else if (state === 'open') boot = 'Signing in…';
    $('boot-status').textContent = boot;
    // The login form says "Signing in…" only while a sign-in is really under way.
    if (state === 'ready') this.loginStatus('');
    else if (!app.me) {
      this.loginStatus(state === 'waiting' ? `Cannot reach the server · retrying in ${secs} s`
        : state === 'open' ? (app.authPending ? 'Signing in…' : '') : text);
    }
    if (state !== this.prevState) {
      if (state === 'waiting' && this.prevState === 'ready') this.announce('Connection lost. Reconnecting…');
      if (state === 'ready' && this.prevState && this.prevState !== 'ready') this.announce('Connected.');
    }
    this.prevState = state;
    document.body.classList.toggle('offline', state !== 'ready');
  }

  toast(content, kind = 'info', ms = 5000) {
    const t = h('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' });
    t.append(typeof content === 'string' ? h('span', { text: content }) : content);
    const close = h('button', { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss', text: '×', onclick: () => t.remove() });
    t.append(close);
    $('toasts').append(t);
    setTimeout(() => t.remove(), ms);
  }

  announce(text) {
    const live = $('live');
    live.append(h('p', { text }));
    while (live.childNodes.length > 5) live.firstChild.remove();
  }

  // ---------- rendering ----------

  /** Coalesces renders into one per animation frame. */
  renderAll(opts = {}) {
    const p = this.pendingOpts;
    this.pendingOpts = {
      scrollToBottom: p.scrollToBottom || opts.scrollToBottom,
      anchor: p.anchor || opts.anchor,
      newMessage: p.newMessage || (opts.newMessage && opts.key === this.app.current),
    };
    if (this.frame) return;
    let done = false;
    const run = () => {
      if (done) return;
      done = true;
      this.frame = 0;
      const o = this.pendingOpts;
      this.pendingOpts = {};
      this.renderNow(o);
    };
    // rAF does not run in hidden tabs (where the title's unread count must still change):
    // a timeout backs it up.
    this.frame = 1;
    requestAnimationFrame(run);
    setTimeout(run, 100);
  }

  renderNow(opts) {
    if (!this.app.me) return;
    this.renderMe();
    this.renderSidebar();
    this.renderHeader();
    this.renderMessages(opts);
    this.renderMembers();
    this.renderTyping();
    this.renderTitle();
  }

  renderMe() {
    const me = this.app.me;
    $('me-nick').textContent = me.nick;
    $('me-user').textContent = `@${me.user}`;
    const av = $('me-avatar');
    av.className = `avatar ${avatarClass(me.user)}`;
    av.textContent = initial(me.nick);
  }

  convItem(conv) {
    const active = conv.key === this.app.current;
    const label = conv.kind === 'room' ? conv.name : conv.display;
    const u = conv.kind === 'dm' ? this.app.users.get(conv.name) : null;
    const badge = conv.unread ? h('span', {
      class: `badge${conv.mentioned ? ' badge-mention' : ''}`,
      'data-testid': 'unread',
      text: conv.unread > 99 ? '99+' : String(conv.unread),
    }) : null;
    const a11y = `${conv.kind === 'room' ? `Room ${conv.name}` : `Direct messages with ${label}`}${conv.unread ? `, ${conv.unread} unread` : ''}`;
    return h('li', {},
      h('button', {
        type: 'button',
        class: `conv${active ? ' active' : ''}${conv.unread ? ' has-unread' : ''}`,
        'aria-current': active ? 'page' : undefined,
        'aria-label': a11y,
        dataset: { key: conv.key },
        onclick: () => this.app.select(conv.key),
      },
      conv.kind === 'room'
        ? h('span', { class: 'conv-hash', 'aria-hidden': 'true', text: '#' })
        : h('span', { class: `dot ${u?.online ? 'on' : 'off'}`, 'aria-hidden': 'true' }),
      h('span', { class: 'conv-name', text: label }),
      badge));
  }

  renderSidebar() {
    const convs = [...this.app.convs.values()];
    const rooms = convs.filter((c) => c.kind === 'room').sort((a, b) => a.name.localeCompare(b.name));
    const dms = convs.filter((c) => c.kind === 'dm').sort((a, b) => lc(a.display).localeCompare(lc(b.display)));
    $('room-list').replaceChildren(...rooms.map((c) => this.convItem(c)));
    $('dm-list').replaceChildren(...dms.map((c) => this.convItem(c)));
    $('dm-empty').hidden = dms.length > 0;
    const unreadElsewhere = convs.filter((c) => c.key !== this.app.current).reduce((n, c) => n + c.unread, 0);
    $('menu-badge').hidden = !unreadElsewhere;
    $('menu-badge').textContent = String(unreadElsewhere);
  }

  renderHeader() {
    const conv = this.app.conv;
    const title = $('conv-title');
    const sub = $('conv-sub');
    const leave = $('leave-btn');
    if (!conv) {
      title.textContent = 'No conversation';
      sub.textContent = 'Join a room to start chatting.';
      leave.hidden = true;
      $('composer').placeholder = 'Type /join ROOM';
      return;
    }
    leave.hidden = false;
    if (conv.kind === 'room') {
      title.textContent = `#${conv.name}`;
      const ms = [...conv.members.values()];
      const on = ms.filter((m) => m.online).length;
      sub.textContent = ms.length ? `${ms.length} member${ms.length === 1 ? '' : 's'} · ${on} online` : '';
      leave.textContent = 'Leave';
      leave.title = 'Leave this room (/leave)';
      $('composer').placeholder = `Message #${conv.name}`;
    } else {
      const u = this.app.users.get(conv.name);
      title.textContent = conv.display;
      sub.textContent = u ? `@${u.user} · ${lastSeen(u)}` : `@${conv.name}`;
      leave.textContent = 'Close';
      leave.title = 'Close this conversation';
      $('composer').placeholder = `Message ${conv.display}`;
    }
  }

  renderTitle() {
    const total = [...this.app.convs.values()].reduce((n, c) => n + c.unread, 0);
    const conv = this.app.conv;
    const name = conv ? (conv.kind === 'room' ? `#${conv.name}` : conv.display) : 'Parlor';
    document.title = `${total ? `(${total}) ` : ''}${name} — Parlor`;
  }

  renderTyping() {
    const conv = this.app.conv;
    const el = $('typing');
    const text = conv ? typingText(typingNicks(conv)) : '';
    if (el.textContent !== text) el.textContent = text;
    el.classList.toggle('active', Boolean(text));
  }

  renderHistoryTop() {
    const conv = this.app.conv;
    const top = $('history-top');
    if (!conv) { top.replaceChildren(); return; }
    let text = '';
    if (!conv.loaded) text = 'Loading…';
    else if (conv.loadingOlder) text = 'Loading older messages…';
    else if (!conv.more) text = conv.kind === 'room' ? `This is the beginning of #${conv.name}.` : `This is the beginning of your conversation with ${conv.display}.`;
    const node = conv.loaded && conv.more && !conv.loadingOlder
      ? h('button', { type: 'button', class: 'btn btn-ghost small', text: 'Load older messages', onclick: () => this.app.loadOlder() })
      : h('p', { class: 'history-note', text });
    top.replaceChildren(node);
  }

  nearBottom() {
    const box = $('messages');
    return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  }

  scrollToBottom(smooth = false) {
    const box = $('messages');
    box.scrollTo({ top: box.scrollHeight, behavior: smooth ? 'smooth' : 'auto' });
    $('jump-btn').hidden = true;
  }

  /** Remembers the distance from the bottom, so prepending older messages doesn't move the view. */
  scrollAnchor() {
    const box = $('messages');
    return { fromBottom: box.scrollHeight - box.scrollTop };
  }

  messageNode(conv, m, pending) {
    const me = this.app.me;
    const own = lc(m.from) === lc(me.user);
    const mention = !own && mentions(m.text, [me.user, me.nick]);
    const cacheKey = pending ? `p:${m.ref}` : `m:${m.id}`;
    const sig = pending ? `${m.state}|${m.error || ''}|${this.app.conn.isReady}` : `${m.nick}|${me.nick}`;
    const cached = this.msgCache.get(cacheKey);
    if (cached && cached.sig === sig) return cached.li;

    const li = h('li', {
      class: `msg${own ? ' own' : ''}${mention ? ' mention' : ''}${pending ? ` pending ${m.state}` : ''}`,
      'data-testid': 'message',
      dataset: pending ? { ref: m.ref, state: m.state } : { id: String(m.id), from: lc(m.from) },
    });
    if (!pending) li.dataset.id = String(m.id);
    const nick = m.nick || m.from;
    const time = h('time', {
      class: 'msg-time',
      datetime: new Date(m.ts).toISOString(),
      title: fullDate(m.ts),
      dataset: { ts: String(m.ts) },
      text: formatTime(m.ts),
    });
    const who = h('button', {
      type: 'button',
      class: 'msg-nick',
      title: own ? 'You' : `@${m.from} — send a direct message`,
      text: nick,
      onclick: () => { if (!own) this.app.openDm(m.from); },
    });
    const body = h('div', { class: 'msg-body' });
    body.append(renderMarkdown(m.text, { me: [me.user, me.nick] }));
    li.append(
      avatar(m.from, nick, 'msg-avatar'),
      h('div', { class: 'msg-main' },
        h('div', { class: 'msg-head' }, who, m.from && lc(nick) !== lc(m.from) ? h('span', { class: 'msg-user', text: `@${m.from}` }) : null, time),
        body,
        pending ? this.pendingLine(conv, m) : null),
    );
    this.msgCache.set(cacheKey, { li, sig });
    return li;
  }

  pendingLine(conv, p) {
    if (p.state === 'failed') {
      return h('div', { class: 'msg-state failed', role: 'status' },
        h('span', { text: `Not sent${p.error ? ` — ${p.error}` : ''}` }),
        h('button', { type: 'button', class: 'link-btn', 'data-testid': 'retry', text: 'Retry', onclick: () => this.app.retry(conv.key, p.ref) }),
        h('button', { type: 'button', class: 'link-btn', text: 'Discard', onclick: () => this.app.discard(conv.key, p.ref) }));
    }
    let text = 'Sending…';
    if (p.state === 'queued') text = p.error ? `${p.error}…` : this.app.conn.isReady ? 'Waiting to send…' : 'Waiting for connection…';
    return h('div', { class: 'msg-state' }, h('span', { text }));
  }

  renderMessages(opts = {}) {
    const conv = this.app.conv;
    const list = $('message-list');
    const box = $('messages');
    const switched = this.renderedKey !== (conv && conv.key);
    const wasNearBottom = this.nearBottom();
    this.renderHistoryTop();
    if (!conv) {
      list.replaceChildren(h('li', { class: 'empty' }, h('p', { text: 'You are not in any room. Use the + next to “Rooms”, or type /join ROOM.' })));
      this.renderedKey = null;
      return;
    }
    const items = [];
    const sys = [...conv.system];
    let prev = null;
    let prevDay = null;
    const pushSystem = (pred) => {
      while (sys.length && pred(sys[0])) {
        const s = sys.shift();
        items.push(h('li', { class: 'system', text: s.text }));
        prev = null;
      }
    };
    const pushMsg = (m, pending) => {
      const day = startOfDay(m.ts);
      if (day !== prevDay) {
        items.push(h('li', { class: 'day', role: 'separator' }, h('span', { text: dayLabel(m.ts) })));
        prevDay = day;
        prev = null;
      }
      const li = this.messageNode(conv, m, pending);
      const cont = prev && lc(prev.from) === lc(m.from) && m.ts - prev.ts < GROUP_MS && !pending === !prev.pending;
      li.classList.toggle('cont', Boolean(cont));
      items.push(li);
      prev = { from: m.from, ts: m.ts, pending };
    };
    pushSystem((s) => s.afterId === null);
    for (const m of conv.messages) {
      pushMsg(m, false);
      pushSystem((s) => s.afterId !== null && s.afterId <= m.id);
    }
    pushSystem(() => true);
    for (const p of conv.pending) pushMsg(p, true);
    if (!conv.messages.length && !conv.pending.length && conv.loaded) {
      items.push(h('li', { class: 'empty' }, h('p', { text: conv.kind === 'room' ? 'No messages yet. Say hello!' : 'No messages yet.' })));
    }
    list.replaceChildren(...items);
    this.renderedKey = conv.key;

    if (switched || opts.scrollToBottom) this.scrollToBottom();
    else if (opts.anchor) box.scrollTop = box.scrollHeight - opts.anchor.fromBottom;
    else if (opts.newMessage) {
      if (wasNearBottom) this.scrollToBottom();
      else $('jump-btn').hidden = false;
    } else if (wasNearBottom) this.scrollToBottom();
    // A short first page doesn't fill the view: fetch more at once.
    if (conv.loaded && conv.more && !conv.loadingOlder && box.scrollHeight <= box.clientHeight + 10) {
      setTimeout(() => this.app.loadOlder(), 0);
    }
  }

  renderMembers() {
    const conv = this.app.conv;
    const list = $('user-list');
    if (!conv) { list.replaceChildren(); return; }
    const me = this.app.me;
    let members;
    if (conv.kind === 'room') members = sortedMembers(conv);
    else {
      const other = this.app.users.get(conv.name) || { user: conv.name, nick: conv.display };
      members = [other, { user: me.user, nick: me.nick, online: true }];
    }
    $('members-heading').textContent = conv.kind === 'room' ? `Members · ${members.length}` : 'In this conversation';
    list.replaceChildren(...members.map((m) => {
      const isMe = lc(m.user) === lc(me.user);
      const u = this.app.users.get(lc(m.user));
      const online = isMe ? true : Boolean(m.online);
      const status = isMe ? 'you' : lastSeen({ online, last_seen: m.last_seen || u?.last_seen });
      return h('li', { class: 'member-row', dataset: { user: lc(m.user), online: String(online) } },
        h('button', {
          type: 'button',
          class: `member${online ? ' online' : ''}`,
          disabled: isMe ? true : undefined,
          'aria-label': isMe ? `${m.nick || m.user} (you)` : `${m.nick || m.user}, ${status}. Send a direct message`,
          onclick: () => { this.closeDrawers(); this.app.openDm(m.user); },
        },
        h('span', { class: 'avatar-wrap' }, avatar(m.user, m.nick, 'small'), h('span', { class: `presence ${online ? 'on' : 'off'}`, 'aria-hidden': 'true' })),
        h('span', { class: 'member-names' },
          h('span', { class: 'member-nick', text: m.nick || m.user }),
          h('span', { class: 'member-status', text: lc(m.nick || m.user) !== lc(m.user) ? `@${m.user} · ${status}` : status }))));
    }));
  }

  tick() {
    if (this.statusState === 'waiting' || this.app.authRetryAt) this.renderStatus();
    const minute = Math.floor(Date.now() / 60000);
    if (minute !== this.lastMinute) {
      this.lastMinute = minute;
      for (const t of document.querySelectorAll('time.msg-time')) t.textContent = formatTime(Number(t.dataset.ts));
      if (this.app.me) { this.renderMembers(); this.renderHeader(); }
    }
  }
}

export { dmKey };
