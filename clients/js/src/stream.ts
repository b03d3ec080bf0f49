import type { BusEvent, Channel, ModerationEvent, StartEvent, Usage } from "./events.js";

/** One tool call merged from the `tool` channel's fragment lines (docs/wire.md). */
export interface ToolCall {
  index: number;
  id: string;
  name: string;
  /** The JSON argument text received so far (complete once the stream ended). */
  arguments: string;
}

/**
 * Where a stream is: `live` until its terminal event; `reset` when the server could not resume
 * it and no snapshot followed (its text was cleared rather than shown with a hole).
 */
export type StreamStatus = "live" | "end" | "error" | "abort" | "reset";

/** A stream as plain data: what a UI renders. A new object after every change (safe for React). */
export interface StreamView {
  id: string;
  model: string;
  provider: string;
  meta: Record<string, unknown>;
  status: StreamStatus;
  /** The `content` channel as the user should see it: retracted spans removed. */
  text: string;
  /** The `reasoning` channel, retracted spans removed. */
  reasoning: string;
  /** Tool calls merged from the `tool` channel, by `index`. */
  toolCalls: ToolCall[];
  /** Lines of the `tool` channel that are not fragments (a provider's own text), as they came. */
  toolText: string[];
  /** Every moderation verdict, in order (`redact` spans mark where the replacement sits). */
  moderation: ModerationEvent[];
  /** `end.reason` once ended. */
  reason: string | null;
  usage: Usage | null;
  error: { kind: string; message: string; retryable: boolean } | null;
  abort: { reason: string; by: string } | null;
  /** The last seq applied (-1: none). */
  lastSeq: number;
  /** The stream's `start` (or a snapshot from its beginning) was received: the text has no hole at its head. */
  fromStart: boolean;
}

/** Change listener: gets the new view. */
export type StreamListener = (view: StreamView) => void;

interface ChannelText {
  raw: string;
  /** Removed [start, end) spans, in code points of `raw`. */
  removed: Array<[number, number]>;
}

function codePointIndex(s: string, cp: number): number {
  let i = 0;
  for (let n = 0; n < cp && i < s.length; n++) {
    const c = s.charCodeAt(i);
    i += c >= 0xd800 && c <= 0xdbff && i + 1 < s.length ? 2 : 1;
  }
  return i;
}

function visible(ch: ChannelText): string {
  if (ch.removed.length === 0) return ch.raw;
  const spans = [...ch.removed].sort((a, b) => a[0] - b[0]);
  let out = "";
  let at = 0; // code points
  for (const [s, e] of spans) {
    if (s > at) out += ch.raw.slice(codePointIndex(ch.raw, at), codePointIndex(ch.raw, s));
    at = Math.max(at, e);
  }
  return out + ch.raw.slice(codePointIndex(ch.raw, at));
}

function parseTools(raw: string): { calls: ToolCall[]; other: string[] } {
  const calls = new Map<number, ToolCall>();
  const other: string[] = [];
  const lines = raw.split("\n");
  const pending = lines.pop() ?? ""; // the line still arriving
  for (const line of lines) {
    if (!line.trim()) continue;
    let f: unknown;
    try {
      f = JSON.parse(line);
    } catch {
      other.push(line);
      continue;
    }
    if (f === null || typeof f !== "object" || Array.isArray(f)) {
      other.push(line);
      continue;
    }
    const frag = f as { index?: number; id?: string; name?: string; arguments?: string };
    const index = typeof frag.index === "number" ? frag.index : 0;
    const call = calls.get(index) ?? { index, id: "", name: "", arguments: "" };
    if (frag.id) call.id = frag.id;
    if (frag.name) call.name = frag.name;
    if (typeof frag.arguments === "string") call.arguments += frag.arguments;
    calls.set(index, call);
  }
  if (pending) other.push(pending);
  return { calls: [...calls.values()].sort((a, b) => a.index - b.index), other };
}

/**
 * Assembles one stream from its events: deltas (coalesced or not) by `seq`, moderation
 * `retract`/`abort` spans removed from the shown text, tool-call fragments merged, the terminal
 * event's status and usage. Feed it events with {@link StreamText.apply}; read {@link StreamText.view}
 * or listen with {@link StreamText.onChange}. Events at or below the last applied seq are
 * duplicates and are ignored, so applying a replay twice is harmless.
 */
export class StreamText {
  readonly id: string;
  private start: StartEvent | null = null;
  private channels: Record<Channel, ChannelText> = {
    content: { raw: "", removed: [] },
    reasoning: { raw: "", removed: [] },
    tool: { raw: "", removed: [] },
  };
  private status: StreamStatus = "live";
  private terminal: BusEvent | null = null;
  private verdicts: ModerationEvent[] = [];
  private seq = -1;
  private cached: StreamView | null = null;
  private listeners = new Set<StreamListener>();

  constructor(id: string) {
    this.id = id;
  }

  /** The last seq applied, -1 before any. */
  get lastSeq(): number {
    return this.seq;
  }

  /** Whether the stream's terminal event was applied. */
  get ended(): boolean {
    return this.terminal !== null;
  }

  /**
   * Apply one event of this stream. Returns false (and changes nothing) for a duplicate: an
   * event whose `seq` is not above the last applied one.
   */
  apply(event: BusEvent): boolean {
    if (event.seq <= this.seq) return false;
    this.seq = event.seq;
    switch (event.type) {
      case "start":
        this.start = event;
        break;
      case "delta":
        this.channels[event.channel].raw += event.text;
        break;
      case "moderation":
        this.verdicts.push(event);
        if (event.action === "retract" || event.action === "abort") {
          this.channels[event.channel].removed.push([event.start, event.end]);
        }
        break;
      default:
        this.terminal = event;
        this.status = event.type;
    }
    this.changed();
    return true;
  }

  /**
   * Forget everything received (text, seq, status): the server could not resume this stream.
   * A snapshot or replay from its `start` refills it; until then its status is `reset`.
   */
  reset(): void {
    this.start = null;
    for (const ch of Object.values(this.channels)) {
      ch.raw = "";
      ch.removed = [];
    }
    this.verdicts = [];
    this.terminal = null;
    this.seq = -1;
    this.status = "reset";
    this.changed();
  }

  /** The stream as a plain object; the same object until the next change. */
  get view(): StreamView {
    if (this.cached) return this.cached;
    const t = this.terminal;
    const tools = parseTools(visible(this.channels.tool));
    this.cached = {
      id: this.id,
      model: this.start?.model ?? "",
      provider: this.start?.provider ?? "",
      meta: this.start?.meta ?? {},
      status: this.status,
      text: visible(this.channels.content),
      reasoning: visible(this.channels.reasoning),
      toolCalls: tools.calls,
      toolText: tools.other,
      moderation: [...this.verdicts],
      reason: t?.type === "end" ? t.reason : null,
      usage: t?.type === "end" ? t.usage ?? null : null,
      error: t?.type === "error" ? { kind: t.kind, message: t.message ?? "", retryable: !!t.retryable } : null,
      abort: t?.type === "abort" ? { reason: t.reason ?? "", by: t.by ?? "" } : null,
      lastSeq: this.seq,
      fromStart: this.start !== null,
    };
    return this.cached;
  }

  /** Call `listener` after every change; returns the function that removes it. */
  onChange(listener: StreamListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private changed(): void {
    this.cached = null;
    // A reset stream refilled by a snapshot or replay is live again.
    if (this.status === "reset" && this.seq >= 0) this.status = "live";
    if (this.listeners.size === 0) return;
    const v = this.view;
    for (const l of this.listeners) l(v);
  }
}
