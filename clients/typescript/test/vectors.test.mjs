// Every test vector printed in docs/protocol.md ("Test vectors"), encoded and
// decoded byte for byte by the TypeScript codec, which was written from that
// page. The JSON of each vector is converted to the codec's values through
// the codec's own schema (snake_case → camelCase, serde's enum forms), so a
// field the doc names differently, a missing field or a wrong width fails.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import {
  ENUMS,
  FrameDecoder,
  ProtocolError,
  STRUCTS,
  decodeClientBody,
  decodeServerBody,
  encodeClientFrame,
  encodeServerFrame,
} from "../dist/protocol.js";

const DOC = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../docs/protocol.md");

/** `[{ name, json, hex }]` from the doc's generated section. */
function docVectors() {
  const text = readFileSync(DOC, "utf8");
  const begin = text.indexOf("<!-- BEGIN test-vectors");
  const end = text.indexOf("<!-- END test-vectors -->");
  assert.ok(begin > 0 && end > begin, "docs/protocol.md has the test-vectors section");
  const section = text.slice(begin, end);
  const re = /#### `([^`]+)`\s*```json\n(.*?)\n```\s*```text\n([\s\S]*?)```/g;
  const out = [];
  for (const m of section.matchAll(re)) {
    out.push({ name: m[1], json: m[2], hex: m[3].replace(/\s+/g, "") });
  }
  const headings = section.match(/^#### /gm)?.length ?? 0;
  assert.equal(out.length, headings, "every vector heading has a json and a text block");
  return out;
}

/** JSON.parse that keeps integers above 2^53 exact (as decimal strings). */
function parseExact(json) {
  return JSON.parse(json.replace(/([:[,])(\d{16,})(?=[,\]}])/g, '$1"$2"'));
}

const snake = (camel) => camel.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

/** Converts serde's JSON of a value of wire type `ty` to the codec's value. */
function fromSerde(ty, v, where) {
  if (typeof ty === "string") {
    switch (ty) {
      case "u8":
      case "u16":
      case "u32":
      case "u64": {
        const n = Number(v);
        assert.ok(Number.isSafeInteger(n), `${where}: ${v} is a safe integer`);
        return n;
      }
      case "epoch":
        return BigInt(v);
      case "bool":
      case "string":
        assert.equal(typeof v, ty === "bool" ? "boolean" : "string", where);
        return v;
      case "bytes":
        assert.ok(Array.isArray(v), `${where}: bytes are an array`);
        return Uint8Array.from(v);
    }
  }
  switch (ty[0]) {
    case "list":
      assert.ok(Array.isArray(v), `${where}: a list`);
      return v.map((x, i) => fromSerde(ty[1], x, `${where}[${i}]`));
    case "option":
      return v === null ? null : fromSerde(ty[1], v, where);
    case "tuple":
      assert.equal(v.length, 2, `${where}: a pair`);
      return [fromSerde(ty[1], v[0], `${where}.0`), fromSerde(ty[2], v[1], `${where}.1`)];
    case "struct":
      return fields(STRUCTS[ty[1]], v, where, {});
    case "enum":
      return fromEnum(ty[1], v, where);
  }
  throw new Error(`unknown type ${ty}`);
}

function fields(list, obj, where, into) {
  assert.deepEqual(
    Object.keys(obj),
    list.map(([name]) => snake(name)),
    `${where}: the doc's fields, in wire order`,
  );
  for (const [name, ty] of list) into[name] = fromSerde(ty, obj[snake(name)], `${where}.${snake(name)}`);
  return into;
}

function fromEnum(name, v, where) {
  const spec = ENUMS[name];
  if (spec.units) {
    assert.ok(spec.units.includes(v), `${where}: ${v} is a ${name}`);
    return v;
  }
  if (typeof v === "string") {
    const variant = spec.variants.find(([n]) => n === v);
    assert.ok(variant && variant[1].length === 0, `${where}: unit variant ${v} of ${name}`);
    return { type: v };
  }
  const [type] = Object.keys(v);
  const variant = spec.variants.find(([n]) => n === type);
  assert.ok(variant, `${where}: ${type} is a variant of ${name}`);
  const [, list, newtype] = variant;
  if (newtype) return { type, [list[0][0]]: fromSerde(list[0][1], v[type], `${where}.${type}`) };
  return fields(list, v[type], `${where}.${type}`, { type });
}

const hexOf = (bytes) => Buffer.from(bytes).toString("hex");
const bytesOf = (hex) => new Uint8Array(Buffer.from(hex, "hex"));

test("the doc prints a vector for every message kind of both directions", () => {
  const names = docVectors().map((v) => v.name);
  for (const [dir, enumName] of [
    ["client", "ClientMessage"],
    ["server", "ServerMessage"],
  ]) {
    for (const [variant] of ENUMS[enumName].variants) {
      assert.ok(
        names.some((n) => n === `${dir}.${variant}` || n.startsWith(`${dir}.${variant}.`)),
        `a vector for ${dir}.${variant}`,
      );
    }
  }
});

test("every vector of the doc encodes and decodes byte for byte", () => {
  const vectors = docVectors();
  assert.ok(vectors.length >= 60, `${vectors.length} vectors`);
  for (const { name, json, hex } of vectors) {
    const client = name.startsWith("client.");
    const value = fromEnum(client ? "ClientMessage" : "ServerMessage", parseExact(json), name);
    const encoded = client ? encodeClientFrame(value) : encodeServerFrame(value);
    assert.equal(hexOf(encoded), hex, `${name}: encoding`);
    const frame = bytesOf(hex);
    const length = new DataView(frame.buffer).getUint32(0);
    assert.equal(length, frame.length - 4, `${name}: the length prefix counts the body`);
    const body = frame.subarray(4);
    const decoded = client ? decodeClientBody(body) : decodeServerBody(body);
    assert.deepEqual(decoded, value, `${name}: decoding`);
  }
});

test("frames split anywhere are reassembled, in order", () => {
  const frames = docVectors()
    .filter((v) => v.name.startsWith("server."))
    .map((v) => bytesOf(v.hex));
  const stream = Buffer.concat(frames);
  for (const step of [1, 3, 7, 64, stream.length]) {
    const decoder = new FrameDecoder();
    const bodies = [];
    for (let at = 0; at < stream.length; at += step) bodies.push(...decoder.push(stream.subarray(at, at + step)));
    assert.equal(bodies.length, frames.length, `chunks of ${step}`);
    bodies.forEach((b, i) => assert.equal(hexOf(b), hexOf(frames[i].subarray(4)), `frame ${i}, chunks of ${step}`));
    assert.equal(decoder.pending, 0);
  }
});

test("a length prefix over max_frame is refused before its body arrives", () => {
  const decoder = new FrameDecoder(1024);
  assert.throws(
    () => decoder.push(Uint8Array.of(0, 0, 4, 1)),
    (e) => e instanceof ProtocolError && e.code === "FrameTooLarge",
  );
});

test("malformed bodies are errors, never a wrong value", () => {
  const ping = bytesOf(docVectors().find((v) => v.name === "server.Pong").hex).subarray(4);
  const bad = {
    "truncated": ping.subarray(0, ping.length - 1),
    "trailing byte": Uint8Array.from([...ping, 0]),
    "unknown tag": Uint8Array.of(0, 0, 0, 200),
    "empty": new Uint8Array(0),
    // Error { request_id: option tag 2 }
    "bad option tag": Uint8Array.of(0, 0, 0, 12, 2),
    // Shutdown { reason: a string claiming 2^40 bytes }
    "lying length": Uint8Array.of(0, 0, 0, 14, 0, 0, 1, 0, 0, 0, 0, 0, 0x61),
    // Shutdown { reason: invalid UTF-8 }
    "invalid UTF-8": Uint8Array.of(0, 0, 0, 14, 0, 0, 0, 0, 0, 0, 0, 1, 0xff),
    // Topics { request_id: 1, topics: [ { sealed: 2 } ] }
    "bad bool": Uint8Array.of(
      ...[0, 0, 0, 8],
      ...[0, 0, 0, 0, 0, 0, 0, 1],
      ...[0, 0, 0, 0, 0, 0, 0, 1],
      ...[0, 0, 0, 0, 0, 0, 0, 1, 0x61],
      ...[0, 0, 0, 0, 0, 0, 0, 1],
      ...[0, 0, 0, 0, 0, 0, 0, 0],
      2,
    ),
    // Published { request_id: 1, results: a list claiming 2^60 acks }
    "lying count": Uint8Array.of(0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0x10, 0, 0, 0, 0, 0, 0, 0),
  };
  for (const [what, body] of Object.entries(bad)) {
    assert.throws(() => decodeServerBody(body), ProtocolError, what);
  }
});

test("values outside a field's width are refused when encoding", () => {
  assert.throws(() => encodeClientFrame({ type: "Ping", requestId: -1 }), TypeError);
  assert.throws(() => encodeClientFrame({ type: "Ping", requestId: 2 ** 53 }), TypeError);
  assert.throws(() => encodeClientFrame({ type: "Ping", requestId: 1.5 }), TypeError);
  assert.throws(
    () =>
      encodeClientFrame({
        type: "Subscribe",
        requestId: 1,
        subscriptionId: 1,
        topic: "t",
        types: [],
        start: { type: "AfterOffset", epoch: 1, offset: 0 },
      }),
    TypeError,
    "an epoch must be a bigint",
  );
  assert.throws(() => encodeClientFrame({ type: "Nope", requestId: 1 }), TypeError);
});
