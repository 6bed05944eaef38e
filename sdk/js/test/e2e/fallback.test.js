// A page behind a proxy that blocks transports: with WebSocket upgrades
// refused the SDK settles on SSE within seconds; with SSE buffered as well
// (the stream's bytes held, as a buffering proxy does) it settles on
// long-poll. Either way it keeps receiving.

import assert from "node:assert/strict";
import { e2e } from "./lib/scope.js";
import { Stream, warmUp } from "./lib/traffic.js";
import { Recorder } from "./lib/wait.js";

/** What the clients get as `connectTimeoutMs`: how long a silent transport may take. */
const CONNECT_TIMEOUT_MS = 2_000;
/** A refused upgrade fails at once: SSE must follow within this. */
const FALLBACK_TO_SSE_MS = 5_000;
/** A buffered stream is only noticed by its silence. */
const FALLBACK_TO_LONGPOLL_MS = CONNECT_TIMEOUT_MS + 5_000;
/** How many messages it must keep receiving on the fallback. */
const AFTER_FALLBACK = 25;

e2e("falls back when a proxy blocks WebSocket, then SSE", { timeout: 90_000 }, async (scope, t) => {
  const pages = await scope.pageServer();
  const gw = await scope.gateway(["--allowed-origin", pages.origin]);
  const publisher = await scope.publisherTo(gw);
  await publisher.subscribers(1);
  const browser = await scope.browser();

  const cases = [
    {
      name: "websocket refused: sse",
      mode: { websocket: "403" },
      blocked: ["websocket"],
      expect: "sse",
      within: FALLBACK_TO_SSE_MS,
    },
    {
      name: "websocket closed and sse buffered: longpoll",
      mode: { websocket: "close", sse: "buffer" },
      blocked: ["websocket", "sse"],
      expect: "longpoll",
      within: FALLBACK_TO_LONGPOLL_MS,
    },
  ];
  for (const c of cases) {
    await scope.step(t, c.name, async () => {
      const proxy = await scope.proxy(gw.listen, c.mode);
      const recorder = new Recorder();
      const page = await scope.page(browser, pages, recorder);
      const client = c.expect;
      const channel = `fallback.${c.expect}`;
      const started = Date.now();
      await page.open(client, { url: proxy.url, channels: [channel], connectTimeoutMs: CONNECT_TIMEOUT_MS });
      // Published meanwhile: a first long-poll without a cursor is only
      // answered by a message, and an SDK may call it connected only then.
      const warm = warmUp(publisher, recorder, channel, [client], { ms: c.within + 20_000 });
      const settled = await recorder.next(
        client,
        (e) => e.kind === "state" && e.state === "connected" && e.transport === c.expect,
        c.within + 10_000,
        `connected over ${c.expect}`,
      );
      const tookMs = settled.at - started;
      t.diagnostic(`${c.name}: connected over ${c.expect} after ${tookMs} ms`);
      assert.ok(tookMs <= c.within, `fell back to ${c.expect} after ${tookMs} ms, not within ${c.within} ms`);
      for (const kind of c.blocked) {
        assert.ok(proxy.requests(kind).length > 0, `the SDK tried ${kind} first: ${JSON.stringify(proxy.log)}`);
      }

      await warm;
      const stream = new Stream(publisher, channel);
      stream.start();
      await recorder.next(
        client,
        (e) => e.kind === "message" && e.data === `m${AFTER_FALLBACK}`,
        15_000,
        `m${AFTER_FALLBACK} over ${c.expect}`,
      );
      stream.stop();
      await stream.ended(recorder, [client], 10_000);
      stream.assertExactlyOnce(recorder, client);

      const connected = recorder.of(client, "state").filter((s) => s.state === "connected");
      assert.ok(
        connected.every((s) => !c.blocked.includes(s.transport) || s.at < settled.at),
        `it stayed off the blocked transports once it fell back: ${JSON.stringify(connected)}`,
      );
      await page.close(client);
    });
  }
});
