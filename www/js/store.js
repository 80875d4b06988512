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
    pending: [],        // {ref, text, ts, state: 'queued'|'sending'|'failed', error}
    unread: 0,
    mentioned: false,
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
 * Returns the messages that were new.
 */
export function addMessages(conv, msgs) {
  const fresh = [];
  for (const m of msgs) {
    if (typeof m.id !== 'number' || conv.ids.has(m.id)) continue;
    conv.ids.add(m.id);
    fresh.push(m);
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

export const lastId = (conv) => (conv.messages.length ? conv.messages[conv.messages.length - 1].id : null);
export const firstId = (conv) => (conv.messages.length ? conv.messages[0].id : null);

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
