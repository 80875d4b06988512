// `parlor user disable` / `enable` while a person is signed in: the browser is signed out at
// once with a message saying the account is disabled (not "wrong password", and no endless
// reconnecting with a dead token), and signs in again once the account is enabled.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { startServer, launchUser, register, login, uname, BIN } from './helpers.mjs';

const cleanup = [];
after(async () => {
  for (const c of cleanup.reverse()) await c();
});

const parlorUser = (server, ...args) =>
  execFileSync(BIN, ['--data', server.dataDir, 'user', ...args], { encoding: 'utf8' });

test('a disabled account is signed out with a message, and signs in again once enabled', async () => {
  const server = await startServer({});
  cleanup.push(() => server.stop());
  const u = await launchUser(server);
  cleanup.push(() => u.close());
  const { page } = u;
  const name = uname('dis');
  await register(page, name);

  assert.match(parlorUser(server, 'disable', name), /^disabled /);
  await page.getByTestId('login-view').waitFor({ state: 'visible', timeout: 5000 });
  const error = page.getByTestId('login-error');
  await page.waitForFunction(() => /disabled/.test(document.getElementById('login-error').textContent), null, { timeout: 5000 });
  assert.equal(await page.evaluate(() => localStorage.getItem('parlor.token')), null, 'the token is dropped');

  // Trying the password says the same, not "wrong password".
  await page.getByTestId('login-user').fill(name);
  await page.getByTestId('login-password').fill('correct horse battery');
  await page.getByTestId('login-submit').click();
  await page.waitForFunction(() => /disabled/.test(document.getElementById('login-error').textContent), null, { timeout: 5000 });
  assert.match(await error.textContent(), /administrator/);

  assert.match(parlorUser(server, 'enable', name), /^enabled /);
  await new Promise((r) => setTimeout(r, 1000)); // the server notices within 250 ms
  await login(page, name);
  u.assertClean();
});
