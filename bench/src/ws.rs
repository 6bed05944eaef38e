//! The client's view of the fan-out stream: the payload the publisher sends
//! (kind, channel, per-channel sequence number, send time), server WebSocket
//! frames read from a stream that arrives in arbitrary pieces, and loss /
//! reordering bookkeeping per connection.
//!
//! Everything here is on the per-frame path and kept cheap: no allocation, no
//! search through the frame (the payload's fields sit at a fixed distance
//! from its end, whatever the meta line before it is).

use std::io;

/// Bytes of the fixed-size tail every fan-out payload ends with:
/// kind (1), channel (8 hex), sequence number (8 hex), send time (16 hex).
pub const TAIL_LEN: usize = 33;
/// Largest payload fanout publishes (the read buffer holds a whole frame).
pub const PAYLOAD_BYTES_MAX: usize = 16 * 1024;
/// Read buffer per client thread; a frame must fit in it whole.
pub const READ_BUF_BYTES: usize = 64 * 1024;
/// A measured message.
pub const KIND_MEASURED: u8 = b'm';
/// A subscription probe (not measured).
pub const KIND_PROBE: u8 = b'p';

/// The fields at the end of a fan-out payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    pub kind: u8,
    pub channel: u32,
    pub seq: u32,
    /// CLOCK_MONOTONIC nanoseconds when the publisher sent it.
    pub sent_ns: u64,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut Vec<u8>, v: u64, digits: usize) {
    for i in (0..digits).rev() {
        out.push(HEX[((v >> (i * 4)) & 0xf) as usize]);
    }
}

/// Writes a payload of `payload_bytes` (at least [`TAIL_LEN`]) into `out`:
/// `.` filler, then the tail. All ASCII, so the servers send text frames.
pub fn encode_payload(out: &mut Vec<u8>, payload_bytes: usize, tail: &Tail) {
    out.clear();
    out.resize(payload_bytes.saturating_sub(TAIL_LEN), b'.');
    push_tail(out, tail);
}

fn push_tail(out: &mut Vec<u8>, tail: &Tail) {
    out.push(tail.kind);
    put_hex(out, tail.channel as u64, 8);
    put_hex(out, tail.seq as u64, 8);
    put_hex(out, tail.sent_ns, 16);
}

/// Like [`encode_payload`] with JSON before the tail instead of filler: an
/// array of price-like records whose numbers vary from message to message
/// (drawn from the tail's channel and sequence number), cut to size and
/// padded with spaces. It compresses like the JSON of a busy channel, not
/// like a run of one byte.
pub fn encode_json_payload(out: &mut Vec<u8>, payload_bytes: usize, tail: &Tail) {
    use std::io::Write as _;
    out.clear();
    let body = payload_bytes.saturating_sub(TAIL_LEN);
    let mut x = (u64::from(tail.channel) << 32 | u64::from(tail.seq)) | 1;
    let mut next = || {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    out.push(b'[');
    while out.len() < body {
        let (r, s) = (next(), next());
        let bid = 10_000 + r % 90_000;
        let _ = write!(
            out,
            "{{\"symbol\":\"SYM{:03}\",\"bid\":{}.{:02},\"ask\":{}.{:02},\"size\":{},\"venue\":\"{}\",\"ts\":{}}},",
            r % 500,
            bid / 100,
            bid % 100,
            (bid + 1 + s % 20) / 100,
            (bid + 1 + s % 20) % 100,
            100 * (1 + s % 50),
            ["XNAS", "XNYS", "ARCX", "BATS"][(s >> 8) as usize % 4],
            1_700_000_000_000 + (s >> 16) % 100_000_000,
        );
    }
    out.truncate(body);
    if let Some(last) = out.last_mut() {
        *last = b']';
    }
    out.resize(body, b' ');
    push_tail(out, tail);
}

#[inline]
fn hex_value(bytes: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for &b in bytes {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | d as u64;
    }
    Some(v)
}

/// The tail of a frame's content (meta line, `\n`, payload), or `None` when
/// the content does not end like a fan-out payload (a gap notice, a foreign
/// publication, a mangled payload).
#[inline]
pub fn decode_tail(content: &[u8]) -> Option<Tail> {
    // At least one byte of meta line and its newline before the payload.
    if content.len() < TAIL_LEN + 2 {
        return None;
    }
    let tail = read_tail(content)?;
    (tail.kind == KIND_MEASURED || tail.kind == KIND_PROBE).then_some(tail)
}

/// The tail at the end of `bytes` whatever its kind byte (an ASCII
/// letter): roundtrip has kinds of its own and reads the tail from a bare
/// payload or from the `ref` an acknowledgement echoes.
#[inline]
pub fn read_tail(bytes: &[u8]) -> Option<Tail> {
    let t = bytes.get(bytes.len().checked_sub(TAIL_LEN)?..)?;
    let kind = t[0];
    if !kind.is_ascii_alphabetic() {
        return None;
    }
    Some(Tail {
        kind,
        channel: hex_value(&t[1..9])? as u32,
        seq: hex_value(&t[9..17])? as u32,
        sent_ns: hex_value(&t[17..33])?,
    })
}

/// Appends a masked client frame (FIN set) of any length to `out`: what
/// roundtrip's clients send.
pub fn append_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// A WebSocket frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    /// RSV1: a message compressed with permessage-deflate.
    pub compressed: bool,
    pub opcode: u8,
    pub masked: bool,
    /// Header bytes, mask key included.
    pub header_len: usize,
    pub payload_len: usize,
}

impl FrameHead {
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not even the whole header yet.
    Incomplete,
    /// The header (the payload may not all be there yet).
    Head(FrameHead),
    /// A 64-bit length with its top bit set (forbidden by RFC 6455).
    Invalid,
}

/// Parses the header at the start of `buf` (7-, 16- and 64-bit lengths,
/// masked or not).
#[inline]
pub fn parse_head(buf: &[u8]) -> Parsed {
    if buf.len() < 2 {
        return Parsed::Incomplete;
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (mut header_len, payload_len) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Parsed::Incomplete;
            }
            (4, u16::from_be_bytes([buf[2], buf[3]]) as u64)
        }
        127 => {
            if buf.len() < 10 {
                return Parsed::Incomplete;
            }
            let n = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if n >> 63 != 0 {
                return Parsed::Invalid;
            }
            (10, n)
        }
        n => (2, n as u64),
    };
    if masked {
        header_len += 4;
    }
    if buf.len() < header_len {
        return Parsed::Incomplete;
    }
    Parsed::Head(FrameHead {
        fin: b0 & 0x80 != 0,
        compressed: b0 & 0x40 != 0,
        opcode: b0 & 0x0f,
        masked,
        header_len,
        payload_len: usize::try_from(payload_len).unwrap_or(usize::MAX / 2),
    })
}

/// How a [`read_frames`] (or the SSE reader's) call ended.
#[derive(Debug)]
pub enum ReadEnd {
    /// Everything readable now was read (a short read, or would block).
    Drained,
    /// The peer closed the connection (or ended an SSE response body).
    Eof,
    /// recv failed (a reset, mostly).
    Error(io::Error),
    /// A frame (an SSE event) that cannot fit the read buffer, or an
    /// invalid length.
    Oversized,
    /// Framing the reader cannot follow (bad HTTP chunked coding), and why.
    Malformed(&'static str),
}

/// One read (`read`, e.g. a nonblocking recv) into `scratch` behind the
/// bytes `carry` kept from the previous one: how many were kept and how
/// many came, or how the reading ended (an interrupted read is retried).
pub fn read_behind(
    carry: &[u8],
    scratch: &mut [u8],
    read: &mut impl FnMut(&mut [u8]) -> io::Result<usize>,
) -> Result<(usize, usize), ReadEnd> {
    loop {
        let kept = carry.len();
        if kept >= scratch.len() {
            return Err(ReadEnd::Oversized);
        }
        scratch[..kept].copy_from_slice(carry);
        return match read(&mut scratch[kept..]) {
            Ok(0) => Err(ReadEnd::Eof),
            Ok(n) => Ok((kept, n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(ReadEnd::Drained),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(ReadEnd::Error(e)),
        };
    }
}

/// Reads from a socket (`read`, e.g. a nonblocking recv) into `scratch`
/// behind the unfinished frame carried over from the previous read, hands
/// each complete frame (header, payload) to `on_frame`, and keeps what is
/// left of an unfinished frame in `carry`. Loops until a read comes back
/// short (no need to ask again: epoll is level-triggered) or would block.
pub fn read_frames(
    carry: &mut Vec<u8>,
    scratch: &mut [u8],
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    mut on_frame: impl FnMut(&FrameHead, &[u8]),
) -> ReadEnd {
    loop {
        let (kept, n) = match read_behind(carry, scratch, &mut read) {
            Ok(got) => got,
            Err(end) => return end,
        };
        let total = kept + n;
        carry.clear();
        let mut off = 0;
        while off < total {
            match parse_head(&scratch[off..total]) {
                Parsed::Incomplete => break,
                Parsed::Invalid => return ReadEnd::Oversized,
                Parsed::Head(h) => {
                    if h.total_len() > scratch.len() {
                        return ReadEnd::Oversized;
                    }
                    if off + h.total_len() > total {
                        break;
                    }
                    let start = off + h.header_len;
                    on_frame(&h, &scratch[start..start + h.payload_len]);
                    off += h.total_len();
                }
            }
        }
        carry.extend_from_slice(&scratch[off..total]);
        if total < scratch.len() {
            return ReadEnd::Drained;
        }
    }
}

/// Hands each complete frame already in `buf` to `on_frame` and returns how
/// many bytes they took (the rest is an unfinished frame). For bytes that
/// arrived with the handshake's response head.
pub fn split_frames(buf: &[u8], mut on_frame: impl FnMut(&FrameHead, &[u8])) -> usize {
    let mut off = 0;
    while let Parsed::Head(h) = parse_head(&buf[off..]) {
        if off + h.total_len() > buf.len() {
            break;
        }
        let start = off + h.header_len;
        on_frame(&h, &buf[start..start + h.payload_len]);
        off += h.total_len();
    }
    off
}

/// A masked client frame (FIN set) with `payload` (under 126 bytes: control
/// frames), for answering pings.
pub fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let len = payload.len().min(125);
    let mut f = Vec::with_capacity(6 + len);
    f.push(0x80 | opcode);
    f.push(0x80 | len as u8);
    f.extend_from_slice(&mask);
    f.extend(
        payload[..len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4]),
    );
    f
}

/// Sequence bookkeeping for one connection on one channel, whose messages
/// are numbered 0, 1, 2, … by the publisher. 24 bytes: it exists once per
/// connection, so at a million connections it stays small.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTally {
    /// Distinct messages received.
    pub received: u32,
    /// One past the highest sequence number seen.
    pub next: u32,
    /// Messages that came after one with a higher number.
    pub out_of_order: u32,
    /// Messages received twice (recognised within the last 64 numbers).
    pub duplicates: u32,
    /// Bit i: `next - 1 - i` was received.
    window: u64,
}

impl SeqTally {
    #[inline]
    pub fn observe(&mut self, seq: u32) {
        if seq >= self.next {
            let shift = seq - self.next + 1;
            self.window = if shift >= 64 { 0 } else { self.window << shift } | 1;
            self.next = seq + 1;
            self.received += 1;
        } else {
            let back = self.next - 1 - seq;
            if back < 64 {
                let bit = 1u64 << back;
                if self.window & bit != 0 {
                    self.duplicates += 1;
                    return;
                }
                self.window |= bit;
            }
            self.out_of_order += 1;
            self.received += 1;
        }
    }

    /// Messages of the `sent` published on the channel that never arrived.
    pub fn missing(&self, sent: u32) -> u32 {
        sent.saturating_sub(self.received)
    }

    /// Of those, the ones after the last that arrived (still on their way
    /// when the run ended, or lost at the end).
    pub fn missing_at_end(&self, sent: u32) -> u32 {
        sent.saturating_sub(self.next)
    }
}

/// Loss and reordering over all connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossSummary {
    /// Connections counted.
    pub connections: u64,
    /// Σ messages published on each connection's channel.
    pub expected: u64,
    /// Σ distinct messages received.
    pub received: u64,
    pub missing: u64,
    /// Of `missing`: gaps before the last message each connection received.
    pub missing_in_gaps: u64,
    /// Of `missing`: after the last message each connection received.
    pub missing_at_end: u64,
    pub out_of_order: u64,
    pub duplicates: u64,
    /// Sequence numbers at or past what was published (should not happen).
    pub beyond_published: u64,
    pub connections_with_loss: u64,
    pub connections_reordered: u64,
}

impl LossSummary {
    /// What went wrong: missing, reordered and duplicated deliveries,
    /// counted over `per` (connections, streams).
    pub fn errors(&self, per: &str) -> Vec<String> {
        let mut e = Vec::new();
        if self.missing > 0 {
            e.push(format!(
                "{} of {} expected deliveries missing on {} {per} ({} in gaps, {} at the end)",
                self.missing,
                self.expected,
                self.connections_with_loss,
                self.missing_in_gaps,
                self.missing_at_end
            ));
        }
        if self.out_of_order > 0 {
            e.push(format!(
                "{} deliveries out of order on {} {per}",
                self.out_of_order, self.connections_reordered
            ));
        }
        if self.duplicates > 0 {
            e.push(format!("{} duplicate deliveries", self.duplicates));
        }
        e
    }
}

/// Sums [`SeqTally`]s (each with its channel) against what was published
/// on each channel.
pub fn summarize<'a>(
    tallies: impl IntoIterator<Item = (u32, &'a SeqTally)>,
    sent_per_channel: &[u32],
) -> LossSummary {
    let mut s = LossSummary::default();
    for (channel, t) in tallies {
        let sent = sent_per_channel.get(channel as usize).copied().unwrap_or(0);
        let missing = t.missing(sent) as u64;
        let at_end = t.missing_at_end(sent) as u64;
        s.connections += 1;
        s.expected += sent as u64;
        s.received += t.received as u64;
        s.missing += missing;
        s.missing_at_end += at_end.min(missing);
        s.missing_in_gaps += missing - at_end.min(missing);
        s.out_of_order += t.out_of_order as u64;
        s.duplicates += t.duplicates as u64;
        s.beyond_published += t.next.saturating_sub(sent) as u64;
        s.connections_with_loss += (missing > 0) as u64;
        s.connections_reordered += (t.out_of_order > 0) as u64;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    fn content(channel: &str, id: u64, payload: &[u8]) -> Vec<u8> {
        let mut c = format!("{{\"channel\":\"{channel}\",\"id\":\"{id}\"}}\n").into_bytes();
        c.extend_from_slice(payload);
        c
    }

    #[test]
    fn payload_round_trip() {
        let tail = Tail {
            kind: KIND_MEASURED,
            channel: 99,
            seq: 0xdead_beef,
            sent_ns: 1_795_818_537_400_506_123,
        };
        let mut p = Vec::new();
        encode_payload(&mut p, TAIL_LEN, &tail);
        assert_eq!(p.len(), TAIL_LEN);
        assert!(p.is_ascii());
        assert_eq!(decode_tail(&content("fanout-99", 1, &p)), Some(tail));
        encode_payload(&mut p, 300, &tail);
        assert_eq!(p.len(), 300);
        assert!(p.starts_with(b"...."));
        assert_eq!(decode_tail(&content("fanout-99", 1, &p)), Some(tail));
        let probe = Tail {
            kind: KIND_PROBE,
            ..tail
        };
        encode_payload(&mut p, TAIL_LEN, &probe);
        assert_eq!(decode_tail(&content("c", 1, &p)).unwrap().kind, KIND_PROBE);
    }

    #[test]
    fn foreign_content_is_not_a_tail() {
        assert_eq!(decode_tail(b"{\"channel\":\"news\",\"gap\":true}\n"), None);
        assert_eq!(decode_tail(b""), None);
        let mut p = Vec::new();
        encode_payload(
            &mut p,
            TAIL_LEN,
            &Tail {
                kind: KIND_MEASURED,
                channel: 1,
                seq: 2,
                sent_ns: 3,
            },
        );
        // The bare payload without a meta line before it is too short.
        assert_eq!(decode_tail(&p), None);
        let mut bad = content("c", 1, &p);
        let n = bad.len();
        bad[n - 1] = b'G';
        assert_eq!(decode_tail(&bad), None);
        let mut bad = content("c", 1, &p);
        bad[n - TAIL_LEN] = b'x';
        assert_eq!(decode_tail(&bad), None);
    }

    #[test]
    fn a_json_payload_is_its_size_ends_with_its_tail_and_compresses_like_json() {
        let tail = Tail {
            kind: KIND_MEASURED,
            channel: 3,
            seq: 41,
            sent_ns: 123_456_789,
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        encode_json_payload(&mut a, 1024, &tail);
        encode_json_payload(&mut b, 1024, &Tail { seq: 42, ..tail });
        assert_eq!(a.len(), 1024);
        assert!(
            a.starts_with(b"[{\"symbol\":\"SYM"),
            "{}",
            String::from_utf8_lossy(&a)
        );
        assert_eq!(decode_tail(&[b"{}\n", &a[..]].concat()), Some(tail));
        assert_ne!(
            a[..900],
            b[..900],
            "the numbers change from message to message"
        );
        let mut compressed = Vec::new();
        protocol::deflate::Deflater::default().compress(
            &a,
            protocol::deflate::Window::Full,
            &mut compressed,
        );
        assert!(
            (300..600).contains(&compressed.len()),
            "{} bytes compressed",
            compressed.len()
        );
    }

    #[test]
    fn headers_with_every_length_form() {
        assert_eq!(parse_head(&[]), Parsed::Incomplete);
        assert_eq!(parse_head(&[0x81]), Parsed::Incomplete);
        let small = server_frame(1, b"hello");
        assert_eq!(
            parse_head(&small),
            Parsed::Head(FrameHead {
                fin: true,
                compressed: false,
                opcode: 1,
                masked: false,
                header_len: 2,
                payload_len: 5
            })
        );
        let mid = server_frame(2, &[7u8; 300]);
        assert_eq!(parse_head(&mid[..3]), Parsed::Incomplete);
        match parse_head(&mid) {
            Parsed::Head(h) => {
                assert_eq!((h.opcode, h.header_len, h.payload_len), (2, 4, 300))
            }
            other => panic!("{other:?}"),
        }
        let big = server_frame(1, &vec![b'a'; 70_000]);
        assert_eq!(parse_head(&big[..9]), Parsed::Incomplete);
        match parse_head(&big) {
            Parsed::Head(h) => assert_eq!((h.header_len, h.payload_len), (10, 70_000)),
            other => panic!("{other:?}"),
        }
        // Top bit of a 64-bit length.
        let mut bogus = vec![0x81, 127];
        bogus.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_head(&bogus), Parsed::Invalid);
        // Masked (not what a server sends, but parsed): 4 more header bytes.
        let masked = client_frame(9, b"ping", [1, 2, 3, 4]);
        match parse_head(&masked) {
            Parsed::Head(h) => {
                assert!(h.masked && h.fin);
                assert_eq!((h.opcode, h.header_len, h.payload_len), (9, 6, 4));
                let unmasked: Vec<u8> = masked[6..]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4])
                    .collect();
                assert_eq!(unmasked, b"ping");
            }
            other => panic!("{other:?}"),
        }
        // Not FIN: a fragment.
        let mut frag = server_frame(1, b"x");
        frag[0] &= 0x7f;
        assert!(matches!(parse_head(&frag), Parsed::Head(h) if !h.fin));
    }

    /// Feeds `stream` to `read_frames` in pieces of the given sizes (one
    /// piece per read), the way a socket would hand it over.
    fn frames_from_pieces(
        stream: &[u8],
        pieces: &[usize],
        scratch_len: usize,
    ) -> (Vec<(u8, Vec<u8>)>, Vec<u8>) {
        let mut carry = Vec::new();
        let mut scratch = vec![0u8; scratch_len];
        let mut got = Vec::new();
        let mut pos = 0;
        for &size in pieces {
            let piece = &stream[pos..(pos + size).min(stream.len())];
            pos += piece.len();
            let mut given = false;
            let mut rest = piece;
            // A piece may be larger than what one read takes: the loop in
            // read_frames reads again after a full read.
            let end = read_frames(
                &mut carry,
                &mut scratch,
                |buf| {
                    if rest.is_empty() && given {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    given = true;
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    if n == 0 {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(n)
                    }
                },
                |h, p| got.push((h.opcode, p.to_vec())),
            );
            assert!(matches!(end, ReadEnd::Drained), "{end:?}");
            assert!(rest.is_empty());
        }
        (got, carry)
    }

    #[test]
    fn frames_split_across_reads_at_every_byte() {
        let frames: Vec<Vec<u8>> = vec![
            server_frame(1, &content("fanout-0", 1, b"first")),
            server_frame(2, &[0u8; 200]),
            server_frame(9, b"ping!"),
            server_frame(1, &vec![b'z'; 1000]),
            server_frame(1, b""),
        ];
        let stream: Vec<u8> = frames.concat();
        let want: Vec<(u8, Vec<u8>)> = frames
            .iter()
            .map(|f| match parse_head(f) {
                Parsed::Head(h) => (h.opcode, f[h.header_len..].to_vec()),
                _ => unreachable!(),
            })
            .collect();
        // Everything at once, then every split into two pieces, then
        // byte by byte.
        let (got, carry) = frames_from_pieces(&stream, &[stream.len()], 4096);
        assert_eq!(got, want);
        assert!(carry.is_empty());
        for cut in 1..stream.len() {
            let (got, carry) = frames_from_pieces(&stream, &[cut, stream.len() - cut], 4096);
            assert_eq!(got, want, "cut at {cut}");
            assert!(carry.is_empty());
        }
        let ones = vec![1; stream.len()];
        let (got, carry) = frames_from_pieces(&stream, &ones, 4096);
        assert_eq!(got, want);
        assert!(carry.is_empty());
        // A read buffer smaller than the stream (but larger than any frame):
        // full reads loop, frames straddle buffer ends.
        let (got, _) = frames_from_pieces(&stream, &[stream.len()], 1100);
        assert_eq!(got, want);
        // An unfinished frame stays in carry.
        let (got, carry) = frames_from_pieces(&stream[..stream.len() - 1], &[stream.len()], 4096);
        assert_eq!(got.len(), 4);
        assert_eq!(carry, frames[4][..1].to_vec());
    }

    #[test]
    fn oversized_eof_and_errors() {
        let mut carry = Vec::new();
        let mut scratch = vec![0u8; 64];
        let big = server_frame(1, &[b'a'; 100]);
        let mut once = Some(big.clone());
        let end = read_frames(
            &mut carry,
            &mut scratch,
            |buf| match once.take() {
                Some(b) => {
                    let n = b.len().min(buf.len());
                    buf[..n].copy_from_slice(&b[..n]);
                    Ok(n)
                }
                None => Err(io::ErrorKind::WouldBlock.into()),
            },
            |_, _| panic!("no frame fits"),
        );
        assert!(matches!(end, ReadEnd::Oversized), "{end:?}");
        carry.clear();
        let end = read_frames(&mut carry, &mut scratch, |_| Ok(0), |_, _| {});
        assert!(matches!(end, ReadEnd::Eof));
        let end = read_frames(
            &mut carry,
            &mut scratch,
            |_| Err(io::ErrorKind::ConnectionReset.into()),
            |_, _| {},
        );
        assert!(matches!(end, ReadEnd::Error(e) if e.kind() == io::ErrorKind::ConnectionReset));
        // Would-block keeps the carried bytes.
        carry.extend_from_slice(&[0x81, 10, b'a']);
        let end = read_frames(
            &mut carry,
            &mut scratch,
            |_| Err(io::ErrorKind::WouldBlock.into()),
            |_, _| {},
        );
        assert!(matches!(end, ReadEnd::Drained));
        assert_eq!(carry, vec![0x81, 10, b'a']);
    }

    #[test]
    fn frames_after_the_handshake_head() {
        let a = server_frame(1, b"one");
        let b = server_frame(1, b"two");
        let mut buf = [a.clone(), b.clone()].concat();
        buf.extend_from_slice(&b[..2]);
        let mut got = Vec::new();
        let used = split_frames(&buf, |_, p| got.push(p.to_vec()));
        assert_eq!(used, a.len() + b.len());
        assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(split_frames(&[], |_, _| panic!()), 0);
    }

    #[test]
    fn in_order_delivery_has_no_loss() {
        let mut t = SeqTally::default();
        for s in 0..1000 {
            t.observe(s);
        }
        assert_eq!(t.received, 1000);
        assert_eq!(t.next, 1000);
        assert_eq!((t.out_of_order, t.duplicates), (0, 0));
        assert_eq!(t.missing(1000), 0);
        // Two more were published than arrived: lost (or late) at the end.
        assert_eq!(t.missing(1002), 2);
        assert_eq!(t.missing_at_end(1002), 2);
    }

    #[test]
    fn gaps_late_arrivals_and_duplicates() {
        let mut t = SeqTally::default();
        for s in [0, 1, 2, 5, 6, 3, 6, 9] {
            t.observe(s);
        }
        // 4, 7, 8 never came; 3 came late (out of order); 6 came twice.
        assert_eq!(t.received, 7);
        assert_eq!(t.next, 10);
        assert_eq!(t.out_of_order, 1);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.missing(10), 3);
        assert_eq!(t.missing_at_end(10), 0);
        assert_eq!(t.missing(12), 5);
        assert_eq!(t.missing_at_end(12), 2);
        // Filling a gap far behind (beyond the 64-number window) still
        // counts as out of order; a duplicate that old cannot be told apart.
        let mut t = SeqTally::default();
        t.observe(0);
        t.observe(200);
        t.observe(1);
        t.observe(199);
        t.observe(199);
        assert_eq!(t.out_of_order, 2);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.received, 4);
        // A jump of exactly 64 and one past it.
        let mut t = SeqTally::default();
        t.observe(0);
        t.observe(64);
        t.observe(0);
        assert_eq!(t.out_of_order, 1, "0 is 64 behind: out of the window");
        let mut t = SeqTally::default();
        t.observe(0);
        t.observe(63);
        t.observe(0);
        assert_eq!(t.duplicates, 1, "0 is 63 behind: still in the window");
    }

    #[test]
    fn summary_over_connections_and_channels() {
        let mut a = SeqTally::default();
        let mut b = SeqTally::default();
        let mut c = SeqTally::default();
        for s in 0..10 {
            a.observe(s);
        }
        for s in [0, 2, 1, 3] {
            b.observe(s);
        }
        for s in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] {
            c.observe(s);
        }
        // Channel 0: 10 published; channel 1: 6 published.
        let s = summarize([(0, &a), (1, &b), (1, &c)], &[10, 6]);
        assert_eq!(s.connections, 3);
        assert_eq!(s.expected, 22);
        assert_eq!(s.received, 10 + 4 + 12);
        assert_eq!(s.missing, 2);
        assert_eq!(s.missing_at_end, 2);
        assert_eq!(s.missing_in_gaps, 0);
        assert_eq!(s.out_of_order, 1);
        assert_eq!(s.connections_with_loss, 1);
        assert_eq!(s.connections_reordered, 1);
        assert_eq!(
            s.beyond_published, 6,
            "c saw 6..11, never published on channel 1"
        );
        assert_eq!(summarize([], &[5]), LossSummary::default());
    }

    #[test]
    fn client_frames_of_every_length_unmask_to_their_payload() {
        for len in [0usize, 1, 125, 126, 300, 0xffff, 0x10000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut f = vec![9u8]; // appended behind what is there
            append_client_frame(&mut f, 1, &payload, [0xde, 0xad, 0xbe, 0xef]);
            let Parsed::Head(h) = parse_head(&f[1..]) else {
                panic!("{len}")
            };
            assert!(h.masked && h.fin && h.opcode == 1, "{len}");
            assert_eq!((h.payload_len, h.total_len()), (len, f.len() - 1));
            let unmasked: Vec<u8> = f[1 + h.header_len..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [0xde, 0xad, 0xbe, 0xef][i % 4])
                .collect();
            assert_eq!(unmasked, payload, "{len}");
        }
        // The short form is the control frame's.
        let mut f = Vec::new();
        append_client_frame(&mut f, 10, b"abc", [1, 2, 3, 4]);
        assert_eq!(f, client_frame(10, b"abc", [1, 2, 3, 4]));
    }

    #[test]
    fn tails_of_any_kind() {
        let tail = Tail {
            kind: b's',
            channel: 7,
            seq: 9,
            sent_ns: 11,
        };
        let mut p = Vec::new();
        encode_payload(&mut p, 40, &tail);
        assert_eq!(read_tail(&p), Some(tail));
        assert_eq!(
            decode_tail(&content("c", 1, &p)),
            None,
            "not a fan-out kind"
        );
        assert_eq!(read_tail(&p[1..]), Some(tail), "filler is not read");
        assert_eq!(read_tail(&p[..p.len() - 1]), None);
        assert_eq!(read_tail(b""), None);
        let at = p.len() - TAIL_LEN;
        p[at] = b'7';
        assert_eq!(read_tail(&p), None, "a kind is a letter");
    }

    #[test]
    fn pong_frames_are_masked() {
        let f = client_frame(10, b"abc", [0, 0, 0, 0]);
        assert_eq!(f, vec![0x8a, 0x83, 0, 0, 0, 0, b'a', b'b', b'c']);
        let f = client_frame(10, &[1u8; 200], [9, 9, 9, 9]);
        assert_eq!(f[1], 0x80 | 125, "control payloads are at most 125 bytes");
    }
}
