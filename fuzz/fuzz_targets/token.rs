//! `token::verify` on any string, against a key set with an HS256 key and
//! an audience: never a panic; what it accepts was signed with the key
//! (re-verifying with another secret under the same `kid` refuses it), has
//! not expired at `now`, and carries an expiry it reports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::token::{verify, KeySet, TokenError, TOKEN_BYTES_MAX};

const NOW: u64 = 1_800_000_000;

fn keys(secret: &[u8]) -> KeySet {
    let mut keys = KeySet::new();
    keys.add_hs256("k1", secret).unwrap();
    keys.set_audiences(&["gateway".to_string()]);
    keys
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let ours = keys(b"0123456789abcdef0123456789abcdef");
    match verify(token, &ours, NOW, 30) {
        Ok(grant) => {
            assert_eq!(grant.kid, "k1");
            assert!(grant.expires_at_s.saturating_add(30) >= NOW);
            let theirs = keys(b"fedcba9876543210fedcba9876543210");
            assert_eq!(verify(token, &theirs, NOW, 30).err(), Some(TokenError::BadSignature));
        }
        Err(TokenError::Missing) => assert!(token.is_empty()),
        Err(TokenError::TooLong) => assert!(token.len() > TOKEN_BYTES_MAX),
        Err(_) => {}
    }
});
