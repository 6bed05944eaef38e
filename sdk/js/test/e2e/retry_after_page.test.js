// The gateway's own 503 with Retry-After, read by a page on another origin:
// a gateway whose one connection is taken answers the page's SSE request
// 503 at accept, with `Access-Control-Allow-Origin: *` and Retry-After
// exposed, so the page's fetch sees the status and the header instead of
// a network error. The SDK waits out that Retry-After, though its own
// backoff would have it back within 100 ms, and once the connection is
// free again its retry connects and messages arrive.
//
// The page talks to the gateway through a pass-through proxy that changes
// nothing and records, on the wire, when each request arrived and what the
// gateway answered (status, Retry-After, CORS headers): the Retry-After the
// gateway drew (1 to 5 s, at random) and the wait are both read there, not
// taken from the SDK.

import assert from "node:assert/strict";
import net from "node:net";
import { performance } from "node:perf_hooks";
import { e2e } from "./lib/scope.js";
import { warmUp } from "./lib/traffic.js";
import { changed, Recorder, until } from "./lib/wait.js";

/** Far below any Retry-After the gateway sends (at least 1 s). */
const BACKOFF = { baseMs: 50, maxMs: 100 };
/** The gateway's range for Retry-After, in seconds. */
const RETRY_AFTER_S = { min: 1, max: 5 };
/** A retry later than Retry-After by more than this waited for something else. */
const LATE_MS = 1000;

const HEAD_END = "\r\n\r\n";

function hostPort(listen) {
  const colon = listen.lastIndexOf(":");
  return { host: listen.slice(0, colon), port: Number(listen.slice(colon + 1)) };
}

/** Status and lowercase headers of an HTTP head. */
function parseHead(text) {
  const [first, ...lines] = text.split("\r\n");
  const headers = {};
  for (const line of lines) {
    const i = line.indexOf(":");
    if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
  }
  return { first, status: Number(first.split(" ")[1]), headers };
}

/**
 * A TCP proxy that passes every byte through untouched and records one
 * entry per connection: when its first request head arrived (`at`), the
 * request line, how many request heads it carried, and the gateway's
 * answer to the first (`status`, `headers`, `answeredAt`: when its head
 * went on to the page). Times are performance.now() of this process.
 */
class RecordingProxy {
  static async start(target) {
    const proxy = new RecordingProxy(target);
    await new Promise((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    proxy.url = `http://127.0.0.1:${proxy.server.address().port}`;
    return proxy;
  }

  constructor(target) {
    this.target = hostPort(target);
    /** One per connection that sent a request, in order of arrival. */
    this.exchanges = [];
    this.sockets = new Set();
    this.server = net.createServer((client) => this.#serve(client));
  }

  #track(socket) {
    this.sockets.add(socket);
    socket.on("close", () => this.sockets.delete(socket));
    socket.on("error", () => {});
  }

  #serve(client) {
    this.#track(client);
    let upstream = null;
    let exchange = null;
    let requestBytes = "";
    let responseHead = "";

    client.on("data", (data) => {
      if (!upstream) {
        upstream = net.connect(this.target);
        this.#track(upstream);
        upstream.on("data", (bytes) => {
          if (exchange && exchange.status === null) {
            responseHead += bytes.toString("latin1");
            const end = responseHead.indexOf(HEAD_END);
            if (end >= 0) {
              const { status, headers } = parseHead(responseHead.slice(0, end));
              Object.assign(exchange, { status, headers, answeredAt: performance.now() });
              changed();
            }
          }
          client.write(bytes);
        });
        upstream.on("close", () => client.end());
        upstream.on("error", () => client.destroy());
        client.on("close", () => upstream.destroy());
      }
      // The SDK's SSE requests are GETs without a body: a head ends each.
      requestBytes += data.toString("latin1");
      for (let end; (end = requestBytes.indexOf(HEAD_END)) >= 0; ) {
        const line = requestBytes.slice(0, requestBytes.indexOf("\r\n"));
        requestBytes = requestBytes.slice(end + HEAD_END.length);
        if (exchange) {
          exchange.requests += 1;
        } else {
          exchange = { at: performance.now(), line, requests: 1, status: null };
          this.exchanges.push(exchange);
        }
        changed();
      }
      upstream.write(data);
    });
  }

  async close() {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * Takes a connection of the gateway at `listen` with an SSE stream from a
 * raw socket, and keeps it until `close()`.
 */
async function holdConnection(listen, channel) {
  const socket = net.connect(hostPort(listen));
  let received = "";
  const closed = new Promise((resolve) => socket.on("close", resolve));
  socket.on("error", () => {});
  socket.on("data", (bytes) => {
    received += bytes.toString("latin1");
    changed();
  });
  socket.write(
    `GET /events?channel=${channel} HTTP/1.1\r\nHost: ${listen}\r\nAccept: text/event-stream\r\n\r\n`,
  );
  await until(() => received.includes(HEAD_END), 10_000, "the holder's stream to be answered");
  const head = parseHead(received.slice(0, received.indexOf(HEAD_END)));
  assert.equal(head.status, 200, `the holder's stream was refused: ${head.first}`);
  return {
    async close() {
      socket.destroy();
      await closed;
    },
  };
}

e2e("a page waits out the gateway's own 503 Retry-After on connect", { timeout: 60_000 }, async (scope, t) => {
  const pages = await scope.pageServer();
  // One core, one connection: while it is taken, the next is refused at accept.
  const gw = await scope.gateway(["--allowed-origin", pages.origin, "--cores", "1", "--connections-max", "1"]);
  const publisher = await scope.publisherTo(gw);
  await publisher.subscribers(1);
  const holder = scope.closes(await holdConnection(gw.listen, "retry.holder"));
  const proxy = scope.closes(await RecordingProxy.start(gw.listen));
  const browser = await scope.browser();
  const recorder = new Recorder();
  const page = await scope.page(browser, pages, recorder);
  const channel = "retry.page";
  const exchanges = () => JSON.stringify(proxy.exchanges);

  await page.open("sse", { url: proxy.url, channels: [channel], transports: ["sse"], backoff: BACKOFF });

  // The page's first request is refused; the connection is freed at once,
  // long before the page may come back.
  const refused = await until(
    () => proxy.exchanges[0]?.status != null && proxy.exchanges[0],
    10_000,
    "the gateway's answer to the page's first request",
  );
  await holder.close();
  assert.equal(refused.status, 503, `the page's first request was refused: ${exchanges()}`);
  const retryAfterS = Number(refused.headers["retry-after"]);
  assert.ok(
    Number.isInteger(retryAfterS) && retryAfterS >= RETRY_AFTER_S.min && retryAfterS <= RETRY_AFTER_S.max,
    `the gateway's Retry-After: ${refused.headers["retry-after"]}`,
  );
  assert.equal(refused.headers["access-control-allow-origin"], "*", "any page may read the 503");
  assert.match(
    refused.headers["access-control-expose-headers"] ?? "",
    /(^|[\s,])retry-after($|[\s,])/i,
    "and its Retry-After",
  );

  await recorder.next("sse", (e) => e.kind === "state" && e.state === "connected", 15_000, "connected again");
  const [, retried] = proxy.exchanges;
  assert.equal(retried?.status, 200, `the page's next request connected: ${exchanges()}`);
  const waitedMs = retried.at - refused.answeredAt;
  t.diagnostic(`retried ${waitedMs.toFixed(1)} ms after the gateway's 503 (Retry-After: ${retryAfterS})`);
  assert.ok(
    waitedMs >= retryAfterS * 1000,
    `came back ${waitedMs.toFixed(1)} ms after a 503 with Retry-After: ${retryAfterS}`,
  );
  assert.ok(
    waitedMs < retryAfterS * 1000 + LATE_MS,
    `came back ${waitedMs.toFixed(1)} ms after a 503 with Retry-After: ${retryAfterS}, not because of it`,
  );

  // The page saw the status and the header: its client said why it waited
  // and for how long (its own backoff would have been under 100 ms).
  const states = recorder.of("sse", "state");
  const upToConnected = states.slice(0, states.findIndex((s) => s.state === "connected") + 1);
  assert.deepEqual(
    upToConnected.map((s) => [s.state, s.transport]),
    [
      ["connecting", "sse"],
      ["disconnected", null],
      ["connecting", "sse"],
      ["connected", "sse"],
    ],
    `one refusal, one retry: ${JSON.stringify(states)}`,
  );
  const waiting = upToConnected[1];
  assert.match(waiting.reason ?? "", /^503 /, `the page read the 503: ${JSON.stringify(waiting)}`);
  assert.equal(waiting.retryInMs, retryAfterS * 1000, `the page read Retry-After: ${JSON.stringify(waiting)}`);

  await warmUp(publisher, recorder, channel, ["sse"], { ms: 10_000 });
  assert.ok(
    recorder.messages("sse", channel).every((m) => m.data?.startsWith("warm-up")),
    "the publisher's messages",
  );
  assert.equal(proxy.exchanges.length, 2, `no other request: ${exchanges()}`);
  assert.ok(
    proxy.exchanges.every((e) => e.requests === 1),
    `one request per connection: ${exchanges()}`,
  );
  assert.deepEqual(recorder.of("sse", "error"), [], "no error");
});
