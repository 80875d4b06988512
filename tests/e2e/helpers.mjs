// Shared e2e plumbing: build and start the real server on a free port with a fresh data dir,
// launch Debian's Chromium (one persistent context = one simulated user), and a raw WebSocket
// client (the `ws` package) for seeding data.
//
// Run: `npm ci && npm test` here (builds target/release/parlor with cargo if it is missing).
// Environment: PARLOR_BIN=path (another server binary), CHROMIUM=path (default /usr/bin/chromium),
// PARLOR_WWW=path (another client, e.g. an older www/ to check that a test catches its bug).
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const WWW = process.env.PARLOR_WWW || path.join(ROOT, 'www');
export const BIN = process.env.PARLOR_BIN || path.join(ROOT, 'target', 'release', 'parlor');
export const SHOTS = path.join(ROOT, 'docs', 'screenshots');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const PASSWORD = 'correct horse battery';

const tmpDirs = [];
export function tmpDir(prefix) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `parlor-e2e-${prefix}-`));
  tmpDirs.push(d);
  return d;
}
process.on('exit', () => {
  for (const d of tmpDirs) { try { fs.rmSync(d, { recursive: true, force: true }); } catch { /* ignore */ } }
});

let uniq = 0;
/** A user name unique within this run: "alice" → "alice_k3f9_1". */
export function uname(base) {
  uniq += 1;
  return `${base}_${process.pid.toString(36)}${uniq}`;
}

/** A self-signed certificate for localhost/127.0.0.1 made with openssl: { cert, key } paths. */
export function selfSignedCert() {
  const dir = tmpDir('cert');
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-days', '1', '-keyout', key, '-out', cert, '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'], { stdio: 'ignore' });
  return { cert, key };
}

let built = false;
/** Builds the server once per run (a no-op when up to date), so a stale binary is never tested. */
export function ensureBuilt() {
  if (built || process.env.PARLOR_BIN) return;
  execFileSync('cargo', ['build', '--release', '--bin', 'parlor'], { cwd: ROOT, stdio: 'inherit' });
  built = true;
}

/**
 * Starts the server: port 0 (or `port`, for restarts) and a data dir (fresh unless given).
 * `args`: extra server options, e.g. `['--rate-limit', '2', '--rate-burst', '3']`; an option
 * given there replaces the default of the same name (the default is `--rate-limit 0`).
 * Resolves once it printed "parlor listening on ADDR".
 */
export async function startServer({ port = 0, dataDir = tmpDir('data'), args: extra = [], tls = null } = {}) {
  ensureBuilt();
  const args = ['--listen', `127.0.0.1:${port}`, '--data', dataDir, '--www', WWW];
  if (tls) args.push('--tls-cert', tls.cert, '--tls-key', tls.key);
  if (!extra.includes('--rate-limit')) args.push('--rate-limit', '0');
  args.push(...extra);
  const proc = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = [];
  proc.stderr.on('data', (d) => { logs.push(String(d)); if (logs.length > 200) logs.shift(); });
  const addr = await new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: proc.stdout });
    const timer = setTimeout(() => reject(new Error(`server did not start in 30 s:\n${logs.join('')}`)), 30000);
    rl.on('line', (line) => {
      const m = /parlor listening on (\S+)/.exec(line);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited with ${code}:\n${logs.join('')}`)); });
  });
  proc.stdout.resume();
  const actualPort = Number(addr.split(':').pop());
  const server = {
    proc,
    port: actualPort,
    dataDir,
    url: `${tls ? 'https' : 'http'}://127.0.0.1:${actualPort}/`,
    wsUrl: `${tls ? 'wss' : 'ws'}://127.0.0.1:${actualPort}/ws`,
    logs,
    args: extra,
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill(signal);
      const t = setTimeout(() => proc.kill('SIGKILL'), 10000);
      await exited;
      clearTimeout(t);
    },
  };
  return server;
}

const LAUNCH_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

/**
 * One simulated person: a persistent Chromium context with its own profile dir.
 * Collects page errors and CSP violations; `user.assertClean()` fails the test on any.
 */
export async function launchUser(server, { viewport = { width: 1280, height: 800 }, isMobile = false, hasTouch = false, colorScheme = 'light' } = {}) {
  const ctx = await chromium.launchPersistentContext(tmpDir('profile'), {
    // A server started with `tls` has a certificate made by the test (selfSignedCert): a
    // throwaway profile accepts it, for pages and WebSockets alike.
    ignoreHTTPSErrors: server.url.startsWith('https:'),
    executablePath: CHROMIUM,
    headless: true,
    args: LAUNCH_ARGS,
    viewport,
    isMobile,
    hasTouch,
    colorScheme,
    deviceScaleFactor: 1,
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  const problems = [];
  const dialogs = [];
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to|Uncaught/i.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  page.on('dialog', (d) => { dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  await page.goto(server.url);
  return {
    ctx,
    page,
    problems,
    dialogs,
    async close() { await ctx.close().catch(() => {}); },
    assertClean() { assert.deepEqual(problems, [], 'no page errors or CSP violations'); },
  };
}

/** Registers `user` in the page and waits for the chat view. */
export async function register(page, user, password = PASSWORD) {
  await page.getByTestId('login-user').fill(user);
  await page.getByTestId('login-password').fill(password);
  await page.getByTestId('register-submit').click();
  await page.getByTestId('composer').waitFor({ state: 'visible', timeout: 15000 });
  await waitConnected(page);
}

export async function login(page, user, password = PASSWORD) {
  await page.getByTestId('login-user').fill(user);
  await page.getByTestId('login-password').fill(password);
  await page.getByTestId('login-submit').click();
  await page.getByTestId('composer').waitFor({ state: 'visible', timeout: 15000 });
  await waitConnected(page);
}

export async function waitConnected(page, timeout = 15000) {
  await page.locator('[data-testid="connection-status"][data-state="ready"]').waitFor({ timeout });
}

let roomN = 0;
/** A room name unique within this run: "launch" → "launch3-4821". */
export const roomName = (base) => { roomN += 1; return `${base}${roomN}-${process.pid % 10000}`; };

/** Joins (or creates) `room` with `/join` and waits until it is the open conversation. */
export async function joinRoom(page, room) {
  await say(page, `/join ${room}`);
  await page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
}

/** Types and sends with Enter. */
export async function say(page, text) {
  const c = page.getByTestId('composer');
  await c.fill(text);
  await c.press('Enter');
}

/** The confirmed (server-acked, with an id) message elements whose text contains `text`. */
export function messages(page, text) {
  const all = page.locator('[data-testid="message"][data-id]');
  return text === undefined ? all : all.filter({ hasText: text });
}

/** How many confirmed messages have exactly this text. */
export function countExact(page, text) {
  return messages(page).evaluateAll((els, t) => els.filter((e) => e.querySelector('.msg-body').textContent === t).length, text);
}

export async function openRoom(page, room) {
  await page.getByTestId('room-list').getByRole('button', { name: new RegExp(`Room ${room}\\b`) }).click();
}

/** A raw protocol client (Node `ws`), for seeding and for watching what the server sends. */
export async function rawClient(server) {
  const ws = new WebSocket(server.wsUrl);
  const frames = [];
  const waiters = [];
  ws.on('message', (data) => {
    const f = JSON.parse(String(data));
    frames.push(f);
    for (const w of [...waiters]) if (w.pred(f)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(f); }
  });
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject); });
  let n = 0;
  const c = {
    ws,
    frames,
    send(f) { ws.send(JSON.stringify(f)); },
    wait(pred, timeout = 10000) {
      const hit = frames.find(pred);
      if (hit) { frames.splice(frames.indexOf(hit), 1); return Promise.resolve(hit); }
      return new Promise((resolve, reject) => {
        const w = { pred, resolve: (f) => { clearTimeout(t); frames.splice(frames.indexOf(f), 1); resolve(f); } };
        const t = setTimeout(() => { waiters.splice(waiters.indexOf(w), 1); reject(new Error('timeout waiting for a frame')); }, timeout);
        waiters.push(w);
      });
    },
    /** Sends a frame with a fresh ref and waits for the reply carrying that ref. */
    async call(f) {
      n += 1;
      const ref = `seed-${n}-${Math.random().toString(36).slice(2)}`;
      c.send({ ...f, ref });
      const reply = await c.wait((x) => x.ref === ref);
      if (reply.type === 'error') throw new Error(`${f.type}: ${reply.code} ${reply.message}`);
      return reply;
    },
    close() { ws.close(); },
  };
  return c;
}

/** A raw client registered as `user`. */
export async function rawUser(server, user, password = PASSWORD) {
  const c = await rawClient(server);
  const w = await c.call({ type: 'register', user, password });
  assert.equal(w.type, 'welcome');
  c.welcome = w;
  return c;
}

export function saveShot(page, name) {
  fs.mkdirSync(SHOTS, { recursive: true });
  return page.screenshot({ path: path.join(SHOTS, name) });
}
