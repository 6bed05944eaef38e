//! Message ids: every message carries one, ordered per channel, and a
//! client resumes from the last it got (its cursor).
//!
//! A publisher may give its own (below [`GATEWAY_ID_FLOOR`]): then they are
//! the same on every gateway it feeds. Otherwise the gateway assigns them,
//! from a sequence of its own process (at or above the floor).

/// Ids this gateway issues are at or above this (2^56), and a publisher's
/// must be below it (ingest refuses others): a cursor at or above it is one a
/// gateway handed out, not a position in a publisher's sequence.
///
/// A gateway id is `counter << ID_TAG_BITS | tag`: the counter starts at the
/// process start time in milliseconds (so ids grow across restarts) and the
/// tag is drawn at random when the process starts. The tag is the epoch: a
/// cursor with another tag comes from another process (another gateway, or
/// an earlier run of this one), whose ids say nothing about this one's even
/// where the numbers overlap, and resuming from it is a gap.
pub const GATEWAY_ID_FLOOR: u64 = 1 << 56;
/// Low bits of a gateway id that hold its process's tag.
pub const ID_TAG_BITS: u32 = 16;
pub const ID_TAG_MASK: u64 = (1 << ID_TAG_BITS) - 1;

/// The first id of a process started at `start_ms` (Unix milliseconds) with
/// `tag`: at or above [`GATEWAY_ID_FLOOR`] for any start after 2004.
pub fn first_gateway_id(start_ms: u64, tag: u16) -> u64 {
    (start_ms.max(GATEWAY_ID_FLOOR >> ID_TAG_BITS) << ID_TAG_BITS) | tag as u64
}

/// A cursor into the gateway's message sequence: "every message after this id".
pub type Cursor = u64;

/// Parses a cursor (`since`, `Last-Event-ID`): a decimal u64, no sign, no
/// spaces, at most 20 digits.
pub fn parse_cursor(s: &[u8]) -> Option<Cursor> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}
