// Scoped tokens (JWT) against a real streambus (bus_server.py --jwt-secret-env) over loopback.
// Tokens are minted with `streambus token`, as a developer would.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { ForbiddenError, ServerError, StreamBusClient, UnauthorizedError } from "../dist/index.js";
import { PYTHON, startBus, until } from "./helpers.mjs";

const SECRET_ENV = "STREAMBUS_JS_TEST_JWT";
process.env[SECRET_ENV] = randomBytes(48).toString("base64url");

function mint(...args) {
  const proc = spawnSync(PYTHON, ["-m", "streambus", "token", "--secret-env", SECRET_ENV, ...args], { encoding: "utf8" });
  assert.equal(proc.status, 0, proc.stderr);
  return proc.stdout.trim();
}

describe("scoped tokens", () => {
  let bus;
  let tenantA;
  before(async () => {
    bus = await startBus(["--token", "operator-static", "--jwt-secret-env", SECRET_ENV, "--jwt-leeway", "0"]);
    tenantA = mint("--meta", "tenant=a", "--ttl", "10m");
  });
  after(async () => bus.stop());

  test("a tenant's token follows only that tenant's streams", async (t) => {
    const client = new StreamBusClient({ url: bus.ws, WebSocket, token: tenantA, tokenIn: "header" });
    t.after(() => client.close());
    await client.connect();
    for (const [id, tenant] of [["tb-1", "b"], ["ta-1", "a"]]) {
      await bus.send({ cmd: "start", id, model: "m", meta: { tenant } });
      await bus.send({ cmd: "delta", id, text: `for ${tenant}` });
      await bus.send({ cmd: "end", id });
    }
    // b's stream went out first: had it leaked, it would be here by the time a's ends.
    await until(client, () => client.stream("ta-1")?.ended === true);
    assert.equal(client.stream("ta-1").view.text, "for a");
    assert.equal(client.stream("tb-1"), undefined);
    assert.equal(client.stats.events, 3);
  });

  test("a subscription outside the token's scope rejects connect() with ForbiddenError", async (t) => {
    await bus.send({ cmd: "start", id: "tb-live", model: "m", meta: { tenant: "b" } });
    t.after(() => bus.send({ cmd: "end", id: "tb-live" }));
    const cases = [
      [{ meta: { tenant: "b" } }, "meta"],
      [{ streams: ["tb-live"] }, "streams"],
    ];
    for (const [filters, field] of cases) {
      const client = new StreamBusClient({ url: bus.ws, WebSocket, token: tenantA, filters });
      t.after(() => client.close());
      const errors = [];
      client.on("error", (e) => errors.push(e));
      await assert.rejects(client.connect(), (err) => {
        assert.ok(err instanceof ForbiddenError, String(err));
        assert.ok(err instanceof ServerError);
        assert.equal(err.code, "forbidden");
        assert.equal(err.field, field);
        assert.match(err.message, /outside this token's scope/);
        assert.ok(!err.message.includes(tenantA));
        return true;
      });
      assert.equal(errors.length, 1);
      client.close();
    }
  });

  test("a forged or malformed token is UnauthorizedError (4001), the static token still works", async (t) => {
    const forged = tenantA.slice(0, -6) + (tenantA.endsWith("AAAAAA") ? "BBBBBB" : "AAAAAA");
    for (const token of [forged, "not.a.jwt"]) {
      const client = new StreamBusClient({ url: bus.ws, WebSocket, token });
      t.after(() => client.close());
      await assert.rejects(client.connect(), (err) => err instanceof UnauthorizedError && err.code === 4001);
      assert.equal(client.state, "closed");
    }
    const operator = new StreamBusClient({ url: bus.ws, WebSocket, token: "operator-static", filters: { meta: { tenant: "b" } } });
    t.after(() => operator.close());
    await operator.connect();
    assert.equal(operator.state, "live");
  });

  test("a token that expires while connected stops the client with UnauthorizedError (4005)", async (t) => {
    // JWT times are whole seconds (exp = floor(now) + ttl) and minting runs a Python process: a
    // 1 s token could expire before it connects (then it is refused, 4001); 3 s outlive the mint.
    const client = new StreamBusClient({ url: bus.ws, WebSocket, token: mint("--meta", "tenant=a", "--ttl", "3") });
    t.after(() => client.close());
    const errors = [];
    client.on("error", (e) => errors.push(e));
    await client.connect();
    await until(client, () => client.state === "closed");
    // The server's `token_expired` error frame, then the close it announces.
    assert.deepEqual(errors.map((e) => e.name), ["ServerError", "UnauthorizedError"]);
    assert.equal(errors[0].code, "token_expired");
    assert.equal(errors[1].code, 4005);
  });

  test("a stop without the stop right rejects with ForbiddenError; the connection stays", async (t) => {
    const client = new StreamBusClient({ url: bus.ws, WebSocket, token: tenantA });
    t.after(() => client.close());
    await client.connect();
    await assert.rejects(client.stop("any-stream"), (err) => {
      assert.ok(err instanceof ForbiddenError, String(err));
      assert.match(err.message, /lacks the stop right/);
      return true;
    });
    assert.equal(client.state, "live");
  });
});
