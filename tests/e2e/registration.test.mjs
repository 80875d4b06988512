// A private server (`--registration closed`): the login form offers no "Create account", says
// who makes accounts, and existing accounts still sign in.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, login, tmpDir, uname } from './helpers.mjs';

const cleanup = [];
after(async () => {
  for (const c of cleanup.reverse()) await c();
});

test('with registration closed the client hides "Create account" and members still log in', async () => {
  const dataDir = tmpDir('data');
  const name = uname('member');
  // An account made while registration was open.
  const openServer = await startServer({ dataDir });
  const first = await launchUser(openServer);
  await register(first.page, name);
  await first.close();
  await openServer.stop();

  const server = await startServer({ dataDir, args: ['--registration', 'closed'] });
  cleanup.push(() => server.stop());
  const u = await launchUser(server);
  cleanup.push(() => u.close());
  const { page } = u;
  await page.getByTestId('login-view').waitFor({ state: 'visible' });
  await page.getByTestId('register-submit').waitFor({ state: 'hidden', timeout: 5000 });
  assert.match(await page.getByTestId('login-lead').textContent(), /administrator/);
  // What the client asked: the server's own answer.
  const info = await page.evaluate(async () => (await fetch('/api/server')).json());
  assert.deepEqual(info, { registration: 'closed' });
  await login(page, name);
  u.assertClean();
});

test('with registration open "Create account" is offered', async () => {
  const server = await startServer({});
  cleanup.push(() => server.stop());
  const u = await launchUser(server);
  cleanup.push(() => u.close());
  await u.page.getByTestId('login-view').waitFor({ state: 'visible' });
  const info = await u.page.evaluate(async () => (await fetch('/api/server')).json());
  assert.deepEqual(info, { registration: 'open' });
  assert.equal(await u.page.getByTestId('register-submit').isVisible(), true);
  assert.match(await u.page.getByTestId('login-lead').textContent(), /create an account/);
});
