// The browser client over built-in TLS (--tls-cert/--tls-key): the page over https://, the chat
// over wss:// (the client picks the scheme from the page), two people talking.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchUser, register, say, messages, uname, selfSignedCert } from './helpers.mjs';

const cleanup = [];
after(async () => {
  for (const c of cleanup.reverse()) await c();
});

test('two people chat over https:// and wss://', { timeout: 60000 }, async () => {
  const server = await startServer({ tls: selfSignedCert() });
  cleanup.push(() => server.stop());
  assert.match(server.url, /^https:/);
  const alice = await launchUser(server);
  cleanup.push(() => alice.close());
  const bob = await launchUser(server);
  cleanup.push(() => bob.close());
  const [a, b] = [uname('alice'), uname('bob')];
  // This port speaks only TLS: a chat that works here went over wss://.
  await register(alice.page, a);
  await register(bob.page, b);
  assert.equal(await alice.page.evaluate(() => location.protocol), 'https:');

  await say(alice.page, 'over **TLS**');
  const atBob = messages(bob.page, 'over TLS');
  await atBob.waitFor();
  assert.equal(await atBob.locator('strong').textContent(), 'TLS');
  await say(bob.page, 'received');
  await messages(alice.page, 'received').waitFor();
  // The server counted TLS handshakes (read from loopback, where /metrics is served).
  const metrics = await alice.page.evaluate(async () => (await fetch('/metrics')).text());
  const handshakes = Number(/parlor_tls_handshakes_total (\d+)/.exec(metrics)?.[1]);
  assert.ok(handshakes >= 2, `TLS handshakes: ${handshakes}`);
  assert.match(metrics, /parlor_websocket_connections [2-9]/);
  alice.assertClean();
  bob.assertClean();
});
