// Everything that touches the DOM. Builds nodes with createElement/textContent only.

import { renderMarkdown, mentions, plainPreview } from './render.js';
import { formatTime, fullDate, dayLabel, startOfDay, lastSeen } from './time.js';
import {
  typingNicks, typingText, sortedMembers, lc, dmKey, reactionsSig, lastOwnMessage, hasReacted,
} from './store.js';
import { parseCommand } from './commands.js';
import { chime, unlockAudio } from './sound.js';

const $ = (id) => document.getElementById(id);
const GROUP_MS = 5 * 60 * 1000;
const LONG_PRESS_MS = 450;

/** The emoji picker's built-in set (no web fonts, no CDN: the system's emoji font draws them). */
export const COMMON_EMOJI = [
  ['👍', 'thumbs up'], ['👎', 'thumbs down'], ['❤️', 'red heart'], ['😂', 'tears of joy'],
  ['😄', 'grinning face'], ['😮', 'surprised'], ['😢', 'crying face'], ['🎉', 'party popper'],
  ['🙏', 'folded hands'], ['👀', 'eyes'], ['🔥', 'fire'], ['🚀', 'rocket'],
  ['✅', 'check mark'], ['❌', 'cross mark'], ['💯', 'hundred points'], ['🤔', 'thinking face'],
  ['😍', 'heart eyes'], ['🙌', 'raising hands'], ['👏', 'clapping hands'], ['😅', 'sweat smile'],
  ['🤝', 'handshake'], ['💡', 'light bulb'], ['⚠️', 'warning'], ['☕', 'coffee'],
];
const EMOJI_NAMES = new Map(COMMON_EMOJI);

const SVG_NS = 'http://www.w3.org/2000/svg';
const ICONS = {
  reply: ['M9 14L4 9l5-5', 'M4 9h10.5a5.5 5.5 0 010 11H11'],
  react: ['M12 21a9 9 0 100-18 9 9 0 000 18z', 'M8 14s1.5 2 4 2 4-2 4-2', 'M9 9.5h.01', 'M15 9.5h.01'],
  edit: ['M4 20h4L19 9l-4-4L4 16v4z', 'M14 6l4 4'],
  delete: ['M3 6h18', 'M8 6V4h8v2', 'M19 6l-1 14H6L5 6', 'M10 11v5', 'M14 11v5'],
  copy: ['M9 9h11v11H9z', 'M5 15H4V4h11v1'],
};

function icon(name) {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  for (const d of ICONS[name]) {
    const p = document.createElementNS(SVG_NS, 'path');
    p.setAttribute('d', d);
    svg.append(p);
  }
  return svg;
}

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
    this.compose = null;      // {mode: 'reply'|'edit', key, id, draft}: what the composer is doing
    this.actionsFor = null;   // id of the message whose actions are held open (long press, picker)
    this.picker = null;       // {key, id} while the emoji picker is open
    this.deleteTarget = null; // {key, id} while the delete confirmation is open
    this.press = null;        // a touch that may become a long press
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
    this.closePicker(false);
    this.compose = null;
    this.actionsFor = null;
    this.renderBanner();
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
      if (this.mentionKey(e)) return;
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && app.prefs.enterSends) {
        e.preventDefault();
        this.submitComposer();
      } else if (e.key === 'Escape') {
        if (this.compose) {
          e.preventDefault();
          this.cancelCompose();
        } else {
          composer.blur();
        }
      } else if (e.key === 'ArrowUp' && !composer.value && !e.isComposing
        && !e.altKey && !e.ctrlKey && !e.metaKey && !e.shiftKey) {
        // ↑ in an empty composer edits one's last message.
        const conv = app.conv;
        const m = conv && app.me ? lastOwnMessage(conv, app.me.user) : null;
        if (m) {
          e.preventDefault();
          this.startEdit(conv.key, m.id);
        }
      }
    });
    composer.addEventListener('blur', () => setTimeout(() => this.closeMentions(), 150));
    composer.addEventListener('click', () => this.updateMentions());
    composer.addEventListener('input', () => {
      this.updateMentions();
      const v = composer.value;
      if (v && !v.startsWith('/') && this.compose?.mode !== 'edit') app.typing();
    });
    $('compose-cancel').addEventListener('click', () => this.cancelCompose());

    const box = $('messages');
    box.addEventListener('scroll', () => {
      if (box.scrollTop < 120) app.loadOlder();
      if (this.nearBottom()) {
        $('jump-btn').hidden = true;
        app.maybeRead();
      }
    }, { passive: true });
    $('jump-btn').addEventListener('click', () => this.scrollToBottom(true));
    // #room links in messages join (or open) the room.
    $('message-list').addEventListener('click', (e) => {
      const a = e.target.closest('a.md-room');
      if (!a) return;
      e.preventDefault();
      app.join(a.dataset.room);
    });
    this.bindMessageActions();

    $('menu-btn').addEventListener('click', () => this.toggleDrawer('drawer-open'));
    $('close-drawer').addEventListener('click', () => this.closeDrawers());
    $('members-btn').addEventListener('click', () => this.toggleDrawer('members-open'));
    $('close-members').addEventListener('click', () => this.closeDrawers());
    $('scrim').addEventListener('click', () => this.closeDrawers());
    $('notify-level').addEventListener('change', (e) => {
      if (app.current) app.setNotify(app.current, e.target.value);
    });
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

    // Search: Ctrl+K (⌘K), or "/" when not typing somewhere.
    document.addEventListener('keydown', (e) => {
      if (!app.me) return;
      const typingInField = e.target.closest?.('input, textarea, select, [contenteditable]');
      const ctrlK = (e.ctrlKey || e.metaKey) && !e.altKey && !e.shiftKey && lc(e.key) === 'k';
      const slash = e.key === '/' && !e.ctrlKey && !e.metaKey && !e.altKey && !typingInField;
      if ((ctrlK || slash) && !document.querySelector('dialog[open]:not(#search-dialog)')) {
        e.preventDefault();
        this.openSearch();
      }
    });
    $('search-btn').addEventListener('click', () => this.openSearch());
    $('search-input').addEventListener('input', () => {
      clearTimeout(this.searchTimer);
      this.searchTimer = setTimeout(() => this.runSearch(), 300);
    });
    $('search-form').addEventListener('submit', (e) => {
      e.preventDefault();
      clearTimeout(this.searchTimer);
      this.runSearch();
    });
    $('search-close').addEventListener('click', () => $('search-dialog').close());
    $('search-more').addEventListener('click', () => {
      const q = $('search-input').value.trim();
      if (q && this.searchLast) this.app.search(q, this.searchLast);
    });
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

  // ---------- search ----------

  openSearch() {
    const d = $('search-dialog');
    if (!d.open) d.showModal();
    const input = $('search-input');
    input.focus();
    input.select();
  }

  runSearch() {
    const q = $('search-input').value.trim();
    this.searchLast = null;
    if (!/[\p{L}\p{N}]/u.test(q)) {
      this.app.searchRef = null;
      $('search-results').replaceChildren();
      $('search-status').textContent = q ? 'Type a word to search for.' : '';
      $('search-more').hidden = true;
      return;
    }
    $('search-status').textContent = 'Searching…';
    this.app.search(q);
  }

  searchError(text) {
    $('search-status').textContent = text;
  }

  /** Results (newest first) grouped by conversation, in the order of their newest result. */
  renderSearchResults(results, more, append) {
    const box = $('search-results');
    if (!append) { box.replaceChildren(); this.searchGroups = new Map(); }
    for (const m of results) {
      let group = this.searchGroups.get(m.key);
      if (!group) {
        const conv = this.app.convs.get(m.key);
        const name = m.key.startsWith('#') ? m.key : (conv?.display || this.app.users.get(m.key.slice(1))?.nick || m.key.slice(1));
        const list = h('ul', { class: 'search-list' });
        const sec = h('section', { class: 'search-group', 'data-testid': 'search-group', dataset: { key: m.key } },
          h('h3', { class: 'search-conv', text: m.key.startsWith('#') ? name : `Direct messages with ${name}` }), list);
        box.append(sec);
        group = list;
        this.searchGroups.set(m.key, group);
      }
      group.append(h('li', {},
        h('button', {
          type: 'button',
          class: 'search-result',
          'data-testid': 'search-result',
          dataset: { id: String(m.id), key: m.key },
          onclick: () => { $('search-dialog').close(); this.app.jumpTo(m.key, m.id); },
        },
        h('span', { class: 'search-meta' },
          h('span', { class: 'search-nick', text: m.nick || m.from }),
          h('time', { class: 'search-time', datetime: new Date(m.ts).toISOString(), text: fullDate(m.ts) })),
        h('span', { class: 'search-text', text: plainPreview(m.text || '', 300) }))));
    }
    if (results.length) this.searchLast = results[results.length - 1].id;
    const n = box.querySelectorAll('[data-testid="search-result"]').length;
    $('search-status').textContent = n ? `${n}${more ? '+' : ''} result${n === 1 ? '' : 's'}` : 'No messages found.';
    $('search-more').hidden = !more;
  }

  // ---------- @ autocomplete ----------

  /** The "@prefix" being typed right before the caret, or null. */
  mentionQuery() {
    const c = $('composer');
    if (c.selectionStart !== c.selectionEnd) return null;
    const before = c.value.slice(0, c.selectionStart);
    const m = /(^|[\s(])@([A-Za-z0-9_.-]{0,32})$/.exec(before);
    return m ? { prefix: m[2], start: c.selectionStart - m[2].length - 1, end: c.selectionStart } : null;
  }

  /** Who can be mentioned here: the room's members, or both sides of a DM. */
  mentionCandidates() {
    const conv = this.app.conv;
    const me = this.app.me;
    if (!conv || !me) return [];
    let people;
    if (conv.kind === 'room') people = [...conv.members.values()];
    else {
      const other = this.app.users.get(conv.name) || { user: conv.name, nick: conv.display };
      people = [other];
    }
    return people.filter((p) => p.user && lc(p.user) !== lc(me.user));
  }

  updateMentions() {
    const q = this.mentionQuery();
    if (!q) { this.closeMentions(); return; }
    const p = lc(q.prefix);
    const list = this.mentionCandidates()
      .filter((m) => lc(m.user).startsWith(p) || lc(m.nick || '').startsWith(p))
      .sort((a, b) => (b.online ? 1 : 0) - (a.online ? 1 : 0) || lc(a.nick || a.user).localeCompare(lc(b.nick || b.user)))
      .slice(0, 8);
    if (!list.length) { this.closeMentions(); return; }
    const prevUser = this.mentions?.list[this.mentions.index]?.user;
    let index = list.findIndex((m) => m.user === prevUser);
    if (index < 0) index = 0;
    this.mentions = { q, list, index };
    this.renderMentions();
  }

  renderMentions() {
    const box = $('mention-suggestions');
    const st = this.mentions;
    if (!st) { box.hidden = true; box.replaceChildren(); return; }
    box.replaceChildren(...st.list.map((m, i) => h('li', {
      id: `mention-opt-${i}`,
      role: 'option',
      class: `mention-option${i === st.index ? ' selected' : ''}`,
      'aria-selected': i === st.index ? 'true' : 'false',
      'data-testid': 'mention-option',
      dataset: { user: m.user },
      onmousedown: (e) => { e.preventDefault(); this.insertMention(m.user); },
    }, avatar(m.user, m.nick, 'small'),
    h('span', { class: 'mention-nick', text: m.nick || m.user }),
    lc(m.nick || m.user) !== lc(m.user) ? h('span', { class: 'mention-user', text: `@${m.user}` }) : null)));
    box.hidden = false;
    const c = $('composer');
    c.setAttribute('aria-expanded', 'true');
    c.setAttribute('aria-activedescendant', `mention-opt-${st.index}`);
  }

  closeMentions() {
    if (!this.mentions && $('mention-suggestions').hidden) return;
    this.mentions = null;
    this.renderMentions();
    const c = $('composer');
    c.setAttribute('aria-expanded', 'false');
    c.removeAttribute('aria-activedescendant');
  }

  insertMention(user) {
    const st = this.mentions;
    const c = $('composer');
    const q = this.mentionQuery() || st?.q;
    if (!q) return;
    const text = `@${user} `;
    c.value = c.value.slice(0, q.start) + text + c.value.slice(q.end);
    const pos = q.start + text.length;
    c.setSelectionRange(pos, pos);
    this.closeMentions();
    c.focus();
    c.dispatchEvent(new Event('input', { bubbles: true }));
  }

  /** Keys while the suggestions are open: ↑/↓ move, Enter/Tab insert, Esc closes. */
  mentionKey(e) {
    const st = this.mentions;
    if (!st || e.isComposing || e.altKey || e.ctrlKey || e.metaKey) return false;
    if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      e.preventDefault();
      const n = st.list.length;
      st.index = (st.index + (e.key === 'ArrowDown' ? 1 : -1) + n) % n;
      this.renderMentions();
      return true;
    }
    if ((e.key === 'Enter' && !e.shiftKey) || (e.key === 'Tab' && !e.shiftKey)) {
      e.preventDefault();
      this.insertMention(st.list[st.index].user);
      return true;
    }
    if (e.key === 'Escape') {
      e.preventDefault();
      this.closeMentions();
      return true;
    }
    return false;
  }

  composerHasText() {
    const v = $('composer').value;
    return Boolean(v && !v.startsWith('/') && this.compose?.mode !== 'edit');
  }

  submitComposer() {
    const c = $('composer');
    const text = c.value;
    const mode = this.compose;
    if (mode?.mode === 'edit') {
      if (!text.trim()) {
        // An edit that empties the message: offer to delete it instead.
        this.confirmDelete(mode.key, mode.id);
        return;
      }
      if (this.app.editMessage(mode.key, mode.id, text)) this.cancelCompose();
      c.focus();
      return;
    }
    if (!text.trim()) return;
    const replyTo = mode?.mode === 'reply' && parseCommand(text).type === 'say' ? mode.id : undefined;
    if (this.app.submit(text, { replyTo })) {
      c.value = '';
      if (replyTo !== undefined) this.cancelCompose();
    }
    c.focus();
  }

  // ---------- composer modes: reply and edit ----------

  startReply(key, id) {
    const m = this.app.convs.get(key)?.byId.get(id);
    if (!m || m.deleted) return;
    if (this.compose?.mode === 'edit') this.cancelCompose();
    this.compose = { mode: 'reply', key, id };
    this.closeActions();
    this.renderBanner();
    this.renderAll();
    $('composer').focus();
  }

  startEdit(key, id) {
    const m = this.app.convs.get(key)?.byId.get(id);
    if (!m || m.deleted || !this.app.me || lc(m.from) !== lc(this.app.me.user)) return;
    const c = $('composer');
    const draft = this.compose?.mode === 'edit' ? this.compose.draft : c.value;
    this.compose = { mode: 'edit', key, id, draft };
    this.closeActions();
    c.value = m.text;
    c.focus();
    c.setSelectionRange(c.value.length, c.value.length);
    this.renderBanner();
    this.renderAll();
  }

  /** Leaves reply or edit mode; an edit gives back what was in the composer before it. */
  cancelCompose() {
    const mode = this.compose;
    if (!mode) return;
    this.compose = null;
    if (mode.mode === 'edit') $('composer').value = mode.draft || '';
    this.renderBanner();
    this.renderAll();
  }

  /** Another conversation was opened: its composer is not replying to or editing this one's. */
  leaveCompose(key) {
    if (this.compose && this.compose.key !== key) this.cancelCompose();
    this.closePicker(false);
    this.closeActions();
  }

  /** A message was deleted (here or elsewhere): stop editing it. */
  messageGone(key, id) {
    if (this.compose?.mode === 'edit' && this.compose.id === id) {
      this.cancelCompose();
      this.toast('The message you were editing was deleted.', 'info');
    }
    if (this.picker?.id === id) this.closePicker(false);
  }

  renderBanner() {
    const banner = $('compose-banner');
    const mode = this.compose;
    const conv = mode ? this.app.convs.get(mode.key) : null;
    const m = conv?.byId.get(mode.id);
    if (!mode || !m) {
      banner.hidden = true;
      banner.dataset.mode = '';
      $('compose-banner-text').replaceChildren();
      $('composer').setAttribute('aria-describedby', 'composer-hint');
      return;
    }
    const nick = m.nick || m.from;
    const text = $('compose-banner-text');
    if (mode.mode === 'reply') {
      text.replaceChildren(
        h('span', { class: 'banner-label' }, 'Replying to ', h('strong', { text: nick })),
        h('span', { class: 'banner-preview', text: m.deleted ? 'message deleted' : plainPreview(m.text, 140) }),
      );
      $('compose-cancel').setAttribute('aria-label', 'Cancel the reply');
      $('compose-cancel').title = 'Cancel the reply (Esc)';
    } else {
      text.replaceChildren(
        h('span', { class: 'banner-label' }, h('strong', { text: 'Editing your message' })),
        h('span', { class: 'banner-preview', text: 'Enter to save · Esc to cancel' }),
      );
      $('compose-cancel').setAttribute('aria-label', 'Cancel editing');
      $('compose-cancel').title = 'Cancel editing (Esc)';
    }
    banner.dataset.mode = mode.mode;
    banner.hidden = false;
    $('composer').setAttribute('aria-describedby', 'compose-banner-text composer-hint');
  }

  // ---------- message actions ----------

  bindMessageActions() {
    const list = $('message-list');
    const box = $('messages');
    // Long press (touch): hold the message's actions open.
    list.addEventListener('touchstart', (e) => {
      const li = e.target.closest('li.msg[data-id]');
      this.cancelPress();
      if (!li || e.touches.length !== 1 || e.target.closest('.msg-actions, .reactions, a, .reply-quote')) return;
      const t = e.touches[0];
      const id = Number(li.dataset.id);
      this.press = {
        x: t.clientX,
        y: t.clientY,
        fired: false,
        timer: setTimeout(() => {
          this.press.fired = true;
          this.openActions(id);
          navigator.vibrate?.(10);
        }, LONG_PRESS_MS),
      };
    }, { passive: true });
    list.addEventListener('touchmove', (e) => {
      if (!this.press || this.press.fired) return;
      const t = e.touches[0];
      if (Math.hypot(t.clientX - this.press.x, t.clientY - this.press.y) > 10) this.cancelPress();
    }, { passive: true });
    list.addEventListener('touchend', (e) => {
      const fired = this.press?.fired;
      this.cancelPress();
      if (fired && e.cancelable) e.preventDefault(); // no click after a long press
    });
    list.addEventListener('touchcancel', () => this.cancelPress());
    list.addEventListener('contextmenu', (e) => {
      // A long press on a phone opens the actions, not the browser's menu.
      const li = e.target.closest('li.msg[data-id]');
      if (li && (this.press || window.matchMedia('(pointer: coarse)').matches)) {
        e.preventDefault();
        this.openActions(Number(li.dataset.id));
      }
    });
    // A tap or click elsewhere closes actions held open.
    document.addEventListener('pointerdown', (e) => {
      if (this.picker && !e.target.closest('#emoji-picker, [data-testid="react-button"]')) this.closePicker(false);
      if (this.actionsFor !== null && !this.picker) {
        const li = e.target.closest('li.msg[data-id]');
        if (!li || Number(li.dataset.id) !== this.actionsFor) this.closeActions();
      }
    });
    // Keyboard focus in a message shows its actions (hidden ones are not focusable, so they
    // must stay shown while focus moves from one of them to the next).
    list.addEventListener('focusin', (e) => {
      const li = e.target.closest('li.msg[data-id]');
      if (!li || !e.target.matches(':focus-visible')) return;
      for (const other of list.querySelectorAll('li.kbd-actions')) if (other !== li) other.classList.remove('kbd-actions');
      li.classList.add('kbd-actions');
    });
    list.addEventListener('focusout', (e) => {
      const li = e.target.closest('li.msg[data-id]');
      if (li && !(e.relatedTarget && li.contains(e.relatedTarget))) li.classList.remove('kbd-actions');
    });
    // Keyboard: ↑/↓ move between messages when the log or a message has focus; Tab then
    // reaches the focused message's actions.
    box.addEventListener('keydown', (e) => {
      if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return;
      const cur = e.target.closest?.('li.msg[data-id]');
      if (e.target !== box && e.target !== cur) return;
      const items = [...list.querySelectorAll('li.msg[data-id]')];
      if (!items.length) return;
      let i = null;
      if (e.key === 'ArrowUp') i = cur ? items.indexOf(cur) - 1 : items.length - 1;
      else if (e.key === 'ArrowDown') i = cur ? items.indexOf(cur) + 1 : items.length - 1;
      else if (e.key === 'Home' && cur) i = 0;
      else if (e.key === 'End' && cur) i = items.length - 1;
      else if (e.key === 'Escape' && cur) { e.preventDefault(); box.focus(); return; }
      if (i === null) return;
      e.preventDefault();
      items[Math.max(0, Math.min(items.length - 1, i))].focus();
    });

    const picker = $('emoji-picker');
    picker.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') {
        e.preventDefault();
        e.stopPropagation();
        this.closePicker(true);
        return;
      }
      const opts = [...picker.querySelectorAll('[data-testid="emoji-option"]')];
      const i = opts.indexOf(document.activeElement);
      if (i < 0) return;
      const cols = 8;
      const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols }[e.key];
      if (step === undefined) return;
      e.preventDefault();
      opts[Math.max(0, Math.min(opts.length - 1, i + step))].focus();
    });
    picker.addEventListener('focusout', (e) => {
      // Focus left the picker (Tab past it): close it.
      if (this.picker && e.relatedTarget && !picker.contains(e.relatedTarget)) this.closePicker(false);
    });
    window.addEventListener('resize', () => this.closePicker(false));
    box.addEventListener('scroll', () => { if (this.picker) this.positionPicker(); }, { passive: true });

    $('delete-dialog').addEventListener('close', () => {
      const target = this.deleteTarget;
      this.deleteTarget = null;
      $('delete-preview').textContent = '';
      if (!target || $('delete-dialog').returnValue !== 'ok') return;
      if (this.compose?.mode === 'edit' && this.compose.id === target.id) this.cancelCompose();
      this.app.deleteMessage(target.key, target.id);
    });
  }

  cancelPress() {
    if (this.press) clearTimeout(this.press.timer);
    this.press = null;
  }

  openActions(id) {
    this.actionsFor = id;
    this.syncActionsOpen();
  }

  closeActions() {
    if (this.actionsFor === null) return;
    this.actionsFor = null;
    this.syncActionsOpen();
  }

  syncActionsOpen() {
    for (const li of $('message-list').querySelectorAll('li.msg[data-id]')) {
      li.classList.toggle('actions-open', Number(li.dataset.id) === this.actionsFor);
    }
  }

  actionButton(name, label, testid, onclick, extra = {}) {
    return h('button', {
      type: 'button', class: `act act-${name}`, 'aria-label': label, title: label, 'data-testid': testid, onclick, ...extra,
    }, icon(name));
  }

  messageActions(conv, m, own) {
    const key = conv.key;
    const id = m.id;
    const bar = h('div', { class: 'msg-actions', role: 'group', 'aria-label': 'Message actions', 'data-testid': 'message-actions' });
    bar.append(
      this.actionButton('react', 'Add a reaction', 'react-button', (e) => this.togglePicker(key, id, e.currentTarget),
        { 'aria-haspopup': 'dialog', 'aria-expanded': 'false', 'aria-controls': 'emoji-picker' }),
      this.actionButton('reply', 'Reply', 'reply-button', () => this.startReply(key, id)),
    );
    if (own) {
      bar.append(
        this.actionButton('edit', 'Edit', 'edit-button', () => this.startEdit(key, id)),
        this.actionButton('delete', 'Delete', 'delete-button', () => this.confirmDelete(key, id)),
      );
    }
    bar.append(this.actionButton('copy', 'Copy the text', 'copy-button', () => this.copyText(key, id)));
    return bar;
  }

  async copyText(key, id) {
    const m = this.app.convs.get(key)?.byId.get(id);
    this.closeActions();
    if (!m || m.deleted) return;
    try {
      await navigator.clipboard.writeText(m.text);
    } catch {
      // No async clipboard (plain http on a LAN address): the old way.
      const ta = h('textarea', { class: 'sr-only', 'aria-hidden': 'true' });
      ta.value = m.text;
      document.body.append(ta);
      ta.select();
      try { document.execCommand('copy'); } catch { /* ignore */ }
      ta.remove();
    }
    this.toast('Copied.', 'info', 2000);
  }

  /** The line above a reply: who and what it answers. */
  quoteInfo(conv, id) {
    const o = conv.byId.get(id);
    if (!o) return { loaded: false, sig: `?${id}` };
    const nick = o.nick || o.from;
    const text = o.deleted ? 'message deleted' : plainPreview(o.text, 90);
    return { loaded: true, nick, text, deleted: Boolean(o.deleted), sig: `${nick}|${o.deleted ? 'd' : text}` };
  }

  quoteNode(conv, m, q) {
    const label = q.loaded
      ? `Reply to ${q.nick}: ${q.text}. Show the original message`
      : 'Reply to an earlier message';
    return h('button', {
      type: 'button',
      class: `reply-quote${q.deleted ? ' quote-deleted' : ''}${q.loaded ? '' : ' quote-missing'}`,
      'data-testid': 'reply-quote',
      'aria-label': label,
      title: q.loaded ? 'Show the original message' : 'The original is further back in the history',
      dataset: { replyTo: String(m.reply_to) },
      onclick: () => this.showOriginal(conv.key, m.reply_to),
    },
    h('span', { class: 'quote-arrow', 'aria-hidden': 'true', text: '↪' }),
    q.loaded ? h('span', { class: 'quote-nick', text: q.nick }) : null,
    h('span', { class: 'quote-text', text: q.loaded ? q.text : 'an earlier message' }));
  }

  /** Scrolls to a message of the open conversation and highlights it for a moment. */
  showOriginal(key, id) {
    if (key !== this.app.current) return;
    const li = $('message-list').querySelector(`li.msg[data-id="${Number(id)}"]`);
    if (!li) {
      this.toast('The original message is further back: scroll up to load older messages.', 'info');
      return;
    }
    const smooth = !window.matchMedia('(prefers-reduced-motion: reduce)').matches;
    li.scrollIntoView({ block: 'center', behavior: smooth ? 'smooth' : 'auto' });
    li.classList.remove('flash');
    void li.offsetWidth; // restart the animation
    li.classList.add('flash');
    li.focus({ preventScroll: true });
    clearTimeout(this.flashTimer);
    this.flashTimer = setTimeout(() => li.classList.remove('flash'), 2200);
  }

  reactionChips(conv, m) {
    const me = this.app.me;
    const wrap = h('div', { class: 'reactions', role: 'group', 'aria-label': 'Reactions' });
    for (const r of m.reactions) {
      const mine = r.users.some((u) => lc(u) === lc(me.user));
      const names = r.users.map((u) => this.app.users.get(lc(u))?.nick || u);
      const who = names.join(', ');
      wrap.append(h('button', {
        type: 'button',
        class: `reaction${mine ? ' mine' : ''}`,
        'data-testid': 'reaction',
        'aria-pressed': mine ? 'true' : 'false',
        'aria-label': `${r.emoji} ${r.users.length}: ${who}. ${mine ? 'Remove your reaction' : 'Add your reaction'}`,
        title: `${who} reacted with ${r.emoji}`,
        dataset: { emoji: r.emoji },
        onclick: () => this.app.react(conv.key, m.id, r.emoji, !mine),
      }, h('span', { class: 'reaction-emoji', text: r.emoji }), h('span', { class: 'reaction-count', text: String(r.users.length) })));
    }
    return wrap;
  }

  // ---------- emoji picker ----------

  togglePicker(key, id, anchor) {
    if (this.picker && this.picker.id === id) { this.closePicker(true); return; }
    this.openPicker(key, id, anchor);
  }

  openPicker(key, id, anchor) {
    const m = this.app.convs.get(key)?.byId.get(id);
    if (!m || m.deleted) return;
    this.closePicker(false);
    const picker = $('emoji-picker');
    const me = this.app.me.user;
    const option = (emoji) => {
      const mine = hasReacted(m, emoji, me);
      const name = EMOJI_NAMES.get(emoji) || emoji;
      return h('button', {
        type: 'button',
        class: `emoji-option${mine ? ' mine' : ''}`,
        'data-testid': 'emoji-option',
        'aria-label': `${mine ? 'Remove' : 'React with'} ${name}`,
        'aria-pressed': mine ? 'true' : 'false',
        title: name,
        dataset: { emoji },
        text: emoji,
        onclick: () => {
          this.closePicker(true);
          this.app.react(key, id, emoji, !mine);
        },
      });
    };
    const top = this.app.topEmoji(6);
    const sections = [];
    if (top.length) {
      sections.push(h('p', { class: 'picker-title', id: 'picker-frequent-title', text: 'Frequently used' }),
        h('div', { class: 'emoji-grid', role: 'group', 'aria-labelledby': 'picker-frequent-title', 'data-testid': 'emoji-frequent' }, ...top.map(option)));
    }
    sections.push(h('p', { class: 'picker-title', id: 'picker-common-title', text: 'Reactions' }),
      h('div', { class: 'emoji-grid', role: 'group', 'aria-labelledby': 'picker-common-title', 'data-testid': 'emoji-common' },
        ...COMMON_EMOJI.map(([e]) => option(e))));
    picker.replaceChildren(...sections);
    this.picker = { key, id, anchor };
    picker.hidden = false;
    anchor.setAttribute('aria-expanded', 'true');
    this.openActions(id);
    this.positionPicker();
    picker.querySelector('[data-testid="emoji-option"]')?.focus({ preventScroll: true });
  }

  positionPicker() {
    const p = this.picker;
    const picker = $('emoji-picker');
    if (!p) return;
    // The anchor may have been redrawn: find the message's react button again.
    let anchor = p.anchor;
    if (!anchor.isConnected) {
      anchor = $('message-list').querySelector(`li.msg[data-id="${p.id}"] [data-testid="react-button"]`) || anchor;
      p.anchor = anchor;
    }
    const r = anchor.getBoundingClientRect();
    const pw = picker.offsetWidth;
    const ph = picker.offsetHeight;
    const left = Math.max(8, Math.min(window.innerWidth - pw - 8, r.right - pw));
    let top = r.bottom + 6;
    if (top + ph > window.innerHeight - 8) top = Math.max(8, r.top - ph - 6);
    // CSSOM (element.style) is allowed by the page's CSP; style attributes in markup are not.
    picker.style.left = `${Math.round(left)}px`;
    picker.style.top = `${Math.round(top)}px`;
  }

  /** Closes the picker; `refocus`: give focus back to the message's react button. */
  closePicker(refocus) {
    const p = this.picker;
    if (!p) return;
    this.picker = null;
    $('emoji-picker').hidden = true;
    $('emoji-picker').replaceChildren();
    const btn = $('message-list').querySelector(`li.msg[data-id="${p.id}"] [data-testid="react-button"]`);
    btn?.setAttribute('aria-expanded', 'false');
    if (refocus && btn) {
      // Keep the actions shown while the button has focus, then let go.
      btn.focus({ preventScroll: true });
    }
    this.closeActions();
  }

  // ---------- delete confirmation ----------

  confirmDelete(key, id) {
    const m = this.app.convs.get(key)?.byId.get(id);
    if (!m || m.deleted) return;
    this.closeActions();
    this.deleteTarget = { key, id };
    $('delete-preview').textContent = plainPreview(m.text, 200);
    $('delete-dialog').returnValue = '';
    $('delete-dialog').showModal();
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
      jumpTo: opts.jumpTo ?? p.jumpTo,
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
    this.renderBanner();
    if (this.picker) this.positionPicker();
    this.renderMembers();
    this.renderTyping();
    this.renderTitle();
    this.app.maybeRead();
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
    const count = (n) => (n > 99 ? '99+' : String(n));
    const mentionBadge = conv.mentions ? h('span', {
      class: 'badge badge-mention',
      'data-testid': 'mention-badge',
      title: `${conv.mentions} mention${conv.mentions === 1 ? '' : 's'}`,
      text: count(conv.mentions),
    }) : null;
    const badge = conv.unread ? h('span', {
      class: 'badge',
      'data-testid': 'unread-badge',
      title: `${conv.unread} unread`,
      text: count(conv.unread),
    }) : null;
    const muted = this.app.levelOf(conv) === 'none';
    const a11y = `${conv.kind === 'room' ? `Room ${conv.name}` : `Direct messages with ${label}`}${conv.unread ? `, ${conv.unread} unread` : ''}${conv.mentions ? `, ${conv.mentions} mention${conv.mentions === 1 ? '' : 's'}` : ''}${muted ? ', muted' : ''}`;
    return h('li', {},
      h('button', {
        type: 'button',
        class: `conv${active ? ' active' : ''}${conv.unread ? ' has-unread' : ''}${muted ? ' muted' : ''}`,
        'aria-current': active ? 'page' : undefined,
        'aria-label': a11y,
        dataset: { key: conv.key },
        onclick: () => this.app.select(conv.key),
      },
      conv.kind === 'room'
        ? h('span', { class: 'conv-hash', 'aria-hidden': 'true', text: '#' })
        : h('span', { class: `dot ${u?.online ? 'on' : 'off'}`, 'aria-hidden': 'true' }),
      h('span', { class: 'conv-name', text: label }),
      mentionBadge,
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
    const level = $('notify-level');
    level.hidden = !conv;
    if (conv && document.activeElement !== level) level.value = this.app.levelOf(conv);
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
    const deleted = !pending && Boolean(m.deleted);
    const mention = !own && !deleted && mentions(m.text, [me.user, me.nick]);
    const quote = typeof m.reply_to === 'number' ? this.quoteInfo(conv, m.reply_to) : null;
    const editing = !pending && this.compose?.mode === 'edit' && this.compose.id === m.id;
    const replying = !pending && this.compose?.mode === 'reply' && this.compose.id === m.id;
    const cacheKey = pending ? `p:${m.ref}` : `m:${m.id}`;
    const sig = [
      pending ? `${m.state}|${m.error || ''}|${this.app.conn.isReady}` : `${m.nick}|${me.nick}`,
      deleted ? 'deleted' : `${m.text}|${m.edited_ts || ''}`,
      reactionsSig(m.reactions), quote ? quote.sig : '', editing, replying,
    ].join('\u0001');
    const cached = this.msgCache.get(cacheKey);
    if (cached && cached.sig === sig) return cached.li;

    const li = h('li', {
      class: `msg${own ? ' own' : ''}${mention ? ' mention' : ''}${pending ? ` pending ${m.state}` : ''}${deleted ? ' deleted' : ''}${editing ? ' editing' : ''}${replying ? ' replying' : ''}`,
      'data-testid': 'message',
      tabindex: pending ? undefined : '-1',
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
    if (deleted) {
      body.append(h('span', { class: 'msg-deleted', 'data-testid': 'deleted-mark', text: 'message deleted' }));
    } else {
      body.append(renderMarkdown(m.text, { me: [me.user, me.nick] }));
      if (!pending && m.edited_ts) {
        body.append(h('span', { class: 'edited-mark', 'data-testid': 'edited-mark', title: `Edited ${fullDate(m.edited_ts)}`, text: '(edited)' }));
      }
    }
    // (Element.append would write a null as the text "null": skip the parts a message lacks.)
    li.append(...[
      avatar(m.from, nick, 'msg-avatar'),
      h('div', { class: 'msg-main' },
        quote ? this.quoteNode(conv, m, quote) : null,
        h('div', { class: 'msg-head' }, who, m.from && lc(nick) !== lc(m.from) ? h('span', { class: 'msg-user', text: `@${m.from}` }) : null, time),
        body,
        !deleted && m.reactions?.length ? this.reactionChips(conv, m) : null,
        pending ? this.pendingLine(conv, m) : null),
      !pending && !deleted ? this.messageActions(conv, m, own) : null,
    ].filter(Boolean));
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
      const cont = prev && lc(prev.from) === lc(m.from) && m.ts - prev.ts < GROUP_MS && !pending === !prev.pending
        && typeof m.reply_to !== 'number';
      li.classList.toggle('cont', Boolean(cont));
      if (!pending) li.classList.toggle('actions-open', this.actionsFor === m.id);
      if (!pending) li.classList.toggle('highlight', Boolean(this.highlight && this.highlight.key === conv.key && this.highlight.id === m.id));
      items.push(li);
      prev = { from: m.from, ts: m.ts, pending };
    };
    pushSystem((s) => s.afterId === null);
    let dividerDone = conv.divider === null;
    for (const m of conv.messages) {
      if (!dividerDone && m.id > conv.divider) {
        dividerDone = true;
        if (lc(m.from) !== lc(this.app.me.user) || conv.messages.some((x) => x.id > conv.divider && lc(x.from) !== lc(this.app.me.user))) {
          items.push(h('li', { class: 'unread-divider', role: 'separator', 'data-testid': 'unread-divider', 'aria-label': 'New messages' }, h('span', { text: 'New' })));
          prev = null;
        }
      }
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

    const target = opts.jumpTo !== undefined ? list.querySelector(`li.msg[data-id="${opts.jumpTo}"]`) : null;
    if (target) {
      // A search result: show that message (centred), not the newest.
      target.scrollIntoView({ block: 'center' });
      $('jump-btn').hidden = this.nearBottom();
    } else if (switched || opts.scrollToBottom) {
      // Opening a conversation whose unread messages do not all fit on screen lands on the
      // "New" divider, once: the first unread message is what the person came to read. A
      // later page load of the same conversation leaves them there.
      const divider = list.querySelector('li.unread-divider');
      const landed = divider && conv.landedOn === conv.divider;
      if (!(landed && !switched && !wasNearBottom)) {
        this.scrollToBottom();
        if (divider && !landed && divider.getBoundingClientRect().top < box.getBoundingClientRect().top) {
          conv.landedOn = conv.divider;
          divider.scrollIntoView({ block: 'start' });
          $('jump-btn').hidden = this.nearBottom();
        }
      }
    } else if (opts.anchor) box.scrollTop = box.scrollHeight - opts.anchor.fromBottom;
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
