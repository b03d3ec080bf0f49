// StreamText on its own: coalesced deltas, duplicates, retraction offsets, change callbacks.
import assert from "node:assert/strict";
import { test } from "node:test";
import { parseEvent, StreamText } from "../dist/index.js";

const ev = (o) => parseEvent({ stream: "s", ts: 0, ...o });

test("a coalesced delta counts as its seqs; a replayed one is a duplicate", () => {
  const s = new StreamText("s");
  const views = [];
  s.onChange((v) => views.push(v));
  assert.ok(s.apply(ev({ type: "start", seq: 0, model: "m", provider: "p", meta: {} })));
  assert.ok(s.apply(ev({ type: "delta", seq: 3, first_seq: 1, n: 3, text: "abc" })));
  assert.equal(s.apply(ev({ type: "delta", seq: 2, text: "b" })), false);
  assert.equal(s.apply(ev({ type: "delta", seq: 3, text: "c" })), false);
  assert.ok(s.apply(ev({ type: "delta", seq: 4, text: "d" })));
  assert.equal(s.view.text, "abcd");
  assert.equal(s.view.lastSeq, 4);
  assert.equal(views.length, 3);
  assert.notEqual(views[1], views[2], "a new object after each change");
  assert.equal(s.view, s.view, "the same object until the next change");
});

test("overlapping retractions and a tool line still arriving", () => {
  const s = new StreamText("s");
  s.apply(ev({ type: "delta", seq: 1, text: "0123456789" }));
  s.apply(ev({ type: "moderation", seq: 2, action: "retract", start: 2, end: 5, verdict: "x", categories: [] }));
  s.apply(ev({ type: "moderation", seq: 3, action: "retract", start: 4, end: 7, verdict: "x", categories: [] }));
  assert.equal(s.view.text, "01789");
  s.apply(ev({ type: "delta", seq: 4, channel: "tool", text: '{"index":1,"name":"a","arguments":"{}"}\nplain line\n{"index":0,' }));
  assert.deepEqual(s.view.toolCalls, [{ index: 1, id: "", name: "a", arguments: "{}" }]);
  assert.deepEqual(s.view.toolText, ["plain line", '{"index":0,']);
  assert.equal(s.view.fromStart, false);
});

test("parseEvent fills the defaults a delta omits", () => {
  const d = parseEvent({ type: "delta", stream: "s", seq: 1, ts: 0, text: "x" });
  assert.deepEqual([d.channel, d.n, d.first_seq], ["content", 1, null]);
  assert.throws(() => parseEvent({ type: "delta", stream: "s", seq: 1, ts: 0, text: "x", channel: "video" }), /\$\.channel/);
});
