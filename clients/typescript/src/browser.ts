/**
 * `ringcast/browser`: a typed helper over the browser's native
 * `EventSource` for ringcast's SSE streams (README "From a browser").
 *
 * ```ts
 * import { openStream } from "ringcast/browser";
 *
 * type Orders = { created: { id: number }; paid: { id: number; total: number } };
 * const stream = openStream<Orders>({
 *   url: "https://events.example.com",
 *   topics: ["orders.eu", "orders.us", "user.*"],   // one EventSource for all
 *   types: ["created", "paid"],
 *   earliest: true,
 *   token: () => fetch("/ringcast-token").then((r) => r.text()),
 *   onEvent(ev) {
 *     if (ev.type === "paid") render(ev.topic, ev.data.total);  // ev.data is typed by ev.type
 *   },
 *   onGap(gap) { refetch(gap.topic); },   // events were lost: reload that topic's state
 *   onEnd(end) { markDone(end.topic); },  // that topic was sealed or deleted
 * });
 * ```
 *
 * What it does beyond a bare `EventSource`:
 * - builds the URL: one plain topic → `/v1/topics/{topic}/events`; several
 *   topics or a pattern (`*`, `?`) → `/v1/events?topic=…` (one connection);
 *   `types=` from `types`, which are also the event names it listens to;
 * - parses every message and calls the matching callback, with the SSE id;
 * - tracks the last event id; on `event: error` `token_expired` it gets a new
 *   token (`token()`, or `renew()` for cookies), closes the EventSource and
 *   opens a new one with `?last_event_id=`: exactly where it was;
 * - closes for good after the `end` of a single-topic stream (or of every
 *   named topic of a stream without patterns), and after a fatal
 *   `event: error` (e.g. `too_many_topics`), instead of reconnecting in vain;
 * - reports its state: lost connections are retried by `EventSource` itself
 *   (`reconnecting`); when the browser gives up (the broker answered 204
 *   after the end, or 401/403/404/5xx) the stream is `closed` with reason
 *   `refused` — after one fresh-token retry when `token` or `renew` is set.
 *
 * No dependencies and no Node APIs: it runs wherever `EventSource` does.
 */

/** Where a stream stands. It starts `connecting`. */
export type StreamState = "connecting" | "open" | "reconnecting" | "closed";

/**
 * Why a stream is `closed`: `client` (close() was called), `ended` (every
 * topic it reads ended), `error` (a fatal `event: error`, given to
 * onError), `refused` (the browser gave up: HTTP 204 after the end, or an
 * error status such as 401, 403, 404).
 */
export type CloseReason = "client" | "ended" | "refused" | "error";

/** An event as the broker sends it (`event: <type>`), plus its SSE id. */
export interface RingcastEvent<T extends string = string, D = unknown> {
  /** The topic it was published to. */
  readonly topic: string;
  /** Its event type (the SSE `event:` name). */
  readonly type: T;
  /** Per (topic, type), from 1. */
  readonly version: number;
  /** Per topic, from 1. */
  readonly offset: number;
  /** Milliseconds since the Unix epoch, set by the broker. */
  readonly ts: number;
  /** The publisher's headers. */
  readonly headers: Readonly<Record<string, string>>;
  /**
   * The payload: inline when it is JSON, a string when it is UTF-8 text,
   * and base64 text when `encoding` is `"base64"` (binary; see payloadBytes).
   */
  readonly data: D;
  /** `"base64"` when `data` is base64 text of binary bytes. */
  readonly encoding?: "base64";
  /** The message's SSE id: `lastEventId` resumes right after it. */
  readonly id: string;
}

/** The events of a payload map `P` ({type: payload}), a union tagged by `type`. */
export type EventOf<P> = { [K in keyof P & string]: RingcastEvent<K, P[K]> }[keyof P & string];

/** `event: gap`: events of `topic` were lost to this stream; it goes on live. */
export interface Gap {
  /** The topic that lost events. */
  readonly topic: string;
  /** null for a whole-topic gap (positions are offsets); else the type (positions are versions). */
  readonly type: string | null;
  /** Why: trimmed by retention, the topic was re-created, or the stream fell behind. */
  readonly reason: "retention" | "epoch_changed" | "slow_consumer" | (string & {});
  /** The topic's epoch, a decimal string (64 bits). */
  readonly epoch: string;
  /** Where the stream was. */
  readonly requested: number;
  /** The first still retained (from here to `current` a history read can refill). */
  readonly first_available: number;
  /** Where it continues from. */
  readonly current: number;
  /** The message's SSE id. */
  readonly id: string;
}

/** `event: end`: `topic` was sealed (or deleted) after `last_offset`. */
export interface End {
  /** The topic that ended. */
  readonly topic: string;
  /** Its last offset. */
  readonly last_offset: number;
}

/** `event: ready` of a single-topic stream. */
export interface TopicReady {
  /** The topic. */
  readonly topic: string;
  /** Its epoch, a decimal string (64 bits). */
  readonly epoch: string;
  /** The offset the stream starts after. */
  readonly offset: number;
  /** Each type's current version (to resume by versions later). */
  readonly versions: Readonly<Record<string, number>>;
}

/** `event: ready` of a stream over several topics or patterns. */
export interface StreamReady {
  /** Every topic of the stream and where it starts. */
  readonly topics: readonly { topic: string; epoch: string; offset: number; ended: boolean }[];
  /** The patterns of the stream. */
  readonly patterns: readonly string[];
}

/** The data of `event: error` (e.g. `too_many_topics`), or `token_unavailable` when `token()`/`renew()` failed. */
export interface BrokerError {
  /** The error's code (`token_expired`, `too_many_topics`, …). */
  readonly code: string;
  /** For humans. */
  readonly message?: string;
  readonly [key: string]: unknown;
}

/** What `openStream` opens and what it calls; `P` maps each event type to its payload type. */
export interface StreamOptions<P extends object> {
  /** The broker's base URL, e.g. "https://events.example.com" (a path prefix is kept). */
  url: string | URL;
  /** One topic, or several names and patterns (`orders.*`) for one connection. */
  topics: string | readonly string[];
  /** The event types to receive: the names listened to, and the broker's `types=` filter. */
  types: readonly (keyof P & string)[];
  /** Start with every retained event (else live); ignored once there is an id to resume after. */
  earliest?: boolean;
  /** Resume after this SSE id (a previous stream's `lastEventId`, same topics). */
  lastEventId?: string;
  /** A token for `?access_token=`: called at each open, so after `token_expired` too. */
  token?: () => string | Promise<string>;
  /** Send cookies (the `ringcast_token` cookie) cross-origin. */
  withCredentials?: boolean;
  /** Cookie auth: refresh the cookie (call your backend) before a reopen after `token_expired`. */
  renew?: () => void | Promise<void>;
  /** Each event, typed by its `type`. */
  onEvent(event: EventOf<P>): void;
  /** Events were lost (retention, epoch_changed, slow_consumer): refetch `gap.topic`'s state. */
  onGap?(gap: Gap): void;
  /** A topic ended (sealed or deleted). */
  onEnd?(end: End): void;
  /** Each (re)connection's first message. */
  onReady?(ready: TopicReady | StreamReady): void;
  /** A broker error (the stream closes after it), or `token_unavailable`. */
  onError?(error: BrokerError): void;
  /** The stream's state changed (`reason` once `closed`). */
  onStateChange?(state: StreamState, reason?: CloseReason): void;
}

/** An open stream: its state, the id to resume after, and `close()`. */
export interface Stream {
  /** Closes the stream for good. */
  close(): void;
  /** The id of the last message received (resume a later stream after it). */
  readonly lastEventId: string | undefined;
  /** Where it stands now. */
  readonly state: StreamState;
  /** Why it closed, once `closed`. */
  readonly closeReason: CloseReason | undefined;
}

/** Milliseconds before `token()`/`renew()` is tried again after it failed. */
const RETRY_MS = 2000;
const CONTROL = ["ready", "gap", "end", "error", "shutdown"];
const isPattern = (topic: string) => /[*?]/.test(topic);

/** Opens a stream; see the module docs. */
export function openStream<P extends object = Record<string, unknown>>(o: StreamOptions<P>): Stream {
  const topics = typeof o.topics === "string" ? [o.topics] : [...o.topics];
  const named = topics.filter((t) => !isPattern(t));
  const single = topics.length === 1 && named.length === 1;
  const types: readonly string[] = o.types;
  if (!topics.length || !types.length) throw new TypeError("openStream: name at least one topic and one type");
  const base = String(o.url).replace(/\/+$/, "");
  const ended = new Set<string>();
  let es: EventSource | undefined;
  let state: StreamState = "connecting";
  let reason: CloseReason | undefined;
  let lastId = o.lastEventId || undefined;
  let generation = 0;
  // A reopen after the browser gave up, since the last `ready`.
  let retried = false;
  let timer: ReturnType<typeof setTimeout> | undefined;

  const setState = (next: StreamState, why?: CloseReason) => {
    if (next === state) return;
    state = next;
    reason = why;
    o.onStateChange?.(next, why);
  };

  const stop = (why: CloseReason) => {
    if (state === "closed") return;
    generation++;
    clearTimeout(timer);
    es?.close();
    es = undefined;
    setState("closed", why);
  };

  const urlFor = (token: string | undefined) => {
    const url = new URL(
      single ? `${base}/v1/topics/${encodeURIComponent(named[0]!)}/events` : `${base}/v1/events`,
      typeof location === "undefined" ? undefined : location.href,
    );
    const q = url.searchParams;
    if (!single) for (const t of topics) q.append("topic", t);
    q.set("types", types.join(","));
    if (lastId) q.set("last_event_id", lastId);
    else if (o.earliest) q.set("earliest", "true");
    if (token !== undefined) q.set("access_token", token);
    return url;
  };

  const open = async (renewing: boolean) => {
    es?.close();
    es = undefined;
    const mine = ++generation;
    let token: string | undefined;
    try {
      if (o.token) token = await o.token();
      else if (renewing) await o.renew?.();
    } catch (e) {
      if (mine !== generation) return;
      o.onError?.({ code: "token_unavailable", message: String(e) });
      timer = setTimeout(() => void open(renewing), RETRY_MS);
      return;
    }
    if (mine !== generation) return; // closed or reopened meanwhile
    const source = new EventSource(urlFor(token), { withCredentials: !!o.withCredentials });
    es = source;
    const listener = (e: Event) => {
      if (es === source) handle(source, e as MessageEvent<unknown>);
    };
    for (const name of new Set([...CONTROL, ...types])) source.addEventListener(name, listener);
    source.addEventListener("open", () => es === source && setState("open"));
  };

  const reopen = (renewing: boolean) => {
    setState("reconnecting");
    void open(renewing);
  };

  const handle = (source: EventSource, e: MessageEvent<unknown>) => {
    if (typeof e.data !== "string") {
      // EventSource's own error: it retries by itself unless it gave up.
      if (source.readyState !== 2) setState("reconnecting");
      else if (!retried && (o.token || o.renew)) {
        // Maybe a token that expired while the broker was away: once more, fresh.
        retried = true;
        reopen(true);
      } else stop("refused");
      return;
    }
    let d;
    try {
      d = JSON.parse(e.data);
    } catch {
      return;
    }
    if (e.lastEventId) lastId = e.lastEventId;
    if (!d || typeof d !== "object") return;
    if (types.includes(e.type) && typeof d.offset === "number" && typeof d.version === "number") {
      o.onEvent({ ...d, id: e.lastEventId });
      return;
    }
    switch (e.type) {
      case "ready":
        retried = false;
        for (const t of d.topics ?? []) if (t.ended) ended.add(t.topic);
        o.onReady?.(d);
        break;
      case "gap":
        o.onGap?.({ ...d, id: e.lastEventId });
        break;
      case "end":
        ended.add(d.topic);
        o.onEnd?.(d);
        if (single || (named.length === topics.length && named.every((t) => ended.has(t)))) stop("ended");
        break;
      case "error":
        if (d.code === "token_expired") {
          // Before EventSource reconnects with the old token; resume after lastId.
          source.close();
          reopen(true);
        } else {
          o.onError?.(d);
          stop("error");
        }
        break;
      // "shutdown": the connection ends next and EventSource reconnects by itself.
    }
  };

  urlFor(undefined); // a bad `url` throws here, not later
  void open(false);
  return {
    close: () => stop("client"),
    get lastEventId() {
      return lastId;
    },
    get state() {
      return state;
    },
    get closeReason() {
      return reason;
    },
  };
}

/** An event's payload as bytes: base64 decoded, text as UTF-8, JSON re-serialized as UTF-8. */
export function payloadBytes(event: { readonly data: unknown; readonly encoding?: string }): Uint8Array {
  const { data } = event;
  if (event.encoding === "base64") return Uint8Array.from(atob(data as string), (c) => c.charCodeAt(0));
  return new TextEncoder().encode(typeof data === "string" ? data : JSON.stringify(data));
}
