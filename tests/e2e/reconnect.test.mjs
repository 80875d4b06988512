// Server restart: the client reconnects by itself, recovers what was said meanwhile, and sends
// what was typed while offline, each message exactly once.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, say, messages, uname, rawClient, rawUser, waitConnected, countExact } from './helpers.mjs';

let server;
const open = [];
before(async () => { server = await startServer(); });
after(async () => {
  for (const u of open) await u.close();
  await server?.stop();
});

test('server restart: the client reconnects and shows messages sent meanwhile, without duplicates', { timeout: 90000 }, async () => {
  const alice = await launchUser(server);
  open.push(alice);
  const { page } = alice;
  await register(page, uname('alice'));
  const bobName = uname('bob');
  const bob = await rawUser(server, bobName);
  const token = bob.welcome.token;
  bob.send({ type: 'say', room: 'general', text: 'before the restart', ref: 'b1' });
  await messages(page, 'before the restart').waitFor();
  await say(page, 'alice before the restart');
  await messages(page, 'alice before the restart').waitFor();

  const { port, dataDir } = server;
  await server.stop('SIGTERM');
  bob.close();
  const status = page.getByTestId('connection-status');
  await page.locator('[data-testid="connection-status"]:not([data-state="ready"])').waitFor({ timeout: 10000 });
  assert.match(await status.textContent(), /Offline|Connecting|retrying/i);

  // Typed while offline: shown as waiting, sent after the reconnect.
  await say(page, 'typed while offline');
  const queued = page.locator('[data-testid="message"][data-state="queued"]', { hasText: 'typed while offline' });
  await queued.waitFor();

  // Slow this client's backoff down (a test hook on the real connection object) so that Bob
  // speaks before Alice is back: she must then recover his messages with `catchup`.
  await page.evaluate(() => { window.parlor.conn.opts.base = 4000; window.parlor.conn.attempt = 0; });
  await page.waitForTimeout(300);
  server = await startServer({ port, dataDir });
  const bob2 = await rawClient(server);
  const w = await bob2.call({ type: 'resume', token });
  assert.equal(w.type, 'welcome', 'token survives a restart');
  for (let i = 1; i <= 3; i++) await bob2.call({ type: 'say', room: 'general', text: `said while alice was away ${i}` });

  await waitConnected(page, 30000);
  for (let i = 1; i <= 3; i++) await messages(page, `said while alice was away ${i}`).waitFor();
  await messages(page, 'typed while offline').waitFor();
  await bob2.wait((f) => f.type === 'message' && f.text === 'typed while offline');

  // Exactly once each, in id order, nothing left pending.
  await page.waitForTimeout(500);
  const ids = await messages(page).evaluateAll((els) => els.map((e) => Number(e.dataset.id)));
  assert.equal(new Set(ids).size, ids.length, 'no duplicate ids');
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
  for (const t of ['before the restart', 'alice before the restart', 'typed while offline', 'said while alice was away 2']) {
    assert.equal(await countExact(page, t), 1, `"${t}" once`);
  }
  assert.equal(await page.locator('[data-testid="message"][data-state]').count(), 0);

  // And live traffic flows again.
  bob2.send({ type: 'say', room: 'general', text: 'live again', ref: 'b9' });
  await messages(page, 'live again').waitFor();
  bob2.close();
  alice.assertClean();
});

test('a failed message can be retried with the same ref (server deduplicates)', { timeout: 60000 }, async () => {
  const alice = await launchUser(server);
  open.push(alice);
  const { page } = alice;
  await register(page, uname('retry'));
  const room = `retry${process.pid % 1000}`;
  // A room that exists only on the client: the server refuses the message (not_member).
  await page.evaluate((r) => {
    const app = window.parlor;
    app.ensureConv(`#${r}`).loaded = true;
    app.select(`#${r}`);
  }, room);
  await say(page, 'refused at first');
  const failed = page.locator('[data-testid="message"][data-state="failed"]', { hasText: 'refused at first' });
  await failed.waitFor();
  assert.match(await failed.textContent(), /not a member/);
  const ref = await failed.getAttribute('data-ref');

  // Become a member behind the UI's back, then Retry: delivered, with an id, once.
  await page.evaluate((r) => window.parlor.conn.sendNow({ type: 'join', room: r }), room);
  await page.waitForTimeout(300);
  await failed.getByTestId('retry').click();
  await messages(page, 'refused at first').waitFor();
  assert.equal(await countExact(page, 'refused at first'), 1);

  // Sending the same ref again (what a reconnecting client does) stores nothing new.
  const acks = await page.evaluate(async ({ r, ref }) => {
    const seen = [];
    const on = (e) => { if (e.detail.frame.ref === ref) seen.push(e.detail.frame); };
    window.parlor.conn.addEventListener('frame', on);
    window.parlor.conn.sendNow({ type: 'say', room: r, text: 'refused at first', ref });
    await new Promise((res) => setTimeout(res, 800));
    window.parlor.conn.removeEventListener('frame', on);
    return seen;
  }, { r: room, ref });
  assert.equal(acks.length, 1);
  assert.equal(acks[0].type, 'ack', 'the original ack again');
  assert.equal(String(acks[0].id), await messages(page, 'refused at first').getAttribute('data-id'));
  assert.equal(await countExact(page, 'refused at first'), 1, 'no duplicate');
  alice.assertClean();
});
