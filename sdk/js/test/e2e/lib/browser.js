// Pages in headless Chromium on an origin other than the gateway's: a static
// server on 127.0.0.2 serves the test page and the built SDK, the gateway
// listens on 127.0.0.1, so every request the SDK makes is cross-origin and
// the gateway's Origin allowlist and CORS answers are in play.

import { createReadStream, existsSync } from "node:fs";
import { createServer } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { extname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { repoRoot } from "./processes.js";

/** The SDK as `npm run build` leaves it. */
const sdkDist = join(repoRoot, "sdk", "js", "dist");
const fixtures = fileURLToPath(new URL("../fixtures/", import.meta.url));

/** The SDK's entry point, which the tests that run clients in Node import. */
export function sdkEntry() {
  const entry = join(sdkDist, "index.js");
  if (!existsSync(entry)) throw new Error(`no SDK build at ${entry}: run \`npm run build\` in sdk/js first`);
  return entry;
}

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".map": "application/json" };

/**
 * The static page server: `/` is the test page, `/report.js` its helper,
 * `/sdk/...` the files of sdk/js/dist. `origin` is what the gateway must
 * allow (`--allowed-origin`). With `tls` (`{ cert, key }`, PEM) it serves
 * https.
 */
export class PageServer {
  static async start({ tls } = {}) {
    sdkEntry();
    const ps = new PageServer(tls);
    await new Promise((resolve) => ps.server.listen(0, "127.0.0.2", resolve));
    ps.origin = `${tls ? "https" : "http"}://127.0.0.2:${ps.server.address().port}`;
    return ps;
  }

  constructor(tls) {
    const serve = (req, res) => {
      const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
      let file;
      if (path === "/favicon.ico") {
        res.writeHead(204).end();
        return;
      }
      if (path === "/") file = join(fixtures, "page.html");
      else if (path === "/page.js" || path === "/report.js") file = join(fixtures, path.slice(1));
      else if (path.startsWith("/sdk/")) file = normalize(join(sdkDist, path.slice("/sdk/".length)));
      if (!file || !(file.startsWith(fixtures) || file.startsWith(sdkDist + sep)) || !existsSync(file)) {
        res.writeHead(404).end();
        return;
      }
      res.writeHead(200, { "Content-Type": TYPES[extname(file)] ?? "application/octet-stream" });
      createReadStream(file).pipe(res);
    };
    this.server = tls ? createHttpsServer(tls, serve) : createServer(serve);
  }

  async close() {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * Chromium: the system's (CI installs Debian's `chromium`), or CHROMIUM.
 * `args`: more command-line switches.
 */
export async function launchBrowser({ args = [] } = {}) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", ...args],
  });
}

/**
 * A page of `pages` (a PageServer) in a fresh context of `browser`, whose
 * SDK clients report to `recorder`. `tokens(name)` answers a client's
 * `getToken`, for those opened with `{ token: true }`.
 */
export async function openPage(browser, pages, recorder, tokens) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") problems.push(`console ${m.type()}: ${m.text()}`);
  });
  await page.exposeFunction("e2eReport", (event) => recorder.push(event));
  await page.exposeFunction("e2eToken", async (name) => {
    recorder.push({ client: name, kind: "token" });
    return tokens(name);
  });
  await page.goto(`${pages.origin}/`);
  if (!(await page.evaluate(() => window.e2e !== undefined))) {
    throw new Error(`the test page did not load the SDK:\n${problems.join("\n")}`);
  }
  return {
    /** The Playwright page, for what a test does in it besides SDK clients. */
    page,
    recorder,
    problems,
    /** Opens an SDK client named `name` with `options` (JSON), connected. */
    open: (name, options) => page.evaluate(([n, o]) => window.e2e.open(n, o), [name, options]),
    /** `client.publish(channel, text)`: `{ ok: true }` or `{ ok: false, error }`. */
    publish: (name, channel, text) =>
      page.evaluate(([n, c, d]) => window.e2e.publish(n, c, d), [name, channel, text]),
    close: (name) => page.evaluate((n) => window.e2e.close(n), name),
    dispose: () => context.close(),
  };
}
