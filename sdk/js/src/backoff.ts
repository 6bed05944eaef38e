// When to try again.

/** Exponential backoff with full jitter: the n-th delay in a row is drawn
 * uniformly from [0, min(max, base·2^n)), so that clients that lost the same
 * gateway at the same moment do not come back together. */
export class Backoff {
  private n = 0;

  constructor(
    private baseMs = 500,
    private maxMs = 30000,
    private random = Math.random,
  ) {}

  /** The next delay; at least `floorMs` (what the gateway asked for). */
  next(floorMs = 0): number {
    const cap = Math.min(this.maxMs, this.baseMs * 2 ** Math.min(this.n++, 30));
    return Math.max(floorMs, Math.floor(this.random() * cap));
  }

  /** A connection held: the next failure starts from the base again. */
  reset(): void {
    this.n = 0;
  }
}

/** `Retry-After` in ms: seconds, or an HTTP date; undefined when absent or
 * unreadable. */
export function retryAfterMs(value: string | null, now = Date.now()): number | undefined {
  if (!value) return undefined;
  if (/^\s*\d+\s*$/.test(value)) return +value * 1000;
  const at = Date.parse(value);
  return isNaN(at) ? undefined : Math.max(0, at - now);
}

/** After a drain: a random delay like the one the gateway gives SSE clients
 * (1–5 s), so that a drained gateway's clients arrive spread out. */
export function drainDelayMs(random = Math.random): number {
  return 1000 + Math.floor(random() * 4000);
}
