// The SSE reader and the AI SDK ChatTransport against the http sink of a real streambus.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { readUIMessageStream } from "ai";
import { HttpError, readSSE, SSEParser, StreamBusChatTransport, UnauthorizedError } from "../dist/index.js";
import { startBus } from "./helpers.mjs";

async function publish(bus, id, pieces, meta) {
  await bus.send({ cmd: "start", id, model: "m", meta });
  for (const text of pieces) await bus.send({ cmd: "delta", id, text });
  await bus.send({ cmd: "end", id });
}

describe("http outputs", () => {
  let bus;
  before(async () => (bus = await startBus(["--token", "tok"])));
  after(async () => bus.stop());

  test("readSSE resumes after Last-Event-ID at every cut point, no gap, no duplicate", async () => {
    await publish(bus, "sse", ["a", "b", "c", "d"]);
    const url = `${bus.http}/streams/sse/sse`;
    const all = [];
    for await (const m of readSSE(url, { token: "tok" })) all.push(m);
    assert.deepEqual(all.map((m) => JSON.parse(m.data).seq), [0, 1, 2, 3, 4, 5]);
    assert.deepEqual(all.map((m) => m.id), ["sse:0", "sse:1", "sse:2", "sse:3", "sse:4", "sse:5"]);
    for (let cut = 0; cut < 5; cut++) {
      const rest = [];
      for await (const m of readSSE(url, { token: "tok", lastEventId: `sse:${cut}` })) rest.push(JSON.parse(m.data).seq);
      assert.deepEqual(rest, [0, 1, 2, 3, 4, 5].slice(cut + 1), `cut ${cut}`);
    }
    // After the terminal event the server answers 204: the reader ends with nothing.
    const none = [];
    for await (const m of readSSE(url, { token: "tok", lastEventId: "sse:5" })) none.push(m);
    assert.deepEqual(none, []);
  });

  test("readSSE reconnects after a dropped response with Last-Event-ID: no gap, no duplicate", async () => {
    await bus.send({ cmd: "start", id: "drop", model: "m" });
    for (const t of ["a", "b", "c"]) await bus.send({ cmd: "delta", id: "drop", text: t });
    // The first response breaks after its second event, as a network drop would.
    const sent = [];
    let calls = 0;
    const breaking = async (url, init) => {
      sent.push(new Headers(init.headers).get("Last-Event-ID"));
      const res = await fetch(url, init);
      if (calls++ > 0) return res;
      const reader = res.body.getReader();
      let text = "";
      const body = new ReadableStream({
        async pull(controller) {
          if ((text.match(/\n\n/g) ?? []).length >= 2) {
            await reader.cancel();
            controller.error(new TypeError("network drop"));
            return;
          }
          const { value, done } = await reader.read();
          if (done) return controller.close();
          text += new TextDecoder().decode(value);
          controller.enqueue(value);
        },
      });
      return new Response(body, { status: res.status, headers: res.headers });
    };
    const seqs = [];
    const reconnects = [];
    const reading = (async () => {
      for await (const m of readSSE(`${bus.http}/streams/drop/sse`, { token: "tok", fetch: breaking, retryMs: 10, onReconnect: (i) => reconnects.push(i.lastEventId) })) {
        const e = JSON.parse(m.data);
        seqs.push(e.seq);
        if (e.seq === 3) {
          await bus.send({ cmd: "delta", id: "drop", text: "d" });
          await bus.send({ cmd: "end", id: "drop" });
        }
      }
    })();
    await reading;
    assert.deepEqual(seqs, [0, 1, 2, 3, 4, 5]);
    assert.equal(reconnects.length, 1);
    assert.deepEqual(sent, [null, reconnects[0]]);
    assert.match(reconnects[0], /^drop:\d$/);
  });

  test("readSSE: a wrong token is UnauthorizedError, a bad Last-Event-ID an HttpError 400 naming it", async () => {
    const url = `${bus.http}/streams/sse/sse`;
    await assert.rejects(readSSE(url, { token: "nope" }).next(), (e) => e instanceof UnauthorizedError && e.code === 401);
    await assert.rejects(readSSE(url, { token: "tok", lastEventId: "garbage" }).next(), (e) => e instanceof HttpError && e.status === 400 && /Last-Event-ID/.test(e.message));
  });

  test("StreamBusChatTransport: send and resume, read by the ai package's own reader", async () => {
    const transport = new StreamBusChatTransport({ api: `${bus.http}/api/chat`, token: "tok" });
    const messages = [{ id: "u1", role: "user", parts: [{ type: "text", text: "hi" }] }];
    const sending = transport.sendMessages({ trigger: "submit-message", chatId: "chat-1", messageId: undefined, messages, abortSignal: undefined });
    await bus.send({ cmd: "start", id: "answer-1", model: "m", meta: { chat: "chat-1" } });
    await bus.send({ cmd: "delta", id: "answer-1", text: "Hello " });
    const stream = await sending;
    const resumed = await transport.reconnectToStream({ chatId: "chat-1" });
    await bus.send({ cmd: "delta", id: "answer-1", text: "there" });
    await bus.send({ cmd: "end", id: "answer-1" });
    for (const s of [stream, resumed]) {
      let last;
      for await (const message of readUIMessageStream({ stream: s })) last = message;
      assert.equal(last.id, "answer-1");
      assert.equal(last.parts.filter((p) => p.type === "text").map((p) => p.text).join(""), "Hello there");
    }
    assert.equal(transport.resumeStreamIsReplay, true);
    // The chat's stream ended: nothing to resume.
    assert.equal(await transport.reconnectToStream({ chatId: "chat-1" }), null);
    const refused = new StreamBusChatTransport({ api: `${bus.http}/api/chat` });
    await assert.rejects(refused.reconnectToStream({ chatId: "chat-1" }), UnauthorizedError);
  });
});

test("SSEParser: CRLF, split chunks, multi-line data, comments, retry", () => {
  const p = new SSEParser();
  const out = [
    ...p.push(": keepalive\r\nretry: 3000\r\nid: s:1\r"),
    ...p.push("\ndata: a\r\ndata: b\r\n\r\nevent: reset\ndata: {}\n"),
    ...p.push("\n"),
  ];
  assert.deepEqual(out, [
    { event: "message", data: "a\nb", id: "s:1", retry: 3000 },
    { event: "reset", data: "{}", id: "s:1" },
  ]);
});

describe("evicted resume", () => {
  let bus;
  before(async () => (bus = await startBus(["--per-stream", "3"])));
  after(async () => bus.stop());

  test("readSSE passes the server's `reset` on first, then the stream continues to its end", async () => {
    await bus.send({ cmd: "start", id: "ev", model: "m" });
    for (const t of ["a", "b", "c", "d", "e"]) await bus.send({ cmd: "delta", id: "ev", text: t });
    const got = [];
    for await (const m of readSSE(`${bus.http}/streams/ev/sse`, { lastEventId: "ev:1" })) {
      got.push(m);
      if (got.length === 1) await bus.send({ cmd: "end", id: "ev" });
    }
    assert.equal(got[0].event, "reset");
    assert.equal(JSON.parse(got[0].data).recovered, false);
    assert.equal(JSON.parse(got.at(-1).data).type, "end");
  });
});
