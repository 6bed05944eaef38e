import assert from "node:assert/strict";
import { test } from "node:test";
import { Cursors } from "../../dist/cursors.js";

// Gateway ids: counter << 16 | tag, at or above 2^56.
const gw = (counter, tag) => String((BigInt(counter) << 16n) | BigInt(tag));
const START = 2n ** 40n; // any counter that puts ids above 2^56

test("drops what a channel already had, per channel", () => {
  const c = new Cursors();
  assert.equal(c.accept("a", "10"), true);
  assert.equal(c.accept("a", "10"), false);
  assert.equal(c.accept("a", "9"), false);
  assert.equal(c.accept("b", "5"), true, "another channel's ids are its own");
  assert.equal(c.accept("a", "11"), true);
  assert.equal(c.get("a"), "11");
  assert.equal(c.get("b"), "5");
  assert.equal(c.get("nope"), undefined);
});

test("compares ids above 2^53 exactly", () => {
  const c = new Cursors();
  assert.equal(c.accept("a", "9007199254740992"), true);
  assert.equal(c.accept("a", "9007199254740993"), true);
  assert.equal(c.accept("a", "9007199254740992"), false);
  assert.equal(c.accept("b", gw(2n ** 47n, 0xffff)), true);
  assert.equal(c.accept("b", gw(2n ** 47n + 1n, 0xffff)), true);
  assert.equal(c.accept("b", gw(2n ** 47n, 0xffff)), false);
});

test("ids of another gateway process are not compared with this one's", () => {
  const c = new Cursors();
  assert.equal(c.accept("a", gw(START + 100n, 7)), true);
  // Another process (tag 9), started earlier: smaller numbers, new messages.
  assert.equal(c.accept("a", gw(START + 5n, 9)), true);
  assert.equal(c.accept("a", gw(START + 4n, 9)), false, "same process again: compared");
});

test("a channel changing numbering (publisher ids after gateway ids) is accepted", () => {
  const c = new Cursors();
  assert.equal(c.accept("a", gw(START, 1)), true);
  assert.equal(c.accept("a", "42"), true);
  assert.equal(c.accept("a", "41"), false);
});

test("forget: a channel subscribed again starts over", () => {
  const c = new Cursors();
  c.accept("a", "10");
  c.forget("a");
  assert.equal(c.get("a"), undefined);
  assert.equal(c.accept("a", "3"), true);
});

test("shared plan: one cursor, the last id received on any channel", () => {
  const c = new Cursors();
  assert.deepEqual(c.plan(["a", "b"], false), [{ channels: ["a", "b"], since: undefined }]);
  c.accept("a", gw(START + 1n, 3));
  c.accept("b", gw(START + 2n, 3));
  c.accept("a", gw(START + 3n, 3));
  assert.deepEqual(c.plan(["a", "b", "c"], false), [{ channels: ["a", "b", "c"], since: gw(START + 3n, 3) }]);
  // A duplicate does not move it.
  c.accept("b", gw(START + 2n, 3));
  assert.equal(c.plan(["a"], false)[0].since, gw(START + 3n, 3));
});

test("per-channel plan: each channel from its own id, those without one first, then lowest first", () => {
  const c = new Cursors();
  c.accept("hi", "900");
  c.accept("lo", "12");
  c.accept("mid", "100");
  assert.deepEqual(c.plan(["hi", "new", "lo", "mid", "new2"], true), [
    { channels: ["new"], since: undefined },
    { channels: ["new2"], since: undefined },
    { channels: ["lo"], since: "12" },
    { channels: ["mid"], since: "100" },
    { channels: ["hi"], since: "900" },
  ]);
});
