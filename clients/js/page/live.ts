// The broadcaster's live page (served at GET / by the websocket sink). All protocol work —
// resume, recovery, snapshots, moderation, tool calls — is the package's; this file only draws.
// Built into plugins/websocket/streambus_websocket/static/index.html by scripts/build-page.mjs.
import { StreamBusClient, UnauthorizedError, type Filters, type StreamView } from "../src/index.js";

declare const __STREAMBUS_WS_PATH__: string; // replaced by the server with the JSON of its `path`

const params = new URLSearchParams(location.search);
const token = params.get("token") ?? undefined;
const filters: Filters = {};
for (const [param, key] of [["stream", "streams"], ["model", "models"], ["provider", "providers"]] as const) {
  const values = params.getAll(param);
  if (values.length) filters[key] = values;
}
const $ = (sel: string): HTMLElement => document.querySelector(sel) as HTMLElement;
const RECENT = 20; // recently ended streams to show, from the server's history, on first connect
const scheme = location.protocol === "https:" ? "wss" : "ws";
const client = new StreamBusClient({
  url: `${scheme}://${location.host}${__STREAMBUS_WS_PATH__}`,
  token,
  filters,
  recent: RECENT,
  backoff: { initial: 250, max: 5000 },
});

interface Card {
  el: HTMLElement;
  content: HTMLElement;
  reasoning: HTMLElement;
  reasoningBox: HTMLDetailsElement;
  tool: HTMLElement;
  toolBox: HTMLElement;
  flags: HTMLElement;
  foot: HTMLElement;
}
const cards = new Map<string, Card>();

function setStatus(state: string, text: string): void {
  const el = $("#status");
  el.dataset.state = state;
  el.textContent = text;
}
function logLine(text: string, cls?: string): void {
  const li = document.createElement("li");
  const t = document.createElement("time");
  t.textContent = new Date().toLocaleTimeString();
  const s = document.createElement("span");
  s.textContent = text;
  if (cls) s.className = cls;
  li.append(t, s);
  $("#connlog").prepend(li);
}
function updateCounts(): void {
  let live = 0;
  for (const s of client.streams.values()) if (!s.ended) live++;
  $("#counts").textContent = `${client.streams.size} streams · ${live} live · ${client.stats.events} events`;
  document.body.dataset.duplicates = String(client.stats.duplicates);
  document.body.dataset.resumes = String(client.stats.resumes);
}

function card(id: string): Card {
  let c = cards.get(id);
  if (c) return c;
  const el = document.createElement("article");
  el.className = "stream";
  el.dataset.stream = id;
  el.dataset.state = "live";
  el.innerHTML = `<div class="head"><span class="model"></span><span class="provider"></span>
      <span class="badge state">live</span><button class="stop" type="button" title="stop this stream">stop</button><span class="sid"></span></div>
      <details class="reasoning" open hidden><summary>reasoning</summary><div class="reasoning-text"></div></details>
      <div class="tool" hidden>tool call <div class="tool-text"></div></div>
      <div class="content"></div><div class="flags" hidden></div><div class="foot"></div>`;
  (el.querySelector(".sid") as HTMLElement).textContent = id;
  // Stop the stream wherever its producer runs (the protocol's `abort` op); its `abort` event then ends the card.
  (el.querySelector("button.stop") as HTMLButtonElement).addEventListener("click", () => {
    client.stop(id, { reason: "stopped from the live page" }).then(
      (r) => logLine(`stop ${id}: ${r.outcome}`, "ok"),
      (err: Error) => logLine(`stop ${id}: ${err.message}`, "bad"),
    );
  });
  document.getElementById("empty")?.remove();
  $("#streams").prepend(el);
  const q = (sel: string): HTMLElement => el.querySelector(sel) as HTMLElement;
  c = {
    el,
    content: q(".content"),
    reasoning: q(".reasoning-text"),
    reasoningBox: q("details.reasoning") as HTMLDetailsElement,
    tool: q(".tool-text"),
    toolBox: q(".tool"),
    flags: q(".flags"),
    foot: q(".foot"),
  };
  cards.set(id, c);
  return c;
}

function draw(v: StreamView): void {
  const c = card(v.id);
  if (v.fromStart) {
    (c.el.querySelector(".model") as HTMLElement).textContent = v.model || "(model)";
    (c.el.querySelector(".provider") as HTMLElement).textContent = v.provider;
  }
  c.content.textContent = v.text;
  c.reasoningBox.hidden = !v.reasoning;
  c.reasoning.textContent = v.reasoning;
  const tools = v.toolCalls.map((t) => `${t.name || "tool"}(${t.arguments})`).concat(v.toolText);
  c.toolBox.hidden = tools.length === 0;
  c.tool.textContent = tools.join("\n");
  const m = v.moderation[v.moderation.length - 1];
  c.flags.hidden = !m;
  if (m) c.flags.textContent = `moderation: ${m.verdict} (${m.categories.join(", ")}) → ${m.action}`;
  const state = v.status === "reset" ? "live" : v.status;
  c.el.dataset.state = state;
  const badge = c.el.querySelector(".badge.state") as HTMLElement;
  badge.textContent = state === "end" ? v.reason || "stop" : state === "error" ? "error" : state === "abort" ? "aborted" : "live";
  if (state === "end") {
    c.foot.innerHTML = "end: <b></b>";
    (c.foot.querySelector("b") as HTMLElement).textContent = v.reason || "stop";
    const u = v.usage;
    if (u) c.foot.append(` · prompt ${u.prompt_tokens ?? "?"} · completion ${u.completion_tokens ?? "?"} · total ${u.total_tokens ?? "?"} tokens (${u.source || "provider"})`);
  } else if (v.error) {
    c.foot.textContent = `error ${v.error.kind}: ${v.error.message}${v.error.retryable ? " (retryable)" : ""}`;
  } else if (v.abort) {
    c.foot.textContent = `aborted by ${v.abort.by}: ${v.abort.reason}`;
  } else c.foot.textContent = "";
}

client.on("stream", (s) => {
  card(s.id);
  s.onChange(draw);
});
client.on("event", updateCounts);
client.on("state", (state, detail) => {
  if (state === "connecting") setStatus("connecting", "connecting…");
  if (state === "reconnecting" && detail.code !== undefined) {
    const wait = ((detail.retryIn ?? 0) / 1000).toFixed(1);
    setStatus("reconnecting", `connection lost (${detail.code}) · reconnecting in ${wait}s`);
    logLine(`connection lost (code ${detail.code}${detail.reason ? ": " + detail.reason : ""}), reconnecting in ${wait}s`, "warn");
  }
});
client.on("subscribed", (info) => {
  if (info.reloadReason === "too_many_streams") {
    logLine(`${info.reset.length} streams to resume, more than the server takes at once: reloaded from snapshot`, "warn");
  }
  if (info.recovering && info.recovered) {
    setStatus("resumed", `resumed · ${info.replayed} missed events recovered`);
    logLine(`resumed: ${info.replayed} missed events recovered, none lost`, "ok");
  } else if (info.recovering || info.reloadReason) {
    setStatus("reloaded", "reloaded from snapshot");
    if (info.recovering) logLine(`history gone for ${info.reset.length} streams: reloaded from snapshot`, "warn");
  } else {
    setStatus("live", "live");
    logLine(
      `subscribed: ${info.streams.length} live streams` +
        (info.snapshot ? `, ${info.snapshot} from snapshot` : "") +
        (info.recent ? `, ${info.recent} recently ended from history` : ""),
      "ok",
    );
  }
  updateCounts();
});
client.on("error", (err) => {
  if (err instanceof UnauthorizedError) {
    setStatus("unauthorized", "unauthorized: add ?token=… to the URL");
    logLine("unauthorized", "bad");
  } else logLine(`${err.name}: ${err.message}`, "bad");
});
client.connect().catch(() => {}); // failures are shown by the `error` listener

// For tests and debugging: window.streambus.drop() closes the socket as a network drop would.
(window as unknown as { streambus: unknown }).streambus = {
  client,
  stats: client.stats,
  streams: client.streams,
  drop: () => client.reconnect(),
  stop: () => client.close(),
};
