// The WebSocket client against a real streambus (bus_server.py) over loopback.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { StreamBusClient, UnauthorizedError } from "../dist/index.js";
import { gatedWebSocket, startBus, until } from "./helpers.mjs";

const TOOL0 = '{"index":0,"id":"c1","name":"get_weather","arguments":""}\n';
const TOOL1 = '{"index":0,"arguments":"{\\"city\\": \\"Paris\\"}"}\n';
const SCRIPT = [
  { cmd: "delta", text: "Hello, " },
  { cmd: "delta", channel: "reasoning", text: "think" },
  { cmd: "delta", text: "wörld 🌍" },
  { cmd: "delta", channel: "tool", text: TOOL0 },
  { cmd: "delta", channel: "tool", text: TOOL1 },
  { cmd: "delta", text: " bye" },
  { cmd: "end", usage: { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 } },
];

/** Seqs delivered per stream, a coalesced delta counting as all the seqs it carries. */
function recordSeqs(client) {
  const seen = new Map();
  client.on("event", (e) => {
    const list = seen.get(e.stream) ?? [];
    for (let s = e.type === "delta" && e.first_seq != null ? e.first_seq : e.seq; s <= e.seq; s++) list.push(s);
    seen.set(e.stream, list);
  });
  return seen;
}

describe("resume", () => {
  let bus;
  before(async () => (bus = await startBus()));
  after(async () => bus.stop());

  test("at every cut point: no gap, no duplicate, exact text", async (t) => {
    const { WebSocket: Gated, gate } = gatedWebSocket();
    const client = new StreamBusClient({ url: bus.ws, WebSocket: Gated, backoff: { initial: 20, max: 200 }, random: () => 1 });
    t.after(() => client.close());
    const seqs = recordSeqs(client);
    const infos = [];
    client.on("subscribed", (i) => infos.push(i));
    await client.connect();
    for (let cut = 0; cut <= SCRIPT.length; cut++) {
      const id = `cut-${cut}`;
      await bus.send({ cmd: "start", id, model: "m" });
      for (const step of SCRIPT.slice(0, cut)) await bus.send({ ...step, id });
      await until(client, () => client.stream(id)?.lastSeq === cut);
      gate.closed = true;
      client.reconnect();
      await until(client, () => client.state === "reconnecting");
      for (const step of SCRIPT.slice(cut)) await bus.send({ ...step, id });
      const resumed = new Promise((r) => {
        const off = client.on("subscribed", (info) => (off(), r(info)));
      });
      gate.open();
      const info = await resumed;
      assert.equal(info.recovered, true, `cut ${cut}`);
      assert.equal(info.replayed, SCRIPT.length - cut, `cut ${cut}`);
      await until(client, () => client.stream(id)?.ended === true);
      const v = client.stream(id).view;
      assert.deepEqual(seqs.get(id), [0, 1, 2, 3, 4, 5, 6, 7], `cut ${cut}`);
      assert.equal(v.text, "Hello, wörld 🌍 bye");
      assert.equal(v.reasoning, "think");
      assert.deepEqual(v.toolCalls, [{ index: 0, id: "c1", name: "get_weather", arguments: '{"city": "Paris"}' }]);
      assert.equal(v.status, "end");
      assert.equal(v.reason, "stop");
      assert.equal(v.usage.total_tokens, 7);
    }
    assert.equal(client.stats.duplicates, 0);
    assert.equal(client.stats.resumes, SCRIPT.length + 1, JSON.stringify(infos));
    assert.equal(client.stats.resets, 0);
    client.close();
  });

  test("a server restart (close 1012) is resumed too", async (t) => {
    const client = new StreamBusClient({ url: bus.ws, WebSocket, backoff: { initial: 20 } });
    t.after(() => client.close());
    await client.connect();
    await bus.send({ cmd: "start", id: "restart", model: "m" });
    await bus.send({ cmd: "delta", id: "restart", text: "one " });
    await until(client, () => client.stream("restart")?.lastSeq === 1);
    const resumed = new Promise((r) => client.on("subscribed", r));
    await bus.send({ cmd: "close_clients" });
    const info = await resumed;
    assert.equal(info.recovering, true);
    assert.equal(info.recovered, true);
    await bus.send({ cmd: "delta", id: "restart", text: "two" });
    await bus.send({ cmd: "end", id: "restart" });
    await until(client, () => client.stream("restart")?.ended);
    assert.equal(client.stream("restart").view.text, "one two");
    client.close();
  });
});

describe("reset", () => {
  let bus;
  before(async () => (bus = await startBus(["--history-events", "3"])));
  after(async () => bus.stop());

  test("history gone: the stream is cleared and refilled from a snapshot, never shown with a hole", async (t) => {
    const { WebSocket: Gated, gate } = gatedWebSocket();
    const client = new StreamBusClient({ url: bus.ws, WebSocket: Gated, backoff: { initial: 20 }, random: () => 1 });
    t.after(() => client.close());
    await client.connect();
    await bus.send({ cmd: "start", id: "r", model: "m" });
    await bus.send({ cmd: "delta", id: "r", text: "a" });
    await bus.send({ cmd: "delta", id: "r", text: "b" });
    await until(client, () => client.stream("r")?.lastSeq === 2);
    const shown = [];
    client.stream("r").onChange((v) => shown.push(v.text));
    gate.closed = true;
    client.reconnect();
    await until(client, () => client.state === "reconnecting");
    for (const t of ["c", "d", "e", "f", "g", "h"]) await bus.send({ cmd: "delta", id: "r", text: t });
    const subscribed = new Promise((r) => client.on("subscribed", r));
    gate.open();
    const info = await subscribed;
    assert.equal(info.recovering, true);
    assert.equal(info.recovered, false);
    assert.deepEqual(info.reset, ["r"]);
    assert.equal(info.reloadReason, "unrecovered");
    await until(client, () => client.stream("r").view.text === "abcdefgh");
    await bus.send({ cmd: "delta", id: "r", text: "!" });
    await bus.send({ cmd: "end", id: "r" });
    await until(client, () => client.stream("r").ended);
    assert.equal(client.stream("r").view.text, "abcdefgh!");
    // Every text ever shown is a prefix of the truth: cleared ("") is allowed, a hole is not.
    for (const text of shown) assert.ok("abcdefgh!".startsWith(text), `shown ${JSON.stringify(text)}`);
    assert.ok(shown.includes(""), "the stream was cleared before the snapshot refilled it");
    assert.equal(client.stats.resets, 1);
    client.close();
  });
});

describe("too many streams to resume", () => {
  let bus;
  before(async () => (bus = await startBus(["--max-subscribe-streams", "1"])));
  after(async () => bus.stop());

  test("more unfinished streams than max_subscribe_streams: reloaded from a snapshot", async (t) => {
    const client = new StreamBusClient({ url: bus.ws, WebSocket, backoff: { initial: 20 } });
    t.after(() => client.close());
    await client.connect();
    for (const id of ["x", "y"]) {
      await bus.send({ cmd: "start", id, model: "m" });
      await bus.send({ cmd: "delta", id, text: `${id}1 ` });
    }
    await until(client, () => client.stream("x")?.lastSeq === 1 && client.stream("y")?.lastSeq === 1);
    const subscribed = new Promise((r) => client.on("subscribed", r));
    client.reconnect();
    const info = await subscribed;
    assert.equal(info.reloadReason, "too_many_streams");
    assert.deepEqual([...info.reset].sort(), ["x", "y"]);
    for (const id of ["x", "y"]) {
      await bus.send({ cmd: "delta", id, text: `${id}2` });
      await bus.send({ cmd: "end", id });
    }
    await until(client, () => client.stream("x").ended && client.stream("y").ended);
    assert.equal(client.stream("x").view.text, "x1 x2");
    assert.equal(client.stream("y").view.text, "y1 y2");
    client.close();
  });
});

describe("moderation and endings", () => {
  let bus;
  before(async () => (bus = await startBus()));
  after(async () => bus.stop());

  test("retract removes the span (code points), redact marks it, error and abort end streams", async (t) => {
    const client = new StreamBusClient({ url: bus.ws, WebSocket });
    t.after(() => client.close());
    await client.connect();
    await bus.send({ cmd: "start", id: "mod", model: "m" });
    await bus.send({ cmd: "delta", id: "mod", text: "Tschüß 🌍 nasty " });
    await bus.send({ cmd: "delta", id: "mod", text: "end [removed]" });
    // "Tschüß 🌍 " is 9 code points (the globe is one, two UTF-16 units); "nasty " is 6.
    await bus.send({ cmd: "moderation", id: "mod", action: "retract", start: 9, end: 15 });
    await bus.send({ cmd: "moderation", id: "mod", action: "redact", start: 19, end: 28 });
    await bus.send({ cmd: "end", id: "mod" });
    await bus.send({ cmd: "start", id: "bad", model: "m" });
    await bus.send({ cmd: "error", id: "bad", kind: "timeout", message: "model crashed" });
    await bus.send({ cmd: "start", id: "stop", model: "m" });
    await bus.send({ cmd: "delta", id: "stop", text: "partial" });
    await bus.send({ cmd: "abort", id: "stop", reason: "violence", by: "moderation" });
    await until(client, () => ["mod", "bad", "stop"].every((id) => client.stream(id)?.ended));
    const mod = client.stream("mod").view;
    assert.equal(mod.text, "Tschüß 🌍 end [removed]");
    assert.deepEqual(mod.moderation.map((m) => [m.action, m.start, m.end]), [["retract", 9, 15], ["redact", 19, 28]]);
    const bad = client.stream("bad").view;
    assert.equal(bad.status, "error");
    assert.deepEqual(bad.error, { kind: "timeout", message: "model crashed", retryable: false });
    const stop = client.stream("stop").view;
    assert.equal(stop.status, "abort");
    assert.deepEqual(stop.abort, { reason: "violence", by: "moderation" });
    assert.equal(stop.text, "partial");
    client.close();
  });
});

describe("auth", () => {
  let bus;
  before(async () => (bus = await startBus(["--token", "s3cret"])));
  after(async () => bus.stop());

  test("no token and a wrong token: UnauthorizedError (4001), no reconnect loop", async (t) => {
    for (const token of [undefined, "wrong"]) {
      const client = new StreamBusClient({ url: bus.ws, WebSocket, token });
      t.after(() => client.close());
      await assert.rejects(client.connect(), (err) => err instanceof UnauthorizedError && err.code === 4001);
      assert.equal(client.state, "closed");
    }
  });

  test("the token as a query parameter and as a header", async (t) => {
    for (const tokenIn of ["query", "header"]) {
      const client = new StreamBusClient({ url: bus.ws, WebSocket, token: "s3cret", tokenIn });
      t.after(() => client.close());
      await client.connect();
      assert.equal(client.state, "live");
      client.close();
    }
  });
});
