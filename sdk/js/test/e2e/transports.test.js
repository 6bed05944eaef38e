// Each transport on its own, from a page on another origin than the
// gateway's (the allowlist names it): text, multi-line text with an event
// name, and binary payloads arrive as the publisher sent them.

import assert from "node:assert/strict";
import { e2e } from "./lib/scope.js";
import { warmUp } from "./lib/traffic.js";
import { Recorder, until } from "./lib/wait.js";

// Not valid UTF-8 (0xff, a lone 0x80), with a newline that must not split it.
const BINARY = [0x00, 0xff, 0x10, 0x0a, 0x80, 0x7f];

e2e("a page receives text and binary on each transport", { timeout: 90_000 }, async (scope, t) => {
  const pages = await scope.pageServer();
  const gw = await scope.gateway(["--allowed-origin", pages.origin]);
  const publisher = await scope.publisherTo(gw);
  await publisher.subscribers(1);
  const browser = await scope.browser();

  for (const transport of ["websocket", "sse", "longpoll"]) {
    await scope.step(t, transport, async () => {
      const recorder = new Recorder();
      const page = await scope.page(browser, pages, recorder);
      const channel = `news.${transport}`;
      await page.open(transport, { url: gw.url, channels: [channel], transports: [transport] });
      await warmUp(publisher, recorder, channel, [transport]);
      const before = recorder.messages(transport, channel).length;

      publisher.publish(channel, "hello, world");
      publisher.publish(channel, "line one\nline two", { event: "headline" });
      publisher.publish(channel, Uint8Array.from(BINARY));
      publisher.publish(channel, "héllo ✓");
      await until(
        () => recorder.texts(transport, channel).includes("héllo ✓"),
        10_000,
        `the last message over ${transport}`,
      );

      const got = recorder.messages(transport, channel).slice(before);
      // Warm-ups still on their way when the first one arrived come first.
      const test = got.filter((m) => !m.data?.startsWith("warm-up"));
      assert.deepEqual(
        test.map((m) => ({ channel: m.channel, data: m.data, binary: m.binary, unexpected: m.unexpected })),
        [
          { channel, data: "hello, world", binary: undefined, unexpected: undefined },
          { channel, data: "line one\nline two", binary: undefined, unexpected: undefined },
          { channel, data: undefined, binary: BINARY, unexpected: undefined },
          { channel, data: "héllo ✓", binary: undefined, unexpected: undefined },
        ],
      );
      assert.equal(test[1].event, "headline", "the publisher's event name");
      assert.ok(
        test.every((m, i) => i === 0 || BigInt(m.id) > BigInt(test[i - 1].id)),
        `increasing ids: ${test.map((m) => m.id)}`,
      );

      const states = recorder.of(transport, "state");
      const connected = states.filter((s) => s.state === "connected");
      assert.ok(connected.length >= 1, `connected: ${JSON.stringify(states)}`);
      assert.ok(
        connected.every((s) => s.transport === transport),
        `only ${transport} was used: ${JSON.stringify(states)}`,
      );
      assert.deepEqual(recorder.of(transport, "error"), [], "no error");
      await page.close(transport);
    });
  }
});
