// History: what a reload shows, and older pages loaded by scrolling up.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, say, messages, uname, rawUser, waitConnected, openRoom } from './helpers.mjs';

let server;
const open = [];
before(async () => { server = await startServer(); });
after(async () => {
  for (const u of open) await u.close();
  await server?.stop();
});

const pad = (n) => String(n).padStart(3, '0');

test('history after reload, and older history on scroll', { timeout: 90000 }, async () => {
  const room = `hist${process.pid % 10000}`;
  const seeder = await rawUser(server, uname('seeder'));
  await seeder.call({ type: 'join', room });
  const N = 130;
  for (let i = 1; i <= N; i++) await seeder.call({ type: 'say', room, text: `seed message ${pad(i)}` });

  const u = await launchUser(server);
  open.push(u);
  const { page } = u;
  await register(page, uname('reader'));
  await say(page, `/join ${room}`);
  await page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
  await messages(page, `seed message ${pad(N)}`).waitFor();
  const first = await messages(page).count();
  assert.ok(first >= 50 && first < N, `first page shows the latest ${first} messages, not all ${N}`);

  await say(page, 'my own message, before reload');
  await messages(page, 'my own message').waitFor();

  // Reload: the session resumes from the token, the room and its latest history are back.
  await page.reload();
  await waitConnected(page);
  await openRoom(page, room);
  await messages(page, 'my own message').waitFor();
  await messages(page, `seed message ${pad(N)}`).waitFor();
  assert.equal(await messages(page, 'my own message').count(), 1);

  // Scroll to the top repeatedly: older pages arrive until the first message.
  const box = page.locator('#messages');
  for (let i = 0; i < 10 && await messages(page, 'seed message 001').count() === 0; i++) {
    await box.evaluate((el) => { el.scrollTop = 0; });
    await page.waitForTimeout(400);
  }
  await messages(page, 'seed message 001').waitFor({ timeout: 5000 });
  await page.getByText(`This is the beginning of #${room}.`).waitFor();
  const ids = await messages(page).evaluateAll((els) => els.map((e) => Number(e.dataset.id)));
  assert.equal(ids.length, N + 1, 'every message once');
  assert.equal(new Set(ids).size, ids.length, 'no duplicate ids');
  assert.deepEqual(ids, [...ids].sort((a, b) => a - b), 'in id order');
  // The view did not jump to the bottom while loading older pages.
  assert.ok(await box.evaluate((el) => el.scrollTop < el.scrollHeight - el.clientHeight - 100));
  seeder.close();
  u.assertClean();
});
