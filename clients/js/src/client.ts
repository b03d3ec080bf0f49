import { ConnectionClosedError, ForbiddenError, ProtocolError, ServerError, StreamBusError, UnauthorizedError } from "./errors.js";
import { type BusEvent, parseEvent } from "./events.js";
import { StreamText } from "./stream.js";

/** The part of the WebSocket API this client uses (the browser's, Node 22's global, or the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket constructor. The third argument (options with `headers`) is what the `ws` package takes. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[], options?: { headers: Record<string, string> }) => WebSocketLike;

/** Which streams to receive (all given filters must match; none: every stream). */
export interface Filters {
  streams?: string[];
  models?: string[];
  providers?: string[];
  meta?: Record<string, string | number | boolean | null | Array<string | number | boolean | null>>;
}

/** Options of {@link StreamBusClient}. */
export interface ClientOptions {
  /** `ws://host:port/ws` (or `wss://`). */
  url: string;
  /** Bearer token; sent as `?token=` unless `tokenIn` is `header`. */
  token?: string;
  /** `query` (default, works in browsers) or `header` (`Authorization: Bearer`, for a constructor that takes headers, such as `ws`'s). */
  tokenIn?: "query" | "header";
  /** The WebSocket constructor; default `globalThis.WebSocket` (browsers, Node >= 22). In Node 20 pass `ws`'s. */
  WebSocket?: WebSocketConstructor;
  filters?: Filters;
  /** Ask for the text so far of live streams on (re)connect (default true: needed to refill a stream the server could not resume). */
  snapshot?: boolean;
  /** Recently ended streams to receive on the first connect (default 0). */
  recent?: number;
  /** Reconnect delay: the n-th retry waits a random time in [0, min(max, initial * 2^n)] ms ("full jitter"). */
  backoff?: { initial?: number; max?: number };
  /** Ended streams kept in {@link StreamBusClient.streams} (oldest dropped first; default 1000). */
  maxEnded?: number;
  /** Random source for the jitter (tests pass a fixed one). */
  random?: () => number;
}

/** What a `subscribed` frame reported, as passed to `subscribed` listeners. */
export interface SubscribedInfo {
  /** The request carried `since`. */
  recovering: boolean;
  /** Every missed event follows (only meaningful when `recovering`). */
  recovered: boolean;
  replayed: number;
  snapshot: number;
  recent: number;
  streams: string[];
  /** Streams whose text was cleared because the server could not resume them (refilled by a snapshot if live). */
  reset: string[];
  /** Why the client reloaded instead of resuming: `unrecovered` (history gone), `too_large`, `too_many_streams` (more than `max_subscribe_streams`). */
  reloadReason: string | null;
}

/** What the server answered to {@link StreamBusClient.stop}. */
export interface StopResult {
  stream: string;
  /** `stopped` (its producer runs on that server), `forwarded` (stopped on the host that owns it) or `ended` (it had already ended: nothing to do). */
  outcome: "stopped" | "forwarded" | "ended";
}

/** Connection state. */
export type ConnectionState = "connecting" | "live" | "reconnecting" | "closed";

/** Counters for dashboards and tests. */
export interface ClientStats {
  connects: number;
  resumes: number;
  recoveredEvents: number;
  resets: number;
  duplicates: number;
  events: number;
}

interface Listeners {
  event: (event: BusEvent, stream: StreamText) => void;
  stream: (stream: StreamText) => void;
  subscribed: (info: SubscribedInfo) => void;
  state: (state: ConnectionState, detail: { code?: number; reason?: string; retryIn?: number }) => void;
  error: (error: StreamBusError) => void;
}

const FATAL_CLOSE = new Set([1009, 4001, 4004, 4005]);

/**
 * Follows the streams of a streambus WebSocket broadcaster (docs/websocket-protocol.md): it
 * subscribes, assembles each stream's text, reconnects with jittered backoff and resumes with
 * `since`. When the server cannot resume (`recovered: false`) it clears the affected streams and
 * refills them from a snapshot, so it never shows text with a hole.
 *
 * ```ts
 * const bus = new StreamBusClient({ url: "ws://127.0.0.1:8765/ws" });
 * bus.on("stream", (s) => s.onChange((v) => render(v.id, v.text)));
 * await bus.connect();
 * ```
 */
export class StreamBusClient {
  /** Every stream seen, by id (ended ones up to `maxEnded`). */
  readonly streams = new Map<string, StreamText>();
  readonly stats: ClientStats = { connects: 0, resumes: 0, recoveredEvents: 0, resets: 0, duplicates: 0, events: 0 };
  /** The server's `hello` of the current connection (`session`, `limits`, `history`). */
  hello: Record<string, any> | null = null;
  private opts: ClientOptions;
  private ws: WebSocketLike | null = null;
  private st: ConnectionState = "closed";
  private attempt = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private stopped = false;
  private subscribedOnce = false;
  private reloadReason: string | null = null;
  private pendingReset: string[] = [];
  private ended: string[] = [];
  private first: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private stops = new Map<string, { resolve: (r: StopResult) => void; reject: (e: Error) => void }>();
  private stopCount = 0;
  private listeners: { [K in keyof Listeners]: Set<Listeners[K]> } = {
    event: new Set(),
    stream: new Set(),
    subscribed: new Set(),
    state: new Set(),
    error: new Set(),
  };

  constructor(options: ClientOptions) {
    if (!/^wss?:\/\//.test(options.url)) throw new TypeError(`url: expected ws:// or wss://, got ${JSON.stringify(options.url)}`);
    this.opts = options;
  }

  /** The connection state. */
  get state(): ConnectionState {
    return this.st;
  }

  /** Listen to `event`, `stream` (a new stream appeared), `subscribed`, `state` or `error`; returns the remover. */
  on<K extends keyof Listeners>(type: K, listener: Listeners[K]): () => void {
    this.listeners[type].add(listener);
    return () => this.listeners[type].delete(listener);
  }

  /** The stream with this id, if seen. */
  stream(id: string): StreamText | undefined {
    return this.streams.get(id);
  }

  /**
   * Open the connection. Resolves at the first `subscribed`; rejects with
   * {@link UnauthorizedError}, {@link ProtocolError} or {@link ConnectionClosedError} when the
   * client gives up before that. Later drops reconnect by themselves.
   */
  connect(): Promise<void> {
    if (this.st !== "closed") return Promise.reject(new StreamBusError(`connect: the client is already ${this.st}; call close() first`));
    this.stopped = false;
    const done = new Promise<void>((resolve, reject) => (this.first = { resolve, reject }));
    this.open();
    return done;
  }

  /** Close for good (no reconnect). */
  close(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000, "client closed");
    this.failStops(1000, "client closed");
    this.setState("closed", {});
    this.first?.reject(new ConnectionClosedError(1000, "client closed"));
    this.first = null;
  }

  /** Drop the connection as a network failure would; the client reconnects and resumes. */
  reconnect(): void {
    if (this.ws) this.ws.close(4000, "reconnect requested by client");
  }

  /**
   * Stop a stream wherever its producer runs (the protocol's `abort` operation). Resolves with the
   * server's answer once it took the stop; the stream's one `abort` event (`by: "client"`) then
   * reaches every subscriber, this client's streams included. Rejects with {@link ServerError}
   * (`unknown_stream`, `forbidden`, `stop_failed`, `bad_message`) or, when the client is not
   * connected or the connection drops before the answer, {@link ConnectionClosedError}.
   *
   * ```ts
   * const { outcome } = await bus.stop(streamId, { reason: "user pressed stop" });
   * ```
   */
  stop(streamId: string, options: { reason?: string } = {}): Promise<StopResult> {
    if (typeof streamId !== "string" || !streamId) return Promise.reject(new TypeError("stop: streamId must be a non-empty string"));
    const ws = this.ws;
    if (!ws || ws.readyState !== 1 || this.hello === null) {
      return Promise.reject(new ConnectionClosedError(0, "not connected", `stop: the client is ${this.st}; connect first`));
    }
    const id = `stop-${++this.stopCount}`;
    return new Promise<StopResult>((resolve, reject) => {
      this.stops.set(id, { resolve, reject });
      ws.send(JSON.stringify({ op: "abort", id, stream: streamId, ...(options.reason ? { reason: options.reason } : {}) }));
    });
  }

  private failStops(code: number, reason: string): void {
    for (const pending of this.stops.values()) pending.reject(new ConnectionClosedError(code, reason, `stop: the connection closed before the server answered (${code})`));
    this.stops.clear();
  }

  private emit<K extends keyof Listeners>(type: K, ...args: Parameters<Listeners[K]>): void {
    for (const l of this.listeners[type]) (l as (...a: unknown[]) => void)(...args);
  }

  private setState(state: ConnectionState, detail: { code?: number; reason?: string; retryIn?: number }): void {
    this.st = state;
    this.emit("state", state, detail);
  }

  private fail(error: StreamBusError): void {
    this.emit("error", error);
    if (this.first) {
      this.first.reject(error);
      this.first = null;
    }
  }

  private open(): void {
    const { token, tokenIn = "query" } = this.opts;
    const Ctor = this.opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      this.stopped = true;
      this.fail(new StreamBusError("no WebSocket constructor: pass the `WebSocket` option (in Node 20: `import WebSocket from \"ws\"`)"));
      return;
    }
    this.setState(this.subscribedOnce ? "reconnecting" : "connecting", {});
    let url = this.opts.url;
    let socket: WebSocketLike;
    if (token && tokenIn === "header") {
      socket = new Ctor(url, [], { headers: { Authorization: `Bearer ${token}` } });
    } else {
      if (token) url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
      socket = new Ctor(url);
    }
    this.ws = socket;
    socket.onopen = () => {
      this.stats.connects++;
    };
    socket.onmessage = (m) => {
      if (this.ws !== socket) return;
      try {
        this.receive(m.data, socket);
      } catch (err) {
        // A frame we cannot read may have carried an event: reconnect and resume rather than show a hole.
        const error = err instanceof StreamBusError ? err : new ProtocolError(String(err));
        this.fail(error);
        if (error instanceof ProtocolError && error.field === "$.protocol") {
          this.stopped = true;
          socket.close(1002, "unsupported protocol");
          this.setState("closed", {});
        } else socket.close(4000, "malformed frame");
      }
    };
    socket.onerror = () => {};
    socket.onclose = (e) => this.closed(socket, e.code, e.reason);
  }

  private closed(socket: WebSocketLike, code: number, reason: string): void {
    if (this.ws !== socket) return;
    this.ws = null;
    this.failStops(code, reason);
    if (this.stopped) return;
    if (FATAL_CLOSE.has(code)) {
      this.stopped = true;
      this.setState("closed", { code, reason });
      this.fail(
        code === 4001
          ? new UnauthorizedError(4001, `unauthorized (close 4001): ${this.opts.token ? "the token was refused" : "the server needs a token"}`)
          : code === 4005
            ? new UnauthorizedError(4005, "token expired (close 4005): connect again with a new token")
            : new ConnectionClosedError(code, reason),
      );
      return;
    }
    const { initial = 250, max = 5000 } = this.opts.backoff ?? {};
    const ceiling = Math.min(max, initial * 2 ** this.attempt);
    const wait = Math.round((this.opts.random ?? Math.random)() * ceiling);
    this.attempt++;
    this.setState("reconnecting", { code, reason, retryIn: wait });
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.stopped) this.open();
    }, wait);
  }

  private receive(data: unknown, socket: WebSocketLike): void {
    if (typeof data !== "string") throw new ProtocolError("the server sent a binary frame; protocol 1 has only JSON text frames");
    let msg: unknown;
    try {
      msg = JSON.parse(data);
    } catch {
      throw new ProtocolError(`the server sent a frame that is not JSON: ${data.slice(0, 80)}`);
    }
    if (typeof msg !== "object" || msg === null || Array.isArray(msg)) throw new ProtocolError("the server sent a frame that is not a JSON object");
    const m = msg as Record<string, any>;
    if ("op" in m) this.control(m, socket);
    else if ("type" in m) this.event(parseEvent(m));
    else throw new ProtocolError("the server sent a frame with neither `op` nor `type`");
  }

  private event(event: BusEvent): void {
    let s = this.streams.get(event.stream);
    if (!s) {
      s = new StreamText(event.stream);
      this.streams.set(event.stream, s);
      this.emit("stream", s);
    }
    if (!s.apply(event)) {
      this.stats.duplicates++;
      return;
    }
    this.stats.events++;
    if (s.ended) this.retire(event.stream);
    this.emit("event", event, s);
  }

  private retire(id: string): void {
    this.ended.push(id);
    const keep = this.opts.maxEnded ?? 1000;
    while (this.ended.length > keep) {
      const old = this.ended.shift()!;
      if (this.streams.get(old)?.ended) this.streams.delete(old);
    }
  }

  private control(m: Record<string, any>, socket: WebSocketLike): void {
    switch (m.op) {
      case "hello":
        if (m.protocol !== 1) throw new ProtocolError(`$.protocol: this client speaks protocol 1, the server ${JSON.stringify(m.protocol)}`, "$.protocol");
        this.hello = m;
        socket.send(JSON.stringify(this.subscribeRequest()));
        break;
      case "subscribed":
        this.subscribed(m);
        break;
      case "aborted": {
        const pending = typeof m.id === "string" ? this.stops.get(m.id) : undefined;
        if (pending) {
          this.stops.delete(m.id);
          pending.resolve({ stream: String(m.stream), outcome: m.outcome });
        }
        break;
      }
      case "error": {
        const error =
          m.code === "forbidden"
            ? new ForbiddenError(String(m.message ?? ""), m.field)
            : new ServerError(String(m.code), String(m.message ?? ""), m.field);
        const stop = typeof m.id === "string" ? this.stops.get(m.id) : undefined;
        if (stop) {
          this.stops.delete(m.id);
          stop.reject(error);
          break;
        }
        if (error instanceof ForbiddenError) {
          // A subscribe outside the token's scope: nothing was subscribed, so connect() cannot resolve.
          this.fail(error);
          break;
        }
        if (m.code === "too_many_streams") {
          // Too many streams to resume in one request: reload them all from a snapshot instead.
          this.pendingReset = this.resetUnfinished();
          this.reloadReason = "too_many_streams";
          socket.send(JSON.stringify({ ...this.baseRequest(), snapshot: true }));
        }
        this.emit("error", error);
        break;
      }
      default: // pong, unsubscribed, and ops of newer servers
    }
  }

  private baseRequest(): Record<string, unknown> {
    return { op: "subscribe", id: "client", ...(this.opts.filters ?? {}) };
  }

  private subscribeRequest(): Record<string, unknown> {
    const req: Record<string, unknown> = { ...this.baseRequest(), snapshot: this.opts.snapshot ?? true };
    this.reloadReason = null;
    if (!this.subscribedOnce) {
      if (this.opts.recent) req.recent = this.opts.recent;
      return req;
    }
    const since: Record<string, number> = {};
    for (const [id, s] of this.streams) if (!s.ended && s.lastSeq >= 0) since[id] = s.lastSeq;
    const limit = this.hello?.limits?.max_subscribe_streams;
    if (limit && Object.keys(since).length + (this.opts.filters?.streams?.length ?? 0) > limit) {
      this.pendingReset = this.resetUnfinished();
      this.reloadReason = "too_many_streams";
    } else req.since = since;
    return req;
  }

  private resetUnfinished(): string[] {
    const ids: string[] = [];
    for (const [id, s] of this.streams) {
      if (!s.ended && s.lastSeq >= 0) {
        s.reset();
        ids.push(id);
      }
    }
    this.stats.resets += ids.length;
    return ids;
  }

  private subscribed(m: Record<string, any>): void {
    this.attempt = 0;
    let reset = this.pendingReset;
    this.pendingReset = [];
    if (m.recovering && m.recovered) {
      this.stats.resumes++;
      this.stats.recoveredEvents += m.replayed ?? 0;
    } else if (m.recovering) {
      // All or nothing: nothing was replayed, so every resumed stream is cleared and refilled by the snapshot.
      reset = reset.concat(this.resetUnfinished());
      this.reloadReason = m.reason === "too_large" ? "too_large" : "unrecovered";
    }
    this.subscribedOnce = true;
    this.setState("live", {});
    this.emit("subscribed", {
      recovering: !!m.recovering,
      recovered: !!m.recovered,
      replayed: m.replayed ?? 0,
      snapshot: m.snapshot ?? 0,
      recent: m.recent ?? 0,
      streams: Array.isArray(m.streams) ? m.streams : [],
      reset,
      reloadReason: this.reloadReason,
    });
    if (this.first) {
      this.first.resolve();
      this.first = null;
    }
  }
}
