// The LZ4 block codec and payload markers (docs/protocol.md, "Payload
// compression"): the doc's compressed vector, round trips of every shape,
// and corrupt blocks refused.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { lz4Compress, lz4Decompress, markPayload, unmarkPayload } from "../dist/lz4.js";
import { decodeClientBody } from "../dist/protocol.js";

const doc = readFileSync(new URL("../../../docs/protocol.md", import.meta.url), "utf8");

test("the doc's LZ4 payload (client.Publish.Lz4) reads back to its 51 bytes", () => {
  const block = doc.split("#### `client.Publish.Lz4`")[1].split("```text\n")[1].split("```")[0];
  const frame = Buffer.from(block.replace(/\s+/g, ""), "hex");
  const msg = decodeClientBody(new Uint8Array(frame.subarray(4)));
  const plain = unmarkPayload(msg.payload, 1 << 20);
  assert.equal(Buffer.from(plain).toString(), `{"text":"${"a".repeat(40)}"}`);
});

test("round trips: empty, tiny, repetitive, long literal runs, long matches, random", () => {
  const cases = [
    new Uint8Array(0),
    Uint8Array.of(7),
    new Uint8Array(12).fill(1),
    new Uint8Array(13).fill(1),
    new Uint8Array(100_000).fill(0x61),
    new Uint8Array(randomBytes(70_000)),
    new TextEncoder().encode(JSON.stringify(Array.from({ length: 500 }, (_, i) => ({ id: i, name: `item-${i}`, ok: i % 3 === 0 })))),
    Uint8Array.from({ length: 300_000 }, (_, i) => (i * 7919) % 251),
  ];
  for (const plain of cases) {
    const block = lz4Compress(plain);
    assert.deepEqual(lz4Decompress(block, plain.length), plain, `${plain.length} bytes`);
    const marked = markPayload(plain, 1, 0);
    assert.deepEqual(unmarkPayload(marked, 1 << 20), plain);
    assert.ok(marked.length <= plain.length + 1, "never more than one byte over the raw payload");
  }
  const json = cases[6];
  assert.ok(markPayload(json, 1, 0).length < json.length / 3, "JSON compresses");
  assert.equal(markPayload(json, 1, json.length + 1)[0], 0, "below min_size it goes raw");
  assert.equal(markPayload(json, 0, 0)[0], 0, "codec 0: raw");
});

test("corrupt or lying blocks are refused", () => {
  const plain = new TextEncoder().encode("abcabcabcabcabcabcabcabcabcabc-the-end");
  const block = lz4Compress(plain);
  assert.throws(() => lz4Decompress(block, plain.length + 1), /declared/);
  assert.throws(() => lz4Decompress(block, plain.length - 1), /declared/);
  assert.throws(() => lz4Decompress(block.subarray(0, block.length - 3), plain.length));
  assert.throws(() => lz4Decompress(Uint8Array.of(0x00, 0x05, 0x00), 8), /offset/);
  assert.throws(() => unmarkPayload(new Uint8Array(0), 10), /marker/);
  assert.throws(() => unmarkPayload(Uint8Array.of(2, 1), 10), /marker/);
  assert.throws(() => unmarkPayload(Uint8Array.of(1, 0, 0), 10), /cut short/);
  assert.throws(() => unmarkPayload(Uint8Array.of(1, 0xff, 0xff, 0xff, 0xff, 0), 1 << 20), /declaring/);
});
