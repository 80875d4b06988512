// Core chat between real browsers: room chat, DM privacy, typing, nick changes.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, login, say, messages, uname, waitConnected, PASSWORD } from './helpers.mjs';

let server;
const open = [];
before(async () => { server = await startServer(); });
after(async () => {
  for (const u of open) await u.close();
  await server?.stop();
});

async function person(name) {
  const u = await launchUser(server);
  open.push(u);
  u.name = uname(name);
  await register(u.page, u.name);
  return u;
}

test('two users in two browser contexts chat in a room', { timeout: 60000 }, async () => {
  const alice = await person('alice');
  const bob = await person('bob');
  // Both are in #general, and see each other in the member list.
  await bob.page.getByTestId('user-list').getByText(alice.name).first().waitFor();
  await alice.page.getByTestId('user-list').getByText(bob.name).first().waitFor();

  await say(alice.page, 'Hello Bob, **welcome**!');
  const atBob = messages(bob.page, 'Hello Bob');
  await atBob.waitFor();
  assert.equal(await atBob.locator('strong').textContent(), 'welcome');
  assert.match(await atBob.getAttribute('data-id'), /^\d+$/);

  await bob.page.getByTestId('composer').fill('Hi Alice!');
  await bob.page.getByTestId('send').click();
  await messages(alice.page, 'Hi Alice!').waitFor();
  // The sender's own copy is confirmed (acked, has an id) and appears exactly once.
  await messages(alice.page, 'Hello Bob').waitFor();
  assert.equal(await messages(alice.page, 'Hello Bob').count(), 1);
  assert.equal(await alice.page.locator('[data-testid="message"][data-state]').count(), 0, 'nothing left pending');
  // Same id on both sides.
  assert.equal(await messages(alice.page, 'Hi Alice!').getAttribute('data-id'),
    await messages(bob.page, 'Hi Alice!').getAttribute('data-id'));
  // Shift+Enter makes a new line instead of sending.
  const c = alice.page.getByTestId('composer');
  await c.fill('line one');
  await c.press('Shift+Enter');
  await c.pressSequentially('line two');
  assert.equal(await c.inputValue(), 'line one\nline two');
  await c.press('Enter');
  const multi = messages(bob.page, 'line one');
  await multi.waitFor();
  assert.equal(await multi.locator('.msg-body br').count(), 1);
  alice.assertClean();
  bob.assertClean();
});

test('a third user does not see a DM between two others', { timeout: 60000 }, async () => {
  const alice = await person('alice');
  const bob = await person('bob');
  const carol = await person('carol');
  await carol.page.getByTestId('user-list').getByText(bob.name).first().waitFor();

  // /msg from the composer opens the DM conversation.
  await say(alice.page, `/msg ${bob.name} psst, a secret for you`);
  await messages(alice.page, 'psst, a secret').waitFor();
  await bob.page.getByTestId('dm-list').getByRole('button', { name: new RegExp(alice.name) }).waitFor();
  await bob.page.getByTestId('dm-list').getByRole('button', { name: new RegExp(alice.name) }).click();
  await messages(bob.page, 'psst, a secret').waitFor();

  // Bob answers from the UI (DM conversation is open), Carol sees nothing of it.
  await say(bob.page, 'secret reply');
  await messages(alice.page, 'secret reply').waitFor();
  await alice.page.getByTestId('room-list').getByRole('button', { name: /Room general/ }).click();
  await say(alice.page, 'public after the secret');
  await messages(carol.page, 'public after the secret').waitFor();
  assert.equal(await carol.page.getByText('psst').count(), 0);
  assert.equal(await carol.page.getByText('secret reply').count(), 0);
  assert.equal(await carol.page.getByTestId('dm-list').locator('li').count(), 0);

  // Clicking a user in the member list opens a DM too.
  await carol.page.getByTestId('user-list').getByRole('button', { name: new RegExp(alice.name) }).click();
  await carol.page.locator('#conv-title', { hasText: alice.name }).waitFor();
  await say(carol.page, 'hello from carol');
  await messages(alice.page, 'public after').waitFor();
  await alice.page.getByTestId('dm-list').getByRole('button', { name: new RegExp(carol.name) }).waitFor();
  assert.equal(await bob.page.getByText('hello from carol').count(), 0);
  for (const u of [alice, bob, carol]) u.assertClean();
});

test('typing indicator appears and expires', { timeout: 60000 }, async () => {
  const alice = await person('alice');
  const bob = await person('bob');
  await bob.page.getByTestId('user-list').getByText(alice.name).first().waitFor();
  await alice.page.getByTestId('composer').pressSequentially('I am typ', { delay: 30 });
  const typing = bob.page.getByTestId('typing');
  await bob.page.waitForFunction((n) => document.querySelector('[data-testid="typing"]').textContent.includes(`${n} is typing`), alice.name, { timeout: 5000 });
  const t0 = Date.now();
  // Expires 5 s after the last typing frame when nothing else comes.
  await bob.page.waitForFunction(() => document.querySelector('[data-testid="typing"]').textContent === '', null, { timeout: 9000 });
  const gone = Date.now() - t0;
  assert.ok(gone >= 3000, `expired after ${gone} ms, expected about 5 s`);
  assert.equal(await typing.textContent(), '');
  // Typing again shows it again; the message itself clears it at once on the other side.
  await alice.page.getByTestId('composer').pressSequentially('ing');
  await bob.page.waitForFunction(() => document.querySelector('[data-testid="typing"]').textContent !== '', null, { timeout: 5000 });
  await alice.page.getByTestId('composer').press('Enter');
  await messages(bob.page, 'I am typing').waitFor();
  assert.equal(await typing.textContent(), '');
  alice.assertClean();
  bob.assertClean();
});

test('a nick change shows for the other user', { timeout: 60000 }, async () => {
  const alice = await person('alice');
  const bob = await person('bob');
  await say(alice.page, 'before the rename');
  await messages(bob.page, 'before the rename').waitFor();
  const nick = `Ally ${Math.random().toString(36).slice(2, 6)}`;
  await say(alice.page, `/nick ${nick}`);
  await bob.page.getByTestId('user-list').getByText(nick).waitFor();
  await bob.page.locator('#message-list').getByText(`${alice.name} is now known as ${nick}`).waitFor();
  await alice.page.locator('#me-nick', { hasText: nick }).waitFor();
  await say(alice.page, 'after the rename');
  const m = messages(bob.page, 'after the rename');
  await m.waitFor();
  assert.equal(await m.locator('.msg-nick').textContent(), nick);

  // From the UI: the pencil button; and a nick equal to another account's name is refused.
  await bob.page.getByRole('button', { name: 'Change your nick' }).click();
  await bob.page.locator('#nick-input').fill(alice.name);
  await bob.page.locator('#nick-dialog').getByRole('button', { name: 'Save' }).click();
  await bob.page.locator('#nick-error', { hasText: 'taken' }).waitFor();
  await bob.page.locator('#nick-input').fill('Bobby');
  await bob.page.locator('#nick-dialog').getByRole('button', { name: 'Save' }).click();
  await alice.page.getByTestId('user-list').getByText('Bobby').waitFor();
  alice.assertClean();
  bob.assertClean();
});

test('join a room from the room browser, leave it with the button, rejoin', { timeout: 60000 }, async () => {
  const alice = await person('alice');
  const bob = await person('bob');
  const room = `lobby${process.pid % 1000}`;
  await say(bob.page, `/join ${room}`);
  await bob.page.locator('#conv-title', { hasText: `#${room}` }).waitFor();

  // Alice: "+" next to Rooms lists existing rooms; picking one joins it.
  await alice.page.getByRole('button', { name: 'Join or create a room' }).click();
  await alice.page.locator('#room-browser').getByRole('button', { name: new RegExp(`#${room}`) }).click();
  await alice.page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
  await bob.page.locator('#message-list').getByText(`${alice.name} joined #${room}`).waitFor();
  await bob.page.getByTestId('user-list').getByText(alice.name).waitFor();

  // Typing a new name creates a room.
  await alice.page.getByRole('button', { name: 'Join or create a room' }).click();
  await alice.page.locator('#join-input').fill(`#New-${room}`);
  await alice.page.locator('#join-ok').click();
  await alice.page.locator('#conv-title', { hasText: `#new-${room}` }).waitFor();

  // Leave with the header button: gone from the list, Bob sees it; Rejoin from the toast.
  await alice.page.getByTestId('room-list').getByRole('button', { name: new RegExp(`Room ${room}$`) }).click();
  await alice.page.getByRole('button', { name: 'Leave' }).click();
  await alice.page.getByTestId('room-list').getByRole('button', { name: new RegExp(`Room ${room}$`) }).waitFor({ state: 'detached' });
  await bob.page.locator('#message-list').getByText(`${alice.name} left #${room}`).waitFor();
  await alice.page.getByRole('button', { name: 'Rejoin' }).click();
  await alice.page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
  // /leave works the same.
  await say(alice.page, '/leave');
  await alice.page.getByTestId('room-list').getByRole('button', { name: new RegExp(`Room ${room}$`) }).waitFor({ state: 'detached' });
  alice.assertClean();
  bob.assertClean();
});

test('log in on a second device, both stay in sync, log out', { timeout: 60000 }, async () => {
  const laptop = await person('alice');
  const phone = await launchUser(server, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  open.push(phone);
  // A wrong password is refused with a clear message.
  await phone.page.getByTestId('login-user').fill(laptop.name);
  await phone.page.getByTestId('login-password').fill('not the password');
  await phone.page.getByTestId('login-submit').click();
  await phone.page.locator('#login-error', { hasText: 'Wrong user name or password' }).waitFor();
  await login(phone.page, laptop.name, PASSWORD);

  await say(laptop.page, 'sent from the laptop');
  const mine = messages(phone.page, 'sent from the laptop');
  await mine.waitFor();
  assert.match(await mine.getAttribute('class'), /\bown\b/, 'shown as own message on the other device');
  // Joining on one device shows the room on the other.
  const room = `sync${process.pid % 1000}`;
  await say(phone.page, `/join ${room}`);
  await laptop.page.getByTestId('room-list').getByRole('button', { name: new RegExp(`Room ${room}`) }).waitFor();

  // Log out on the phone: back to the login form, and a reload does not resume.
  await phone.page.getByRole('button', { name: 'Open the conversation list' }).tap();
  await phone.page.getByRole('button', { name: 'Log out' }).tap();
  await phone.page.getByTestId('login-user').waitFor({ state: 'visible' });
  await phone.page.reload();
  await phone.page.getByTestId('login-user').waitFor({ state: 'visible' });
  assert.equal(await phone.page.evaluate(() => localStorage.getItem('parlor.token')), null);
  // The laptop's session is unaffected.
  await say(laptop.page, 'still here');
  await messages(laptop.page, 'still here').waitFor();
  await waitConnected(laptop.page);
  laptop.assertClean();
  phone.assertClean();
});

test('presence: a user going offline shows last seen; typing in a DM', { timeout: 60000 }, async () => {
  const alice = await person('alice');
  const bob = await person('bob');
  await alice.page.locator(`#user-list li[data-user="${bob.name}"][data-online="true"]`).waitFor();

  // DM typing shows in the DM conversation only.
  await say(bob.page, `/msg ${alice.name} are you there?`);
  await alice.page.getByTestId('dm-list').getByRole('button', { name: new RegExp(bob.name) }).click();
  await messages(alice.page, 'are you there?').waitFor();
  await bob.page.getByTestId('composer').pressSequentially('yes', { delay: 20 });
  await alice.page.getByTestId('typing').filter({ hasText: `${bob.name} is typing` }).waitFor();
  await alice.page.getByTestId('room-list').getByRole('button', { name: /Room general/ }).click();
  await alice.page.locator('#conv-title', { hasText: '#general' }).waitFor();
  assert.equal(await alice.page.getByTestId('typing').textContent(), '', 'not shown in the room');

  // Bob closes his browser: offline, with "last seen".
  await bob.close();
  await alice.page.locator(`#user-list li[data-user="${bob.name}"][data-online="false"]`).waitFor();
  assert.match(await alice.page.locator(`#user-list li[data-user="${bob.name}"]`).textContent(), /last seen just now/);
  await alice.page.getByTestId('dm-list').locator('.dot.off').waitFor();
  alice.assertClean();
});
