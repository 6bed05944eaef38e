import assert from "node:assert/strict";
import { test } from "node:test";
import { Backoff, drainDelayMs, retryAfterMs } from "../../dist/backoff.js";

test("full jitter: each delay is drawn below a cap that doubles", () => {
  const top = new Backoff(500, 30000, () => 0.999999);
  assert.deepEqual(
    [1, 2, 3, 4, 5, 6, 7, 8].map(() => top.next()),
    [499, 999, 1999, 3999, 7999, 15999, 29999, 29999],
  );
  const bottom = new Backoff(500, 30000, () => 0);
  assert.deepEqual([bottom.next(), bottom.next(), bottom.next()], [0, 0, 0]);
});

test("the cap holds however long it fails", () => {
  const b = new Backoff(500, 30000, () => 0.999999);
  let last = 0;
  for (let i = 0; i < 2000; i++) last = b.next();
  assert.equal(last, 29999);
});

test("reset starts from the base again", () => {
  const b = new Backoff(100, 10000, () => 0.999999);
  b.next();
  b.next();
  b.next();
  b.reset();
  assert.equal(b.next(), 99);
});

test("a delay the gateway asked for is a floor", () => {
  const b = new Backoff(500, 30000, () => 0.5);
  assert.equal(b.next(3000), 3000);
  assert.equal(new Backoff(500, 30000, () => 0.5).next(10), 250);
});

test("delays are spread over the whole range", () => {
  const b = new Backoff(1000, 1000);
  const seen = Array.from({ length: 400 }, () => b.next());
  assert.ok(seen.every((d) => d >= 0 && d < 1000));
  assert.ok(Math.min(...seen) < 200 && Math.max(...seen) > 800);
});

test("Retry-After: seconds, an HTTP date, or nothing", () => {
  assert.equal(retryAfterMs("3"), 3000);
  assert.equal(retryAfterMs(" 0 "), 0);
  const now = Date.parse("Wed, 21 Oct 2026 07:28:00 GMT");
  assert.equal(retryAfterMs("Wed, 21 Oct 2026 07:28:05 GMT", now), 5000);
  assert.equal(retryAfterMs("Wed, 21 Oct 2026 07:27:00 GMT", now), 0);
  assert.equal(retryAfterMs(null), undefined);
  assert.equal(retryAfterMs(""), undefined);
  assert.equal(retryAfterMs("soon"), undefined);
});

test("after a drain: 1 to 5 s", () => {
  assert.equal(drainDelayMs(() => 0), 1000);
  assert.equal(drainDelayMs(() => 0.999999), 4999);
});
