//! `origin::Origins` on any allowlist and any `Origin` (the input's lines:
//! byte 0 picks credentials, the last line is the request's origin, the
//! others the allowlist): a list it accepts lets every exact entry in with
//! (in lowercase, as browsers send it) with its own CORS slot and answers
//! with lines naming that origin; no
//! `Origin` is always let in; an empty list lets everything in without
//! CORS; a refused origin's preflight carries no CORS header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::origin::{Origins, Verdict, PATTERN_SLOT};

fuzz_target!(|data: &[u8]| {
    let Some((&knob, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let origin = lines.pop().unwrap_or_default();
    lines.truncate(8);
    let Ok(origins) = Origins::new(&lines, knob & 1 == 1) else {
        return;
    };
    assert_eq!(origins.check(None), Verdict::Allowed { cors: 0 });
    if lines.is_empty() {
        assert!(!origins.is_on());
        assert_eq!(origins.check(Some(&origin)), Verdict::Allowed { cors: 0 });
        return;
    }
    for entry in &lines {
        if entry == "*" || entry.contains("://*.") {
            continue;
        }
        // Entries are kept in lowercase, as browsers serialise an origin.
        let entry = &entry.to_ascii_lowercase();
        match origins.check(Some(entry)) {
            Verdict::Allowed { cors } => {
                assert!(cors != 0 && cors != PATTERN_SLOT, "{entry:?}: slot {cors}");
                let lines = origins.cors_lines(cors);
                assert!(lines.contains(entry.as_str()) || lines.contains("Origin: *"));
            }
            Verdict::Refused => panic!("listed origin {entry:?} refused"),
        }
    }
    match origins.check(Some(&origin)) {
        Verdict::Allowed { cors } => {
            let cors_lines = origins.cors_lines_for(cors, Some(&origin));
            assert!(cors_lines.is_empty() || cors_lines.ends_with("\r\n"));
        }
        Verdict::Refused => {
            let answer = origins.preflight_response(Some(&origin), true);
            let text = String::from_utf8_lossy(&answer);
            assert!(!text.contains("Access-Control-Allow-Origin"), "{text}");
        }
    }
});
