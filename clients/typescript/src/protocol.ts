/**
 * The ringcast TCP wire format (docs/protocol.md, version 5): every message
 * kind as a schema, an encoder and a decoder driven by it, and a frame
 * splitter. No I/O; the client in `client.ts` is built on it.
 *
 * Values: `u8`/`u16`/`u32`/`u64` are `number` (a `u64` above 2^53 − 1 is
 * refused: offsets, versions and ids never get there), except epochs, which
 * are random 64-bit values and therefore `bigint`. Options are `T | null`,
 * bytes are `Uint8Array`, enums with fields are `{ type: "Variant", ... }`
 * and enums without any are the variant's name.
 */

/** The protocol version this package speaks. */
export const PROTOCOL_VERSION = 5;

/** The default largest frame body accepted before the server's `Welcome` says otherwise. */
export const DEFAULT_MAX_FRAME = 16 * 1024 * 1024;

/** A wire type of the schema. */
export type Ty =
  | "u8"
  | "u16"
  | "u32"
  | "u64"
  | "epoch"
  | "bool"
  | "string"
  | "bytes"
  | readonly ["list", Ty]
  | readonly ["option", Ty]
  | readonly ["tuple", Ty, Ty]
  | readonly ["struct", string]
  | readonly ["enum", string];

type Field = readonly [string, Ty];
type FieldList = readonly Field[];

const list = <T extends Ty>(t: T) => ["list", t] as const;
const opt = <T extends Ty>(t: T) => ["option", t] as const;
const HEADERS = list(["tuple", "string", "string"] as const);
const VERSIONS = list(["tuple", "string", "u64"] as const);

/** Every struct of the protocol, its fields in wire order. */
export const STRUCTS = {
  NewEvent: [
    ["eventType", "string"],
    ["headers", HEADERS],
    ["payload", "bytes"],
  ],
  AppendEvent: [
    ["eventType", "string"],
    ["headers", HEADERS],
    ["payload", "bytes"],
    ["idempotencyKey", opt("string")],
  ],
  Ack: [
    ["epoch", "epoch"],
    ["offset", "u64"],
    ["version", "u64"],
  ],
  AppendAck: [
    ["epoch", "epoch"],
    ["offset", "u64"],
    ["version", "u64"],
    ["duplicate", "bool"],
  ],
  WireEvent: [
    ["topic", "string"],
    ["offset", "u64"],
    ["eventType", "string"],
    ["version", "u64"],
    ["timestampMs", "u64"],
    ["headers", HEADERS],
    ["payload", "bytes"],
  ],
  WireGap: [
    ["topic", "string"],
    ["eventType", opt("string")],
    ["reason", ["enum", "GapReason"]],
    ["epoch", "epoch"],
    ["requested", "u64"],
    ["firstAvailable", "u64"],
    ["current", "u64"],
  ],
  GroupOptions: [
    ["start", ["enum", "GroupStart"]],
    ["ackWaitMs", "u64"],
    ["maxDeliver", "u32"],
    ["backoffMs", list("u64")],
    ["maxAckPending", "u32"],
    ["deadLetterTopic", opt("string")],
  ],
  WireGroupInfo: [
    ["topic", "string"],
    ["group", "string"],
    ["options", ["struct", "GroupOptions"]],
    ["deadLetterTopic", "string"],
    ["epoch", "epoch"],
    ["ackFloor", "u64"],
    ["nextOffset", "u64"],
    ["lastOffset", "u64"],
    ["lag", "u64"],
    ["pending", "u64"],
    ["inFlight", "u64"],
    ["oldestPendingMs", "u64"],
    ["members", list(["struct", "WireMember"])],
    ["delivered", "u64"],
    ["redelivered", "u64"],
    ["acked", "u64"],
    ["deadLettered", "u64"],
    ["lost", "u64"],
    ["pendingSample", list(["struct", "WirePending"])],
  ],
  WireMember: [
    ["consumer", "string"],
    ["sessions", "u32"],
    ["inFlight", "u32"],
    ["maxInFlight", "u32"],
    ["idleMs", "u64"],
  ],
  WirePending: [
    ["offset", "u64"],
    ["attempt", "u32"],
    ["consumer", opt("string")],
    ["dueInMs", "u64"],
    ["firstDeliveredMs", "u64"],
  ],
  TopicSummary: [
    ["name", "string"],
    ["epoch", "epoch"],
    ["lastOffset", "u64"],
    ["sealed", "bool"],
  ],
  TopicPosition: [
    ["topic", "string"],
    ["epoch", "epoch"],
    ["offset", "u64"],
    ["ended", "bool"],
  ],
  WireConnection: [
    ["id", "u64"],
    ["kind", "string"],
    ["peer", "string"],
    ["subject", opt("string")],
    ["sinceMs", "u64"],
    ["delivered", "u64"],
    ["subscriptions", list(["struct", "WireConnSubscription"])],
  ],
  WireConnSubscription: [
    ["topic", "string"],
    ["subscriptionId", opt("u64")],
    ["group", opt("string")],
    ["epoch", "epoch"],
    ["position", "u64"],
    ["lag", "u64"],
    ["delivered", "u64"],
  ],
  CompressionOffer: [
    ["codecs", list("u8")],
    ["minSize", "u32"],
  ],
  CompressionChoice: [
    ["codec", "u8"],
    ["minSize", "u32"],
  ],
  WireTopicInfo: [
    ["name", "string"],
    ["epoch", "epoch"],
    ["firstOffset", "u64"],
    ["lastOffset", "u64"],
    ["versions", VERSIONS],
    ["maxEvents", "u64"],
    ["maxAgeMs", "u64"],
    ["maxBytes", "u64"],
    ["retainedEvents", "u64"],
    ["retainedBytes", "u64"],
    ["subscribers", "u32"],
    ["sealed", "bool"],
  ],
} as const satisfies Record<string, FieldList>;

/** The name of a struct of the protocol. */
export type StructName = keyof typeof STRUCTS;

/** The error codes, by their wire number (the index). */
export const ERROR_CODES = [
  "BadFrame",
  "BadHello",
  "UnsupportedVersion",
  "InvalidTopic",
  "InvalidType",
  "PayloadTooLarge",
  "FrameTooLarge",
  "TopicNotFound",
  "TopicSealed",
  "TooManySubscriptions",
  "TooManyConnections",
  "TooManyTopics",
  "UnknownSubscription",
  "DuplicateSubscription",
  "InvalidStart",
  "Internal",
  "ShuttingDown",
  "Unauthorized",
  "InvalidRequest",
  "OverCapacity",
  "TokenExpired",
  "Forbidden",
  "RateLimited",
  "PositionMismatch",
  "GroupNotFound",
  "ConnectionNotFound",
] as const;

/** A protocol error code, by name. */
export type ErrorCode = (typeof ERROR_CODES)[number];

/**
 * A variant of an enum: its name and fields. `newtype` marks a variant of
 * one unnamed field (serde writes its value bare); the TypeScript field
 * gets the name given here.
 */
type Variant = readonly [string, FieldList] | readonly [string, FieldList, "newtype"];

/** `Hello`'s fields; `HelloExt` adds the compression offer. */
const HELLO = [
  ["protocolVersion", "u16"],
  ["clientName", "string"],
  ["credentials", opt("string")],
] as const;

/** `Welcome`'s fields; `WelcomeExt` adds the compression in force. */
const WELCOME = [
  ["serverVersion", "string"],
  ["protocolVersion", "u16"],
  ["maxFrame", "u32"],
  ["maxPayload", "u32"],
  ["maxSubscriptions", "u32"],
  ["heartbeatMs", "u32"],
] as const;

/** Every enum of the protocol: units (variant names only) or variants with fields. */
export const ENUMS = {
  GapReason: { units: ["Retention", "EpochChanged", "SlowConsumer"] },
  ErrorCode: { units: ERROR_CODES },
  Start: {
    variants: [
      ["Live", []],
      ["Earliest", []],
      [
        "AfterOffset",
        [
          ["epoch", "epoch"],
          ["offset", "u64"],
        ],
      ],
      [
        "AfterVersions",
        [
          ["epoch", "epoch"],
          ["versions", VERSIONS],
        ],
      ],
    ],
  },
  GroupStart: {
    variants: [["Earliest", []], ["Live", []], ["AfterOffset", [["offset", "u64"]], "newtype"]],
  },
  SettleAction: {
    variants: [
      ["Ack", []],
      ["Nack", [["delayMs", opt("u64")]], "newtype"],
      ["InProgress", []],
      ["Term", [["reason", "string"]], "newtype"],
    ],
  },
  ClientMessage: {
    variants: [
      ["Hello", HELLO],
      [
        "Publish",
        [
          ["requestId", "u64"],
          ["topic", "string"],
          ["eventType", "string"],
          ["headers", HEADERS],
          ["payload", "bytes"],
        ],
      ],
      [
        "PublishBatch",
        [
          ["requestId", "u64"],
          ["topic", "string"],
          ["events", list(["struct", "NewEvent"])],
        ],
      ],
      [
        "Subscribe",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
          ["topic", "string"],
          ["types", list("string")],
          ["start", ["enum", "Start"]],
        ],
      ],
      [
        "Unsubscribe",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
        ],
      ],
      [
        "History",
        [
          ["requestId", "u64"],
          ["topic", "string"],
          ["after", "u64"],
          ["types", list("string")],
          ["limit", "u32"],
        ],
      ],
      ["ListTopics", [["requestId", "u64"]]],
      [
        "TopicInfo",
        [
          ["requestId", "u64"],
          ["topic", "string"],
        ],
      ],
      [
        "Seal",
        [
          ["requestId", "u64"],
          ["topic", "string"],
        ],
      ],
      [
        "Delete",
        [
          ["requestId", "u64"],
          ["topic", "string"],
        ],
      ],
      ["Ping", [["requestId", "u64"]]],
      [
        "Refresh",
        [
          ["requestId", "u64"],
          ["credentials", "string"],
        ],
      ],
      [
        "Append",
        [
          ["requestId", "u64"],
          ["topic", "string"],
          ["events", list(["struct", "AppendEvent"])],
          ["expectedOffset", opt("u64")],
          ["expectedVersion", opt("u64")],
        ],
      ],
      [
        "CreateGroup",
        [
          ["requestId", "u64"],
          ["topic", "string"],
          ["group", "string"],
          ["options", ["struct", "GroupOptions"]],
          ["update", "bool"],
        ],
      ],
      [
        "JoinGroup",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
          ["topic", "string"],
          ["group", "string"],
          ["consumer", "string"],
          ["maxInFlight", "u32"],
          ["create", opt(["struct", "GroupOptions"])],
        ],
      ],
      [
        "LeaveGroup",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
        ],
      ],
      [
        "Settle",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
          ["offsets", list("u64")],
          ["action", ["enum", "SettleAction"]],
        ],
      ],
      [
        "GroupInfo",
        [
          ["requestId", "u64"],
          ["topic", "string"],
          ["group", "string"],
        ],
      ],
      [
        "ListGroups",
        [
          ["requestId", "u64"],
          ["topic", "string"],
        ],
      ],
      [
        "DeleteGroup",
        [
          ["requestId", "u64"],
          ["topic", "string"],
          ["group", "string"],
        ],
      ],
      [
        "Redrive",
        [
          ["requestId", "u64"],
          ["topic", "string"],
          ["group", "string"],
        ],
      ],
      [
        "ListConnections",
        [
          ["requestId", "u64"],
          ["after", "u64"],
          ["limit", "u32"],
        ],
      ],
      [
        "CloseConnection",
        [
          ["requestId", "u64"],
          ["connectionId", "u64"],
        ],
      ],
      [
        "SubscribePattern",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
          ["pattern", "string"],
          ["types", list("string")],
          ["start", ["enum", "Start"]],
          ["positions", opt(list(["struct", "TopicPosition"]))],
        ],
      ],
      ["HelloExt", [...HELLO, ["compression", ["struct", "CompressionOffer"]]]],
    ],
  },
  ServerMessage: {
    variants: [
      ["Welcome", WELCOME],
      [
        "Published",
        [
          ["requestId", "u64"],
          ["results", list(["struct", "Ack"])],
        ],
      ],
      [
        "Subscribed",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
          ["epoch", "epoch"],
          ["nextOffset", "u64"],
        ],
      ],
      [
        "Unsubscribed",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
        ],
      ],
      [
        "Event",
        [
          ["subscriptionId", "u64"],
          ["event", ["struct", "WireEvent"]],
        ],
      ],
      [
        "Gap",
        [
          ["subscriptionId", "u64"],
          ["gap", ["struct", "WireGap"]],
        ],
      ],
      [
        "End",
        [
          ["subscriptionId", "u64"],
          ["topic", "string"],
          ["lastOffset", "u64"],
        ],
      ],
      [
        "History",
        [
          ["requestId", "u64"],
          ["events", list(["struct", "WireEvent"])],
          ["nextAfter", "u64"],
          ["firstAvailable", "u64"],
        ],
      ],
      [
        "Topics",
        [
          ["requestId", "u64"],
          ["topics", list(["struct", "TopicSummary"])],
        ],
      ],
      [
        "TopicInfo",
        [
          ["requestId", "u64"],
          ["info", ["struct", "WireTopicInfo"]],
        ],
      ],
      ["Ok", [["requestId", "u64"]]],
      ["Pong", [["requestId", "u64"]]],
      [
        "Error",
        [
          ["requestId", opt("u64")],
          ["code", ["enum", "ErrorCode"]],
          ["message", "string"],
        ],
      ],
      ["Heartbeat", []],
      ["Shutdown", [["reason", "string"]]],
      [
        "Refreshed",
        [
          ["requestId", "u64"],
          ["expiresAtMs", "u64"],
        ],
      ],
      [
        "RetryLater",
        [
          ["requestId", opt("u64")],
          ["code", ["enum", "ErrorCode"]],
          ["message", "string"],
          ["retryAfterMs", "u64"],
        ],
      ],
      [
        "Appended",
        [
          ["requestId", "u64"],
          ["results", list(["struct", "AppendAck"])],
        ],
      ],
      [
        "PositionMismatch",
        [
          ["requestId", "u64"],
          ["message", "string"],
          ["currentOffset", "u64"],
          ["currentVersion", "u64"],
        ],
      ],
      [
        "Joined",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
          ["epoch", "epoch"],
        ],
      ],
      [
        "Delivery",
        [
          ["subscriptionId", "u64"],
          ["attempt", "u32"],
          ["event", ["struct", "WireEvent"]],
        ],
      ],
      [
        "Settled",
        [
          ["requestId", "u64"],
          ["applied", "u64"],
          ["alreadyDone", "u64"],
          ["unknown", "u64"],
        ],
      ],
      [
        "GroupInfo",
        [
          ["requestId", "u64"],
          ["info", ["struct", "WireGroupInfo"]],
        ],
      ],
      [
        "Groups",
        [
          ["requestId", "u64"],
          ["groups", list(["struct", "WireGroupInfo"])],
        ],
      ],
      [
        "Redriven",
        [
          ["requestId", "u64"],
          ["count", "u64"],
        ],
      ],
      [
        "Connections",
        [
          ["requestId", "u64"],
          ["connections", list(["struct", "WireConnection"])],
          ["nextAfter", "u64"],
        ],
      ],
      [
        "PatternSubscribed",
        [
          ["requestId", "u64"],
          ["subscriptionId", "u64"],
          ["topics", list(["struct", "TopicPosition"])],
        ],
      ],
      [
        "TopicJoined",
        [
          ["subscriptionId", "u64"],
          ["position", ["struct", "TopicPosition"]],
        ],
      ],
      [
        "SubscriptionEnded",
        [
          ["subscriptionId", "u64"],
          ["code", ["enum", "ErrorCode"]],
          ["message", "string"],
        ],
      ],
      ["WelcomeExt", [...WELCOME, ["compression", ["struct", "CompressionChoice"]]]],
    ],
  },
} as const satisfies Record<string, { units: readonly string[] } | { variants: readonly Variant[] }>;

/** The name of an enum of the protocol. */
export type EnumName = keyof typeof ENUMS;

// ---------------------------------------------------------------------------
// Types derived from the schema.

/** The TypeScript value of wire type `T`. */
export type Value<T> = T extends "u8" | "u16" | "u32" | "u64"
  ? number
  : T extends "epoch"
    ? bigint
    : T extends "bool"
      ? boolean
      : T extends "string"
        ? string
        : T extends "bytes"
          ? Uint8Array
          : T extends readonly ["list", infer I]
            ? Value<I>[]
            : T extends readonly ["option", infer I]
              ? Value<I> | null
              : T extends readonly ["tuple", infer A, infer B]
                ? [Value<A>, Value<B>]
                : T extends readonly ["struct", infer N extends StructName]
                  ? StructValue<N>
                  : T extends readonly ["enum", infer N extends EnumName]
                    ? EnumValue<N>
                    : never;

type FieldsValue<F> = F extends FieldList ? { -readonly [P in F[number] as P[0]]: Value<P[1]> } : never;

/** The TypeScript value of the struct named `N`. */
export type StructValue<N extends StructName> = FieldsValue<(typeof STRUCTS)[N]>;

type VariantValue<V> = V extends readonly [infer Name extends string, infer F, ...unknown[]]
  ? { type: Name } & FieldsValue<F>
  : never;

/** The TypeScript value of the enum named `N`. */
export type EnumValue<N extends EnumName> = (typeof ENUMS)[N] extends { units: readonly (infer U)[] }
  ? U
  : (typeof ENUMS)[N] extends { variants: readonly (infer V)[] }
    ? VariantValue<V>
    : never;

/** A message from a client to the server. */
export type ClientMessage = EnumValue<"ClientMessage">;
/** A message from the server to a client. */
export type ServerMessage = EnumValue<"ServerMessage">;
/** One server message kind, by name: `ServerMessageOf<"Event">`. */
export type ServerMessageOf<K extends ServerMessage["type"]> = Extract<ServerMessage, { type: K }>;
/** One client message kind, by name. */
export type ClientMessageOf<K extends ClientMessage["type"]> = Extract<ClientMessage, { type: K }>;
/** Where a subscription starts. */
export type Start = EnumValue<"Start">;
/** Why a gap happened. */
export type GapReason = EnumValue<"GapReason">;
/** Where a new consumer group starts. */
export type GroupStart = EnumValue<"GroupStart">;
/** What `Settle` does to its offsets. */
export type SettleAction = EnumValue<"SettleAction">;
/** An event as the server sends it. */
export type WireEvent = StructValue<"WireEvent">;
/** A gap as the server reports it. */
export type WireGap = StructValue<"WireGap">;
/** Where one published event landed. */
export type Ack = StructValue<"Ack">;
/** Where one appended event landed (`duplicate`: it was stored before). */
export type AppendAck = StructValue<"AppendAck">;
/** A consumer group's settings. */
export type GroupOptions = StructValue<"GroupOptions">;
/** A consumer group's state. */
export type WireGroupInfo = StructValue<"WireGroupInfo">;
/** A topic's state. */
export type WireTopicInfo = StructValue<"WireTopicInfo">;
/** A topic in a `ListTopics` answer. */
export type TopicSummary = StructValue<"TopicSummary">;
/** Where one topic of a pattern subscription stands. */
export type TopicPosition = StructValue<"TopicPosition">;
/** One live connection of the broker. */
export type WireConnection = StructValue<"WireConnection">;
/** An event to publish in a batch. */
export type NewEvent = StructValue<"NewEvent">;
/** An event to append, with an optional idempotency key. */
export type AppendEvent = StructValue<"AppendEvent">;
/** Event headers: (name, value) pairs in order, duplicates allowed. */
export type Headers = [string, string][];

// ---------------------------------------------------------------------------
// Errors.

/** A frame that cannot be decoded or encoded. */
export class ProtocolError extends Error {
  /** The error code a server would answer with: `BadFrame` or `FrameTooLarge`. */
  readonly code: "BadFrame" | "FrameTooLarge";
  constructor(message: string, code: "BadFrame" | "FrameTooLarge" = "BadFrame") {
    super(message);
    this.name = "ProtocolError";
    this.code = code;
  }
}

// ---------------------------------------------------------------------------
// Writer and reader.

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });
const TWO_32 = 0x1_0000_0000;
const U64_MAX = (1n << 64n) - 1n;

/** A growable big-endian byte writer. */
class Writer {
  buf: Uint8Array;
  view: DataView;
  pos = 0;

  constructor(capacity = 256) {
    this.buf = new Uint8Array(capacity);
    this.view = new DataView(this.buf.buffer);
  }

  reserve(n: number): void {
    const need = this.pos + n;
    if (need <= this.buf.length) return;
    let cap = this.buf.length * 2;
    while (cap < need) cap *= 2;
    const next = new Uint8Array(cap);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  u8(v: number): void {
    this.reserve(1);
    this.buf[this.pos++] = v;
  }

  u16(v: number): void {
    this.reserve(2);
    this.view.setUint16(this.pos, v);
    this.pos += 2;
  }

  u32(v: number): void {
    this.reserve(4);
    this.view.setUint32(this.pos, v);
    this.pos += 4;
  }

  u64(v: number): void {
    this.reserve(8);
    this.view.setUint32(this.pos, Math.floor(v / TWO_32));
    this.view.setUint32(this.pos + 4, v >>> 0);
    this.pos += 8;
  }

  u64big(v: bigint): void {
    this.reserve(8);
    this.view.setBigUint64(this.pos, v);
    this.pos += 8;
  }

  bytes(v: Uint8Array): void {
    this.u64(v.length);
    this.reserve(v.length);
    this.buf.set(v, this.pos);
    this.pos += v.length;
  }

  string(v: string): void {
    const n = v.length;
    if (n <= 64) {
      // Short ASCII (names, types, keys): byte by byte, cheaper than encodeInto.
      this.reserve(8 + n);
      const buf = this.buf;
      const at = this.pos + 8;
      let i = 0;
      for (; i < n; i++) {
        const c = v.charCodeAt(i);
        if (c > 0x7f) break;
        buf[at + i] = c;
      }
      if (i === n) {
        this.view.setUint32(this.pos, 0);
        this.view.setUint32(this.pos + 4, n);
        this.pos = at + n;
        return;
      }
    }
    // At most 3 bytes per UTF-16 unit; write after the length, then patch it.
    const max = v.length * 3;
    this.reserve(8 + max);
    const at = this.pos;
    this.pos += 8;
    const { written } = utf8Encoder.encodeInto(v, this.buf.subarray(this.pos, this.pos + max));
    this.view.setUint32(at, 0);
    this.view.setUint32(at + 4, written);
    this.pos += written;
  }
}

/** A bounds-checked big-endian reader over one frame body (byte arithmetic: no DataView per body). */
class Reader {
  pos = 0;
  readonly buf: Uint8Array;

  constructor(buf: Uint8Array) {
    // A plain view: `slice` must copy (a Node Buffer's does not).
    this.buf = buf.constructor === Uint8Array ? buf : new Uint8Array(buf.buffer, buf.byteOffset, buf.length);
  }

  need(n: number, what: string): void {
    if (this.buf.length - this.pos < n) {
      throw new ProtocolError(`truncated body: ${what} needs ${n} bytes, ${this.buf.length - this.pos} left`);
    }
  }

  u8(): number {
    this.need(1, "u8");
    return this.buf[this.pos++]!;
  }

  u16(): number {
    this.need(2, "u16");
    const b = this.buf;
    const p = this.pos;
    this.pos = p + 2;
    return (b[p]! << 8) | b[p + 1]!;
  }

  /** A u32 at `p`, unchecked. */
  private at32(p: number): number {
    const b = this.buf;
    return ((b[p]! << 24) | (b[p + 1]! << 16) | (b[p + 2]! << 8) | b[p + 3]!) >>> 0;
  }

  u32(): number {
    this.need(4, "u32");
    const v = this.at32(this.pos);
    this.pos += 4;
    return v;
  }

  u64(): number {
    this.need(8, "u64");
    const hi = this.at32(this.pos);
    const lo = this.at32(this.pos + 4);
    this.pos += 8;
    if (hi > 0x1f_ffff) {
      throw new ProtocolError("a u64 above 2^53 - 1 where a counter was expected");
    }
    return hi * TWO_32 + lo;
  }

  u64big(): bigint {
    this.need(8, "u64");
    const hi = this.at32(this.pos);
    const lo = this.at32(this.pos + 4);
    this.pos += 8;
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  /** A length or count: never more than the bytes left (each item takes at least `min` bytes). */
  count(min: number): number {
    const n = this.u64();
    if (n * min > this.buf.length - this.pos) {
      throw new ProtocolError(`a length of ${n} where ${this.buf.length - this.pos} bytes are left`);
    }
    return n;
  }

  bytes(): Uint8Array {
    const n = this.count(1);
    // A copy: the frame's buffer may be large and short-lived.
    const v = this.buf.slice(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }

  string(): string {
    const n = this.count(1);
    if (n <= 64) {
      // Short ASCII (topics, types, header names): no TextDecoder call.
      const buf = this.buf;
      const at = this.pos;
      let v = "";
      let i = 0;
      for (; i < n; i++) {
        const c = buf[at + i]!;
        if (c > 0x7f) break;
        v += String.fromCharCode(c);
      }
      if (i === n) {
        this.pos += n;
        return v;
      }
    }
    let v: string;
    try {
      v = utf8Decoder.decode(this.buf.subarray(this.pos, this.pos + n));
    } catch {
      throw new ProtocolError("invalid UTF-8 in a string");
    }
    this.pos += n;
    return v;
  }
}

// ---------------------------------------------------------------------------
// Codecs compiled from the schema.

interface Codec {
  enc(w: Writer, v: unknown): void;
  dec(r: Reader): unknown;
  /** The fewest bytes a value takes (to bound list counts). */
  min: number;
}

type Obj = Record<string, unknown>;

function fail(what: string, v: unknown): never {
  throw new TypeError(`cannot encode ${String(v)} as ${what}`);
}

function uint(max: number, what: string, write: (w: Writer, v: number) => void): (w: Writer, v: unknown) => void {
  return (w, v) => {
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > max) fail(what, v);
    write(w, v);
  };
}

const PRIMITIVES: Record<string, Codec> = {
  u8: { enc: uint(0xff, "u8", (w, v) => w.u8(v)), dec: (r) => r.u8(), min: 1 },
  u16: { enc: uint(0xffff, "u16", (w, v) => w.u16(v)), dec: (r) => r.u16(), min: 2 },
  u32: { enc: uint(0xffff_ffff, "u32", (w, v) => w.u32(v)), dec: (r) => r.u32(), min: 4 },
  u64: { enc: uint(Number.MAX_SAFE_INTEGER, "u64", (w, v) => w.u64(v)), dec: (r) => r.u64(), min: 8 },
  epoch: {
    enc: (w, v) => {
      if (typeof v !== "bigint" || v < 0n || v > U64_MAX) fail("u64 (bigint)", v);
      w.u64big(v);
    },
    dec: (r) => r.u64big(),
    min: 8,
  },
  bool: {
    enc: (w, v) => {
      if (typeof v !== "boolean") fail("bool", v);
      w.u8(v ? 1 : 0);
    },
    dec: (r) => {
      const b = r.u8();
      if (b > 1) throw new ProtocolError(`invalid bool ${b}`);
      return b === 1;
    },
    min: 1,
  },
  string: {
    enc: (w, v) => {
      if (typeof v !== "string") fail("string", v);
      w.string(v);
    },
    dec: (r) => r.string(),
    min: 8,
  },
  bytes: {
    enc: (w, v) => {
      if (!(v instanceof Uint8Array)) fail("bytes (Uint8Array)", v);
      w.bytes(v);
    },
    dec: (r) => r.bytes(),
    min: 8,
  },
};

const compiled = new Map<string, Codec>();

function codecOf(ty: Ty): Codec {
  if (typeof ty === "string") return PRIMITIVES[ty]!;
  const t = ty as readonly [string, ...unknown[]];
  switch (ty[0]) {
    case "list": {
      const item = codecOf(t[1] as Ty);
      return {
        enc: (w, v) => {
          if (!Array.isArray(v)) fail("list", v);
          w.u64(v.length);
          for (const x of v) item.enc(w, x);
        },
        dec: (r) => {
          const n = r.count(item.min);
          const out = new Array<unknown>(n);
          for (let i = 0; i < n; i++) out[i] = item.dec(r);
          return out;
        },
        min: 8,
      };
    }
    case "option": {
      const inner = codecOf(t[1] as Ty);
      return {
        enc: (w, v) => {
          if (v === null || v === undefined) {
            w.u8(0);
          } else {
            w.u8(1);
            inner.enc(w, v);
          }
        },
        dec: (r) => {
          const tag = r.u8();
          if (tag === 0) return null;
          if (tag === 1) return inner.dec(r);
          throw new ProtocolError(`invalid option tag ${tag}`);
        },
        min: 1,
      };
    }
    case "tuple": {
      const a = codecOf(t[1] as Ty);
      const b = codecOf(t[2] as Ty);
      return {
        enc: (w, v) => {
          if (!Array.isArray(v) || v.length !== 2) fail("pair", v);
          a.enc(w, v[0]);
          b.enc(w, v[1]);
        },
        dec: (r) => [a.dec(r), b.dec(r)],
        min: a.min + b.min,
      };
    }
    case "struct": {
      const name = t[1] as StructName;
      if (!(name in STRUCTS)) throw new Error(`no struct ${name} in the schema`);
      return named(`struct:${name}`, () => fieldsCodec(STRUCTS[name], null));
    }
    case "enum": {
      const name = t[1] as EnumName;
      if (!(name in ENUMS)) throw new Error(`no enum ${name} in the schema`);
      return named(`enum:${name}`, () => enumCodec(name));
    }
    default:
      throw new Error(`unknown schema type ${String(t[0])}`);
  }
}

/** A codec by name, compiled once; recursive references resolve lazily. */
function named(key: string, build: () => Codec): Codec {
  const have = compiled.get(key);
  if (have) return have;
  // A forwarding shell first, so a type that refers to itself terminates.
  const shell: Codec = { enc: () => undefined, dec: () => undefined, min: 0 };
  compiled.set(key, shell);
  const real = build();
  shell.enc = real.enc;
  shell.dec = real.dec;
  shell.min = real.min;
  return shell;
}

function fieldsCodec(fields: FieldList, type: string | null): Codec {
  const parts = fields.map(([name, ty]) => [name, codecOf(ty)] as const);
  const min = parts.reduce((s, [, c]) => s + c.min, 0);
  return {
    enc: (w, v) => {
      if (typeof v !== "object" || v === null) fail("struct", v);
      const o = v as Obj;
      for (const [name, c] of parts) {
        try {
          c.enc(w, o[name]);
        } catch (e) {
          if (e instanceof TypeError && !e.message.includes(" field ")) {
            throw new TypeError(`${e.message} (field ${name})`);
          }
          throw e;
        }
      }
    },
    dec: (r) => {
      const o: Obj = type === null ? {} : { type };
      for (const [name, c] of parts) o[name] = c.dec(r);
      return o;
    },
    min,
  };
}

function enumCodec(name: EnumName): Codec {
  const spec = ENUMS[name] as { units: readonly string[] } | { variants: readonly Variant[] };
  if ("units" in spec) {
    const index = new Map(spec.units.map((u, i) => [u, i]));
    return {
      enc: (w, v) => {
        const i = index.get(v as string);
        if (i === undefined) fail(name, v);
        w.u32(i);
      },
      dec: (r) => {
        const tag = r.u32();
        const v = spec.units[tag];
        if (v === undefined) throw new ProtocolError(`unknown ${name} tag ${tag}`);
        return v;
      },
      min: 4,
    };
  }
  const variants = spec.variants.map(([vname, fields]) => fieldsCodec(fields, vname));
  const index = new Map(spec.variants.map(([vname], i) => [vname, i]));
  return {
    enc: (w, v) => {
      const type = (v as Obj | null)?.type;
      const i = index.get(type as string);
      if (i === undefined) fail(name, type);
      w.u32(i);
      variants[i]!.enc(w, v);
    },
    dec: (r) => {
      const tag = r.u32();
      const c = variants[tag];
      if (c === undefined) throw new ProtocolError(`unknown ${name} tag ${tag}`);
      return c.dec(r);
    },
    min: 4,
  };
}

const CLIENT = codecOf(["enum", "ClientMessage"]);
const SERVER = codecOf(["enum", "ServerMessage"]);

/** A first guess of a message's size, so that the writer rarely grows. */
function sizeHint(msg: unknown): number {
  const m = msg as { payload?: Uint8Array; events?: { payload?: Uint8Array }[] };
  let n = 256;
  if (m.payload) n += m.payload.length;
  if (m.events) for (const e of m.events) n += 128 + (e.payload?.length ?? 0);
  return n;
}

/** One writer reused by every encode (encoding is synchronous), so a frame costs one exact-size copy. */
const scratch = new Writer(64 * 1024);

function encodeFrameWith(codec: Codec, msg: unknown, maxFrame: number): Uint8Array {
  const w = scratch;
  w.pos = 4;
  w.reserve(sizeHint(msg));
  try {
    codec.enc(w, msg);
    const len = w.pos - 4;
    if (len > maxFrame) {
      throw new ProtocolError(`a frame of ${len} bytes exceeds max_frame (${maxFrame})`, "FrameTooLarge");
    }
    w.view.setUint32(0, len);
    return w.buf.slice(0, w.pos);
  } finally {
    if (w.buf.length > 1024 * 1024) {
      // Do not keep a large frame's buffer alive.
      w.buf = new Uint8Array(64 * 1024);
      w.view = new DataView(w.buf.buffer);
    }
  }
}

function decodeBodyWith<T>(codec: Codec, body: Uint8Array): T {
  const r = new Reader(body);
  const msg = codec.dec(r) as T;
  if (r.pos !== body.length) {
    throw new ProtocolError(`${body.length - r.pos} bytes left over after the message`);
  }
  return msg;
}

/** Encodes a client message as a whole frame (length prefix and body). */
export function encodeClientFrame(msg: ClientMessage, maxFrame = 0xffff_ffff): Uint8Array {
  return encodeFrameWith(CLIENT, msg, maxFrame);
}

/** Encodes a server message as a whole frame (for tests and fakes). */
export function encodeServerFrame(msg: ServerMessage, maxFrame = 0xffff_ffff): Uint8Array {
  return encodeFrameWith(SERVER, msg, maxFrame);
}

/** Decodes one frame body (without its length prefix) as a server message. */
export function decodeServerBody(body: Uint8Array): ServerMessage {
  return decodeBodyWith<ServerMessage>(SERVER, body);
}

/** Decodes one frame body (without its length prefix) as a client message. */
export function decodeClientBody(body: Uint8Array): ClientMessage {
  return decodeBodyWith<ClientMessage>(CLIENT, body);
}

/** Encodes a value of any schema type (no frame): for tests of single types. */
export function encodeValue(ty: Ty, v: unknown): Uint8Array {
  const w = new Writer(64);
  codecOf(ty).enc(w, v);
  return w.buf.subarray(0, w.pos);
}

/** Decodes a value of any schema type from exactly `bytes`. */
export function decodeValue(ty: Ty, bytes: Uint8Array): unknown {
  return decodeBodyWith(codecOf(ty), bytes);
}

/**
 * Splits a byte stream into frame bodies. The length prefix is checked
 * against `maxFrame` before any of the body is buffered.
 */
export class FrameDecoder {
  private chunks: Uint8Array[] = [];
  private buffered = 0;

  /** `maxFrame`: the largest body accepted (the `Welcome`'s `max_frame` once known). */
  constructor(public maxFrame: number = DEFAULT_MAX_FRAME) {}

  /** Bytes held of a frame not yet complete. */
  get pending(): number {
    return this.buffered;
  }

  /** Adds bytes; returns every body completed by them, in order. */
  push(chunk: Uint8Array): Uint8Array[] {
    if (chunk.length > 0) {
      // A plain view: a Node Buffer's subarray costs far more than a Uint8Array's.
      if (chunk.constructor !== Uint8Array) chunk = new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length);
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const out: Uint8Array[] = [];
    for (;;) {
      if (this.buffered < 4) break;
      const head = this.peek(4);
      const len = ((head[0]! << 24) >>> 0) + (head[1]! << 16) + (head[2]! << 8) + head[3]!;
      if (len > this.maxFrame) {
        throw new ProtocolError(`a frame of ${len} bytes exceeds max_frame (${this.maxFrame})`, "FrameTooLarge");
      }
      if (this.buffered < 4 + len) break;
      this.take(4);
      out.push(this.take(len));
    }
    return out;
  }

  private peek(n: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length >= n) return first;
    return this.gather(n, false);
  }

  private take(n: number): Uint8Array {
    const first = this.chunks[0]!;
    if (first.length > n) {
      this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return first.subarray(0, n);
    }
    if (first.length === n) {
      this.chunks.shift();
      this.buffered -= n;
      return first;
    }
    return this.gather(n, true);
  }

  private gather(n: number, consume: boolean): Uint8Array {
    const out = new Uint8Array(n);
    let at = 0;
    let i = 0;
    while (at < n) {
      const c = this.chunks[i]!;
      const k = Math.min(c.length, n - at);
      out.set(c.subarray(0, k), at);
      at += k;
      if (consume) {
        if (k === c.length) {
          this.chunks.shift();
        } else {
          this.chunks[0] = c.subarray(k);
        }
      } else {
        i++;
      }
    }
    if (consume) this.buffered -= n;
    return out;
  }
}
