// Stopping streams from the client against a real streambus (bus_server.py) over loopback:
// StreamBusClient.stop (the WebSocket `abort` operation) and the ChatTransport's stop (POST /api/chat/{id}/abort).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { ConnectionClosedError, readSSE, ServerError, StreamBusChatTransport, StreamBusClient, UnauthorizedError } from "../dist/index.js";
import { startBus, until } from "./helpers.mjs";

async function events(url, token) {
  const out = [];
  for await (const m of readSSE(url, { token })) out.push(JSON.parse(m.data));
  return out;
}

describe("stop over the WebSocket", () => {
  let bus;
  before(async () => (bus = await startBus()));
  after(async () => bus.stop());

  test("stop() ends the stream for every client with one abort by the client", async (t) => {
    const stopper = new StreamBusClient({ url: bus.ws, WebSocket });
    const watcher = new StreamBusClient({ url: bus.ws, WebSocket });
    t.after(() => (stopper.close(), watcher.close()));
    await stopper.connect();
    await watcher.connect();
    await bus.send({ cmd: "start", id: "ws-stop", model: "m" });
    await bus.send({ cmd: "delta", id: "ws-stop", text: "Hello" });
    await until(watcher, () => watcher.stream("ws-stop")?.view.text === "Hello");
    await until(stopper, () => stopper.stream("ws-stop")?.view.text === "Hello");
    const aborts = new Map([[stopper, []], [watcher, []]]);
    for (const [client, list] of aborts) client.on("event", (e) => e.stream === "ws-stop" && e.type === "abort" && list.push(e));
    const result = await stopper.stop("ws-stop", { reason: "user pressed stop" });
    assert.deepEqual(result, { stream: "ws-stop", outcome: "stopped" });
    for (const [client, list] of aborts) {
      await until(client, () => client.stream("ws-stop")?.ended === true);
      const view = client.stream("ws-stop").view;
      assert.equal(view.status, "abort");
      assert.equal(view.text, "Hello");
      assert.equal(list.length, 1);
      assert.equal(list[0].by, "client");
      assert.equal(list[0].reason, "user pressed stop");
    }
    // the stream already ended: a clean no-op answer
    assert.deepEqual(await stopper.stop("ws-stop"), { stream: "ws-stop", outcome: "ended" });
  });

  test("stop() of an unknown stream rejects with ServerError unknown_stream; the client stays live", async (t) => {
    const client = new StreamBusClient({ url: bus.ws, WebSocket });
    t.after(() => client.close());
    await client.connect();
    await assert.rejects(client.stop("never-was"), (e) => e instanceof ServerError && e.code === "unknown_stream");
    await assert.rejects(client.stop("x".repeat(300)), (e) => e instanceof ServerError && e.code === "bad_message" && e.field === "stream");
    assert.equal(client.state, "live");
    await assert.rejects(client.stop(""), TypeError);
  });

  test("stop() without a connection rejects with ConnectionClosedError", async () => {
    const client = new StreamBusClient({ url: bus.ws, WebSocket });
    await assert.rejects(client.stop("x"), ConnectionClosedError);
  });
});

describe("stop through the ChatTransport", () => {
  let bus;
  before(async () => (bus = await startBus(["--token", "tok"])));
  after(async () => bus.stop());

  test("aborting the SDK's request stops the chat's stream on the bus", async () => {
    const transport = new StreamBusChatTransport({ api: `${bus.http}/api/chat`, token: "tok" });
    const controller = new AbortController();
    const answer = transport.sendMessages({
      trigger: "submit-message",
      chatId: "chat-s",
      messageId: undefined,
      messages: [{ id: "u1", role: "user", parts: [{ type: "text", text: "hi" }] }],
      abortSignal: controller.signal,
    });
    // the request waits for the chat's stream; the producer starts it
    await bus.send({ cmd: "start", id: "ans-s", model: "m", meta: { chat: "chat-s" } });
    await bus.send({ cmd: "delta", id: "ans-s", text: "Hel" });
    const reader = (await answer).getReader();
    const first = [];
    while (!first.some((c) => c.type === "text-delta")) first.push((await reader.read()).value);
    controller.abort(); // what useChat's stop() does
    await reader.read().catch(() => {});
    const seen = await events(`${bus.http}/streams/ans-s/sse`, "tok"); // follows the stream to its terminal event
    const last = seen.at(-1);
    assert.equal(last.type, "abort");
    assert.equal(last.by, "client");
    assert.equal(seen.filter((e) => e.type === "abort").length, 1);
    assert.deepEqual(await transport.stop("chat-s"), { chat: "chat-s", outcome: "ended" });
    assert.deepEqual(await transport.stop("no-such-chat"), { chat: "no-such-chat", outcome: "unknown" });
  });

  test("a finished answer is not stopped by a later abort; a wrong token is refused", async () => {
    const stops = [];
    const counting = (url, init) => {
      if (String(url).endsWith("/abort")) stops.push(url);
      return fetch(url, init);
    };
    const transport = new StreamBusChatTransport({ api: `${bus.http}/api/chat`, token: "tok", fetch: counting });
    await assert.rejects(new StreamBusChatTransport({ api: `${bus.http}/api/chat`, token: "bad" }).stop("c"), UnauthorizedError);
    const controller = new AbortController();
    const answer = transport.sendMessages({
      trigger: "submit-message",
      chatId: "chat-done",
      messageId: undefined,
      messages: [],
      abortSignal: controller.signal,
    });
    await bus.send({ cmd: "start", id: "ans-done", model: "m", meta: { chat: "chat-done" } });
    await bus.send({ cmd: "delta", id: "ans-done", text: "ok" });
    await bus.send({ cmd: "end", id: "ans-done" });
    const reader = (await answer).getReader();
    while (!(await reader.read()).done);
    // a new answer of the same chat is live when the old request's signal aborts: it must go on
    await bus.send({ cmd: "start", id: "ans-next", model: "m", meta: { chat: "chat-done" } });
    controller.abort(); // a stop would be sent synchronously, from the abort listener
    assert.deepEqual(stops, []);
    await bus.send({ cmd: "end", id: "ans-next" });
    const next = await events(`${bus.http}/streams/ans-next/sse`, "tok");
    assert.equal(next.at(-1).type, "end");
  });
});
