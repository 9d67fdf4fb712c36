/**
 * LZ4 block format and the payload codec marker of protocol version 5
 * (docs/protocol.md, "Payload compression"): what a connection that
 * negotiated codec 1 carries in every event payload.
 *
 * ```text
 * 00 | the payload's bytes                                   raw
 * 01 | original length: u32, big-endian | one LZ4 block      LZ4
 * ```
 */

import { ProtocolError } from "./protocol.js";

/** Codec ids of the protocol. */
export const CODEC_NONE = 0;
/** LZ4 block format. */
export const CODEC_LZ4 = 1;

const MIN_MATCH = 4;
/** The last match starts at least this many bytes before the end (format rule). */
const MF_LIMIT = 12;
/** The last bytes are always literals (format rule). */
const LAST_LITERALS = 5;
const HASH_BITS = 12;

function read32(a: Uint8Array, i: number): number {
  return (a[i]! | (a[i + 1]! << 8) | (a[i + 2]! << 16) | (a[i + 3]! << 24)) >>> 0;
}

/** Compresses `src` into one LZ4 block (greedy, 4 KiB hash table: fast, not the densest). */
export function lz4Compress(src: Uint8Array): Uint8Array {
  const n = src.length;
  const out = new Uint8Array(n + Math.ceil(n / 255) + 16);
  let op = 0;
  let anchor = 0;

  /** A length's nibble in the token (15: more follows) and, from 15 on, its extra bytes. */
  const nibble = (len: number): number => {
    if (len < 15) return len;
    let rest = len - 15;
    while (rest >= 255) {
      out[op++] = 255;
      rest -= 255;
    }
    out[op++] = rest;
    return 15;
  };

  const emit = (literalEnd: number, offset: number, matchLen: number) => {
    const lit = literalEnd - anchor;
    const tokenAt = op++;
    let token = nibble(lit) << 4;
    out.set(src.subarray(anchor, literalEnd), op);
    op += lit;
    if (matchLen > 0) {
      out[op++] = offset & 0xff;
      out[op++] = offset >>> 8;
      token |= nibble(matchLen - MIN_MATCH);
    }
    out[tokenAt] = token;
  };

  if (n >= MF_LIMIT + 1) {
    const table = new Int32Array(1 << HASH_BITS).fill(-1);
    const limit = n - MF_LIMIT;
    const matchEnd = n - LAST_LITERALS;
    let ip = 0;
    while (ip < limit) {
      const seq = read32(src, ip);
      const h = Math.imul(seq, 2654435761) >>> (32 - HASH_BITS);
      const ref = table[h]!;
      table[h] = ip;
      if (ref >= 0 && ip - ref < 65536 && read32(src, ref) === seq) {
        let len = MIN_MATCH;
        while (ip + len < matchEnd && src[ref + len] === src[ip + len]) len++;
        emit(ip, ip - ref, len);
        ip += len;
        anchor = ip;
      } else {
        ip++;
      }
    }
  }
  emit(n, 0, 0);
  return out.subarray(0, op);
}

/** Decompresses one LZ4 block that must yield exactly `size` bytes. */
export function lz4Decompress(src: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(size);
  let ip = 0;
  let op = 0;
  const bad = (why: string): never => {
    throw new ProtocolError(`corrupt LZ4 block: ${why}`);
  };
  for (;;) {
    if (ip >= src.length) bad("cut short");
    const token = src[ip++]!;
    let lit = token >>> 4;
    if (lit === 15) {
      let b: number;
      do {
        if (ip >= src.length) bad("cut short in a literal length");
        b = src[ip++]!;
        lit += b;
      } while (b === 255);
    }
    if (ip + lit > src.length) bad("literals past the end of the block");
    if (op + lit > size) bad("more bytes than the declared length");
    out.set(src.subarray(ip, ip + lit), op);
    ip += lit;
    op += lit;
    if (ip === src.length) break; // the last sequence: literals only
    if (ip + 2 > src.length) bad("cut short in a match offset");
    const offset = src[ip]! | (src[ip + 1]! << 8);
    ip += 2;
    if (offset === 0 || offset > op) bad("a match offset before the start");
    let len = token & 15;
    if (len === 15) {
      let b: number;
      do {
        if (ip >= src.length) bad("cut short in a match length");
        b = src[ip++]!;
        len += b;
      } while (b === 255);
    }
    len += MIN_MATCH;
    if (op + len > size) bad("more bytes than the declared length");
    for (let i = 0; i < len; i++, op++) out[op] = out[op - offset]!;
  }
  if (op !== size) bad(`${op} bytes where ${size} were declared`);
  return out;
}

/** Marks a payload for a connection whose codec is `codec`: compressed when at least `minSize` bytes and smaller so. */
export function markPayload(plain: Uint8Array, codec: number, minSize: number): Uint8Array {
  if (codec === CODEC_LZ4 && plain.length >= minSize && plain.length > 0) {
    const block = lz4Compress(plain);
    if (5 + block.length < 1 + plain.length) {
      const out = new Uint8Array(5 + block.length);
      out[0] = CODEC_LZ4;
      new DataView(out.buffer).setUint32(1, plain.length);
      out.set(block, 5);
      return out;
    }
  }
  const out = new Uint8Array(1 + plain.length);
  out[0] = CODEC_NONE;
  out.set(plain, 1);
  return out;
}

/** Reads a marked payload back to its plain bytes; `maxSize` bounds a declared length before anything is allocated. */
export function unmarkPayload(marked: Uint8Array, maxSize: number): Uint8Array {
  if (marked.length === 0) throw new ProtocolError("a payload without its codec marker");
  const marker = marked[0]!;
  if (marker === CODEC_NONE) return marked.subarray(1);
  if (marker !== CODEC_LZ4) throw new ProtocolError(`unknown payload codec marker ${marker}`);
  if (marked.length < 5) throw new ProtocolError("an LZ4 payload header cut short");
  const size = new DataView(marked.buffer, marked.byteOffset, marked.byteLength).getUint32(1);
  if (size > maxSize) throw new ProtocolError(`an LZ4 payload declaring ${size} bytes, over ${maxSize}`);
  return lz4Decompress(marked.subarray(5), size);
}
