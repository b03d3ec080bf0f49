import { HttpError, ProtocolError, UnauthorizedError } from "./errors.js";
import { SSEParser } from "./sse.js";

/** A chunk of the Vercel AI SDK UI message stream (`ai`'s `UIMessageChunk`), as plain JSON. */
export interface UIChunk {
  type: string;
  [key: string]: unknown;
}

/** Options of {@link StreamBusChatTransport}. */
export interface ChatTransportOptions {
  /** The `POST /api/chat` URL of the http sink (resume is `${api}/{chatId}/stream`). */
  api: string;
  token?: string;
  headers?: Record<string, string>;
  /** Extra JSON fields for every POST body. */
  body?: Record<string, unknown>;
  fetch?: typeof fetch;
  /** When the SDK aborts a request (`useChat`'s `stop()`), also stop the chat's stream on the bus (default true). */
  stopOnAbort?: boolean;
}

/** What the server answered to {@link StreamBusChatTransport.stop}. */
export interface ChatStopResult {
  chat: string;
  /** The stream stopped (absent when the chat had no live stream). */
  stream?: string;
  /** `stopped`, `forwarded` (stopped on the host that owns it), `ended` (nothing was live) or `unknown` (no stream of that chat). */
  outcome: "stopped" | "forwarded" | "ended" | "unknown";
}

interface RequestOptions {
  headers?: Record<string, string> | Headers;
  body?: object;
  metadata?: unknown;
}

/**
 * A Vercel AI SDK `ChatTransport` over the http sink: `sendMessages` posts to `POST /api/chat`
 * (the sink follows the stream whose `start.meta.chat` is the chat id), `reconnectToStream`
 * reads `GET /api/chat/{id}/stream` (the chat's live stream from its beginning, or `null` after
 * it ended). Aborting (`useChat`'s `stop()`) ends the response on this client and stops the chat's
 * stream on the bus with `POST {api}/{id}/abort` (unless `stopOnAbort` is false), so the model
 * stops generating and every other view of the chat sees it end.
 *
 * ```ts
 * useChat({ transport: new StreamBusChatTransport<UIMessage, UIMessageChunk>({ api: "/api/chat" }) })
 * ```
 */
export class StreamBusChatTransport<UI_MESSAGE = unknown, CHUNK = UIChunk> {
  /** The resume route replays the stream from its start, so the SDK resets the message first. */
  readonly resumeStreamIsReplay = true;
  private opts: ChatTransportOptions;

  constructor(options: ChatTransportOptions) {
    this.opts = options;
  }

  /** Send the conversation; resolves to the assistant message's chunks. */
  async sendMessages(options: {
    trigger: "submit-message" | "regenerate-message";
    chatId: string;
    messageId: string | undefined;
    messages: UI_MESSAGE[];
    abortSignal: AbortSignal | undefined;
  } & RequestOptions): Promise<ReadableStream<CHUNK>> {
    const body = {
      ...(this.opts.body ?? {}),
      ...(options.body ?? {}),
      id: options.chatId,
      messages: options.messages,
      trigger: options.trigger,
      messageId: options.messageId,
    };
    const unwatch = this.watchAbort(options.chatId, options.abortSignal);
    try {
      const res = await this.request(this.opts.api, {
        method: "POST",
        headers: { ...this.headers(options.headers), "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: options.abortSignal ?? null,
      });
      return chunks<CHUNK>(res, this.opts.api, unwatch);
    } catch (err) {
      unwatch();
      throw err;
    }
  }

  /**
   * Stop the chat's live stream on the bus (`POST {api}/{chatId}/abort`), wherever its producer runs.
   * Resolves with the server's answer (`outcome` `unknown` when the chat has no stream); rejects with
   * {@link UnauthorizedError} or {@link HttpError} for a refusal.
   */
  async stop(chatId: string, options: { reason?: string } = {}): Promise<ChatStopResult> {
    const url = `${this.opts.api}/${encodeURIComponent(chatId)}/abort`;
    const res = await (this.opts.fetch ?? globalThis.fetch)(url, {
      method: "POST",
      headers: { ...this.headers(), "Content-Type": "application/json" },
      body: JSON.stringify(options.reason ? { reason: options.reason } : {}),
    });
    const text = await res.text();
    if (res.ok || res.status === 404) {
      try {
        return JSON.parse(text) as ChatStopResult;
      } catch {
        throw new ProtocolError(`${url}: the stop answer is not JSON: ${text.slice(0, 80)}`);
      }
    }
    throw res.status === 401 ? new UnauthorizedError(401, `HTTP 401 from ${url}: ${text.trim()}`) : new HttpError(res.status, text, url);
  }

  /** Stop the chat on the bus when *signal* aborts, until the returned function is called (the response ended). */
  private watchAbort(chatId: string, signal: AbortSignal | undefined): () => void {
    if (!signal || this.opts.stopOnAbort === false) return () => {};
    const onAbort = () => {
      this.stop(chatId, { reason: "stopped by the user" }).catch(() => {});
    };
    if (signal.aborted) {
      onAbort();
      return () => {};
    }
    signal.addEventListener("abort", onAbort, { once: true });
    return () => signal.removeEventListener("abort", onAbort);
  }

  /** Resume the chat's live stream, or `null` when there is none (the server answered 204). */
  async reconnectToStream(options: { chatId: string; abortSignal?: AbortSignal } & RequestOptions): Promise<ReadableStream<CHUNK> | null> {
    const url = `${this.opts.api}/${encodeURIComponent(options.chatId)}/stream`;
    const unwatch = this.watchAbort(options.chatId, options.abortSignal);
    try {
      const res = await this.request(url, { headers: this.headers(options.headers), signal: options.abortSignal ?? null });
      if (res.status === 204) {
        unwatch();
        return null;
      }
      return chunks<CHUNK>(res, url, unwatch);
    } catch (err) {
      unwatch();
      throw err;
    }
  }

  private headers(extra?: Record<string, string> | Headers): Record<string, string> {
    const h: Record<string, string> = { ...(this.opts.headers ?? {}) };
    if (extra instanceof Headers) extra.forEach((v, k) => (h[k] = v));
    else Object.assign(h, extra ?? {});
    if (this.opts.token) h.Authorization = `Bearer ${this.opts.token}`;
    return h;
  }

  private async request(url: string, init: RequestInit): Promise<Response> {
    const res = await (this.opts.fetch ?? globalThis.fetch)(url, init);
    if (res.ok) return res;
    const text = await res.text().catch(() => "");
    throw res.status === 401 ? new UnauthorizedError(401, `HTTP 401 from ${url}: ${text.trim()}`) : new HttpError(res.status, text, url);
  }
}

function chunks<CHUNK>(res: Response, url: string, done: () => void): ReadableStream<CHUNK> {
  if (!res.body) throw new ProtocolError(`${url}: the response has no body`);
  const parser = new SSEParser();
  let finished = false;
  return res.body.pipeThrough(new TextDecoderStream()).pipeThrough(
    new TransformStream<string, CHUNK>({
      transform(text, controller) {
        for (const msg of parser.push(text)) {
          if (finished) continue;
          if (msg.data === "[DONE]") {
            finished = true;
            continue;
          }
          let chunk: unknown;
          try {
            chunk = JSON.parse(msg.data);
          } catch {
            throw new ProtocolError(`${url}: a UI message stream chunk is not JSON: ${msg.data.slice(0, 80)}`);
          }
          if (typeof chunk !== "object" || chunk === null || typeof (chunk as UIChunk).type !== "string") {
            throw new ProtocolError(`${url}: a UI message stream chunk has no \`type\``, "$.type");
          }
          controller.enqueue(chunk as CHUNK);
        }
      },
      flush() {
        done(); // the stream is over: a later abort of the signal is no stop
      },
    }),
  );
}
