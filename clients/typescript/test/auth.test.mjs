// The Node TCP client against a ringcastd with JWT auth (HS256; leeway 0):
// refusals at connect and per request, a tokenProvider that outlives its
// short-lived tokens (by reconnecting, or by refreshing the live
// connection), fixed credentials that expire, and refresh().
//
//   npx tsc -p tsconfig.json && node --test --test-concurrency=1 test/auth.test.mjs

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, RingcastError, jwtExpiryMs } from "../dist/index.js";
import { jwtClaims, mintJwt, randomSecret, startBroker } from "./helpers/broker.mjs";
import { startProxy } from "./helpers/proxy.mjs";
import { Collector, connect, contiguous, uniqueTopic } from "./helpers/tcp.mjs";

const TEST_TIMEOUT = 90_000;
const secret = randomSecret();

let broker;
let admin;

before(async () => {
  broker = await startBroker({
    jwt: { secret },
    config: { auth: { anonymous: { subscribe: ["public.*"] } } },
  });
  admin = await Client.connect({ host: broker.tcpHost, port: broker.tcpPort, credentials: broker.adminToken });
});

after(async () => {
  await admin?.close();
  await broker?.cleanup();
});

const token = (opts) => mintJwt(secret, jwtClaims(opts));

function rejectsWith(promise, code) {
  return assert.rejects(promise, (e) => {
    assert.ok(e instanceof RingcastError, `a RingcastError, got ${e}`);
    assert.equal(e.code, code, e.message);
    return true;
  });
}

/**
 * Publishes `{ i }` with the admin client, 5 events every 10 ms (a steady
 * stream across the reader's token expiries), until `stop()` holds;
 * resolves how many.
 */
async function publishUntil(topic, stop, { timeoutMs = 45_000 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let i = 0;
  while (!stop()) {
    if (Date.now() > deadline) throw new Error(`still not done after ${timeoutMs} ms (${i} events)`);
    await Promise.all(Array.from({ length: 5 }, () => admin.publish(topic, "t", { i: i++ })));
    await new Promise((r) => setTimeout(r, 10)); // pacing the producer, not awaiting a state
  }
  return i;
}

test("connect is refused without valid credentials, and Client.connect rejects with the code", { timeout: TEST_TIMEOUT }, async () => {
  const at = { host: broker.tcpHost, port: broker.tcpPort };
  // Anonymous clients get the anonymous grants only; with some, they connect.
  const anon = await Client.connect(at);
  await anon.close();
  await rejectsWith(Client.connect({ ...at, credentials: mintJwt(randomSecret(), jwtClaims({ subscribe: ["*"] })) }), "Unauthorized");
  await rejectsWith(Client.connect({ ...at, credentials: "eyJnot.a.jwt" }), "Unauthorized");
  await rejectsWith(Client.connect({ ...at, credentials: token({ subscribe: ["*"], ttlSeconds: -60 }) }), "TokenExpired");
  await rejectsWith(Client.connect({ ...at, credentials: "an-unknown-api-key" }), "Unauthorized");
  // A token provider is asked, and its refusal is final too (no reconnect loop).
  let asked = 0;
  await rejectsWith(
    Client.connect({ ...at, tokenProvider: () => (asked++, mintJwt(randomSecret(), jwtClaims({ subscribe: ["*"] }))) }),
    "Unauthorized",
  );
  assert.equal(asked, 1);
});

test("valid credentials granting nothing: Forbidden at connect", { timeout: TEST_TIMEOUT }, async () => {
  // Grants are the token's plus the anonymous ones; a broker without anonymous grants refuses a token with none.
  const b = await startBroker({ jwt: { secret } });
  try {
    await rejectsWith(Client.connect({ host: b.tcpHost, port: b.tcpPort, credentials: token({}) }), "Forbidden");
    await rejectsWith(Client.connect({ host: b.tcpHost, port: b.tcpPort }), "Unauthorized");
  } finally {
    await b.cleanup();
  }
});

test("requests outside the grants: Forbidden (Unauthorized when anonymous); the connection lives on", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const base = uniqueTopic("acme");
  const client = await connect(t, proxy, { credentials: token({ sub: "u1", subscribe: [`${base}.*`], publish: [`${base}.in.*`] }) });
  const mine = `${base}.in.x`;
  let published = 0;
  const usable = async () => {
    assert.equal((await client.publish(mine, "t", published)).offset, ++published);
    assert.ok((await client.ping()) >= 0);
    assert.equal(client.connected, true);
  };
  await usable();
  await rejectsWith(client.publish("elsewhere", "t", 1), "Forbidden");
  await usable();
  await rejectsWith(client.publish(`${base}.out`, "t", 1), "Forbidden"); // subscribe only
  await usable();
  await rejectsWith(client.subscribe("elsewhere"), "Forbidden");
  await usable();
  await rejectsWith(client.history("elsewhere"), "Forbidden");
  await usable();
  await rejectsWith(client.seal(mine), "Forbidden"); // admin
  await usable();
  await rejectsWith(client.connections(), "Forbidden");
  await usable();
  await rejectsWith(client.deleteGroup(mine, "g"), "Forbidden");
  await usable();
  // What is granted works, and the refusals stored nothing.
  const sub = new Collector(await client.subscribe(mine, { start: "earliest" }), { label: "granted" });
  await sub.untilEvents(published);
  assert.deepEqual((await client.topics()).map((x) => x.name), [mine]);
  await rejectsWith(admin.topicInfo("elsewhere"), "TopicNotFound");
  assert.equal(proxy.accepted, 1, "one connection throughout");

  // Anonymous: the anonymous grants; anything else is Unauthorized (credentials would help).
  const anon = await connect(t, broker);
  await admin.publish("public.news", "t", "hello");
  const news = new Collector(await anon.subscribe("public.news", { start: "earliest" }), { label: "anonymous" });
  await news.untilEvents(1);
  await rejectsWith(anon.publish("public.news", "t", 1), "Unauthorized");
  await rejectsWith(anon.subscribe(mine), "Unauthorized");
  assert.ok((await anon.ping()) >= 0);
  assert.equal(anon.connected, true);
});

test("tokenProvider, no proactive refresh: each expiry closes the session, the client reconnects with a fresh token, the subscription misses nothing", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const topic = uniqueTopic("expiring");
  let asked = 0;
  const client = await connect(t, proxy, {
    proactiveRefresh: false,
    tokenProvider: async () => {
      asked += 1;
      return token({ sub: "reader", subscribe: [topic], ttlSeconds: 2 });
    },
  });
  assert.equal(asked, 1);
  const sub = new Collector(await client.subscribe(topic), { label: "subscriber" });
  // Keep publishing (as admin) through two expiries of the reader's session.
  const n = await publishUntil(topic, () => asked >= 3 && client.connected);
  await sub.untilEvents(n);
  assert.equal(contiguous(sub.offsets(), 1, n), null);
  assert.equal(sub.items.length, n, "nothing but events");
  assert.ok(proxy.accepted >= 3, `connections: ${proxy.accepted}`);
  t.diagnostic(`${n} events over ${proxy.accepted} connections, ${asked} tokens`);
});

test("tokenProvider with proactive refresh: the live connection is refreshed before expiry, never dropped", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const topic = uniqueTopic("refreshing");
  let asked = 0;
  const client = await connect(t, proxy, {
    tokenProvider: () => {
      asked += 1;
      return token({ sub: "reader", subscribe: [topic], ttlSeconds: 3 });
    },
  });
  const sub = new Collector(await client.subscribe(topic), { label: "subscriber" });
  const n = await publishUntil(topic, () => asked >= 4);
  await sub.untilEvents(n);
  assert.equal(contiguous(sub.offsets(), 1, n), null);
  assert.equal(proxy.accepted, 1, "refreshed in place: one connection");
  assert.equal(client.connected, true);
});

test("fixed credentials that expire: the client closes with TokenExpired", { timeout: TEST_TIMEOUT }, async (t) => {
  const topic = uniqueTopic("fixed");
  const creds = token({ sub: "short", subscribe: [topic], publish: [topic], ttlSeconds: 2 });
  const client = await connect(t, broker, { credentials: creds });
  const sub = new Collector(await client.subscribe(topic), { label: "subscriber" });
  await client.publish(topic, "t", 1);
  await sub.untilEvents(1);
  await sub.untilDone({ timeoutMs: 10_000 });
  assert.equal(sub.error?.code, "TokenExpired");
  assert.equal(client.connected, false);
  await rejectsWith(client.publish(topic, "t", 2), "TokenExpired");
  assert.ok(Date.now() >= jwtExpiryMs(creds));
});

test("refresh(): same subject extends the session; another subject, an expired token refused; grants narrowed end subscriptions", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const base = uniqueTopic("rf");
  const [a, b] = [`${base}.a`, `${base}.b`];
  const client = await connect(t, proxy, { credentials: token({ sub: "u7", subscribe: [`${base}.*`], ttlSeconds: 600 }) });
  const subA = new Collector(await client.subscribe(a), { label: "a" });
  const subB = new Collector(await client.subscribe(b), { label: "b" });
  await admin.publish(a, "t", 1);
  await admin.publish(b, "t", 1);
  await subA.untilEvents(1);
  await subB.untilEvents(1);

  const longer = token({ sub: "u7", subscribe: [`${base}.*`], ttlSeconds: 7200 });
  assert.equal(await client.refresh(longer), jwtExpiryMs(longer), "leeway 0: the session ends at exp");

  await rejectsWith(client.refresh(token({ sub: "someone-else", subscribe: [`${base}.*`] })), "Forbidden");
  await rejectsWith(client.refresh(token({ sub: "u7", subscribe: [`${base}.*`], ttlSeconds: -5 })), "TokenExpired");
  await rejectsWith(client.refresh("not-a-key"), "Unauthorized");
  assert.ok((await client.ping()) >= 0);

  // Narrowed to a: b's subscription ends (Forbidden), a's goes on.
  await client.refresh(token({ sub: "u7", subscribe: [a], ttlSeconds: 600 }));
  await subB.untilDone();
  assert.equal(subB.error?.code, "Forbidden");
  await admin.publish(a, "t", 2);
  await admin.publish(b, "t", 2);
  await subA.untilEvents(2);
  assert.deepEqual(subA.offsets(), [1, 2]);
  assert.equal(subB.events.length, 1);
  await rejectsWith(client.subscribe(b), "Forbidden");
  assert.equal(proxy.accepted, 1, "one connection throughout");
});
