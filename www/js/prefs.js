// Preferences in localStorage, with defaults and validation, and a change event.

const KEY = 'parlor.prefs.v1';

export const DEFAULTS = Object.freeze({
  sound: true,          // play a sound for new messages
  volume: 0.5,          // 0..1
  notifyOn: 'mentions', // 'all' | 'mentions' (mentions and DMs) | 'none'
  desktop: false,       // desktop notifications when the tab is hidden (opt-in)
  enterSends: true,     // Enter sends, Shift+Enter newline
});

function sanitize(p) {
  const out = { ...DEFAULTS };
  if (typeof p.sound === 'boolean') out.sound = p.sound;
  if (typeof p.volume === 'number' && p.volume >= 0 && p.volume <= 1) out.volume = p.volume;
  if (['all', 'mentions', 'none'].includes(p.notifyOn)) out.notifyOn = p.notifyOn;
  if (typeof p.desktop === 'boolean') out.desktop = p.desktop;
  if (typeof p.enterSends === 'boolean') out.enterSends = p.enterSends;
  return out;
}

export function loadPrefs(storage = globalThis.localStorage) {
  try {
    return sanitize(JSON.parse(storage.getItem(KEY) || '{}') || {});
  } catch {
    return { ...DEFAULTS };
  }
}

export function savePrefs(prefs, storage = globalThis.localStorage) {
  const clean = sanitize(prefs);
  try { storage.setItem(KEY, JSON.stringify(clean)); } catch { /* private mode: keep in memory */ }
  return clean;
}

/**
 * Should a message of this kind make a sound / notification under these prefs and the
 * conversation's notification `level` ('all' | 'mentions' | 'none', the server's per-conversation
 * setting)? 'none' on either side mutes; 'all' on either side alerts for every message; else
 * only mentions and DMs do.
 */
export function wantsAlert(prefs, { mention, dm, level = 'mentions' }) {
  if (prefs.notifyOn === 'none' || level === 'none') return false;
  if (prefs.notifyOn === 'all' || level === 'all') return true;
  return Boolean(mention || dm);
}

// Small per-user keyed storage (session token, known DM partners, last room).
export const store = {
  get(key, fallback = null) {
    try {
      const v = localStorage.getItem(`parlor.${key}`);
      return v === null ? fallback : JSON.parse(v);
    } catch { return fallback; }
  },
  set(key, value) {
    try { localStorage.setItem(`parlor.${key}`, JSON.stringify(value)); } catch { /* ignore */ }
  },
  remove(key) {
    try { localStorage.removeItem(`parlor.${key}`); } catch { /* ignore */ }
  },
};
