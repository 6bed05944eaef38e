// The SDK in Node for the cluster bed: `node cluster/sdk_clients.mjs URL
// CH0,CH1,...` opens one client per channel listed (client i follows the
// i-th), WebSocket through the `ws` package (Node 20 has no WebSocket of its
// own), and prints one JSON line per event: {"i":N,"k":"m","id":"42"} for a
// message, {"i":N,"k":"gap"}, {"i":N,"k":"s","s":STATE,"r":REASON}. A line
// `stop` on stdin closes every client and exits. Needs `npm run build` in
// sdk/js (dist/) and its dev dependencies (ws).

import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const require = createRequire(new URL("../sdk/js/package.json", import.meta.url));
const WebSocket = require("ws");
const { Client } = await import(new URL("../sdk/js/dist/index.js", import.meta.url).href);

const [url, spec] = process.argv.slice(2);
const channels = spec.split(",");
const out = [];
const flush = () => {
  if (out.length) process.stdout.write(out.splice(0).join(""));
};
setInterval(flush, 50).unref();
const emit = (o) => out.push(JSON.stringify(o) + "\n");

const clients = channels.map((channel, i) => {
  const c = new Client({ url, channels: [channel], WebSocket });
  c.on("message", (m) => emit({ i, k: "m", id: m.id }));
  c.on("gap", () => emit({ i, k: "gap" }));
  c.on("state", (s) => emit({ i, k: "s", s: s.state, r: s.reason ?? null }));
  c.on("error", (e) => emit({ i, k: "e", e: String(e?.message ?? e) }));
  return c;
});
// Spread the first connections a little (200 a second).
clients.forEach((c, i) => setTimeout(() => c.connect(), i * 5));

createInterface({ input: process.stdin }).on("line", (line) => {
  if (line.trim() === "stop") {
    for (const c of clients) c.close();
    flush();
    process.exit(0);
  }
});
