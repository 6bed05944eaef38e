// A connect answered 503 with Retry-After (an overloaded gateway or
// balancer): the SDK waits at least that long before it tries again, even
// though its own backoff would have it back much sooner. SSE and long-poll
// read the status and the header through fetch; a WebSocket cannot see
// them (a browser reports a refused upgrade as a bare failure), so this
// runs the fetch transports, in Node, where no CORS rule hides the header.

import assert from "node:assert/strict";
import { openNodeClient } from "./lib/node_clients.js";
import { e2e } from "./lib/scope.js";
import { warmUp } from "./lib/traffic.js";
import { Recorder, until } from "./lib/wait.js";

const RETRY_AFTER_S = 2;
/** Far below Retry-After: only the header can explain a wait that long. */
const BACKOFF = { baseMs: 50, maxMs: 100 };

e2e("waits Retry-After after a 503 on connect", { timeout: 60_000 }, async (scope, t) => {
  const gw = await scope.gateway([]);
  const publisher = await scope.publisherTo(gw);
  await publisher.subscribers(1);
  const recorder = new Recorder();

  // Both at once: the waits overlap.
  const cases = await Promise.all(
    ["sse", "longpoll"].map(async (transport) => {
      const proxy = await scope.proxy(gw.listen, { refuse: [{ status: 503, retryAfter: RETRY_AFTER_S }] });
      const client = await openNodeClient(recorder, transport, {
        url: proxy.url,
        channels: [`retry.${transport}`],
        transports: [transport],
        backoff: BACKOFF,
      });
      scope.closes(client);
      return { transport, proxy };
    }),
  );
  await Promise.all(
    cases.map(({ transport, proxy }) =>
      until(() => proxy.log.length >= 2, 20_000, `${transport}: a second request after the 503`),
    ),
  );
  for (const { transport, proxy } of cases) {
    const [refused, retried] = proxy.log;
    const waitedMs = retried.at - refused.at;
    t.diagnostic(`${transport}: retried ${waitedMs} ms after the 503 (Retry-After: ${RETRY_AFTER_S})`);
    assert.equal(refused.action, "503", `${transport}: the first request was refused`);
    assert.ok(
      waitedMs >= RETRY_AFTER_S * 1000,
      `${transport}: came back ${waitedMs} ms after a 503 with Retry-After: ${RETRY_AFTER_S}`,
    );
  }
  // And then it works as usual.
  await Promise.all(
    cases.map(({ transport }) => warmUp(publisher, recorder, `retry.${transport}`, [transport])),
  );
  for (const { transport } of cases) {
    assert.ok(
      recorder.of(transport, "state").every((s) => s.state !== "failed"),
      `${transport}: a 503 is not a reason to give up`,
    );
  }
});
