// Types of @herald/client: the gateway's /client.js (gateway/static/client.js),
// which dist/index.js is a byte-for-byte copy of. Keep the two in step:
// test/surface.test.mjs fails when a runtime export or option has no type here.

/** Connection states, in `client.state` and the `"state"` event. */
export type ConnectionState =
  | "connecting"
  | "connected"
  | "reconnecting"
  | "fallback:sse"
  | "fallback:poll"
  | "offline"
  | "failed";

export declare const STATES: readonly ConnectionState[];

export type Transport = "ws" | "sse" | "poll";

/** Any JSON value (what `data`, `params` and RPC results can be). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface HeraldOptions {
  /** The gateway's base URL (`http(s)://host[:port]`); default: the page's origin. */
  url?: string;
  /** A JWT; sent in the WebSocket's first `auth` message. */
  token?: string;
  /** Returns a fresh JWT: called before expiry and after a 4001 close. */
  getToken?: () => Promise<string>;
  /** Transports in the order to try; default `["ws", "sse", "poll"]`. */
  transports?: Transport[];
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  refreshBeforeMs?: number;
  pollIntervalMs?: number;
  openTimeoutMs?: number;
  retryWebSocketMs?: number;
  historyLimit?: number;
  /** SSE authenticates with the `herald_token` cookie instead of `?token=`. */
  sseCookie?: boolean;
  /** Consecutive failed tries before the client gives up (state `failed`); default Infinity. */
  maxAttempts?: number;
  /** `rpc`/`publish` calls held while offline; beyond it they reject with `queue_full`. Default 100. */
  maxQueue?: number;
  /** A sent `rpc`/`publish` with no answer by then rejects with `timeout`. Default 10000. */
  requestTimeoutMs?: number;
  /** Log states, retries and frames with `console.debug`. */
  debug?: boolean;
}

export interface HeraldStats {
  /** Successful re-connections (not attempts). */
  reconnects: number;
  duplicates: number;
  gapsFilled: number;
  resets: number;
  refreshes: number;
  toldToReconnect: number;
  /** The last ping round trip in ms (WebSocket), null before the first pong. */
  latency: number | null;
  /** When the current (or last) connection said `connected` (ms since the epoch). */
  connectedAt: number | null;
  /** When the last publication was handed to a callback (ms since the epoch). */
  lastMessageAt: number | null;
}

/** A publication, as the `message` frame carries it (PROTOCOL.md). */
export interface HeraldMessage<T = Json> {
  type: "message";
  channel: string;
  event: string;
  data: T;
  epoch: string;
  offset: number;
  timestamp?: string;
  [key: string]: unknown;
}

/** An `error` frame (a refused subscribe, or the client giving up). */
export interface HeraldErrorInfo {
  code: string;
  message: string;
  channel?: string;
  id?: number;
}

/** The latest `data` of each event of a channel (state namespaces such as `job:`). */
export type ChannelState = Record<string, Json> | null;

export interface StateInfo {
  epoch: string;
  offset: number;
  /** True when the history was lost and this replaces what came before. */
  reset: boolean;
}

export interface ChannelCallbacks<T = Json> {
  onMessage?: (message: HeraldMessage<T>) => void;
  onState?: (state: ChannelState, info: StateInfo) => void;
  onError?: (error: HeraldErrorInfo) => void;
}

export interface Subscription {
  unsubscribe(): void;
}

/** Where a publication landed. */
export interface Position {
  channel: string;
  epoch: string;
  offset: number;
}

export interface RequestOptions {
  timeoutMs?: number;
}

/**
 * A refused or failed `rpc`/`publish`. `code` is a protocol error code
 * (`forbidden`, `not_found`, `unavailable`, ...) or one of the client's own:
 * `queue_full`, `timeout`, `disconnected` (outcome unknown), `closed`, `failed`.
 */
export declare class HeraldError extends Error {
  constructor(code: string, message: string);
  readonly code: string;
  readonly detail: string;
}

export interface ClientEvents {
  state: (state: ConnectionState, previous: ConnectionState) => void;
  message: (message: HeraldMessage) => void;
  connected: (frame: Record<string, unknown>) => void;
  error: (error: HeraldErrorInfo | unknown) => void;
}

export declare class HeraldClient {
  constructor(options?: HeraldOptions);
  /** The options in force: the defaults, then yours. */
  readonly options: Readonly<HeraldOptions>;
  readonly url: string;
  readonly user: string | null;
  readonly state: ConnectionState;
  readonly transport: Transport | null;
  readonly stats: Readonly<HeraldStats>;
  on<E extends keyof ClientEvents>(event: E, fn: ClientEvents[E]): () => void;
  subscribe<T = Json>(channel: string, callbacks?: ChannelCallbacks<T>): Subscription;
  rpc<R = Json>(method: string, params?: Json, options?: RequestOptions): Promise<R>;
  publish(channel: string, event: string, data: Json, options?: RequestOptions): Promise<Position>;
  connect(): this;
  close(): void;
}

/** Capped exponential backoff with full jitter: uniform in [0, min(cap, base*2^attempt)]. */
export declare function backoffDelay(
  attempt: number,
  baseMs: number,
  capMs: number,
  random?: () => number,
): number;

export default HeraldClient;
