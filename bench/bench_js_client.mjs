// The JS client's cost per token: a Node process following 100 streams at 50 tokens/s each with
// @streambus/client (resume bookkeeping, coalescing, moderation spans, change views), against a
// hand-written `onmessage` + `JSON.parse` loop following the same streams from the same server
// in the same run. Each reader is its own process, so process.cpuUsage() is its CPU alone.
// Writes bench/results/js-client.md. Needs `npm ci` and `npm run build` in clients/js
// (`npm run bench` there does both) and the repo's .venv (scripts/bootstrap.sh --test).
import { fork } from "node:child_process";
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const clientDir = join(here, "../clients/js");
const STREAMS = Number(process.env.BENCH_STREAMS ?? 100);
const TOKENS = Number(process.env.BENCH_TOKENS ?? 300); // 6 s at 50 tokens/s
const RATE = 50;
const expected = Array.from({ length: TOKENS }, (_, i) => `t${i} `).join("");

async function reader(kind, url) {
  const { default: WebSocket } = await import(pathToFileURL(join(clientDir, "node_modules/ws/index.js")).href);
  const texts = new Map();
  let ended = 0;
  let tokens = 0;
  let cpu0 = null;
  const done = () => {
    const cpu = process.cpuUsage(cpu0);
    const exact = texts.size === STREAMS && [...texts.values()].every((t) => t === expected);
    process.send({ kind, tokens, cpuMicros: cpu.user + cpu.system, exact });
  };
  if (kind === "hand") {
    const ws = new WebSocket(url);
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.op === "hello") ws.send(JSON.stringify({ op: "subscribe", id: "hand" }));
      else if (m.op === "subscribed") process.send({ ready: true });
      if (m.type === "start") cpu0 ??= process.cpuUsage();
      if (m.type === "delta") {
        tokens += m.n ?? 1;
        texts.set(m.stream, (texts.get(m.stream) ?? "") + m.text);
      } else if (m.type === "end" && ++ended === STREAMS) {
        done();
        ws.close();
      }
    };
  } else {
    const { StreamBusClient } = await import(pathToFileURL(join(clientDir, "dist/index.js")).href);
    const client = new StreamBusClient({ url, WebSocket });
    // A UI re-reads the view on every change: do the same, so the views are built, not skipped.
    client.on("stream", (s) => s.onChange((v) => texts.set(v.id, v.text)));
    client.on("event", (e, s) => {
      if (e.type === "start") cpu0 ??= process.cpuUsage();
      if (e.type === "delta") tokens += e.n;
      else if (e.type === "end" && ++ended === STREAMS) {
        done();
        client.close();
      }
    });
    await client.connect();
    process.send({ ready: true });
  }
}

async function main() {
  const { startBus } = await import(pathToFileURL(join(clientDir, "test/helpers.mjs")).href);
  const bus = await startBus();
  const kids = ["client", "hand"].map((kind) => fork(fileURLToPath(import.meta.url), [kind, bus.ws]));
  const ready = kids.map((k) => new Promise((r) => k.on("message", (m) => m.ready && r())));
  const results = kids.map((k) => new Promise((r) => k.on("message", (m) => m.kind && r(m))));
  await Promise.all(ready);
  await bus.send({ cmd: "produce", streams: STREAMS, tokens: TOKENS, rate: RATE });
  const [client, hand] = await Promise.all(results);
  await bus.stop();
  const perToken = (r) => (r.cpuMicros * 1000) / (STREAMS * TOKENS);
  const ratio = perToken(client) / perToken(hand);
  const row = (name, r) => `| ${name} | ${r.tokens} | ${(r.cpuMicros / 1000).toFixed(0)} | ${perToken(r).toFixed(0)} | ${r.exact ? "yes" : "NO"} |`;
  const md = [
    "## JS client (`bench/bench_js_client.mjs`)",
    "",
    `Node ${process.version}: ${STREAMS} streams at ${RATE} tokens/s each (${TOKENS} tokens per stream), one real`,
    "streambus (websocket sink) over loopback; each reader in its own Node process, CPU from",
    "`process.cpuUsage()` between the first `start` and the last `end` (user + system).",
    "",
    "| reader | deltas' tokens | CPU ms | CPU ns per token | text exact |",
    "|---|---|---|---|---|",
    row("`@streambus/client` (`StreamBusClient`, a view read per change)", client),
    row("hand-written `onmessage` + `JSON.parse`, text concatenated", hand),
    "",
    `Ratio: ${ratio.toFixed(2)}x (goal: within 1.5x).`,
    "",
  ].join("\n");
  writeFileSync(join(here, "results/js-client.md"), md);
  console.log(md);
  if (!client.exact || !hand.exact) process.exitCode = 1;
}

if (process.argv[2] === "client" || process.argv[2] === "hand") await reader(process.argv[2], process.argv[3]);
else await main();
