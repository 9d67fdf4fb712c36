/**
 * Where a subscription stands, so that it resumes on a new connection
 * without a duplicate or a hole. Pure bookkeeping, no I/O: the client feeds
 * it what the broker says and asks it for the next `Subscribe`'s start.
 *
 * The position is `(epoch, offset)`: every event of that epoch up to
 * `offset` was handed to the caller or reported lost by a gap. Once known, a
 * resume is `AfterOffset`. Before that the original start is replayed:
 * `Live` learns its position from the first `Subscribed` (`next_offset - 1`);
 * `AfterOffset` is its own position; `Earliest` stays `Earliest` until the
 * first event; `AfterVersions` resumes by offset once an event was
 * delivered, with a client-side filter below the start of live so that the
 * replay stays the one the broker would have made (as the Rust SDK does).
 */

import type { Start, TopicPosition, WireEvent, WireGap } from "./protocol.js";

/** Resume state of one topic subscription. */
export class Resume {
  private start: Start;
  private position: [bigint, number] | null;
  /** The epoch of the events arriving now (from `Subscribed`, then gaps). */
  epoch: bigint | null = null;
  private liveFrom: number | null = null;

  constructor(start: Start) {
    this.start = cloneStart(start);
    this.position = start.type === "AfterOffset" ? [start.epoch, start.offset] : null;
  }

  /** The start of the next `Subscribe`. */
  next(): Start {
    if (this.position) return { type: "AfterOffset", epoch: this.position[0], offset: this.position[1] };
    return cloneStart(this.start);
  }

  /** The last `(epoch, offset)` accounted for, once known. */
  get at(): { epoch: bigint; offset: number } | null {
    return this.position ? { epoch: this.position[0], offset: this.position[1] } : null;
  }

  /** The broker confirmed a `Subscribe` sent with `next()`. */
  onSubscribed(epoch: bigint, nextOffset: number): void {
    this.epoch = epoch;
    if (this.position) return; // resumed by offset: a gap follows if the epoch differs
    if (this.start.type === "Live") this.position = [epoch, Math.max(0, nextOffset - 1)];
    else if (this.start.type === "AfterVersions") this.liveFrom = nextOffset;
  }

  /** Records an event handed to the caller; false when it must be dropped (a repeat, or outside a versions replay). */
  onEvent(event: WireEvent): boolean {
    const epoch = this.epoch;
    if (this.position && epoch !== null && this.position[0] === epoch && event.offset <= this.position[1]) {
      return false;
    }
    if (this.start.type === "AfterVersions") {
      if (this.position && this.replayExcludes(event)) return false;
      const replaying = this.liveFrom === null || event.offset < this.liveFrom;
      if (replaying) {
        if (epoch === null) return true;
        setVersion(this.start.versions, event.eventType, event.version);
        this.position = [epoch, event.offset];
        return true;
      }
    }
    if (epoch !== null) this.position = [epoch, event.offset];
    return true;
  }

  /** Records a gap handed to the caller. */
  onGap(gap: WireGap): void {
    this.epoch = gap.epoch;
    if (gap.eventType === null) {
      this.position = [gap.epoch, gap.current];
    } else if (this.start.type === "AfterVersions") {
      this.start.epoch = gap.epoch;
      setVersion(this.start.versions, gap.eventType, gap.current);
    }
  }

  private replayExcludes(event: WireEvent): boolean {
    if (this.liveFrom === null || this.start.type !== "AfterVersions") return false;
    if (event.offset >= this.liveFrom) return false;
    const named = this.start.versions.find(([t]) => t === event.eventType);
    return named ? event.version <= named[1] : true;
  }
}

function cloneStart(s: Start): Start {
  return s.type === "AfterVersions" ? { ...s, versions: s.versions.map(([t, v]) => [t, v]) } : { ...s };
}

function setVersion(versions: [string, number][], type: string, version: number): void {
  const have = versions.find(([t]) => t === type);
  if (have) have[1] = Math.max(have[1], version);
  else versions.push([type, version]);
}

/** Resume state of a pattern subscription: one position per topic. */
export class PatternResume {
  /** Every topic's position, by name. */
  readonly topics = new Map<string, TopicPosition>();
  /** Whether a `PatternSubscribed` came: from then on a resubscribe sends positions. */
  started = false;

  constructor(positions?: TopicPosition[]) {
    if (positions) {
      this.started = true;
      for (const p of positions) this.topics.set(p.topic, { ...p });
    }
  }

  /** The `positions` of the next `SubscribePattern`. */
  next(): TopicPosition[] | null {
    return this.started ? [...this.topics.values()].map((p) => ({ ...p })) : null;
  }

  /** `PatternSubscribed`: keep our own positions for topics we sent, take the server's for the others, forget the rest. */
  onSubscribed(listed: TopicPosition[]): void {
    const sent = this.started ? this.topics : new Map<string, TopicPosition>();
    const next = new Map<string, TopicPosition>();
    for (const p of listed) next.set(p.topic, sent.get(p.topic) ?? { ...p });
    this.topics.clear();
    for (const [k, v] of next) this.topics.set(k, v);
    this.started = true;
  }

  /** `TopicJoined`. */
  onJoined(p: TopicPosition): void {
    this.topics.set(p.topic, { ...p });
  }

  /** An event handed over; false for a repeat (dropped). */
  onEvent(event: WireEvent): boolean {
    const p = this.topics.get(event.topic);
    if (!p) return true;
    if (event.offset <= p.offset) return false;
    p.offset = event.offset;
    return true;
  }

  /** A gap handed over (epoch 0: the topic is gone). */
  onGap(gap: WireGap): void {
    if (gap.eventType !== null) return;
    if (gap.epoch === 0n) {
      this.topics.delete(gap.topic);
      return;
    }
    this.topics.set(gap.topic, { topic: gap.topic, epoch: gap.epoch, offset: gap.current, ended: false });
  }

  /** An `End` of one topic. */
  onEnd(topic: string, lastOffset: number): void {
    const p = this.topics.get(topic);
    if (!p) return;
    p.ended = true;
    p.offset = Math.max(p.offset, lastOffset);
  }
}
