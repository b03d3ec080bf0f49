import { ProtocolError } from "./errors.js";

/** A text channel of a stream. */
export type Channel = "content" | "reasoning" | "tool";

/** Token counts an `end` event carries. */
export interface Usage {
  prompt_tokens?: number | null;
  completion_tokens?: number | null;
  total_tokens?: number | null;
  source?: "provider" | "counted";
}

interface Base {
  stream: string;
  seq: number;
  ts: number;
}
/** The first event of a stream. */
export interface StartEvent extends Base {
  type: "start";
  model: string;
  provider: string;
  meta: Record<string, unknown>;
}
/** A piece of text; coalesced when `first_seq` is set (it carries seqs `first_seq..seq`). */
export interface DeltaEvent extends Base {
  type: "delta";
  text: string;
  channel: Channel;
  n: number;
  first_seq: number | null;
}
/** The normal end of a stream. */
export interface EndEvent extends Base {
  type: "end";
  reason: string;
  usage: Usage | null;
  timings: Record<string, number>;
}
/** The stream failed. */
export interface ErrorEvent extends Base {
  type: "error";
  kind: string;
  message: string;
  retryable: boolean;
}
/** The stream was stopped (by moderation, a client, shutdown). */
export interface AbortEvent extends Base {
  type: "abort";
  reason: string;
  by: string;
}
/** A moderation verdict about characters `[start, end)` (code points) of `channel`'s delivered text. */
export interface ModerationEvent extends Base {
  type: "moderation";
  verdict: string;
  categories: string[];
  action: "flag" | "redact" | "retract" | "abort";
  start: number;
  end: number;
  channel: Channel;
  scores: Record<string, number>;
}
/** Any bus event in wire form (docs/events.md). */
export type BusEvent = StartEvent | DeltaEvent | EndEvent | ErrorEvent | AbortEvent | ModerationEvent;

const CHANNELS = new Set(["content", "reasoning", "tool"]);
const ACTIONS = new Set(["flag", "redact", "retract", "abort"]);

function need(cond: boolean, field: string, what: string, value: unknown): void {
  if (!cond) throw new ProtocolError(`${field}: expected ${what}, got ${JSON.stringify(value) ?? String(value)}`, field);
}

/**
 * Check one decoded wire event and fill in the defaults a `delta` omits (`channel`, `n`,
 * `first_seq`). Unknown fields are kept and ignored; an unknown `type` or a missing or
 * mistyped required field throws {@link ProtocolError} naming the field.
 */
export function parseEvent(raw: unknown): BusEvent {
  need(typeof raw === "object" && raw !== null && !Array.isArray(raw), "$", "a JSON object", raw);
  const e = raw as Record<string, unknown>;
  need(typeof e.stream === "string" && e.stream !== "", "$.stream", "a non-empty string", e.stream);
  need(Number.isInteger(e.seq) && (e.seq as number) >= 0, "$.seq", "an integer >= 0", e.seq);
  switch (e.type) {
    case "delta": {
      need(typeof e.text === "string", "$.text", "a string", e.text);
      if (e.channel === undefined) e.channel = "content";
      else need(CHANNELS.has(e.channel as string), "$.channel", "content, reasoning or tool", e.channel);
      if (e.n === undefined) e.n = 1;
      if (e.first_seq === undefined) e.first_seq = null;
      else if (e.first_seq !== null) {
        need(Number.isInteger(e.first_seq) && (e.first_seq as number) <= (e.seq as number), "$.first_seq", "an integer <= seq", e.first_seq);
      }
      break;
    }
    case "start":
      if (e.meta === undefined || e.meta === null) e.meta = {};
      need(typeof e.meta === "object" && !Array.isArray(e.meta), "$.meta", "an object", e.meta);
      break;
    case "moderation":
      need(ACTIONS.has(e.action as string), "$.action", "flag, redact, retract or abort", e.action);
      need(Number.isInteger(e.start) && Number.isInteger(e.end) && (e.start as number) <= (e.end as number), "$.start", "integers start <= end", [e.start, e.end]);
      if (e.channel === undefined) e.channel = "content";
      if (!Array.isArray(e.categories)) e.categories = [];
      break;
    case "error":
      need(typeof e.kind === "string", "$.kind", "a string", e.kind);
      break;
    case "end":
    case "abort":
      break;
    default:
      throw new ProtocolError(`$.type: unknown event type ${JSON.stringify(e.type)}`, "$.type");
  }
  return e as unknown as BusEvent;
}

/** Whether an event ends its stream (`end`, `error`, `abort`). */
export function isTerminal(event: BusEvent): event is EndEvent | ErrorEvent | AbortEvent {
  return event.type === "end" || event.type === "error" || event.type === "abort";
}
