// Test helpers: a real streambus (bus_server.py) over loopback, and a WebSocket whose
// (re)connects a test can hold back, so "the client is away" is a state, not a race.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createInterface } from "node:readline";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../..");
export const PYTHON = process.env.STREAMBUS_PYTHON ?? join(repo, ".venv/bin/python");

/** Start a bus with the websocket and http sinks; `send(cmd)` runs one command of bus_server.py. */
export async function startBus(args = []) {
  if (!existsSync(PYTHON)) throw new Error(`no Python at ${PYTHON}: run scripts/bootstrap.sh --test (or set STREAMBUS_PYTHON)`);
  const proc = spawn(PYTHON, [join(here, "bus_server.py"), ...args], { stdio: ["pipe", "pipe", "inherit"] });
  const lines = createInterface({ input: proc.stdout });
  const waiting = [];
  const early = [];
  lines.on("line", (line) => {
    if (!line.startsWith("@@")) return; // the bus's log lines
    line = line.slice(2);
    const w = waiting.shift();
    if (w) w(JSON.parse(line));
    else early.push(JSON.parse(line));
  });
  const next = () => (early.length ? Promise.resolve(early.shift()) : new Promise((r) => waiting.push(r)));
  const exited = new Promise((r) => proc.on("exit", r));
  const urls = await Promise.race([next(), exited.then((code) => { throw new Error(`bus_server.py exited with ${code}`); })]);
  return {
    ...urls,
    async send(cmd) {
      proc.stdin.write(JSON.stringify(cmd) + "\n");
      const answer = await next();
      if (answer.error) throw new Error(answer.error);
      return answer;
    },
    async stop() {
      proc.stdin.end();
      await exited;
    },
  };
}

/** A WebSocket constructor (the `ws` package's) whose connections wait while `gate.closed`. */
export function gatedWebSocket() {
  const gate = { closed: false, waiters: [], open() { this.closed = false; for (const w of this.waiters.splice(0)) w(); } };
  class Gated {
    constructor(url, protocols, options) {
      this.readyState = 0;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      const connect = () => {
        const ws = new WebSocket(url, protocols, options);
        this.ws = ws;
        ws.onopen = (e) => { this.readyState = 1; this.onopen?.(e); };
        ws.onmessage = (e) => this.onmessage?.(e);
        ws.onerror = (e) => this.onerror?.(e);
        ws.onclose = (e) => { this.readyState = 3; this.onclose?.(e); };
      };
      if (gate.closed) gate.waiters.push(connect);
      else connect();
    }
    send(data) { this.ws.send(data); }
    close(code, reason) { this.ws?.close(code, reason); }
  }
  return { WebSocket: Gated, gate };
}

/** Resolve once `check()` is true, re-checking after every client emission (bounded by the test's timeout). */
export function until(client, check) {
  return new Promise((resolve) => {
    if (check()) return resolve();
    const offs = ["event", "subscribed", "state", "error"].map((t) => client.on(t, () => {
      if (check()) {
        offs.forEach((off) => off());
        resolve();
      }
    }));
  });
}
