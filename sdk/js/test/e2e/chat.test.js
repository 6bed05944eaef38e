// Two pages chat through a hub: each publish()es to the room, the gateway
// hands the message to the hub (over ZeroMQ, with the sender's address and
// transport), and the hub's answer reaches both pages. One page sends on
// its WebSocket (the gateway.v1 subprotocol), the other with POST /publish
// beside its SSE stream.

import assert from "node:assert/strict";
import { e2e } from "./lib/scope.js";
import { warmUp } from "./lib/traffic.js";
import { Recorder, until } from "./lib/wait.js";

const ROOM = "room.1";
const PEOPLE = { alice: "websocket", bob: "sse" };

e2e("two pages chat through a hub", { timeout: 60_000 }, async (scope) => {
  const pages = await scope.pageServer();
  const gw = await scope.gateway(["--upstream-bind", "tcp://127.0.0.1:*", "--allowed-origin", pages.origin]);
  const hub = await scope.hub(gw);
  const publisher = await scope.publisherTo(gw);
  await publisher.subscribers(1);

  const browser = await scope.browser();
  const recorder = new Recorder();
  const chat = {};
  for (const [name, transport] of Object.entries(PEOPLE)) {
    chat[name] = await scope.page(browser, pages, recorder);
    await chat[name].open(name, { url: gw.url, channels: [ROOM], transports: [transport] });
  }
  await warmUp(publisher, recorder, ROOM, Object.keys(PEOPLE));

  const sent = await Promise.all([
    chat.alice.publish("alice", ROOM, "hi bob, alice here"),
    chat.bob.publish("bob", ROOM, "hello alice"),
  ]);
  assert.deepEqual(sent, [{ ok: true }, { ok: true }], "both publishes acknowledged");

  // The hub names the sender (its address, without auth) before the text.
  const heard = (name, text) => () =>
    recorder.texts(name, ROOM).find((m) => m.endsWith(`: ${text}`));
  await until(heard("bob", "hi bob, alice here"), 10_000, "bob hears alice");
  await until(heard("alice", "hello alice"), 10_000, "alice hears bob");
  await until(heard("alice", "hi bob, alice here"), 10_000, "alice hears herself");
  await until(heard("bob", "hello alice"), 10_000, "bob hears himself");

  const upstream = hub.received().filter((m) => m.kind === "message");
  const byText = Object.fromEntries(
    upstream.map((m) => [Buffer.from(m.base64, "base64").toString(), m]),
  );
  assert.equal(byText["hi bob, alice here"]?.transport, "websocket", "alice's message came over her WebSocket");
  assert.equal(byText["hello alice"]?.transport, "http", "bob's message came as a POST /publish");
  assert.equal(byText["hello alice"]?.channel, ROOM);
  assert.equal(upstream.length, 2, `the hub got each message once: ${JSON.stringify(upstream)}`);
});
