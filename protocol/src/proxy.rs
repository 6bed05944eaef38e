//! PROXY protocol headers, versions 1 (text) and 2 (binary), as HAProxy's
//! "proxy-protocol.txt" defines them: a proxy in front of the gateway writes
//! one at the start of each connection to say who the client really is.
//!
//! [`parse_proxy_header`] takes the bytes received so far and answers
//! [`ProxyParsed::Partial`] (call again with more), [`ProxyParsed::Complete`]
//! (the header's length and addresses; the bytes after it are the client's)
//! or a [`ProxyError`]. It fails as early as the bytes allow (spec §2.1: "abort
//! the connection as soon as possible"): a buffer that cannot become either
//! signature is refused at its first differing byte, and a v1 line or v2
//! header at the first byte that breaks a rule, before the rest arrives.
//! Once an answer is not `Partial`, more bytes never change it.
//!
//! Choices where the spec leaves room:
//! - v1 is strict: single spaces, `TCP4`/`TCP6` addresses of that family in
//!   their canonical form (no leading zeros in IPv4 numbers or ports, which
//!   the spec forbids; IPv6 as `std` parses it, so `::` compression and a
//!   trailing dotted IPv4 such as `::ffff:192.0.2.1`, which `inet_ntop`
//!   writes, are accepted), ports 0–65535 in decimal digits only. The line
//!   ends at its first CR or LF, which must start the CRLF: a bare CR or LF is
//!   refused (§2.1). After `UNKNOWN` anything up to the CRLF is ignored.
//! - v2 `LOCAL` (health checks from the proxy) is accepted with no addresses,
//!   whatever its family byte and address block say: §2.2 has the receiver
//!   "discard the protocol block including the family which is ignored".
//! - v2 `PROXY` over UDP (family bytes 0x12, 0x22) is accepted and its
//!   addresses returned like TCP's: they are still the client's addresses,
//!   e.g. from a proxy that terminates QUIC. AF_UNSPEC (0x00) and AF_UNIX
//!   (0x31, 0x32) are accepted without addresses, the "fall back to UNSPEC"
//!   the spec asks of receivers for combinations they do not use.
//! - v2 TLVs after the address block are skipped without being parsed (the
//!   spec allows it); `header_len` covers them. There is no CRC32C check.
//! - Limits: [`limits::PROXY_V1_BYTES_MAX`] (107, the spec's maximum line) and
//!   [`limits::PROXY_V2_BYTES_MAX`] (536, the segment size the spec designs
//!   both versions to fit). A `Partial` answer therefore never needs more than
//!   536 bytes of buffer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::limits;

/// The 12 bytes that open every v2 header (§2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What opens every v1 line: "PROXY" and exactly one space (§2.1).
pub const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// Signature, version/command, family/transport and the 16-bit length.
const V2_FIXED_BYTES: usize = 16;

/// Result of feeding bytes to [`parse_proxy_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyParsed {
    /// What has arrived is a valid beginning of a header; call again with
    /// more bytes (the whole buffer, not only the new ones).
    Partial,
    /// A complete, valid header of `header_len` bytes; what follows it is the
    /// client's stream. `source` is the client, `destination` the address it
    /// connected to. Both are `None` for v1 `UNKNOWN`, v2 `LOCAL`, and v2
    /// AF_UNSPEC or AF_UNIX (addresses that are not IP): then the
    /// connection's own addresses apply.
    Complete {
        header_len: usize,
        source: Option<SocketAddr>,
        destination: Option<SocketAddr>,
    },
}

/// Why a connection's PROXY header was refused, named after the rule that
/// was broken. The spec's answer to each is the same: close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes start with neither "PROXY " nor the v2 signature (decided at
    /// the first byte that differs from both).
    NotProxyProtocol,
    /// A v1 line that does not match the grammar: protocol other than `TCP4`,
    /// `TCP6` or `UNKNOWN`, a missing, extra or empty field, an address not of
    /// the named family or not canonical, a port with a sign, leading zero or
    /// over 65535, or a bare CR or LF.
    BadV1Header,
    /// No CRLF within the first [`limits::PROXY_V1_BYTES_MAX`] bytes.
    V1TooLong,
    /// The v2 version nibble (high half of byte 13) is not 2.
    BadV2Version,
    /// The v2 command nibble is neither LOCAL (0) nor PROXY (1).
    BadV2Command,
    /// A v2 PROXY header whose family/transport byte is not one of 0x00,
    /// 0x11, 0x12, 0x21, 0x22, 0x31, 0x32.
    BadV2Family,
    /// A v2 PROXY header whose length is less than its family's address
    /// block (12 bytes for IPv4, 36 for IPv6, 216 for AF_UNIX).
    V2AddressTooShort,
    /// A v2 header longer than [`limits::PROXY_V2_BYTES_MAX`] (decided from
    /// the length field, before the rest arrives).
    V2TooLong,
}

impl ProxyError {
    /// A short, stable, lowercase reason for logs (e.g. "bad v1 header").
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NotProxyProtocol => "not proxy protocol",
            ProxyError::BadV1Header => "bad v1 header",
            ProxyError::V1TooLong => "v1 too long",
            ProxyError::BadV2Version => "bad v2 version",
            ProxyError::BadV2Command => "bad v2 command",
            ProxyError::BadV2Family => "bad v2 family",
            ProxyError::V2AddressTooShort => "v2 address too short",
            ProxyError::V2TooLong => "v2 too long",
        }
    }
}

/// Parses the PROXY header (v1 or v2) at the start of `buf`.
///
/// Never panics, whatever the bytes, and reads at most
/// [`limits::PROXY_V2_BYTES_MAX`] of them. Checks run in wire order and the
/// first broken rule answers: the signature, then for v1 the fields left to
/// right and the line length; for v2 the version, command, family, length
/// (cap, then address block size).
pub fn parse_proxy_header(buf: &[u8]) -> Result<ProxyParsed, ProxyError> {
    // The two signatures differ in their first byte ('\r' / 'P'), so at most
    // one matches a non-empty buffer; an empty one is a prefix of both.
    if matches_so_far(buf, &V2_SIGNATURE) {
        parse_v2(buf)
    } else if matches_so_far(buf, V1_PREFIX) {
        parse_v1(buf)
    } else {
        Err(ProxyError::NotProxyProtocol)
    }
}

/// Whether `buf` and `signature` agree on their common length.
fn matches_so_far(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf.get(..n) == signature.get(..n)
}

// ---- Version 2 ----

/// The address family of a v2 PROXY header, from its family/transport byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V2Family {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

impl V2Family {
    /// The valid combinations of §2.2; the transport (STREAM or DGRAM) does
    /// not change the address layout.
    fn from_byte(byte: u8) -> Result<V2Family, ProxyError> {
        match byte {
            0x00 => Ok(V2Family::Unspec),
            0x11 | 0x12 => Ok(V2Family::Inet),
            0x21 | 0x22 => Ok(V2Family::Inet6),
            0x31 | 0x32 => Ok(V2Family::Unix),
            _ => Err(ProxyError::BadV2Family),
        }
    }

    /// Bytes of the address block: two addresses, then two ports for IP.
    fn address_bytes(self) -> usize {
        match self {
            V2Family::Unspec => 0,
            V2Family::Inet => 2 * 4 + 2 * 2,
            V2Family::Inet6 => 2 * 16 + 2 * 2,
            V2Family::Unix => 2 * 108,
        }
    }
}

fn parse_v2(buf: &[u8]) -> Result<ProxyParsed, ProxyError> {
    let Some(&version_command) = buf.get(12) else {
        return Ok(ProxyParsed::Partial);
    };
    if version_command >> 4 != 2 {
        return Err(ProxyError::BadV2Version);
    }
    let proxy = match version_command & 0x0F {
        0 => false,
        1 => true,
        _ => return Err(ProxyError::BadV2Command),
    };
    let Some(&family_byte) = buf.get(13) else {
        return Ok(ProxyParsed::Partial);
    };
    // `None` for LOCAL: its family and addresses are ignored (§2.2).
    let family = if proxy {
        Some(V2Family::from_byte(family_byte)?)
    } else {
        None
    };
    // The high byte of the length alone can already say "too long".
    let Some(&len_hi) = buf.get(14) else {
        return Ok(ProxyParsed::Partial);
    };
    if V2_FIXED_BYTES + usize::from(len_hi) * 256 > limits::PROXY_V2_BYTES_MAX {
        return Err(ProxyError::V2TooLong);
    }
    let Some(&len_lo) = buf.get(15) else {
        return Ok(ProxyParsed::Partial);
    };
    let block_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let header_len = V2_FIXED_BYTES + block_len;
    if header_len > limits::PROXY_V2_BYTES_MAX {
        return Err(ProxyError::V2TooLong);
    }
    if family.is_some_and(|f| block_len < f.address_bytes()) {
        return Err(ProxyError::V2AddressTooShort);
    }
    let Some(block) = buf.get(V2_FIXED_BYTES..header_len) else {
        return Ok(ProxyParsed::Partial);
    };
    // Whatever follows the addresses (TLVs) is skipped.
    let (source, destination) = match family {
        Some(V2Family::Inet) => v2_ip_addresses(block, false)?,
        Some(V2Family::Inet6) => v2_ip_addresses(block, true)?,
        Some(V2Family::Unspec | V2Family::Unix) | None => (None, None),
    };
    Ok(ProxyParsed::Complete {
        header_len,
        source,
        destination,
    })
}

/// Source and destination of an IPv4 or IPv6 address block: the two
/// addresses, then the two ports, all in network byte order.
fn v2_ip_addresses(
    block: &[u8],
    ipv6: bool,
) -> Result<(Option<SocketAddr>, Option<SocketAddr>), ProxyError> {
    let ip_bytes = if ipv6 { 16 } else { 4 };
    let ip = |at: usize| -> Option<IpAddr> {
        if ipv6 {
            array_at::<16>(block, at).map(|a| Ipv6Addr::from(a).into())
        } else {
            array_at::<4>(block, at).map(|a| Ipv4Addr::from(a).into())
        }
    };
    let port = |at: usize| array_at::<2>(block, at).map(u16::from_be_bytes);
    let source = ip(0).zip(port(2 * ip_bytes));
    let destination = ip(ip_bytes).zip(port(2 * ip_bytes + 2));
    match (source, destination) {
        (Some(s), Some(d)) => Ok((Some(s.into()), Some(d.into()))),
        // The block length was checked against the family already; this
        // only keeps a wrong length from ever becoming a panic.
        _ => Err(ProxyError::V2AddressTooShort),
    }
}

fn array_at<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

// ---- Version 1 ----

/// The protocol word after "PROXY " that carries no addresses.
const V1_UNKNOWN: &[u8] = b"UNKNOWN";
/// Longest textual IPv4 address (255.255.255.255).
const V1_IPV4_TEXT_MAX: usize = 15;
/// Longest textual IPv6 address: six groups of four hex digits and a dotted
/// IPv4 address (`ffff:…:ffff:255.255.255.255`).
const V1_IPV6_TEXT_MAX: usize = 45;
/// Longest port (65535).
const V1_PORT_TEXT_MAX: usize = 5;

fn parse_v1(buf: &[u8]) -> Result<ProxyParsed, ProxyError> {
    // Only the first PROXY_V1_BYTES_MAX bytes can hold a valid line, CRLF
    // included, so nothing past them is looked at.
    let window = buf.get(..limits::PROXY_V1_BYTES_MAX).unwrap_or(buf);
    let Some(fields) = window.get(V1_PREFIX.len()..) else {
        return Ok(ProxyParsed::Partial); // a prefix of "PROXY "
    };
    match fields.iter().position(|&b| b == b'\r' || b == b'\n') {
        // A bare LF ends no line (§2.1).
        Some(i) if fields.get(i) == Some(&b'\n') => Err(ProxyError::BadV1Header),
        Some(i) => {
            // The CR ends the line, so the fields must be complete and valid
            // now; that answers even before the LF arrives.
            let (source, destination) = v1_fields(fields.get(..i).unwrap_or(fields), true)?;
            let header_len = V1_PREFIX.len() + i + 2;
            if header_len > limits::PROXY_V1_BYTES_MAX {
                return Err(ProxyError::V1TooLong);
            }
            match buf.get(header_len - 1) {
                None => Ok(ProxyParsed::Partial),
                Some(b'\n') => Ok(ProxyParsed::Complete {
                    header_len,
                    source,
                    destination,
                }),
                Some(_) => Err(ProxyError::BadV1Header), // a bare CR
            }
        }
        None => {
            v1_fields(fields, false)?;
            if window.len() == limits::PROXY_V1_BYTES_MAX {
                Err(ProxyError::V1TooLong)
            } else {
                Ok(ProxyParsed::Partial)
            }
        }
    }
}

/// Checks the fields after "PROXY " (`line`, without the CRLF), and returns
/// the addresses of a complete line. With `complete == false`, `line` is what
/// has arrived so far: every field but the last must already be valid, and
/// the last must be able to grow into a valid one (right characters, not
/// too long), so that a line is refused at the first byte that cannot belong
/// to a valid one while every prefix of a valid line passes.
fn v1_fields(
    line: &[u8],
    complete: bool,
) -> Result<(Option<SocketAddr>, Option<SocketAddr>), ProxyError> {
    const BAD: ProxyError = ProxyError::BadV1Header;
    // UNKNOWN: anything may follow a space, up to the CRLF (§2.1).
    if let Some(rest) = line.strip_prefix(V1_UNKNOWN) {
        return match rest.first() {
            None | Some(b' ') => Ok((None, None)),
            Some(_) => Err(BAD),
        };
    }
    if !complete && V1_UNKNOWN.starts_with(line) {
        return Ok((None, None));
    }

    // TCP4 / TCP6: five fields separated by single spaces.
    let mut fields: [&[u8]; 5] = [&[]; 5];
    let mut count = 0;
    for field in line.split(|&b| b == b' ') {
        *fields.get_mut(count).ok_or(BAD)? = field;
        count += 1;
    }
    if complete && count != fields.len() {
        return Err(BAD);
    }
    let [protocol, source, destination, source_port, destination_port] = fields;
    let ipv6 = match protocol {
        b"TCP4" => false,
        b"TCP6" => true,
        p if !complete && count == 1 && (b"TCP4".starts_with(p) || b"TCP6".starts_with(p)) => {
            return Ok((None, None));
        }
        _ => return Err(BAD),
    };
    if !complete {
        // Every field so far but the last must be whole; the last may grow.
        for (at, field) in fields.iter().enumerate().take(count).skip(1) {
            let whole = at + 1 < count;
            let valid = match (at >= 3, whole) {
                (false, true) => v1_address(field, ipv6).is_some(),
                (false, false) => v1_address_prefix(field, ipv6),
                (true, true) => v1_port(field).is_some(),
                (true, false) => v1_port_prefix(field),
            };
            if !valid {
                return Err(BAD);
            }
        }
        return Ok((None, None));
    }
    let address = |ip: &[u8], port: &[u8]| -> Option<SocketAddr> {
        Some(SocketAddr::new(v1_address(ip, ipv6)?, v1_port(port)?))
    };
    let source = address(source, source_port).ok_or(BAD)?;
    let destination = address(destination, destination_port).ok_or(BAD)?;
    Ok((Some(source), Some(destination)))
}

/// A whole address of the family: IPv4 as four decimal numbers without
/// leading zeros (`std` refuses them too), IPv6 as `std` parses it.
fn v1_address(text: &[u8], ipv6: bool) -> Option<IpAddr> {
    let text = std::str::from_utf8(text).ok()?;
    if ipv6 {
        text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// Whether `text` may be the beginning of an address of the family: only its
/// characters and its length are checked; the rest waits for the CR.
fn v1_address_prefix(text: &[u8], ipv6: bool) -> bool {
    if ipv6 {
        text.len() <= V1_IPV6_TEXT_MAX
            && text
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    } else {
        text.len() <= V1_IPV4_TEXT_MAX && text.iter().all(|&b| b.is_ascii_digit() || b == b'.')
    }
}

/// A whole port: 1–5 decimal digits, no leading zero (but "0"), ≤ 65535.
fn v1_port(text: &[u8]) -> Option<u16> {
    if text.is_empty() || !v1_port_prefix(text) {
        return None;
    }
    u16::try_from(decimal(text)).ok()
}

/// Whether `text` may be the beginning of a port: digits only, no leading
/// zero, and no more than a port can have.
fn v1_port_prefix(text: &[u8]) -> bool {
    text.len() <= V1_PORT_TEXT_MAX
        && text.iter().all(u8::is_ascii_digit)
        && !(text.len() > 1 && text.first() == Some(&b'0'))
        && decimal(text) <= u32::from(u16::MAX)
}

/// The value of at most [`V1_PORT_TEXT_MAX`] ASCII digits (checked by the
/// caller); saturating, so no input can make it overflow.
fn decimal(digits: &[u8]) -> u32 {
    digits.iter().fold(0u32, |n, &b| {
        n.saturating_mul(10)
            .saturating_add(u32::from(b.wrapping_sub(b'0')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use ProxyError::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn complete(
        header_len: usize,
        source: Option<SocketAddr>,
        destination: Option<SocketAddr>,
    ) -> Result<ProxyParsed, ProxyError> {
        Ok(ProxyParsed::Complete {
            header_len,
            source,
            destination,
        })
    }

    /// A v2 header: signature, version/command byte, family byte, then the
    /// length of `block` and `block` (addresses and TLVs).
    fn v2(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    /// One TLV: type, 16-bit length, value.
    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    /// An IPv4 / IPv6 address block (addresses, then ports).
    fn block(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        for a in [source, destination] {
            match a.ip() {
                IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
                IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
            }
        }
        out.extend_from_slice(&source.port().to_be_bytes());
        out.extend_from_slice(&destination.port().to_be_bytes());
        out
    }

    const IPV6_MAX: &str = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";

    /// A valid header: its name, its bytes, and the source and destination
    /// it parses to.
    type Case = (String, Vec<u8>, Option<SocketAddr>, Option<SocketAddr>);

    /// Valid v1 lines, from §2.1 (the example and the maximum lengths) and
    /// the forms senders write, with what they parse to.
    fn valid_v1() -> Vec<(String, Option<SocketAddr>, Option<SocketAddr>)> {
        let v1_107 = format!("PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n");
        vec![
            (
                "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".into(),
                addr("192.168.0.1:56324"),
                addr("192.168.0.11:443"),
            ),
            (
                "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n".into(),
                addr("255.255.255.255:65535"),
                addr("255.255.255.255:65535"),
            ),
            (
                "PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n".into(),
                addr("0.0.0.0:0"),
                addr("10.0.0.1:0"),
            ),
            (
                format!("PROXY TCP6 {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n"),
                addr(&format!("[{IPV6_MAX}]:65535")),
                addr(&format!("[{IPV6_MAX}]:65535")),
            ),
            (
                "PROXY TCP6 2001:DB8::1 ::ffff:192.0.2.1 1 80\r\n".into(),
                addr("[2001:db8::1]:1"),
                addr("[::ffff:192.0.2.1]:80"),
            ),
            (
                "PROXY TCP6 :: 0001:0002:0003:0004:0005:0006:0007:0008 9 10\r\n".into(),
                addr("[::]:9"),
                addr("[1:2:3:4:5:6:7:8]:10"),
            ),
            ("PROXY UNKNOWN\r\n".into(), None, None),
            (
                "PROXY UNKNOWN anything \u{e9} at all\r\n".into(),
                None,
                None,
            ),
            (v1_107, None, None),
        ]
    }

    /// Valid v2 headers, named, with what they parse to.
    fn valid_v2() -> Vec<Case> {
        let v4 = (
            addr("192.168.0.1:56324").unwrap(),
            addr("192.168.0.11:443").unwrap(),
        );
        let v6 = (
            addr("[2001:db8::1]:65535").unwrap(),
            addr("[::ffff:192.0.2.1]:0").unwrap(),
        );
        let tlvs = [
            tlv(0x01, b"h2"),            // ALPN
            tlv(0x02, b"example.com"),   // AUTHORITY
            tlv(0x04, &[]),              // NOOP
            tlv(0x05, &[7; 128]),        // UNIQUE_ID
            tlv(0x20, &[1, 0, 0, 0, 0]), // SSL, verified
            tlv(0xE0, b"custom"),        // application-specific
        ]
        .concat();
        let with_tlvs = |mut b: Vec<u8>| {
            b.extend_from_slice(&tlvs);
            b
        };
        let (s4, d4) = (Some(v4.0), Some(v4.1));
        let (s6, d6) = (Some(v6.0), Some(v6.1));
        vec![
            // What HAProxy wrote in front of a request (172.19.0.1:42578 →
            // 172.19.0.3:80), byte for byte.
            (
                "haproxy_tcp4".into(),
                [
                    &V2_SIGNATURE[..],
                    &[0x21, 0x11, 0x00, 0x0C, 0xAC, 0x13, 0x00, 0x01],
                    &[0xAC, 0x13, 0x00, 0x03, 0xA6, 0x52, 0x00, 0x50],
                ]
                .concat(),
                addr("172.19.0.1:42578"),
                addr("172.19.0.3:80"),
            ),
            ("tcp4".into(), v2(0x21, 0x11, &block(v4.0, v4.1)), s4, d4),
            (
                "tcp4_tlvs".into(),
                v2(0x21, 0x11, &with_tlvs(block(v4.0, v4.1))),
                s4,
                d4,
            ),
            ("udp4".into(), v2(0x21, 0x12, &block(v4.0, v4.1)), s4, d4),
            ("tcp6".into(), v2(0x21, 0x21, &block(v6.0, v6.1)), s6, d6),
            (
                "tcp6_tlvs".into(),
                v2(0x21, 0x21, &with_tlvs(block(v6.0, v6.1))),
                s6,
                d6,
            ),
            (
                "udp6_tlvs".into(),
                v2(0x21, 0x22, &with_tlvs(block(v6.0, v6.1))),
                s6,
                d6,
            ),
            // The largest header accepted: 536 bytes.
            (
                "tcp4_536".into(),
                v2(
                    0x21,
                    0x11,
                    &[block(v4.0, v4.1), tlv(0x04, &[0; 505])].concat(),
                ),
                s4,
                d4,
            ),
            // LOCAL: no addresses, whatever the family and block say.
            ("local".into(), v2(0x20, 0x00, &[]), None, None),
            (
                "local_tcp4".into(),
                v2(0x20, 0x11, &block(v4.0, v4.1)),
                None,
                None,
            ),
            ("local_bad_family".into(), v2(0x20, 0xFF, &[]), None, None),
            (
                "local_short_block".into(),
                v2(0x20, 0x21, &[1, 2, 3]),
                None,
                None,
            ),
            // PROXY without IP addresses.
            ("unspec".into(), v2(0x21, 0x00, &[]), None, None),
            ("unspec_tlvs".into(), v2(0x21, 0x00, &tlvs), None, None),
            (
                "unix_stream".into(),
                v2(0x21, 0x31, &[b'/'; 216]),
                None,
                None,
            ),
            (
                "unix_dgram_tlvs".into(),
                v2(0x21, 0x32, &[&[0; 216][..], &tlvs].concat()),
                None,
                None,
            ),
        ]
    }

    #[test]
    fn valid_headers_parse_to_their_addresses() {
        let cases = valid_v1().into_iter().map(|(line, s, d)| {
            let bytes = line.clone().into_bytes();
            (line, bytes, s, d)
        });
        let cases = cases.chain(valid_v2());
        for (name, header, source, destination) in cases {
            let want = complete(header.len(), source, destination);
            assert_eq!(parse_proxy_header(&header), want, "{name:?}");
            // Bytes after the header are the client's, never part of it.
            for after in [
                &b"GET / HTTP/1.1\r\n\r\n"[..],
                b"\r\n",
                b"PROXY ",
                &V2_SIGNATURE,
            ] {
                let buf = [&header[..], after].concat();
                assert_eq!(parse_proxy_header(&buf), want, "{name:?} + {after:?}");
            }
        }
    }

    #[test]
    fn the_spec_maximum_lengths() {
        let tcp4 = "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        let tcp6 = format!("PROXY TCP6 {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n");
        let unknown = format!("PROXY UNKNOWN {IPV6_MAX} {IPV6_MAX} 65535 65535\r\n");
        assert_eq!(
            [
                tcp4.len(),
                tcp6.len(),
                "PROXY UNKNOWN\r\n".len(),
                unknown.len()
            ],
            [56, 104, 15, limits::PROXY_V1_BYTES_MAX]
        );
    }

    #[test]
    fn every_prefix_of_a_valid_header_is_partial() {
        let v1 = valid_v1().into_iter().map(|(line, ..)| line.into_bytes());
        let v2 = valid_v2().into_iter().map(|(_, bytes, ..)| bytes);
        for header in v1.chain(v2) {
            for end in 0..header.len() {
                assert_eq!(
                    parse_proxy_header(&header[..end]),
                    Ok(ProxyParsed::Partial),
                    "{:?}",
                    String::from_utf8_lossy(&header[..end])
                );
            }
            assert!(matches!(
                parse_proxy_header(&header),
                Ok(ProxyParsed::Complete { header_len, .. }) if header_len == header.len()
            ));
        }
    }

    #[test]
    fn every_v1_error() {
        let unknown_106 = format!("PROXY UNKNOWN {}", "a".repeat(92));
        let dotted = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255";
        let cases: &[(&str, ProxyError)] = &[
            // Neither signature.
            ("GET / HTTP/1.1\r\n", NotProxyProtocol),
            ("proxy TCP4", NotProxyProtocol),
            ("PROXYTCP4", NotProxyProtocol),
            ("PROXY\tTCP4", NotProxyProtocol),
            ("\x16\x03\x01\x02\x00", NotProxyProtocol), // TLS
            // The protocol word.
            ("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", BadV1Header),
            ("PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", BadV1Header),
            ("PROXY \r\n", BadV1Header),
            ("PROXY TCP4\r\n", BadV1Header),
            ("PROXY UNKNOWNX\r\n", BadV1Header),
            // Fields and spaces.
            ("PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", BadV1Header),
            ("PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", BadV1Header),
            // Addresses: canonical, of the named family.
            ("PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", BadV1Header),
            ("PROXY TCP4 ::1 5.6.7.8 1 2\r\n", BadV1Header),
            ("PROXY TCP6 ::1 5.6.7.8 1 2\r\n", BadV1Header),
            ("PROXY TCP6 1::2::3 ::1 1 2\r\n", BadV1Header),
            ("PROXY TCP6 00001:: ::1 1 2\r\n", BadV1Header),
            ("PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", BadV1Header),
            ("PROXY TCP6 [::1] ::1 1 2\r\n", BadV1Header),
            // Ports: decimal digits, no leading zero, at most 65535.
            ("PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 100000\r\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", BadV1Header),
            // The line ends with CRLF, and only there.
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r", BadV1Header),
            ("PROXY UNKNOWN\n", BadV1Header),
            ("PROXY UNKNOWN a\nb\r\n", BadV1Header),
            // Refused before the line ends, at the first byte no valid line has.
            ("PROXY TCP5", BadV1Header),
            ("PROXY TCP4 1.2.x", BadV1Header),
            ("PROXY TCP6 fe80::g", BadV1Header),
            ("PROXY TCP4 1111111111111111", BadV1Header),
            ("PROXY TCP4 1.2.3 ", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 8a", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 01", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 65536", BadV1Header),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", BadV1Header),
            ("PROXY TCP4 1.2.3.4\r", BadV1Header),
        ];
        // Longer than 107 bytes: no CRLF in them, or a CRLF ending past them.
        let too_long = [
            format!("{unknown_106}a"),
            format!("{unknown_106}\r\n"),
            format!("{unknown_106}\r"),
            format!("PROXY TCP6 {dotted} {dotted} 65535 65535\r\n"),
        ];
        let too_long = too_long.iter().map(|s| (s.as_str(), V1TooLong));
        for (input, error) in cases.iter().copied().chain(too_long) {
            assert_eq!(
                parse_proxy_header(input.as_bytes()),
                Err(error),
                "{input:?}"
            );
        }
        // One byte less, the same lines are fine or still partial.
        let line_107 = format!("{}\r\n", &unknown_106[..105]);
        assert_eq!(
            parse_proxy_header(line_107.as_bytes()),
            complete(107, None, None)
        );
        assert_eq!(
            parse_proxy_header(unknown_106.as_bytes()),
            Ok(ProxyParsed::Partial)
        );
    }

    #[test]
    fn every_v2_error() {
        let v4 = block(
            addr("192.168.0.1:56324").unwrap(),
            addr("192.168.0.11:443").unwrap(),
        );
        let cases: Vec<(&str, Vec<u8>, ProxyError)> = vec![
            (
                "signature byte 5",
                b"\r\n\r\n\x01".to_vec(),
                NotProxyProtocol,
            ),
            (
                "http after empty lines",
                b"\r\n\r\nGET / HTTP/1.1\r\n".to_vec(),
                NotProxyProtocol,
            ),
            ("version 1", v2(0x11, 0x11, &v4), BadV2Version),
            ("version 0", v2(0x01, 0x11, &v4), BadV2Version),
            ("version 3", v2(0x31, 0x11, &v4), BadV2Version),
            ("version 15", v2(0xF1, 0x11, &v4), BadV2Version),
            ("command 2", v2(0x22, 0x11, &v4), BadV2Command),
            ("command 15", v2(0x2F, 0x11, &v4), BadV2Command),
            ("family 0x10", v2(0x21, 0x10, &v4), BadV2Family),
            ("family 0x13", v2(0x21, 0x13, &v4), BadV2Family),
            ("family 0x01", v2(0x21, 0x01, &v4), BadV2Family),
            ("family 0x23", v2(0x21, 0x23, &v4), BadV2Family),
            ("family 0x30", v2(0x21, 0x30, &v4), BadV2Family),
            ("family 0x41", v2(0x21, 0x41, &v4), BadV2Family),
            ("family 0xFF", v2(0x21, 0xFF, &v4), BadV2Family),
            (
                "tcp4 11 bytes",
                v2(0x21, 0x11, &v4[..11]),
                V2AddressTooShort,
            ),
            ("tcp4 empty", v2(0x21, 0x11, &[]), V2AddressTooShort),
            (
                "udp4 11 bytes",
                v2(0x21, 0x12, &v4[..11]),
                V2AddressTooShort,
            ),
            ("tcp6 35 bytes", v2(0x21, 0x21, &[0; 35]), V2AddressTooShort),
            // 12 bytes are enough for IPv4 but not for the IPv6 it says.
            (
                "tcp6 with ipv4 block",
                v2(0x21, 0x21, &v4),
                V2AddressTooShort,
            ),
            ("udp6 35 bytes", v2(0x21, 0x22, &[0; 35]), V2AddressTooShort),
            (
                "unix 215 bytes",
                v2(0x21, 0x31, &[0; 215]),
                V2AddressTooShort,
            ),
            (
                "unix dgram 215 bytes",
                v2(0x21, 0x32, &[0; 215]),
                V2AddressTooShort,
            ),
            ("537 bytes", v2(0x21, 0x11, &[0; 521]), V2TooLong),
            ("local 537 bytes", v2(0x20, 0x00, &[0; 521]), V2TooLong),
            ("65551 bytes", v2(0x21, 0x21, &[0; 0xFFFF]), V2TooLong),
        ];
        for (name, input, error) in cases {
            assert_eq!(parse_proxy_header(&input), Err(error), "{name}");
            // Decided from the 16 fixed bytes (or fewer), before the block.
            let fixed = &input[..input.len().min(V2_FIXED_BYTES)];
            assert_eq!(parse_proxy_header(fixed), Err(error), "{name}, 16 bytes");
        }
    }

    #[test]
    fn v2_rules_are_checked_as_their_byte_arrives() {
        let header = v2(0x21, 0x11, &[0; 12]);
        for (at, bad, error) in [
            (12, 0x11, BadV2Version),
            (12, 0x23, BadV2Command),
            (13, 0x14, BadV2Family),
            (14, 0x03, V2TooLong),         // 16 + 768.. bytes, whatever byte 15
            (15, 0x0B, V2AddressTooShort), // 11 bytes
        ] {
            let mut buf = header.clone();
            buf[at] = bad;
            assert_eq!(parse_proxy_header(&buf[..at]), Ok(ProxyParsed::Partial));
            assert_eq!(parse_proxy_header(&buf[..=at]), Err(error), "byte {at}");
        }
        // 0x02 as the high byte allows 528..=783 bytes: byte 15 decides.
        let mut buf = header.clone();
        buf[14] = 0x02;
        assert_eq!(parse_proxy_header(&buf[..15]), Ok(ProxyParsed::Partial));
        buf[15] = 0x08; // 16 + 520 = 536 bytes
        assert_eq!(parse_proxy_header(&buf[..16]), Ok(ProxyParsed::Partial));
        buf[15] = 0x09; // 537 bytes
        assert_eq!(parse_proxy_header(&buf[..16]), Err(V2TooLong));
    }

    /// A buffer that cannot become either signature is refused at the first
    /// byte that differs from both, so a client speaking something else
    /// (HTTP, TLS) gets its answer without waiting.
    #[test]
    fn not_proxy_protocol_at_the_first_differing_byte() {
        for signature in [&V2_SIGNATURE[..], &V1_PREFIX[..]] {
            for at in 0..signature.len() {
                let mut buf = signature[..=at].to_vec();
                assert_eq!(parse_proxy_header(&buf[..at]), Ok(ProxyParsed::Partial));
                buf[at] ^= 0x80;
                assert_eq!(parse_proxy_header(&buf), Err(NotProxyProtocol), "byte {at}");
            }
        }
        assert_eq!(parse_proxy_header(b""), Ok(ProxyParsed::Partial));
        for first in 0..=255u8 {
            let want = if first == b'P' || first == b'\r' {
                Ok(ProxyParsed::Partial)
            } else {
                Err(NotProxyProtocol)
            };
            assert_eq!(parse_proxy_header(&[first]), want);
        }
    }

    #[test]
    fn reasons_are_distinct() {
        let all = [
            NotProxyProtocol,
            BadV1Header,
            V1TooLong,
            BadV2Version,
            BadV2Command,
            BadV2Family,
            V2AddressTooShort,
            V2TooLong,
        ];
        let reasons: std::collections::HashSet<_> = all.iter().map(|e| e.reason()).collect();
        assert_eq!(reasons.len(), all.len());
    }

    /// The answers for the prefixes of `buf`, shortest first, are some
    /// `Partial`s and then one answer that more bytes never change.
    fn assert_prefixes_settle(buf: &[u8]) {
        let whole = parse_proxy_header(buf);
        let mut settled = None;
        for end in 0..=buf.len() {
            let got = parse_proxy_header(&buf[..end]);
            match settled {
                None if got == Ok(ProxyParsed::Partial) => {}
                None => settled = Some(got),
                Some(answer) => assert_eq!(got, answer, "{buf:?} at {end}"),
            }
        }
        assert_eq!(settled.unwrap_or(Ok(ProxyParsed::Partial)), whole);
        if let Ok(ProxyParsed::Complete { header_len, .. }) = whole {
            assert!(header_len <= buf.len());
            assert_eq!(parse_proxy_header(&buf[..header_len]), whole);
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// IPv6 addresses with runs of zero groups (so `::` appears) and
        /// IPv4-mapped ones (which `Display` writes with a dotted tail).
        fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
            prop_oneof![
                prop::array::uniform8(prop_oneof![Just(0u16), Just(0xFFFF), any::<u16>()])
                    .prop_map(Ipv6Addr::from),
                any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_ipv6_mapped()),
            ]
        }

        /// A source and destination of one family.
        fn address_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
            prop_oneof![
                (
                    any::<[u8; 4]>(),
                    any::<u16>(),
                    any::<[u8; 4]>(),
                    any::<u16>()
                )
                    .prop_map(|(s, sp, d, dp)| {
                        (
                            SocketAddr::new(Ipv4Addr::from(s).into(), sp),
                            SocketAddr::new(Ipv4Addr::from(d).into(), dp),
                        )
                    }),
                (ipv6(), any::<u16>(), ipv6(), any::<u16>()).prop_map(|(s, sp, d, dp)| {
                    (SocketAddr::new(s.into(), sp), SocketAddr::new(d.into(), dp))
                }),
            ]
        }

        /// How a v1 sender may write an IPv6 address: compressed (RFC 5952,
        /// as `Display` does), or all eight groups of four digits.
        #[derive(Debug, Clone, Copy)]
        enum Ipv6Text {
            Compressed,
            FullLower,
            FullUpper,
        }

        fn ip_text(ip: IpAddr, style: Ipv6Text) -> String {
            match (ip, style) {
                (IpAddr::V6(ip), Ipv6Text::FullLower) => {
                    ip.segments().map(|s| format!("{s:04x}")).join(":")
                }
                (IpAddr::V6(ip), Ipv6Text::FullUpper) => {
                    ip.segments().map(|s| format!("{s:04X}")).join(":")
                }
                (ip, _) => ip.to_string(),
            }
        }

        fn encode_v1(source: SocketAddr, destination: SocketAddr, style: Ipv6Text) -> Vec<u8> {
            let protocol = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {protocol} {} {} {} {}\r\n",
                ip_text(source.ip(), style),
                ip_text(destination.ip(), style),
                source.port(),
                destination.port()
            )
            .into_bytes()
        }

        fn encode_v2(
            source: SocketAddr,
            destination: SocketAddr,
            udp: bool,
            tlvs: &[(u8, Vec<u8>)],
        ) -> Vec<u8> {
            let family = if source.is_ipv4() { 0x10 } else { 0x20 } | if udp { 2 } else { 1 };
            let mut body = block(source, destination);
            for (kind, value) in tlvs {
                body.extend(tlv(*kind, value));
            }
            v2(0x21, family, &body)
        }

        fn style() -> impl Strategy<Value = Ipv6Text> {
            prop_oneof![
                Just(Ipv6Text::Compressed),
                Just(Ipv6Text::FullLower),
                Just(Ipv6Text::FullUpper)
            ]
        }

        proptest! {
            /// A v1 line for any addresses parses back to them, its length
            /// exactly, whatever follows it; every shorter prefix is Partial.
            #[test]
            fn v1_encodings_parse_back(
                (source, destination) in address_pair(),
                style in style(),
                after in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let header = encode_v1(source, destination, style);
                prop_assert!(header.len() <= limits::PROXY_V1_BYTES_MAX);
                let buf = [&header[..], &after].concat();
                prop_assert_eq!(
                    parse_proxy_header(&buf),
                    complete(header.len(), Some(source), Some(destination))
                );
                for end in 0..header.len() {
                    prop_assert_eq!(parse_proxy_header(&buf[..end]), Ok(ProxyParsed::Partial));
                }
            }

            /// A v2 header for any addresses (TCP or UDP) and TLVs parses
            /// back to them, its length exactly (TLVs included), whatever
            /// follows it; every shorter prefix is Partial.
            #[test]
            fn v2_encodings_parse_back(
                (source, destination) in address_pair(),
                udp in any::<bool>(),
                tlvs in prop::collection::vec(
                    (any::<u8>(), prop::collection::vec(any::<u8>(), 0..80)),
                    0..6,
                ),
                after in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let header = encode_v2(source, destination, udp, &tlvs);
                let buf = [&header[..], &after].concat();
                let want = if header.len() <= limits::PROXY_V2_BYTES_MAX {
                    complete(header.len(), Some(source), Some(destination))
                } else {
                    Err(V2TooLong)
                };
                prop_assert_eq!(parse_proxy_header(&buf), want);
                for end in 0..header.len().min(V2_FIXED_BYTES) {
                    prop_assert_eq!(parse_proxy_header(&buf[..end]), Ok(ProxyParsed::Partial));
                }
                if want.is_ok() {
                    for end in V2_FIXED_BYTES..header.len() {
                        prop_assert_eq!(parse_proxy_header(&buf[..end]), Ok(ProxyParsed::Partial));
                    }
                }
            }

            /// Valid headers with a few bytes changed and cut anywhere: no
            /// panic, and the answers over the prefixes are Partial until one
            /// answer that more bytes never change.
            #[test]
            fn mutated_headers_settle_once(
                (source, destination) in address_pair(),
                v1 in any::<bool>(),
                style in style(),
                changes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut buf = if v1 {
                    encode_v1(source, destination, style)
                } else {
                    encode_v2(source, destination, false, &[(0x04, vec![0; 3])])
                };
                buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
                for (at, byte) in changes {
                    let at = at.index(buf.len());
                    buf[at] = byte;
                }
                buf.truncate(cut.index(buf.len() + 1));
                assert_prefixes_settle(&buf);
            }
        }
    }
}
