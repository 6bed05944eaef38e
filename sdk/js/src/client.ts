import { Backoff } from "./backoff.js";
import { Cursors } from "./cursors.js";
import { encodePublish, type Incoming, type Message } from "./frames.js";
import {
  type Ended,
  type Handlers,
  type Link,
  type LinkOptions,
  openLongPoll,
  openSse,
  openWebSocket,
  refusal,
} from "./links.js";

export type Transport = "websocket" | "sse" | "longpoll";
export type State = "connecting" | "connected" | "disconnected" | "failed";

export interface StateEvent {
  state: State;
  transport: Transport | null;
  reason?: string;
  retryInMs?: number;
}

export interface Options {
  /** The gateway's base URL, `http(s)://host[:port][/prefix]`; WebSocket
   * uses the same with `ws(s)`. */
  url: string;
  /** Channels subscribed at connect. */
  channels?: string[];
  /** Transports in order of preference. */
  transports?: Transport[];
  /** Called before each connection, and so again after the gateway said
   * the token expired (4001, 401). */
  getToken?: () => string | Promise<string>;
  /** A WebSocket implementation where there is no global one (Node < 22:
   * the `ws` package). */
  WebSocket?: any;
  fetch?: typeof fetch;
  /** A transport that has not delivered its first bytes (SSE) or its
   * welcome (WebSocket) by then is taken as blocked: the next is tried. */
  connectTimeoutMs?: number;
  backoff?: { baseMs?: number; maxMs?: number };
  /** On a fallback transport, try the preferred ones again after this. */
  upgradeAfterMs?: number;
  /** How message ids relate across channels: "shared" (the gateway's own
   * ids, or a publisher numbering all channels from one sequence) resumes
   * with one cursor; "per-channel" (a publisher counting each channel on
   * its own) resumes each channel from its own. */
  cursor?: "shared" | "per-channel";
}

interface Events {
  message: Message;
  gap: { channel: string };
  state: StateEvent;
  error: Error;
}

type Settle = { resolve(): void; reject(e: Error): void };

const ALL: Transport[] = ["websocket", "sse", "longpoll"];
const OPEN = { websocket: openWebSocket, sse: openSse, longpoll: openLongPoll };

export class Client {
  state: State = "disconnected";
  transport: Transport | null = null;

  private o: Required<Pick<Options, "transports" | "connectTimeoutMs" | "upgradeAfterMs">> & Options;
  private subs: Set<string>;
  private cursors = new Cursors();
  private backoff: Backoff;
  private listeners: { [type: string]: Set<(e: any) => void> } = {};
  private running = false;
  /** Bumped by every new main connection and by close(): a connection
   * still waiting for its token when it changed is abandoned. */
  private gen = 0;
  private link?: Link;
  private index = 0;
  /** A better transport being tried while the current one serves. */
  private candidate?: Link;
  private timer?: ReturnType<typeof setTimeout>;
  private upgradeTimer?: ReturnType<typeof setTimeout>;
  private token?: string;
  private tokenRetried = false;
  private refs = 0;
  private acks = new Map<string, Settle>();
  private queued: { send(): void; reject(e: Error): void }[] = [];
  /** Channels told of a gap on this connection with no message since. */
  private gapped = new Set<string>();

  constructor(options: Options) {
    this.o = { transports: ALL, connectTimeoutMs: 5000, upgradeAfterMs: 60000, ...options };
    this.subs = new Set(options.channels);
    const b = options.backoff || {};
    this.backoff = new Backoff(b.baseMs, b.maxMs);
  }

  on<K extends keyof Events>(type: K, fn: (e: Events[K]) => void): () => void {
    (this.listeners[type] ||= new Set()).add(fn);
    return () => this.off(type, fn);
  }

  off<K extends keyof Events>(type: K, fn: (e: Events[K]) => void): void {
    this.listeners[type]?.delete(fn);
  }

  /** The last message id received on `channel`: where it resumes. */
  lastId(channel: string): string | undefined {
    return this.cursors.get(channel);
  }

  connect(): void {
    if (this.running) return;
    this.running = true;
    this.dial(0);
  }

  close(): void {
    this.running = false;
    this.gen++;
    this.stopTimers();
    this.drop();
    const closed = new Error("closed");
    for (const q of this.queued.splice(0)) q.reject(closed);
    this.set("disconnected", null, "closed");
  }

  subscribe(channel: string): void {
    if (this.subs.has(channel)) return;
    this.subs.add(channel);
    // A WebSocket adds it in place, unless its URL's cursor would hold
    // back this channel's messages (publisher counters per channel).
    const send = this.connected && this.link!.send;
    if (send && !(this.perChannel && this.link!.floor))
      send(JSON.stringify({ type: "subscribe", channels: [channel], ref: "s" }));
    else this.restart();
  }

  unsubscribe(channel: string): void {
    if (!this.subs.delete(channel)) return;
    this.cursors.forget(channel);
    this.gapped.delete(channel);
    const send = this.connected && this.link!.send;
    if (send && this.subs.size) send(JSON.stringify({ type: "unsubscribe", channels: [channel], ref: "s" }));
    else this.restart();
  }

  /** Sends `data` to the hubs on `channel`: settles on the gateway's answer
   * (its acknowledgement, or an Error with its reason). Waits for a
   * connection when there is none yet. */
  publish(channel: string, data: string | Uint8Array): Promise<void> {
    return new Promise((resolve, reject) => {
      if (!this.running) return reject(new Error("not connected"));
      const send = () => {
        const link = this.link!;
        if (link.send) {
          const ref = String(++this.refs);
          this.acks.set(ref, { resolve, reject });
          link.send(encodePublish(channel, ref, data));
        } else this.post(channel, data, link.address).then(resolve, reject);
      };
      if (this.connected) send();
      else this.queued.push({ send, reject });
    });
  }

  private get connected() {
    return this.state == "connected" && !!this.link;
  }

  private get perChannel() {
    return this.o.cursor == "per-channel";
  }

  private async post(channel: string, data: string | Uint8Array, address?: string) {
    const q = new URLSearchParams({ channel });
    if (address) q.set("address", address);
    const headers: Record<string, string> = {};
    if (this.token) headers.Authorization = "Bearer " + this.token;
    if (typeof data != "string") headers["Content-Type"] = "application/octet-stream";
    const get = this.o.fetch || fetch;
    const res = await get(this.o.url.replace(/\/+$/, "") + "/publish?" + q, {
      method: "POST",
      body: data as BodyInit,
      headers,
    });
    if (res.status != 202) throw new Error((await refusal(res, true)).reason);
  }

  private emit<K extends keyof Events>(type: K, e: Events[K]) {
    for (const fn of this.listeners[type] || []) {
      try {
        fn(e);
      } catch (err) {
        // A page's listener that throws must not break delivery.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  private set(state: State, transport: Transport | null, reason?: string, retryInMs?: number) {
    this.state = state;
    this.transport = transport;
    const e: StateEvent = { state, transport };
    if (reason) e.reason = reason;
    if (retryInMs != null) e.retryInMs = retryInMs;
    this.emit("state", e);
  }

  private stopTimers() {
    clearTimeout(this.timer);
    clearTimeout(this.upgradeTimer);
  }

  /** Ends the current connection and the candidate, quietly. */
  private drop() {
    this.link?.close();
    this.candidate?.close();
    this.link = this.candidate = undefined;
    this.failAcks();
  }

  /** Messages sent on a WebSocket that is gone: whether the hubs got them
   * is unknown, the page decides whether to send them again. */
  private failAcks() {
    const lost = new Error("connection lost before the gateway's answer");
    for (const a of this.acks.values()) a.reject(lost);
    this.acks.clear();
  }

  /** Reconnects at once on the same transport (the channels changed). */
  private restart() {
    if (!this.running) return;
    this.stopTimers();
    this.drop();
    this.dial(this.index);
  }

  /**
   * Opens transport `i`: as the connection (`up` false), or as a candidate
   * to replace a fallback one (`up` true), which takes over once it has
   * connected. The two may overlap for a moment: the cursors drop what
   * arrives twice.
   */
  private async dial(i: number, up = false): Promise<void> {
    const gen = up ? this.gen : ++this.gen;
    const name = this.o.transports[i];
    if (!up) {
      if (!this.subs.size) return this.set("disconnected", null, "no channel");
      this.set("connecting", name);
    }
    let link: Link | undefined;
    let token: string | undefined;
    const h: Handlers = {
      open: () => {
        if (up) {
          if (link != this.candidate) return;
          const old = this.link;
          this.link = link;
          this.candidate = undefined;
          old?.close();
          this.failAcks();
        } else if (link != this.link) return;
        this.index = i;
        this.token = token;
        this.tokenRetried = false;
        this.backoff.reset();
        this.set("connected", name);
        for (const q of this.queued.splice(0)) q.send();
        if (i) this.upgradeTimer = setTimeout(() => this.dial(0, true), this.o.upgradeAfterMs);
      },
      frame: (f) => {
        if (link == this.link || link == this.candidate) this.frame(f);
      },
      end: (e) => {
        if (link == this.candidate) {
          this.candidate = undefined;
          return this.upgradeFailed(i, e);
        }
        if (link != this.link) return;
        this.link = undefined;
        this.lost(i, e);
      },
    };
    try {
      token = await this.o.getToken?.();
    } catch {
      if (gen == this.gen) up ? this.upgradeFailed(i) : this.lost(i, { reason: "getToken failed", opened: false });
      return;
    }
    if (gen != this.gen || !this.running) return;
    if (!up) this.gapped.clear();
    const options: LinkOptions = {
      url: this.o.url,
      groups: this.cursors.plan([...this.subs], this.perChannel),
      token,
      timeoutMs: this.o.connectTimeoutMs,
      WebSocket: this.o.WebSocket || globalThis.WebSocket,
      fetch: this.o.fetch || ((input, init) => fetch(input, init)),
    };
    try {
      link = OPEN[name](options, h);
    } catch {
      // No such transport here (no WebSocket in this Node): the next.
      up ? this.upgradeFailed(i) : this.lost(i, { reason: name + " unavailable", opened: false });
      return;
    }
    if (up) this.candidate = link;
    else this.link = link;
  }

  /** A candidate did not connect: the next better one, or later again. */
  private upgradeFailed(i: number, e?: Ended): void {
    if (!this.running) return;
    if (!e?.opened && i + 1 < this.index) this.dial(i + 1, true);
    else this.upgradeTimer = setTimeout(() => this.dial(0, true), this.o.upgradeAfterMs);
  }

  /** The connection on transport `i` ended (or never connected). */
  private lost(i: number, e: Ended): void {
    this.stopTimers();
    this.drop();
    if (!this.running) return;
    if (e.fatal || (e.auth && !this.o.getToken)) {
      this.running = false;
      for (const q of this.queued.splice(0)) q.reject(new Error(e.reason));
      return this.set("failed", null, e.reason);
    }
    // A connection that held, or a token refused, comes back on the same
    // transport; a round of transports that all failed starts over.
    let next = e.opened || e.auth ? i : 0;
    let delay: number;
    if (e.auth && !this.tokenRetried) {
      // Expired: a new token, at once (once; a refused fresh one backs off).
      this.tokenRetried = true;
      next = i;
      delay = 0;
    } else if (!e.opened && !e.auth && e.retryInMs == null && i + 1 < this.o.transports.length) {
      // Blocked or unreachable: the next transport, at once.
      this.dial(i + 1);
      return;
    } else if (e.opened && e.retryInMs != null) {
      delay = e.retryInMs; // a drain or SSE's `retry:`
    } else {
      delay = this.backoff.next(e.retryInMs);
    }
    this.set("disconnected", null, e.reason, delay);
    this.timer = setTimeout(() => this.dial(next), delay);
  }

  private frame(f: Incoming) {
    switch (f.t) {
      case "message": {
        const { t, ...m } = f;
        // The user's channel (#) and this connection's (!) are the
        // gateway's; any other channel must be one still subscribed.
        if (!this.subs.has(m.channel) && !/^[#!]/.test(m.channel)) return;
        if (m.id != null && !this.cursors.accept(m.channel, m.id)) return;
        this.gapped.delete(m.channel);
        return this.emit("message", m);
      }
      case "gap":
        // A gateway that has had no message on a channel cannot place a
        // publisher's cursor there, and says so on every poll: once per
        // connection is news, again with nothing in between is not.
        if ((this.subs.has(f.channel) || f.channel[0] == "#") && !this.gapped.has(f.channel)) {
          this.gapped.add(f.channel);
          this.emit("gap", { channel: f.channel });
        }
        return;
      case "ack":
        this.acks.get(f.ref)?.resolve();
        this.acks.delete(f.ref);
        return;
      case "error": {
        const a = f.ref != null && this.acks.get(f.ref);
        if (a) {
          this.acks.delete(f.ref!);
          return a.reject(new Error(f.reason));
        }
        // A subscribe refused: the channel is not followed.
        if (f.channel && this.subs.delete(f.channel)) this.cursors.forget(f.channel);
        this.emit("error", new Error(f.channel ? `${f.reason}: ${f.channel}` : f.reason));
      }
    }
  }
}
