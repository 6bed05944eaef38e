// The processes an end-to-end test runs: the gateway binary, and the Python
// publisher and hub that speak ZeroMQ for it.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { changed, until } from "./wait.js";

/** The repository's root, from this file's place in it. */
export const repoRoot = fileURLToPath(new URL("../../../../../", import.meta.url));

/** How long a gateway or a helper may take to say it is ready. */
const READY_MS = 20_000;
/** Lines of a process's stderr kept for a failing test's report. */
const LOG_LINES = 200;

/** Children still running, killed if this process exits before its tests stop them. */
const running = new Set();
process.on("exit", () => {
  for (const child of running) child.proc.kill("SIGKILL");
});

/**
 * A child process whose stdout lines are kept and whose stderr's tail is
 * kept for the report of a failing test.
 */
class Child {
  constructor(name, command, args) {
    this.name = name;
    this.lines = [];
    this.stderr = [];
    this.exit = null;
    this.proc = spawn(command, args, { stdio: ["pipe", "pipe", "pipe"] });
    running.add(this);
    this.exited = new Promise((resolve) => {
      this.proc.on("exit", (code, signal) => {
        running.delete(this);
        this.exit = { code, signal, at: Date.now() };
        changed();
        resolve(this.exit);
      });
      this.proc.on("error", (e) => {
        running.delete(this);
        this.exit = { code: null, signal: null, error: e.message, at: Date.now() };
        changed();
        resolve(this.exit);
      });
    });
    createInterface({ input: this.proc.stdout }).on("line", (line) => {
      this.lines.push(line);
      changed();
    });
    createInterface({ input: this.proc.stderr }).on("line", (line) => {
      this.stderr.push(line);
      if (this.stderr.length > LOG_LINES) this.stderr.shift();
    });
  }

  get pid() {
    return this.proc.pid;
  }

  /** The first stdout line satisfying `match` (a function of the line). */
  line(match, ms, what) {
    return until(
      () => {
        const found = this.lines.find(match);
        if (found) return found;
        if (this.exit) throw new Error(`${this.name} exited (${JSON.stringify(this.exit)}) before ${what}`);
        return null;
      },
      ms,
      `${this.name}: ${what}`,
    );
  }

  signal(sig) {
    this.proc.kill(sig);
  }

  /** Kills it unless it has exited, and waits until it has. */
  async stop() {
    if (!this.exit) this.proc.kill("SIGKILL");
    await this.exited;
  }

  report() {
    return `--- ${this.name} (pid ${this.pid}) stderr, last lines:\n${this.stderr.join("\n")}`;
  }

  /** Its ready line; a child that never says it is stopped, and its log told. */
  async ready(match, what) {
    try {
      return await this.line(match, READY_MS, what);
    } catch (e) {
      await this.stop();
      e.message += `\n${this.report()}`;
      throw e;
    }
  }
}

/** The gateway binary: GATEWAY_BIN, or the release build in the repository. */
function gatewayBin() {
  const bin = process.env.GATEWAY_BIN ?? join(repoRoot, "target", "release", "gateway");
  if (!existsSync(bin)) {
    throw new Error(`no gateway binary at ${bin}: run \`cargo build --release -p gateway\` first`);
  }
  return bin;
}

/**
 * A running gateway. `args` are its flags; unless they set them, it listens
 * on a free loopback port, binds a free ZeroMQ port and has no admin
 * listener, so that tests never share a port by accident. Its `url` is
 * https when `args` give it a certificate (`--tls-cert`).
 */
export class Gateway extends Child {
  static async start(args = []) {
    const argv = [...args];
    if (!argv.includes("--listen")) argv.push("--listen", "127.0.0.1:0");
    if (!argv.includes("--zmq-bind")) argv.push("--zmq-bind", "tcp://127.0.0.1:*");
    if (!argv.includes("--admin-listen")) argv.push("--admin-listen", "");
    const gw = new Gateway("gateway", gatewayBin(), argv);
    const ready = await gw.ready((l) => l.startsWith("READY "), "its READY line");
    const fields = Object.fromEntries(
      ready
        .split(/\s+/)
        .slice(1)
        .map((tok) => {
          const i = tok.indexOf("=");
          return [tok.slice(0, i), tok.slice(i + 1)];
        }),
    );
    gw.listen = fields.listen;
    gw.url = `${argv.includes("--tls-cert") ? "https" : "http"}://${fields.listen}`;
    gw.zmq = fields.zmq === "-" ? null : fields.zmq;
    gw.upstream = fields.upstream?.split(",")[0] ?? null;
    gw.name = `gateway ${fields.listen}`;
    return gw;
  }
}

/** Sends one JSON command per line to a helper's stdin. */
function command(child, obj) {
  child.proc.stdin.write(`${JSON.stringify(obj)}\n`);
}

/** The JSON objects a helper printed, one per stdout line. */
function answers(child) {
  return child.lines.map((l) => JSON.parse(l));
}

/**
 * The Python publisher (lib/publisher.py). `bind` binds a free port for
 * gateways to connect to (`--zmq-connect publisher.endpoint`); `connect`
 * connects to a gateway's `zmq=` endpoint.
 */
export class Publisher extends Child {
  static async bind() {
    return Publisher.#start(["bind", "tcp://127.0.0.1:*"]);
  }

  static async connect(endpoint) {
    return Publisher.#start(["connect", endpoint]);
  }

  static async #start(args) {
    const script = fileURLToPath(new URL("./publisher.py", import.meta.url));
    const p = new Publisher("publisher", "python3", [script, ...args]);
    const ready = await p.ready((l) => l.includes('"ready"'), "ready");
    p.endpoint = JSON.parse(ready).endpoint;
    return p;
  }

  /** Waits until `n` gateways have subscribed: nothing published is lost. */
  async subscribers(n, ms = READY_MS) {
    command(this, { op: "wait_subscribers", n });
    await until(
      () => answers(this).some((a) => a.op === "subscribers" && a.n >= n),
      ms,
      `${n} gateway(s) subscribed to the publisher`,
    );
  }

  /** Publishes `data` (a string, or a Uint8Array for binary) on `channel`. */
  publish(channel, data, { id, event } = {}) {
    const cmd = { op: "publish", channel };
    if (typeof data === "string") cmd.text = data;
    else cmd.base64 = Buffer.from(data).toString("base64");
    if (id !== undefined) cmd.id = id;
    if (event !== undefined) cmd.event = event;
    command(this, cmd);
  }
}

/** The chat hub (lib/hub.py) on a gateway started with `--upstream-bind`. */
export class Hub extends Child {
  static async start(gateway) {
    const script = fileURLToPath(new URL("./hub.py", import.meta.url));
    const hub = new Hub("hub", "python3", [script, gateway.upstream, gateway.zmq]);
    await hub.ready((l) => l.includes('"ready"'), "ready (the gateway subscribed)");
    return hub;
  }

  /** The upstream messages it received so far. */
  received() {
    return answers(this).filter((a) => a.op === "upstream");
  }
}
