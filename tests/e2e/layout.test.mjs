// Desktop (1280×800) and phone (390×844) layouts, with the screenshots shown in the README.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, say, messages, rawUser, saveShot, waitConnected } from './helpers.mjs';

let server;
const open = [];
let bob;
let carol;
before(async () => {
  server = await startServer();
  bob = await rawUser(server, 'bob');
  carol = await rawUser(server, 'carol');
  await bob.call({ type: 'join', room: 'rust' });
  await carol.call({ type: 'join', room: 'rust' });
  await bob.call({ type: 'join', room: 'design' });
});
after(async () => {
  for (const u of open) await u.close();
  bob?.close();
  carol?.close();
  await server?.stop();
});

test('desktop layout at 1280×800 (screenshot)', { timeout: 60000 }, async () => {
  const u = await launchUser(server, { viewport: { width: 1280, height: 800 } });
  open.push(u);
  const { page } = u;
  await saveShot(page, 'login.png');
  await register(page, 'alice');
  await say(page, '/join rust');
  await page.locator('#conv-title', { hasText: '#rust' }).waitFor();
  await say(page, '/join design');
  await page.locator('#conv-title', { hasText: '#design' }).waitFor();
  await page.getByTestId('room-list').getByRole('button', { name: /Room rust/ }).click();

  await bob.call({ type: 'say', room: 'rust', text: 'Morning all! Has anyone tried the new **release** yet?' });
  await carol.call({ type: 'say', room: 'rust', text: 'Yes, it runs on our staging box since yesterday. Zero restarts so far.' });
  await say(page, 'Deployed it this morning too. The `--durability full` flag is *exactly* what we needed.');
  await bob.call({ type: 'say', room: 'rust', text: 'Nice. Here is the unit file I used:\n```\n[Service]\nExecStart=/usr/local/bin/parlor --listen 0.0.0.0:8080\nRestart=on-failure\n```' });
  await carol.call({ type: 'say', room: 'rust', text: '@alice could you share the benchmark numbers? The old ones are at https://example.com/parlor/bench' });
  await say(page, 'Sure, right after lunch. ~~Friday~~ Today!');
  await bob.call({ type: 'dm', to: 'alice', text: 'Got a minute for the release notes?' });
  await bob.call({ type: 'say', room: 'design', text: 'New icons are up for review.' });
  await messages(page, 'right after lunch').waitFor();
  await page.getByTestId('dm-list').getByRole('button', { name: /bob/ }).waitFor();
  bob.send({ type: 'typing', room: 'rust' });
  await page.getByTestId('typing').filter({ hasText: 'bob is typing' }).waitFor();
  await page.getByTestId('composer').fill('');
  await page.waitForTimeout(300);

  // Layout: three columns, all visible, no horizontal overflow.
  for (const id of ['sidebar', 'members']) assert.ok(await page.locator(`#${id}`).isVisible(), `${id} visible`);
  assert.equal(await page.locator('#menu-btn').isVisible(), false, 'no drawer button on desktop');
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= innerWidth));
  // The mention of alice is highlighted.
  assert.match(await messages(page, 'benchmark numbers').getAttribute('class'), /\bmention\b/);
  await saveShot(page, 'desktop.png');
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.waitForTimeout(200);
  await saveShot(page, 'desktop-dark.png');
  await page.emulateMedia({ colorScheme: 'light' });
  u.assertClean();
});

test('phone layout at 390×844: send a message, drawer opens and closes', { timeout: 60000 }, async () => {
  const u = await launchUser(server, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  open.push(u);
  const { page } = u;
  await register(page, 'dana');
  await say(page, '/join rust');
  await page.locator('#conv-title', { hasText: '#rust' }).waitFor();

  // Sidebar is off-screen; the chat uses the full width.
  const sidebar = page.locator('#sidebar');
  assert.equal(await sidebar.isVisible(), false, 'drawer closed at start');
  const composer = page.getByTestId('composer');
  const box = await composer.boundingBox();
  assert.ok(box.width > 260 && box.x + box.width <= 390, `composer fits: ${JSON.stringify(box)}`);
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= innerWidth), 'no horizontal scroll');

  // Send by tapping the send button.
  await composer.tap();
  await composer.fill('Hello from my phone! Reading the **benchmarks** now.');
  await page.getByTestId('send').tap();
  await messages(page, 'Hello from my phone').waitFor();
  await bob.call({ type: 'say', room: 'rust', text: 'Welcome, @dana! The numbers are pinned in #design.' });
  await messages(page, 'Welcome, @dana').waitFor();
  await page.waitForTimeout(300);
  await saveShot(page, 'phone.png');

  // Drawer opens with the menu button...
  await page.getByRole('button', { name: 'Open the conversation list' }).tap();
  await page.waitForTimeout(300);
  assert.ok(await sidebar.isVisible(), 'drawer open');
  const sb = await sidebar.boundingBox();
  assert.ok(sb.x >= 0 && sb.x + sb.width <= 390, `drawer on screen: ${JSON.stringify(sb)}`);
  await saveShot(page, 'phone-drawer.png');
  // ...and closes when a room is picked; the general room is shown.
  await page.getByTestId('room-list').getByRole('button', { name: /Room general/ }).tap();
  await page.locator('#conv-title', { hasText: '#general' }).waitFor();
  await page.waitForTimeout(300);
  assert.equal(await sidebar.isVisible(), false, 'drawer closed after choosing');
  // Open again, close with the scrim.
  await page.getByRole('button', { name: 'Open the conversation list' }).tap();
  await page.waitForTimeout(300);
  assert.ok(await sidebar.isVisible());
  await page.locator('#scrim').tap({ position: { x: 370, y: 400 } });
  await page.waitForTimeout(300);
  assert.equal(await sidebar.isVisible(), false, 'scrim closes the drawer');
  // The member list is a drawer too.
  // A #room link in a message joins that room.
  await page.getByRole('button', { name: 'Open the conversation list' }).tap();
  await page.getByTestId('room-list').getByRole('button', { name: /Room rust/ }).tap();
  await page.locator('#message-list a.md-room', { hasText: '#design' }).tap();
  await page.locator('#conv-title', { hasText: '#design' }).waitFor();
  await messages(page, 'New icons are up').waitFor();
  await page.getByRole('button', { name: 'Show members' }).tap();
  await page.getByTestId('user-list').getByText('bob').waitFor({ state: 'visible' });
  await page.getByRole('button', { name: 'Close the member list' }).tap();
  await waitConnected(page);
  u.assertClean();
});

test('accessibility basics: labelled controls, live announcements, keyboard', { timeout: 60000 }, async () => {
  const u = await launchUser(server);
  open.push(u);
  const { page } = u;
  const unlabelledLogin = await page.evaluate(unlabelled);
  assert.deepEqual(unlabelledLogin, [], 'login form controls are labelled');
  await register(page, 'erin');
  await say(page, '/join rust');
  await page.locator('#conv-title', { hasText: '#rust' }).waitFor();
  assert.deepEqual(await page.evaluate(unlabelled), [], 'chat controls are labelled');

  // New messages are announced through the aria-live region.
  await carol.call({ type: 'say', room: 'rust', text: 'announce me please' });
  await page.locator('#live').getByText('carol: announce me please').waitFor({ state: 'attached' });
  assert.equal(await page.locator('#live').getAttribute('aria-live'), 'polite');

  // Keyboard: Alt+Down / Alt+Up switch conversations; Tab reaches the send button from the composer.
  await page.getByTestId('composer').focus();
  await page.keyboard.press('Alt+ArrowUp');
  await page.locator('#conv-title', { hasText: '#general' }).waitFor();
  await page.keyboard.press('Alt+ArrowDown');
  await page.locator('#conv-title', { hasText: '#rust' }).waitFor();
  await page.getByTestId('composer').focus();
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'send');
  // Dialogs open from buttons and close with Escape, returning focus.
  await page.getByRole('button', { name: 'Join or create a room' }).focus();
  await page.keyboard.press('Enter');
  await page.locator('#join-dialog[open]').waitFor();
  assert.equal(await page.evaluate(() => document.activeElement.id), 'join-input');
  await page.keyboard.press('Escape');
  await page.locator('#join-dialog:not([open])').waitFor({ state: 'attached' });
  u.assertClean();
});

// Visible form controls without an accessible name (label, aria-label(ledby), text or title).
function unlabelled() {
  const out = [];
  for (const el of document.querySelectorAll('button, input, textarea, select')) {
    if (!el.checkVisibility()) continue;
    const name = (el.labels && el.labels.length) || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
      || el.textContent.trim() || el.title;
    if (!name) out.push(el.outerHTML.slice(0, 80));
  }
  return out;
}
