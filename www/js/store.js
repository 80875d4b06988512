// Client state: conversations (rooms and DMs), their messages deduplicated by id, local pending
// messages by ref, members and presence, typing, unread counts. No DOM here.

export const TYPING_TTL = 5000;

export const roomKey = (room) => `#${room}`;
export const dmKey = (user) => `@${String(user).toLowerCase()}`;
export const lc = (s) => String(s ?? '').toLowerCase();

/** Conversation key of a server `message` frame, seen by `me` (account name). */
export function keyOfMessage(m, me) {
  if (m.room) return roomKey(m.room);
  const other = lc(m.from) === lc(me) ? m.to : m.from;
  return dmKey(other);
}

export function newConv(key, extra = {}) {
  const kind = key.startsWith('#') ? 'room' : 'dm';
  return {
    key,
    kind,
    name: key.slice(1), // room name, or the other user's account name (lower case)
    display: key.slice(1),
    messages: [],       // confirmed, sorted by id
    ids: new Set(),
    byId: new Map(),    // id → message object (the same objects as in `messages`)
    pending: [],        // {ref, text, ts, state: 'queued'|'sending'|'failed', error}
    unread: 0,          // messages by others after the read marker (server count, then live)
    mentions: 0,        // those of them that mention the user (every one, in a DM)
    read: null,         // read marker: the newest message id the user has seen (any device)
    readSent: null,     // the marker last sent to the server from here
    notify: null,       // notification level: 'all' | 'mentions' | 'none' (null: server default)
    divider: null,      // "New" divider: shown above the first message with id > this
    loaded: false,      // initial snapshot received
    more: true,         // older history may exist
    loadingOlder: false,
    members: new Map(), // lc(user) → {user, nick, online, last_seen}
    typing: new Map(),  // lc(user) → {nick, until}
    system: [],         // {after: id, ts, text}: local notices (joins, nick changes)
    ...extra,
  };
}

/**
 * Adds messages to a conversation, ignoring ids already there; keeps `messages` sorted by id.
 * Returns the messages that were new. With `merge`, a message already there takes the state of
 * the incoming copy (a fresh snapshot: `joined`, `history`), see mergeState.
 */
export function addMessages(conv, msgs, { merge = false } = {}) {
  const fresh = [];
  for (const m of msgs) {
    if (typeof m.id !== 'number') continue;
    if (conv.ids.has(m.id)) {
      if (merge) mergeState(conv.byId.get(m.id), m);
      continue;
    }
    const copy = { ...m };
    if (Array.isArray(copy.reactions)) copy.reactions = normalizeReactions(copy.reactions);
    conv.ids.add(m.id);
    conv.byId.set(m.id, copy);
    fresh.push(copy);
  }
  if (!fresh.length) return fresh;
  const last = conv.messages.length ? conv.messages[conv.messages.length - 1].id : -Infinity;
  fresh.sort((a, b) => a.id - b.id);
  if (fresh[0].id > last) conv.messages.push(...fresh);
  else conv.messages = conv.messages.concat(fresh).sort((a, b) => a.id - b.id);
  // A confirmed message makes a pending one with the same ack id redundant.
  const ids = new Set(fresh.map((m) => m.id));
  conv.pending = conv.pending.filter((p) => p.id === undefined || !ids.has(p.id));
  return fresh;
}

/** Forgets every confirmed message of a conversation (before reloading it from the server). */
export function clearMessages(conv) {
  conv.messages = [];
  conv.ids = new Set();
  conv.byId = new Map();
  conv.loaded = false;
  conv.more = true;
  conv.loadingOlder = false;
}

export const findMessage = (conv, id) => conv?.byId.get(id) || null;

function normalizeReactions(list) {
  const out = [];
  for (const r of list) {
    if (!r || typeof r.emoji !== 'string' || !Array.isArray(r.users) || !r.users.length) continue;
    out.push({ emoji: r.emoji, users: [...new Set(r.users.map(String))] });
  }
  return out;
}

/**
 * A snapshot of a message we already have (a `joined` or `history` reply): take its state.
 * A deletion is final; an edit replaces the text only when it is not older than the one shown
 * (a live `edited` may have overtaken the snapshot); reactions are the snapshot's.
 */
export function mergeState(m, snap) {
  if (!m || !snap) return false;
  if (m.deleted) return false;
  if (snap.deleted) return applyDelete(m);
  let changed = false;
  if (typeof snap.text === 'string' && (snap.edited_ts || 0) >= (m.edited_ts || 0) && (snap.text !== m.text || snap.edited_ts !== m.edited_ts)) {
    m.text = snap.text;
    if (snap.edited_ts) m.edited_ts = snap.edited_ts;
    changed = true;
  }
  if (snap.reply_to !== undefined && m.reply_to === undefined) { m.reply_to = snap.reply_to; changed = true; }
  const next = normalizeReactions(Array.isArray(snap.reactions) ? snap.reactions : []);
  if (reactionsSig(next) !== reactionsSig(m.reactions)) { m.reactions = next; changed = true; }
  return changed;
}

/**
 * An `edited` event. Idempotent: a deleted message stays deleted, and an edit older than the one
 * shown (by `edited_ts`, e.g. replayed by a catch-up after a live one) changes nothing.
 * Returns true when the message changed.
 */
export function applyEdit(m, { text, edited_ts: ts }) {
  if (!m || m.deleted || typeof text !== 'string') return false;
  if (m.edited_ts && ts && ts < m.edited_ts) return false;
  if (m.text === text && m.edited_ts === ts) return false;
  m.text = text;
  m.edited_ts = ts || m.edited_ts || Date.now();
  return true;
}

/** A `deleted` event: the message stays, as `deleted`, without text or reactions. */
export function applyDelete(m) {
  if (!m || m.deleted) return false;
  m.deleted = true;
  delete m.text;
  delete m.reactions;
  return true;
}

/**
 * A `reaction` event. Reactions are sets of users per emoji: adding one that is there, or
 * removing one that is not, changes nothing. Emoji keep the order they were first used in.
 */
export function applyReaction(m, { user, emoji, on }) {
  if (!m || m.deleted || typeof emoji !== 'string' || !user) return false;
  const list = m.reactions || (m.reactions = []);
  const i = list.findIndex((r) => r.emoji === emoji);
  const k = lc(user);
  if (on) {
    if (i < 0) { list.push({ emoji, users: [user] }); return true; }
    if (list[i].users.some((u) => lc(u) === k)) return false;
    list[i].users.push(user);
    return true;
  }
  if (i < 0) return false;
  const users = list[i].users.filter((u) => lc(u) !== k);
  if (users.length === list[i].users.length) return false;
  if (users.length) list[i].users = users;
  else list.splice(i, 1);
  return true;
}

/** Did `user` react with `emoji`? */
export function hasReacted(m, emoji, user) {
  const r = (m?.reactions || []).find((x) => x.emoji === emoji);
  return Boolean(r && r.users.some((u) => lc(u) === lc(user)));
}

export const reactionsSig = (list) => (list || []).map((r) => `${r.emoji}:${r.users.join(',')}`).join(';');

/** The last message of `user` in a conversation that can still be edited (not deleted). */
export function lastOwnMessage(conv, user) {
  for (let i = conv.messages.length - 1; i >= 0; i--) {
    const m = conv.messages[i];
    if (lc(m.from) === lc(user) && !m.deleted) return m;
  }
  return null;
}

export const lastId = (conv) => (conv.messages.length ? conv.messages[conv.messages.length - 1].id : null);
export const firstId = (conv) => (conv.messages.length ? conv.messages[0].id : null);

/**
 * Recounts unread and mentions from the loaded messages after the read marker moved, when the
 * loaded messages reach back to it (otherwise the counts are kept, at most the loaded ones).
 * `isMention(m)` says whether a message mentions the user.
 */
export function recountUnread(conv, me, isMention) {
  const read = conv.read ?? -Infinity;
  const after = conv.messages.filter((m) => m.id > read && !m.deleted && lc(m.from) !== lc(me));
  const mentionsAfter = after.filter((m) => conv.kind === 'dm' || isMention(m)).length;
  const complete = !conv.more || (conv.messages.length && conv.messages[0].id <= read);
  if (complete || lastId(conv) === null || (lastId(conv) <= read)) {
    conv.unread = after.length;
    conv.mentions = mentionsAfter;
  } else {
    conv.unread = Math.max(after.length, conv.unread);
    conv.mentions = Math.max(mentionsAfter, conv.mentions);
  }
}

/** Sets the typing state of `user` in `conv` until now + TYPING_TTL. */
export function setTyping(conv, user, nick, now = Date.now()) {
  conv.typing.set(lc(user), { user, nick: nick || user, until: now + TYPING_TTL });
}

/** Removes expired typing entries; returns the nicks still typing. */
export function typingNicks(conv, now = Date.now()) {
  for (const [k, t] of conv.typing) if (t.until <= now) conv.typing.delete(k);
  return [...conv.typing.values()].map((t) => t.nick);
}

/** "alice is typing…", "alice and bob are typing…", "3 people are typing…". */
export function typingText(nicks) {
  if (!nicks.length) return '';
  if (nicks.length === 1) return `${nicks[0]} is typing…`;
  if (nicks.length === 2) return `${nicks[0]} and ${nicks[1]} are typing…`;
  return `${nicks.length} people are typing…`;
}

/** Members sorted: online first, then by nick. */
export function sortedMembers(conv) {
  return [...conv.members.values()].sort((a, b) =>
    (b.online ? 1 : 0) - (a.online ? 1 : 0) || lc(a.nick || a.user).localeCompare(lc(b.nick || b.user)));
}
