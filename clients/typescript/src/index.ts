/**
 * ringcast for Node: the TCP client (`Client`), its errors, and the wire
 * types. The browser helper is `ringcast/browser`; the raw codec is
 * `ringcast/protocol`.
 */

export {
  Client,
  Consumer,
  DEFAULT_GROUP_SETTINGS,
  Delivery,
  PatternSubscription,
  RingcastEvent,
  Subscription,
  jwtExpiryMs,
} from "./client.js";
export type {
  ClientOptions,
  ConsumeOptions,
  ConsumerItem,
  End,
  EventInput,
  Gap,
  GroupSettings,
  HistoryPage,
  Joined,
  PatternItem,
  PatternOptions,
  PayloadInput,
  PublishAck,
  ServerInfo,
  Settled,
  StartOption,
  SubscribeOptions,
  SubscriptionItem,
  TokenProvider,
} from "./client.js";
export { PositionMismatchError, RingcastError, isRetryable } from "./errors.js";
export type { ClientErrorCode } from "./errors.js";
export { PROTOCOL_VERSION } from "./protocol.js";
export type {
  ErrorCode,
  GapReason,
  Headers,
  TopicPosition,
  TopicSummary,
  WireConnection,
  WireGroupInfo,
  WireTopicInfo,
} from "./protocol.js";
