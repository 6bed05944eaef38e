// A rolling restart: gateway A drains (SIGTERM) while a publisher numbers
// its messages and publishes continuously; gateway B, started on A's port
// (both set SO_REUSEPORT) and fed by the same publisher, takes the clients
// A sends away. A page's clients, one per transport, resume on B from the
// last id they got: every message exactly once, no gap.

import assert from "node:assert/strict";
import { e2e } from "./lib/scope.js";
import { Ids, Stream, warmUp } from "./lib/traffic.js";
import { Recorder, until } from "./lib/wait.js";

const DRAIN_WINDOW_MS = 2_000;
/** A exits at most 5 s after its window; this is the safety net on top. */
const EXIT_MS = DRAIN_WINDOW_MS + 5_000 + 8_000;
const CHANNEL = "drain";
const CLIENTS = ["websocket", "sse", "longpoll"];
/** Messages every client gets from A after B subscribed, before the drain. */
const ON_A_AFTER_B = 10;

e2e("clients resume exactly once on a second gateway when the first drains", { timeout: 90_000 }, async (scope) => {
  const pages = await scope.pageServer();
  const publisher = await scope.publisherBound();
  const args = [
    "--zmq-bind",
    "",
    "--zmq-connect",
    publisher.endpoint,
    "--drain-window-ms",
    String(DRAIN_WINDOW_MS),
    // Ample history: a resume must never depend on how fast a client came back.
    "--history-messages",
    "5000",
    "--allowed-origin",
    pages.origin,
  ];
  const a = await scope.gateway([...args, "--listen", "127.0.0.1:0"]);
  await publisher.subscribers(1);

  const browser = await scope.browser();
  const recorder = new Recorder();
  const page = await scope.page(browser, pages, recorder);
  for (const transport of CLIENTS) {
    await page.open(transport, { url: a.url, channels: [CHANNEL], transports: [transport] });
  }
  const ids = new Ids();
  await warmUp(publisher, recorder, CHANNEL, CLIENTS, { ids });
  const stream = new Stream(publisher, CHANNEL, ids).start();

  // Every client is on A (B did not exist when they connected). B shares
  // A's port; once the publisher has its subscription, B has every message
  // published from then on.
  const b = await scope.gateway([...args, "--listen", a.listen]);
  assert.equal(b.listen, a.listen);
  await publisher.subscribers(2);
  // A resume from before B's first message on the channel would be a gap:
  // let the clients' cursors move past it while they are still on A.
  const target = `m${stream.published.length + ON_A_AFTER_B}`;
  await until(
    () => CLIENTS.every((c) => recorder.texts(c, CHANNEL).includes(target)),
    10_000,
    `${target} at every client`,
  );

  a.signal("SIGTERM");
  const exit = await until(() => a.exit, EXIT_MS, "gateway A to exit after its drain");
  assert.deepEqual([exit.code, exit.signal], [0, null], "A exits 0 after the drain");
  // Every client was sent away by A and is back, on B: it gets what is
  // published now.
  const afterExit = `m${stream.published.length + 5}`;
  await until(
    () => CLIENTS.every((c) => recorder.texts(c, CHANNEL).includes(afterExit)),
    20_000,
    `${afterExit} (published after A exited) at every client`,
  );
  stream.stop();
  await stream.ended(recorder, CLIENTS, 10_000);

  for (const client of CLIENTS) {
    stream.assertExactlyOnce(recorder, client);
    assert.deepEqual(recorder.of(client, "gap"), [], `${client}: no gap`);
    const states = recorder.of(client, "state");
    assert.ok(
      states.every((s) => s.state !== "failed"),
      `${client} never failed: ${JSON.stringify(states)}`,
    );
  }
});
