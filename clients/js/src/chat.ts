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
 * it ended). Aborting (`useChat`'s `stop()`) ends the response on this client; the stream on the
 * bus goes on (the server has no stop operation yet, see docs/js-client.md).
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
    const res = await this.request(this.opts.api, {
      method: "POST",
      headers: { ...this.headers(options.headers), "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: options.abortSignal ?? null,
    });
    return chunks<CHUNK>(res, this.opts.api);
  }

  /** Resume the chat's live stream, or `null` when there is none (the server answered 204). */
  async reconnectToStream(options: { chatId: string; abortSignal?: AbortSignal } & RequestOptions): Promise<ReadableStream<CHUNK> | null> {
    const url = `${this.opts.api}/${encodeURIComponent(options.chatId)}/stream`;
    const res = await this.request(url, { headers: this.headers(options.headers), signal: options.abortSignal ?? null });
    if (res.status === 204) return null;
    return chunks<CHUNK>(res, url);
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

function chunks<CHUNK>(res: Response, url: string): ReadableStream<CHUNK> {
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
    }),
  );
}
