//! `proxy::parse_proxy_header` on any bytes (the input is the connection's
//! first bytes, as they arrived).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::limits::{PROXY_V1_BYTES_MAX, PROXY_V2_BYTES_MAX};
use protocol::proxy::{parse_proxy_header, ProxyError, ProxyParsed, V1_PREFIX, V2_SIGNATURE};

/// Whether `data` and `signature` agree on their common length.
fn matches_so_far(data: &[u8], signature: &[u8]) -> bool {
    let n = data.len().min(signature.len());
    data[..n] == signature[..n]
}

fuzz_target!(|data: &[u8]| {
    let answer = parse_proxy_header(data);

    // Refused as not PROXY protocol exactly when the bytes leave both
    // signatures (the oracle), so a client speaking something else is
    // answered at its first differing byte.
    let leaves_both = !matches_so_far(data, &V2_SIGNATURE) && !matches_so_far(data, V1_PREFIX);
    assert_eq!(answer == Err(ProxyError::NotProxyProtocol), leaves_both);

    // The prefixes answer Partial, then one answer that more bytes never
    // change (nothing past the longest header is looked at, so the prefixes
    // up to it are enough). In particular every prefix of a Complete header
    // is Partial, and an error is reported at the byte that breaks the rule.
    let mut settled = None;
    for end in 0..=data.len().min(PROXY_V2_BYTES_MAX + 1) {
        let got = parse_proxy_header(&data[..end]);
        match settled {
            None if got == Ok(ProxyParsed::Partial) => {}
            None => settled = Some((end, got)),
            Some((_, first)) => assert_eq!(got, first, "prefix of {end} bytes"),
        }
    }
    match settled {
        None => assert_eq!(answer, Ok(ProxyParsed::Partial)),
        Some((_, first)) => assert_eq!(answer, first),
    }

    match answer {
        Ok(ProxyParsed::Partial) => assert!(data.len() < PROXY_V2_BYTES_MAX),
        Ok(ProxyParsed::Complete {
            header_len,
            source,
            destination,
        }) => {
            assert!(header_len <= data.len());
            assert_eq!(settled.map(|(end, _)| end), Some(header_len));
            let header = &data[..header_len];
            assert_eq!(parse_proxy_header(header), answer);
            // Both addresses or neither, of one family.
            assert_eq!(source.is_some(), destination.is_some());
            if let (Some(s), Some(d)) = (source, destination) {
                assert_eq!(s.is_ipv4(), d.is_ipv4());
            }
            if header.starts_with(V1_PREFIX) {
                // One line, ended by its only CR and LF.
                assert!(header_len <= PROXY_V1_BYTES_MAX);
                assert!(header.ends_with(b"\r\n"));
                let line = &header[..header_len - 2];
                assert!(!line.iter().any(|&b| b == b'\r' || b == b'\n'));
                let unknown = line.starts_with(b"PROXY UNKNOWN");
                assert_eq!(source.is_none(), unknown);
                if let (Some(s), Some(d)) = (source, destination) {
                    // What a sender would write for these addresses (IPv6
                    // may be written in other forms, IPv4 and ports not).
                    let protocol = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                    if s.is_ipv4() {
                        let line_wanted = format!(
                            "PROXY {protocol} {} {} {} {}",
                            s.ip(),
                            d.ip(),
                            s.port(),
                            d.port()
                        );
                        assert_eq!(line, line_wanted.as_bytes());
                    } else {
                        assert!(line.starts_with(b"PROXY TCP6 "));
                        let ports = format!(" {} {}", s.port(), d.port());
                        assert!(line.ends_with(ports.as_bytes()));
                    }
                }
            } else {
                // 16 fixed bytes and the length they announce.
                assert!(header.starts_with(&V2_SIGNATURE));
                assert!(header_len <= PROXY_V2_BYTES_MAX);
                let len = u16::from_be_bytes([header[14], header[15]]);
                assert_eq!(header_len, 16 + usize::from(len));
                let (command, family) = (header[12], header[13]);
                assert!(command == 0x20 || command == 0x21);
                if let (Some(s), Some(d)) = (source, destination) {
                    // Only PROXY over IP carries addresses, as they are on
                    // the wire.
                    assert_eq!(command, 0x21);
                    let block = &header[16..];
                    let n = if s.is_ipv4() { 4 } else { 16 };
                    assert_eq!(family >> 4, if s.is_ipv4() { 1 } else { 2 });
                    let octets = |ip: std::net::IpAddr| match ip {
                        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
                        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
                    };
                    assert_eq!(block[..n], octets(s.ip())[..]);
                    assert_eq!(block[n..2 * n], octets(d.ip())[..]);
                    assert_eq!(block[2 * n..2 * n + 2], s.port().to_be_bytes());
                    assert_eq!(block[2 * n + 2..2 * n + 4], d.port().to_be_bytes());
                } else if command == 0x21 {
                    assert!([0x00, 0x31, 0x32].contains(&family));
                }
            }
        }
        Err(error) => assert!(!error.reason().is_empty()),
    }
});
