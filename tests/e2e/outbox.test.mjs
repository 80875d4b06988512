// The outbox: what the person typed is never reordered or lost. Messages refused with
// `rate_limited` are retried in typed order; a `/msg` to a user who does not exist gives the
// typed line back.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, say, messages, uname, rawUser } from './helpers.mjs';

let server;
const open = [];
before(async () => {
  // Per user: 2 messages a second, bursts of 3. (This also turns the registration throttle
  // on — 20 per minute per address — which these few accounts stay under.)
  server = await startServer({ args: ['--rate-limit', '2', '--rate-burst', '3'] });
});
after(async () => {
  for (const u of open) await u.close();
  await server?.stop();
});

test('messages typed faster than the rate limit arrive once each, in typed order', { timeout: 90000 }, async () => {
  const alice = await launchUser(server);
  open.push(alice);
  const { page } = alice;
  const name = uname('alice');
  await register(page, name);
  const bob = await rawUser(server, uname('bob')); // another member of #general, watching

  // Typed quickly, like a person pasting lines one after another: most of them are refused
  // with rate_limited at first and must be retried.
  const texts = Array.from({ length: 12 }, (_, i) => `burst line ${String(i + 1).padStart(2, '0')}`);
  for (const t of texts) {
    await say(page, t);
    await page.waitForTimeout(150);
  }
  // The composer kept nothing, and every line is shown (confirmed by the server).
  assert.equal(await page.getByTestId('composer').inputValue(), '');
  await messages(page, texts[texts.length - 1]).waitFor({ timeout: 45000 });
  await page.locator('[data-testid="message"][data-state]').first().waitFor({ state: 'detached', timeout: 45000 });

  // What Alice sees: exactly the typed lines, in typed order, with increasing ids.
  const shown = await messages(page, 'burst line').evaluateAll((els) => els.map((e) => ({
    id: Number(e.dataset.id), text: e.querySelector('.msg-body').textContent,
  })));
  assert.deepEqual(shown.map((m) => m.text), texts, 'shown in typed order, each once');
  for (let i = 1; i < shown.length; i++) assert.ok(shown[i].id > shown[i - 1].id, 'ids increase');

  // What is stored (and what everyone else gets): the same order.
  const h = await bob.call({ type: 'history', room: 'general', limit: 100 });
  const stored = h.messages.filter((m) => m.from === name).map((m) => m.text);
  assert.deepEqual(stored, texts, 'stored in typed order, each once');
  assert.deepEqual(h.messages.filter((m) => m.from === name).map((m) => m.id), shown.map((m) => m.id));
  const live = bob.frames.filter((f) => f.type === 'message' && f.from === name).map((f) => f.text);
  assert.deepEqual(live, texts, 'delivered live to another member in typed order');

  // And after a reload (history from the server), still the same.
  await page.reload();
  await messages(page, texts[texts.length - 1]).waitFor({ timeout: 15000 });
  const reloaded = await messages(page, 'burst line').evaluateAll((els) => els.map((e) => e.querySelector('.msg-body').textContent));
  assert.deepEqual(reloaded, texts);
  bob.close();
  alice.assertClean();
});

test('/msg to a user who does not exist says so and keeps the typed line in the composer', { timeout: 60000 }, async () => {
  const alice = await launchUser(server);
  open.push(alice);
  const { page } = alice;
  await register(page, uname('carol'));
  await page.locator('#conv-title', { hasText: '#general' }).waitFor();

  const line = '/msg nosuchperson_zz hello there, are you around?';
  const c = page.getByTestId('composer');
  await c.fill(line);
  await c.press('Enter');

  // The error is shown…
  await page.locator('.toast', { hasText: /no user called “nosuchperson_zz”/ }).waitFor({ timeout: 10000 });
  // …and nothing typed is lost: the line is back in the composer, ready to be corrected.
  await page.waitForTimeout(300);
  assert.equal(await c.inputValue(), line);
  // Back where the person was, with no empty conversation left behind.
  assert.equal(await page.locator('#conv-title').textContent(), '#general');
  assert.equal(await page.getByTestId('dm-list').locator('li').count(), 0);
  assert.equal(await page.locator('[data-testid="message"]', { hasText: 'hello there, are you around?' }).count(), 0);
  alice.assertClean();
});
