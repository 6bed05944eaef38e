//! The client's side of a Server-Sent Events stream, for fanout: the
//! response body read from a socket in arbitrary pieces, as sent or in
//! HTTP/1.1 chunked transfer coding (what hyper-based servers such as the
//! baseline use for a body of unknown length), cut into events by the rules
//! of the HTML standard's "interpreting an event stream", each event's data
//! handed on whole.
//!
//! Like the WebSocket path this allocates nothing per event: de-chunking and
//! joining an event's `data:` lines write over the read buffer in place (the
//! result is never longer than what it replaces), and what an unfinished
//! event has so far (its data, then an unfinished line) waits in the
//! connection's carry-over buffer for the next read. The state between reads
//! is a few bytes per connection.

use std::io;
use std::ops::Range;

use crate::ws::{read_behind, ReadEnd};

/// UTF-8 byte order mark: skipped once at the start of the stream.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// What the stream hands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// A dispatched event's data: its `data` field values joined with "\n".
    Event(&'a [u8]),
    /// A comment line (starting with `:`): the servers' heartbeat.
    Comment,
}

/// Where the chunked-coding decoder stands (RFC 9112 section 7.1). Bare LF
/// line ends are taken too, as most servers' parsers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In a chunk-size line; `digits`: whether any hex digit came yet.
    Size { size: u64, digits: bool },
    /// In a chunk extension (ignored) up to the line end.
    Ext(u64),
    /// After the CR that ends a chunk-size line.
    SizeLf(u64),
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataCr,
    /// After that CR.
    DataLf,
    /// After the last (zero-size) chunk: trailer lines up to an empty one;
    /// `line_start`: nothing but line-end bytes since the last LF.
    Trailer { line_start: bool },
    /// The body is complete.
    Done,
}

const CHUNK_START: Chunk = Chunk::Size {
    size: 0,
    digits: false,
};

impl Chunk {
    /// Decodes `buf` in place: the chunk data it holds moves to its front.
    /// Returns the data's length and whether the body ended (bytes after
    /// its end are ignored).
    fn decode(&mut self, buf: &mut [u8]) -> Result<(usize, bool), &'static str> {
        let (mut r, mut w) = (0, 0);
        while r < buf.len() {
            match *self {
                Chunk::Data(left) => {
                    let n = left.min((buf.len() - r) as u64) as usize;
                    buf.copy_within(r..r + n, w);
                    r += n;
                    w += n;
                    *self = match left - n as u64 {
                        0 => Chunk::DataCr,
                        left => Chunk::Data(left),
                    };
                    continue;
                }
                Chunk::Done => return Ok((w, true)),
                _ => {}
            }
            let b = buf[r];
            r += 1;
            *self = match (*self, b) {
                (Chunk::Size { size, .. }, b) if b.is_ascii_hexdigit() => {
                    if size >> 56 != 0 {
                        return Err("chunk size too large");
                    }
                    let digit = (b as char).to_digit(16).expect("a hex digit") as u64;
                    Chunk::Size {
                        size: size << 4 | digit,
                        digits: true,
                    }
                }
                (Chunk::Size { size, digits: true }, b';' | b' ' | b'\t') => Chunk::Ext(size),
                (Chunk::Size { size, digits: true }, b'\r') | (Chunk::Ext(size), b'\r') => {
                    Chunk::SizeLf(size)
                }
                (Chunk::Size { size, digits: true }, b'\n')
                | (Chunk::Ext(size), b'\n')
                | (Chunk::SizeLf(size), b'\n') => match size {
                    0 => Chunk::Trailer { line_start: true },
                    n => Chunk::Data(n),
                },
                (Chunk::Size { .. }, _) => return Err("bad chunk size line"),
                (Chunk::Ext(size), _) => Chunk::Ext(size),
                (Chunk::SizeLf(_), _) => return Err("CR without LF after a chunk size"),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataCr, b'\n') | (Chunk::DataLf, b'\n') => CHUNK_START,
                (Chunk::DataCr | Chunk::DataLf, _) => {
                    return Err("chunk data longer than its size")
                }
                (Chunk::Trailer { line_start }, b'\n') => {
                    if line_start {
                        *self = Chunk::Done;
                        return Ok((w, true));
                    }
                    Chunk::Trailer { line_start: true }
                }
                (Chunk::Trailer { line_start }, b'\r') => Chunk::Trailer { line_start },
                (Chunk::Trailer { .. }, _) => Chunk::Trailer { line_start: false },
                (Chunk::Data(_) | Chunk::Done, _) => unreachable!("handled above"),
            };
        }
        Ok((w, false))
    }
}

/// The event parser's state between reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Events {
    /// Bytes of the current event's data so far, at the start of the
    /// carried-over bytes.
    data_len: u32,
    /// The current event has had a `data` field (so it is dispatched, even
    /// when its data is empty).
    has_data: bool,
    /// The last line ended with a CR that was the last byte there was: an
    /// LF next belongs to that line end.
    after_cr: bool,
    /// Past the start of the stream, where a byte order mark is skipped.
    started: bool,
}

impl Events {
    /// Parses `buf`: the current event's data so far (`data_len` bytes),
    /// then bytes from the start of a line on. Hands each event and comment
    /// to `on_item`; returns what the next read needs kept, in this order:
    /// the unfinished event's data, then the unfinished line.
    ///
    /// Fields per the standard: `data` appends its value (one leading space
    /// dropped) to the event's data, lines joined with "\n"; an empty line
    /// dispatches the event if it had a `data` field; `event`, `id`,
    /// `retry` and unknown fields are read and ignored: the bench does not
    /// reconnect (no Last-Event-ID, no retry delay) and the data itself says
    /// what a message is.
    fn parse(
        &mut self,
        buf: &mut [u8],
        on_item: &mut impl FnMut(Item<'_>),
    ) -> (Range<usize>, Range<usize>) {
        let len = buf.len();
        // The current event's data is buf[start..w]; lines are read from r.
        // Writing data never overtakes reading: a data line gives at most
        // its value plus one "\n" and takes at least "data" plus a line end.
        let mut start = 0;
        let mut w = self.data_len as usize;
        let mut r = w;
        if !self.started {
            let rest = &buf[r..];
            if rest.len() < BOM.len() && BOM.starts_with(rest) {
                return (start..w, r..len); // maybe a BOM: wait for more
            }
            if rest.starts_with(BOM) {
                r += BOM.len();
            }
            self.started = true;
        }
        if self.after_cr && r < len {
            if buf[r] == b'\n' {
                r += 1;
            }
            self.after_cr = false;
        }
        while let Some(i) = buf[r..].iter().position(|&b| b == b'\n' || b == b'\r') {
            let end = r + i;
            let mut next = end + 1;
            if buf[end] == b'\r' {
                if next == len {
                    self.after_cr = true;
                } else if buf[next] == b'\n' {
                    next += 1;
                }
            }
            if end == r {
                if self.has_data {
                    on_item(Item::Event(&buf[start..w]));
                    self.has_data = false;
                }
            } else if buf[r] == b':' {
                on_item(Item::Comment);
            } else {
                let (name, value) = match buf[r..end].iter().position(|&b| b == b':') {
                    Some(c) => {
                        let v = r + c + 1;
                        let v = if v < end && buf[v] == b' ' { v + 1 } else { v };
                        (r..r + c, v..end)
                    }
                    None => (r..end, end..end),
                };
                if &buf[name] == b"data" {
                    if self.has_data {
                        buf[w] = b'\n';
                        w += 1;
                    }
                    buf.copy_within(value.clone(), w);
                    w += value.len();
                    self.has_data = true;
                }
            }
            if !self.has_data {
                // Between events nothing needs keeping.
                start = next;
                w = next;
            }
            r = next;
        }
        self.data_len = (w - start) as u32;
        (start..w, r..len)
    }
}

/// One connection's SSE stream state between reads (with its carry-over
/// buffer, which [`read_events`] manages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseState {
    /// The chunked decoder, or `None` for a body sent as it is.
    chunk: Option<Chunk>,
    events: Events,
}

impl SseState {
    /// The state at the start of a response body; `chunked`: the head said
    /// `Transfer-Encoding: chunked`.
    pub fn new(chunked: bool) -> SseState {
        SseState {
            chunk: chunked.then_some(CHUNK_START),
            events: Events::default(),
        }
    }
}

/// Reads from a socket (`read`, e.g. a nonblocking recv) into `scratch`
/// behind what the previous read left in `carry`, hands each event and
/// comment to `on_item`, and keeps what the next read needs in `carry`.
/// Loops until a read comes back short (epoll is level-triggered) or would
/// block. The end of the body (a last chunk) reads as an EOF; an event
/// that does not fit `scratch` is [`ReadEnd::Oversized`], bad chunked
/// coding [`ReadEnd::Malformed`]. At an EOF an unfinished event is dropped,
/// as the standard says.
pub fn read_events(
    state: &mut SseState,
    carry: &mut Vec<u8>,
    scratch: &mut [u8],
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    mut on_item: impl FnMut(Item<'_>),
) -> ReadEnd {
    loop {
        let (kept, n) = match read_behind(carry, scratch, &mut read) {
            Ok(got) => got,
            Err(end) => return end,
        };
        let full = kept + n == scratch.len();
        let (body, ended) = match &mut state.chunk {
            None => (n, false),
            Some(chunk) => match chunk.decode(&mut scratch[kept..kept + n]) {
                Ok(decoded) => decoded,
                Err(why) => return ReadEnd::Malformed(why),
            },
        };
        let (data, line) = state
            .events
            .parse(&mut scratch[..kept + body], &mut on_item);
        carry.clear();
        carry.extend_from_slice(&scratch[data]);
        carry.extend_from_slice(&scratch[line]);
        if ended {
            return ReadEnd::Eof;
        }
        if !full {
            return ReadEnd::Drained;
        }
    }
}

/// [`read_events`] over bytes already read (those that came with the
/// response head).
pub fn feed_events(
    state: &mut SseState,
    carry: &mut Vec<u8>,
    scratch: &mut [u8],
    mut bytes: &[u8],
    on_item: impl FnMut(Item<'_>),
) -> ReadEnd {
    read_events(
        state,
        carry,
        scratch,
        |buf| {
            let n = bytes.len().min(buf.len());
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            buf[..n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            Ok(n)
        },
        on_item,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{decode_tail, encode_payload, Tail, KIND_MEASURED};

    /// What came out of a stream, owned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Got {
        Event(String),
        Comment,
    }

    fn ev(data: &str) -> Got {
        Got::Event(data.into())
    }

    /// Feeds `stream` in pieces of the given sizes, one [`read_events`]
    /// call per piece (a piece larger than the buffer's room takes several
    /// reads within the call), then an EOF. Returns what came out and how
    /// the last call before the EOF ended.
    fn run(
        stream: &[u8],
        pieces: &[usize],
        chunked: bool,
        scratch_len: usize,
    ) -> (Vec<Got>, ReadEnd) {
        let mut state = SseState::new(chunked);
        let mut carry = Vec::new();
        let mut scratch = vec![0u8; scratch_len];
        let mut got = Vec::new();
        let mut pos = 0;
        let mut last = ReadEnd::Drained;
        for &size in pieces.iter().chain(std::iter::repeat(&usize::MAX)) {
            if pos >= stream.len() {
                break;
            }
            let piece = &stream[pos..stream.len().min(pos.saturating_add(size))];
            pos += piece.len();
            last = feed_events(&mut state, &mut carry, &mut scratch, piece, |item| {
                got.push(match item {
                    Item::Event(d) => Got::Event(String::from_utf8(d.to_vec()).unwrap()),
                    Item::Comment => Got::Comment,
                })
            });
            if !matches!(last, ReadEnd::Drained) {
                return (got, last);
            }
        }
        let eof = read_events(
            &mut state,
            &mut carry,
            &mut scratch,
            |_| Ok(0),
            |_| panic!("nothing after EOF"),
        );
        assert!(matches!(eof, ReadEnd::Eof), "{eof:?}");
        (got, last)
    }

    /// Every way of cutting `stream` into two pieces, and byte by byte,
    /// gives `want`.
    fn check_every_split(stream: &[u8], chunked: bool, want: &[Got]) {
        let (got, end) = run(stream, &[stream.len()], chunked, 4096);
        assert_eq!(got, want, "in one piece");
        assert!(matches!(end, ReadEnd::Drained | ReadEnd::Eof), "{end:?}");
        for cut in 1..stream.len() {
            let (got, _) = run(stream, &[cut, stream.len() - cut], chunked, 4096);
            assert_eq!(got, want, "cut at {cut}");
        }
        let (got, _) = run(stream, &vec![1; stream.len()], chunked, 4096);
        assert_eq!(got, want, "byte by byte");
    }

    /// `body` in chunked coding, `size` bytes a chunk, with an extension on
    /// every other chunk and a trailer field.
    fn chunked(body: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, c) in body.chunks(size).enumerate() {
            let ext = if i % 2 == 1 { ";x=y" } else { "" };
            out.extend_from_slice(format!("{:X}{ext}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
        out
    }

    const STREAM: &str = "retry: 3000\n\n\
        : heartbeat\n\
        id: 1\ndata: {\"channel\":\"c\",\"id\":\"1\"}\ndata: payload\n\n\
        event: gap\ndata:{\"gap\":true}\r\n\r\n\
        :\r\
        data\rdata:  two\rdata:\r\r\
        id: 2\nevent: x\nretry: 10\nunknown: y\nnocolon\n\n\
        data: last\n\n";

    fn stream_items() -> Vec<Got> {
        vec![
            Got::Comment,
            ev("{\"channel\":\"c\",\"id\":\"1\"}\npayload"),
            ev("{\"gap\":true}"),
            Got::Comment,
            ev("\n two\n"),
            ev("last"),
        ]
    }

    #[test]
    fn events_split_at_every_byte() {
        check_every_split(STREAM.as_bytes(), false, &stream_items());
    }

    #[test]
    fn chunked_body_split_at_every_byte() {
        for size in [1, 7, 64, STREAM.len()] {
            let body = chunked(STREAM.as_bytes(), size);
            // The trailer ends the body: an EOF.
            let (got, end) = run(&body, &[body.len()], true, 4096);
            assert_eq!(got, stream_items(), "chunks of {size}");
            assert!(matches!(end, ReadEnd::Eof), "{end:?}");
            if size == 7 {
                check_every_split(&body, true, &stream_items());
            }
        }
    }

    #[test]
    fn line_ends_crlf_lf_and_cr() {
        for end in ["\n", "\r\n", "\r"] {
            let s = ["data: a", "data:b", "", ": c", "data", "", ""].join(end);
            check_every_split(s.as_bytes(), false, &[ev("a\nb"), Got::Comment, ev("")]);
        }
        // "\n\r" is two line ends; "\r\n" one.
        check_every_split(b"data: a\n\rdata: b\r\n\r\n", false, &[ev("a"), ev("b")]);
    }

    #[test]
    fn multi_line_data_and_spaces() {
        let s = "data: one\ndata:two\ndata:  three\ndata\ndata: \n\n";
        check_every_split(s.as_bytes(), false, &[ev("one\ntwo\n three\n\n")]);
        // Only the field named exactly "data" counts.
        check_every_split(b"datum: x\ndata : y\nDATA: z\n\n", false, &[]);
        // A colon in the value is part of it.
        check_every_split(b"data: a:b: c\n\n", false, &[ev("a:b: c")]);
    }

    #[test]
    fn comments_and_fields_without_data_dispatch_nothing() {
        let s = ":hb\n: hb\n::\n\nid: 3\nevent: e\n\nretry: 5\n\n\n\n";
        check_every_split(
            s.as_bytes(),
            false,
            &[Got::Comment, Got::Comment, Got::Comment],
        );
    }

    #[test]
    fn unfinished_event_at_eof_is_dropped() {
        for tail in ["data: b\n", "data: b", "data: b\r", "data: b\r\n", ""] {
            let s = format!("data: a\n\n{tail}");
            let (got, end) = run(s.as_bytes(), &[s.len()], false, 4096);
            assert_eq!(got, vec![ev("a")], "{tail:?}");
            assert!(matches!(end, ReadEnd::Drained), "{end:?}");
        }
        // Also when the body's last chunk comes before the blank line.
        let body = chunked(b"data: a\n\ndata: b\n", 5);
        let (got, end) = run(&body, &[body.len()], true, 4096);
        assert_eq!(got, vec![ev("a")]);
        assert!(matches!(end, ReadEnd::Eof));
    }

    #[test]
    fn byte_order_mark_only_at_the_start() {
        let s = b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n";
        // The second BOM makes the line's field name something else.
        check_every_split(s, false, &[ev("a")]);
        let body = chunked(s, 1);
        check_every_split(&body, true, &[ev("a")]);
    }

    #[test]
    fn what_the_servers_send_carries_the_tail() {
        let tail = Tail {
            kind: KIND_MEASURED,
            channel: 3,
            seq: 77,
            sent_ns: 123_456_789,
        };
        let mut payload = Vec::new();
        encode_payload(&mut payload, 200, &tail);
        let meta = "{\"channel\":\"fanout-3\",\"id\":\"78\"}";
        let stream = format!(
            "retry: 2000\n\nid: 78\ndata: {meta}\ndata: {}\n\n: heartbeat\n\
             event: gap\ndata: {{\"channel\":\"fanout-3\",\"gap\":true}}\n\n",
            String::from_utf8(payload.clone()).unwrap()
        );
        let (got, _) = run(stream.as_bytes(), &[stream.len()], false, 4096);
        let Got::Event(data) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(data.len(), meta.len() + 1 + 200);
        assert_eq!(decode_tail(data.as_bytes()), Some(tail));
        assert_eq!(got[1], Got::Comment);
        let Got::Event(gap) = &got[2] else {
            panic!("{got:?}")
        };
        assert_eq!(decode_tail(gap.as_bytes()), None);
    }

    #[test]
    fn an_event_larger_than_the_buffer_is_an_error() {
        let big = format!("data: {}\n\n", "x".repeat(100));
        let (got, end) = run(big.as_bytes(), &[big.len()], false, 64);
        assert!(got.is_empty());
        assert!(matches!(end, ReadEnd::Oversized), "{end:?}");
        // Many data lines, each short: their joined data is what counts.
        let many = "data: 0123456789\n".repeat(10) + "\n";
        let (_, end) = run(many.as_bytes(), &[many.len()], false, 64);
        assert!(matches!(end, ReadEnd::Oversized), "{end:?}");
        // A stream of small events through a small buffer is fine.
        let small = "data: 0123456789\n\n".repeat(20);
        let (got, end) = run(small.as_bytes(), &[small.len()], false, 64);
        assert_eq!(got.len(), 20);
        assert!(matches!(end, ReadEnd::Drained), "{end:?}");
        // Chunk framing does not count against the buffer.
        let body = chunked(small.as_bytes(), 3);
        let (got, _) = run(&body, &[body.len()], true, 64);
        assert_eq!(got.len(), 20);
    }

    #[test]
    fn bad_chunked_coding_is_an_error() {
        for bad in [
            &b"zz\r\ndata"[..],
            b"\r\n",
            b"5\r\ndata: x\n\n",
            b"3\rx",
            b"11111111111111111\r\n",
        ] {
            let (_, end) = run(bad, &[bad.len()], true, 4096);
            assert!(matches!(end, ReadEnd::Malformed(_)), "{bad:?}: {end:?}");
        }
        // Bare LF line ends and upper- or lower-case sizes are taken.
        let ok = b"b\ndata: 123\n\n\nB\r\ndata: 456\n\n\r\n0\n\n";
        let (got, end) = run(ok, &[ok.len()], true, 4096);
        assert_eq!(got, vec![ev("123"), ev("456")]);
        assert!(matches!(end, ReadEnd::Eof));
    }

    #[test]
    fn the_state_is_small() {
        // It is kept per connection, a million of them at most.
        assert!(std::mem::size_of::<SseState>() <= 32);
    }
}
