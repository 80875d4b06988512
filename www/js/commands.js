// Composer commands. Pure: parseCommand(text) tells what the user asked for, without side effects.

export const ROOM_RE = /^[a-z0-9_-]{1,32}$/;
export const USER_RE = /^[A-Za-z0-9_.-]{1,32}$/;

export const HELP = [
  ['/join ROOM', 'join or create a room'],
  ['/leave', 'leave the current room'],
  ['/nick NAME', 'change your display name'],
  ['/msg USER text', 'send a direct message'],
  ['/help', 'show this list'],
  ['//text', 'send a message starting with "/"'],
];

/** Normalises what a person types as a room name: "#Rust" → "rust". */
export function normalizeRoom(s) {
  return String(s || '').trim().replace(/^#/, '').toLowerCase();
}

/**
 * Parses a composer line.
 * Returns {type:'say', text} for a plain message, {type:'nick'|'join'|'leave'|'msg'|'help', ...}
 * for a command, or {type:'error', message} when the command is malformed.
 */
export function parseCommand(input) {
  const text = String(input);
  if (text.startsWith('//')) return { type: 'say', text: text.slice(1) };
  if (!text.startsWith('/')) return { type: 'say', text };
  const m = /^\/(\S*)\s*([\s\S]*)$/.exec(text);
  const name = m[1].toLowerCase();
  const rest = m[2];
  switch (name) {
    case 'nick': {
      const nick = rest.trim();
      if (!nick) return { type: 'error', message: 'Usage: /nick NAME' };
      if ([...nick].length > 32) return { type: 'error', message: 'A nick has at most 32 characters.' };
      // eslint-disable-next-line no-control-regex
      if (/[\u0000-\u001f\u007f]/.test(nick)) return { type: 'error', message: 'A nick cannot contain control characters.' };
      return { type: 'nick', nick };
    }
    case 'join': {
      const room = normalizeRoom(rest);
      if (!room) return { type: 'error', message: 'Usage: /join ROOM' };
      if (!ROOM_RE.test(room)) return { type: 'error', message: 'Room names are 1–32 of a–z, 0–9, _ and -.' };
      return { type: 'join', room };
    }
    case 'leave':
    case 'part': {
      const room = normalizeRoom(rest);
      if (room && !ROOM_RE.test(room)) return { type: 'error', message: 'Usage: /leave [ROOM]' };
      return { type: 'leave', room: room || null };
    }
    case 'msg':
    case 'dm': {
      const mm = /^@?(\S+)\s+([\s\S]+)$/.exec(rest.trim());
      if (!mm) return { type: 'error', message: 'Usage: /msg USER text' };
      if (!USER_RE.test(mm[1])) return { type: 'error', message: `“${mm[1]}” is not a valid user name.` };
      return { type: 'msg', to: mm[1], text: mm[2] };
    }
    case 'help':
    case '?':
      return { type: 'help' };
    default:
      return { type: 'error', message: `Unknown command /${name}. Type /help for the list, or //text to send text starting with "/".` };
  }
}
