//! `ws::ServerSession::input` on any bytes: the first byte picks a split
//! point, the second the message size limit and whether permessage-deflate
//! was negotiated (compressed messages then decompressed with a shared
//! inflater), the rest is the client stream.
//! The stream fed whole, in two pieces split there, and one byte at a time
//! must give the same replies, the same messages and the same `Closing`; the
//! replies must be pongs then at most one close frame (present exactly when the
//! session ended, carrying its code); finished Text messages are UTF-8; input
//! after the end is ignored.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::deflate::Inflater;
use protocol::ws::{parse_close_payload, Closing, MessagePart, OpCode, ServerSession};

const LIMITS: [u64; 4] = [0, 10, 1000, 65_536];

/// Message parts with adjacent chunks merged, so chunkings can be compared.
#[derive(Debug, PartialEq, Eq)]
enum Part {
    Start(OpCode),
    Data(Vec<u8>),
    End,
}

struct Run {
    parts: Vec<Part>,
    out: Vec<u8>,
    closing: Option<Closing>,
}

fn run(max: u64, deflate: bool, pieces: &[&[u8]]) -> Run {
    let mut session = ServerSession::new(max);
    if deflate {
        session.accept_compressed();
    }
    let mut inflater = Inflater::default();
    let mut parts = Vec::new();
    let mut out = Vec::new();
    let mut closing = None;
    let mut on_message = |part: MessagePart<'_>, _: &mut Vec<u8>| match part {
        MessagePart::Start { opcode, .. } => parts.push(Part::Start(opcode)),
        MessagePart::Chunk(b) => match parts.last_mut() {
            Some(Part::Data(d)) => d.extend_from_slice(b),
            _ => parts.push(Part::Data(b.to_vec())),
        },
        MessagePart::End => parts.push(Part::End),
    };
    for piece in pieces {
        let end = session.input(
            &mut piece.to_vec(),
            &mut out,
            &mut inflater,
            &mut on_message,
        );
        assert_eq!(end, session.closing());
        if closing.is_some() {
            assert_eq!(end, closing, "closing changed");
        }
        closing = end;
    }
    if closing.is_some() {
        // Ended: more input changes nothing.
        let before = out.len();
        let mut late = vec![0x89, 0x80, 0, 0, 0, 0];
        let end = session.input(&mut late, &mut out, &mut inflater, &mut |_, _| {
            panic!("message after the end")
        });
        assert_eq!((end, out.len()), (closing, before));
    }
    Run {
        parts,
        out,
        closing,
    }
}

/// The replies are unmasked server frames: pongs, then one close frame iff
/// the session ended, echoing the client's code or carrying the violation's.
fn check_replies(r: &Run) {
    let mut rest = &r.out[..];
    let mut close = None;
    while !rest.is_empty() {
        assert!(close.is_none(), "frame after close");
        let len = usize::from(rest[1]);
        assert!(len <= 125);
        let (head, payload) = (rest[0], &rest[2..2 + len]);
        match head {
            0x8A => {}
            0x88 => close = Some(payload),
            _ => panic!("unexpected reply frame {head:02x}"),
        }
        rest = &rest[2 + len..];
    }
    match (r.closing, close) {
        (None, None) => {}
        (Some(Closing::PeerClosed { code: None }), Some([])) => {}
        (
            Some(Closing::PeerClosed { code: Some(c) }) | Some(Closing::Violation { code: c, .. }),
            Some(p),
        ) => {
            assert_eq!(parse_close_payload(p), Ok(Some((c, ""))))
        }
        (closing, close) => panic!("closing {closing:?} with close frame {close:?}"),
    }
}

/// Start, Data?, End per message; the bytes handed over are never over the
/// limit and, for Text, always a valid UTF-8 prefix, and valid UTF-8 at End.
fn check_messages(r: &Run, max: u64) {
    let mut open: Option<(OpCode, &[u8])> = None;
    for part in &r.parts {
        match (part, open) {
            (Part::Start(op), None) => {
                assert!(matches!(op, OpCode::Text | OpCode::Binary));
                open = Some((*op, &[]));
            }
            (Part::Data(d), Some((op, []))) => {
                assert!(d.len() as u64 <= max);
                if op == OpCode::Text {
                    let e = std::str::from_utf8(d).err();
                    assert!(
                        e.is_none_or(|e| e.error_len().is_none()),
                        "invalid text handed over"
                    );
                }
                open = Some((op, d));
            }
            (Part::End, Some((op, d))) => {
                assert!(op != OpCode::Text || std::str::from_utf8(d).is_ok());
                open = None;
            }
            _ => panic!("bad part order: {:?}", r.parts),
        }
    }
}

/// Same replies and ending; same parts, except that a text message cut by a
/// UTF-8 violation may have had more or fewer of its valid bytes handed over.
fn same(a: &Run, b: &Run) {
    assert_eq!(a.out, b.out);
    assert_eq!(a.closing, b.closing);
    if a.parts == b.parts {
        return;
    }
    assert!(
        matches!(
            a.closing,
            Some(Closing::Violation {
                code: 1007,
                rule: "text message is not UTF-8"
            })
        ),
        "{:?} / {:?}",
        a.parts,
        b.parts
    );
    let split = |p: &[Part]| match p {
        [rest @ .., Part::Data(d)] => (rest.len(), d.clone()),
        _ => (p.len(), Vec::new()),
    };
    let ((na, da), (nb, db)) = (split(&a.parts), split(&b.parts));
    assert_eq!(a.parts[..na], b.parts[..nb]);
    assert!(
        da.starts_with(&db) || db.starts_with(&da),
        "{da:?} / {db:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let [b0, b1, stream @ ..] = data else {
        return;
    };
    let max = LIMITS[usize::from(b1 & 3)];
    let deflate = b1 & 4 != 0;
    let k = usize::from(*b0) % (stream.len() + 1);
    let whole = run(max, deflate, &[stream]);
    check_replies(&whole);
    check_messages(&whole, max);
    same(&whole, &run(max, deflate, &[&stream[..k], &stream[k..]]));
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    same(&whole, &run(max, deflate, &bytes));
});
