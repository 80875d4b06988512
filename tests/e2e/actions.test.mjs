// Messages that live: reply, react, edit, delete, between two real browsers; ↑ to edit; a phone's
// long press; the keyboard path; and catching up on every change after a reconnect (`catchup`),
// without reloading. Screenshots of the actions and of a conversation with changed messages.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import {
  startServer, launchUser, register, say, messages, uname, rawUser, waitConnected, saveShot,
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

/** A browser user registered as a fresh name (via `via`: another server-like {url}, e.g. a proxy). */
async function person(base, opts = {}, via = server, name = uname(base)) {
  const u = await launchUser(via, opts);
  open.push(u);
  u.name = name;
  await register(u.page, u.name);
  return u;
}

/** Alice and Bob, each in their own browser, both in a fresh room, seeing each other. */
async function pair(base, { bobVia = server, bobOpts = {} } = {}) {
  const room = roomName(base);
  const alice = await person('alice');
  const bob = await person('bob', bobOpts, bobVia);
  await joinRoom(alice.page, room);
  await joinRoom(bob.page, room);
  await alice.page.getByTestId('user-list').getByText(bob.name).first().waitFor();
  return { alice, bob, room };
}

/** The confirmed message whose own text (not a quote of it in a reply) contains `text`. */
function byBody(page, text) {
  return messages(page).filter({ has: page.locator('.msg-body', { hasText: text }) });
}

/** Hovers a message (its actions appear) and clicks one of them. */
async function act(page, text, testid) {
  const m = byBody(page, text);
  await m.hover();
  await m.getByTestId(testid).click();
}

/** Whether an element lies inside the visible part of the message log. */
function inView(locator) {
  return locator.evaluate((el) => {
    const box = document.getElementById('messages').getBoundingClientRect();
    const r = el.getBoundingClientRect();
    return r.bottom > box.top + 4 && r.top < box.bottom - 4;
  });
}

/** Reaction chip `emoji` of a message (its text contains the emoji). */
const chip = (page, text, emoji) => byBody(page, text).getByTestId('reaction').filter({ hasText: emoji });
/** Its count, 0 without a chip (read in one go: a chip can go between two separate reads). */
const chipCount = (page, text, emoji) => chip(page, text, emoji)
  .evaluateAll((els) => (els.length ? Number(els[0].querySelector('.reaction-count').textContent) : 0));

/** Polls until `fn()` is deeply equal to `want` (or fails with the last value). */
async function until(fn, want, what, timeout = 10000) {
  const end = Date.now() + timeout;
  let got;
  for (;;) {
    got = await fn();
    try { assert.deepEqual(got, want); return; } catch (e) { if (Date.now() > end) throw new assert.AssertionError({ message: `${what}: ${e.message}` }); }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Everything a page sends on its WebSockets, parsed. */
function recordSent(page) {
  const sent = [];
  page.on('websocket', (ws) => ws.on('framesent', (f) => {
    try { sent.push(JSON.parse(f.payload)); } catch { /* not JSON */ }
  }));
  return sent;
}

/**
 * A TCP proxy in front of the server: a browser that loaded the page through it has its
 * connection really cut by `drop()` (and cannot connect again until `restore()`).
 */
async function tcpProxy(target) {
  const sockets = new Set();
  let srv = null;
  let port = 0;
  const listen = () => new Promise((resolve, reject) => {
    srv = net.createServer((c) => {
      const up = net.connect(target.port, '127.0.0.1');
      sockets.add(c);
      sockets.add(up);
      const done = () => { c.destroy(); up.destroy(); sockets.delete(c); sockets.delete(up); };
      for (const s of [c, up]) { s.on('error', done); s.on('close', done); }
      c.pipe(up);
      up.pipe(c);
    });
    srv.once('error', reject);
    srv.listen(port, '127.0.0.1', () => { port = srv.address().port; resolve(); });
  });
  await listen();
  return {
    get url() { return `http://127.0.0.1:${port}/`; },
    async drop() {
      const closed = new Promise((r) => srv.close(r));
      for (const s of sockets) s.destroy();
      sockets.clear();
      await closed;
    },
    restore: listen,
    async close() { await this.drop().catch(() => {}); },
  };
}

/** Waits until the page is connected again, asking it to retry now while it waits. */
async function reconnect(page) {
  const status = page.getByTestId('connection-status');
  const end = Date.now() + 30000;
  while (await status.getAttribute('data-state') !== 'ready') {
    if (Date.now() > end) throw new Error('did not reconnect');
    if (await status.getAttribute('data-state') === 'waiting') await status.click().catch(() => {});
    await page.waitForTimeout(200);
  }
}

test('reply: the quote shows at both, Esc or × cancels, clicking it scrolls to the original', { timeout: 120000 }, async () => {
  const { alice, bob, room } = await pair('reply');
  await say(alice.page, 'the original question: who broke the build?');
  const original = byBody(bob.page, 'the original question');
  await original.waitFor();
  const originalId = await original.getAttribute('data-id');

  // Reply mode, then Esc: nothing is replied to.
  await act(bob.page, 'the original question', 'reply-button');
  const banner = bob.page.getByTestId('compose-banner');
  await banner.waitFor();
  assert.equal(await banner.getAttribute('data-mode'), 'reply');
  assert.match(await banner.textContent(), new RegExp(`Replying to ${alice.name}`));
  assert.ok(await bob.page.getByTestId('composer').evaluate((el) => el === document.activeElement), 'composer focused');
  await bob.page.getByTestId('composer').press('Escape');
  await banner.waitFor({ state: 'hidden' });
  // … and the × button.
  await act(bob.page, 'the original question', 'reply-button');
  await banner.waitFor();
  await bob.page.getByTestId('compose-cancel').click();
  await banner.waitFor({ state: 'hidden' });
  await say(bob.page, 'not a reply at all');
  await byBody(alice.page, 'not a reply at all').waitFor();
  assert.equal(await byBody(alice.page, 'not a reply at all').getByTestId('reply-quote').count(), 0);

  // Enough messages after it that it scrolls out of view.
  const carol = await rawUser(server, uname('carol'));
  raws.push(carol);
  await carol.call({ type: 'join', room });
  for (let i = 1; i <= 30; i++) await carol.call({ type: 'say', room, text: `filler line ${i}` });
  await byBody(bob.page, 'filler line 30').waitFor();

  await act(bob.page, 'the original question', 'reply-button');
  await banner.waitFor();
  await say(bob.page, 'it was me, sorry');
  await banner.waitFor({ state: 'hidden' });
  for (const u of [alice, bob]) {
    const reply = byBody(u.page, 'it was me, sorry');
    await reply.waitFor();
    const quote = reply.getByTestId('reply-quote');
    await quote.waitFor();
    assert.match(await quote.textContent(), new RegExp(`${alice.name}.*the original question`));
    assert.equal(await quote.getAttribute('data-reply-to'), originalId, 'reply_to is the original id');
  }
  await bob.page.waitForTimeout(300);
  const origAtBob = messages(bob.page).and(bob.page.locator(`[data-id="${originalId}"]`));
  assert.equal(await inView(origAtBob), false, 'the original is out of view before the click');
  await byBody(bob.page, 'it was me, sorry').getByTestId('reply-quote').click();
  await until(() => inView(origAtBob), true, 'the original scrolled into view');
  assert.match(await origAtBob.getAttribute('class'), /\bflash\b/, 'the original is highlighted');
  await until(async () => /\bflash\b/.test(await origAtBob.getAttribute('class')), false, 'the highlight fades', 5000);
  alice.assertClean();
  bob.assertClean();
});

test('react: a picker, chips with counts at both, toggling, who reacted in the tooltip', { timeout: 120000 }, async () => {
  const { alice, bob } = await pair('react');
  await say(alice.page, 'shipping the release today');
  await byBody(bob.page, 'shipping the release').waitFor();

  // The picker opens from the react button and closes with Esc, giving focus back.
  await act(bob.page, 'shipping the release', 'react-button');
  const picker = bob.page.getByTestId('emoji-picker');
  await picker.waitFor();
  const reactBtn = byBody(bob.page, 'shipping the release').getByTestId('react-button');
  assert.equal(await reactBtn.getAttribute('aria-expanded'), 'true');
  assert.ok(await picker.getByTestId('emoji-option').count() >= 20, 'a built-in set of emoji');
  assert.equal(await picker.getByTestId('emoji-frequent').count(), 0, 'nothing used yet');
  await bob.page.keyboard.press('Escape');
  await picker.waitFor({ state: 'hidden' });
  assert.ok(await reactBtn.evaluate((el) => el === document.activeElement), 'focus back on the react button');

  await act(bob.page, 'shipping the release', 'react-button');
  await picker.getByTestId('emoji-option').filter({ hasText: '🎉' }).first().click();
  await picker.waitFor({ state: 'hidden' });
  await until(() => chipCount(bob.page, 'shipping the release', '🎉'), 1, 'bob sees his chip');
  await until(() => chipCount(alice.page, 'shipping the release', '🎉'), 1, 'alice sees bob\'s chip');
  assert.equal(await chip(bob.page, 'shipping the release', '🎉').getAttribute('aria-pressed'), 'true');
  assert.equal(await chip(alice.page, 'shipping the release', '🎉').getAttribute('aria-pressed'), 'false');
  assert.match(await chip(alice.page, 'shipping the release', '🎉').getAttribute('title'), new RegExp(bob.name));

  // Alice adds hers by clicking the chip: 2 at both, the tooltip lists both.
  await chip(alice.page, 'shipping the release', '🎉').click();
  await until(() => chipCount(bob.page, 'shipping the release', '🎉'), 2, 'two at bob');
  await until(() => chipCount(alice.page, 'shipping the release', '🎉'), 2, 'two at alice');
  const title = await chip(bob.page, 'shipping the release', '🎉').getAttribute('title');
  assert.ok(title.includes(alice.name) && title.includes(bob.name), `tooltip lists both: ${title}`);

  // Bob toggles his off: 1, and only alice in the tooltip.
  await chip(bob.page, 'shipping the release', '🎉').click();
  await until(() => chipCount(alice.page, 'shipping the release', '🎉'), 1, 'one at alice');
  await until(() => chipCount(bob.page, 'shipping the release', '🎉'), 1, 'one at bob');
  assert.equal(await chip(bob.page, 'shipping the release', '🎉').getAttribute('aria-pressed'), 'false');
  const title1 = await chip(alice.page, 'shipping the release', '🎉').getAttribute('title');
  assert.ok(title1.includes(alice.name) && !title1.includes(bob.name), `tooltip lists alice only: ${title1}`);

  // Alice's off too: the chip is gone at both.
  await chip(alice.page, 'shipping the release', '🎉').click();
  await until(() => chipCount(bob.page, 'shipping the release', '🎉'), 0, 'gone at bob');
  await until(() => chipCount(alice.page, 'shipping the release', '🎉'), 0, 'gone at alice');

  // Bob's most used emoji are remembered (localStorage, per user) and offered first.
  await act(bob.page, 'shipping the release', 'react-button');
  await picker.waitFor();
  const frequent = picker.getByTestId('emoji-frequent');
  await frequent.waitFor();
  assert.deepEqual(await frequent.getByTestId('emoji-option').allTextContents(), ['🎉']);
  const used = await bob.page.evaluate((u) => JSON.parse(localStorage.getItem(`parlor.emoji.${u}`)), bob.name.toLowerCase());
  assert.equal(used['🎉'][0], 1);
  await bob.page.keyboard.press('Escape');
  await picker.waitFor({ state: 'hidden' });
  alice.assertClean();
  bob.assertClean();
});

test('edit: the text changes at bob with "(edited)"; Esc gives the draft back', { timeout: 120000 }, async () => {
  const { alice, bob } = await pair('edit');
  await say(alice.page, 'teh quick fix is in');
  const atBob = byBody(bob.page, 'teh quick fix is in');
  await atBob.waitFor();
  const id = await atBob.getAttribute('data-id');

  // Edit, then Esc: the composer gets back what was typed before, nothing changes.
  const composer = alice.page.getByTestId('composer');
  await composer.fill('half-typed draft');
  await act(alice.page, 'teh quick fix', 'edit-button');
  assert.equal(await composer.inputValue(), 'teh quick fix is in');
  assert.equal(await alice.page.getByTestId('compose-banner').getAttribute('data-mode'), 'edit');
  await composer.press('Escape');
  await alice.page.getByTestId('compose-banner').waitFor({ state: 'hidden' });
  assert.equal(await composer.inputValue(), 'half-typed draft');

  await act(alice.page, 'teh quick fix', 'edit-button');
  await composer.fill('the quick fix is in');
  await composer.press('Enter');
  await alice.page.getByTestId('compose-banner').waitFor({ state: 'hidden' });
  assert.equal(await composer.inputValue(), 'half-typed draft', 'the draft is back after saving');
  for (const u of [alice, bob]) {
    const m = messages(u.page).and(u.page.locator(`[data-id="${id}"]`));
    await m.locator('.msg-body', { hasText: 'the quick fix is in' }).waitFor();
    const mark = m.getByTestId('edited-mark');
    assert.equal(await mark.textContent(), '(edited)');
    assert.match(await mark.getAttribute('title'), /^Edited \S/);
  }
  assert.equal(await bob.page.locator('#message-list').getByText('teh quick fix').count(), 0, 'the old text is gone');
  assert.equal(await messages(bob.page).count(), 1, 'edited in place, not a new message');
  alice.assertClean();
  bob.assertClean();
});

test('delete: asks in the page, bob sees "message deleted" in place; only own messages offer edit and delete', { timeout: 120000 }, async () => {
  const { alice, bob } = await pair('delete');
  await say(alice.page, 'alice says something regrettable');
  await byBody(bob.page, 'regrettable').waitFor();
  await say(bob.page, 'bob answers it');
  await byBody(alice.page, 'bob answers it').waitFor();
  await act(bob.page, 'regrettable', 'reply-button');
  await say(bob.page, 'bob quotes it');
  await byBody(alice.page, 'bob quotes it').getByTestId('reply-quote').waitFor();
  await say(alice.page, 'alice after it');
  await byBody(bob.page, 'alice after it').waitFor();

  // Who may do what.
  for (const [u, mine, theirs] of [[alice, 'regrettable', 'bob answers it'], [bob, 'bob answers it', 'regrettable']]) {
    const own = byBody(u.page, mine);
    await own.hover();
    await own.getByTestId('message-actions').waitFor();
    for (const b of ['reply-button', 'react-button', 'edit-button', 'delete-button']) assert.equal(await own.getByTestId(b).count(), 1, `${b} on one's own message`);
    const other = byBody(u.page, theirs);
    await other.hover();
    await other.getByTestId('message-actions').waitFor();
    assert.ok(await other.getByTestId('reply-button').isVisible());
    assert.ok(await other.getByTestId('react-button').isVisible());
    assert.equal(await other.getByTestId('edit-button').count(), 0, 'no edit on another\'s message');
    assert.equal(await other.getByTestId('delete-button').count(), 0, 'no delete on another\'s message');
  }

  const id = await byBody(bob.page, 'regrettable').getAttribute('data-id');
  const dialog = alice.page.getByTestId('delete-dialog');
  await act(alice.page, 'regrettable', 'delete-button');
  await dialog.waitFor();
  assert.ok(await dialog.evaluate((d) => d.open));
  assert.match(await dialog.textContent(), /regrettable/);
  await dialog.getByTestId('delete-cancel').click();
  await dialog.waitFor({ state: 'hidden' });
  await alice.page.waitForTimeout(500);
  assert.equal(await byBody(bob.page, 'regrettable').count(), 1, 'cancel deletes nothing');

  await act(alice.page, 'regrettable', 'delete-button');
  await dialog.getByTestId('delete-confirm').click();
  for (const u of [alice, bob]) {
    const m = messages(u.page).and(u.page.locator(`[data-id="${id}"]`));
    await m.locator('.msg-body', { hasText: 'message deleted' }).waitFor();
    assert.equal(await u.page.locator('#message-list').getByText('something regrettable').count(), 0, 'the text is gone');
    assert.equal(await m.getByTestId('message-actions').count(), 0, 'no actions on a deleted message');
    // In place: still between its neighbours.
    const order = await messages(u.page).evaluateAll((els) => els.map((e) => e.dataset.id));
    const i = order.indexOf(id);
    assert.ok(i >= 0 && i < order.length - 1, 'kept in place');
    // The reply's quote says so.
    assert.match(await byBody(u.page, 'bob quotes it').getByTestId('reply-quote').textContent(), /message deleted/);
  }
  assert.deepEqual(alice.dialogs, [], 'no window.confirm');
  alice.assertClean();
  bob.assertClean();
});

test('↑ in an empty composer edits one\'s last message', { timeout: 120000 }, async () => {
  const { alice, bob } = await pair('arrow');
  await say(alice.page, 'first line from alice');
  await say(alice.page, 'last line from alice');
  await say(bob.page, 'bob has the last word');
  await byBody(alice.page, 'bob has the last word').waitFor();
  await byBody(bob.page, 'last line from alice').waitFor();

  const composer = alice.page.getByTestId('composer');
  // Not with text in the composer.
  await composer.fill('some draft');
  await composer.press('ArrowUp');
  assert.equal(await composer.inputValue(), 'some draft');
  assert.ok(await alice.page.getByTestId('compose-banner').isHidden());

  await composer.fill('');
  await composer.press('ArrowUp');
  assert.equal(await composer.inputValue(), 'last line from alice', 'her last message, not bob\'s');
  assert.equal(await alice.page.getByTestId('compose-banner').getAttribute('data-mode'), 'edit');
  await composer.fill('last line from alice, reworded');
  await composer.press('Enter');
  await byBody(bob.page, 'last line from alice, reworded').getByTestId('edited-mark').waitFor();
  assert.equal(await byBody(bob.page, 'first line from alice').getByTestId('edited-mark').count(), 0);
  assert.equal(await composer.inputValue(), '');
  alice.assertClean();
  bob.assertClean();
});

test('catch-up: after a dropped connection bob sees every edit, deletion and reaction made meanwhile, without reloading', { timeout: 150000 }, async () => {
  const proxy = await tcpProxy(server);
  try {
    const { alice, bob } = await pair('catchup', { bobVia: proxy });
    const sent = recordSent(bob.page);
    await say(alice.page, 'm1 will be edited');
    await say(alice.page, 'm2 will be deleted');
    await say(alice.page, 'm3 gets reactions');
    await say(alice.page, 'm4 bob reacted first');
    await byBody(bob.page, 'm4 bob reacted first').waitFor();
    // Before the cut: alice's 👀 on m3, bob's 👍 on m4.
    await act(alice.page, 'm3 gets reactions', 'react-button');
    await alice.page.getByTestId('emoji-picker').getByTestId('emoji-option').filter({ hasText: '👀' }).first().click();
    await act(bob.page, 'm4 bob reacted first', 'react-button');
    await bob.page.getByTestId('emoji-picker').getByTestId('emoji-option').filter({ hasText: '👍' }).first().click();
    await until(() => chipCount(bob.page, 'm3 gets reactions', '👀'), 1, 'bob sees 👀');
    await until(() => chipCount(alice.page, 'm4 bob reacted first', '👍'), 1, 'alice sees 👍');
    await bob.page.waitForTimeout(300);

    // The highest seq applied, remembered per user.
    const seqBefore = await bob.page.evaluate(() => window.parlor.evSeq);
    assert.equal(typeof seqBefore, 'number');
    const stored = await bob.page.evaluate((u) => JSON.parse(localStorage.getItem(`parlor.seq.${u}`)), bob.name.toLowerCase());
    assert.equal(stored, seqBefore, 'seq stored in localStorage for this user');
    await bob.page.evaluate(() => { window.notReloaded = true; window.parlor.catchupLimit = 2; });

    await proxy.drop();
    await bob.page.locator('[data-testid="connection-status"]:not([data-state="ready"])').waitFor({ timeout: 10000 });

    // Meanwhile alice changes everything.
    await act(alice.page, 'm1 will be edited', 'edit-button');
    await say(alice.page, 'm1 was edited while bob was away');
    await act(alice.page, 'm2 will be deleted', 'delete-button');
    await alice.page.getByTestId('delete-dialog').getByTestId('delete-confirm').click();
    await chip(alice.page, 'm3 gets reactions', '👀').click(); // off
    await act(alice.page, 'm3 gets reactions', 'react-button');
    await alice.page.getByTestId('emoji-picker').getByTestId('emoji-option').filter({ hasText: '🚀' }).first().click();
    await chip(alice.page, 'm4 bob reacted first', '👍').click(); // alice joins bob's 👍
    await say(alice.page, 'm5 said while bob was away');
    await byBody(alice.page, 'm1 was edited while bob was away').getByTestId('edited-mark').waitFor();
    await byBody(alice.page, 'message deleted').waitFor();
    await until(() => chipCount(alice.page, 'm3 gets reactions', '👀'), 0, '👀 off at alice');
    await until(() => chipCount(alice.page, 'm3 gets reactions', '🚀'), 1, '🚀 at alice');
    await until(() => chipCount(alice.page, 'm4 bob reacted first', '👍'), 2, '👍 2 at alice');
    await byBody(alice.page, 'm5 said while').waitFor();
    // Bob is still cut off and has seen none of it.
    assert.equal(await byBody(bob.page, 'm1 will be edited').count(), 1);
    assert.equal(await chipCount(bob.page, 'm3 gets reactions', '👀'), 1);

    await proxy.restore();
    await reconnect(bob.page);
    await byBody(bob.page, 'm1 was edited while bob was away').getByTestId('edited-mark').waitFor();
    await byBody(bob.page, 'm5 said while bob was away').waitFor();
    await byBody(bob.page, 'message deleted').waitFor();
    assert.equal(await bob.page.locator('#message-list').getByText('m2 will be deleted').count(), 0, 'deleted at bob');
    await until(() => chipCount(bob.page, 'm3 gets reactions', '👀'), 0, '👀 removed at bob');
    await until(() => chipCount(bob.page, 'm3 gets reactions', '🚀'), 1, '🚀 at bob');
    await until(() => chipCount(bob.page, 'm4 bob reacted first', '👍'), 2, '👍 2 at bob');
    assert.equal(await chip(bob.page, 'm4 bob reacted first', '👍').getAttribute('aria-pressed'), 'true', 'his own reaction is still his');
    assert.equal(await bob.page.evaluate(() => window.notReloaded), true, 'no reload');
    assert.equal(await messages(bob.page, 'm5 said').count(), 1, 'the new message once');

    // It was `catchup` from the seq bob had, repeated while `more` (2 events a page here),
    // not the old per-room `history … after`.
    const catchups = sent.filter((f) => f.type === 'catchup');
    assert.ok(catchups.length >= 3, `paged catch-up: ${JSON.stringify(catchups)}`);
    assert.equal(catchups[0].since, seqBefore);
    for (let i = 1; i < catchups.length; i++) assert.ok(catchups[i].since > catchups[i - 1].since, 'each page from the last');
    assert.equal(sent.filter((f) => f.type === 'history' && f.after !== undefined).length, 0, 'no history after');
    const seqAfter = await bob.page.evaluate(() => window.parlor.evSeq);
    assert.ok(seqAfter > seqBefore, 'seq moved on');

    // Live again; and a reload shows the same state (from join/history snapshots).
    await say(alice.page, 'm6 live again');
    await byBody(bob.page, 'm6 live again').waitFor();
    await bob.page.reload();
    await waitConnected(bob.page);
    await byBody(bob.page, 'm6 live again').waitFor();
    await byBody(bob.page, 'm1 was edited while bob was away').getByTestId('edited-mark').waitFor();
    await byBody(bob.page, 'message deleted').waitFor();
    assert.equal(await chipCount(bob.page, 'm3 gets reactions', '🚀'), 1);
    assert.equal(await chipCount(bob.page, 'm3 gets reactions', '👀'), 0);
    assert.equal(await chipCount(bob.page, 'm4 bob reacted first', '👍'), 2);
    alice.assertClean();
    bob.assertClean();
  } finally {
    await proxy.close();
  }
});

test('catch-up reset: when the server cannot say what changed, the client reloads its conversations', { timeout: 120000 }, async () => {
  const proxy = await tcpProxy(server);
  try {
    const { alice, bob } = await pair('reset', { bobVia: proxy });
    const sent = recordSent(bob.page);
    await say(alice.page, 'before the reset');
    await byBody(bob.page, 'before the reset').waitFor();
    await proxy.drop();
    await bob.page.locator('[data-testid="connection-status"]:not([data-state="ready"])').waitFor({ timeout: 10000 });
    await act(alice.page, 'before the reset', 'edit-button');
    await say(alice.page, 'edited during the reset');
    await byBody(alice.page, 'edited during the reset').getByTestId('edited-mark').waitFor();
    // A seq the server never handed out (as after talking to another server): it answers
    // `reset`, and the client falls back to join/history.
    await bob.page.evaluate(() => { window.parlor.evSeq = 1e12; window.notReloaded = true; });
    await proxy.restore();
    await reconnect(bob.page);
    await byBody(bob.page, 'edited during the reset').getByTestId('edited-mark').waitFor();
    assert.equal(await messages(bob.page, 'edited during the reset').count(), 1);
    assert.ok(sent.some((f) => f.type === 'catchup' && f.since === 1e12), 'asked catchup first');
    assert.ok(sent.some((f) => f.type === 'join'), 'reloaded with join');
    const seq = await bob.page.evaluate(() => window.parlor.evSeq);
    assert.ok(seq < 1e12, `continues from the server's seq (${seq})`);
    assert.equal(await bob.page.evaluate(() => window.notReloaded), true, 'no page reload');
    await say(alice.page, 'live after the reset');
    await byBody(bob.page, 'live after the reset').waitFor();
    alice.assertClean();
    bob.assertClean();
  } finally {
    await proxy.close();
  }
});

test('keyboard: ↑ focuses a message, Tab reaches its labelled actions, the picker works with keys and Esc', { timeout: 90000 }, async () => {
  const { alice, bob } = await pair('keys');
  await say(bob.page, 'reach me with the keyboard');
  await byBody(alice.page, 'reach me with the keyboard').waitFor();
  const page = alice.page;
  await page.locator('#messages').focus();
  await page.keyboard.press('ArrowUp');
  const focusedId = () => page.evaluate(() => document.activeElement.closest('li.msg')?.dataset.id ?? null);
  assert.equal(await focusedId(), await byBody(page, 'reach me').getAttribute('data-id'), 'the last message has focus');
  const actions = byBody(page, 'reach me').getByTestId('message-actions');
  assert.ok(await actions.isVisible(), 'a focused message shows its actions');
  let reached = null;
  for (let i = 0; i < 6 && !reached; i++) {
    await page.keyboard.press('Tab');
    reached = await page.evaluate(() => document.activeElement.closest('[data-testid="message-actions"]') ? document.activeElement.dataset.testid : null);
  }
  assert.ok(reached, 'Tab reaches the actions');
  for (const label of await actions.locator('button').evaluateAll((bs) => bs.map((b) => b.getAttribute('aria-label')))) {
    assert.ok(label && label.length > 2, `labelled: ${label}`);
  }
  // To the react button, open the picker with Enter, move with arrows, close with Esc.
  for (let i = 0; i < 6 && reached !== 'react-button'; i++) {
    await page.keyboard.press('Tab');
    reached = await page.evaluate(() => document.activeElement.dataset.testid);
  }
  assert.equal(reached, 'react-button');
  await page.keyboard.press('Enter');
  const picker = page.getByTestId('emoji-picker');
  await picker.waitFor();
  const focusedEmoji = () => page.evaluate(() => (document.activeElement.dataset.testid === 'emoji-option' ? document.activeElement.textContent : null));
  const first = await focusedEmoji();
  assert.ok(first, 'focus in the picker');
  await page.keyboard.press('ArrowRight');
  const second = await focusedEmoji();
  assert.ok(second && second !== first, 'arrows move between emoji');
  await page.keyboard.press('Escape');
  await picker.waitFor({ state: 'hidden' });
  assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'react-button');
  // Enter on an emoji reacts.
  await page.keyboard.press('Enter');
  await picker.waitFor();
  await page.keyboard.press('Enter');
  await until(() => chipCount(bob.page, 'reach me with the keyboard', first), 1, 'reacted from the keyboard');
  alice.assertClean();
  bob.assertClean();
});

test('phone: a long press shows the actions; react and reply by touch (screenshot)', { timeout: 90000 }, async () => {
  // (Plain names: this picture is in docs/screenshots. Names are unique within this file's server.)
  const room = 'lunch';
  const alice = await person('erin', { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true }, server, 'erin');
  const bob = await rawUser(server, 'dave');
  raws.push(bob);
  await joinRoom(alice.page, room);
  await bob.call({ type: 'join', room });
  await bob.call({ type: 'say', room, text: 'Morning! Anyone up for lunch today?' });
  await say(alice.page, 'Yes please, I skipped breakfast.');
  await byBody(alice.page, 'skipped breakfast').waitFor();
  await bob.call({ type: 'say', room, text: 'Lunch at noon? The new place on 5th.' });
  const page = alice.page;
  const m = byBody(page, 'Lunch at noon');
  await m.waitFor();
  const actions = m.getByTestId('message-actions');
  assert.equal(await actions.isVisible(), false, 'hidden until asked for');

  const box = await m.boundingBox();
  const cdp = await alice.ctx.newCDPSession(page);
  const point = { x: Math.round(box.x + box.width / 2), y: Math.round(box.y + box.height / 2) };
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: [point] });
  await page.waitForTimeout(700);
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] });
  await actions.waitFor();
  assert.ok(await actions.isVisible(), 'a long press shows the actions');
  await saveShot(page, 'phone-actions.png');

  await actions.getByTestId('react-button').tap();
  const picker = page.getByTestId('emoji-picker');
  await picker.waitFor();
  const pb = await picker.boundingBox();
  assert.ok(pb.x >= 0 && pb.x + pb.width <= 390, `picker fits the phone: ${JSON.stringify(pb)}`);
  await picker.getByTestId('emoji-option').filter({ hasText: '👍' }).first().tap();
  await bob.wait((f) => f.type === 'reaction' && f.emoji === '👍' && f.on === true);
  await chip(page, 'Lunch at noon', '👍').waitFor();

  await actions.waitFor({ state: 'hidden' });

  // A tap elsewhere closes actions held open.
  const longPress = async () => {
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: [point] });
    await page.waitForTimeout(700);
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] });
    await actions.waitFor();
  };
  await longPress();
  await page.locator('#conv-title').tap();
  await actions.waitFor({ state: 'hidden' });

  await longPress();
  await actions.getByTestId('reply-button').tap();
  await page.getByTestId('compose-banner').waitFor();
  await say(page, 'Sounds good!');
  const reply = await bob.wait((f) => f.type === 'message' && f.text === 'Sounds good!');
  assert.equal(String(reply.reply_to), await m.getAttribute('data-id'), 'reply_to sent from the phone');
  assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= innerWidth), 'no horizontal scroll');
  alice.assertClean();
});

test('screenshots: message actions with the picker open; a conversation with replies, reactions, edits and a deletion', { timeout: 120000 }, async () => {
  // (Plain names: these pictures are in docs/screenshots. Names are unique within this file's server.)
  const room = 'launch';
  const alice = await person('alice', {}, server, 'alice');
  const ben = await rawUser(server, 'ben');
  const chloe = await rawUser(server, 'chloe');
  raws.push(ben, chloe);
  await ben.call({ type: 'nick', nick: 'Ben' });
  await chloe.call({ type: 'nick', nick: 'Chloe' });
  await joinRoom(alice.page, room);
  await ben.call({ type: 'join', room });
  await chloe.call({ type: 'join', room });
  const page = alice.page;

  const s1 = await ben.call({ type: 'say', room, text: 'Release candidate 3 is up on staging. Please give it a spin before Friday.' });
  const s2 = await chloe.call({ type: 'say', room, text: 'Login works, but the **settings** page shows a blank panel on Safari.' });
  await say(page, 'Looking into the Safari issue now.');
  await byBody(page, 'Looking into the Safari').waitFor();
  const s4 = await ben.call({ type: 'say', room, text: 'Ignore the last build, I pushed the wrong tag 🙈' });
  await ben.call({ type: 'delete', id: s4.id });
  await chloe.call({ type: 'say', room, text: 'Found it: a missing polyfill for `structuredClone`.', reply_to: s2.id });
  const s6 = await ben.call({ type: 'say', room, text: 'Nice catch! Merging the fix, then tagging rc4.' });
  await ben.call({ type: 'edit', id: s6.id, text: 'Nice catch! Merged the fix and tagged **rc4**.' });
  await chloe.call({ type: 'react', id: s6.id, emoji: '🎉', on: true });
  await chloe.call({ type: 'react', id: s1.id, emoji: '👍', on: true });
  await ben.call({ type: 'react', id: s6.id, emoji: '🚀', on: true });
  await byBody(page, 'Merged the fix').getByTestId('edited-mark').waitFor();
  await chip(page, 'Merged the fix', '🚀').waitFor();
  await chip(page, 'Merged the fix', '🎉').click();
  await until(() => chipCount(page, 'Merged the fix', '🎉'), 2, 'alice joins 🎉');
  await act(page, 'Found it', 'reply-button');
  await page.getByTestId('composer').fill('Great, thanks both!');
  await page.mouse.move(5, 5);
  await page.waitForTimeout(300);
  await saveShot(page, 'messages-changed.png');
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.waitForTimeout(200);
  await saveShot(page, 'messages-changed-dark.png');
  await page.emulateMedia({ colorScheme: 'light' });
  await page.getByTestId('compose-cancel').click();
  await page.getByTestId('composer').fill('');

  // Hover state with the emoji picker open.
  await act(page, 'Merged the fix', 'react-button');
  await page.getByTestId('emoji-picker').waitFor();
  await page.getByTestId('emoji-picker').getByTestId('emoji-option').nth(3).hover();
  await page.waitForTimeout(200);
  await saveShot(page, 'message-actions.png');
  alice.assertClean();
});

test('store: edits, deletions and reactions apply idempotently by message id (pure module, in the browser)', { timeout: 30000 }, async () => {
  const u = await launchUser(server);
  open.push(u);
  const r = await u.page.evaluate(async () => {
    const s = await import('/js/store.js');
    const conv = s.newConv('#t');
    s.addMessages(conv, [{ id: 5, room: 't', from: 'ann', text: 'a', ts: 1 }, { id: 7, room: 't', from: 'bo', text: 'b', ts: 2, reactions: [{ emoji: '👍', users: ['ann'] }] }]);
    const m5 = s.findMessage(conv, 5);
    const m7 = s.findMessage(conv, 7);
    const out = {};
    out.edit1 = s.applyEdit(m5, { text: 'a2', edited_ts: 100 });
    out.editSame = s.applyEdit(m5, { text: 'a2', edited_ts: 100 });
    out.editOlder = s.applyEdit(m5, { text: 'a1', edited_ts: 50 }); // replayed after a newer one
    out.text5 = m5.text;
    out.on = s.applyReaction(m7, { user: 'bo', emoji: '👍', on: true });
    out.onAgain = s.applyReaction(m7, { user: 'BO', emoji: '👍', on: true });
    out.offMissing = s.applyReaction(m7, { user: 'cy', emoji: '🎉', on: false });
    out.newEmoji = s.applyReaction(m7, { user: 'cy', emoji: '🎉', on: true });
    out.r1 = JSON.stringify(m7.reactions);
    out.offLast = s.applyReaction(m7, { user: 'cy', emoji: '🎉', on: false });
    out.r2 = JSON.stringify(m7.reactions);
    // A snapshot (join/history) of a message we have: its state wins, but not an older edit.
    s.addMessages(conv, [{ id: 5, room: 't', from: 'ann', text: 'a1', edited_ts: 50, ts: 1 }], { merge: true });
    out.afterOldSnap = m5.text;
    s.addMessages(conv, [{ id: 7, room: 't', from: 'bo', text: 'b', ts: 2, reactions: [{ emoji: '🚀', users: ['ann'] }] }], { merge: true });
    out.r3 = JSON.stringify(m7.reactions);
    out.del = s.applyDelete(m7);
    out.delAgain = s.applyDelete(m7);
    out.editDeleted = s.applyEdit(m7, { text: 'zombie', edited_ts: 999 });
    out.reactDeleted = s.applyReaction(m7, { user: 'ann', emoji: '👍', on: true });
    out.m7 = JSON.stringify({ deleted: m7.deleted, text: m7.text, reactions: m7.reactions });
    s.addMessages(conv, [{ id: 7, room: 't', from: 'bo', text: 'b', ts: 2 }], { merge: true });
    out.stillDeleted = m7.deleted === true && m7.text === undefined;
    out.count = conv.messages.length;
    out.lastOwn = s.lastOwnMessage(conv, 'BO')?.id ?? null;
    return out;
  });
  assert.deepEqual(r, {
    edit1: true, editSame: false, editOlder: false, text5: 'a2',
    on: true, onAgain: false, offMissing: false, newEmoji: true,
    r1: JSON.stringify([{ emoji: '👍', users: ['ann', 'bo'] }, { emoji: '🎉', users: ['cy'] }]),
    offLast: true, r2: JSON.stringify([{ emoji: '👍', users: ['ann', 'bo'] }]),
    afterOldSnap: 'a2',
    r3: JSON.stringify([{ emoji: '🚀', users: ['ann'] }]),
    del: true, delAgain: false, editDeleted: false, reactDeleted: false,
    m7: JSON.stringify({ deleted: true }),
    stillDeleted: true, count: 2, lastOwn: null,
  });
  u.assertClean();
});
