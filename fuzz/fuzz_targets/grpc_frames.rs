//! `grpc::opening`, `grpc::next_message`, `grpc::decode_client_frame` and
//! `grpc::grpc_timeout` on any bytes (byte 0: the message size limit).
//!
//! Asserts: `opening` is `Http2` exactly when the input starts with the
//! preface, `Undecided` exactly when it is a shorter prefix of it; a
//! stream of messages read one after the other takes exactly the bytes of
//! each (head + length), never more than the input, each within the
//! limit, and a refusal comes with the status code its rule names; a
//! decoded client frame encodes back to bytes that decode to the same
//! frame; a timeout is at most 99,999,999 hours.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use protocol::grpc::{
    decode_client_frame, grpc_timeout, next_message, opening, Code, FrameError, Opening,
    MESSAGE_HEAD_BYTES, PREFACE,
};

fuzz_target!(|data: &[u8]| {
    let want = if data.starts_with(PREFACE) {
        Opening::Http2
    } else if PREFACE.starts_with(data) {
        Opening::Undecided
    } else {
        Opening::Http1
    };
    assert_eq!(opening(data), want);

    let Some((&knob, mut rest)) = data.split_first() else {
        return;
    };
    let max = usize::from(knob) * 4;
    loop {
        match next_message(rest, max) {
            Ok(Some((message, used))) => {
                assert_eq!(used, MESSAGE_HEAD_BYTES + message.len());
                assert!(used <= rest.len() && message.len() <= max);
                if let Ok(frame) = decode_client_frame(message) {
                    let again = decode_client_frame(&frame.encode_to_vec()).expect("re-decodes");
                    assert_eq!(again, frame);
                }
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => {
                assert!(rest.len() >= MESSAGE_HEAD_BYTES);
                match e {
                    FrameError::Compressed | FrameError::BadFlag => assert_eq!(e.code(), Code::Internal),
                    FrameError::TooLarge { len, max: m } => {
                        assert!(len > m && m == max);
                        assert_eq!(e.code(), Code::ResourceExhausted);
                    }
                }
                break;
            }
        }
    }
    if let Some(d) = grpc_timeout(data) {
        assert!(d <= std::time::Duration::from_secs(99_999_999 * 3600));
    }
});
