// What the gateway sends, read the same way on every transport: a meta JSON
// object (a message's `{"channel","id","event","encoding"}`, a gap's
// `{"channel","gap":true}`, or a control frame's `{"type":…}`) and a payload.

/** A message as the page gets it. `id` is absent on a message sent to this
 * connection alone (`!<address>`), which has none. */
export interface Message {
  channel: string;
  id?: string;
  event?: string;
  data: string | Uint8Array;
}

/** Anything the gateway sends, read. */
export type Incoming =
  | ({ t: "message" } & Message)
  | { t: "gap"; channel: string }
  | { t: "welcome"; address: string }
  | { t: "ack"; ref: string }
  | { t: "error"; ref?: string; reason: string; channel?: string };

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/** Decodes standard base64 (the gateway's encoding of a binary payload on
 * SSE and long-poll). */
export function fromBase64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Reads a meta object and its payload (`payload` is the raw text or bytes
 * after the meta line; base64 when the meta says so). */
export function read(meta: any, payload: string | Uint8Array): Incoming {
  const ref = meta.ref == null ? undefined : String(meta.ref);
  switch (meta.type) {
    case "welcome":
      return { t: "welcome", address: meta.address };
    case "ack":
      return { t: "ack", ref: ref! };
    case "error":
      return { t: "error", ref, reason: meta.reason, channel: meta.channel };
  }
  if (meta.gap) return { t: "gap", channel: meta.channel };
  const data =
    meta.encoding == "base64" && typeof payload == "string" ? fromBase64(payload) : payload;
  const m: Incoming = { t: "message", channel: meta.channel, data };
  if (meta.id != null) m.id = String(meta.id);
  if (meta.event != null) m.event = meta.event;
  return m;
}

/** A WebSocket frame (text, or binary when the payload is not UTF-8) or an
 * SSE event's data: the meta line, `\n`, then the payload (SSE's data lines
 * join with `\n`, so an event reads exactly like a text frame). */
export function parseFrame(frame: string | ArrayBuffer | Uint8Array): Incoming {
  if (typeof frame == "string") {
    const i = frame.indexOf("\n");
    return i < 0 ? read(JSON.parse(frame), "") : read(JSON.parse(frame.slice(0, i)), frame.slice(i + 1));
  }
  const bytes = frame instanceof Uint8Array ? frame : new Uint8Array(frame);
  let i = bytes.indexOf(10);
  if (i < 0) i = bytes.length;
  return read(JSON.parse(fromUtf8.decode(bytes.subarray(0, i))), bytes.slice(i + 1));
}

/** A long-poll answer: its cursor, and its gaps then its messages (the
 * order the streams send them in). */
export function parsePoll(body: string): { cursor: string; items: Incoming[] } {
  const r = JSON.parse(body);
  const items: Incoming[] = (r.gaps || []).map((channel: string) => ({ t: "gap", channel }));
  for (const m of r.messages || []) items.push(read(m, m.data));
  return { cursor: String(r.cursor), items };
}

/** A client message on the `gateway.v1` subprotocol: the meta line, `\n`,
 * the payload; a binary frame for bytes. */
export function encodePublish(
  channel: string,
  ref: string,
  data: string | Uint8Array,
): string | Uint8Array {
  const meta = JSON.stringify({ channel, ref }) + "\n";
  if (typeof data == "string") return meta + data;
  const head = utf8.encode(meta);
  const out = new Uint8Array(head.length + data.length);
  out.set(head);
  out.set(data, head.length);
  return out;
}

/** Splits an SSE stream into events, fed text as it arrives (any chunking:
 * a line or a CRLF may be cut anywhere). */
export class SseParser {
  /** The last `retry:` the stream sent, in ms. */
  retry?: number;
  private rest = "";
  private data: string[] = [];
  private event = "";

  constructor(private onEvent: (event: string, data: string) => void) {}

  push(text: string): void {
    const s = this.rest + text;
    let at = 0;
    for (;;) {
      const n = s.indexOf("\n", at);
      const r = s.indexOf("\r", at);
      const end = r >= 0 && (n < 0 || r < n) ? r : n;
      // A CR at the very end may be the first half of a CRLF.
      if (end < 0 || (end == r && end == s.length - 1)) break;
      this.line(s.slice(at, end));
      at = end + (end == r && s[end + 1] == "\n" ? 2 : 1);
    }
    this.rest = s.slice(at);
  }

  private line(line: string): void {
    if (line == "") {
      if (this.data.length) this.onEvent(this.event || "message", this.data.join("\n"));
      this.data = [];
      this.event = "";
      return;
    }
    const c = line.indexOf(":");
    if (c == 0) return; // a comment: the gateway's heartbeat
    const name = c < 0 ? line : line.slice(0, c);
    let value = c < 0 ? "" : line.slice(c + 1);
    if (value[0] == " ") value = value.slice(1);
    if (name == "data") this.data.push(value);
    else if (name == "event") this.event = value;
    else if (name == "retry" && /^\d+$/.test(value)) this.retry = +value;
  }
}
