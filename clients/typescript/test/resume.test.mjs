// The Node TCP client's reconnects against the real ringcastd: connection
// cuts under load (a relay in front of the broker), a broker kill -9 and
// restart, retention and epoch gaps met on a resume, a versions replay
// resumed midway, pattern subscriptions, an operator's closeConnection,
// dead-peer detection through a relay that black-holes the traffic, and a
// slow reader paused alone and resumed exactly.
//
//   npx tsc -p tsconfig.json && node --test --test-concurrency=1 test/resume.test.mjs
//
// Every cut is made at an event-driven point (after the subscriber saw k
// events, after the publisher got k acks), and every assertion is about
// exactly-once: all publishes acked at offsets 1..N in call order, the
// topic holding each payload once, each subscriber seeing each offset
// once, in order.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { startBroker } from "./helpers/broker.mjs";
import { startProxy } from "./helpers/proxy.mjs";
import { Collector, connect, contiguous, eventually, startRelay, uniqueTopic } from "./helpers/tcp.mjs";

const TEST_TIMEOUT = 110_000;
const LOAD_WAIT = 60_000;

let broker;

before(async () => {
  broker = await startBroker({
    config: { topics: { override: [{ pattern: "tiny.*", max_events: 10 }] } },
  });
});

after(async () => {
  await broker?.cleanup();
});

/**
 * Publishes `{ i }` for i in 0..n-1, in call order, with at most
 * `inFlight` unacked at once; `onAck(i, ack)` runs as each is acked.
 * Resolves the acks, by i.
 */
async function publishStream(client, topic, n, { inFlight = 400, type = "t", onAck } = {}) {
  const acks = new Array(n);
  const window = [];
  for (let i = 0; i < n; i++) {
    window.push(
      client.publish(topic, type, { i }).then((a) => {
        acks[i] = a;
        onAck?.(i, a);
      }),
    );
    if (window.length >= inFlight) await window.shift();
  }
  await Promise.all(window);
  return acks;
}

/** Asserts the acks are offsets 1..n in call order, all of one epoch; returns how many were duplicates. */
function assertAcksInOrder(acks, n) {
  assert.equal(acks.length, n);
  const epoch = acks[0].epoch;
  for (let i = 0; i < n; i++) {
    assert.ok(acks[i], `publish ${i} acked`);
    assert.equal(acks[i].offset, i + 1, `ack of publish ${i}`);
    assert.equal(acks[i].epoch, epoch, `epoch of publish ${i}`);
  }
  return acks.filter((a) => a.duplicate).length;
}

/** Reads the whole topic with the client's history and asserts it holds { i } for i in 0..n-1, each once, at offset i + 1. */
async function assertTopicHoldsEachOnce(client, topic, n) {
  const payloads = [];
  const offsets = [];
  let afterOffset = 0;
  for (;;) {
    const page = await client.history(topic, { after: afterOffset });
    if (page.events.length === 0) break;
    for (const e of page.events) {
      offsets.push(e.offset);
      payloads.push(e.json().i);
    }
    afterOffset = page.nextAfter;
  }
  assert.equal(contiguous(offsets, 1, n), null, "history offsets");
  assert.equal(payloads.length, n, "history length");
  for (let i = 0; i < n; i++) assert.equal(payloads[i], i, `payload at offset ${i + 1}`);
}

// ------------------------------------------------------------------ 2

test("connection cuts under load: every publish acked once, the subscriber sees 1..N exactly once, in order", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const pub = await connect(t, proxy);
  const subClient = await connect(t, proxy);
  const topic = uniqueTopic("load");
  const N = 5000;

  const cuts = [];
  const cut = (why) => {
    cuts.push(why);
    proxy.cutAll();
  };
  const sub = new Collector(await subClient.subscribe(topic), { label: "subscriber" });
  const subCuts = new Set([600, 1700, 2900, 4100]);
  sub.onItem((item, c) => {
    if (item.kind === "event" && subCuts.has(c.events.length)) cut(`subscriber at ${c.events.length}`);
  });
  const pubCuts = new Set([1200, 3500]);
  const acks = await publishStream(pub, topic, N, {
    onAck: (i) => {
      if (pubCuts.has(i)) cut(`publisher at ack ${i}`);
    },
  });
  const duplicates = assertAcksInOrder(acks, N);

  await sub.untilEvents(N, { timeoutMs: LOAD_WAIT });
  assert.equal(contiguous(sub.offsets(), 1, N), null, "subscriber offsets");
  assert.equal(sub.items.length, N, "nothing but events (no gap)");
  sub.events.forEach((e, k) => assert.equal(e.json().i, k));
  await assertTopicHoldsEachOnce(pub, topic, N);

  // The cuts happened (and were reconnected through), mid-stream.
  const subscriberCuts = cuts.filter((c) => c.startsWith("subscriber")).length;
  assert.ok(subscriberCuts >= 3, `cuts: ${cuts.join(", ")}`);
  assert.ok(proxy.relayed >= 2 + cuts.length, `relayed ${proxy.relayed} connections for ${cuts.length} cuts`);
  t.diagnostic(`cuts: ${cuts.join(", ")}; duplicate acks (stored before a cut, resent): ${duplicates}`);

  // Both clients are still live.
  await pub.publish(topic, "t", { i: N });
  await sub.untilEvents(N + 1);
  assert.equal(sub.events[N].offset, N + 1);
});

test("broker kill -9 and restart (fsync): publishes acked once each, the subscriber resumes exactly", { timeout: TEST_TIMEOUT }, async (t) => {
  const b = await startBroker({ durability: "fsync" });
  t.after(() => b.cleanup());
  const pub = await connect(t, b);
  const subClient = await connect(t, b);
  const topic = uniqueTopic("crash");
  const N = 2000;

  const sub = new Collector(await subClient.subscribe(topic), { label: "subscriber" });
  let crash = null;
  let ackedAtCrash = -1;
  let acked = 0;
  sub.onItem((item, c) => {
    if (item.kind === "event" && c.events.length === 700 && !crash) {
      ackedAtCrash = acked;
      crash = (async () => {
        await b.kill();
        assert.equal(b.running, false);
        await b.restart();
      })();
    }
  });
  const acks = await publishStream(pub, topic, N, { inFlight: 200, onAck: () => (acked += 1) });
  assert.ok(crash, "the broker was killed mid-stream");
  assert.ok(ackedAtCrash < N, `publishes were still unacked at the kill (${ackedAtCrash} acked)`);
  await crash;
  assert.equal(b.starts, 2);
  const duplicates = assertAcksInOrder(acks, N);

  await sub.untilEvents(N, { timeoutMs: LOAD_WAIT });
  assert.equal(contiguous(sub.offsets(), 1, N), null, "subscriber offsets");
  assert.equal(sub.items.length, N, "nothing but events (no gap: fsync keeps the epoch)");
  assert.ok(sub.events.every((e) => e.epoch === acks[0].epoch));
  await assertTopicHoldsEachOnce(pub, topic, N);
  t.diagnostic(`acked when killed: ${ackedAtCrash}; duplicate acks after the crash: ${duplicates}`);
});

test("broker graceful stop (Shutdown) and restart: publishes acked once each, the subscriber resumes exactly", { timeout: TEST_TIMEOUT }, async (t) => {
  const b = await startBroker({ durability: "interval" });
  t.after(() => b.cleanup());
  const pub = await connect(t, b);
  const subClient = await connect(t, b);
  const topic = uniqueTopic("stop");
  const N = 1500;
  const sub = new Collector(await subClient.subscribe(topic), { label: "subscriber" });
  let restart = null;
  sub.onItem((item, c) => {
    if (item.kind === "event" && c.events.length === 500 && !restart) {
      restart = (async () => {
        await b.stop();
        await b.restart();
      })();
    }
  });
  const acks = await publishStream(pub, topic, N, { inFlight: 200 });
  assert.ok(restart, "the broker was stopped mid-stream");
  await restart;
  assert.equal(b.starts, 2);
  assertAcksInOrder(acks, N);
  await sub.untilEvents(N, { timeoutMs: LOAD_WAIT });
  assert.equal(contiguous(sub.offsets(), 1, N), null, "subscriber offsets");
  assert.equal(sub.items.length, N, "nothing but events: a clean stop keeps the epoch");
  await assertTopicHoldsEachOnce(pub, topic, N);
});

test("an operator's closeConnection: the client reconnects and its subscription resumes exactly", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker, { clientName: "victim" });
  const admin = await connect(t, broker);
  const topic = uniqueTopic("closed");
  const sub = new Collector(await client.subscribe(topic), { label: "subscriber" });
  await publishStream(admin, topic, 100);
  await sub.untilEvents(100);

  const conns = await admin.connections();
  const victim = conns.find((c) => c.subscriptions.some((s) => s.topic === topic));
  assert.ok(victim, "the subscriber's connection is listed");
  assert.equal(victim.kind, "tcp");
  await admin.closeConnection(victim.id);
  await eventually(async () => (await admin.connections()).some((c) => c.id !== victim.id && c.subscriptions.some((s) => s.topic === topic)), {
    what: "the subscriber to be back on a new connection",
  });
  await publishStream(admin, topic, 100);
  await sub.untilEvents(200);
  assert.equal(contiguous(sub.offsets(), 1, 200), null);
  assert.equal(client.connected, true);
});

test("retention while away: the resume yields one Retention gap from the last position, then live", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const client = await connect(t, proxy);
  const writer = await connect(t, broker);
  const topic = uniqueTopic("tiny"); // max_events = 10
  const sub = new Collector(await client.subscribe(topic), { label: "subscriber" });
  const first = await publishStream(writer, topic, 3);
  await sub.untilEvents(3);

  proxy.pause();
  proxy.cutAll();
  await eventually(() => !client.connected, { what: "the subscriber to notice the cut" });
  await publishStream(writer, topic, 30); // 4..33: only 24..33 retained
  proxy.resume();
  await sub.until((c) => c.items.length >= 4, { what: "the gap" });
  assert.deepEqual(sub.items[3], {
    kind: "gap",
    topic,
    eventType: null,
    reason: "Retention",
    epoch: first[0].epoch,
    requested: 3,
    firstAvailable: 24,
    current: 33,
  });
  await writer.publish(topic, "t", "after");
  await sub.untilEvents(4);
  assert.deepEqual(sub.offsets(), [1, 2, 3, 34]);
  assert.equal(sub.items.length, 5);
});

test("deleted and re-created while away: the resume yields an EpochChanged gap, then the new epoch live", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const client = await connect(t, proxy);
  const writer = await connect(t, broker);
  const topic = uniqueTopic("reborn");
  const sub = new Collector(await client.subscribe(topic), { label: "subscriber" });
  const old = await publishStream(writer, topic, 5);
  await sub.untilEvents(5);

  proxy.pause();
  proxy.cutAll();
  await eventually(() => !client.connected, { what: "the subscriber to notice the cut" });
  await eventually(async () => (await writer.topicInfo(topic)).subscribers === 0, { what: "the broker to drop the subscription" });
  await writer.delete(topic);
  const fresh = await publishStream(writer, topic, 2);
  assert.notEqual(fresh[0].epoch, old[0].epoch);
  proxy.resume();

  await sub.until((c) => c.items.length >= 6, { what: "the gap" });
  assert.deepEqual(sub.items[5], {
    kind: "gap",
    topic,
    eventType: null,
    reason: "EpochChanged",
    epoch: fresh[0].epoch,
    requested: 5,
    firstAvailable: 1,
    current: 2,
  });
  await eventually(async () => (await writer.topicInfo(topic)).subscribers === 1, { what: "the subscriber to be back" });
  await writer.publish(topic, "t", { i: 2 });
  await sub.untilEvents(6);
  const last = sub.events[5];
  assert.equal(last.offset, 3);
  assert.equal(last.epoch, fresh[0].epoch);
  assert.equal(sub.items.length, 7);
});

test("a versions replay cut midway resumes without a repeat and without the unnamed types' old events", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  // A small read-ahead: the client stops reading the socket while the replay is still coming.
  const client = await connect(t, proxy, { maxBufferedEvents: 8 });
  const writer = await connect(t, broker);
  const topic = uniqueTopic("vreplay");
  const pad = "x".repeat(400);
  // a1 b1 a2 b2 …: a at odd offsets, b at even ones.
  const M = 400;
  const batch = [];
  for (let k = 0; k < M; k++) batch.push({ type: k % 2 === 0 ? "a" : "b", payload: { k, pad } });
  const acks = await writer.publishBatch(topic, batch);
  const epoch = acks[0].epoch;

  const sub = await client.subscribe(topic, { start: { afterVersions: { a: 10 }, epoch } });
  const it = sub[Symbol.asyncIterator]();
  const items = [];
  for (let k = 0; k < 3; k++) items.push((await it.next()).value);
  // White-box: the client had not received the whole replay when the cut came.
  const received = sub["resume"].at.offset;
  assert.ok(received < M - 1, `cut after the client received up to offset ${received}`);
  proxy.cutAll(); // mid-replay
  // Live events after the replay: both types.
  const c = new Collector({ [Symbol.asyncIterator]: () => it }, { label: "versions replay" });
  const want = [];
  for (let v = 11; v <= M / 2; v++) want.push(["a", v, 2 * v - 1]);
  await c.untilEvents(want.length - 3);
  await writer.publish(topic, "b", { k: M });
  await writer.publish(topic, "a", { k: M + 1 });
  want.push(["b", M / 2 + 1, M + 1], ["a", M / 2 + 1, M + 2]);
  await c.untilEvents(want.length - 3);
  const got = [...items, ...c.items].map((e) => [e.type, e.version, e.offset]);
  assert.deepEqual(got, want);
  assert.ok(proxy.relayed >= 2, "the connection was cut and made again");
});

test("a subscription closed while its resubscribe is in flight stays closed across later reconnects", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const client = await connect(t, proxy);
  const writer = await connect(t, broker);
  const topic = uniqueTopic("closed-early");
  await writer.publish(topic, "t", 0);
  const turn = () => new Promise((r) => setImmediate(r));
  const reconnected = async () => {
    while (client.connected) await turn();
    while (!client.connected) await turn();
  };
  // Close it right after a reconnect wrote its Subscribe, before the broker's reply
  // (checked white-box; a few tries to land in that window).
  let hit = false;
  for (let attempt = 0; attempt < 10 && !hit; attempt++) {
    const sub = await client.subscribe(topic);
    proxy.cutAll();
    await reconnected();
    hit = client["establishing"].size > 0;
    await sub.close();
  }
  assert.ok(hit, "closed while a resubscribe was in flight");
  await eventually(async () => (await writer.topicInfo(topic)).subscribers === 0, { what: "no subscriber" });
  // Another reconnect: nothing is subscribed again (the ping is answered after anything
  // the client wrote before it on the new connection).
  proxy.cutAll();
  await reconnected();
  await client.ping();
  assert.equal((await writer.topicInfo(topic)).subscribers, 0);
});

// ------------------------------------------------------------------ 5

test("pattern subscription: later topics join (joined first), a cut resumes every topic exactly", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const client = await connect(t, proxy);
  const writer = await connect(t, broker);
  const base = uniqueTopic("orders");
  const ps = new Collector(await client.subscribePattern(`${base}.*`), { label: "pattern" });

  // A topic created after the subscription: joined, then its events.
  await publishStream(writer, `${base}.eu`, 3);
  await ps.untilEvents(3);
  assert.deepEqual(ps.items[0], { kind: "joined", position: { topic: `${base}.eu`, epoch: ps.events[0].epoch, offset: 0, ended: false } });
  assert.deepEqual(ps.items.slice(1).map((e) => [e.kind, e.topic, e.offset]), [
    ["event", `${base}.eu`, 1],
    ["event", `${base}.eu`, 2],
    ["event", `${base}.eu`, 3],
  ]);
  // Not matching: never delivered.
  await writer.publish(base, "t", "no");
  await writer.publish(`${base}x.eu`, "t", "no");

  // Away: more on eu, a new topic us.
  proxy.pause();
  proxy.cutAll();
  await eventually(() => !client.connected, { what: "the client to notice the cut" });
  await publishStream(writer, `${base}.eu`, 4); // 4..7
  await publishStream(writer, `${base}.us`, 2); // 1..2
  proxy.resume();

  // Then under load, with cuts: 3 topics, 600 events each, interleaved.
  const topics = [`${base}.eu`, `${base}.us`, `${base}.ap`];
  const cutsAt = new Set([400, 1000, 1500]);
  const cuts = [];
  ps.onItem((item, c) => {
    if (item.kind === "event" && cutsAt.has(c.events.length)) {
      cuts.push(c.events.length);
      proxy.cutAll();
    }
  });
  const per = 600;
  const writes = [];
  for (let k = 0; k < per; k++) {
    for (const topic of topics) writes.push(writer.publish(topic, "t", { k }));
    if (k % 50 === 49) await Promise.all(writes.splice(0));
  }
  await Promise.all(writes);
  const expected = { [`${base}.eu`]: 7 + per, [`${base}.us`]: 2 + per, [`${base}.ap`]: per };
  const total = Object.values(expected).reduce((a, b) => a + b, 0);
  await ps.untilEvents(total, { timeoutMs: LOAD_WAIT });

  for (const topic of topics) {
    const offs = ps.events.filter((e) => e.topic === topic).map((e) => e.offset);
    assert.equal(contiguous(offs, 1, expected[topic]), null, `offsets of ${topic}`);
  }
  assert.equal(ps.events.length, total, "no event twice, none of another topic");
  assert.equal(ps.kinds("gap").length, 0);
  assert.equal(ps.kinds("end").length, 0);
  // Every topic was announced (joined) before its first event, at most once per epoch.
  for (const topic of topics) {
    const firstEvent = ps.items.findIndex((i) => i.kind === "event" && i.topic === topic);
    const joins = ps.items.map((i, k) => [i, k]).filter(([i]) => i.kind === "joined" && i.position.topic === topic);
    assert.ok(joins.length <= 1, `${topic} joined ${joins.length} times`);
    if (joins.length) assert.ok(joins[0][1] < firstEvent, `${topic} joined before its first event`);
  }
  assert.equal(cuts.length, 3, `cuts at ${cuts}`);
  t.diagnostic(`joined: ${ps.kinds("joined").map((j) => j.position.topic.split(".").pop()).join(", ")}`);
});

test("pattern subscription: positions() after a partial read resume exactly in a new subscription", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const base = uniqueTopic("pos");
  await publishStream(client, `${base}.a`, 300);
  await publishStream(client, `${base}.b`, 300);

  const first = await client.subscribePattern(`${base}.*`, { start: "earliest" });
  const seen = new Map();
  let n = 0;
  for await (const item of first) {
    if (item.kind !== "event") continue;
    seen.set(item.topic, [...(seen.get(item.topic) ?? []), item.offset]);
    if (++n === 150) break;
  }
  const positions = first.positions();
  for (const [topic, offs] of seen) {
    const p = positions.find((x) => x.topic === topic);
    assert.ok(p, `${topic} has a position`);
    assert.equal(p.offset, offs.at(-1), `position of ${topic} is the last event handed over`);
  }

  await publishStream(client, `${base}.c`, 5);
  const second = new Collector(await client.subscribePattern(`${base}.*`, { positions }), { label: "resumed pattern" });
  await second.untilEvents(600 + 5 - 150);
  for (const [topic, count] of [[`${base}.a`, 300], [`${base}.b`, 300], [`${base}.c`, 5]]) {
    const before = seen.get(topic) ?? [];
    const after = second.events.filter((e) => e.topic === topic).map((e) => e.offset);
    assert.equal(contiguous([...before, ...after], 1, count), null, `${topic}: ${before.length} before, ${after.length} after`);
  }
});

// ------------------------------------------------------------------ 8

test("dead peer: with a short heartbeat, a black-holed connection is given up by the client, which reconnects and resumes", { timeout: TEST_TIMEOUT }, async (t) => {
  const b = await startBroker({ config: { server: { heartbeat: "200ms" } } });
  t.after(() => b.cleanup());
  const relay = await startRelay(b.tcpHost, b.tcpPort);
  t.after(() => relay.close());
  const client = await connect(t, relay);
  assert.equal(client.serverInfo.heartbeatMs, 200);
  const writer = await connect(t, b);
  const topic = uniqueTopic("deadpeer");
  const sub = new Collector(await client.subscribe(topic), { label: "subscriber" });
  await writer.publish(topic, "t", { i: 0 });
  await sub.untilEvents(1);

  // Silence both ways, without a close: only the client's own heartbeat check can notice.
  assert.equal(relay.blackhole(), 1);
  const during = client.publish(topic, "t", { i: "from the cut-off client" });
  await publishStream(writer, topic, 3); // 2..4 (or 3..5)
  await relay.until((r) => r.closedByClient >= 1, { what: "the client to give up the silent connection" });
  await relay.until((r) => r.accepted >= 2, { what: "the client to reconnect" });
  const ack = await during;
  await sub.untilEvents(5);
  assert.equal(contiguous(sub.offsets(), 1, 5), null);
  assert.equal(sub.items.length, 5);
  assert.equal(sub.events.filter((e) => e.json().i === "from the cut-off client").length, 1);
  assert.equal(sub.events[ack.offset - 1].json().i, "from the cut-off client");

  // And it stays up on the new connection while idle: wait until the broker
  // has sent at least 160 bytes of heartbeats and pongs on it (8 and 16
  // bytes; at most one of each per heartbeat interval, so more than 6
  // intervals: twice the 3 × heartbeat a false dead-peer verdict would take),
  // and the relay saw no new connection.
  const idleSince = relay.accepted;
  const socket = client["socket"];
  const readSince = socket.bytesRead;
  await eventually(() => socket.bytesRead - readSince >= 160, { what: "heartbeats on the idle connection" });
  assert.equal(client["socket"], socket, "still the same connection");
  assert.ok((await client.ping()) >= 0);
  await writer.publish(topic, "t", { i: 5 });
  await sub.untilEvents(6);
  assert.equal(relay.accepted, idleSince);
});

// ------------------------------------------------------------------ 9

test("a slow reader pauses only its own subscription: the others and the replies go on, and it resumes exactly", { timeout: TEST_TIMEOUT }, async (t) => {
  const b = await startBroker({ durability: "memory" });
  t.after(() => b.cleanup());
  const client = await connect(t, b, { maxBufferedEvents: 100 });
  const writer = await connect(t, b);
  const [slowTopic, fastTopic] = [uniqueTopic("slow"), uniqueTopic("fast")];
  const N = 1_000;

  const slow = await client.subscribe(slowTopic, { start: "earliest" }); // not read until the end
  const firstId = slow.id;
  const fast = new Collector(await client.subscribe(fastTopic), { label: "fast" });
  await Promise.all([publishStream(writer, slowTopic, N), publishStream(writer, fastTopic, N)]);

  // Everything of the fast topic arrives although the slow one holds far more
  // than its buffer of 100: the client did not stop reading the connection.
  await fast.untilEvents(N);
  assert.equal(contiguous(fast.offsets(), 1, N), null);
  assert.ok(slow.buffered >= 100 && slow.buffered < N, `the slow buffer stopped growing at ${slow.buffered}`);
  assert.ok((await client.ping()) >= 0, "replies are not held up");
  // The broker no longer sends the slow topic: the connection holds one subscription.
  await eventually(
    async () => {
      const conns = await writer.connections();
      return conns.some((c) => c.subscriptions.length === 1 && c.subscriptions[0].topic === fastTopic);
    },
    { what: "the slow subscription unsubscribed at the broker" },
  );

  // Read it all: every offset once, in order, no gap (the broker still has them).
  const offsets = [];
  for await (const item of slow) {
    assert.equal(item.kind, "event", `no ${item.kind} for a paused subscription whose events are retained`);
    offsets.push(item.offset);
    if (offsets.length === N) break;
  }
  assert.equal(contiguous(offsets, 1, N), null);
  assert.notEqual(slow.id, firstId, "it came back under a fresh wire id");
});
