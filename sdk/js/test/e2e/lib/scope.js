// One end-to-end test's world: what it starts is stopped when it ends,
// pass or fail, and a failure's message carries the logs of everything it
// started (the gateways' stderr, the helpers', the pages' errors).

import test from "node:test";
import { launchBrowser, openPage, PageServer } from "./browser.js";
import { Gateway, Hub, Publisher } from "./processes.js";
import { TestProxy } from "./proxy.js";

/** A page's last events in a failing test's report. */
const REPORTED_EVENTS = 60;

/** `test(name, options, body)` where `body(scope, t)` starts things through `scope`. */
export function e2e(name, options, body) {
  test(name, options, async (t) => {
    const scope = new Scope();
    try {
      await scope.reporting(() => body(scope, t));
    } finally {
      await scope.close();
    }
  });
}

class Scope {
  /** A subtest of `t` sharing this scope, whose failure carries the logs too. */
  step(t, name, body) {
    return t.test(name, () => this.reporting(body));
  }

  async reporting(body) {
    try {
      await body();
    } catch (e) {
      const report = this.report();
      if (e instanceof Error && report) e.message += `\n${report}`;
      throw e;
    }
  }

  #cleanups = [];
  #reports = [];

  #own(thing, stop, report) {
    this.#cleanups.push(stop);
    if (report) this.#reports.push(report);
    return thing;
  }

  async #child(starting) {
    const child = await starting;
    return this.#own(child, () => child.stop(), () => child.report());
  }

  gateway(args) {
    return this.#child(Gateway.start(args));
  }

  publisherBound() {
    return this.#child(Publisher.bind());
  }

  publisherTo(gateway) {
    return this.#child(Publisher.connect(gateway.zmq));
  }

  hub(gateway) {
    return this.#child(Hub.start(gateway));
  }

  async proxy(target, mode) {
    const proxy = await TestProxy.start(target, mode);
    return this.#own(
      proxy,
      () => proxy.close(),
      () => `--- proxy ${proxy.url} requests:\n${proxy.log.map((r) => JSON.stringify(r)).join("\n")}`,
    );
  }

  async pageServer(options) {
    const pages = await PageServer.start(options);
    return this.#own(pages, () => pages.close());
  }

  async browser(options) {
    const browser = await launchBrowser(options);
    return this.#own(browser, () => browser.close());
  }

  async page(browser, pages, recorder, tokens) {
    const p = await openPage(browser, pages, recorder, tokens);
    const report = () =>
      [
        "--- page problems and its clients' last events:",
        ...p.problems,
        ...p.recorder.events.slice(-REPORTED_EVENTS).map((e) => JSON.stringify(e)),
      ].join("\n");
    return this.#own(p, () => p.dispose(), report);
  }

  /** `close()` is called on `thing` when the test ends. */
  closes(thing) {
    return this.#own(thing, () => thing.close());
  }

  report() {
    return this.#reports
      .map((r) => r())
      .filter(Boolean)
      .join("\n");
  }

  async close() {
    for (const stop of this.#cleanups.reverse()) {
      try {
        await stop();
      } catch {
        // Tearing down what already failed: the test's own error says why.
      }
    }
  }
}
