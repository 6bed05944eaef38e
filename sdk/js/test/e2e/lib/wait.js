// Waiting on signals, never on the clock: every source of events the tests
// watch (clients in pages and in Node, the proxy, child processes) calls
// `changed()` when something happens, and `until` re-checks its condition
// then. The timeout is only a safety net that turns a hang into a failure
// naming what was awaited.

const waiters = new Set();

/** Something the tests watch has happened: re-check every pending wait. */
export function changed() {
  for (const w of [...waiters]) w.check();
}

/**
 * Resolves with the first truthy value of `condition()`, checked now and
 * after every `changed()`; rejects after `ms` with `what` in the message.
 */
export function until(condition, ms, what) {
  return new Promise((resolve, reject) => {
    const w = {
      check() {
        let value;
        try {
          value = condition();
        } catch (e) {
          done();
          reject(e);
          return;
        }
        if (value) {
          done();
          resolve(value);
        }
      },
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
    const done = () => {
      clearTimeout(timer);
      waiters.delete(w);
    };
    waiters.add(w);
    w.check();
  });
}

/**
 * What a set of SDK clients reported, in arrival order: `message`, `gap`,
 * `state`, `error` and `token` events, each `{ client, kind, at, ... }` with
 * `at` the Node clock (ms) when it arrived here.
 */
export class Recorder {
  events = [];
  // Per client too: a test with a thousand clients checks each one's on
  // every event.
  #byClient = new Map();

  push(event) {
    const e = { ...event, at: Date.now() };
    this.events.push(e);
    if (!this.#byClient.has(e.client)) this.#byClient.set(e.client, []);
    this.#byClient.get(e.client).push(e);
    changed();
  }

  of(client, kind) {
    const events = this.#byClient.get(client) ?? [];
    return kind ? events.filter((e) => e.kind === kind) : events;
  }

  messages(client, channel) {
    return this.of(client, "message").filter((e) => !channel || e.channel === channel);
  }

  /** The texts of `client`'s messages (binary ones as `bin:` + hex). */
  texts(client, channel) {
    return this.messages(client, channel).map((m) =>
      m.binary ? `bin:${Buffer.from(m.binary).toString("hex")}` : m.data,
    );
  }

  /** Waits for the first event of `client` matching `predicate`. */
  next(client, predicate, ms, what) {
    return until(() => this.of(client).find(predicate), ms, `${client}: ${what}`);
  }
}
