// Notification preferences: applied at once, persisted across reloads.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, uname, rawUser, waitConnected } from './helpers.mjs';

let server;
const open = [];
before(async () => { server = await startServer(); });
after(async () => {
  for (const u of open) await u.close();
  await server?.stop();
});

const plays = (page) => page.evaluate(async () => (await import('/js/sound.js')).playCount);

test('sound preference persists across reload', { timeout: 60000 }, async () => {
  const u = await launchUser(server);
  open.push(u);
  const { page } = u;
  const me = uname('listener');
  await register(page, me);
  const bob = await rawUser(server, uname('talker'));
  await bob.call({ type: 'join', room: 'side' });
  await page.evaluate(() => window.parlor.join('side'));
  await page.locator('#conv-title', { hasText: '#side' }).waitFor();
  await page.getByTestId('room-list').getByRole('button', { name: /Room general/ }).click();

  // Defaults: sound on, alerts for mentions and DMs. A mention in another room chimes.
  await page.getByRole('button', { name: 'Settings' }).click();
  assert.equal(await page.getByTestId('pref-sound').isChecked(), true);
  await page.getByTestId('pref-notify-all').check();
  await page.locator('#settings-dialog').getByRole('button', { name: 'Done' }).click();
  const before0 = await plays(page);
  await bob.call({ type: 'say', room: 'side', text: 'ding' });
  await page.getByTestId('room-list').locator('[data-testid="unread-badge"]').waitFor();
  assert.equal(await plays(page), before0 + 1, 'a new message elsewhere plays the sound');

  // Turn sound off, set volume and "mentions and DMs".
  await page.getByRole('button', { name: 'Settings' }).click();
  await page.getByTestId('pref-sound').uncheck();
  await page.getByTestId('pref-volume').fill('0.2');
  await page.getByTestId('pref-notify-mentions').check();
  await page.locator('#settings-dialog').getByRole('button', { name: 'Done' }).click();

  await page.reload();
  await waitConnected(page);
  await page.getByRole('button', { name: 'Settings' }).click();
  assert.equal(await page.getByTestId('pref-sound').isChecked(), false, 'sound stays off after reload');
  assert.equal(Number(await page.getByTestId('pref-volume').inputValue()), 0.2);
  assert.equal(await page.getByTestId('pref-notify-mentions').isChecked(), true);
  await page.locator('#settings-dialog').getByRole('button', { name: 'Done' }).click();
  const stored = await page.evaluate(() => JSON.parse(localStorage.getItem('parlor.prefs.v1')));
  assert.equal(stored.sound, false);

  // With sound off, even a mention stays silent (but still counts as unread).
  await page.getByTestId('room-list').getByRole('button', { name: /Room general/ }).click();
  const p0 = await plays(page);
  await bob.call({ type: 'say', room: 'side', text: `hey @${me}` });
  await page.getByTestId('room-list').locator('.badge-mention').waitFor();
  assert.equal(await plays(page), p0, 'no sound when turned off');
  assert.match(await page.title(), /^\(\d+\) /, 'unread count in the title');
  bob.close();
  u.assertClean();
});
