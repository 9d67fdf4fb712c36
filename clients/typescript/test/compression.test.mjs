// LZ4 payload compression against the real broker (protocol version 5,
// `HelloExt` / `WelcomeExt`): what a compressing client publishes is stored
// and served plain, compressed subscribers read it back byte for byte with
// fewer bytes on the wire, and a broker that refuses compression leaves a
// client that offered it working plain.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { startBroker } from "./helpers/broker.mjs";
import { Collector, connect, uniqueTopic } from "./helpers/tcp.mjs";

let broker;
before(async () => {
  broker = await startBroker({ durability: "memory" });
});
after(() => broker?.cleanup());

const json = (i) =>
  new TextEncoder().encode(
    JSON.stringify({ i, items: Array.from({ length: 60 }, (_, k) => ({ sku: `sku-${k}`, qty: k % 4, note: "same text again" })) }),
  );

test("compressed publishes are stored plain; compressed and plain subscribers read the same bytes", async (t) => {
  const topic = uniqueTopic("lz4");
  const lz4 = await connect(t, broker, { compression: "lz4" });
  const plain = await connect(t, broker);
  assert.equal(lz4["codec"], 1, "the broker took LZ4");
  assert.equal(plain["codec"], 0);

  const subLz4 = new Collector(await lz4.subscribe(topic, { start: "earliest" }));
  const subPlain = new Collector(await plain.subscribe(topic, { start: "earliest" }));
  const readBefore = [lz4["socket"].bytesRead, plain["socket"].bytesRead];

  const payloads = [];
  for (let i = 0; i < 20; i++) payloads.push(json(i));
  payloads.push(Uint8Array.of(1, 2, 3)); // below min_size: raw
  payloads.push(new Uint8Array(0)); // empty: the marker alone
  const acks = await Promise.all(payloads.map((p) => lz4.publish(topic, "doc", p)));
  assert.deepEqual(
    acks.map((a) => a.offset),
    payloads.map((_, i) => i + 1),
  );

  for (const sub of [subLz4, subPlain]) {
    await sub.untilEvents(payloads.length);
    sub.events.forEach((e, i) => assert.deepEqual(new Uint8Array(e.payload), payloads[i], `event ${i + 1}`));
  }
  // History over the plain connection shows what the broker stored: plain bytes.
  const page = await plain.history(topic);
  page.events.forEach((e, i) => assert.deepEqual(new Uint8Array(e.payload), payloads[i]));
  // And over the compressed one, decompressed again.
  const pageLz4 = await lz4.history(topic);
  pageLz4.events.forEach((e, i) => assert.deepEqual(new Uint8Array(e.payload), payloads[i]));

  const [lz4Bytes, plainBytes] = [lz4["socket"].bytesRead - readBefore[0], plain["socket"].bytesRead - readBefore[1]];
  assert.ok(lz4Bytes < plainBytes / 2, `compressed subscriber read ${lz4Bytes} bytes, plain ${plainBytes}`);
});

test("a broker with compression off answers codec 0 and the client goes on plain", async (t) => {
  const off = await startBroker({ durability: "memory", config: { server: { tcp_compression: false } } });
  t.after(() => off.cleanup());
  const c = await connect(t, off, { compression: "lz4" });
  assert.equal(c["codec"], 0);
  const topic = uniqueTopic("off");
  const sub = new Collector(await c.subscribe(topic, { start: "earliest" }));
  await c.publish(topic, "doc", json(1));
  await sub.untilEvents(1);
  assert.deepEqual(new Uint8Array(sub.events[0].payload), json(1));
  assert.deepEqual(new Uint8Array((await c.history(topic)).events[0].payload), json(1));
});
