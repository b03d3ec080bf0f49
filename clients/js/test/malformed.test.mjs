// Malformed server frames become clear errors. A real streambus never sends them, so a small
// `ws` server on loopback plays a broken server here.
import assert from "node:assert/strict";
import { test } from "node:test";
import WebSocket, { WebSocketServer } from "ws";
import { ProtocolError, StreamBusClient } from "../dist/index.js";

const HELLO = JSON.stringify({ op: "hello", protocol: 1, session: "x", limits: {} });

async function fakeServer(frames) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((r) => wss.on("listening", r));
  wss.on("connection", (ws) => {
    ws.on("message", (m) => {
      if (JSON.parse(m).op === "subscribe") {
        ws.send(JSON.stringify({ op: "subscribed", id: "client", recovering: false, recovered: false, streams: [] }));
        for (const f of frames.slice(1)) ws.send(f);
      }
    });
    ws.send(frames[0]);
  });
  return { url: `ws://127.0.0.1:${wss.address().port}/ws`, close: () => new Promise((r) => wss.close(r)) };
}

test("a hello of another protocol version: ProtocolError naming $.protocol, no reconnect", async () => {
  const server = await fakeServer([JSON.stringify({ op: "hello", protocol: 2 })]);
  const client = new StreamBusClient({ url: server.url, WebSocket });
  await assert.rejects(client.connect(), (e) => e instanceof ProtocolError && e.field === "$.protocol" && /protocol 1/.test(e.message));
  assert.equal(client.state, "closed");
  await server.close();
});

for (const [name, frame, field, pattern] of [
  ["not JSON", "{nope", "$", /not JSON: \{nope/],
  ["not an object", "[1, 2]", "$", /not a JSON object/],
  ["neither op nor type", '{"x": 1}', "$", /neither `op` nor `type`/],
  ["a delta without text", '{"type": "delta", "stream": "s", "seq": 1, "ts": 0}', "$.text", /\$\.text: expected a string/],
  ["an unknown event type", '{"type": "shout", "stream": "s", "seq": 1, "ts": 0}', "$.type", /unknown event type "shout"/],
  ["a negative seq", '{"type": "end", "stream": "s", "seq": -1, "ts": 0}', "$.seq", /\$\.seq: expected an integer >= 0/],
]) {
  test(`a frame that is ${name}: ProtocolError (${field}), then a reconnect`, async () => {
    const server = await fakeServer([HELLO, frame]);
    const client = new StreamBusClient({ url: server.url, WebSocket, backoff: { initial: 10 } });
    const error = new Promise((r) => client.on("error", r));
    await client.connect();
    const err = await error;
    assert.ok(err instanceof ProtocolError);
    assert.equal(err.field, field);
    assert.match(err.message, pattern);
    await new Promise((r) => client.on("state", (s) => s === "reconnecting" && r()));
    client.close();
    await server.close();
  });
}

test("a url that is not ws:// is refused at construction", () => {
  assert.throws(() => new StreamBusClient({ url: "http://127.0.0.1/ws" }), /url: expected ws:\/\/ or wss:\/\//);
});

test("reconnects back off with full jitter, doubling up to the maximum; connect() twice is refused", async () => {
  // A server that closes every connection with 1011 right after hello: the client keeps retrying.
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((r) => wss.on("listening", r));
  wss.on("connection", (ws) => {
    ws.send(HELLO);
    ws.close(1011, "boom");
  });
  const client = new StreamBusClient({
    url: `ws://127.0.0.1:${wss.address().port}/ws`,
    WebSocket,
    backoff: { initial: 10, max: 40 },
    random: () => 0.5,
  });
  const waits = [];
  const fifth = new Promise((r) =>
    client.on("state", (state, detail) => {
      if (detail.retryIn !== undefined && waits.push(detail.retryIn) === 5) r();
    }),
  );
  const connecting = client.connect();
  await assert.rejects(client.connect(), /already connecting/);
  await fifth;
  assert.deepEqual(waits, [5, 10, 20, 20, 20]);
  client.close();
  await assert.rejects(connecting, (e) => e.code === 1000);
  await new Promise((r) => wss.close(r));
});
