// The client's decisions, against a fake WebSocket and a fake fetch: no
// network, no gateway.

import assert from "node:assert/strict";
import { afterEach, test } from "node:test";
import { Client as SdkClient } from "../../dist/index.js";

// Every client a test made is closed after it, passed or failed, so that
// no reconnect timer outlives it.
const open = [];
class Client extends SdkClient {
  constructor(options) {
    super(options);
    open.push(this);
  }
}
afterEach(() => {
  for (const c of open.splice(0)) c.close();
});

class FakeSocket {
  constructor(url, protocols) {
    this.url = new URL(url);
    this.protocols = protocols;
    this.sent = [];
    queueMicrotask(() => this.onopen?.());
  }
  send(data) {
    this.sent.push(data);
  }
  close(code) {
    this.closedWith = code;
  }
  welcome() {
    this.frame('{"type":"welcome","address":"a1"}\n');
  }
  frame(data) {
    this.onmessage?.({ data });
  }
  end(code, reason = "") {
    this.onclose?.({ code, reason });
  }
}

/** A WebSocket class of its own for each test, and the sockets it made. */
function sockets() {
  const made = [];
  return {
    made,
    WebSocket: function (url, protocols) {
      const s = new FakeSocket(url, protocols);
      made.push(s);
      return s;
    },
  };
}

const until = async (what, ok) => {
  for (let i = 0; i < 200; i++) {
    if (ok()) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  assert.fail("timed out waiting for " + what);
};

function record(client) {
  const seen = { messages: [], gaps: [], states: [], errors: [] };
  client.on("message", (m) => seen.messages.push(m));
  client.on("gap", (g) => seen.gaps.push(g.channel));
  client.on("state", (s) => seen.states.push(s));
  client.on("error", (e) => seen.errors.push(e.message));
  return seen;
}

const msg = (channel, id, data = "x") => `{"channel":"${channel}","id":"${id}"}\n${data}`;
const noFetch = () => Promise.reject(new TypeError("no network in unit tests"));

test("WebSocket: connected on the welcome, resumes from the last id, drops replayed duplicates", async () => {
  const { made, WebSocket } = sockets();
  const c = new Client({ url: "http://gw.test/rt/", channels: ["a", "b"], WebSocket, fetch: noFetch, backoff: { baseMs: 1, maxMs: 1 } });
  const seen = record(c);
  c.connect();
  await until("a socket", () => made.length == 1);
  const ws = made[0];
  assert.equal(ws.url.origin + ws.url.pathname, "ws://gw.test/rt/ws");
  assert.deepEqual(ws.url.searchParams.getAll("channel"), ["a", "b"]);
  assert.equal(ws.url.searchParams.get("since"), null);
  assert.deepEqual(ws.protocols, ["gateway.v1"]);
  assert.equal(c.state, "connecting");
  ws.welcome();
  assert.equal(c.state, "connected");
  assert.equal(c.transport, "websocket");
  ws.frame(msg("a", "10"));
  ws.frame(msg("b", "11"));
  ws.end(1006);
  assert.equal(seen.states.at(-1).state, "disconnected");
  await until("a second socket", () => made.length == 2);
  const again = made[1];
  assert.equal(again.url.searchParams.get("since"), "11");
  again.welcome();
  again.frame(msg("a", "10"));
  again.frame(msg("b", "11"));
  again.frame(msg("a", "12"));
  assert.deepEqual(seen.messages.map((m) => m.id), ["10", "11", "12"]);
  assert.equal(c.lastId("a"), "12");
  c.close();
  assert.equal(c.state, "disconnected");
});

test("a drain (1012) reconnects after a random 1–5 s; gaps reach the page", async () => {
  const { made, WebSocket } = sockets();
  const c = new Client({ url: "http://gw.test", channels: ["a"], WebSocket, fetch: noFetch });
  const seen = record(c);
  c.connect();
  await until("a socket", () => made.length == 1);
  made[0].welcome();
  made[0].frame('{"channel":"a","gap":true}\n');
  made[0].frame('{"channel":"gone","gap":true}\n');
  assert.deepEqual(seen.gaps, ["a"]);
  made[0].end(1012);
  const s = seen.states.at(-1);
  assert.equal(s.state, "disconnected");
  assert.equal(s.reason, "drain");
  assert.ok(s.retryInMs >= 1000 && s.retryInMs < 5000, String(s.retryInMs));
  c.close();
});

test("an expired token (4001): a new one, at once", async () => {
  const { made, WebSocket } = sockets();
  let n = 0;
  const c = new Client({ url: "http://gw.test", channels: ["a"], WebSocket, fetch: noFetch, getToken: async () => "t" + ++n });
  c.connect();
  await until("a socket", () => made.length == 1);
  assert.equal(made[0].url.searchParams.get("token"), "t1");
  made[0].welcome();
  made[0].end(4001, "token expired");
  await until("a second socket", () => made.length == 2);
  assert.equal(made[1].url.searchParams.get("token"), "t2");
  c.close();
});

test("a gap repeated with no message in between is told once per connection", async () => {
  const { calls, fetch } = fakeFetch((url, init) => {
    const n = calls.length;
    // Each answer: the quiet channel's gap again, and a message on the busy
    // one; the fifth is held, like a real poll, until the client lets go.
    return n < 4
      ? new Response(JSON.stringify({ cursor: String(n), messages: [{ channel: "busy", id: String(n), data: "x" }], gaps: ["quiet"] }))
      : new Promise((_, reject) => init.signal.addEventListener("abort", () => reject(new Error("aborted"))));
  });
  const c = new Client({ url: "http://gw.test", channels: ["busy", "quiet"], transports: ["longpoll"], fetch });
  const seen = record(c);
  c.connect();
  await until("four polls", () => calls.length == 4);
  assert.deepEqual(seen.gaps, ["quiet"]);
  assert.equal(seen.messages.length, 3);
});

test("publish over WebSocket settles on the gateway's ack or error", async () => {
  const { made, WebSocket } = sockets();
  const c = new Client({ url: "http://gw.test", channels: ["room"], WebSocket, fetch: noFetch });
  c.connect();
  const early = c.publish("room", "queued until connected");
  await until("a socket", () => made.length == 1);
  const ws = made[0];
  ws.welcome();
  await until("the queued message", () => ws.sent.length == 1);
  assert.equal(ws.sent[0], '{"channel":"room","ref":"1"}\nqueued until connected');
  ws.frame('{"type":"ack","ref":"1"}\n');
  await early;
  const refused = c.publish("nope", new Uint8Array([1, 2]));
  assert.ok(ws.sent[1] instanceof Uint8Array);
  ws.frame('{"type":"error","ref":"2","reason":"channel not allowed","channel":"nope"}\n');
  await assert.rejects(refused, /channel not allowed/);
  const lost = c.publish("room", "never answered");
  ws.end(1006);
  await assert.rejects(lost, /connection lost/);
  c.close();
  await assert.rejects(c.publish("room", "after close"), /not connected/);
});

test("subscribe and unsubscribe on a WebSocket are control messages; messages of a channel left are dropped", async () => {
  const { made, WebSocket } = sockets();
  const c = new Client({ url: "http://gw.test", channels: ["a"], WebSocket, fetch: noFetch });
  const seen = record(c);
  c.connect();
  await until("a socket", () => made.length == 1);
  const ws = made[0];
  ws.welcome();
  c.subscribe("b");
  c.unsubscribe("a");
  assert.deepEqual(ws.sent.map((s) => JSON.parse(s)), [
    { type: "subscribe", channels: ["b"], ref: "s" },
    { type: "unsubscribe", channels: ["a"], ref: "s" },
  ]);
  ws.frame(msg("a", "5"));
  ws.frame(msg("b", "6"));
  ws.frame('{"channel":"#alice","id":"7"}\nfor the user');
  assert.deepEqual(seen.messages.map((m) => m.channel), ["b", "#alice"]);
  // A subscribe refused: said, and not followed.
  c.subscribe("secret");
  ws.frame('{"type":"error","ref":"s","reason":"channel not allowed","channel":"secret"}\n');
  assert.deepEqual(seen.errors, ["channel not allowed: secret"]);
  assert.equal(made.length, 1);
  c.close();
});

test("per-channel cursors: the URL holds the channels without one, the others are subscribed from their own", async () => {
  const { made, WebSocket } = sockets();
  const c = new Client({ url: "http://gw.test", channels: ["a", "b", "c"], WebSocket, fetch: noFetch, cursor: "per-channel", backoff: { baseMs: 1, maxMs: 1 } });
  c.connect();
  await until("a socket", () => made.length == 1);
  made[0].welcome();
  made[0].frame(msg("a", "500"));
  made[0].frame(msg("b", "7"));
  made[0].end(1006);
  await until("a second socket", () => made.length == 2);
  const ws = made[1];
  assert.deepEqual(ws.url.searchParams.getAll("channel"), ["c"]);
  assert.equal(ws.url.searchParams.get("since"), null);
  await until("the subscribes", () => ws.sent.length == 2);
  assert.deepEqual(ws.sent.map((s) => JSON.parse(s)), [
    { type: "subscribe", channels: ["b"], since: "7", ref: "s" },
    { type: "subscribe", channels: ["a"], since: "500", ref: "s" },
  ]);
  c.close();
});

/** A fetch answering from `answer(url, init)`: a Response, or a stream
 * handle `{ push(text), end() }` for SSE. */
function fakeFetch(answer) {
  const calls = [];
  const fetch = async (url, init = {}) => {
    calls.push({ url: new URL(url), init });
    return answer(new URL(url), init);
  };
  return { calls, fetch };
}

function sseResponse() {
  let ctl;
  const body = new ReadableStream({ start: (c) => (ctl = c) });
  const res = new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
  return { res, push: (t) => ctl.enqueue(new TextEncoder().encode(t)), end: () => ctl.close() };
}

test("a WebSocket without a welcome in time falls back to SSE; a 403 there stops, saying why", async () => {
  const { made, WebSocket } = sockets();
  const { calls, fetch } = fakeFetch(() => new Response("channel not allowed\n", { status: 403 }));
  const c = new Client({ url: "http://gw.test", channels: ["a"], WebSocket, fetch, connectTimeoutMs: 30, getToken: () => "tok" });
  const seen = record(c);
  c.connect();
  await until("failed", () => c.state == "failed");
  assert.equal(made.length, 1);
  assert.equal(calls.length, 1);
  assert.equal(calls[0].url.pathname, "/events");
  assert.equal(calls[0].init.headers.Accept, "text/event-stream");
  assert.equal(calls[0].init.headers.Authorization, "Bearer tok");
  assert.equal(calls[0].url.searchParams.get("token"), null, "the token is not in an HTTP URL");
  assert.deepEqual(
    seen.states.map((s) => [s.state, s.transport, s.reason]),
    [
      ["connecting", "websocket", undefined],
      ["connecting", "sse", undefined],
      ["failed", null, "403 channel not allowed"],
    ],
  );
  assert.ok(!JSON.stringify(seen).includes("tok"), "no token in what the page is told");
});

test("SSE: base64 payloads as bytes; a stream that ends comes back after its retry:", async () => {
  let stream;
  const { calls, fetch } = fakeFetch(() => (stream = sseResponse()).res);
  const c = new Client({ url: "http://gw.test", channels: ["a"], transports: ["sse"], fetch });
  const seen = record(c);
  c.connect();
  await until("a request", () => calls.length == 1);
  stream.push("retry: 1234\n\nevent: welcome\ndata: {\"type\":\"welcome\",\"address\":\"ad\"}\n\n");
  await until("connected", () => c.state == "connected");
  stream.push('id: 9\ndata: {"channel":"a","id":"9","encoding":"base64"}\ndata: AAH/\n\n');
  await until("a message", () => seen.messages.length == 1);
  assert.deepEqual(seen.messages[0].data, new Uint8Array([0, 1, 255]));
  stream.end();
  await until("disconnected", () => c.state == "disconnected");
  assert.equal(seen.states.at(-1).retryInMs, 1234);
  c.close();
});

test("SSE publish is a POST naming the stream's address", async () => {
  let stream;
  const { calls, fetch } = fakeFetch((url) =>
    url.pathname == "/publish" ? new Response("accepted", { status: 202 }) : (stream = sseResponse()).res,
  );
  const c = new Client({ url: "http://gw.test", channels: ["a"], transports: ["sse"], fetch });
  c.connect();
  await until("a request", () => calls.length == 1);
  stream.push("retry: 1000\n\nevent: welcome\ndata: {\"type\":\"welcome\",\"address\":\"ad\"}\n\n");
  await until("connected", () => c.state == "connected");
  await c.publish("a", "hi");
  const post = calls[1];
  assert.equal(post.init.method, "POST");
  assert.equal(post.url.pathname, "/publish");
  assert.equal(post.url.searchParams.get("channel"), "a");
  assert.equal(post.url.searchParams.get("address"), "ad");
  assert.equal(post.init.body, "hi");
  c.close();
});

test("a stream that sends nothing in time (a buffering proxy) falls back to long-poll", async () => {
  const held = (init) =>
    new Promise((_, reject) => init.signal.addEventListener("abort", () => reject(new Error("aborted"))));
  const { calls, fetch } = fakeFetch((url, init) =>
    init.headers.Accept
      ? sseResponse().res
      : url.searchParams.get("since")
        ? held(init) // the gateway holds a poll with nothing after its cursor
        : new Response('{"cursor":"4","messages":[{"channel":"a","id":"4","data":"hi"}],"gaps":["a"]}', { status: 200 }),
  );
  const c = new Client({ url: "http://gw.test", channels: ["a"], transports: ["sse", "longpoll"], fetch, connectTimeoutMs: 30 });
  const seen = record(c);
  c.connect();
  await until("long-poll", () => c.transport == "longpoll" && c.state == "connected");
  await until("the next poll", () => calls.length == 3);
  assert.deepEqual(seen.gaps, ["a"]);
  assert.deepEqual(seen.messages.map((m) => m.data), ["hi"]);
  assert.equal(calls[2].url.searchParams.get("since"), "4", "polls again from the answer's cursor");
});

test("503 with Retry-After: waits at least that long", async () => {
  const { fetch } = fakeFetch(
    () => new Response("too many connections", { status: 503, headers: { "Retry-After": "3" } }),
  );
  const c = new Client({ url: "http://gw.test", channels: ["a"], transports: ["sse", "longpoll"], fetch });
  const seen = record(c);
  c.connect();
  await until("disconnected", () => c.state == "disconnected");
  const s = seen.states.at(-1);
  assert.equal(s.reason, "503 too many connections");
  assert.ok(s.retryInMs >= 3000);
  assert.deepEqual(seen.states.map((x) => x.transport).slice(0, 1), ["sse"], "a refusal is not a blocked transport");
  assert.equal(seen.states.length, 2);
  c.close();
});

test("a fallback transport tries the preferred one again later and hands over to it", async () => {
  const { made, WebSocket } = sockets();
  let stream;
  const { fetch } = fakeFetch(() => (stream = sseResponse()).res);
  const c = new Client({ url: "http://gw.test", channels: ["a"], WebSocket, fetch, connectTimeoutMs: 20, upgradeAfterMs: 30 });
  const seen = record(c);
  c.connect();
  await until("a socket", () => made.length == 1);
  made[0].end(1006); // blocked
  await until("an SSE request", () => stream);
  stream.push("retry: 1000\n\n");
  await until("on SSE", () => c.transport == "sse" && c.state == "connected");
  stream.push('data: {"channel":"a","id":"3"}\ndata: x\n\n');
  await until("the upgrade attempt", () => made.length == 2);
  assert.equal(made[1].url.searchParams.get("since"), "3");
  made[1].welcome();
  assert.equal(c.transport, "websocket");
  made[1].frame(msg("a", "3"));
  made[1].frame(msg("a", "4"));
  assert.deepEqual(seen.messages.map((m) => m.id), ["3", "4"]);
  c.close();
});
