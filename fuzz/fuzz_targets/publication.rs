//! `publication::check_frames` on any frames (the input split at 0xFF
//! bytes, at most four frames; byte 0 picks small or default limits): what
//! it accepts is what the gateway can deliver faithfully, and each refusal
//! names the first rule the frames break.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::channel::valid_channel_name;
use protocol::id::GATEWAY_ID_FLOOR;
use protocol::limits::EVENT_NAME_BYTES_MAX;
use protocol::publication::{check_frames, PublicationError, PublicationLimits};

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let limits = if knob & 1 == 0 {
        PublicationLimits {
            channel_name_bytes_max: 128,
            payload_bytes_max: 1024 * 1024,
        }
    } else {
        PublicationLimits {
            channel_name_bytes_max: 8,
            payload_bytes_max: 16,
        }
    };
    let frames: Vec<&[u8]> = rest.splitn(5, |&b| b == 0xFF).collect();
    match check_frames(&frames, &limits) {
        Ok(c) => {
            assert!(frames.len() == 2 || frames.len() == 3);
            assert!(valid_channel_name(c.channel.as_bytes(), limits.channel_name_bytes_max));
            assert_eq!(c.channel.as_bytes(), frames[0]);
            assert_eq!(c.payload, frames[1]);
            assert!(c.payload.len() <= limits.payload_bytes_max);
            if let Some(id) = c.id {
                assert!(id > 0 && id < GATEWAY_ID_FLOOR);
            }
            if let Some(event) = &c.event {
                assert!(!event.is_empty() && event.len() <= EVENT_NAME_BYTES_MAX);
                assert!(event.bytes().all(|b| b.is_ascii_graphic()));
            }
            if frames.len() == 2 {
                assert!(c.id.is_none() && c.event.is_none());
            }
        }
        Err(PublicationError::WrongFrameCount(n)) => {
            assert_eq!(n, frames.len());
            assert!(n != 2 && n != 3);
        }
        Err(PublicationError::BadChannelName) => {
            assert!(!valid_channel_name(frames[0], limits.channel_name_bytes_max));
        }
        Err(PublicationError::PayloadTooLarge { size, max_size }) => {
            assert!(valid_channel_name(frames[0], limits.channel_name_bytes_max));
            assert_eq!((size, max_size), (frames[1].len(), limits.payload_bytes_max));
            assert!(size > max_size);
        }
        Err(
            PublicationError::BadMeta(_)
            | PublicationError::BadEventName
            | PublicationError::BadId,
        ) => {
            // Only the meta frame can break these.
            assert_eq!(frames.len(), 3);
            assert!(frames[1].len() <= limits.payload_bytes_max);
        }
    }
});
