import assert from "node:assert/strict";
import { test } from "node:test";
import { encodePublish, fromBase64, parseFrame, parsePoll, SseParser } from "../../dist/frames.js";

const bytes = (...b) => new Uint8Array(b);
const concat = (a, b) => {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
};

test("a text frame: meta line, then the payload untouched", () => {
  assert.deepEqual(parseFrame('{"channel":"news","id":"42"}\nline one\nline two'), {
    t: "message",
    channel: "news",
    id: "42",
    data: "line one\nline two",
  });
  assert.deepEqual(parseFrame('{"channel":"news","id":"43","event":"headline"}\n'), {
    t: "message",
    channel: "news",
    id: "43",
    event: "headline",
    data: "",
  });
});

test("a binary frame: the payload as bytes, from an ArrayBuffer or a Uint8Array", () => {
  const frame = concat(new TextEncoder().encode('{"channel":"s","id":"7"}\n'), bytes(0, 255, 10, 16));
  for (const f of [frame, frame.buffer]) {
    const m = parseFrame(f);
    assert.equal(m.t, "message");
    assert.equal(m.channel, "s");
    assert.equal(m.id, "7");
    assert.deepEqual(m.data, bytes(0, 255, 10, 16));
  }
});

test("a message to this connection alone has no id", () => {
  assert.deepEqual(parseFrame('{"channel":"!7fbc"}\ndelivered'), { t: "message", channel: "!7fbc", data: "delivered" });
});

test("gap, welcome, ack and error frames", () => {
  assert.deepEqual(parseFrame('{"channel":"news","gap":true}\n'), { t: "gap", channel: "news" });
  assert.deepEqual(parseFrame('{"type":"welcome","address":"7fbc"}\n'), { t: "welcome", address: "7fbc" });
  assert.deepEqual(parseFrame('{"type":"ack","ref":"17"}\n'), { t: "ack", ref: "17" });
  assert.deepEqual(parseFrame('{"type":"ack","ref":17}'), { t: "ack", ref: "17" }, "an integer ref");
  assert.deepEqual(parseFrame('{"type":"error","ref":"18","reason":"channel not allowed","channel":"x"}\n'), {
    t: "error",
    ref: "18",
    reason: "channel not allowed",
    channel: "x",
  });
  assert.equal(parseFrame('{"type":"error","reason":"bad meta"}\n').ref, undefined);
});

test("SSE data in base64 comes out as bytes", () => {
  const m = parseFrame('{"channel":"news","id":"42","encoding":"base64"}\n//4ACg==');
  assert.deepEqual(m.data, bytes(255, 254, 0, 10));
  assert.deepEqual(fromBase64(""), bytes());
});

test("a frame that is not the gateway's throws", () => {
  assert.throws(() => parseFrame("not json\n"));
});

test("long-poll: cursor, gaps first, then messages (text and base64)", () => {
  const body = JSON.stringify({
    cursor: "1795818537400507",
    messages: [
      { channel: "news", id: "1795818537400506", data: "a\nb" },
      { channel: "news", id: "1795818537400507", event: "e", data: "/w==", encoding: "base64" },
    ],
    gaps: ["news"],
  });
  assert.deepEqual(parsePoll(body), {
    cursor: "1795818537400507",
    items: [
      { t: "gap", channel: "news" },
      { t: "message", channel: "news", id: "1795818537400506", data: "a\nb" },
      { t: "message", channel: "news", id: "1795818537400507", event: "e", data: bytes(255) },
    ],
  });
  assert.deepEqual(parsePoll('{"cursor":"5","messages":[],"gaps":[]}'), { cursor: "5", items: [] });
});

test("publish frames: meta line with the ref, then the payload; bytes as a binary frame", () => {
  assert.equal(encodePublish("room.1", "17", "hello"), '{"channel":"room.1","ref":"17"}\nhello');
  const f = encodePublish("room.1", "18", bytes(0, 255));
  assert.ok(f instanceof Uint8Array);
  assert.deepEqual(f, concat(new TextEncoder().encode('{"channel":"room.1","ref":"18"}\n'), bytes(0, 255)));
  // What the gateway reads back is what was sent.
  assert.deepEqual(parseFrame(f).data, bytes(0, 255));
});

function sse(chunks) {
  const events = [];
  const p = new SseParser((event, data) => events.push([event, data]));
  for (const c of chunks) p.push(c);
  return { events, retry: p.retry };
}

const STREAM =
  "retry: 3172\n\n" +
  "event: welcome\ndata: {\"type\":\"welcome\",\"address\":\"7f\"}\n\n" +
  ": heartbeat\n\n" +
  "id: 42\nevent: headline\ndata: {\"channel\":\"news\",\"id\":\"42\",\"event\":\"headline\"}\ndata: line one\ndata: line two\n\n" +
  "event: gap\ndata: {\"channel\":\"news\",\"gap\":true}\n\n";

const EVENTS = [
  ["welcome", '{"type":"welcome","address":"7f"}'],
  ["headline", '{"channel":"news","id":"42","event":"headline"}\nline one\nline two'],
  ["gap", '{"channel":"news","gap":true}'],
];

test("SSE: events, comments and retry", () => {
  assert.deepEqual(sse([STREAM]), { events: EVENTS, retry: 3172 });
});

test("SSE: the same events however the stream is cut", () => {
  for (let size = 1; size < 12; size++) {
    const chunks = [];
    for (let i = 0; i < STREAM.length; i += size) chunks.push(STREAM.slice(i, i + size));
    assert.deepEqual(sse(chunks).events, EVENTS, `chunks of ${size}`);
  }
});

test("SSE: CRLF and CR line ends, a CRLF cut between chunks", () => {
  const crlf = STREAM.replaceAll("\n", "\r\n");
  assert.deepEqual(sse([crlf]).events, EVENTS);
  const at = crlf.indexOf("\r\n") + 1;
  assert.deepEqual(sse([crlf.slice(0, at), crlf.slice(at)]).events, EVENTS);
  // A CR at the end may yet be a CRLF: the next bytes settle it.
  assert.deepEqual(sse([STREAM.replaceAll("\n", "\r"), ": heartbeat\r"]).events, EVENTS);
});

test("SSE: an event without data is not dispatched; an unfinished one waits", () => {
  assert.deepEqual(sse(["event: x\n\n", "data: {}\n"]).events, []);
  assert.deepEqual(sse(["data:no space\n\n"]).events, [["message", "no space"]]);
  assert.equal(sse(["retry: soon\n\n"]).retry, undefined);
});
