// The gateway over TLS, from a page served over https on another origin.
// Chromium trusts the test's certificate by its key alone
// (`--ignore-certificate-errors-spki-list`), not every certificate. ALPN
// gives the browser HTTP/2: its EventSource streams, long-polls and
// POST /publish go as streams of one connection (checked with the DevTools
// protocol's `response.protocol` and `connectionId`, and with the page's
// own resource timing), so a page may hold more than the six streams
// HTTP/1.1 allows per host; WebSocket stays on HTTP/1.1 (101 Switching
// Protocols).

import assert from "node:assert/strict";
import { makeCertificates } from "./lib/certs.js";
import { e2e } from "./lib/scope.js";
import { warmUp } from "./lib/traffic.js";
import { changed, Recorder, until } from "./lib/wait.js";

/** EventSource streams one page opens at once: more than HTTP/1.1's six per host. */
const MANY = 8;
/** Messages published back to back on the first stream. */
const IN_ORDER = 50;
/** Any one wait: a stream opening, a message arriving, a poll answered. */
const WAIT_MS = 10_000;
/** Pace of publications repeated until a stream has one. */
const REPEAT_MS = 100;

/** What runs in the page: raw EventSource and fetch, reported like SDK clients. */
function installPageHelpers() {
  window.tls = {
    sources: [],
    /** An EventSource named `name`; its events go to the test as `open`, `message`, `gap`, `error`. */
    listen(name, url) {
      const es = new EventSource(url);
      this.sources.push(es);
      es.onopen = () => window.e2eReport({ client: name, kind: "open" });
      es.onerror = () => window.e2eReport({ client: name, kind: "error", readyState: es.readyState });
      es.onmessage = (e) => {
        // The gateway's event data: a meta JSON line, `\n`, the payload.
        const i = e.data.indexOf("\n");
        const meta = JSON.parse(i < 0 ? e.data : e.data.slice(0, i));
        if (meta.type) return; // the connection's welcome
        if (meta.gap) {
          window.e2eReport({ client: name, kind: "gap", channel: meta.channel });
          return;
        }
        window.e2eReport({
          client: name,
          kind: "message",
          channel: meta.channel,
          id: meta.id == null ? e.lastEventId : String(meta.id),
          data: i < 0 ? "" : e.data.slice(i + 1),
        });
      };
    },
    /** One long-poll: its status and its JSON answer. */
    async poll(url) {
      const res = await fetch(url);
      return { status: res.status, body: await res.json() };
    },
    /** The page's resource timing entries whose URL starts with `prefix`. */
    timing(prefix) {
      return performance
        .getEntriesByType("resource")
        .filter((e) => e.name.startsWith(prefix))
        .map((e) => ({ name: e.name, initiatorType: e.initiatorType, nextHopProtocol: e.nextHopProtocol }));
    },
    closeAll() {
      for (const es of this.sources) es.close();
      this.sources = [];
    },
  };
}

/** The non-warm-up texts `client` received on `channel`, in order. */
function texts(recorder, client, channel) {
  return recorder.texts(client, channel).filter((d) => !d.startsWith("warm-up"));
}

function assertIncreasingIds(messages, what) {
  const ids = messages.map((m) => m.id);
  assert.ok(
    ids.every((id, i) => /^\d+$/.test(id) && (i === 0 || BigInt(id) > BigInt(ids[i - 1]))),
    `${what}: increasing ids: ${ids}`,
  );
}

/**
 * Publishes `publishAll()` now and every REPEAT_MS until `condition()`
 * holds: a stream that has just opened gets its first message whenever the
 * gateway has registered it.
 */
async function publishUntil(publishAll, condition, what) {
  publishAll();
  const timer = setInterval(publishAll, REPEAT_MS);
  try {
    return await until(condition, WAIT_MS, what);
  } finally {
    clearInterval(timer);
  }
}

e2e("over TLS a page's streams share one HTTP/2 connection", { timeout: 120_000 }, async (scope, t) => {
  // The gateway is reached as `localhost` (the page sends SNI), the page
  // server as 127.0.0.2: one certificate names both.
  const certs = makeCertificates(["localhost", "127.0.0.1", "127.0.0.2"]);
  scope.closes({ close: () => certs.remove() });
  const pages = await scope.pageServer({ tls: { cert: certs.cert, key: certs.key } });
  assert.match(pages.origin, /^https:\/\/127\.0\.0\.2:\d+$/);
  const gw = await scope.gateway([
    "--tls-cert", certs.certFile,
    "--tls-key", certs.keyFile,
    "--upstream-bind", "tcp://127.0.0.1:*",
    "--allowed-origin", pages.origin,
  ]);
  assert.match(gw.url, /^https:\/\/127\.0\.0\.1:\d+$/);
  const base = `https://localhost:${gw.listen.slice(gw.listen.lastIndexOf(":") + 1)}`;
  const hub = await scope.hub(gw);
  const publisher = await scope.publisherTo(gw);
  await publisher.subscribers(1);

  const browser = await scope.browser({ args: [`--ignore-certificate-errors-spki-list=${certs.spki}`] });
  const recorder = new Recorder();
  // Loads the https page: the certificate is trusted by its key.
  const page = await scope.page(browser, pages, recorder);
  const cdp = await page.page.context().newCDPSession(page.page);
  /** Every response the page got, as the network stack saw it. */
  const responses = [];
  const failures = [];
  const webSockets = [];
  cdp.on("Network.responseReceived", (e) => {
    const r = e.response;
    const header = (h) => Object.entries(r.headers).find(([k]) => k.toLowerCase() === h)?.[1];
    responses.push({
      url: r.url,
      type: e.type,
      status: r.status,
      protocol: r.protocol,
      connectionId: r.connectionId,
      timingAllowOrigin: header("timing-allow-origin"),
    });
    changed();
  });
  cdp.on("Network.loadingFailed", (e) => {
    failures.push({ type: e.type, errorText: e.errorText, canceled: e.canceled });
    changed();
  });
  cdp.on("Network.webSocketHandshakeResponseReceived", (e) => {
    webSockets.push({ status: e.response.status });
    changed();
  });
  await cdp.send("Network.enable");
  await page.page.evaluate(installPageHelpers);
  const listen = (name, url) => page.page.evaluate(([n, u]) => window.tls.listen(n, u), [name, url]);
  const poll = (url) => page.page.evaluate((u) => window.tls.poll(u), url);
  const response = (match, what) =>
    until(() => responses.find(match), WAIT_MS, `the DevTools protocol's response for ${what}`);
  const seen = () => `responses ${JSON.stringify(responses)}; failures ${JSON.stringify(failures)}`;
  const noErrors = (client) =>
    assert.deepEqual(recorder.of(client, "error"), [], `${client}: no error (${seen()})`);

  await scope.step(t, "an EventSource over h2 gets every message in order", async () => {
    const channel = "tls.es";
    const url = `${base}/events?channel=${channel}`;
    await listen("es", url);
    await recorder.next("es", (e) => e.kind === "open" || e.kind === "error", WAIT_MS, "the EventSource's open");
    noErrors("es");
    await warmUp(publisher, recorder, channel, ["es"], { ms: WAIT_MS });

    const expected = Array.from({ length: IN_ORDER }, (_, i) => `m${i + 1}`);
    for (const text of expected) publisher.publish(channel, text);
    await until(() => texts(recorder, "es", channel).includes(expected.at(-1)), WAIT_MS, `${expected.at(-1)} at es`);
    assert.deepEqual(texts(recorder, "es", channel), expected, "every message, once, in order");
    assertIncreasingIds(recorder.messages("es", channel), "es");
    noErrors("es");

    const res = await response((r) => r.url === url, "the EventSource");
    assert.equal(res.type, "EventSource", seen());
    assert.equal(res.status, 200, seen());
    assert.equal(res.protocol, "h2", `the EventSource went over HTTP/2: ${seen()}`);
    const timing = await page.page.evaluate((p) => window.tls.timing(p), url);
    t.diagnostic(`EventSource: DevTools ${JSON.stringify(res)}; resource timing while open ${JSON.stringify(timing)}`);
  });

  await scope.step(t, "long-polls over h2, resumed in order from the cursor", async () => {
    const channel = "tls.lp";
    const url = `${base}/events?channel=${channel}`;
    // A first poll without a cursor is held for what comes after it.
    let first = null;
    poll(url).then(
      (a) => {
        first = a;
        changed();
      },
      (e) => {
        first = { error: String(e?.message ?? e) };
        changed();
      },
    );
    let n = 0;
    await publishUntil(() => publisher.publish(channel, `warm-up ${++n}`), () => first, "the first poll's answer");
    assert.equal(first.status, 200, `the first poll: ${JSON.stringify(first)} ${seen()}`);
    assert.ok(first.body.messages?.length > 0, `the first poll carried messages: ${JSON.stringify(first)}`);
    assert.ok(
      first.body.messages.every((m) => m.channel === channel && m.data.startsWith("warm-up")),
      JSON.stringify(first),
    );

    const expected = ["lp1", "lp2", "lp3", "lp4", "lp5"];
    for (const text of expected) publisher.publish(channel, text);
    const got = [];
    let cursor = String(first.body.cursor);
    for (let polls = 0; !got.some((m) => m.data === "lp5"); polls += 1) {
      assert.ok(polls < 20, `lp5 within 20 polls: ${JSON.stringify(got)}`);
      const next = await poll(`${url}&since=${encodeURIComponent(cursor)}`);
      assert.equal(next.status, 200, JSON.stringify(next));
      got.push(...next.body.messages.filter((m) => !m.data.startsWith("warm-up")));
      cursor = String(next.body.cursor);
    }
    assert.deepEqual(got.map((m) => m.data), expected, "every message, once, in order");
    assertIncreasingIds(got.map((m) => ({ id: String(m.id) })), "long-poll");

    const polls = responses.filter((r) => r.url.startsWith(url));
    assert.ok(polls.length >= 2, seen());
    for (const r of polls) {
      assert.equal(r.type, "Fetch", seen());
      assert.equal(r.protocol, "h2", `a long-poll went over HTTP/2: ${seen()}`);
    }
    // The page's own view: each finished poll's resource timing entry. A
    // cross-origin response shows its protocol to the page only with
    // Timing-Allow-Origin; without it Chromium leaves nextHopProtocol empty.
    const timing = await page.page.evaluate((p) => window.tls.timing(p), url);
    assert.ok(timing.length >= 2, `resource timing has the polls: ${JSON.stringify(timing)}`);
    for (const e of timing) {
      const tao = polls.find((r) => r.url === e.name)?.timingAllowOrigin;
      if (tao === undefined) {
        assert.equal(e.nextHopProtocol, "", `hidden without Timing-Allow-Origin: ${JSON.stringify(timing)}`);
      } else {
        assert.equal(e.nextHopProtocol, "h2", `resource timing (Timing-Allow-Origin: ${tao}): ${JSON.stringify(timing)}`);
      }
    }
    t.diagnostic(
      `long-poll resource timing ${JSON.stringify(timing)}; Timing-Allow-Origin ${JSON.stringify(polls.map((r) => r.timingAllowOrigin ?? null))}`,
    );
  });

  await scope.step(t, "SDK clients over TLS: SSE and long-poll on h2, WebSocket on HTTP/1.1, publish", async () => {
    const channel = "tls.sdk";
    const clients = { "sdk-sse": "sse", "sdk-lp": "longpoll", "sdk-ws": "websocket" };
    for (const [name, transport] of Object.entries(clients)) {
      await page.open(name, { url: base, channels: [channel], transports: [transport] });
    }
    const names = Object.keys(clients);
    await warmUp(publisher, recorder, channel, names, { ms: WAIT_MS * 2 });
    const expected = ["s1", "s2", "s3", "s4", "s5"];
    for (const text of expected) publisher.publish(channel, text);
    await until(
      () => names.every((c) => texts(recorder, c, channel).includes("s5")),
      WAIT_MS,
      `s5 at ${names.join(", ")}`,
    );
    for (const name of names) {
      assert.deepEqual(texts(recorder, name, channel), expected, `${name}: every message, once, in order`);
      const states = recorder.of(name, "state").filter((s) => s.state === "connected");
      assert.ok(
        states.length >= 1 && states.every((s) => s.transport === clients[name]),
        `${name} connected on ${clients[name]} only: ${JSON.stringify(recorder.of(name, "state"))}`,
      );
      assert.deepEqual(recorder.of(name, "error"), [], `${name}: no error`);
    }

    // POST /publish beside the SSE stream, and a message on the WebSocket:
    // the hub answers both to every client.
    const sent = [await page.publish("sdk-sse", channel, "over h2"), await page.publish("sdk-ws", channel, "over wss")];
    assert.deepEqual(sent, [{ ok: true }, { ok: true }], "both publishes acknowledged");
    for (const text of ["over h2", "over wss"]) {
      await until(
        () => names.every((c) => recorder.texts(c, channel).some((d) => d.endsWith(`: ${text}`))),
        WAIT_MS,
        `the hub's echo of "${text}" at ${names.join(", ")}`,
      );
    }
    const upstream = Object.fromEntries(
      hub
        .received()
        .filter((m) => m.kind === "message")
        .map((m) => [Buffer.from(m.base64, "base64").toString(), m.transport]),
    );
    assert.deepEqual(upstream, { "over h2": "http", "over wss": "websocket" }, "the hub got each once");

    const sse = responses.filter((r) => r.url.startsWith(`${base}/events?`) && r.url.includes("tls.sdk") && r.type === "Fetch");
    assert.ok(sse.length >= 2, `the SDK's SSE stream and polls: ${seen()}`);
    assert.ok(sse.every((r) => r.protocol === "h2" && r.status === 200), `over HTTP/2: ${seen()}`);
    const posts = responses.filter((r) => r.url.startsWith(`${base}/publish`) && r.type === "Fetch");
    assert.equal(posts.length, 1, `one POST /publish: ${seen()}`);
    assert.equal(posts[0].protocol, "h2", `POST /publish went over HTTP/2: ${seen()}`);
    assert.ok(posts[0].status >= 200 && posts[0].status < 300, seen());
    assert.deepEqual(webSockets, [{ status: 101 }], "the WebSocket upgraded on HTTP/1.1");
    for (const name of names) await page.close(name);
  });

  await scope.step(t, `${MANY} EventSources at once, more than HTTP/1.1's six`, async () => {
    const channel = (i) => `tls.many.${i}`;
    const name = (i) => `many${i}`;
    const all = Array.from({ length: MANY }, (_, i) => i);
    const urls = all.map((i) => `${base}/events?channel=${channel(i)}`);
    for (const i of all) await listen(name(i), urls[i]);
    // Over HTTP/1.1 the seventh would wait for one of the first six to end.
    const opened = () => all.filter((i) => recorder.of(name(i), "open").length > 0);
    try {
      await until(() => opened().length === MANY, WAIT_MS, `all ${MANY} EventSources open`);
    } catch (e) {
      e.message += ` (open: ${opened().map(name).join(", ") || "none"}; ${seen()})`;
      throw e;
    }
    await publishUntil(
      () => all.forEach((i) => publisher.publish(channel(i), `hello ${i}`)),
      () => all.every((i) => recorder.messages(name(i), channel(i)).length > 0),
      `a message at each of the ${MANY} EventSources`,
    );
    for (const i of all) {
      const got = recorder.messages(name(i));
      assert.ok(
        got.every((m) => m.channel === channel(i) && m.data === `hello ${i}`),
        `${name(i)} got its own channel's messages: ${JSON.stringify(got)}`,
      );
      noErrors(name(i));
    }

    const streams = await until(
      () => {
        const found = urls.map((u) => responses.find((r) => r.url === u));
        return found.every(Boolean) && found;
      },
      WAIT_MS,
      `the DevTools protocol's responses for the ${MANY} EventSources`,
    );
    assert.ok(streams.every((r) => r.protocol === "h2" && r.status === 200), `all over HTTP/2: ${seen()}`);
    const connections = new Set(streams.map((r) => r.connectionId));
    assert.equal(connections.size, 1, `one connection for all ${MANY}: ${seen()}`);
    t.diagnostic(`${MANY} EventSources on connection ${[...connections]}`);
    // And so did everything else the page asked of the gateway over HTTP.
    const toGateway = responses.filter((r) => r.url.startsWith(`${base}/`));
    assert.deepEqual(
      [...new Set(toGateway.map((r) => `${r.protocol} ${r.connectionId}`))],
      [`h2 ${[...connections][0]}`],
      `every request to the gateway on one HTTP/2 connection: ${seen()}`,
    );
    await page.page.evaluate(() => window.tls.closeAll());
  });
});
