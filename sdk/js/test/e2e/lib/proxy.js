// A TCP proxy in front of the gateway that misbehaves the way networks do:
// it refuses WebSocket upgrades (a proxy or firewall that does not speak
// them), holds SSE responses instead of streaming them (a buffering proxy),
// or answers 503 with Retry-After (an overloaded gateway or balancer).
//
// It reads each request head on the client's side of a connection to decide;
// everything else passes through untouched. Browsers do not pipeline HTTP/1.1
// requests, so once an SSE request has passed, every byte the gateway sends
// back on that connection is that stream's.

import net from "node:net";
import { changed } from "./wait.js";

const HEAD_END = Buffer.from("\r\n\r\n");
/** A request head longer than this is not HTTP the gateway would take. */
const HEAD_MAX = 64 * 1024;

export class TestProxy {
  /**
   * `target`: the gateway's `host:port`. The modes, each applied to every
   * request as it comes:
   * - `websocket`: "pass", "403" (answered `403 Forbidden`) or "close" (the
   *   connection closed without an answer);
   * - `sse`: "pass" or "buffer" (the response head is sent on, its body held
   *   until the gateway ends the connection);
   * - `refuse`: answers for the first requests, one each, `{ status,
   *   retryAfter }`, sent instead of passing them on.
   */
  static async start(target, { websocket = "pass", sse = "pass", refuse = [] } = {}) {
    const proxy = new TestProxy(target, { websocket, sse, refuse });
    await new Promise((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    const { port } = proxy.server.address();
    proxy.url = `http://127.0.0.1:${port}`;
    return proxy;
  }

  constructor(target, mode) {
    const colon = target.lastIndexOf(":");
    this.target = { host: target.slice(0, colon), port: Number(target.slice(colon + 1)) };
    this.mode = mode;
    /** Every request head it saw: `{ at, method, path, kind, action }`. */
    this.log = [];
    this.sockets = new Set();
    this.server = net.createServer((client) => this.#serve(client));
  }

  #serve(client) {
    this.sockets.add(client);
    client.on("close", () => this.sockets.delete(client));
    client.on("error", () => {});
    let pending = Buffer.alloc(0);
    let bodyLeft = 0;
    let tunnel = false;
    let upstream = null;
    let hold = null;

    const toUpstream = (bytes) => {
      if (!upstream) {
        upstream = net.connect(this.target);
        this.sockets.add(upstream);
        upstream.on("close", () => {
          this.sockets.delete(upstream);
          if (hold) {
            // A buffering proxy hands over a response once it is complete.
            client.end(Buffer.concat(hold.body));
          } else {
            client.end();
          }
        });
        upstream.on("error", () => client.destroy());
        upstream.on("data", (data) => {
          if (!hold) {
            client.write(data);
          } else if (hold.headSent) {
            hold.body.push(data);
          } else {
            hold.head = Buffer.concat([hold.head, data]);
            const end = hold.head.indexOf(HEAD_END);
            if (end >= 0) {
              client.write(hold.head.subarray(0, end + 4));
              hold.body.push(hold.head.subarray(end + 4));
              hold.headSent = true;
            }
          }
        });
        client.on("close", () => upstream.destroy());
      }
      upstream.write(bytes);
    };

    client.on("data", (data) => {
      if (tunnel) {
        toUpstream(data);
        return;
      }
      pending = Buffer.concat([pending, data]);
      while (pending.length > 0) {
        if (bodyLeft > 0) {
          const part = pending.subarray(0, bodyLeft);
          bodyLeft -= part.length;
          pending = pending.subarray(part.length);
          toUpstream(part);
          continue;
        }
        const end = pending.indexOf(HEAD_END);
        if (end < 0) {
          if (pending.length > HEAD_MAX) client.destroy();
          return;
        }
        const head = pending.subarray(0, end + 4);
        pending = pending.subarray(end + 4);
        const request = parseHead(head.toString("latin1"));
        const [action, response] = this.#decide(request);
        this.log.push({ at: Date.now(), method: request.method, path: request.path, kind: request.kind, action });
        changed();
        if (action === "close") {
          client.destroy();
          return;
        }
        if (response) {
          client.end(response);
          return;
        }
        if (request.kind === "sse" && this.mode.sse === "buffer") {
          hold = { head: Buffer.alloc(0), headSent: false, body: [] };
        }
        toUpstream(head);
        bodyLeft = Number(request.headers["content-length"] ?? 0);
        if (request.kind === "websocket") {
          tunnel = true;
          if (pending.length > 0) toUpstream(pending);
          return;
        }
      }
    });
  }

  /**
   * What becomes of a request: `["pass"]`, `["close"]`, or its status and
   * the response sent instead of passing it on.
   */
  #decide(request) {
    const refusal = this.mode.refuse.shift();
    if (refusal) {
      const retryAfter = `Retry-After: ${refusal.retryAfter}\r\n`;
      return [String(refusal.status), response(`${refusal.status} Refused`, retryAfter, "refused by the test proxy\n")];
    }
    if (request.kind === "websocket" && this.mode.websocket === "403") {
      return ["403", response("403 Forbidden", "", "websocket not allowed\n")];
    }
    if (request.kind === "websocket" && this.mode.websocket === "close") return ["close"];
    return ["pass"];
  }

  /** The requests of one kind ("websocket", "sse", "longpoll", "other"). */
  requests(kind) {
    return this.log.filter((r) => r.kind === kind);
  }

  async close() {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** A whole response that closes the connection. */
function response(status, extraHeaders, body) {
  return (
    `HTTP/1.1 ${status}\r\n${extraHeaders}Content-Type: text/plain\r\n` +
    `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`
  );
}

/** Method, path, lowercase headers and which transport a request opens. */
function parseHead(text) {
  const [requestLine, ...lines] = text.split("\r\n");
  const [method, target = ""] = requestLine.split(" ");
  const headers = {};
  for (const line of lines) {
    const i = line.indexOf(":");
    if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
  }
  const path = target.split("?")[0];
  let kind = "other";
  if ((headers.upgrade ?? "").toLowerCase() === "websocket") kind = "websocket";
  else if ((headers.accept ?? "").includes("text/event-stream")) kind = "sse";
  else if (method === "GET" && path === "/events") kind = "longpoll";
  return { method, path, target, headers, kind };
}
