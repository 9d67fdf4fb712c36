/** Errors of the ringcast client, each with the protocol's error code where the broker sent one. */

import type { ErrorCode } from "./protocol.js";

/** Codes the client itself raises, beside the broker's. */
export type ClientErrorCode =
  /** The connection dropped before the reply came; the request may or may not have been served. */
  | "ConnectionLost"
  /** The client was closed (by `close()`, its `AbortSignal`, or a final refusal). */
  | "Closed"
  /** No reply within `requestTimeoutMs`. */
  | "Timeout"
  /** The operation's `AbortSignal` fired. */
  | "Aborted"
  /** The connection could not be established (refused, timed out, closed before `Welcome`). */
  | "ConnectFailed";

/** The broker's codes after which the same request (or connection) may succeed later unchanged. */
const RETRYABLE: ReadonlySet<string> = new Set([
  "TooManyConnections",
  "Internal",
  "ShuttingDown",
  "OverCapacity",
  "RateLimited",
  "ConnectionLost",
  "Timeout",
  "ConnectFailed",
]);

/** Whether a request that failed with `code` may be retried unchanged (after a backoff). */
export function isRetryable(code: ErrorCode | ClientErrorCode): boolean {
  return RETRYABLE.has(code);
}

/** Any failure of a ringcast request: the broker's `Error` / `RetryLater`, or a client-side one. */
export class RingcastError extends Error {
  /** The protocol's error code (`docs/protocol.md`, "Error codes"), or a client code. Match on this, not on `message`. */
  readonly code: ErrorCode | ClientErrorCode;
  /** For `RetryLater`: how long to wait before retrying. */
  readonly retryAfterMs: number | undefined;

  constructor(code: ErrorCode | ClientErrorCode, message: string, retryAfterMs?: number) {
    super(message);
    this.name = "RingcastError";
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }

  /** Whether the same request may succeed later unchanged. */
  get retryable(): boolean {
    return isRetryable(this.code);
  }
}

/** An `append` whose expected offset or version did not hold; nothing was stored. */
export class PositionMismatchError extends RingcastError {
  /** The topic's last offset now. */
  readonly currentOffset: number;
  /** The last version of the batch's event type now. */
  readonly currentVersion: number;

  constructor(message: string, currentOffset: number, currentVersion: number) {
    super("PositionMismatch", message);
    this.name = "PositionMismatchError";
    this.currentOffset = currentOffset;
    this.currentVersion = currentVersion;
  }
}
