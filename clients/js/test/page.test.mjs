// The committed live page is exactly what the build makes from page/ and the package.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { PAGE, renderPage } from "../scripts/build-page.mjs";

test("plugins/websocket/.../static/index.html is up to date (run `npm run page` after editing page/ or src/)", async () => {
  const fresh = await renderPage();
  assert.ok(readFileSync(PAGE, "utf8") === fresh, "the committed page differs from a fresh build: run `npm run page` in clients/js");
  assert.equal(fresh.split("__STREAMBUS_WS_PATH__").length, 2, "the server fills in the path at exactly one place");
  assert.ok(!/<script[^>]+src=/.test(fresh), "one self-contained file: the CSP allows inline scripts only");
});
