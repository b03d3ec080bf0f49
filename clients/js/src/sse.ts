import { HttpError, ProtocolError, StreamBusError, UnauthorizedError } from "./errors.js";

/** One server-sent event. */
export interface SSEMessage {
  /** `event:` name; `message` when absent. */
  event: string;
  data: string;
  /** The `id:` of this event, or the last one seen before it (what `Last-Event-ID` resumes from). */
  id: string;
  retry?: number;
}

/**
 * Sans-I/O SSE parser (the WHATWG rules): feed it decoded text chunks with {@link SSEParser.push},
 * get complete events back. Comments (`: keepalive`) are skipped.
 */
export class SSEParser {
  private buf = "";
  private data: string[] = [];
  private event = "";
  private retry: number | undefined;
  /** The last event id seen. */
  lastEventId = "";

  /** Parse a chunk of text; returns the events it completed. */
  push(chunk: string): SSEMessage[] {
    this.buf += chunk;
    const out: SSEMessage[] = [];
    let nl: number;
    while ((nl = this.buf.search(/\r\n|\r|\n/)) >= 0) {
      // A lone \r at the very end may be the first half of \r\n: wait for more.
      if (this.buf[nl] === "\r" && nl === this.buf.length - 1) break;
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + (this.buf.startsWith("\r\n", nl) ? 2 : 1));
      this.line(line, out);
    }
    return out;
  }

  private line(line: string, out: SSEMessage[]): void {
    if (line === "") {
      if (this.data.length) {
        const msg: SSEMessage = { event: this.event || "message", data: this.data.join("\n"), id: this.lastEventId };
        if (this.retry !== undefined) msg.retry = this.retry;
        out.push(msg);
      }
      this.data = [];
      this.event = "";
      this.retry = undefined;
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }
}

/** Options of {@link readSSE}. */
export interface SSEOptions {
  /** Bearer token (sent as `Authorization: Bearer`). */
  token?: string;
  headers?: Record<string, string>;
  /** Resume after this event id (`<stream>:<seq>`). */
  lastEventId?: string;
  signal?: AbortSignal;
  /** Reconnect after a dropped connection (default true), resuming from the last id. */
  reconnect?: boolean;
  /** Reconnect delay in ms before the server's `retry` arrives (default 1000); jittered. */
  retryMs?: number;
  /** Give up after this many consecutive failed reconnects (default 10). */
  maxRetries?: number;
  /** The `fetch` to use (default `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Called before each reconnect. */
  onReconnect?: (info: { lastEventId: string; attempt: number; error: unknown }) => void;
}

async function failure(res: Response, url: string): Promise<StreamBusError> {
  const body = await res.text().catch(() => "");
  return res.status === 401 ? new UnauthorizedError(401, `HTTP 401 from ${url}: ${body.trim() || "missing or wrong bearer token"}`) : new HttpError(res.status, body, url);
}

/**
 * Read an SSE output of the http sink (`/streams/{id}/sse`, `/events/sse?...`) with `fetch`,
 * so headers and tokens work. Yields every event; after a dropped connection it reconnects
 * with `Last-Event-ID` and continues without gap or duplicate. It ends when the server closes
 * the response normally or answers `204` (resume after the terminal event).
 *
 * When the events after `Last-Event-ID` were evicted, the server sends `event: reset` (data
 * `{"recovered": false, ...}`) first: the caller must drop what it shows and rebuild from what
 * follows. An HTTP error before the body throws {@link HttpError} / {@link UnauthorizedError}.
 */
export async function* readSSE(url: string, options: SSEOptions = {}): AsyncGenerator<SSEMessage> {
  const doFetch = options.fetch ?? globalThis.fetch;
  let lastEventId = options.lastEventId ?? "";
  let retryMs = options.retryMs ?? 1000;
  let failures = 0;
  for (;;) {
    const headers: Record<string, string> = { Accept: "text/event-stream", ...(options.headers ?? {}) };
    if (options.token) headers.Authorization = `Bearer ${options.token}`;
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    let res: Response;
    try {
      res = await doFetch(url, { headers, signal: options.signal ?? null });
    } catch (error) {
      if (options.signal?.aborted || options.reconnect === false || ++failures > (options.maxRetries ?? 10)) throw error;
      options.onReconnect?.({ lastEventId, attempt: failures, error });
      await sleep(retryMs * (0.5 + Math.random() / 2), options.signal);
      continue;
    }
    if (res.status === 204) return;
    if (!res.ok) throw await failure(res, url);
    if (!res.body) throw new ProtocolError(`${url}: the response has no body`);
    const parser = new SSEParser();
    parser.lastEventId = lastEventId;
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let dropped: unknown = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const msg of parser.push(value)) {
          failures = 0;
          if (msg.retry !== undefined) retryMs = msg.retry;
          lastEventId = msg.id;
          yield msg;
        }
      }
    } catch (error) {
      if (options.signal?.aborted) throw error;
      dropped = error;
    } finally {
      reader.releaseLock();
    }
    if (dropped === null || options.reconnect === false) {
      if (dropped !== null) throw dropped;
      return;
    }
    if (++failures > (options.maxRetries ?? 10)) throw dropped;
    options.onReconnect?.({ lastEventId, attempt: failures, error: dropped });
    await sleep(retryMs * (0.5 + Math.random() / 2), options.signal);
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      reject(signal.reason);
    });
  });
}
