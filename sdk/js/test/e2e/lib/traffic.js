// Publishing patterns the tests share: a warm-up that proves the whole path
// is up, and a continuous numbered stream whose every message each client
// must get exactly once.

import assert from "node:assert/strict";
import { until } from "./wait.js";

/** Pace of the warm-up publications. */
const WARM_UP_EVERY_MS = 100;
/** Pace of a continuous stream. */
const STREAM_EVERY_MS = 20;

/**
 * Publisher ids for one channel, from a base well away from 1 so that a
 * mix-up with a gateway's own numbers or a count would show.
 */
export class Ids {
  constructor(base = 7_000_000) {
    this.last = base;
  }

  next() {
    this.last += 1;
    return this.last;
  }
}

/**
 * Publishes `warm-up N` on `channel` until every client in `clients` has
 * received a message there: a client has subscribed and the publisher's
 * messages reach it once this resolves, whatever its transport (a first
 * long-poll without a cursor only waits for what comes after it). `ids`
 * (an Ids) numbers them, for channels numbered by the publisher.
 */
export async function warmUp(publisher, recorder, channel, clients, { ids, ms = 20_000 } = {}) {
  let n = 0;
  const publish = () => publisher.publish(channel, `warm-up ${++n}`, ids ? { id: ids.next() } : {});
  publish();
  const timer = setInterval(publish, WARM_UP_EVERY_MS);
  try {
    await until(
      () => clients.every((c) => recorder.messages(c, channel).length > 0),
      ms,
      `a first message on ${channel} at ${clients.join(", ")}`,
    );
  } finally {
    clearInterval(timer);
  }
}

/**
 * A continuous stream of `m<k>` on `channel` (k = 1, 2, ...), one message
 * every STREAM_EVERY_MS until `stop()`, which publishes a last `end`.
 */
export class Stream {
  constructor(publisher, channel, ids) {
    this.publisher = publisher;
    this.channel = channel;
    this.ids = ids;
    /** `{ text, id }` of every message published, in order. */
    this.published = [];
  }

  #publish(text) {
    const id = this.ids?.next();
    this.publisher.publish(this.channel, text, id === undefined ? {} : { id });
    this.published.push({ text, id });
  }

  start() {
    this.timer = setInterval(() => this.#publish(`m${this.published.length + 1}`), STREAM_EVERY_MS);
    return this;
  }

  stop() {
    clearInterval(this.timer);
    this.#publish("end");
  }

  /** Waits until every client in `clients` has received the `end`. */
  ended(recorder, clients, ms) {
    return until(
      () => clients.every((c) => recorder.texts(c, this.channel).includes("end")),
      ms,
      `"end" on ${this.channel} at ${clients.join(", ")}`,
    );
  }

  /**
   * `client` got every message of the stream exactly once, in order, with
   * the publisher's id when it gave one (warm-up messages before it aside).
   */
  assertExactlyOnce(recorder, client) {
    const got = recorder
      .messages(client, this.channel)
      .filter((m) => typeof m.data === "string" && !m.data.startsWith("warm-up"));
    const texts = got.map((m) => m.data);
    const expected = this.published.map((p) => p.text);
    if (texts.join(",") !== expected.join(",")) {
      const seen = new Map();
      for (const t of texts) seen.set(t, (seen.get(t) ?? 0) + 1);
      const missing = expected.filter((t) => !seen.has(t));
      const twice = [...seen].filter(([, n]) => n > 1).map(([t]) => t);
      assert.fail(
        `${client}: ${texts.length} messages for ${expected.length} published; ` +
          `missing ${JSON.stringify(missing.slice(0, 20))} (${missing.length}), ` +
          `more than once ${JSON.stringify(twice.slice(0, 20))} (${twice.length})`,
      );
    }
    if (this.ids) {
      assert.deepEqual(
        got.map((m) => String(m.id)),
        this.published.map((p) => String(p.id)),
        `${client}: the publisher's ids`,
      );
    }
  }
}
