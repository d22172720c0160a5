// Types of tandem-follower (plain JS in lib/, these types written by hand).
import { EventEmitter } from 'node:events';

/** The options of `connect`; every one has a default (see README "Limits and defaults"). */
export interface ConnectOptions {
  /** The leader's Unix socket. Default: `$TANDEM_LEADER_SOCKET`. */
  socket?: string;
  /** The secret presented in Hello. Default: `$TANDEM_TOKEN`, or none. */
  token?: string | null;
  /** Channels named in every Hello; others are opened (`Open`) on first use. Default: none. */
  channels?: string[];
  /** The deadline of a call made without `timeout`, in ms. Default 5000. */
  timeout?: number;
  /** How long `connect` keeps trying to reach a first leader, in ms. Default 30000. */
  connectTimeout?: number;
  /** How long a leader may take to answer Hello, in ms. Default 5000. */
  handshakeTimeout?: number;
  /** A leader silent (or not taking bytes) this long is given up, in ms. Default 5000. */
  peerTimeout?: number;
  /** First reconnect delay, in ms (doubles, with jitter). Default 1. */
  reconnectInitial?: number;
  /** Longest reconnect delay, in ms. Default 1000. */
  reconnectMax?: number;
  /** Longest frame body accepted or sent, in bytes. Default 16 MiB. */
  maxFrameLength?: number;
  /** Calls and publishes outstanding at once; one more fails with `Busy`. Default 4096. */
  maxInFlight?: number;
  /** Values queued per subscription for a slow reader (oldest skipped past it). Default 256. */
  subscriptionBuffer?: number;
}

export interface CallOptions {
  /** The call's deadline in ms, here and at the leader. Default: the client's `timeout`. */
  timeout?: number;
  /** Aborting cancels the call (a `Cancel` is sent) and rejects it with `Cancelled`. */
  signal?: AbortSignal;
  /** Send and resolve at once, with no answer (invoke only). */
  oneway?: boolean;
  /** `request` is already MessagePack bytes (a Uint8Array, else a TypeError), and the response is returned as a Buffer. */
  raw?: boolean;
}

export interface SubscribeOptions {
  /** Overrides the client's `subscriptionBuffer` for this subscription. */
  buffer?: number;
  /** `key` is already MessagePack bytes, and values are returned as Buffers. */
  raw?: boolean;
}

/** One value of a subscription, with its position in the key's history. */
export interface Update<T = unknown> {
  value: T;
  /** The epoch of the leader that delivered it (a BigInt only beyond 2^53 - 1). */
  epoch: number | bigint;
  /** Its sequence number within that epoch. */
  seq: number | bigint;
  /** `cache`: the leader's last-known-good value, served while its upstream is unreachable. */
  source: 'live' | 'cache';
}

export interface WireError {
  kind: 'DeadlineExceeded' | 'Unavailable' | 'Rejected' | 'Upstream' | 'BadRequest' | 'Cancelled' | 'Internal';
  code: string;
  message: string;
}

export type UpstreamState = 'Starting' | 'Ready' | { Down: WireError };

export type State = 'connecting' | 'connected' | 'leaderLost' | 'rejected' | 'closed';

export class Subscription<T = unknown> implements AsyncIterableIterator<Update<T>> {
  readonly channel: string;
  readonly key: unknown;
  /** Resolves once the leader acknowledged the subscription; rejects if it refused. */
  readonly ready: Promise<void>;
  /** Values skipped because this reader fell more than the buffer behind. */
  readonly skipped: number;
  /** Why the leader ended the subscription, once it did. */
  readonly ended: RemoteError | null;
  /** The key's newest value known to this process. */
  latest(): Update<T> | undefined;
  next(): Promise<IteratorResult<Update<T>, undefined>>;
  /** Unsubscribes (what `break` in `for await` calls). */
  return(): Promise<IteratorResult<Update<T>, undefined>>;
  /** Unsubscribes. */
  close(): void;
  [Symbol.asyncIterator](): this;
}

export interface ConnectedInfo {
  epoch: number | bigint;
  leaderPid: number;
  leaderId: string;
}

export class Client extends EventEmitter {
  readonly state: State;
  /** The current (or last) leader's epoch, pid and id (hex). */
  readonly epoch: number | bigint | null;
  readonly leaderPid: number | null;
  readonly leaderId: string | null;
  /** Why the last link ended, or null. */
  readonly lastError: Error | null;
  invoke<T = unknown>(channel: string, request: unknown, options?: CallOptions): Promise<T>;
  publish(channel: string, request: unknown, options?: Omit<CallOptions, 'oneway'>): Promise<void>;
  subscribe<T = unknown>(channel: string, key: unknown, options?: SubscribeOptions): Subscription<T>;
  /** An upstream's state as the leader last reported it. */
  status(channel: string): UpstreamState | undefined;
  close(): Promise<void>;

  on(event: 'state', listener: (state: State, detail?: Error) => void): this;
  on(event: 'connected', listener: (info: ConnectedInfo) => void): this;
  on(event: 'disconnected', listener: (reason: Error) => void): this;
  on(event: 'rejected', listener: (error: Rejected) => void): this;
  on(event: 'reconnectFailed', listener: (error: Error) => void): this;
  on(event: 'status', listener: (channel: string, state: UpstreamState) => void): this;
  on(event: 'warning', listener: (error: Error | null, message: string) => void): this;
  on(event: string, listener: (...args: any[]) => void): this;
}

export function connect(options?: ConnectOptions): Promise<Client>;

/**
 * How `ready()` told the supervisor: `'stream'` (written to
 * `TANDEM_NOTIFY_STREAM`, under `tandem run`), `'datagram'` (sent to
 * `NOTIFY_SOCKET`: the Python client only, Node.js has no Unix datagrams),
 * `'none'` (neither variable set: not supervised, nothing sent),
 * `'unsupported'` (only `NOTIFY_SOCKET` set, as under systemd: nothing sent).
 */
export type ReadyVia = 'stream' | 'datagram' | 'none' | 'unsupported';

export interface ReadyOptions {
  /** The environment to read. Default: `process.env`. */
  env?: Record<string, string | undefined>;
}

/**
 * Tells the supervisor this program is ready (`READY=1`, systemd's
 * readiness line). Rejects when the notification socket cannot be written
 * (within 5 s).
 */
export function ready(options?: ReadyOptions): Promise<ReadyVia>;

export const PROTOCOL_VERSION: 1;
export const DEFAULTS: Readonly<Required<Omit<ConnectOptions, 'socket' | 'token'>>>;

export class TandemError extends Error {
  /** Whether retrying later may succeed. */
  readonly retryable: boolean;
  /** Whether it is a deadline expiry (here or at the leader). */
  readonly timeout: boolean;
}
export class DeadlineExceeded extends TandemError {
  readonly timeoutMs: number;
}
export class LeaderLost extends TandemError {}
export class Rejected extends TandemError {
  readonly kind: string;
  /** `token`, `version`, `channel` or `protocol`. */
  readonly code: string;
  readonly reason: string;
}
export class RemoteError extends TandemError {
  readonly kind: WireError['kind'];
  readonly code: string;
  /** The wire `message` (`message` itself also names kind and code). */
  readonly reason: string;
  toJSON(): WireError;
}
export class ProtocolError extends TandemError {
  /** `malformed`, `too_large`, `truncated`, `unexpected` or `handshake`. */
  readonly code: string;
}
export class Cancelled extends TandemError {}
export class Closed extends TandemError {}
export class NotReady extends TandemError {}
export class TooLarge extends TandemError {}
export class Busy extends TandemError {
  readonly limit: number;
}

/** The wire layer, for tests and conformance drivers. */
export const codec: {
  encodeFrame(frame: { kind: string; [field: string]: unknown }): Buffer;
  encodeBody(frame: { kind: string; [field: string]: unknown }): Uint8Array;
  decodeBody(body: Uint8Array): { kind: string; [field: string]: unknown };
  encodeValue(value: unknown): Uint8Array;
  decodeValue(bytes: Uint8Array): unknown;
  readonly FRAME_KINDS: readonly string[];
  FrameReader: new (maxFrameLength?: number) => { push(chunk: Buffer): Buffer[]; end(): void };
  readonly DEFAULT_MAX_FRAME_LENGTH: number;
};
