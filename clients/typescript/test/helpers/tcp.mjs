// Test helpers for the Node TCP client suites (client, resume, groups,
// auth): connecting to a test broker, reading a subscription in the
// background and awaiting conditions on what it saw, and a relay that can
// black-hole its live connections (stop forwarding without closing), for
// dead-peer detection.
//
// Everything here awaits events; the only timers are deadlines that turn a
// hang into a failure with a message saying what was seen.

import { randomUUID } from "node:crypto";

import { Client } from "../../dist/index.js";

/** Default deadline of one awaited condition (a loaded 2-core machine, a debug broker). */
export const WAIT_MS = 30_000;

/** A fresh topic name (topic alphabet) with this prefix. */
export function uniqueTopic(prefix = "t") {
  return `${prefix}.${randomUUID().slice(0, 8)}`;
}

/** `promise`, or a rejection naming `what` after `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/**
 * Connects a client to `target` (a Broker, a proxy/relay `{host?, port}`,
 * or `{tcpHost, tcpPort}`), with a short reconnect backoff and a long
 * request timeout, and closes it when the test ends.
 */
export async function connect(t, target, options = {}) {
  const host = target.tcpHost ?? target.host ?? "127.0.0.1";
  const port = target.tcpPort ?? target.port;
  const client = await Client.connect({
    host,
    port,
    reconnect: { baseDelayMs: 20, maxDelayMs: 300 },
    requestTimeoutMs: 90_000,
    ...options,
  });
  t?.after(() => client.close());
  return client;
}

/**
 * Reads an async iterable (a subscription, a pattern subscription, a
 * consumer) in the background. `items` is everything it yielded, in order;
 * `events` the items of kind "event" (or deliveries); `done` / `error` say
 * how the iteration ended. `until(pred)` resolves once `pred(collector)`
 * holds (checked after every item and at the end), and rejects at its
 * deadline — or when the iteration ended without `pred` holding — with a
 * summary of what was seen. `onItem(fn)` runs `fn(item, collector)` for
 * each item as it arrives (before the `until` checks).
 */
export class Collector {
  constructor(iterable, { label = "subscription" } = {}) {
    this.label = label;
    this.items = [];
    this.events = [];
    this.done = false;
    this.error = null;
    this.waiters = new Set();
    this.hooks = [];
    this.finished = this._run(iterable);
  }

  async _run(iterable) {
    try {
      for await (const item of iterable) {
        this.items.push(item);
        if (item.kind === "event") this.events.push(item);
        for (const h of this.hooks) h(item, this);
        this._check();
      }
    } catch (e) {
      this.error = e;
    }
    this.done = true;
    this._check();
  }

  onItem(fn) {
    this.hooks.push(fn);
  }

  _check() {
    for (const w of [...this.waiters]) w();
  }

  /** Items of `kind`. */
  kinds(kind) {
    return this.items.filter((i) => i.kind === kind);
  }

  /** The offsets of the events seen so far. */
  offsets() {
    return this.events.map((e) => e.offset);
  }

  summary() {
    const kinds = {};
    for (const i of this.items) kinds[i.kind] = (kinds[i.kind] ?? 0) + 1;
    const offs = this.offsets();
    return (
      `${this.label}: ${this.items.length} items ${JSON.stringify(kinds)}, ` +
      `offsets ${offs.length ? `${offs[0]}..${offs[offs.length - 1]}` : "none"}, ` +
      `done=${this.done}${this.error ? `, error=${this.error.code ?? ""} ${this.error.message}` : ""}`
    );
  }

  until(pred, { timeoutMs = WAIT_MS, what = "condition" } = {}) {
    return new Promise((resolve, reject) => {
      let timer;
      const check = () => {
        let ok;
        try {
          ok = pred(this);
        } catch (e) {
          finish(e);
          return;
        }
        if (ok) finish(null);
        else if (this.done) finish(new Error(`${this.label} ended before ${what}; ${this.summary()}`));
      };
      const finish = (err) => {
        clearTimeout(timer);
        this.waiters.delete(check);
        if (err) reject(err);
        else resolve(this);
      };
      timer = setTimeout(
        () => finish(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; ${this.summary()}`)),
        timeoutMs,
      );
      this.waiters.add(check);
      check();
    });
  }

  /** Resolves once at least `n` events were seen. */
  untilEvents(n, opts = {}) {
    return this.until((c) => c.events.length >= n, { what: `${n} events`, ...opts });
  }

  /** Resolves once the iteration ended (normally or with an error). */
  untilDone(opts = {}) {
    return this.until((c) => c.done, { what: "the end of the iteration", ...opts });
  }
}

/**
 * Polls `fn` (async) until it returns a truthy value, which it resolves;
 * for broker state with no push to await (group info). Rejects at the
 * deadline with the last value or error.
 */
export async function eventually(fn, { timeoutMs = WAIT_MS, intervalMs = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${last instanceof Error ? last.message : JSON.stringify(last, (_, v) => (typeof v === "bigint" ? v.toString() : v))}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Asserts `offsets` is exactly `from..to`, each once, in order (with a short message). */
export function contiguous(offsets, from, to) {
  if (offsets.length !== to - from + 1) return `expected ${to - from + 1} offsets ${from}..${to}, got ${offsets.length}${firstDiff(offsets, from)}`;
  const d = firstDiff(offsets, from);
  return d ? `offsets not ${from}..${to}${d}` : null;
}

function firstDiff(offsets, from) {
  for (let i = 0; i < offsets.length; i++) {
    if (offsets[i] !== from + i) return ` (first difference at index ${i}: ${offsets[i]} where ${from + i} was expected)`;
  }
  return "";
}

/**
 * The proxy of proxy.mjs, whose `blackhole()` makes every live pair drop
 * what either side sends and never close the client's side even when the
 * broker closes its own — a peer that went silent, as after a network
 * partition, which only the client's own dead-peer detection can notice.
 * `closedByClient` counts black-holed pairs the client gave up on.
 */
export { startProxy as startRelay } from "./proxy.mjs";
