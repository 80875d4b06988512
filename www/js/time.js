// Friendly local times. Pure functions: every one takes `now` (ms) so tests are deterministic.

const DAY = 24 * 60 * 60 * 1000;
const WEEKDAYS = ['Sunday', 'Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday'];
const MONTHS = ['January', 'February', 'March', 'April', 'May', 'June', 'July', 'August',
  'September', 'October', 'November', 'December'];

const pad = (n) => String(n).padStart(2, '0');

/** Local midnight (ms) of the day containing `ts`. */
export function startOfDay(ts) {
  const d = new Date(ts);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

/** Whole calendar days between the day of `ts` and the day of `now` (0 = same day, 1 = yesterday). */
export function daysAgo(ts, now) {
  // Round: days around a DST change are 23 or 25 hours long.
  return Math.round((startOfDay(now) - startOfDay(ts)) / DAY);
}

/** "14:05" (24-hour, local). */
export function clock(ts) {
  const d = new Date(ts);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** Short stamp for a message: "14:05", "Yesterday 09:12", "Mon 09:12", "12 Mar 09:12", "12 Mar 2025". */
export function formatTime(ts, now = Date.now()) {
  const d = new Date(ts);
  const ago = daysAgo(ts, now);
  if (ago <= 0) return clock(ts);
  if (ago === 1) return `Yesterday ${clock(ts)}`;
  if (ago < 7) return `${WEEKDAYS[d.getDay()].slice(0, 3)} ${clock(ts)}`;
  const sameYear = d.getFullYear() === new Date(now).getFullYear();
  const date = `${d.getDate()} ${MONTHS[d.getMonth()].slice(0, 3)}`;
  return sameYear ? `${date} ${clock(ts)}` : `${date} ${d.getFullYear()}`;
}

/** Full date and time for a tooltip: "Tuesday, 24 November 2026, 14:05:09". */
export function fullDate(ts) {
  const d = new Date(ts);
  return `${WEEKDAYS[d.getDay()]}, ${d.getDate()} ${MONTHS[d.getMonth()]} ${d.getFullYear()}, ` +
    `${clock(ts)}:${pad(d.getSeconds())}`;
}

/** Label of a day separator: "Today", "Yesterday", "Monday, 12 March" (+ year if not this year). */
export function dayLabel(ts, now = Date.now()) {
  const ago = daysAgo(ts, now);
  if (ago <= 0) return 'Today';
  if (ago === 1) return 'Yesterday';
  const d = new Date(ts);
  const base = `${WEEKDAYS[d.getDay()]}, ${d.getDate()} ${MONTHS[d.getMonth()]}`;
  return d.getFullYear() === new Date(now).getFullYear() ? base : `${base} ${d.getFullYear()}`;
}

/** "just now", "5 min ago", "3 h ago", "yesterday", "4 days ago", or a date. */
export function relative(ts, now = Date.now()) {
  const s = Math.max(0, Math.round((now - ts) / 1000));
  if (s < 60) return 'just now';
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.floor(m / 60);
  if (h < 24 && daysAgo(ts, now) === 0) return `${h} h ago`;
  const ago = daysAgo(ts, now);
  if (ago === 1) return 'yesterday';
  if (ago < 7) return `${ago} days ago`;
  return formatTime(ts, now);
}

/** Presence line of a member: "online", "last seen 5 min ago", or "offline". */
export function lastSeen(member, now = Date.now()) {
  if (member.online) return 'online';
  if (member.last_seen) return `last seen ${relative(member.last_seen, now)}`;
  return 'offline';
}
