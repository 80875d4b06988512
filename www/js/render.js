// Safe message formatting: text → DocumentFragment built with createElement + textContent.
// User text never reaches innerHTML, so markup in a message is shown as typed.
//
// Supported: **bold**, *italic* / _italic_, ~~strike~~, `code`, ``` fenced blocks ```,
// http(s) links (new tab, rel="noopener noreferrer"), @mentions, #room links, line breaks.

const FENCE_RE = /```([^\n`]*)\n?([\s\S]*?)```/g;

// One alternation, tried left to right at the earliest position. Groups:
//  1 code ticks, 2 code body | 3 bold | 4 strike | 5 italic* | 6 italic_ | 7 url | 8 mention | 9 room
const INLINE_RE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,
  /\*\*(?=\S)([\s\S]*?\S)\*\*(?!\*)/.source,
  /~~(?=\S)([\s\S]*?\S)~~/.source,
  /(?<![*\w])\*(?=[^\s*])([\s\S]*?[^\s*])\*(?![*\w])/.source,
  /(?<![_\p{L}\p{N}])_(?=[^\s_])([\s\S]*?[^\s_])_(?![_\p{L}\p{N}])/.source,
  /\b(https?:\/\/[^\s<>"']+)/.source,
  /(?<![\p{L}\p{N}_.-])@([A-Za-z0-9_.-]*[A-Za-z0-9_])/.source,
  /(?<![\p{L}\p{N}_&#\/-])#([a-z0-9_-]{1,32})(?![\p{L}\p{N}_-])/.source,
].join('|'), 'gu');

/** Trailing punctuation that usually ends a sentence, not a URL; keeps balanced parentheses. */
export function trimUrl(url) {
  let u = url;
  for (;;) {
    const last = u.slice(-1);
    if (/[.,;:!?'"]/.test(last)) { u = u.slice(0, -1); continue; }
    if (last === ')') {
      const open = (u.match(/\(/g) || []).length;
      const close = (u.match(/\)/g) || []).length;
      if (close > open) { u = u.slice(0, -1); continue; }
    }
    return u;
  }
}

/** True when `url` is an absolute http(s) URL that the browser parses. */
export function isSafeUrl(url) {
  try {
    const p = new URL(url);
    return p.protocol === 'http:' || p.protocol === 'https:';
  } catch {
    return false;
  }
}

function escapeRe(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** Does `text` mention any of `names` as @name (case-insensitive, whole word)? */
export function mentions(text, names) {
  return names.filter(Boolean).some((n) =>
    new RegExp(`(^|[^\\p{L}\\p{N}_.-])@${escapeRe(n)}(?![\\p{L}\\p{N}_])`, 'iu').test(text));
}

function appendText(parent, text) {
  const lines = text.split('\n');
  lines.forEach((line, i) => {
    if (i > 0) parent.appendChild(document.createElement('br'));
    if (line) parent.appendChild(document.createTextNode(line));
  });
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderInline(text, parent, opts, depth = 0) {
  const re = new RegExp(INLINE_RE.source, INLINE_RE.flags);
  let pos = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    let end = re.lastIndex;
    appendText(parent, text.slice(pos, m.index));
    if (m[1] !== undefined) {
      let body = m[2];
      // `` `a` `` convention: one leading/trailing space is padding.
      if (body.length > 2 && body.startsWith(' ') && body.endsWith(' ')) body = body.slice(1, -1);
      parent.appendChild(el('code', 'md-code', body));
    } else if (m[3] !== undefined || m[4] !== undefined || m[5] !== undefined || m[6] !== undefined) {
      const tag = m[3] !== undefined ? 'strong' : m[4] !== undefined ? 's' : 'em';
      const inner = m[3] ?? m[4] ?? m[5] ?? m[6];
      const node = document.createElement(tag);
      if (depth < 8) renderInline(inner, node, opts, depth + 1);
      else appendText(node, inner);
      parent.appendChild(node);
    } else if (m[7] !== undefined) {
      const url = trimUrl(m[7]);
      end = m.index + url.length;
      re.lastIndex = end;
      if (isSafeUrl(url)) {
        const a = el('a', 'md-link', url);
        a.href = url;
        a.target = '_blank';
        a.rel = 'noopener noreferrer';
        parent.appendChild(a);
      } else {
        appendText(parent, url);
      }
    } else if (m[9] !== undefined) {
      // #room: a same-page link; the UI turns a click into a join.
      const a = el('a', 'md-room', `#${m[9]}`);
      a.href = `#${m[9]}`;
      a.dataset.room = m[9];
      parent.appendChild(a);
    } else {
      const name = m[8];
      const me = (opts.me || []).some((n) => n && n.toLowerCase() === name.toLowerCase());
      parent.appendChild(el('span', me ? 'md-mention md-mention-me' : 'md-mention', `@${name}`));
    }
    pos = end;
  }
  appendText(parent, text.slice(pos));
}

/**
 * Renders message text to a DocumentFragment.
 * opts.me: names (account and nick) whose @mentions are highlighted as "you".
 */
export function renderMarkdown(text, opts = {}) {
  const frag = document.createDocumentFragment();
  const src = String(text ?? '');
  const re = new RegExp(FENCE_RE.source, 'g');
  let pos = 0;
  let m;
  while ((m = re.exec(src)) !== null) {
    if (m.index > pos) renderInline(trimBlockEdges(src.slice(pos, m.index)), frag, opts);
    const pre = el('pre', 'md-pre');
    const code = el('code', 'md-block', m[2].replace(/\n$/, ''));
    const lang = m[1].trim();
    if (/^[\w+#.-]{1,20}$/.test(lang)) code.dataset.lang = lang;
    pre.appendChild(code);
    frag.appendChild(pre);
    pos = re.lastIndex;
  }
  if (pos < src.length) renderInline(pos > 0 ? trimBlockEdges(src.slice(pos)) : src, frag, opts);
  return frag;
}

// A newline right next to a code block is the block's own line break, not an empty line.
function trimBlockEdges(s) {
  return s.replace(/^\n/, '').replace(/\n$/, '');
}

/** Plain-text preview (for notifications and the sidebar): formatting marks stripped, one line. */
export function plainPreview(text, max = 120) {
  const s = String(text).replace(/```[^\n]*\n?/g, '').replace(/[*~`]+/g, '').replace(/\s+/g, ' ').trim();
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
}
