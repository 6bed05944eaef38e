// 1,000 SDK clients in Node on one gateway, which drains: their reconnects
// (to a second gateway on the same port) must be spread over time, not one
// wave. The gateway spreads its closes over the drain window; the SDK adds
// its own random delay on a drain's close (1012). The histogram of reconnect
// times, per 250 ms, is printed for the record.

import assert from "node:assert/strict";
import { openNodeClient } from "./lib/node_clients.js";
import { e2e } from "./lib/scope.js";
import { Ids, warmUp } from "./lib/traffic.js";
import { Recorder, until } from "./lib/wait.js";

const CLIENTS = 1_000;
const DRAIN_WINDOW_MS = 2_000;
const BUCKET_MS = 250;
const CHANNEL = "storm";
/** No 250 ms bucket may hold more than this share of the reconnects. */
const BUCKET_SHARE_MAX = 0.25;
/** Nor may they fit in fewer buckets than this. */
const BUCKETS_MIN = 4;

e2e(`${CLIENTS} clients reconnect spread out after a drain`, { timeout: 120_000 }, async (scope) => {
  const publisher = await scope.publisherBound();
  const args = ["--zmq-bind", "", "--zmq-connect", publisher.endpoint, "--drain-window-ms", String(DRAIN_WINDOW_MS)];
  const a = await scope.gateway([...args, "--listen", "127.0.0.1:0"]);
  await publisher.subscribers(1);

  const recorder = new Recorder();
  const names = Array.from({ length: CLIENTS }, (_, i) => `c${i}`);
  for (const name of names) {
    const client = await openNodeClient(recorder, name, {
      url: a.url,
      channels: [CHANNEL],
      transports: ["websocket"],
    });
    scope.closes(client);
  }
  const ids = new Ids();
  await warmUp(publisher, recorder, CHANNEL, names, { ids, ms: 60_000 });

  // B on A's port; then one more message from A, so that every cursor is
  // one B knows (B has the channel from its first message on).
  const b = await scope.gateway([...args, "--listen", a.listen]);
  await publisher.subscribers(2);
  publisher.publish(CHANNEL, "before", { id: ids.next() });
  await until(
    () => names.every((n) => recorder.texts(n, CHANNEL).includes("before")),
    20_000,
    '"before" at every client',
  );

  const drainedAt = Date.now();
  a.signal("SIGTERM");
  const reconnectedAt = (name) =>
    recorder.of(name, "state").find((s) => s.state === "connected" && s.at > drainedAt)?.at;
  await until(() => names.every(reconnectedAt), 30_000, `all ${CLIENTS} clients connected again`);
  const exit = await until(() => a.exit, 15_000, "gateway A to exit");
  assert.deepEqual([exit.code, exit.signal], [0, null], "A exits 0 after the drain");

  const offsets = names.map((n) => reconnectedAt(n) - drainedAt);
  const buckets = new Map();
  for (const ms of offsets) {
    const k = Math.floor(ms / BUCKET_MS);
    buckets.set(k, (buckets.get(k) ?? 0) + 1);
  }
  const last = Math.max(...buckets.keys());
  const lines = [`reconnects after SIGTERM (drain window ${DRAIN_WINDOW_MS} ms), per ${BUCKET_MS} ms:`];
  for (let k = 0; k <= last; k++) {
    const n = buckets.get(k) ?? 0;
    const from = k * BUCKET_MS;
    lines.push(`${String(from).padStart(5)}-${String(from + BUCKET_MS).padEnd(5)} ms ${String(n).padStart(4)} ${"*".repeat(Math.ceil(n / 10))}`);
  }
  const histogram = lines.join("\n");
  console.log(histogram);

  const fullest = Math.max(...buckets.values());
  assert.ok(
    fullest <= CLIENTS * BUCKET_SHARE_MAX,
    `${fullest} of ${CLIENTS} reconnects in one ${BUCKET_MS} ms bucket:\n${histogram}`,
  );
  assert.ok(buckets.size >= BUCKETS_MIN, `reconnects in only ${buckets.size} buckets:\n${histogram}`);

  // They resumed on B without a gap and get what is published there.
  publisher.publish(CHANNEL, "after", { id: ids.next() });
  await until(
    () => names.every((n) => recorder.texts(n, CHANNEL).includes("after")),
    20_000,
    '"after" at every client',
  );
  const gaps = names.filter((n) => recorder.of(n, "gap").length > 0);
  assert.deepEqual(gaps, [], "no client was told of a gap");
  assert.ok(b.exit === null, "B still serves");
});
