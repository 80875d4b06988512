// A stand-in for the Parlor server that speaks protocol v1 in memory, for working on the
// client before (or without) a Rust build: `node mock-server.mjs --listen 127.0.0.1:0 --data DIR
// --www ../../www`. Same flags and the same "parlor listening on ADDR" line as the real binary.
// The e2e suite uses the real server unless PARLOR_E2E_SERVER=mock is set.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { WebSocketServer } from 'ws';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const [host, port] = (args.listen || '127.0.0.1:8080').split(':');
const www = path.resolve(args.www || 'www');
const dataDir = path.resolve(args.data || 'data');
fs.mkdirSync(dataDir, { recursive: true });
const dbFile = path.join(dataDir, 'mock.json');

const CSP = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";
const MIME = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8', '.svg': 'image/svg+xml', '.png': 'image/png', '.ico': 'image/x-icon', '.json': 'application/json' };

let db = { users: {}, tokens: {}, rooms: {}, messages: [], nextId: 1 };
try { db = JSON.parse(fs.readFileSync(dbFile, 'utf8')); } catch { /* fresh */ }
const save = () => fs.writeFileSync(dbFile, JSON.stringify(db));

const conns = new Map(); // ws → {user}
const lastSeen = {};
const refs = new Map(); // user|ref → ack
const sha = (s) => crypto.createHash('sha256').update(s).digest('hex');
const lcu = (s) => String(s).toLowerCase();
const online = (u) => [...conns.values()].some((c) => c.user === u);
const send = (ws, f) => { if (ws.readyState === 1) ws.send(JSON.stringify(f)); };
const toUser = (u, f) => { for (const [ws, c] of conns) if (c.user === u) send(ws, f); };
const roomsOf = (u) => Object.keys(db.rooms).filter((r) => db.rooms[r].includes(u));
const sharing = (u) => new Set(roomsOf(u).flatMap((r) => db.rooms[r]));
const member = (u) => ({ user: u, nick: db.users[u].nick, online: online(u), last_seen: lastSeen[u] || null });
const err = (ws, code, ref, message = code) => send(ws, { type: 'error', code, message, ...(ref ? { ref } : {}) });

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/healthz') { res.end('ok'); return; }
  let p = url.pathname === '/' ? '/index.html' : decodeURIComponent(url.pathname);
  const file = path.join(www, path.normalize(p));
  if (!file.startsWith(www) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) { res.writeHead(404); res.end('not found'); return; }
  const ext = path.extname(file);
  res.writeHead(200, { 'content-type': MIME[ext] || 'application/octet-stream', ...(ext === '.html' ? { 'content-security-policy': CSP } : {}) });
  res.end(fs.readFileSync(file));
});
const wss = new WebSocketServer({ server, path: '/ws' });

function welcome(ws, u, token, ref) {
  const first = !online(u);
  conns.get(ws).user = u;
  conns.get(ws).tokenHash = sha(token);
  send(ws, { type: 'welcome', user: u, nick: db.users[u].nick, token, rooms: roomsOf(u), ...(ref ? { ref } : {}) });
  if (first) for (const o of sharing(u)) if (o !== u) toUser(o, { type: 'presence', user: u, nick: db.users[u].nick, event: 'online' });
}
function newToken(u) { const t = crypto.randomBytes(16).toString('hex'); db.tokens[sha(t)] = u; save(); return t; }
function hist(filter, { before, after, limit = 50 }) {
  let ms = db.messages.filter(filter);
  limit = Math.min(200, limit || 50);
  if (after !== undefined) { ms = ms.filter((m) => m.id > after); return { messages: ms.slice(0, limit), more: ms.length > limit }; }
  if (before !== undefined) ms = ms.filter((m) => m.id < before);
  return { messages: ms.slice(-limit), more: ms.length > limit };
}

wss.on('connection', (ws) => {
  conns.set(ws, { user: null });
  ws.on('message', (data, isBinary) => {
    if (isBinary) { ws.close(1003); return; }
    let f;
    try { f = JSON.parse(data.toString()); } catch { err(ws, 'bad_json'); return; }
    const ref = f.ref;
    const me = conns.get(ws).user;
    if (!me && !['register', 'login', 'resume'].includes(f.type)) { err(ws, 'unauthenticated', ref); return; }
    switch (f.type) {
      case 'register': {
        const u = String(f.user || '');
        if (!/^[A-Za-z0-9_.-]{1,32}$/.test(u)) return err(ws, 'bad_request', ref);
        if (Object.keys(db.users).some((x) => lcu(x) === lcu(u))) return err(ws, 'user_taken', ref);
        if (String(f.password || '').length < 8) return err(ws, 'weak_password', ref);
        db.users[u] = { pw: sha(f.password), nick: u };
        (db.rooms.general ||= []).push(u);
        for (const o of db.rooms.general) if (o !== u) toUser(o, { type: 'presence', room: 'general', user: u, nick: u, event: 'join' });
        return welcome(ws, u, newToken(u), ref);
      }
      case 'login': {
        const u = Object.keys(db.users).find((x) => lcu(x) === lcu(f.user));
        if (!u || db.users[u].pw !== sha(String(f.password))) return err(ws, 'auth_failed', ref);
        return welcome(ws, u, newToken(u), ref);
      }
      case 'resume': {
        const u = db.tokens[sha(String(f.token))];
        if (!u) return err(ws, 'auth_failed', ref);
        return welcome(ws, u, f.token, ref);
      }
      case 'logout': {
        delete db.tokens[conns.get(ws).tokenHash];
        save();
        ws.close(1000);
        return undefined;
      }
      case 'join': {
        const r = String(f.room || '');
        if (!/^[a-z0-9_-]{1,32}$/.test(r)) return err(ws, 'bad_request', ref);
        db.rooms[r] ||= [];
        if (!db.rooms[r].includes(me)) {
          db.rooms[r].push(me); save();
          const pj = { type: 'presence', room: r, user: me, nick: db.users[me].nick, event: 'join' };
          for (const [w, c] of conns) if (w !== ws && db.rooms[r].includes(c.user)) send(w, pj);
        }
        const { messages } = hist((m) => m.room === r, {});
        return send(ws, { type: 'joined', room: r, members: db.rooms[r].map(member), history: messages, ...(ref ? { ref } : {}) });
      }
      case 'leave': {
        const r = f.room;
        if (!db.rooms[r]?.includes(me)) return err(ws, 'not_member', ref);
        db.rooms[r] = db.rooms[r].filter((x) => x !== me); save();
        toUser(me, { type: 'left', room: r, ...(ref ? { ref } : {}) });
        for (const o of db.rooms[r]) toUser(o, { type: 'presence', room: r, user: me, nick: db.users[me].nick, event: 'leave' });
        return undefined;
      }
      case 'rooms':
        return send(ws, { type: 'rooms', rooms: Object.entries(db.rooms).map(([name, ms]) => ({ name, members: ms.length, online: ms.filter(online).length })), ...(ref ? { ref } : {}) });
      case 'who':
        if (!db.rooms[f.room]) return err(ws, 'bad_request', ref);
        return send(ws, { type: 'who', room: f.room, members: db.rooms[f.room].map(member), ...(ref ? { ref } : {}) });
      case 'say':
      case 'dm': {
        const text = String(f.text ?? '');
        if (!text) return err(ws, 'bad_request', ref);
        if ([...text].length > 4000) return err(ws, 'too_long', ref);
        const key = `${me}|${ref}`;
        if (ref && refs.has(key)) return send(ws, refs.get(key));
        let m; let to;
        if (f.type === 'say') {
          if (!db.rooms[f.room]?.includes(me)) return err(ws, 'not_member', ref);
          m = { id: db.nextId++, room: f.room, from: me, nick: db.users[me].nick, text, ts: Date.now() };
        } else {
          to = Object.keys(db.users).find((x) => lcu(x) === lcu(f.to));
          if (!to) return err(ws, 'no_such_user', ref);
          m = { id: db.nextId++, from: me, to, nick: db.users[me].nick, text, ts: Date.now() };
        }
        db.messages.push(m); save();
        const ack = { type: 'ack', ref, id: m.id, ts: m.ts };
        if (ref) refs.set(key, ack);
        send(ws, ack);
        const targets = f.type === 'say' ? db.rooms[f.room] : [...new Set([me, to])];
        for (const u of targets) toUser(u, { type: 'message', ...m });
        return undefined;
      }
      case 'history': {
        const opts = { before: f.before, after: f.after, limit: f.limit };
        if (f.with) {
          const w = Object.keys(db.users).find((x) => lcu(x) === lcu(f.with));
          if (!w) return err(ws, 'no_such_user', ref);
          const r = hist((m) => !m.room && ((m.from === me && m.to === w) || (m.from === w && m.to === me)), opts);
          return send(ws, { type: 'history', with: w, ...r, ...(ref ? { ref } : {}) });
        }
        if (!db.rooms[f.room]?.includes(me)) return err(ws, 'not_member', ref);
        return send(ws, { type: 'history', room: f.room, ...hist((m) => m.room === f.room, opts), ...(ref ? { ref } : {}) });
      }
      case 'nick': {
        const n = String(f.nick || '').trim();
        if (!n || n.length > 32) return err(ws, 'bad_request', ref);
        const taken = Object.keys(db.users).some((x) => x !== me && (lcu(x) === lcu(n) || (online(x) && lcu(db.users[x].nick) === lcu(n))));
        if (taken) return err(ws, 'nick_taken', ref);
        db.users[me].nick = n; save();
        const peers = sharing(me); peers.add(me);
        for (const m of db.messages) if (!m.room && (m.from === me || m.to === me)) { peers.add(m.from); peers.add(m.to); }
        for (const u of peers) toUser(u, { type: 'nick', user: me, nick: n });
        return undefined;
      }
      case 'typing': {
        const fr = { type: 'typing', user: me, nick: db.users[me].nick };
        if (f.room) { for (const u of db.rooms[f.room] || []) if (u !== me) toUser(u, { ...fr, room: f.room }); }
        else if (f.to) { const t = Object.keys(db.users).find((x) => lcu(x) === lcu(f.to)); if (t) toUser(t, { ...fr, to: t }); }
        return undefined;
      }
      default:
        return err(ws, 'unknown_type', ref);
    }
  });
  ws.on('close', () => {
    const u = conns.get(ws).user;
    conns.delete(ws);
    if (u && !online(u)) {
      lastSeen[u] = Date.now();
      for (const o of sharing(u)) if (o !== u) toUser(o, { type: 'presence', user: u, nick: db.users[u].nick, event: 'offline', last_seen: lastSeen[u] });
    }
  });
});

server.listen(Number(port), host, () => {
  const a = server.address();
  console.log(`parlor listening on ${a.address}:${a.port}`);
});
process.on('SIGTERM', () => { for (const ws of wss.clients) ws.close(1001); server.close(); process.exit(0); });
