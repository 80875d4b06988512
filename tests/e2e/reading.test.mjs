// Read state across devices (#14): unread and mention badges from the server (after a reload, on
// a second browser of the same account), the "New" divider, per-conversation notification
// levels muting the sound, @ autocomplete, search with jump-to-message, and typing announced
// again right after a send. Screenshots of the divider, the search results and the autocomplete.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, launchUser, register, login, say, messages, uname, rawUser, rawClient, waitConnected, saveShot, openRoom, PASSWORD,
  roomName, joinRoom,
} from './helpers.mjs';

let server;
const open = [];
const raws = [];
before(async () => { server = await startServer(); });
after(async () => {
  for (const u of open) await u.close();
  for (const r of raws) r.close();
  await server?.stop();
});

async function person(base, name = uname(base)) {
  const u = await launchUser(server);
  open.push(u);
  u.name = name;
  await register(u.page, u.name);
  return u;
}

async function raw(base) {
  const r = await rawUser(server, uname(base));
  raws.push(r);
  r.name = r.welcome.user;
  return r;
}

/** The sidebar entry of a room. */
const roomEntry = (page, room) => page.getByTestId('room-list').locator('button.conv').filter({ has: page.locator('.conv-name', { hasText: new RegExp(`^${room}$`) }) });
const badgeText = async (page, room, testid) => {
  const b = roomEntry(page, room).getByTestId(testid);
  return (await b.count()) ? b.textContent() : null;
};
const plays = (page) => page.evaluate(async () => (await import('/js/sound.js')).playCount);

test('unread and mention badges come from the server: after a reload, and on a second browser of the same account; reading on one clears the other', { timeout: 90000 }, async () => {
  const a = await person('alice');
  const room = roomName('unread');
  await joinRoom(a.page, room);
  const bob = await raw('bob');
  await bob.call({ type: 'join', room });
  await openRoom(a.page, 'general');
  await a.page.locator('#conv-title', { hasText: '#general' }).waitFor();

  await bob.call({ type: 'say', room, text: 'one' });
  await bob.call({ type: 'say', room, text: `hey @${a.name}, look` });
  await bob.call({ type: 'say', room, text: 'three' });
  await roomEntry(a.page, room).getByTestId('unread-badge').filter({ hasText: /^3$/ }).waitFor({ timeout: 5000 });
  assert.equal(await badgeText(a.page, room, 'mention-badge'), '1', 'the @mention counts');

  // A reload: the counts come from welcome.conversations.
  await a.page.reload();
  await waitConnected(a.page);
  await roomEntry(a.page, room).getByTestId('unread-badge').filter({ hasText: /^3$/ }).waitFor({ timeout: 5000 });
  assert.equal(await badgeText(a.page, room, 'mention-badge'), '1');
  const title = /^\((\d+)\) /.exec(await a.page.title());
  assert.ok(title && Number(title[1]) >= 3, `title counts the unread: ${await a.page.title()}`);

  // A second browser, same account, opening on #general.
  const b = await launchUser(server);
  open.push(b);
  await b.page.goto(`${server.url}#general`);
  await login(b.page, a.name);
  await roomEntry(b.page, room).getByTestId('unread-badge').filter({ hasText: /^3$/ }).waitFor({ timeout: 5000 });
  assert.equal(await badgeText(b.page, room, 'mention-badge'), '1');

  // Reading there clears the badges here, within a second or so (300 ms debounce + a round trip).
  await roomEntry(b.page, room).click();
  await b.page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
  // The title changes at the click; the messages (and with them the read marker) arrive with
  // the history answer a round trip later.
  await roomEntry(b.page, room).getByTestId('unread-badge').waitFor({ state: 'detached', timeout: 3000 });
  const t0 = Date.now();
  await roomEntry(a.page, room).getByTestId('unread-badge').waitFor({ state: 'detached', timeout: 3000 });
  assert.ok(Date.now() - t0 < 2000, 'cleared on the other device quickly');
  assert.equal(await badgeText(a.page, room, 'mention-badge'), null);

  // New messages are counted again, after the marker.
  await bob.call({ type: 'say', room, text: 'four' });
  await roomEntry(a.page, room).getByTestId('unread-badge').filter({ hasText: /^1$/ }).waitFor({ timeout: 5000 });
  // B is looking at the room: for it, nothing is unread, and its read clears A's badge again.
  await messages(b.page, 'four').waitFor();
  await roomEntry(a.page, room).getByTestId('unread-badge').waitFor({ state: 'detached', timeout: 3000 });

  // The marker is stored: a reload shows no badge.
  await a.page.reload();
  await waitConnected(a.page);
  await a.page.waitForTimeout(500);
  assert.equal(await badgeText(a.page, room, 'unread-badge'), null);
  a.assertClean();
  b.assertClean();
});

test('opening a conversation with unread messages shows a "New" divider above the first of them', { timeout: 60000 }, async () => {
  const a = await person('alice');
  const room = roomName('divider');
  const bob = await raw('bob');
  await bob.call({ type: 'join', room });
  await joinRoom(a.page, room);
  await bob.call({ type: 'say', room, text: 'already seen, this one' });
  await messages(a.page, 'already seen').waitFor();
  await a.page.waitForTimeout(500); // the read marker goes out (debounced)
  assert.equal(await a.page.getByTestId('unread-divider').count(), 0, 'no divider when nothing is unread');
  await openRoom(a.page, 'general');
  await a.page.locator('#conv-title', { hasText: '#general' }).waitFor();
  await bob.call({ type: 'say', room, text: 'first unread message' });
  await bob.call({ type: 'say', room, text: 'second unread message' });
  await roomEntry(a.page, room).getByTestId('unread-badge').filter({ hasText: /^2$/ }).waitFor();

  await roomEntry(a.page, room).click();
  const divider = a.page.getByTestId('unread-divider');
  await divider.waitFor();
  assert.equal(await divider.count(), 1);
  const around = await divider.evaluate((d) => {
    let next = d.nextElementSibling;
    while (next && !next.matches('li.msg')) next = next.nextElementSibling;
    let prev = d.previousElementSibling;
    while (prev && !prev.matches('li.msg')) prev = prev.previousElementSibling;
    return { next: next?.querySelector('.msg-body')?.textContent, prev: prev?.querySelector('.msg-body')?.textContent };
  });
  assert.equal(around.next, 'first unread message');
  assert.equal(around.prev, 'already seen, this one');
  assert.match(await divider.textContent(), /New/);
  await saveShot(a.page, 'unread-divider.png');

  // Also after a reload (the marker is the server's): the room is read now, so no divider.
  await a.page.reload();
  await waitConnected(a.page);
  await a.page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
  await messages(a.page, 'second unread message').waitFor();
  assert.equal(await a.page.getByTestId('unread-divider').count(), 0);
  a.assertClean();
});

test('a conversation with more unread than fits on screen opens at the divider, and is read only once scrolled to the end', { timeout: 90000 }, async () => {
  const a = await person('alice');
  const room = roomName('longunread');
  const bob = await raw('bob');
  await bob.call({ type: 'join', room });
  await joinRoom(a.page, room);
  await bob.call({ type: 'say', room, text: 'seen before leaving' });
  await messages(a.page, 'seen before leaving').waitFor();
  await a.page.waitForTimeout(500);
  await openRoom(a.page, 'general');
  await a.page.locator('#conv-title', { hasText: '#general' }).waitFor();
  for (let i = 0; i < 40; i++) await bob.call({ type: 'say', room, text: `unread number ${i}\n\nwith a second paragraph` });
  await roomEntry(a.page, room).getByTestId('unread-badge').filter({ hasText: /^40$/ }).waitFor();

  await roomEntry(a.page, room).click();
  const divider = a.page.getByTestId('unread-divider');
  await divider.waitFor();
  // The divider is on screen, the newest message is not.
  const where = await a.page.evaluate(() => {
    const box = document.getElementById('messages').getBoundingClientRect();
    const d = document.querySelector('[data-testid="unread-divider"]').getBoundingClientRect();
    const msgs = document.querySelectorAll('#message-list li.msg');
    const last = msgs[msgs.length - 1].getBoundingClientRect();
    return { dividerIn: d.top >= box.top && d.bottom <= box.bottom, lastBelow: last.top > box.bottom };
  });
  assert.deepEqual(where, { dividerIn: true, lastBelow: true });
  // Not read yet: the badge stays while the newest message is unseen.
  await a.page.waitForTimeout(800);
  assert.equal(await badgeText(a.page, room, 'unread-badge'), '40');
  // Scrolled to the end, it is read: the badge goes.
  await a.page.evaluate(() => { const b = document.getElementById('messages'); b.scrollTop = b.scrollHeight; });
  await roomEntry(a.page, room).getByTestId('unread-badge').waitFor({ state: 'detached', timeout: 5000 });
  a.assertClean();
});

test('notification levels: "none" mutes a conversation, "all" chimes for every message, and the level is kept by the server', { timeout: 60000 }, async () => {
  const a = await person('alice');
  const room = roomName('levels');
  const bob = await raw('bob');
  await bob.call({ type: 'join', room });
  await joinRoom(a.page, room);
  const level = a.page.getByTestId('notify-level');
  assert.equal(await level.inputValue(), 'mentions', 'rooms default to mentions');
  await openRoom(a.page, 'general');
  await a.page.locator('#conv-title', { hasText: '#general' }).waitFor();

  // Default (mentions): a plain message is counted but silent; a mention chimes.
  let p0 = await plays(a.page);
  await bob.call({ type: 'say', room, text: 'plain one' });
  await roomEntry(a.page, room).getByTestId('unread-badge').filter({ hasText: /^1$/ }).waitFor();
  assert.equal(await plays(a.page), p0, 'no sound for a plain message in a "mentions" room');
  await bob.call({ type: 'say', room, text: `@${a.name} ping` });
  await roomEntry(a.page, room).getByTestId('mention-badge').filter({ hasText: /^1$/ }).waitFor();
  assert.equal(await plays(a.page), p0 + 1, 'a mention chimes');

  // "all": every message chimes.
  await roomEntry(a.page, room).click();
  await a.page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
  await level.selectOption('all');
  await a.page.waitForTimeout(300);
  await openRoom(a.page, 'general');
  await a.page.waitForTimeout(500); // the chime is rate limited to one per 400 ms
  p0 = await plays(a.page);
  await bob.call({ type: 'say', room, text: 'plain two' });
  await roomEntry(a.page, room).getByTestId('unread-badge').filter({ hasText: /^1$/ }).waitFor();
  assert.equal(await plays(a.page), p0 + 1, 'level "all": a plain message chimes');

  // "none": not even a mention.
  await roomEntry(a.page, room).click();
  await a.page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
  await level.selectOption('none');
  await openRoom(a.page, 'general');
  await a.page.waitForTimeout(500);
  p0 = await plays(a.page);
  await bob.call({ type: 'say', room, text: `@${a.name} are you there?` });
  await roomEntry(a.page, room).getByTestId('mention-badge').filter({ hasText: /^1$/ }).waitFor();
  await a.page.waitForTimeout(300);
  assert.equal(await plays(a.page), p0, 'level "none": silent, but still counted');

  // The server keeps it (welcome), and tells the account's other connections.
  const other = await rawClient(server);
  raws.push(other);
  const w = await other.call({ type: 'login', user: a.name, password: PASSWORD });
  assert.equal(w.conversations.find((c) => c.room === room)?.notify, 'none', 'stored by the server');
  await a.page.reload();
  await waitConnected(a.page);
  await roomEntry(a.page, room).click();
  await a.page.locator('#conv-title', { hasText: `#${room}` }).waitFor();
  assert.equal(await level.inputValue(), 'none', 'the level survives a reload');
  a.assertClean();
});

test('@ autocomplete lists the room\'s members by prefix; arrows move, Enter inserts, Esc closes', { timeout: 60000 }, async () => {
  const room = roomName('mention');
  const bob = await raw('bob');
  const bobby = await raw('bobby');
  const carol = await raw('carol');
  for (const r of [bob, bobby, carol]) await r.call({ type: 'join', room });
  await bob.call({ type: 'nick', nick: 'Bobster' });
  const a = await person('alice');
  await joinRoom(a.page, room);
  await a.page.getByTestId('user-list').getByText(carol.name).first().waitFor();

  const composer = a.page.getByTestId('composer');
  const box = a.page.getByTestId('mention-suggestions');
  await composer.click();
  await composer.pressSequentially('hi @bo');
  await box.waitFor({ state: 'visible' });
  const users = await box.getByTestId('mention-option').evaluateAll((els) => els.map((e) => e.dataset.user));
  assert.deepEqual([...users].sort(), [bob.name, bobby.name].sort(), 'only the members starting with "bo"');
  await saveShot(a.page, 'mention-autocomplete.png');
  await composer.press('ArrowDown');
  assert.equal(await box.locator('[aria-selected="true"]').getAttribute('data-user'), users[1]);
  await composer.press('ArrowDown'); // wraps around
  await composer.press('ArrowUp');
  await composer.press('Enter');
  assert.equal(await composer.inputValue(), `hi @${users[1]} `, 'Enter inserts the selected name, not sending');
  await box.waitFor({ state: 'hidden' });
  assert.equal(await messages(a.page, 'hi @').count(), 0, 'nothing was sent');

  // By nick, with Tab.
  await composer.pressSequentially('and @bobst');
  await box.waitFor({ state: 'visible' });
  assert.deepEqual(await box.getByTestId('mention-option').evaluateAll((els) => els.map((e) => e.dataset.user)), [bob.name]);
  await composer.press('Tab');
  assert.equal(await composer.inputValue(), `hi @${users[1]} and @${bob.name} `);

  // Esc closes it and keeps the text.
  await composer.pressSequentially('@ca');
  await box.waitFor({ state: 'visible' });
  await composer.press('Escape');
  await box.waitFor({ state: 'hidden' });
  assert.equal(await composer.inputValue(), `hi @${users[1]} and @${bob.name} @ca`);
  await composer.press('Enter'); // closed: Enter sends
  await messages(a.page, `and @${bob.name} @ca`).waitFor();
  a.assertClean();
});

test('search: Ctrl+K or "/" opens it, results grouped by conversation, a result opens the conversation at that message (loading older history)', { timeout: 90000 }, async () => {
  const room = roomName('search');
  const word = `zanzibar${process.pid % 1000}`;
  const bob = await raw('bob');
  await bob.call({ type: 'join', room });
  await bob.call({ type: 'say', room, text: `the ${word} deploy failed` });
  for (let i = 0; i < 70; i++) await bob.call({ type: 'say', room, text: `filler ${i}` });
  await bob.call({ type: 'say', room: 'general', text: `${word} in general too` });
  const a = await person('alice');
  await joinRoom(a.page, room);
  await messages(a.page, 'filler 69').waitFor();
  assert.equal(await messages(a.page, `${word} deploy`).count(), 0, 'the old message is not loaded yet');

  await a.page.getByTestId('composer').press('Escape'); // not typing anywhere now
  await a.page.keyboard.press('/');
  const input = a.page.getByTestId('search-input');
  await input.waitFor({ state: 'visible' });
  assert.equal(await input.evaluate((e) => e === document.activeElement), true);
  await input.fill(word.slice(0, -2)); // a prefix matches
  const results = a.page.getByTestId('search-result');
  await results.nth(1).waitFor({ timeout: 5000 });
  assert.equal(await results.count(), 2);
  const groups = await a.page.getByTestId('search-group').evaluateAll((els) => els.map((e) => e.dataset.key));
  assert.deepEqual(groups, ['#general', `#${room}`], 'grouped by conversation, newest first');
  await saveShot(a.page, 'search-results.png');

  await results.filter({ hasText: 'deploy failed' }).click();
  await a.page.locator('#search-dialog').waitFor({ state: 'hidden' });
  const hit = messages(a.page, `${word} deploy failed`);
  await hit.waitFor({ timeout: 5000 });
  assert.match(await hit.getAttribute('class'), /\bhighlight\b/);
  await a.page.waitForTimeout(300);
  assert.equal(await hit.evaluate((el) => {
    const r = el.getBoundingClientRect();
    const box = document.getElementById('messages').getBoundingClientRect();
    return r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
  }), true, 'scrolled into view');
  // The history after it was loaded too, without a gap.
  await messages(a.page, 'filler 69').waitFor();
  assert.equal(await messages(a.page, 'filler').count(), 70);

  // Ctrl+K from within the composer; an empty query sends nothing.
  await a.page.getByTestId('composer').click();
  await a.page.keyboard.press('Control+k');
  await input.waitFor({ state: 'visible' });
  await input.fill('!!');
  await a.page.getByTestId('search-status').filter({ hasText: 'Type a word' }).waitFor();
  assert.equal(await results.count(), 0);
  a.assertClean();
});

test('typing after a send is announced again (held back for the server\'s typing interval, not swallowed)', { timeout: 60000 }, async () => {
  const room = roomName('typing');
  const bob = await raw('bob');
  await bob.call({ type: 'join', room });
  const a = await person('alice');
  await joinRoom(a.page, room);
  const composer = a.page.getByTestId('composer');
  await composer.pressSequentially('hello');
  await bob.wait((f) => f.type === 'typing' && f.user === a.name);
  await composer.press('Enter');
  await bob.wait((f) => f.type === 'message' && f.text === 'hello');
  // Keeps typing at once: bob must hear about it again (his client dropped the indicator
  // when the message came).
  await composer.pressSequentially('and');
  const t = await bob.wait((f) => f.type === 'typing' && f.user === a.name, 4000);
  assert.equal(t.room, room);
  a.assertClean();
});
