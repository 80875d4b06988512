// Untrusted text stays text; and the pure formatting/time functions, tested inside the browser.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, say, messages, uname } from './helpers.mjs';

let server;
const open = [];
before(async () => { server = await startServer(); });
after(async () => {
  for (const u of open) await u.close();
  await server?.stop();
});

test('an XSS payload renders as text', { timeout: 60000 }, async () => {
  const alice = await launchUser(server);
  const bob = await launchUser(server);
  open.push(alice, bob);
  await register(alice.page, uname('mallory'));
  await register(bob.page, uname('victim'));
  const payloads = [
    '<img src=x onerror=alert(1)>',
    '<script>alert(2)</script>',
    '[click](javascript:alert(3)) javascript:alert(4)',
    '**<b onmouseover=alert(5)>bold</b>** `<svg onload=alert(6)>`',
    '```\n<iframe src="javascript:alert(7)"></iframe>\n```',
  ];
  for (const p of payloads) await say(alice.page, p);
  for (const u of [alice, bob]) {
    const { page } = u;
    await messages(page, '<img src=x onerror=alert(1)>').waitFor();
    await messages(page, '<iframe').waitFor();
    const list = page.locator('#message-list');
    // (The client's own icons are SVG: message actions. User text renders in bodies, quotes and chips.)
    const userText = list.locator('.msg-body, .reply-quote, .reactions');
    assert.equal(await userText.locator('img, script, iframe, svg, b[onmouseover]').count(), 0, 'no injected elements');
    assert.equal(await list.locator('img, script, iframe, [onload], [onerror], [onmouseover]').count(), 0, 'no injected elements');
    assert.equal(await list.locator('a[href^="javascript"]').count(), 0, 'no javascript: links');
    assert.equal(await messages(page, '<script>alert(2)</script>').count(), 1, 'shown as typed');
    await page.mouse.move(10, 10);
    await page.waitForTimeout(300);
    assert.deepEqual(u.dialogs, [], 'no dialog fired');
    u.assertClean();
  }
});

test('formatting and time helpers (pure modules, in the browser)', { timeout: 30000 }, async () => {
  const u = await launchUser(server);
  open.push(u);
  const r = await u.page.evaluate(async () => {
    const { renderMarkdown, mentions, trimUrl } = await import('/js/render.js');
    const { formatTime, dayLabel, lastSeen } = await import('/js/time.js');
    const { parseCommand } = await import('/js/commands.js');
    const html = (t, o) => { const d = document.createElement('div'); d.append(renderMarkdown(t, o)); return d.innerHTML; };
    const now = new Date(2026, 10, 24, 15, 0, 0).getTime();
    return {
      bold: html('**b** *i* _j_ ~~s~~ `c`'),
      nested: html('**bold *and italic***'),
      link: html('see https://example.com/a_(b), ok.'),
      fence: html('before\n```js\nlet x = "<b>";\n```\nafter'),
      mention: html('hi @alice and @bob', { me: ['alice'] }),
      snake: html('snake_case_name and 2*3*4'),
      room: html('see #rust, a#b and https://x.org/#frag'),
      lt: html('<i>x</i> & "y"'),
      m1: mentions('hey @Alice!', ['alice']),
      m2: mentions('hey @alicex', ['alice']),
      m3: mentions('mail a@alice', ['alice']),
      trim: trimUrl('https://x.org/wiki/Foo_(bar)).'),
      t1: formatTime(new Date(2026, 10, 24, 14, 5).getTime(), now),
      t2: formatTime(new Date(2026, 10, 23, 9, 12).getTime(), now),
      t3: formatTime(new Date(2026, 10, 20, 9, 12).getTime(), now),
      t4: formatTime(new Date(2026, 2, 12, 9, 12).getTime(), now),
      t5: formatTime(new Date(2025, 2, 12, 9, 12).getTime(), now),
      d1: dayLabel(now - 3600e3, now),
      d2: dayLabel(new Date(2026, 10, 23, 23, 59).getTime(), now),
      d3: dayLabel(new Date(2026, 2, 12).getTime(), now),
      ls1: lastSeen({ online: true }, now),
      ls2: lastSeen({ online: false, last_seen: now - 5 * 60e3 }, now),
      ls3: lastSeen({ online: false, last_seen: now - 30 * 3600e3 }, now),
      c1: parseCommand('/join #Rust'),
      c2: parseCommand('/msg bob hi there'),
      c3: parseCommand('//not a command'),
      c4: parseCommand('/nick'),
      c5: parseCommand('/leave'),
    };
  });
  assert.equal(r.bold, '<strong>b</strong> <em>i</em> <em>j</em> <s>s</s> <code class="md-code">c</code>');
  assert.equal(r.nested, '<strong>bold <em>and italic</em></strong>');
  assert.equal(r.link, 'see <a class="md-link" href="https://example.com/a_(b)" target="_blank" rel="noopener noreferrer">https://example.com/a_(b)</a>, ok.');
  assert.equal(r.fence, 'before<pre class="md-pre"><code class="md-block" data-lang="js">let x = "&lt;b&gt;";</code></pre>after');
  assert.equal(r.mention, 'hi <span class="md-mention md-mention-me">@alice</span> and <span class="md-mention">@bob</span>');
  assert.equal(r.snake, 'snake_case_name and 2*3*4');
  assert.equal(r.room, 'see <a class="md-room" href="#rust" data-room="rust">#rust</a>, a#b and <a class="md-link" href="https://x.org/#frag" target="_blank" rel="noopener noreferrer">https://x.org/#frag</a>');
  assert.equal(r.lt, '&lt;i&gt;x&lt;/i&gt; &amp; "y"');
  assert.deepEqual([r.m1, r.m2, r.m3], [true, false, false]);
  assert.equal(r.trim, 'https://x.org/wiki/Foo_(bar)');
  assert.deepEqual([r.t1, r.t2, r.t3, r.t4, r.t5], ['14:05', 'Yesterday 09:12', 'Fri 09:12', '12 Mar 09:12', '12 Mar 2025']);
  assert.deepEqual([r.d1, r.d2, r.d3], ['Today', 'Yesterday', 'Thursday, 12 March']);
  assert.deepEqual([r.ls1, r.ls2, r.ls3], ['online', 'last seen 5 min ago', 'last seen yesterday']);
  assert.deepEqual(r.c1, { type: 'join', room: 'rust' });
  assert.deepEqual(r.c2, { type: 'msg', to: 'bob', text: 'hi there' });
  assert.deepEqual(r.c3, { type: 'say', text: '/not a command' });
  assert.equal(r.c4.type, 'error');
  assert.deepEqual(r.c5, { type: 'leave', room: null });
  u.assertClean();
});
