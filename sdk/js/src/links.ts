// One connection over one transport: opens it, reads what comes, and says
// once how it ended. The client decides what to do next.

import { drainDelayMs, retryAfterMs } from "./backoff.js";
import type { Group } from "./cursors.js";
import { type Incoming, parseFrame, parsePoll, SseParser } from "./frames.js";

export interface Ended {
  reason: string;
  /** Whether it had connected (a failure to connect falls back to the next
   * transport; a connection that ends reconnects on the same one). */
  opened: boolean;
  /** A delay the gateway asked for (`Retry-After`, SSE `retry:`, a drain). */
  retryInMs?: number;
  /** A definite refusal (403): do not try again. */
  fatal?: boolean;
  /** The token was refused or expired (401, 4001): get a new one. */
  auth?: boolean;
}

export interface Handlers {
  open(): void;
  frame(f: Incoming): void;
  end(e: Ended): void;
}

export interface LinkOptions {
  url: string;
  groups: Group[];
  token?: string;
  timeoutMs: number;
  WebSocket?: any;
  fetch: typeof fetch;
}

export interface Link {
  /** The connection's address (the `gateway.v1` / SSE welcome): where the
   * hubs answer it. */
  address?: string;
  /** WebSocket only: sends a frame. */
  send?(data: string | Uint8Array): void;
  /** WebSocket only: the cursor in its URL, which holds back messages up
   * to it on every channel the connection adds later. */
  floor?: string;
  /** Ends it without a word to the handlers. */
  close(): void;
}

/** `channel=…&channel=…[&since=…][&token=…]` */
export function query(channels: string[], since?: string, token?: string): string {
  const q = new URLSearchParams();
  for (const c of channels) q.append("channel", c);
  if (since) q.set("since", since);
  if (token) q.set("token", token);
  return q.toString();
}

const base = (url: string) => url.replace(/\/+$/, "");
const bearer = (token?: string): Record<string, string> =>
  token ? { Authorization: "Bearer " + token } : {};

/** Why an HTTP answer other than 200 refused us, from its status, body and
 * `Retry-After`. */
export async function refusal(res: Response, opened: boolean): Promise<Ended> {
  let body = "";
  try {
    body = (await res.text()).trim().slice(0, 200);
  } catch {}
  const s = res.status;
  return {
    reason: `${s} ${body || res.statusText}`.trim(),
    opened,
    retryInMs: retryAfterMs(res.headers.get("Retry-After")),
    fatal: s == 403,
    auth: s == 401,
  };
}

/** Calls `end` once, whichever way the link ends first. */
function once(h: Handlers, cleanup: () => void) {
  let done = false;
  return {
    get done() {
      return done;
    },
    end(e?: Ended) {
      if (done) return;
      done = true;
      cleanup();
      if (e) h.end(e);
    },
  };
}

/**
 * WebSocket on the `gateway.v1` subprotocol: connected once its welcome
 * frame (sent at once) has come; nothing within the timeout means
 * something in between holds the upgrade or its frames. With several
 * groups (per-channel cursors) the URL carries the channels without a
 * cursor (or the lowest), the others are subscribed each with its own.
 */
export function openWebSocket(o: LinkOptions, h: Handlers): Link {
  const fresh = o.groups.filter((g) => !g.since);
  const first = fresh.length ? { channels: fresh.flatMap((g) => g.channels) } : o.groups[0];
  const rest = o.groups.filter((g) => g.since && g != first);
  const url = base(o.url).replace(/^http/, "ws") + "/ws?" + query(first.channels, first.since, o.token);
  const ws = new o.WebSocket(url, ["gateway.v1"]);
  ws.binaryType = "arraybuffer";
  let opened = false;
  const timer = setTimeout(() => life.end({ reason: "no welcome in time", opened }), o.timeoutMs);
  const life = once(h, () => {
    clearTimeout(timer);
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(1000);
    } catch {}
  });
  const link: Link = { floor: first.since, send: (d) => ws.send(d), close: () => life.end() };
  ws.onerror = () => {}; // onclose follows with the code
  ws.onopen = () => {
    for (const g of rest) ws.send(JSON.stringify({ type: "subscribe", channels: g.channels, since: g.since, ref: "s" }));
  };
  ws.onmessage = (e: { data: string | ArrayBuffer }) => {
    let f: Incoming;
    try {
      f = parseFrame(e.data);
    } catch {
      return life.end({ reason: "unreadable frame", opened });
    }
    if (f.t != "welcome") return h.frame(f);
    link.address = f.address;
    if (!opened) {
      opened = true;
      clearTimeout(timer);
      h.open();
    }
  };
  ws.onclose = (e: { code: number; reason: string }) => {
    const c = e.code;
    life.end(
      c == 1012
        ? { reason: "drain", opened, retryInMs: drainDelayMs() }
        : c == 4001
          ? { reason: "token expired", opened, auth: true }
          : { reason: e.reason || (opened ? "connection lost" : "could not connect") + ` (${c})`, opened },
    );
  };
  return link;
}

/**
 * Server-Sent Events read from `fetch` (not EventSource: it sends the token
 * as a header, and sees the status, `Retry-After` and the end of a
 * stream). Connected on the first bytes (the gateway sends `retry:` at
 * once); none within the timeout is a proxy buffering the stream. One
 * stream per group.
 */
export function openSse(o: LinkOptions, h: Handlers): Link {
  const stop = new AbortController();
  const link: Link = { close: () => life.end() };
  const life = once(h, () => stop.abort());
  let waiting = o.groups.length;
  for (const g of o.groups) stream(g);
  return link;

  async function stream(g: Group) {
    let opened = false;
    const timer = setTimeout(() => life.end({ reason: "no data in time", opened: false }), o.timeoutMs);
    const parser = new SseParser((_, data) => {
      let f: Incoming;
      try {
        f = parseFrame(data);
      } catch {
        return life.end({ reason: "unreadable event", opened: true });
      }
      if (f.t == "welcome") link.address ??= f.address;
      else h.frame(f);
    });
    const get = o.fetch;
    try {
      const res = await get(base(o.url) + "/events?" + query(g.channels, g.since), {
        headers: { Accept: "text/event-stream", ...bearer(o.token) },
        signal: stop.signal,
      });
      if (res.status != 200) {
        clearTimeout(timer);
        return life.end(await refusal(res, false));
      }
      const reader = res.body!.getReader();
      const text = new TextDecoder();
      for (;;) {
        const { done, value } = await reader.read();
        if (done || life.done) break;
        if (!opened) {
          opened = true;
          clearTimeout(timer);
          if (!--waiting) h.open();
        }
        parser.push(text.decode(value, { stream: true }));
      }
      // The gateway ends a stream on a drain (after a fresh `retry:`), an
      // expired token or a slow reader: come back after `retry:`.
      life.end({ reason: "stream ended", opened, retryInMs: parser.retry });
    } catch {
      life.end({ reason: "connection lost", opened });
    } finally {
      clearTimeout(timer);
    }
  }
}

/** A poll the gateway holds longer than this (it holds them 30 s by
 * default) is given up and sent again: a connection may have died quietly. */
const POLL_GIVE_UP_MS = 45000;

/**
 * Long-poll: `GET /events` without `Accept: text/event-stream`, answered
 * with messages or after the gateway's poll timeout; polls again from the
 * answer's cursor. Connected on the first answer, or when the first poll
 * has been held a moment without a refusal. An empty answer that comes at
 * once is a draining gateway (it holds no poll): treated as a drain. One
 * poll loop per group.
 */
export function openLongPoll(o: LinkOptions, h: Handlers): Link {
  const stop = new AbortController();
  const life = once(h, () => {
    clearTimeout(held);
    stop.abort();
  });
  let opened = false;
  const open = () => {
    if (!opened && !life.done) {
      opened = true;
      h.open();
    }
  };
  const held = setTimeout(open, Math.min(1000, o.timeoutMs));
  const link: Link = { close: () => life.end() };
  for (const g of o.groups) poll(g.channels, g.since);
  return link;

  async function poll(channels: string[], since?: string) {
    const get = o.fetch;
    while (!life.done) {
      const started = Date.now();
      const one = new AbortController();
      const abort = () => one.abort();
      stop.signal.addEventListener("abort", abort);
      const timer = setTimeout(abort, POLL_GIVE_UP_MS);
      try {
        const res = await get(base(o.url) + "/events?" + query(channels, since), {
          headers: bearer(o.token),
          signal: one.signal,
        });
        if (res.status != 200) return life.end(await refusal(res, opened));
        const answer = parsePoll(await res.text());
        open();
        for (const f of answer.items) if (!life.done) h.frame(f);
        since = answer.cursor;
        if (!answer.items.length && Date.now() - started < 250)
          return life.end({ reason: "drain", opened: true, retryInMs: drainDelayMs() });
      } catch {
        if (one.signal.aborted && !stop.signal.aborted) continue; // given up: poll again
        return life.end({ reason: "connection lost", opened });
      } finally {
        clearTimeout(timer);
        stop.signal.removeEventListener("abort", abort);
      }
    }
  }
}
