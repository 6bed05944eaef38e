// Where each channel stands, so that a reconnect resumes without loss and
// nothing is delivered twice.
//
// A message id is one of two numberings: a gateway's own (at or above
// 2^56: one sequence across all channels of a gateway process, whose
// random tag is in the low 16 bits), or the publisher's (below 2^56,
// increasing per channel, the same on every gateway). Ids of one numbering
// compare; ids of two do not (another gateway process, or a channel that
// changed numbering), and the gateway says so with a gap.

const FLOOR = 1n << 56n;

/** The numbering an id belongs to: "p" for the publisher's, or the
 * gateway process's tag. */
const numbering = (id: bigint) => (id < FLOOR ? "p" : String(id & 0xffffn));

/** Channels asked for with one `since` (none: from now on). */
export interface Group {
  channels: string[];
  since?: string;
}

export class Cursors {
  private last = new Map<string, bigint>();
  private latest?: bigint;

  /** Records message `id` of `channel`: false when the page has had it
   * already (a replay overlapping what it got, or two transports at once
   * during an upgrade). */
  accept(channel: string, id: string): boolean {
    const n = BigInt(id);
    const prev = this.last.get(channel);
    if (prev !== undefined && numbering(prev) == numbering(n) && n <= prev) return false;
    this.last.set(channel, n);
    this.latest = n;
    return true;
  }

  /** The last id the page got on `channel`. */
  get(channel: string): string | undefined {
    const n = this.last.get(channel);
    return n === undefined ? undefined : String(n);
  }

  forget(channel: string): void {
    this.last.delete(channel);
  }

  /**
   * How to ask for `channels` again.
   *
   * Shared (the default): one cursor, the last id received on any channel.
   * The gateway applies `since` to every channel of a request, and that is
   * right when they share one sequence: always with the gateway's own ids,
   * and with the publisher's when it numbers the channels from one sequence
   * or a timestamp, as the gateway's rules ask of channels read together.
   * A channel that has had no message since is covered by it too: it was
   * followed all along.
   *
   * Per channel (publisher counters per channel): one group per channel,
   * each from its own last id. Channels without one come first, then by
   * cursor, so that a transport that must put one group in its URL (whose
   * `since` then also holds back every other channel's messages up to it)
   * picks the one that holds back nothing, or the least.
   */
  plan(channels: string[], perChannel: boolean): Group[] {
    if (!perChannel) return [{ channels, since: this.latest?.toString() }];
    // Ids start at 1: -1 sorts the channels without one first.
    const key = (ch: string) => this.last.get(ch) ?? -1n;
    return channels
      .slice()
      .sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0))
      .map((ch) => ({ channels: [ch], since: this.get(ch) }));
  }
}
