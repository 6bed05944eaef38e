// Tokens that expire mid-stream: the gateway ends a stream when its token
// does (a WebSocket with 4001, an SSE stream by ending it; a long-poll is
// refused 401 at its next poll), the SDK fetches a new token from getToken
// and resumes from its last id, and nothing is lost.

import assert from "node:assert/strict";
import { e2e } from "./lib/scope.js";
import { AUTH_ARGS, mint } from "./lib/tokens.js";
import { Stream, warmUp } from "./lib/traffic.js";
import { Recorder, until } from "./lib/wait.js";

/** A token is valid for at least this long when minted (whole seconds). */
const TOKEN_S = 2;
/** Tokens each client must fetch while the stream runs: two expiries at least. */
const RENEWALS = 2;
const CHANNEL = "secure";
const CLIENTS = ["websocket", "sse", "longpoll"];

e2e("a client renews an expiring token and loses nothing", { timeout: 90_000 }, async (scope, t) => {
  const pages = await scope.pageServer();
  // Ample history: a resume must never depend on how fast a client came back.
  const gw = await scope.gateway([...AUTH_ARGS, "--history-messages", "5000", "--allowed-origin", pages.origin]);
  const publisher = await scope.publisherTo(gw);
  await publisher.subscribers(1);

  const browser = await scope.browser();
  const recorder = new Recorder();
  // exp is in whole seconds: rounding up keeps every token valid TOKEN_S at least.
  const tokens = () =>
    mint({ sub: "e2e-user", channels: [CHANNEL], exp: Math.ceil(Date.now() / 1000) + TOKEN_S });
  const page = await scope.page(browser, pages, recorder, tokens);
  for (const transport of CLIENTS) {
    await page.open(transport, { url: gw.url, channels: [CHANNEL], transports: [transport], token: true });
  }
  await warmUp(publisher, recorder, CHANNEL, CLIENTS);
  const stream = new Stream(publisher, CHANNEL).start();
  const streamedFrom = Date.now();
  await until(
    () => CLIENTS.every((c) => recorder.of(c, "token").filter((e) => e.at > streamedFrom).length >= RENEWALS),
    30_000,
    `${RENEWALS} tokens fetched by every client while the stream runs`,
  );
  stream.stop();
  await stream.ended(recorder, CLIENTS, 15_000);

  for (const client of CLIENTS) {
    const states = recorder.of(client, "state").map((s) => `${s.state}${s.reason ? ` (${s.reason})` : ""}`);
    t.diagnostic(`${client}: ${recorder.of(client, "token").length} tokens; ${states.join(", ")}`);
  }
  for (const client of CLIENTS) {
    stream.assertExactlyOnce(recorder, client);
    assert.deepEqual(recorder.of(client, "gap"), [], `${client}: no gap`);
    const states = recorder.of(client, "state");
    assert.ok(
      states.every((s) => s.state !== "failed"),
      `${client} never gave up: ${JSON.stringify(states)}`,
    );
  }
});
