/**
 * The Node TCP client: one connection to a ringcast broker, pipelined
 * requests, subscriptions that resume exactly across reconnects, and
 * consumer-group memberships.
 *
 * One socket at a time. Requests are written as they are made (coalesced
 * per tick) and matched to replies by request id; pushes are routed by
 * subscription id. When the connection drops, requests in flight fail with
 * `ConnectionLost` — except publishes (sent as `Append` with an idempotency
 * key, so a repeat is stored once) and acks, in-progress and terms, which
 * are sent again — the client reconnects with capped exponential backoff
 * and full jitter, subscribes every live subscription again from its
 * resume position under the same id, joins its memberships again, then
 * sends what waited.
 */

import { randomUUID } from "node:crypto";
import net from "node:net";

import { PositionMismatchError, RingcastError } from "./errors.js";
import {
  DEFAULT_MAX_FRAME,
  FrameDecoder,
  PROTOCOL_VERSION,
  decodeServerBody,
  encodeClientFrame,
  type AppendAck,
  type ClientMessage,
  type GroupOptions,
  type GroupStart,
  type Headers,
  type ServerMessage,
  type ServerMessageOf,
  type SettleAction,
  type Start,
  type TopicPosition,
  type TopicSummary,
  type WireConnection,
  type WireEvent,
  type WireGap,
  type WireGroupInfo,
  type WireTopicInfo,
} from "./protocol.js";
import { CODEC_LZ4, CODEC_NONE, markPayload, unmarkPayload } from "./lz4.js";
import { PatternResume, Resume } from "./resume.js";

// ---------------------------------------------------------------------------
// Public types.

/** Credentials for each connection: fixed, or fetched anew for every (re)connect and refresh. */
export type TokenProvider = () => string | Promise<string>;

/** How to reach and talk to the broker. */
export interface ClientOptions {
  /** Broker host (default `127.0.0.1`). */
  host?: string;
  /** Broker TCP port (default 7411). */
  port?: number;
  /** Sent in `Hello`; shows up in the broker's logs. */
  clientName?: string;
  /** A JWT or API key, fixed for the client's life. */
  credentials?: string;
  /** Asked for credentials at every (re)connect and before a JWT expires (then sent as `Refresh`). */
  tokenProvider?: TokenProvider;
  /** Refresh a JWT from `tokenProvider` on the live connection before it expires (default true). */
  proactiveRefresh?: boolean;
  /** Reconnect backoff (full jitter): the first delay's cap and the largest cap (defaults 100 ms, 10 s); `false`: never reconnect. */
  reconnect?: { baseDelayMs?: number; maxDelayMs?: number } | false;
  /** Limit for one connection attempt, TCP and handshake (default 10 s). */
  connectTimeoutMs?: number;
  /** Limit for one request's reply, time spent waiting for a reconnect included (default 30 s; 0 = none). */
  requestTimeoutMs?: number;
  /** Closes the client when it fires. */
  signal?: AbortSignal;
  /** Events one subscription may buffer before the client stops reading the socket (default 10,000). */
  maxBufferedEvents?: number;
  /** Offer LZ4 payload compression in the handshake (`HelloExt`; default `"none"`). */
  compression?: "lz4" | "none";
  /** With compression: the smallest payload worth compressing (default 1024 bytes; the broker may raise it). */
  compressionMinSize?: number;
}

/** What the broker announced in its `Welcome`. */
export interface ServerInfo {
  /** The broker's version. */
  serverVersion: string;
  /** The protocol version in use. */
  protocolVersion: number;
  /** Largest frame body the broker accepts. */
  maxFrame: number;
  /** Largest event payload. */
  maxPayload: number;
  /** Live subscriptions per connection. */
  maxSubscriptions: number;
  /** Heartbeat interval; the client pings after this long without sending. */
  heartbeatMs: number;
}

/** A payload as given to publish: bytes as they are, a string as UTF-8, anything else as JSON. */
export type PayloadInput = Uint8Array | string | object | number | boolean | null;

/** One event to publish. */
export interface EventInput {
  /** The event type (topic-name alphabet). */
  type: string;
  /** The payload. */
  payload: PayloadInput;
  /** Headers, as an object or (name, value) pairs. */
  headers?: Record<string, string> | Headers;
  /** An idempotency key (1–128 bytes): within the topic's dedup window a repeat is stored once. Default: a random one per call, which makes reconnect retries exact. */
  idempotencyKey?: string;
}

/** Where a published event landed. */
export interface PublishAck {
  /** The topic's epoch. */
  epoch: bigint;
  /** The event's offset. */
  offset: number;
  /** The event's version (per type). */
  version: number;
  /** The idempotency key was already stored: this is the original's position, nothing new was stored. */
  duplicate: boolean;
}

/** Where a subscription starts. */
export type StartOption =
  | "live"
  | "earliest"
  | { afterOffset: number; epoch: bigint }
  | { afterVersions: Record<string, number> | [string, number][]; epoch: bigint };

/** An event delivered to a subscription. */
export class RingcastEvent {
  /** Discriminates the items of a subscription. */
  readonly kind = "event" as const;
  /** The topic. */
  readonly topic: string;
  /** Offset in the topic (per epoch, from 1). */
  readonly offset: number;
  /** The event type. */
  readonly type: string;
  /** Version within its type. */
  readonly version: number;
  /** Broker time of the publish, ms since the Unix epoch. */
  readonly timestampMs: number;
  /** Headers, in the publisher's order. */
  readonly headers: Headers;
  /** The raw payload. */
  readonly payload: Uint8Array;
  /** The topic's epoch this event belongs to (null in a history page, which carries none: see `topicInfo`). */
  readonly epoch: bigint | null;

  /** Builds one from the wire form. */
  constructor(e: WireEvent, epoch: bigint | null) {
    this.topic = e.topic;
    this.offset = e.offset;
    this.type = e.eventType;
    this.version = e.version;
    this.timestampMs = e.timestampMs;
    this.headers = e.headers;
    this.payload = e.payload;
    this.epoch = epoch;
  }

  /** The payload as UTF-8 text. */
  text(): string {
    return new TextDecoder().decode(this.payload);
  }

  /** The payload parsed as JSON. */
  json<T = unknown>(): T {
    return JSON.parse(this.text()) as T;
  }

  /** The first header of this name, if any. */
  header(name: string): string | undefined {
    return this.headers.find(([n]) => n === name)?.[1];
  }
}

/**
 * Events were lost to this subscription; delivery continues live after
 * `current`. Offsets after `requested` and before `firstAvailable` are gone;
 * `firstAvailable` to `current` may still be retained (`history` with
 * `after: firstAvailable - 1`). Refetch state, or refill from history.
 */
export interface Gap {
  /** Discriminates the items of a subscription. */
  kind: "gap";
  /** The topic. */
  topic: string;
  /** Absent: offsets; set: versions of this type. */
  eventType: string | null;
  /** `Retention`, `EpochChanged` or `SlowConsumer`. */
  reason: WireGap["reason"];
  /** The topic's current epoch (0n for a pattern topic that is gone). */
  epoch: bigint;
  /** What the subscription asked to resume after. */
  requested: number;
  /** The first offset (or version) still available. */
  firstAvailable: number;
  /** The latest; delivery continues after it. */
  current: number;
}

/** A topic ended: sealed and delivered to its end, or deleted. A topic subscription is over after it. */
export interface End {
  /** Discriminates the items of a subscription. */
  kind: "end";
  /** The topic. */
  topic: string;
  /** Its last offset (0 when deleted, for a group membership). */
  lastOffset: number;
}

/** A topic joined a pattern subscription (from its first event). */
export interface Joined {
  /** Discriminates the items of a subscription. */
  kind: "joined";
  /** The topic and the position before its first delivery here. */
  position: TopicPosition;
}

/** What a topic subscription yields. */
export type SubscriptionItem = RingcastEvent | Gap | End;
/** What a pattern subscription yields. */
export type PatternItem = RingcastEvent | Gap | End | Joined;

/** Options of `subscribe`. */
export interface SubscribeOptions {
  /** Only these event types (default all). */
  types?: string[];
  /** Where to start (default `"live"`). */
  start?: StartOption;
  /** Ends the subscription when it fires. */
  signal?: AbortSignal;
}

/** Options of `subscribePattern`. */
export interface PatternOptions {
  /** Only these event types (default all). */
  types?: string[];
  /** `"live"` (default) or `"earliest"`, for the topics matching now. */
  start?: "live" | "earliest";
  /** Resume: every topic's position as `positions()` gave it. */
  positions?: TopicPosition[];
  /** Ends the subscription when it fires. */
  signal?: AbortSignal;
}

/** Options of `consume`. */
export interface ConsumeOptions {
  /** The consumer name (members of one name share their in-flight count). Default: a random one. */
  consumer?: string;
  /** Most unsettled deliveries held (0 = the group's `maxAckPending`). */
  maxInFlight?: number;
  /** Create the group when missing, with these settings (`true`: the defaults). */
  create?: Partial<GroupSettings> | true;
  /** Ends the membership (a clean leave) when it fires. */
  signal?: AbortSignal;
}

/** A consumer group's settings, with the SDK defaults. */
export interface GroupSettings {
  /** Where a new group starts (default `"earliest"`). */
  start: "earliest" | "live" | { afterOffset: number };
  /** How long a delivery may stay unsettled (default 30 s). */
  ackWaitMs: number;
  /** Deliveries per event before it is dead-lettered (default 5). */
  maxDeliver: number;
  /** Delay before redelivery after attempt n failed (default none). */
  backoffMs: number[];
  /** Most pending events over the group (default 1000). */
  maxAckPending: number;
  /** Where given-up events go (default `<topic>.dlq`). */
  deadLetterTopic: string | null;
}

/** The answer to a settle: how many offsets it applied to. */
export interface Settled {
  /** The action took effect. */
  applied: number;
  /** Done before: nothing to do. */
  alreadyDone: number;
  /** Never handed out, or not in flight now. */
  unknown: number;
}

/** A page of history. */
export interface HistoryPage {
  /** The events, oldest first. */
  events: RingcastEvent[];
  /** The `after` of the next page. */
  nextAfter: number;
  /** The oldest retained offset. */
  firstAvailable: number;
}

// ---------------------------------------------------------------------------
// Internals.

const DEFAULT_PORT = 7411;
const utf8 = new TextEncoder();

type Resolve = (m: ServerMessage) => void;
type Reject = (e: Error) => void;

interface Pending {
  msg: ClientMessage;
  /** The frame as encoded for payload codec `frameCodec` (re-encoded when a new connection negotiated another). */
  frame: Uint8Array;
  frameCodec: number;
  resolve: Resolve;
  reject: Reject;
  /** Sent again on the next connection when this one drops before the reply. */
  resend: boolean;
  /** Written on the current connection. */
  sent: boolean;
  /** When it times out (`performance.now()` ms; Infinity: never). */
  deadline: number;
  /** What `Timeout` says. */
  what: string;
}

/** Anything pushed messages are routed to: a subscription, a pattern subscription or a membership. */
interface Route {
  /** The subscription id on the wire now. */
  readonly id: number;
  /** Gives it a fresh wire id (resubscribing after a pause). */
  rewire(id: number): void;
  /** The request that (re)establishes it on a new connection. */
  resubscribe(requestId: number): ClientMessage;
  /** Its reply to that request arrived. */
  onEstablished(m: ServerMessage): void;
  push(m: ServerMessage): void;
  /** Ended from the client side: with an error, or `null` for a plain close. */
  fail(e: RingcastError | null): void;
  /** Items buffered, not yet read (bounds how much the client reads ahead). */
  load(): number;
}

function toBytes(p: PayloadInput): Uint8Array {
  if (p instanceof Uint8Array) return p;
  if (typeof p === "string") return utf8.encode(p);
  return utf8.encode(JSON.stringify(p));
}

function toHeaders(h: EventInput["headers"]): Headers {
  if (!h) return [];
  if (Array.isArray(h)) return h.map(([n, v]) => [n, v]);
  return Object.entries(h).map(([n, v]) => [n, v]);
}

function toStart(s: StartOption | undefined): Start {
  if (s === undefined || s === "live") return { type: "Live" };
  if (s === "earliest") return { type: "Earliest" };
  if ("afterOffset" in s) return { type: "AfterOffset", epoch: s.epoch, offset: s.afterOffset };
  const versions: [string, number][] = Array.isArray(s.afterVersions)
    ? s.afterVersions.map(([t, v]) => [t, v])
    : Object.entries(s.afterVersions);
  return { type: "AfterVersions", epoch: s.epoch, versions };
}

/** The SDK defaults of a group's settings (docs/protocol.md, `GroupOptions`). */
export const DEFAULT_GROUP_SETTINGS: GroupSettings = {
  start: "earliest",
  ackWaitMs: 30_000,
  maxDeliver: 5,
  backoffMs: [],
  maxAckPending: 1000,
  deadLetterTopic: null,
};

function toGroupOptions(s: Partial<GroupSettings> | true | undefined): GroupOptions {
  const o = { ...DEFAULT_GROUP_SETTINGS, ...(s === true || s === undefined ? {} : s) };
  let start: GroupStart;
  if (o.start === "earliest") start = { type: "Earliest" };
  else if (o.start === "live") start = { type: "Live" };
  else start = { type: "AfterOffset", offset: o.start.afterOffset };
  return {
    start,
    ackWaitMs: o.ackWaitMs,
    maxDeliver: o.maxDeliver,
    backoffMs: [...o.backoffMs],
    maxAckPending: o.maxAckPending,
    deadLetterTopic: o.deadLetterTopic,
  };
}

/** The `exp` of a JWT in ms, read without verifying (the broker verifies); null for an API key or no `exp`. */
export function jwtExpiryMs(credentials: string): number | null {
  const parts = credentials.split(".");
  if (parts.length !== 3 || !credentials.startsWith("eyJ")) return null;
  try {
    const claims = JSON.parse(Buffer.from(parts[1]!, "base64url").toString("utf8")) as { exp?: unknown };
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

function errorFrom(m: ServerMessage): RingcastError {
  if (m.type === "Error") return new RingcastError(m.code, m.message);
  if (m.type === "RetryLater") return new RingcastError(m.code, m.message, m.retryAfterMs);
  if (m.type === "PositionMismatch") return new PositionMismatchError(m.message, m.currentOffset, m.currentVersion);
  return new RingcastError("Internal", `unexpected reply ${m.type}`);
}

/** Codes after which reconnecting with the same credentials cannot help. */
const FINAL: ReadonlySet<string> = new Set(["Unauthorized", "Forbidden", "BadHello", "UnsupportedVersion", "TokenExpired"]);

/** A FIFO of items with one waiting reader, for the async iterators. */
class Inbox<T> {
  private items: T[] = [];
  private head = 0;
  private waiter: ((r: IteratorResult<T>) => void) | null = null;
  private failWaiter: ((e: Error) => void) | null = null;
  private readonly finishers: (() => void)[] = [];
  done = false;
  error: Error | null = null;

  get length(): number {
    return this.items.length - this.head;
  }

  put(item: T): void {
    if (this.done) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      this.failWaiter = null;
      w({ value: item, done: false });
      return;
    }
    this.items.push(item);
  }

  /** Runs `fn` once the inbox is finished (at once if it is). */
  onFinish(fn: () => void): void {
    if (this.done) fn();
    else this.finishers.push(fn);
  }

  finish(error: Error | null = null): void {
    if (this.done) return;
    this.done = true;
    this.error = error;
    for (const fn of this.finishers.splice(0)) fn();
    if (this.waiter) {
      const w = this.waiter;
      const f = this.failWaiter;
      this.waiter = null;
      this.failWaiter = null;
      if (error && f) f(error);
      else w({ value: undefined, done: true });
    }
  }

  next(): Promise<IteratorResult<T>> {
    if (this.head < this.items.length) {
      const value = this.items[this.head++]!;
      if (this.head > 1024 && this.head * 2 > this.items.length) {
        this.items = this.items.slice(this.head);
        this.head = 0;
      }
      return Promise.resolve({ value, done: false });
    }
    if (this.done) {
      if (this.error) {
        const e = this.error;
        this.error = null; // thrown once; then the iterator is done
        return Promise.reject(e);
      }
      return Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolve, reject) => {
      this.waiter = resolve;
      this.failWaiter = reject;
    });
  }
}

// ---------------------------------------------------------------------------
// Subscriptions.

/**
 * What the three kinds of subscription share: the id, the buffer of items
 * the connection fills and the caller's iteration drains, and closing.
 */
abstract class Feed<T> implements AsyncIterable<T>, Route {
  private wireId: number;
  protected readonly inbox = new Inbox<T>();
  protected closing = false;

  /** @internal */
  constructor(
    protected readonly client: Client,
    id: number,
  ) {
    this.wireId = id;
  }

  /** The subscription id on the wire now (a subscription paused for a slow reader comes back under a fresh one). */
  get id(): number {
    return this.wireId;
  }

  /** @internal */
  rewire(id: number): void {
    this.wireId = id;
  }

  /** @internal The request that (re)establishes it. */
  abstract resubscribe(requestId: number): ClientMessage;
  /** @internal Its reply arrived. */
  abstract onEstablished(m: ServerMessage): void;
  /** @internal A push for it arrived. */
  abstract push(m: ServerMessage): void;
  /** Ends it at the broker (unsubscribe, or leave the group). */
  protected abstract leave(): Promise<void>;
  /** Records that `item` reached the caller. */
  protected handedOver(_item: T): void {}

  /** Buffers an item for the caller; a buffer that reaches its bound pauses this subscription (see `Client.pause`). */
  protected deliver(item: T): void {
    this.inbox.put(item);
    if (this.load() >= this.client.maxBuffered) this.client.pause(this);
  }

  /** @internal */
  fail(e: RingcastError | null): void {
    this.inbox.finish(e);
  }

  /** @internal Runs `fn` once no more items come (end, close, failure). */
  onDone(fn: () => void): void {
    this.inbox.onFinish(fn);
  }

  /** @internal */
  load(): number {
    return this.inbox.length;
  }

  /** Items waiting to be read. */
  get buffered(): number {
    return this.inbox.length;
  }

  /** The next item; `done` after its end, `close()` or the client's close. */
  async next(): Promise<IteratorResult<T>> {
    const r = await this.inbox.next();
    this.client.drained(this);
    if (!r.done) this.handedOver(r.value);
    return r;
  }

  /** Ends it: no item comes after the ones already read. */
  async close(): Promise<void> {
    if (this.closing || this.inbox.done) return;
    this.closing = true;
    this.client.dropRoute(this.id);
    this.inbox.finish();
    await this.leave();
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return {
      next: () => this.next(),
      return: async () => {
        await this.close();
        return { value: undefined, done: true };
      },
    };
  }
}

/** A topic subscription: an async iterable of events, gaps and its end, resuming exactly across reconnects. */
export class Subscription extends Feed<SubscriptionItem> {
  /** The topic. */
  readonly topic: string;
  private readonly types: string[];
  private readonly resume: Resume;
  /** The position as of the last item `next()` returned (`resume` runs ahead of it by what is buffered). */
  private handed: { epoch: bigint; offset: number } | null;
  private established = false;

  /** @internal */
  constructor(client: Client, id: number, topic: string, types: string[], start: Start) {
    super(client, id);
    this.topic = topic;
    this.types = types;
    this.resume = new Resume(start);
    this.handed = this.resume.at;
  }

  /** The last `(epoch, offset)` handed over (or reported by a gap): resume from it with `{ afterOffset, epoch }`. */
  get position(): { epoch: bigint; offset: number } | null {
    return this.handed ? { ...this.handed } : null;
  }

  /** @internal */
  resubscribe(requestId: number): ClientMessage {
    return {
      type: "Subscribe",
      requestId,
      subscriptionId: this.id,
      topic: this.topic,
      types: this.types,
      start: this.resume.next(),
    };
  }

  /** @internal */
  onEstablished(m: ServerMessage): void {
    if (m.type !== "Subscribed") return;
    this.resume.onSubscribed(m.epoch, m.nextOffset);
    // The first `Subscribed` precedes every push: a `Live` start learns its position here.
    if (!this.established) this.handed = this.resume.at;
    this.established = true;
  }

  /** @internal */
  push(m: ServerMessage): void {
    if (this.closing) return;
    if (m.type === "Event") {
      if (this.resume.onEvent(m.event)) this.deliver(new RingcastEvent(m.event, this.resume.epoch ?? 0n));
    } else if (m.type === "Gap") {
      this.resume.onGap(m.gap);
      this.deliver({ kind: "gap", ...m.gap });
    } else if (m.type === "End") {
      this.deliver({ kind: "end", topic: m.topic, lastOffset: m.lastOffset });
      this.client.dropRoute(this.id);
      this.inbox.finish();
    }
  }

  protected override handedOver(item: SubscriptionItem): void {
    if (item.kind === "event" && item.epoch !== null) this.handed = { epoch: item.epoch, offset: item.offset };
    else if (item.kind === "gap" && item.eventType === null) this.handed = { epoch: item.epoch, offset: item.current };
  }

  /** Unsubscribes (waits for the broker's `Unsubscribed` while connected). */
  protected leave(): Promise<void> {
    return this.client.unsubscribeQuietly(this.id);
  }
}

/** A pattern subscription: every topic matching, now and later, each resuming exactly. */
export class PatternSubscription extends Feed<PatternItem> {
  /** The pattern. */
  readonly pattern: string;
  private readonly types: string[];
  private readonly start: Start;
  private readonly resume: PatternResume;
  /** The positions as of the last item `next()` returned (`resume` runs ahead of them by what is buffered). */
  private readonly handed: PatternResume;

  /** @internal */
  constructor(client: Client, id: number, pattern: string, types: string[], start: Start, positions: TopicPosition[] | undefined) {
    super(client, id);
    this.pattern = pattern;
    this.types = types;
    this.start = start;
    this.resume = new PatternResume(positions);
    this.handed = new PatternResume(positions);
  }

  /** Every topic's position now: keep them to resume with `positions` later. */
  positions(): TopicPosition[] {
    return [...this.handed.topics.values()].map((p) => ({ ...p }));
  }

  /** @internal */
  resubscribe(requestId: number): ClientMessage {
    return {
      type: "SubscribePattern",
      requestId,
      subscriptionId: this.id,
      pattern: this.pattern,
      types: this.types,
      start: this.start,
      positions: this.resume.next(),
    };
  }

  /** @internal */
  onEstablished(m: ServerMessage): void {
    if (m.type !== "PatternSubscribed") return;
    this.resume.onSubscribed(m.topics);
    // Topics listed that nothing handed over named yet start at the listed position.
    for (const p of m.topics) if (!this.handed.topics.has(p.topic)) this.handed.onJoined(p);
  }

  /** @internal */
  push(m: ServerMessage): void {
    if (this.closing) return;
    switch (m.type) {
      case "TopicJoined":
        this.resume.onJoined(m.position);
        this.deliver({ kind: "joined", position: m.position });
        break;
      case "Event": {
        if (this.resume.onEvent(m.event)) {
          const epoch = this.resume.topics.get(m.event.topic)?.epoch ?? 0n;
          this.deliver(new RingcastEvent(m.event, epoch));
        }
        break;
      }
      case "Gap":
        this.resume.onGap(m.gap);
        this.deliver({ kind: "gap", ...m.gap });
        break;
      case "End":
        this.resume.onEnd(m.topic, m.lastOffset);
        this.deliver({ kind: "end", topic: m.topic, lastOffset: m.lastOffset });
        break;
      case "SubscriptionEnded":
        this.client.dropRoute(this.id);
        this.inbox.finish(new RingcastError(m.code, m.message));
        break;
      default:
        break;
    }
  }

  protected override handedOver(item: PatternItem): void {
    if (item.kind === "joined") this.handed.onJoined(item.position);
    else if (item.kind === "gap") this.handed.onGap(item);
    else if (item.kind === "end") this.handed.onEnd(item.topic, item.lastOffset);
    else {
      const p = this.handed.topics.get(item.topic);
      if (p && item.offset > p.offset) p.offset = item.offset;
    }
  }

  /** Unsubscribes. */
  protected leave(): Promise<void> {
    return this.client.unsubscribeQuietly(this.id);
  }
}

/** One group delivery: settle it with `ack`, `nack`, `inProgress` or `term`. */
export class Delivery extends RingcastEvent {
  /** 1 for the first delivery to the group, one more per redelivery. */
  readonly attempt: number;

  /** @internal */
  constructor(
    private readonly consumer: Consumer,
    e: WireEvent,
    epoch: bigint,
    attempt: number,
  ) {
    super(e, epoch);
    this.attempt = attempt;
  }

  /** Done: never delivered again. */
  ack(): Promise<Settled> {
    return this.consumer.settle([this.offset], { type: "Ack" });
  }

  /** Failed: redeliver after `delayMs` (default: the group's backoff). */
  nack(delayMs?: number): Promise<Settled> {
    return this.consumer.settle([this.offset], { type: "Nack", delayMs: delayMs ?? null });
  }

  /** Still working: the deadline moves to now + `ackWait`. */
  inProgress(): Promise<Settled> {
    return this.consumer.settle([this.offset], { type: "InProgress" });
  }

  /** Give up now: dead-letter it with this reason. */
  term(reason = ""): Promise<Settled> {
    return this.consumer.settle([this.offset], { type: "Term", reason });
  }
}

/** What a membership yields: deliveries, gaps (work lost to retention) and its end (group deleted). */
export type ConsumerItem = Delivery | Gap | End;

/** A consumer-group membership: an async iterable of deliveries, joined again after a reconnect. */
export class Consumer extends Feed<ConsumerItem> {
  /** The topic. */
  readonly topic: string;
  /** The group. */
  readonly group: string;
  /** The consumer name. */
  readonly consumer: string;
  private epoch = 0n;

  /** @internal */
  constructor(
    client: Client,
    id: number,
    topic: string,
    group: string,
    consumer: string,
    private readonly maxInFlight: number,
    private readonly create: GroupOptions | null,
  ) {
    super(client, id);
    this.topic = topic;
    this.group = group;
    this.consumer = consumer;
  }

  /** @internal */
  resubscribe(requestId: number): ClientMessage {
    return {
      type: "JoinGroup",
      requestId,
      subscriptionId: this.id,
      topic: this.topic,
      group: this.group,
      consumer: this.consumer,
      maxInFlight: this.maxInFlight,
      create: this.create,
    };
  }

  /** @internal */
  onEstablished(m: ServerMessage): void {
    if (m.type === "Joined") this.epoch = m.epoch;
  }

  /** @internal */
  push(m: ServerMessage): void {
    if (this.closing) return;
    if (m.type === "Delivery") {
      this.deliver(new Delivery(this, m.event, this.epoch, m.attempt));
    } else if (m.type === "Gap") {
      this.deliver({ kind: "gap", ...m.gap });
    } else if (m.type === "End") {
      this.deliver({ kind: "end", topic: m.topic, lastOffset: m.lastOffset });
      this.client.dropRoute(this.id);
      this.inbox.finish();
    }
  }

  /** @internal */
  override load(): number {
    return 0; // the broker pushes at most max_in_flight unsettled deliveries
  }

  /** Settles offsets of this group (any member's). */
  async settle(offsets: number[], action: SettleAction): Promise<Settled> {
    const m = await this.client.request(
      (requestId) => ({ type: "Settle", requestId, subscriptionId: this.id, offsets, action }),
      "Settled",
      action.type !== "Nack",
    );
    return { applied: m.applied, alreadyDone: m.alreadyDone, unknown: m.unknown };
  }

  /** Leaves the group cleanly (`close()`): what this consumer holds is handed out again at once. */
  protected async leave(): Promise<void> {
    try {
      await this.client.request((requestId) => ({ type: "LeaveGroup", requestId, subscriptionId: this.id }), "Unsubscribed");
    } catch {
      // Gone with the connection: the broker ends the membership itself.
    }
  }
}

// ---------------------------------------------------------------------------
// The client.

/** A connection to one ringcast broker over TCP. Create it with `Client.connect`. */
export class Client {
  private readonly host: string;
  private readonly port: number;
  private readonly opts: ClientOptions;
  /** @internal */
  readonly maxBuffered: number;
  private socket: net.Socket | null = null;
  private decoder = new FrameDecoder(DEFAULT_MAX_FRAME);
  private ready = false;
  private closed = false;
  private closeError: RingcastError | null = null;
  private nextRequestId = 1;
  private nextSubscriptionId = 1;
  private readonly pending = new Map<number, Pending>();
  /** Establishing requests of routes in flight on this connection, by request id. */
  private readonly establishing = new Map<number, Route>();
  private readonly routes = new Map<number, Route>();
  private info: ServerInfo | null = null;
  private credentials: string | undefined;
  private lastSent = 0;
  private lastReceived = 0;
  private heartbeat: NodeJS.Timeout | undefined;
  private refreshTimer: NodeJS.Timeout | undefined;
  /** Subscriptions paused for a slow reader (see `pause`). */
  private readonly paused = new Set<Route>();
  /** The payload codec in force on the current connection (0: none) and its threshold. */
  private codec = CODEC_NONE;
  private codecMinSize = 0;
  /** Frames written in this tick, flushed as one socket write. */
  private outbox: Uint8Array[] = [];
  private outboxBytes = 0;
  private sweep: NodeJS.Timeout | undefined;
  private reconnecting: Promise<void> | null = null;
  private readonly sleepers = new Set<() => void>();
  private readonly abortListener = () => this.shutdown(new RingcastError("Aborted", "the client's signal was aborted"));

  private constructor(opts: ClientOptions) {
    this.opts = opts;
    this.host = opts.host ?? "127.0.0.1";
    this.port = opts.port ?? DEFAULT_PORT;
    this.maxBuffered = opts.maxBufferedEvents ?? 10_000;
    this.credentials = opts.credentials;
  }

  /**
   * Connects and handshakes; rejects if the first connection fails (later
   * losses reconnect by themselves). `address` is `host:port` or options.
   */
  static async connect(address: string | ClientOptions, options: ClientOptions = {}): Promise<Client> {
    let opts: ClientOptions;
    if (typeof address === "string") {
      const i = address.lastIndexOf(":");
      const host = i > 0 ? address.slice(0, i).replace(/^\[|\]$/g, "") : address;
      const port = i > 0 ? Number(address.slice(i + 1)) : DEFAULT_PORT;
      opts = { ...options, host, port };
    } else {
      opts = address;
    }
    const client = new Client(opts);
    if (opts.signal?.aborted) throw new RingcastError("Aborted", "the client's signal was aborted");
    opts.signal?.addEventListener("abort", client.abortListener, { once: true });
    try {
      await client.establish();
    } catch (e) {
      client.shutdown(e instanceof RingcastError ? e : new RingcastError("ConnectFailed", String(e)));
      throw e;
    }
    return client;
  }

  /** What the broker announced on the current (or last) connection. */
  get serverInfo(): ServerInfo {
    if (!this.info) throw new RingcastError("Closed", "not connected yet");
    return { ...this.info };
  }

  /** Whether a connection is up and handshaken now. */
  get connected(): boolean {
    return this.ready;
  }

  // -- Publishing ----------------------------------------------------------

  /**
   * Publishes one event and resolves with its ack once the broker stored it.
   * Calls made one after another are appended in call order (pipelined),
   * across reconnects too: each is an `Append` with an idempotency key,
   * sent again after a reconnect and stored once.
   */
  async publish(
    topic: string,
    type: string,
    payload: PayloadInput,
    options: { headers?: EventInput["headers"]; idempotencyKey?: string } = {},
  ): Promise<PublishAck> {
    const acks = await this.append(topic, [{ type, payload, ...options }]);
    return acks[0]!;
  }

  /** Publishes several events atomically (all or none, contiguous offsets), in order; one ack per event. */
  publishBatch(topic: string, events: EventInput[]): Promise<PublishAck[]> {
    return this.append(topic, events);
  }

  /**
   * Appends events atomically, only where the expectations hold:
   * `expectedOffset` (the topic's last offset, 0 = empty) and
   * `expectedVersion` (the batch's one type's last version). Otherwise
   * nothing is stored and it rejects with `PositionMismatchError`.
   */
  async append(
    topic: string,
    events: EventInput[],
    expect: { expectedOffset?: number; expectedVersion?: number } = {},
  ): Promise<PublishAck[]> {
    if (events.length === 0) return [];
    const wire = events.map((e) => ({
      eventType: e.type,
      headers: toHeaders(e.headers),
      payload: toBytes(e.payload),
      idempotencyKey: e.idempotencyKey ?? randomUUID(),
    }));
    const m = await this.request(
      (requestId) => ({
        type: "Append",
        requestId,
        topic,
        events: wire,
        expectedOffset: expect.expectedOffset ?? null,
        expectedVersion: expect.expectedVersion ?? null,
      }),
      "Appended",
      true,
    );
    return m.results.map((a: AppendAck) => ({ epoch: a.epoch, offset: a.offset, version: a.version, duplicate: a.duplicate }));
  }

  // -- Subscribing ---------------------------------------------------------

  /** Subscribes to a topic (created when missing, if the broker auto-creates). Resolves once the broker confirmed it. */
  async subscribe(topic: string, options: SubscribeOptions = {}): Promise<Subscription> {
    const sub = new Subscription(this, this.nextSubscriptionId++, topic, options.types ?? [], toStart(options.start));
    await this.establishRoute(sub, options.signal);
    return sub;
  }

  /** Subscribes to every topic matching `pattern` (`*`, `?`), now and later. */
  async subscribePattern(pattern: string, options: PatternOptions = {}): Promise<PatternSubscription> {
    const start: Start = options.start === "earliest" ? { type: "Earliest" } : { type: "Live" };
    const sub = new PatternSubscription(this, this.nextSubscriptionId++, pattern, options.types ?? [], start, options.positions);
    await this.establishRoute(sub, options.signal);
    return sub;
  }

  /** Joins a consumer group as `consumer` and yields its deliveries. */
  async consume(topic: string, group: string, options: ConsumeOptions = {}): Promise<Consumer> {
    const create = options.create === undefined ? null : toGroupOptions(options.create);
    const c = new Consumer(
      this,
      this.nextSubscriptionId++,
      topic,
      group,
      options.consumer ?? `c-${randomUUID().slice(0, 8)}`,
      options.maxInFlight ?? 0,
      create,
    );
    await this.establishRoute(c, options.signal);
    return c;
  }

  private async establishRoute<T>(route: Feed<T>, signal: AbortSignal | undefined): Promise<void> {
    if (signal?.aborted) throw new RingcastError("Aborted", "the signal was aborted");
    // The route is registered when its reply is dispatched (see `dispatch`),
    // so pushes right behind the reply in the same read reach it.
    await this.request((requestId) => {
      const msg = route.resubscribe(requestId);
      this.establishing.set(requestId, route);
      return msg;
    }, undefined);
    if (signal?.aborted) {
      // Aborted while the request was in flight: the listener below would never fire.
      await route.close();
      throw new RingcastError("Aborted", "the signal was aborted");
    }
    if (signal) {
      const onAbort = () => void route.close();
      signal.addEventListener("abort", onAbort, { once: true });
      // A long-lived signal must not keep every ended subscription alive.
      route.onDone(() => signal.removeEventListener("abort", onAbort));
    }
  }

  // -- Requests -------------------------------------------------------------

  /** Reads a page of retained events after `after` (0 = from the oldest). */
  async history(topic: string, options: { after?: number; types?: string[]; limit?: number } = {}): Promise<HistoryPage> {
    const m = await this.request(
      (requestId) => ({
        type: "History",
        requestId,
        topic,
        after: options.after ?? 0,
        types: options.types ?? [],
        limit: options.limit ?? 1000,
      }),
      "History",
    );
    return { events: m.events.map((e) => new RingcastEvent(e, null)), nextAfter: m.nextAfter, firstAvailable: m.firstAvailable };
  }

  /** Lists the topics (those the credentials may see). */
  async topics(): Promise<TopicSummary[]> {
    return (await this.request((requestId) => ({ type: "ListTopics", requestId }), "Topics")).topics;
  }

  /** A topic's state. */
  async topicInfo(topic: string): Promise<WireTopicInfo> {
    return (await this.request((requestId) => ({ type: "TopicInfo", requestId, topic }), "TopicInfo")).info;
  }

  /** Seals a topic: publishes are refused, subscribers get `end` after its last event. */
  async seal(topic: string): Promise<void> {
    await this.request((requestId) => ({ type: "Seal", requestId, topic }), "Ok");
  }

  /** Deletes a topic; re-creating it starts a new epoch. */
  async delete(topic: string): Promise<void> {
    await this.request((requestId) => ({ type: "Delete", requestId, topic }), "Ok");
  }

  /** Round trip time in ms. */
  async ping(): Promise<number> {
    const t = performance.now();
    await this.request((requestId) => ({ type: "Ping", requestId }), "Pong");
    return performance.now() - t;
  }

  /** Replaces the connection's credentials (same subject); resolves with the session's new end (ms since the epoch; 0 = never). */
  async refresh(credentials: string): Promise<number> {
    const m = await this.request((requestId) => ({ type: "Refresh", requestId, credentials }), "Refreshed");
    this.credentials = credentials;
    return m.expiresAtMs;
  }

  /** Creates a consumer group (idempotent; `update` replaces the settings but `start`). */
  async createGroup(topic: string, group: string, settings: Partial<GroupSettings> = {}, update = false): Promise<WireGroupInfo> {
    const options = toGroupOptions(settings);
    return (await this.request((requestId) => ({ type: "CreateGroup", requestId, topic, group, options, update }), "GroupInfo")).info;
  }

  /** A group's state. */
  async groupInfo(topic: string, group: string): Promise<WireGroupInfo> {
    return (await this.request((requestId) => ({ type: "GroupInfo", requestId, topic, group }), "GroupInfo")).info;
  }

  /** A topic's groups, by name. */
  async groups(topic: string): Promise<WireGroupInfo[]> {
    return (await this.request((requestId) => ({ type: "ListGroups", requestId, topic }), "Groups")).groups;
  }

  /** Deletes a group and its pending work. */
  async deleteGroup(topic: string, group: string): Promise<void> {
    await this.request((requestId) => ({ type: "DeleteGroup", requestId, topic, group }), "Ok");
  }

  /** Publishes the group's dead letters back to its topic; resolves with how many. */
  async redrive(topic: string, group: string): Promise<number> {
    return (await this.request((requestId) => ({ type: "Redrive", requestId, topic, group }), "Redriven")).count;
  }

  /** Every live connection of the broker (admin), all pages. */
  async connections(): Promise<WireConnection[]> {
    const all: WireConnection[] = [];
    let after = 0;
    for (;;) {
      const m = await this.request((requestId) => ({ type: "ListConnections", requestId, after, limit: 0 }), "Connections");
      all.push(...m.connections);
      if (m.nextAfter === 0) return all;
      after = m.nextAfter;
    }
  }

  /** Closes a broker connection as at a shutdown (admin); its client resumes elsewhere. */
  async closeConnection(connectionId: number): Promise<void> {
    await this.request((requestId) => ({ type: "CloseConnection", requestId, connectionId }), "Ok");
  }

  /** Closes the client: every subscription ends, requests in flight fail with `Closed`. */
  async close(): Promise<void> {
    this.shutdown(new RingcastError("Closed", "the client was closed"));
  }

  // -- Internals -------------------------------------------------------------

  /**
   * Sends a request and resolves with its reply of kind `expect` (any
   * non-error reply when undefined). `resend`: sent again on the next
   * connection if this one drops before the reply.
   * @internal
   */
  request<K extends ServerMessage["type"]>(
    build: (requestId: number) => ClientMessage,
    expect: K | undefined,
    resend = false,
  ): Promise<ServerMessageOf<K>> {
    if (this.closed) return Promise.reject(this.closeError ?? new RingcastError("Closed", "the client is closed"));
    const requestId = this.nextRequestId++;
    const msg = build(requestId);
    let frame: Uint8Array;
    const frameCodec = this.codec;
    try {
      frame = this.encode(msg, frameCodec);
    } catch (e) {
      this.establishing.delete(requestId);
      return Promise.reject(
        e instanceof RingcastError ? e : new RingcastError("InvalidRequest", e instanceof Error ? e.message : String(e)),
      );
    }
    return new Promise<ServerMessageOf<K>>((resolve, reject) => {
      const p: Pending = {
        msg,
        frame,
        frameCodec,
        resolve: (m) => {
          const failed = expect !== undefined ? m.type !== expect : m.type === "Error" || m.type === "RetryLater";
          if (failed) reject(errorFrom(m));
          else resolve(m as ServerMessageOf<K>);
        },
        reject,
        resend,
        sent: false,
        deadline: Infinity,
        what: msg.type,
      };
      const timeout = this.opts.requestTimeoutMs ?? 30_000;
      if (timeout > 0) {
        p.deadline = performance.now() + timeout;
        this.armSweep(timeout);
      }
      this.pending.set(requestId, p);
      if (this.ready) this.write(p);
    });
  }

  /** Encodes a request, marking its payloads for payload codec `codec` (0: none). */
  private encode(msg: ClientMessage, codec: number): Uint8Array {
    let wire = msg;
    if (codec !== CODEC_NONE) {
      const mark = <E extends { payload: Uint8Array }>(e: E): E => ({ ...e, payload: markPayload(e.payload, codec, this.codecMinSize) });
      if (msg.type === "Publish") wire = mark(msg);
      else if (msg.type === "PublishBatch" || msg.type === "Append") wire = { ...msg, events: msg.events.map(mark) } as typeof msg;
    }
    return encodeClientFrame(wire, this.info?.maxFrame ?? DEFAULT_MAX_FRAME);
  }

  private write(p: Pending): void {
    const s = this.socket;
    if (!s) return;
    if (p.frameCodec !== this.codec) {
      try {
        p.frame = this.encode(p.msg, this.codec);
        p.frameCodec = this.codec;
      } catch (e) {
        this.pending.delete([...this.pending].find(([, q]) => q === p)?.[0] ?? -1);
        p.reject(new RingcastError("InvalidRequest", e instanceof Error ? e.message : String(e)));
        return;
      }
    }
    p.sent = true;
    // One socket write per tick for everything written in it: pipelined
    // requests cost one syscall, not one each.
    this.outbox.push(p.frame);
    this.outboxBytes += p.frame.length;
    if (this.outbox.length === 1) process.nextTick(() => this.flush(s));
  }

  private flush(s: net.Socket): void {
    const chunks = this.outbox;
    const bytes = this.outboxBytes;
    this.outbox = [];
    this.outboxBytes = 0;
    if (s !== this.socket || chunks.length === 0) return; // dropped with its connection
    s.write(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, bytes));
    this.lastSent = Date.now();
  }

  /** Makes sure the deadline sweep runs (one timer for every request, not one each). */
  private armSweep(timeout: number): void {
    if (this.sweep) return;
    const every = Math.max(10, Math.min(1000, Math.floor(timeout / 4)));
    this.sweep = setInterval(() => {
      const now = performance.now();
      for (const [id, p] of this.pending) {
        if (p.deadline > now) continue;
        this.pending.delete(id);
        this.establishing.delete(id);
        p.reject(new RingcastError("Timeout", `no reply to ${p.what} within ${this.opts.requestTimeoutMs ?? 30_000} ms`));
      }
      if (this.pending.size === 0) {
        clearInterval(this.sweep);
        this.sweep = undefined;
      }
    }, every);
    this.sweep.unref();
  }

  /** @internal Forgets a route (no more pushes). */
  dropRoute(id: number): void {
    this.routes.delete(id);
    for (const r of this.paused) if (r.id === id) this.paused.delete(r);
    // A (re)subscribe of it in flight must not register it again when its reply comes.
    for (const [requestId, route] of this.establishing) if (route.id === id) this.establishing.delete(requestId);
  }

  /** @internal Unsubscribes an id, ignoring failures (the connection may be gone). */
  async unsubscribeQuietly(id: number): Promise<void> {
    if (!this.ready) return;
    try {
      await this.request((requestId) => ({ type: "Unsubscribe", requestId, subscriptionId: id }), "Unsubscribed");
    } catch {
      // Closed or lost: a new connection does not subscribe it again.
    }
  }

  /**
   * @internal Pauses a subscription whose reader fell `maxBufferedEvents` behind:
   * unsubscribes it at the broker and drops what still arrives for it, so
   * neither side buffers more and the connection's other subscriptions and
   * replies go on. Its resume state counts only what reached its buffer.
   */
  pause(route: Route): void {
    if (this.routes.get(route.id) !== route) return; // paused already, or over
    this.routes.delete(route.id);
    this.paused.add(route);
    void this.unsubscribeQuietly(route.id);
  }

  /**
   * @internal A reader took an item: a paused subscription drained to half
   * its buffer subscribes again, under a fresh wire id, from where its
   * buffer ends — the broker replays what it retains and reports the rest
   * as a gap. Registered at once, so a reconnect meanwhile subscribes it too.
   */
  drained(route: Route): void {
    if (!this.paused.has(route) || route.load() > this.maxBuffered / 2) return;
    this.paused.delete(route);
    route.rewire(this.nextSubscriptionId++);
    this.routes.set(route.id, route);
    if (!this.ready) return; // the next connection subscribes it with the others
    this.request((requestId) => {
      this.establishing.set(requestId, route);
      return route.resubscribe(requestId);
    }, undefined).catch((e: unknown) => {
      if (e instanceof RingcastError && (e.code === "ConnectionLost" || e.code === "Closed")) return; // resubscribed on reconnect, or over
      if (this.routes.get(route.id) === route) this.routes.delete(route.id);
      route.fail(e instanceof RingcastError ? e : new RingcastError("Internal", String(e)));
    });
  }

  /** Connects, handshakes and re-establishes everything; rejects on failure. */
  private async establish(): Promise<void> {
    const credentials = this.opts.tokenProvider ? await this.opts.tokenProvider() : this.credentials;
    this.credentials = credentials;
    const socket = await this.openSocket();
    const decoder = new FrameDecoder(64 * 1024);
    const welcome = await this.handshake(socket, decoder, credentials);
    if (this.closed) {
      socket.destroy();
      throw this.closeError ?? new RingcastError("Closed", "the client was closed");
    }
    this.info = {
      serverVersion: welcome.serverVersion,
      protocolVersion: welcome.protocolVersion,
      maxFrame: welcome.maxFrame,
      maxPayload: welcome.maxPayload,
      maxSubscriptions: welcome.maxSubscriptions,
      heartbeatMs: welcome.heartbeatMs,
    };
    // The broker keeps pages within its max_frame, but a topic list is one frame.
    decoder.maxFrame = Math.max(welcome.maxFrame, DEFAULT_MAX_FRAME);
    this.codec = welcome.type === "WelcomeExt" ? welcome.compression.codec : CODEC_NONE;
    this.codecMinSize = welcome.type === "WelcomeExt" ? welcome.compression.minSize : 0;
    this.socket = socket;
    this.decoder = decoder;
    this.lastReceived = this.lastSent = Date.now();
    socket.on("data", (chunk: Buffer) => this.onData(socket, chunk));
    socket.on("close", () => this.onClose(socket));
    socket.on("error", () => undefined); // "close" follows
    this.ready = true;
    // Re-establish every route under its id, then send what waited, in request order.
    for (const route of this.routes.values()) {
      const requestId = this.nextRequestId++;
      this.establishing.set(requestId, route);
      const msg = route.resubscribe(requestId);
      const p: Pending = {
        msg,
        frame: encodeClientFrame(msg),
        frameCodec: this.codec,
        resolve: (m) => {
          if (m.type === "Error" || m.type === "RetryLater") {
            this.routes.delete(route.id);
            route.fail(errorFrom(m));
          }
        },
        reject: () => undefined,
        resend: false,
        sent: false,
        deadline: Infinity,
        what: msg.type,
      };
      this.pending.set(requestId, p);
      this.write(p);
    }
    const waiting = [...this.pending.entries()].filter(([, p]) => !p.sent).sort(([a], [b]) => a - b);
    for (const [, p] of waiting) this.write(p);
    this.startHeartbeat();
    this.scheduleRefresh();
  }

  private openSocket(): Promise<net.Socket> {
    const timeout = this.opts.connectTimeoutMs ?? 10_000;
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: this.host, port: this.port, noDelay: true });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new RingcastError("ConnectFailed", `connecting to ${this.host}:${this.port} timed out`));
      }, timeout);
      s.once("connect", () => {
        clearTimeout(timer);
        s.removeAllListeners("error");
        resolve(s);
      });
      s.once("error", (e) => {
        clearTimeout(timer);
        reject(new RingcastError("ConnectFailed", `cannot connect to ${this.host}:${this.port}: ${e.message}`));
      });
    });
  }

  private handshake(
    socket: net.Socket,
    decoder: FrameDecoder,
    credentials: string | undefined,
  ): Promise<ServerMessageOf<"Welcome"> | ServerMessageOf<"WelcomeExt">> {
    const timeout = this.opts.connectTimeoutMs ?? 10_000;
    return new Promise((resolve, reject) => {
      const done = (err: Error | null, w?: ServerMessageOf<"Welcome"> | ServerMessageOf<"WelcomeExt">) => {
        clearTimeout(timer);
        socket.removeListener("data", onData);
        socket.removeListener("close", onClose);
        socket.removeListener("error", onClose);
        if (err) {
          socket.destroy();
          reject(err);
        } else {
          resolve(w!);
        }
      };
      const timer = setTimeout(() => done(new RingcastError("ConnectFailed", "no Welcome within the connect timeout")), timeout);
      const onClose = () => done(new RingcastError("ConnectFailed", "the broker closed the connection before Welcome"));
      const onData = (chunk: Buffer) => {
        let bodies: Uint8Array[];
        try {
          bodies = decoder.push(chunk);
        } catch (e) {
          done(new RingcastError("ConnectFailed", `bad handshake frame: ${(e as Error).message}`));
          return;
        }
        if (bodies.length === 0) return;
        if (bodies.length > 1) {
          // Nothing but the Welcome comes before our first request.
          done(new RingcastError("ConnectFailed", "unexpected frames after the handshake reply"));
          return;
        }
        let m: ServerMessage;
        try {
          m = decodeServerBody(bodies[0]!);
        } catch (e) {
          done(new RingcastError("ConnectFailed", `bad handshake frame: ${(e as Error).message}`));
          return;
        }
        if (m.type === "Welcome" || m.type === "WelcomeExt") done(null, m);
        else if (m.type === "Error" || m.type === "RetryLater") done(errorFrom(m));
        else done(new RingcastError("ConnectFailed", `expected Welcome, got ${m.type}`));
      };
      socket.on("data", onData);
      socket.once("close", onClose);
      socket.once("error", onClose);
      const hello = {
        protocolVersion: PROTOCOL_VERSION,
        clientName: this.opts.clientName ?? "ringcast-ts",
        credentials: credentials ?? null,
      };
      socket.write(
        encodeClientFrame(
          this.opts.compression === "lz4"
            ? {
                type: "HelloExt",
                ...hello,
                compression: { codecs: [CODEC_LZ4], minSize: this.opts.compressionMinSize ?? 1024 },
              }
            : { type: "Hello", ...hello },
        ),
      );
    });
  }

  /** Replaces the marked payloads of a server message by their plain bytes. */
  private unmark(m: ServerMessage): void {
    const max = this.info?.maxPayload ?? DEFAULT_MAX_FRAME;
    if (m.type === "Event" || m.type === "Delivery") m.event.payload = unmarkPayload(m.event.payload, max);
    else if (m.type === "History") for (const e of m.events) e.payload = unmarkPayload(e.payload, max);
  }

  private onData(socket: net.Socket, chunk: Buffer): void {
    if (socket !== this.socket) return;
    this.lastReceived = Date.now();
    let bodies: Uint8Array[];
    try {
      bodies = this.decoder.push(chunk);
    } catch {
      socket.destroy(); // undecodable stream: reconnect
      return;
    }
    for (const body of bodies) {
      let m: ServerMessage;
      try {
        m = decodeServerBody(body);
        if (this.codec !== CODEC_NONE) this.unmark(m);
      } catch {
        socket.destroy(); // undecodable (or a payload that cannot be read): reconnect
        return;
      }
      this.dispatch(m);
      if (socket !== this.socket) return;
    }
  }

  private dispatch(m: ServerMessage): void {
    switch (m.type) {
      case "Event":
      case "Gap":
      case "End":
      case "Delivery":
      case "TopicJoined":
      case "SubscriptionEnded":
        this.routes.get(m.subscriptionId)?.push(m);
        return;
      case "Heartbeat":
        return;
      case "Shutdown":
        return; // the broker closes next; we reconnect
      case "Unsubscribed": {
        // An Unsubscribed carrying a Refresh's id ends a subscription the new grants do not cover.
        const p = this.pending.get(m.requestId);
        if (p && p.msg.type === "Refresh") {
          const route = this.routes.get(m.subscriptionId);
          this.routes.delete(m.subscriptionId);
          route?.fail(new RingcastError("Forbidden", "refreshed credentials no longer cover this subscription"));
          return;
        }
        break;
      }
      case "Error":
      case "RetryLater":
        if (m.requestId === null) {
          // Connection-level: the broker closes next.
          const e = errorFrom(m);
          if (FINAL.has(m.code) && !(m.code === "TokenExpired" && this.opts.tokenProvider)) {
            this.shutdown(e);
          }
          return;
        }
        break;
      default:
        break;
    }
    const requestId = (m as { requestId?: number | null }).requestId;
    if (typeof requestId !== "number") return;
    const route = this.establishing.get(requestId);
    if (route) {
      this.establishing.delete(requestId);
      if (m.type !== "Error" && m.type !== "RetryLater") {
        this.routes.set(route.id, route);
        route.onEstablished(m);
      }
    }
    const p = this.pending.get(requestId);
    if (!p) return;
    this.pending.delete(requestId);
    p.resolve(m);
  }

  private onClose(socket: net.Socket): void {
    if (socket !== this.socket) return;
    this.socket = null;
    this.ready = false;
    this.stopTimers();
    for (const [id, p] of this.pending) {
      if (!p.sent) continue;
      if (p.resend) {
        p.sent = false;
      } else {
        this.pending.delete(id);
        this.establishing.delete(id);
        p.reject(new RingcastError("ConnectionLost", `the connection dropped before the reply to ${p.msg.type}`));
      }
    }
    if (this.closed) return;
    if (this.opts.reconnect === false) {
      this.shutdown(new RingcastError("ConnectionLost", "the connection dropped (reconnect is off)"));
      return;
    }
    this.reconnecting ??= this.reconnectLoop().finally(() => {
      this.reconnecting = null;
    });
  }

  private async reconnectLoop(): Promise<void> {
    const r = this.opts.reconnect === false ? {} : (this.opts.reconnect ?? {});
    const base = r.baseDelayMs ?? 100;
    const max = r.maxDelayMs ?? 10_000;
    for (let attempt = 0; !this.closed; attempt++) {
      const cap = Math.min(max, base * 2 ** Math.min(attempt, 30));
      await this.sleep(Math.random() * cap); // full jitter
      if (this.closed) return;
      try {
        await this.establish();
        return;
      } catch (e) {
        if (!(e instanceof RingcastError)) continue;
        if (FINAL.has(e.code) && !(e.code === "TokenExpired" && this.opts.tokenProvider)) {
          this.shutdown(e);
          return;
        }
        if (e.retryAfterMs) await this.sleep(e.retryAfterMs);
      }
    }
  }

  /** Waits `ms`, or less if the client closes meanwhile. */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.sleepers.delete(wake);
        resolve();
      }, ms);
      const wake = () => {
        clearTimeout(t);
        resolve();
      };
      this.sleepers.add(wake);
    });
  }

  private startHeartbeat(): void {
    const hb = this.info?.heartbeatMs ?? 0;
    if (hb === 0) return;
    this.heartbeat = setInterval(() => {
      const now = Date.now();
      const s = this.socket;
      if (!s) return;
      if (now - this.lastReceived > 3 * hb) {
        s.destroy(); // dead peer
        return;
      }
      if (now - this.lastSent >= hb) {
        const requestId = this.nextRequestId++;
        s.write(encodeClientFrame({ type: "Ping", requestId }));
        this.lastSent = now;
      }
    }, Math.max(50, Math.floor(hb / 3)));
    this.heartbeat.unref();
  }

  private scheduleRefresh(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (!this.opts.tokenProvider || this.opts.proactiveRefresh === false || !this.credentials) return;
    const exp = jwtExpiryMs(this.credentials);
    if (exp === null) return;
    const lifetime = exp - Date.now();
    // Refresh at 80% of the remaining life, at least 1 s before expiry.
    const at = Math.max(0, Math.min(lifetime * 0.8, lifetime - 1000));
    this.refreshTimer = setTimeout(() => void this.refreshNow(), at);
    this.refreshTimer.unref();
  }

  private async refreshNow(): Promise<void> {
    if (!this.opts.tokenProvider || !this.ready) return;
    try {
      const token = await this.opts.tokenProvider();
      await this.refresh(token);
    } catch {
      // Keep the session; if it expires, the broker closes it and we reconnect with a fresh token.
    }
    if (this.ready) this.scheduleRefresh();
  }

  private stopTimers(): void {
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.heartbeat = undefined;
    this.refreshTimer = undefined;
  }

  /** Ends the client for good with `error`. */
  private shutdown(error: RingcastError): void {
    if (this.closed) return;
    this.closed = true;
    this.closeError = error;
    this.ready = false;
    this.stopTimers();
    this.opts.signal?.removeEventListener("abort", this.abortListener);
    const s = this.socket;
    this.socket = null;
    s?.destroy();
    for (const p of this.pending.values()) p.reject(error);
    if (this.sweep) clearInterval(this.sweep);
    this.sweep = undefined;
    this.pending.clear();
    this.establishing.clear();
    for (const wake of this.sleepers) wake();
    this.sleepers.clear();
    const routes = [...this.routes.values(), ...this.paused];
    this.routes.clear();
    this.paused.clear();
    for (const r of routes) r.fail(error.code === "Closed" ? null : error);
  }
}

