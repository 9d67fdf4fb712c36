// Consumer groups through the Node TCP client against the real ringcastd:
// sharing work between members, ack / nack / inProgress / term, dead
// letters, a member cut off (its work goes to the other after ack_wait),
// acks resent across a reconnect, at-least-once under repeated cuts, and
// the end of a membership when its group is deleted.
//
//   npx tsc -p tsconfig.json && node --test --test-concurrency=1 test/groups.test.mjs

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { RingcastError } from "../dist/index.js";
import { startBroker } from "./helpers/broker.mjs";
import { startProxy } from "./helpers/proxy.mjs";
import { Collector, connect, contiguous, eventually, uniqueTopic } from "./helpers/tcp.mjs";

const TEST_TIMEOUT = 90_000;

let broker;

before(async () => {
  broker = await startBroker();
});

after(async () => {
  await broker?.cleanup();
});

function publishMany(client, topic, n, from = 0) {
  return Promise.all(Array.from({ length: n }, (_, k) => client.publish(topic, "job", { i: from + k })));
}

test("two consumers share a group: each event goes to one of them, once", { timeout: TEST_TIMEOUT }, async (t) => {
  const c1 = await connect(t, broker);
  const c2 = await connect(t, broker);
  const writer = await connect(t, broker);
  const topic = uniqueTopic("share");
  const info = await writer.createGroup(topic, "workers", { ackWaitMs: 30_000 });
  assert.equal(info.group, "workers");
  assert.equal(info.deadLetterTopic, `${topic}.dlq`);

  const a = new Collector(await c1.consume(topic, "workers", { consumer: "a", maxInFlight: 1 }), { label: "consumer a" });
  const b = new Collector(await c2.consume(topic, "workers", { consumer: "b", maxInFlight: 1 }), { label: "consumer b" });

  // a holds its first delivery: with max_in_flight 1 the next one must go to b.
  await publishMany(writer, topic, 2);
  await a.untilEvents(1);
  await b.untilEvents(1);
  assert.notEqual(a.events[0].offset, b.events[0].offset);
  assert.deepEqual([a.events[0].attempt, b.events[0].attempt], [1, 1]);
  const held = await writer.groupInfo(topic, "workers");
  assert.equal(held.inFlight, 2);
  assert.deepEqual(held.members.map((m) => [m.consumer, m.inFlight]).sort(), [["a", 1], ["b", 1]]);

  // From now on both ack everything they get.
  const ackAll = (item) => {
    if (item.kind === "event") item.ack();
  };
  for (const c of [a, b]) {
    c.onItem(ackAll);
    for (const d of c.events) d.ack();
  }
  const N = 300;
  await publishMany(writer, topic, N - 2, 2);
  await eventually(async () => {
    const g = await writer.groupInfo(topic, "workers");
    return g.acked === N && g.pending === 0;
  }, { what: `${N} acks` });

  const all = [...a.events, ...b.events].map((d) => d.offset).sort((x, y) => x - y);
  assert.equal(contiguous(all, 1, N), null, "each offset delivered to exactly one member");
  assert.ok([...a.events, ...b.events].every((d) => d.attempt === 1), "no redelivery");
  assert.ok(a.events.length > 0 && b.events.length > 0);
  const g = await writer.groupInfo(topic, "workers");
  assert.equal(g.delivered, N);
  assert.equal(g.redelivered, 0);
  assert.equal(g.lag, 0);
  assert.equal(g.ackFloor, N);
  t.diagnostic(`a got ${a.events.length}, b got ${b.events.length}`);
});

test("ack, nack (redelivered as attempt 2), inProgress, term and max_deliver (dead letters)", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const writer = await connect(t, broker);
  const topic = uniqueTopic("settle");
  const dlq = new Collector(await writer.subscribe(`${topic}.dlq`), { label: "dead letters" });
  const c = new Collector(
    await client.consume(topic, "g", { consumer: "w", create: { ackWaitMs: 3_000, maxDeliver: 3 } }),
    { label: "consumer" },
  );
  await publishMany(writer, topic, 3);
  await c.untilEvents(3);
  const [d1, d2, d3] = c.events;
  assert.deepEqual(c.events.map((d) => [d.offset, d.attempt, d.json().i]), [[1, 1, 0], [2, 1, 1], [3, 1, 2]]);
  assert.equal(d1.epoch, (await writer.topicInfo(topic)).epoch);

  // nack: redelivered at once (no backoff), attempt 2.
  assert.deepEqual(await d1.nack(), { applied: 1, alreadyDone: 0, unknown: 0 });
  await c.untilEvents(4);
  assert.deepEqual([c.events[3].offset, c.events[3].attempt], [1, 2]);
  assert.deepEqual(await c.events[3].ack(), { applied: 1, alreadyDone: 0, unknown: 0 });
  assert.deepEqual(await d1.ack(), { applied: 0, alreadyDone: 1, unknown: 0 }, "a second ack is already done");

  // term: dead-lettered at once with the reason.
  assert.deepEqual(await d2.term("bad input"), { applied: 1, alreadyDone: 0, unknown: 0 });
  await dlq.untilEvents(1);
  const letter = dlq.events[0];
  assert.deepEqual(letter.json(), { i: 1 });
  assert.equal(letter.type, "job");
  assert.equal(letter.header("ringcast-dlq-topic"), topic);
  assert.equal(letter.header("ringcast-dlq-offset"), "2");
  assert.equal(letter.header("ringcast-dlq-group"), "g");
  assert.equal(letter.header("ringcast-dlq-reason"), "bad input");
  assert.equal(letter.header("ringcast-dlq-attempts"), "1");
  assert.equal(letter.header("ringcast-dlq-epoch"), String(d2.epoch));

  // inProgress: the deadline moves to now + ack_wait (3 s). Sent 1.2 s after the delivery,
  // the deadline left must be above the at most 1.8 s that remained of the first one.
  await new Promise((r) => setTimeout(r, 1_200));
  assert.deepEqual(await d3.inProgress(), { applied: 1, alreadyDone: 0, unknown: 0 });
  const pending = (await writer.groupInfo(topic, "g")).pendingSample.find((p) => p.offset === 3);
  assert.ok(pending, "offset 3 pending");
  assert.equal(pending.consumer, "w");
  assert.equal(pending.attempt, 1);
  assert.ok(pending.dueInMs > 2_000, `deadline extended: due in ${pending.dueInMs} ms`);
  assert.deepEqual(await d3.ack(), { applied: 1, alreadyDone: 0, unknown: 0 });
  assert.ok(c.events.every((d) => d.offset !== 3 || d.attempt === 1), "offset 3 never redelivered");

  // max_deliver 3: nacked three times, then a dead letter (reason nacked).
  await writer.publish(topic, "job", { i: 3 });
  await c.until((x) => x.events.some((e) => e.offset === 4), { what: "offset 4" });
  const d4 = c.events.find((e) => e.offset === 4);
  let d = d4;
  for (let attempt = 1; attempt <= 3; attempt++) {
    assert.equal(d.attempt, attempt);
    const n = c.events.length; // the redelivery may arrive before the nack's reply is read
    assert.equal((await d.nack()).applied, 1);
    if (attempt < 3) {
      await c.untilEvents(n + 1);
      d = c.events[n];
      assert.equal(d.offset, 4);
    }
  }
  await dlq.untilEvents(2);
  assert.equal(dlq.events[1].header("ringcast-dlq-offset"), "4");
  assert.equal(dlq.events[1].header("ringcast-dlq-reason"), "nacked");
  assert.equal(dlq.events[1].header("ringcast-dlq-attempts"), "3");

  // The dead letter can be seen on its topic a moment before the group counts it done.
  const g = await eventually(async () => {
    const info = await writer.groupInfo(topic, "g");
    return info.pending === 0 && info;
  }, { what: "offset 4 done for the group" });
  assert.equal(g.acked, 2);
  assert.equal(g.deadLettered, 2);
  assert.equal(g.ackFloor, 4);
  // A nack of something dead-lettered: already done.
  assert.deepEqual(await d4.nack(), { applied: 0, alreadyDone: 1, unknown: 0 });
});

test("a member cut off: its unacked work goes to the other member after ack_wait; it rejoins", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const far = await connect(t, proxy);
  const near = await connect(t, broker);
  const writer = await connect(t, broker);
  const topic = uniqueTopic("cutoff");
  await writer.createGroup(topic, "g", { ackWaitMs: 500 });

  const a = new Collector(await far.consume(topic, "g", { consumer: "a", maxInFlight: 1 }), { label: "a (through the proxy)" });
  await writer.publish(topic, "job", { i: 0 });
  await a.untilEvents(1);
  assert.equal(a.events[0].offset, 1);

  // b joins; a is cut off and cannot come back; a still holds offset 1.
  const b = new Collector(await near.consume(topic, "g", { consumer: "b", maxInFlight: 5 }), { label: "b" });
  proxy.pause();
  proxy.cutAll();
  await b.untilEvents(1, { timeoutMs: 30_000 });
  assert.deepEqual([b.events[0].offset, b.events[0].attempt], [1, 2], "offset 1 redelivered to b after ack_wait");
  assert.equal((await b.events[0].ack()).applied, 1);

  // a's client keeps its membership: it joins again when it can reconnect.
  assert.equal(a.done, false);
  proxy.resume();
  await eventually(async () => {
    const m = (await writer.groupInfo(topic, "g")).members.find((x) => x.consumer === "a");
    return m && m.sessions === 1;
  }, { what: "a to rejoin" });
  // b goes away (its client closes) so that the next event can only go to a.
  await near.close();
  await eventually(async () => {
    const m = (await writer.groupInfo(topic, "g")).members.find((x) => x.consumer === "b");
    return !m || m.sessions === 0;
  }, { what: "b's membership to end" });
  await b.untilDone();

  await writer.publish(topic, "job", { i: 1 });
  await a.untilEvents(2);
  const d = a.events[1];
  assert.deepEqual([d.offset, d.attempt], [2, 1]);

  // An ack sent while the connection is down is resent after the rejoin, and applies.
  proxy.pause();
  proxy.cutAll();
  await eventually(() => !far.connected, { what: "a's client to notice the cut" });
  const acked = d.ack();
  proxy.resume();
  assert.deepEqual(await acked, { applied: 1, alreadyDone: 0, unknown: 0 });
  const g = await writer.groupInfo(topic, "g");
  assert.equal(g.pending, 0);
  assert.equal(g.acked, 2);
  assert.ok(g.redelivered >= 1); // offset 1 (and offset 2 too if the reconnect took longer than ack_wait)
});

test("at least once under repeated cuts: every event is acked, redeliveries only as higher attempts", { timeout: TEST_TIMEOUT }, async (t) => {
  const proxy = await startProxy(broker.tcpHost, broker.tcpPort);
  t.after(() => proxy.close());
  const worker = await connect(t, proxy);
  const writer = await connect(t, broker);
  const topic = uniqueTopic("alo");
  const N = 600;
  const c = new Collector(
    await worker.consume(topic, "g", { consumer: "w", maxInFlight: 50, create: { ackWaitMs: 500, maxDeliver: 100 } }),
    { label: "worker" },
  );
  const cutsAt = new Set([100, 250, 400]);
  const cuts = [];
  const settles = [];
  c.onItem((item, col) => {
    if (item.kind !== "event") return;
    settles.push(item.ack());
    if (cutsAt.has(col.events.length)) {
      cuts.push(col.events.length);
      proxy.cutAll();
    }
  });
  await publishMany(writer, topic, N);
  await eventually(async () => {
    const g = await writer.groupInfo(topic, "g");
    return g.acked === N && g.pending === 0;
  }, { timeoutMs: 60_000, what: `${N} acks` });

  const byOffset = new Map();
  for (const d of c.events) byOffset.set(d.offset, [...(byOffset.get(d.offset) ?? []), d.attempt]);
  assert.equal(contiguous([...byOffset.keys()].sort((x, y) => x - y), 1, N), null, "every offset delivered");
  for (const [offset, attempts] of byOffset) {
    for (let k = 1; k < attempts.length; k++) assert.ok(attempts[k] > attempts[k - 1], `attempts of ${offset}: ${attempts}`);
  }
  // Each ack found its event handed out: applied, or already done when the reply to an
  // earlier one (applied) was lost with a cut and the client resent it.
  const results = await Promise.all(settles);
  for (const r of results) assert.equal(r.applied + r.alreadyDone, 1, JSON.stringify(r));
  const applied = results.reduce((n, r) => n + r.applied, 0);
  assert.ok(applied <= N);
  assert.deepEqual(cuts, [100, 250, 400]);
  t.diagnostic(`deliveries ${c.events.length} for ${N} events; acks applied ${applied}, already done ${results.length - applied}`);
});

test("deleting the group ends its memberships; joining again needs it created anew", { timeout: TEST_TIMEOUT }, async (t) => {
  const client = await connect(t, broker);
  const topic = uniqueTopic("gdel");
  const c = new Collector(await client.consume(topic, "g", { create: true }), { label: "member" });
  await client.publish(topic, "job", 1);
  await c.untilEvents(1);
  const groups = await client.groups(topic);
  assert.deepEqual(groups.map((g) => g.group), ["g"]);
  // A membership whose signal fires leaves cleanly.
  const ac = new AbortController();
  const leaver = new Collector(await client.consume(topic, "g", { consumer: "leaver", signal: ac.signal }), { label: "leaver" });
  ac.abort();
  await leaver.untilDone();
  assert.equal(leaver.error, null);
  await eventually(async () => {
    const m = (await client.groupInfo(topic, "g")).members.find((x) => x.consumer === "leaver");
    return !m || m.sessions === 0;
  }, { what: "the aborted membership to end" });

  await client.deleteGroup(topic, "g");
  await c.untilDone();
  assert.equal(c.error, null);
  assert.deepEqual(c.items.at(-1), { kind: "end", topic, lastOffset: 0 });
  await assert.rejects(client.consume(topic, "g"), (e) => e instanceof RingcastError && e.code === "GroupNotFound");
  await assert.rejects(client.groupInfo(topic, "g"), (e) => e.code === "GroupNotFound");
  assert.ok((await client.ping()) >= 0);
});
