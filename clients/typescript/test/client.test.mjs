// The Node TCP client (dist/index.js, built from src/client.ts) against the
// real ringcastd: publishing, subscribing, resuming, gaps and ends, errors,
// idempotency and expectations, abort signals.
//
//   npx tsc -p tsconfig.json && node --test --test-concurrency=1 test/client.test.mjs
//
// One broker for the file (each test on topics of its own); the tests that
// need a relay start one in front of it. Everything is awaited on what the
// client yields or answers, with deadlines, never on a timer.

import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import { after, before, test } from "node:test";

import { Client, PositionMismatchError, RingcastError } from "../dist/index.js";
import { startBroker } from "./helpers/broker.mjs";
import { startProxy } from "./helpers/proxy.mjs";
import { Collector, connect, contiguous, eventually, uniqueTopic, withTimeout } from "./helpers/tcp.mjs";

const TEST_TIMEOUT = 90_000;
const MAX_PAYLOAD = 64 * 1024;

let broker;

before(async () => {
  broker = await startBroker({
    config: {
      topics: { override: [{ pattern: "tiny.*", max_events: 10 }] },
      limits: { max_payload: `${MAX_PAYLOAD}B` },
    },
  });
});

after(async () => {
  await broker?.cleanup();
});

/** Publishes `n` events `{ i }` (type `type`, i from `from`) pipelined, in call order; resolves the acks. */
function publishMany(client, topic, n, { from = 0, type = "t" } = {}) {
  return Promise.all(Array.from({ length: n }, (_, k) => client.publish(topic, type, { i: from + k })));
}

// ------------------------------------------------------------------ 1

test("pipelined publishes ack in call order at contiguous offsets; subscribers get every event in order", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const reader = await connect(t, broker);
  const topic = uniqueTopic("pipe");
  const N = 1000;

  const live = new Collector(await reader.subscribe(topic), { label: "live subscriber" });
  const acks = await publishMany(client, topic, N);

  assert.equal(acks.length, N);
  const epoch = acks[0].epoch;
  assert.equal(typeof epoch, "bigint");
  for (let k = 0; k < N; k++) {
    assert.deepEqual(acks[k], { epoch, offset: k + 1, version: k + 1, duplicate: false }, `ack ${k}`);
  }

  await live.untilEvents(N);
  assert.equal(contiguous(live.offsets(), 1, N), null);
  live.events.forEach((e, k) => {
    assert.equal(e.topic, topic);
    assert.equal(e.type, "t");
    assert.equal(e.epoch, epoch);
    assert.deepEqual(e.json(), { i: k });
  });

  // A subscriber from the earliest event, after the fact, gets the same.
  const replay = new Collector(await reader.subscribe(topic, { start: "earliest" }), { label: "earliest subscriber" });
  await replay.untilEvents(N);
  assert.equal(contiguous(replay.offsets(), 1, N), null);
  assert.deepEqual(replay.events.map((e) => e.json().i), live.events.map((e) => e.json().i));

  // History pages hold the same N events.
  const seen = [];
  let afterOffset = 0;
  for (;;) {
    const page = await client.history(topic, { after: afterOffset, limit: 300 });
    if (page.events.length === 0) break;
    seen.push(...page.events.map((e) => e.offset));
    afterOffset = page.nextAfter;
  }
  assert.equal(contiguous(seen, 1, N), null);

  // Nothing more arrived than was published: one more event comes next.
  await client.publish(topic, "t", { i: N });
  await live.untilEvents(N + 1);
  assert.equal(live.events[N].offset, N + 1);
  assert.equal(live.items.length, N + 1, "no gap or other item on a live subscription");
});

test("a batch is stored atomically at contiguous offsets, one ack per event", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("batch");
  await client.publish(topic, "a", "first");
  const acks = await client.publishBatch(topic, [
    { type: "a", payload: "x", headers: { trace: "t1" } },
    { type: "b", payload: new Uint8Array([1, 2, 3]) },
    { type: "a", payload: { y: 1 }, headers: [["h", "1"], ["h", "2"]] },
  ]);
  assert.deepEqual(acks.map((a) => [a.offset, a.version]), [[2, 2], [3, 1], [4, 3]]);
  const page = await client.history(topic);
  assert.deepEqual(page.events.map((e) => e.type), ["a", "a", "b", "a"]);
  assert.equal(page.events[1].text(), "x");
  assert.equal(page.events[1].header("trace"), "t1");
  assert.deepEqual([...page.events[2].payload], [1, 2, 3]);
  assert.deepEqual(page.events[3].headers, [["h", "1"], ["h", "2"]]);
  assert.deepEqual(page.events[3].json(), { y: 1 });
  // An invalid event refuses the whole batch: nothing is stored.
  await assert.rejects(
    client.publishBatch(topic, [{ type: "a", payload: 1 }, { type: "bad type", payload: 2 }]),
    (e) => e instanceof RingcastError && e.code === "InvalidType",
  );
  assert.equal((await client.topicInfo(topic)).lastOffset, 4);
});

test("a subscription closed midway resumes with {afterOffset, epoch} (its position) to exactly the rest", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("resume");
  const N = 1000;
  const K = 400;
  const acks = await publishMany(client, topic, N);
  const epoch = acks[0].epoch;

  const sub = await client.subscribe(topic, { start: "earliest" });
  const first = [];
  for await (const item of sub) {
    assert.equal(item.kind, "event");
    first.push(item.offset);
    if (first.length === K) break; // closes (unsubscribes) the subscription
  }
  assert.equal(contiguous(first, 1, K), null);
  // The subscription's position is what it handed to this loop, not what it had buffered beyond it.
  assert.deepEqual(sub.position, { epoch, offset: K }, "position after consuming K events and closing");

  const rest = new Collector(await client.subscribe(topic, { start: { afterOffset: K, epoch } }), { label: "resumed" });
  await rest.untilEvents(N - K);
  assert.equal(contiguous(rest.offsets(), K + 1, N), null);
  assert.deepEqual(rest.events.map((e) => e.json().i), Array.from({ length: N - K }, (_, k) => K + k));
  // Then live.
  await client.publish(topic, "t", { i: N });
  await rest.untilEvents(N - K + 1);
  assert.equal(rest.events.at(-1).offset, N + 1);
  assert.equal(rest.items.length, N - K + 1, "nothing but the events");

  // Resuming at the end: nothing, then live.
  const atEnd = new Collector(await client.subscribe(topic, { start: { afterOffset: N + 1, epoch } }), { label: "at end" });
  await client.publish(topic, "t", { i: N + 1 });
  await atEnd.untilEvents(1);
  assert.deepEqual(atEnd.offsets(), [N + 2]);

  // An offset ahead of the topic in its epoch is refused, and the connection lives on.
  await assert.rejects(
    client.subscribe(topic, { start: { afterOffset: N + 50, epoch } }),
    (e) => e instanceof RingcastError && e.code === "InvalidStart",
  );
  assert.ok((await client.ping()) >= 0);
});

test("retention: resuming into a trimmed range yields one Retention gap, then live", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("tiny"); // max_events = 10
  const acks = await publishMany(client, topic, 5);
  const epoch = acks[0].epoch;

  // Seen 1..3, then away while 30 more come: only 26..35 are retained.
  await publishMany(client, topic, 30, { from: 5 });
  const info = await client.topicInfo(topic);
  assert.equal(info.firstOffset, 26);
  assert.equal(info.lastOffset, 35);
  assert.equal(info.maxEvents, 10);

  const c = new Collector(await client.subscribe(topic, { start: { afterOffset: 3, epoch } }), { label: "resumed into trim" });
  await c.until((x) => x.items.length >= 1, { what: "the gap" });
  assert.deepEqual(c.items[0], {
    kind: "gap",
    topic,
    eventType: null,
    reason: "Retention",
    epoch,
    requested: 3,
    firstAvailable: 26,
    current: 35,
  });
  // Live after the gap: the retained 26..35 are not replayed (History has them).
  await client.publish(topic, "t", { i: 35 });
  await c.untilEvents(1);
  assert.deepEqual(c.offsets(), [36]);
  assert.equal(c.items.length, 2, "one gap, then the live event");
  // History from the gap's position: what is retained now (36 pushed 26 out).
  const page = await client.history(topic, { after: 3 });
  assert.equal(page.firstAvailable, 27);
  assert.deepEqual(page.events.map((e) => e.offset), [27, 28, 29, 30, 31, 32, 33, 34, 35, 36]);

  // The same from an earlier position inside the epoch: still one gap.
  const d = new Collector(await client.subscribe(topic, { start: { afterOffset: 0, epoch } }), { label: "from 0" });
  await d.until((x) => x.items.length >= 1, { what: "the gap" });
  assert.equal(d.items[0].kind, "gap");
  assert.equal(d.items[0].reason, "Retention");
  assert.equal(d.items[0].current, 36);
});

test("a sealed topic: subscribers get its last events, then end, and the iteration is over", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("sealed");
  await publishMany(client, topic, 3);
  const live = new Collector(await client.subscribe(topic, { start: "earliest" }), { label: "live" });
  await live.untilEvents(3);
  await publishMany(client, topic, 2, { from: 3 });
  await client.seal(topic);
  await live.untilDone();
  assert.equal(live.error, null);
  assert.deepEqual(live.offsets(), [1, 2, 3, 4, 5]);
  assert.deepEqual(live.items.at(-1), { kind: "end", topic, lastOffset: 5 });

  await assert.rejects(client.publish(topic, "t", 1), (e) => e instanceof RingcastError && e.code === "TopicSealed");
  await client.seal(topic); // sealing again is Ok

  // Subscribing afterwards: what the start asks for, then end.
  const replay = new Collector(await client.subscribe(topic, { start: "earliest" }), { label: "earliest on sealed" });
  await replay.untilDone();
  assert.deepEqual(replay.offsets(), [1, 2, 3, 4, 5]);
  assert.equal(replay.items.at(-1).kind, "end");
  const liveOnSealed = new Collector(await client.subscribe(topic), { label: "live on sealed" });
  await liveOnSealed.untilDone();
  assert.deepEqual(liveOnSealed.items, [{ kind: "end", topic, lastOffset: 5 }]);
  assert.equal((await client.topicInfo(topic)).sealed, true);
});

test("a deleted topic ends its subscribers; re-created, a resume naming the old epoch gets an EpochChanged gap", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("epoch");
  const acks = await publishMany(client, topic, 4);
  const oldEpoch = acks[0].epoch;

  const live = new Collector(await client.subscribe(topic, { start: "earliest" }), { label: "live" });
  await live.untilEvents(4);
  await client.delete(topic);
  await live.untilDone();
  assert.equal(live.items.at(-1).kind, "end");
  await assert.rejects(client.topicInfo(topic), (e) => e.code === "TopicNotFound");

  const fresh = await publishMany(client, topic, 3, { from: 100 });
  const newEpoch = fresh[0].epoch;
  assert.notEqual(newEpoch, oldEpoch);
  assert.deepEqual(fresh.map((a) => a.offset), [1, 2, 3]);

  const resumed = new Collector(await client.subscribe(topic, { start: { afterOffset: 4, epoch: oldEpoch } }), { label: "resumed" });
  await resumed.until((c) => c.items.length >= 1, { what: "the gap" });
  assert.deepEqual(resumed.items[0], {
    kind: "gap",
    topic,
    eventType: null,
    reason: "EpochChanged",
    epoch: newEpoch,
    requested: 4,
    firstAvailable: 1,
    current: 3,
  });
  await client.publish(topic, "t", { i: 103 });
  await resumed.untilEvents(1);
  assert.equal(resumed.events[0].offset, 4);
  assert.equal(resumed.events[0].epoch, newEpoch);
  assert.deepEqual(resumed.events[0].json(), { i: 103 });
  assert.equal(resumed.items.length, 2);
});

test("types filter: only the named types, in offset order, live and replayed", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("types");
  const live = new Collector(await client.subscribe(topic, { types: ["a", "c"] }), { label: "live a,c" });
  const order = ["a", "b", "c", "b", "a", "a", "b", "c"];
  for (const type of order) await client.publish(topic, type, type);
  const want = order.map((ty, k) => [ty, k + 1]).filter(([ty]) => ty !== "b");
  await live.untilEvents(want.length);
  assert.deepEqual(live.events.map((e) => [e.type, e.offset]), want);

  const replay = new Collector(await client.subscribe(topic, { start: "earliest", types: ["b"] }), { label: "earliest b" });
  await replay.untilEvents(3);
  assert.deepEqual(replay.events.map((e) => [e.offset, e.version]), [[2, 1], [4, 2], [7, 3]]);

  const page = await client.history(topic, { types: ["c"] });
  assert.deepEqual(page.events.map((e) => e.offset), [3, 8]);

  await client.publish(topic, "b", "b");
  await client.publish(topic, "a", "a");
  await live.untilEvents(want.length + 1);
  await replay.untilEvents(4);
  assert.equal(live.events.at(-1).offset, 10);
  assert.equal(replay.events.at(-1).offset, 9);

  await assert.rejects(client.subscribe(topic, { types: ["bad type"] }), (e) => e.code === "InvalidType");
});

test("afterVersions: named types replay after their versions, the others start live", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("versions");
  // a1 b1 a2 b2 a3 b3 c1 → offsets 1..7
  const acks = [];
  for (const type of ["a", "b", "a", "b", "a", "b", "c"]) acks.push(await client.publish(topic, type, type));
  const epoch = acks[0].epoch;

  const c = new Collector(
    await client.subscribe(topic, { start: { afterVersions: { a: 1, c: 0 }, epoch } }),
    { label: "afterVersions a:1 c:0" },
  );
  await c.untilEvents(3);
  assert.deepEqual(c.events.map((e) => [e.type, e.version, e.offset]), [["a", 2, 3], ["a", 3, 5], ["c", 1, 7]]);

  // Live: every type, b included.
  await client.publish(topic, "b", "b");
  await client.publish(topic, "a", "a");
  await c.untilEvents(5);
  assert.deepEqual(c.events.slice(3).map((e) => [e.type, e.version]), [["b", 4], ["a", 4]]);
  assert.equal(c.items.length, 5);

  // The pair form, and a version beyond the type's current one is refused.
  const d = new Collector(await client.subscribe(topic, { start: { afterVersions: [["b", 3]], epoch } }), { label: "b:3" });
  await d.untilEvents(1);
  assert.deepEqual([d.events[0].type, d.events[0].version], ["b", 4]);
  await assert.rejects(
    client.subscribe(topic, { start: { afterVersions: { a: 99 }, epoch } }),
    (e) => e.code === "InvalidStart",
  );
});

// ------------------------------------------------------------------ 3

test("errors answer one request and the connection lives on", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const client = await connect(t, proxy);
  const topic = uniqueTopic("errors");
  let k = 0;
  const stillUsable = async (what) => {
    const ack = await client.publish(topic, "ok", { after: what });
    assert.equal(ack.offset, ++k, `publish after ${what}`);
    assert.ok((await client.ping()) >= 0, `ping after ${what}`);
    assert.equal(client.connected, true, `connected after ${what}`);
  };
  const expectCode = async (promise, code, what) => {
    await assert.rejects(promise, (e) => {
      assert.ok(e instanceof RingcastError, `${what}: a RingcastError, got ${e}`);
      assert.equal(e.code, code, `${what}: ${e.message}`);
      return true;
    });
    await stillUsable(what);
  };

  await stillUsable("start");
  await expectCode(client.publish("bad topic!", "t", 1), "InvalidTopic", "invalid topic name");
  await expectCode(client.publish("x".repeat(256), "t", 1), "InvalidTopic", "topic name over 255 bytes");
  await expectCode(client.publish(topic, "bad type", 1), "InvalidType", "invalid event type");
  await expectCode(client.publish(topic, "t", new Uint8Array(MAX_PAYLOAD + 1)), "PayloadTooLarge", "payload too large");
  await expectCode(client.publish(topic, "t", 1, { headers: { "": "v" } }), "InvalidRequest", "empty header name");
  await expectCode(client.topicInfo(uniqueTopic("missing")), "TopicNotFound", "topicInfo of a missing topic");
  await expectCode(client.history(uniqueTopic("missing")), "TopicNotFound", "history of a missing topic");
  await expectCode(client.seal(uniqueTopic("missing")), "TopicNotFound", "seal of a missing topic");
  await expectCode(
    client.request((requestId) => ({ type: "Unsubscribe", requestId, subscriptionId: 424242 }), "Unsubscribed"),
    "UnknownSubscription",
    "unsubscribe of an unknown id",
  );
  await expectCode(client.consume(topic, "no-such-group"), "GroupNotFound", "join of a missing group");
  await expectCode(client.subscribe(topic, { types: ["no way"] }), "InvalidType", "subscribe with a bad type");
  await expectCode(client.subscribePattern("bad pattern!"), "InvalidTopic", "an invalid pattern");
  await expectCode(client.closeConnection(987654321), "ConnectionNotFound", "closeConnection of an unknown id");
  await expectCode(client.createGroup(topic, "g", { ackWaitMs: 1 }), "InvalidRequest", "group settings out of bounds");
  // Exactly one connection was used throughout.
  assert.equal(proxy.accepted, 1, "the broker never closed the connection");
  assert.equal((await client.topicInfo(topic)).lastOffset, k);
});

// ------------------------------------------------------------------ 9

test("idempotency keys: a repeat is acked as a duplicate at the original offset; stored once", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const other = await connect(t, broker);
  const topic = uniqueTopic("idem");
  const first = await client.append(topic, [{ type: "t", payload: "one", idempotencyKey: "k-1" }]);
  await client.publish(topic, "t", "two");
  const again = await other.append(topic, [{ type: "t", payload: "one (retry)", idempotencyKey: "k-1" }]);
  assert.deepEqual(again, [{ ...first[0], duplicate: true }]);
  assert.equal(first[0].offset, 1);
  assert.equal(first[0].duplicate, false);

  // publish() with its own key too.
  const p1 = await client.publish(topic, "t", "three", { idempotencyKey: "k-3" });
  const p2 = await client.publish(topic, "t", "three", { idempotencyKey: "k-3" });
  assert.equal(p1.duplicate, false);
  assert.deepEqual(p2, { ...p1, duplicate: true });

  // A batch mixing a stored key and new ones: new ones appended, the repeat answered from the window.
  const mixed = await client.append(topic, [
    { type: "t", payload: "dup", idempotencyKey: "k-3" },
    { type: "t", payload: "four", idempotencyKey: "k-4" },
  ]);
  assert.deepEqual(mixed.map((a) => [a.offset, a.duplicate]), [[3, true], [4, false]]);

  const page = await client.history(topic);
  assert.deepEqual(page.events.map((e) => e.text()), ["one", "two", "three", "four"]);

  // A key twice in one request refuses the request.
  await assert.rejects(
    client.append(topic, [
      { type: "t", payload: 1, idempotencyKey: "same" },
      { type: "t", payload: 2, idempotencyKey: "same" },
    ]),
    (e) => e.code === "InvalidRequest",
  );
  assert.equal((await client.topicInfo(topic)).lastOffset, 4);
});

test("expectations: expectedOffset/expectedVersion mismatches reject with PositionMismatchError and store nothing", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("expect");
  const [a1] = await client.append(topic, [{ type: "a", payload: 1 }], { expectedOffset: 0 });
  assert.equal(a1.offset, 1);
  await client.append(topic, [{ type: "b", payload: 2 }], { expectedOffset: 1 });
  await client.append(topic, [{ type: "a", payload: 3 }], { expectedVersion: 1 });

  await assert.rejects(client.append(topic, [{ type: "a", payload: "late" }], { expectedOffset: 1 }), (e) => {
    assert.ok(e instanceof PositionMismatchError, `got ${e}`);
    assert.ok(e instanceof RingcastError);
    assert.equal(e.code, "PositionMismatch");
    assert.equal(e.currentOffset, 3);
    return true;
  });
  await assert.rejects(client.append(topic, [{ type: "a", payload: "late" }], { expectedVersion: 1 }), (e) => {
    assert.ok(e instanceof PositionMismatchError);
    assert.equal(e.currentOffset, 3);
    assert.equal(e.currentVersion, 2);
    return true;
  });
  assert.equal((await client.topicInfo(topic)).lastOffset, 3, "nothing stored by the refused appends");

  // The retry of an append that was stored succeeds although the position moved on.
  const keyed = [{ type: "a", payload: "x", idempotencyKey: "exp-1" }, { type: "a", payload: "y", idempotencyKey: "exp-2" }];
  const stored = await client.append(topic, keyed, { expectedOffset: 3 });
  assert.deepEqual(stored.map((a) => a.offset), [4, 5]);
  await client.publish(topic, "a", "z");
  const retried = await client.append(topic, keyed, { expectedOffset: 3 });
  assert.deepEqual(retried, stored.map((a) => ({ ...a, duplicate: true })));
  assert.equal((await client.topicInfo(topic)).lastOffset, 6);
  assert.ok((await client.ping()) >= 0);
});

// ------------------------------------------------------------------ 7

test("a subscription's AbortSignal ends its iteration and unsubscribes it", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("abort-sub");
  const ac = new AbortController();
  const sub = await client.subscribe(topic, { signal: ac.signal });
  const c = new Collector(sub, { label: "aborted subscription" });
  await client.publish(topic, "t", 1);
  await c.untilEvents(1);
  assert.equal((await client.topicInfo(topic)).subscribers, 1);
  ac.abort(); // while the loop waits in next()
  await c.untilDone();
  assert.equal(c.error, null);
  assert.deepEqual(c.offsets(), [1]);
  await eventually(async () => (await client.topicInfo(topic)).subscribers === 0, { what: "the broker to drop the subscription" });
  // The client goes on.
  await client.publish(topic, "t", 2);
  assert.equal(client.connected, true);

  // A signal already aborted refuses the subscribe.
  await assert.rejects(client.subscribe(topic, { signal: AbortSignal.abort() }), (e) => e.code === "Aborted");

  // A signal aborted while subscribe() is in flight: it rejects, and unsubscribes what the broker set up.
  const ac2 = new AbortController();
  const pending = client.subscribe(topic, { signal: ac2.signal });
  ac2.abort();
  await assert.rejects(pending, (e) => e instanceof RingcastError && e.code === "Aborted");
  await eventually(async () => (await client.topicInfo(topic)).subscribers === 0, { what: "no subscriber left" });
});

test("one long-lived AbortSignal over many subscriptions holds a listener only for the live ones", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("signal");
  const app = new AbortController();
  for (let i = 0; i < 20; i++) await (await client.subscribe(topic, { signal: app.signal })).close();
  const ended = await client.subscribe(topic, { signal: app.signal });
  await client.delete(topic).catch(() => undefined); // ends it from the broker side (End)
  await client.publish(topic, "t", {}); // the topic exists again
  const live = await client.subscribe(topic, { signal: app.signal });
  for await (const item of ended) assert.equal(item.kind, "end");
  assert.equal(getEventListeners(app.signal, "abort").length, 1, "only the live subscription listens");
  app.abort();
  assert.deepEqual(await live.next(), { value: undefined, done: true });
  assert.equal(getEventListeners(app.signal, "abort").length, 0);
});

test("the client's AbortSignal closes it: requests waiting reject with Aborted, subscriptions end", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const ac = new AbortController();
  const client = await connect(t, proxy, { signal: ac.signal });
  const topic = uniqueTopic("abort-client");
  const c = new Collector(await client.subscribe(topic), { label: "subscription" });
  await client.publish(topic, "t", 1);
  await c.untilEvents(1);

  // Cut the connection and keep it down: requests now wait for a reconnect.
  proxy.pause();
  proxy.cutAll();
  await eventually(() => !client.connected, { what: "the client to notice the cut" });
  const publish = client.publish(topic, "t", 2);
  const ping = client.ping();
  const info = client.topicInfo(topic);
  ac.abort();
  for (const [what, p] of [["publish", publish], ["ping", ping], ["topicInfo", info]]) {
    await assert.rejects(p, (e) => {
      assert.ok(e instanceof RingcastError, `${what}: ${e}`);
      assert.ok(["Aborted", "Closed"].includes(e.code), `${what}: ${e.code}`);
      return true;
    });
  }
  await c.untilDone();
  assert.ok(c.error === null || ["Aborted", "Closed"].includes(c.error.code), `subscription ended with ${c.error?.code}`);
  assert.equal(client.connected, false);
  await assert.rejects(client.publish(topic, "t", 3), (e) => ["Aborted", "Closed"].includes(e.code));
  proxy.resume();
  // Nothing was resent after the abort.
  const reader = await connect(t, broker);
  assert.equal((await reader.topicInfo(topic)).lastOffset, 1);

  // Client.connect with an aborted signal rejects.
  await assert.rejects(
    Client.connect({ host: broker.tcpHost, port: broker.tcpPort, signal: AbortSignal.abort() }),
    (e) => e.code === "Aborted",
  );
});

test("close(): requests in flight reject with Closed, subscriptions end cleanly", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const client = await connect(t, proxy);
  const topic = uniqueTopic("close");
  const c = new Collector(await client.subscribe(topic), { label: "subscription" });
  proxy.pause();
  proxy.cutAll();
  await eventually(() => !client.connected, { what: "the client to notice the cut" });
  const publish = client.publish(topic, "t", 1);
  await client.close();
  await assert.rejects(publish, (e) => e.code === "Closed");
  await c.untilDone();
  assert.equal(c.error, null);
  await assert.rejects(client.ping(), (e) => e.code === "Closed");
});

test("connect failures reject Client.connect", { timeout: TEST_TIMEOUT }, async () => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  const port = proxy.port;
  await proxy.close(); // nothing listens there now
  await assert.rejects(
    withTimeout(Client.connect({ host: "127.0.0.1", port, connectTimeoutMs: 5_000 }), 20_000, "connect to a closed port"),
    (e) => e instanceof RingcastError && e.code === "ConnectFailed",
  );
});
