//! Which browser origins may open streams, and the CORS headers they get.
//!
//! A browser names the page's origin in `Origin` on every WebSocket upgrade
//! and every cross-origin request. A WebSocket is not subject to CORS, so
//! without a check any site could open one with the user's cookies
//! (cross-site WebSocket hijacking); an `EventSource` or `fetch` from
//! another origin can read the response only when it carries
//! `Access-Control-Allow-Origin`. One allowlist serves both: a request whose
//! `Origin` is not on it is refused, one whose `Origin` is gets the CORS
//! headers. A request without `Origin` is not a cross-origin browser
//! request (a same-origin page, or a client that is no browser, which could
//! send any `Origin` it liked): it passes, without CORS headers.
//!
//! Entries are exact origins, `*`, or subdomain patterns
//! (`https://*.example.com`). The CORS lines of exact entries and `*` are
//! written once and named by a one-byte slot; a pattern's answer must echo
//! the request's own origin, so its lines are written per request
//! ([`Origins::cors_lines_for`], slot [`PATTERN_SLOT`]).

use std::borrow::Cow;

use crate::http::EXPOSE_LINE;

/// The allowlist, with the CORS header lines of each entry written once.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// Exact origins (`scheme://host[:port]`, lowercase), in the order
    /// configured; an entry's slot is its index + 1.
    exact: Vec<Box<str>>,
    /// `*` was listed: any origin passes, and gets `Access-Control-Allow-Origin: *`
    /// (slot `exact.len() + 1`).
    any: bool,
    /// Subdomain patterns, `https://*.example.com[:port]`, as (scheme and
    /// "://", ".example.com[:port]"): any subdomain, at any depth, of that
    /// scheme and port, not the domain itself.
    patterns: Vec<(Box<str>, Box<str>)>,
    /// `Access-Control-Allow-Credentials: true\r\n`, or "".
    credentials_line: &'static str,
    /// The header lines of each slot (index = slot - 1), each ending in CRLF.
    lines: Vec<Box<str>>,
}

/// What the allowlist says of one request's `Origin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it; with the CORS lines of this slot (see
    /// [`Origins::cors_lines`]) when the slot is not 0.
    Allowed { cors: u8 },
    /// Its origin is not on the allowlist: 403.
    Refused,
}

/// Why an allowlist entry is refused at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginsError {
    /// Not `scheme://host[:port]` (a path, a trailing slash, a query,
    /// whitespace, or no scheme): browsers never send such an `Origin`, so
    /// the entry could never match.
    NotAnOrigin(String),
    /// `*` with credentials: browsers refuse `Access-Control-Allow-Origin: *`
    /// on a credentialed request.
    AnyWithCredentials,
    /// More exact entries than a connection's slot can name.
    TooMany,
}

/// The slot of an origin allowed by a pattern: its lines echo the request's
/// origin and are written per request.
pub const PATTERN_SLOT: u8 = u8::MAX;

impl std::fmt::Display for OriginsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OriginsError::NotAnOrigin(s) => write!(
                f,
                "allowed origin {s:?} is not scheme://host[:port] or scheme://*.domain[:port] \
                 (no path, no trailing slash)"
            ),
            OriginsError::AnyWithCredentials => {
                f.write_str("allowed origin \"*\" cannot be combined with CORS credentials")
            }
            OriginsError::TooMany => write!(f, "at most {} allowed origins", ORIGINS_MAX),
        }
    }
}

/// Exact entries of the allowlist: a connection names its CORS lines by a
/// one-byte slot (`*` takes one more; 255 is [`PATTERN_SLOT`]).
pub const ORIGINS_MAX: usize = 253;

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE_S: u32 = 600;

impl Origins {
    /// An allowlist of exact origins, subdomain patterns
    /// (`https://*.example.com`), or `*` for any. Empty: no origin is
    /// checked and no CORS headers are sent (a page may read streams of its
    /// own origin only).
    pub fn new(entries: &[String], credentials: bool) -> Result<Origins, OriginsError> {
        let credentials_line = if credentials {
            "Access-Control-Allow-Credentials: true\r\n"
        } else {
            ""
        };
        let mut origins = Origins {
            credentials_line,
            ..Origins::default()
        };
        for entry in entries {
            if entry == "*" {
                if credentials {
                    return Err(OriginsError::AnyWithCredentials);
                }
                origins.any = true;
                continue;
            }
            if !looks_like_origin(entry) {
                return Err(OriginsError::NotAnOrigin(entry.clone()));
            }
            // Browsers serialise scheme and host in lowercase.
            let origin = entry.to_ascii_lowercase();
            if let Some((scheme, rest)) = origin.split_once("://*.") {
                if !looks_like_origin(&format!("{scheme}://{rest}")) || rest.contains('*') {
                    return Err(OriginsError::NotAnOrigin(entry.clone()));
                }
                origins
                    .patterns
                    .push((format!("{scheme}://").into(), format!(".{rest}").into()));
                continue;
            }
            if origin.contains('*') {
                return Err(OriginsError::NotAnOrigin(entry.clone()));
            }
            let origin = origin.into_boxed_str();
            if !origins.exact.contains(&origin) {
                origins.exact.push(origin);
            }
        }
        if origins.exact.len() > ORIGINS_MAX {
            return Err(OriginsError::TooMany);
        }
        origins.lines = origins
            .exact
            .iter()
            .map(|o| {
                // The answer differs by Origin: caches must key on it.
                format!(
                    "Access-Control-Allow-Origin: {o}\r\nVary: Origin\r\n{credentials_line}\
                     {EXPOSE_LINE}"
                )
                .into_boxed_str()
            })
            .collect();
        if origins.any {
            origins
                .lines
                .push(format!("Access-Control-Allow-Origin: *\r\n{EXPOSE_LINE}").into());
        }
        Ok(origins)
    }

    /// Is the allowlist on (at least one entry)?
    pub fn is_on(&self) -> bool {
        !self.lines.is_empty() || !self.patterns.is_empty()
    }

    /// The verdict on a request's `Origin` header (`None`: there was none).
    pub fn check(&self, origin: Option<&str>) -> Verdict {
        let Some(origin) = origin else {
            return Verdict::Allowed { cors: 0 };
        };
        if let Some(i) = self.exact.iter().position(|o| **o == *origin) {
            return Verdict::Allowed { cors: i as u8 + 1 };
        }
        if self.patterns.iter().any(|(scheme, suffix)| {
            origin
                .strip_prefix(&**scheme)
                .and_then(|host| host.strip_suffix(&**suffix))
                .is_some_and(|sub| {
                    // One or more labels: letters, digits, '-', dots between.
                    !sub.is_empty()
                        && !sub.starts_with('.')
                        && !sub.ends_with('.')
                        && sub.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                        })
                })
        }) {
            return Verdict::Allowed { cors: PATTERN_SLOT };
        }
        if self.any {
            return Verdict::Allowed {
                cors: self.lines.len() as u8,
            };
        }
        if self.is_on() {
            Verdict::Refused
        } else {
            Verdict::Allowed { cors: 0 }
        }
    }

    /// The CORS header lines of a slot (each ending in CRLF); "" for slot 0
    /// and for [`PATTERN_SLOT`], whose lines depend on the origin (see
    /// [`Origins::cors_lines_for`]).
    pub fn cors_lines(&self, cors: u8) -> &str {
        match cors {
            0 | PATTERN_SLOT => "",
            n => self.lines.get(n as usize - 1).map_or("", |l| l),
        }
    }

    /// The CORS header lines for a request from `origin` given `cors` by
    /// [`Origins::check`]: the slot's, or for a pattern, lines echoing the
    /// origin.
    pub fn cors_lines_for<'a>(&'a self, cors: u8, origin: Option<&str>) -> Cow<'a, str> {
        match (cors, origin) {
            (PATTERN_SLOT, Some(origin)) => Cow::Owned(format!(
                "Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n{}{EXPOSE_LINE}",
                self.credentials_line
            )),
            _ => Cow::Borrowed(self.cors_lines(cors)),
        }
    }

    /// Every slot's lines, slot 1 first: what a server precomputes
    /// per-slot response heads from.
    pub fn all_cors_lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(|l| &**l)
    }

    /// The answer to a CORS preflight (`OPTIONS`) from `origin`: `204` with
    /// the slot's lines, the method and the request headers the gateway
    /// reads, when the origin is allowed with CORS; else `403` without any
    /// `Access-Control-*` header (the browser then refuses the request).
    pub fn preflight_response(&self, origin: Option<&str>, keep_alive: bool) -> Vec<u8> {
        self.preflight(
            "GET",
            "Authorization, Last-Event-ID, Cache-Control",
            origin,
            keep_alive,
        )
    }

    /// The same for `OPTIONS /publish`: a page's `POST` of a message, with
    /// its token and its content type.
    pub fn publish_preflight_response(&self, origin: Option<&str>, keep_alive: bool) -> Vec<u8> {
        self.preflight("POST", "Authorization, Content-Type", origin, keep_alive)
    }

    fn preflight(
        &self,
        methods: &str,
        headers: &str,
        origin: Option<&str>,
        keep_alive: bool,
    ) -> Vec<u8> {
        let cors = match self.check(origin) {
            Verdict::Allowed { cors } if cors != 0 => cors,
            _ => return crate::http::forbidden_response("origin not allowed", ""),
        };
        let connection = if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        };
        format!(
            "HTTP/1.1 204 No Content\r\n\
             {}\
             Access-Control-Allow-Methods: {methods}\r\n\
             Access-Control-Allow-Headers: {headers}\r\n\
             Access-Control-Max-Age: {PREFLIGHT_MAX_AGE_S}\r\n\
             {connection}\r\n",
            self.cors_lines_for(cors, origin)
        )
        .into_bytes()
    }
}

/// `scheme://host[:port]` as a browser serialises it: a scheme of letters,
/// digits, `+ - .`; a host without `/ ? # @` or whitespace; nothing after.
fn looks_like_origin(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let host_ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'@'));
    scheme_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(entries: &[&str], credentials: bool) -> Origins {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        Origins::new(&entries, credentials).unwrap()
    }

    #[test]
    fn an_empty_list_checks_nothing_and_sends_no_cors_headers() {
        let o = origins(&[], false);
        assert!(!o.is_on());
        assert_eq!(
            o.check(Some("https://evil.example")),
            Verdict::Allowed { cors: 0 }
        );
        assert_eq!(o.check(None), Verdict::Allowed { cors: 0 });
        let pre = String::from_utf8(o.preflight_response(Some("https://a.example"), true)).unwrap();
        assert!(pre.starts_with("HTTP/1.1 403 "));
        assert!(!pre.contains("Access-Control"));
    }

    #[test]
    fn listed_origins_pass_with_their_own_headers_and_others_are_refused() {
        let o = origins(&["https://app.example", "HTTPS://Admin.Example:8443"], true);
        assert_eq!(
            o.check(Some("https://app.example")),
            Verdict::Allowed { cors: 1 }
        );
        assert_eq!(
            o.check(Some("https://admin.example:8443")),
            Verdict::Allowed { cors: 2 }
        );
        assert_eq!(
            o.cors_lines(2),
            "Access-Control-Allow-Origin: https://admin.example:8443\r\nVary: Origin\r\n\
             Access-Control-Allow-Credentials: true\r\n\
             Access-Control-Expose-Headers: Retry-After\r\n"
        );
        for refused in [
            "https://evil.example",
            "http://app.example",
            "https://app.example.evil.example",
            "https://app.example:443",
            "null",
            "",
        ] {
            assert_eq!(o.check(Some(refused)), Verdict::Refused, "{refused}");
        }
        // Not a cross-origin browser request.
        assert_eq!(o.check(None), Verdict::Allowed { cors: 0 });
        assert_eq!(o.cors_lines(0), "");
    }

    #[test]
    fn any_origin_gets_the_star_without_credentials() {
        let o = origins(&["https://app.example", "*"], false);
        assert_eq!(
            o.check(Some("https://app.example")),
            Verdict::Allowed { cors: 1 }
        );
        let Verdict::Allowed { cors } = o.check(Some("https://else.example")) else {
            panic!("refused")
        };
        assert_eq!(
            o.cors_lines(cors),
            "Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: Retry-After\r\n"
        );
        assert_eq!(
            Origins::new(&["*".to_string()], true).unwrap_err(),
            OriginsError::AnyWithCredentials
        );
    }

    #[test]
    fn entries_that_no_browser_would_send_are_refused_at_start_up() {
        for bad in [
            "https://app.example/",
            "https://app.example/path",
            "app.example",
            "https://",
            "https://user@app.example",
            "https://app.example?x",
            " https://app.example",
            "1http://app.example",
        ] {
            assert!(
                matches!(
                    Origins::new(&[bad.to_string()], false),
                    Err(OriginsError::NotAnOrigin(_))
                ),
                "{bad}"
            );
        }
        let many: Vec<String> = (0..=ORIGINS_MAX)
            .map(|i| format!("https://a{i}.example"))
            .collect();
        assert_eq!(
            Origins::new(&many, false).unwrap_err(),
            OriginsError::TooMany
        );
        assert!(Origins::new(&many[..ORIGINS_MAX], false).is_ok());
    }

    #[test]
    fn a_subdomain_pattern_allows_its_subdomains_and_echoes_the_origin() {
        let o = origins(
            &["https://*.example.com", "https://*.example.org:8443"],
            true,
        );
        for allowed in [
            "https://app.example.com",
            "https://a.b.example.com",
            "https://x-1.example.org:8443",
        ] {
            assert_eq!(
                o.check(Some(allowed)),
                Verdict::Allowed { cors: PATTERN_SLOT },
                "{allowed}"
            );
            assert_eq!(
                o.cors_lines_for(PATTERN_SLOT, Some(allowed)),
                format!(
                    "Access-Control-Allow-Origin: {allowed}\r\nVary: Origin\r\n\
                     Access-Control-Allow-Credentials: true\r\n\
                     Access-Control-Expose-Headers: Retry-After\r\n"
                )
            );
        }
        for refused in [
            "https://example.com",
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.org",
            "https://evilexample.com",
            "https://app.example.com.evil.net",
            "https://.example.com",
            "https://a..example.com",
            "https://a_b.example.com",
            "https://user@app.example.com",
        ] {
            assert_eq!(o.check(Some(refused)), Verdict::Refused, "{refused}");
        }
        let pre =
            String::from_utf8(o.preflight_response(Some("https://app.example.com"), true)).unwrap();
        assert!(pre.starts_with("HTTP/1.1 204 "), "{pre}");
        assert!(pre.contains("\r\nAccess-Control-Allow-Origin: https://app.example.com\r\n"));
        for bad in [
            "https://*",
            "https://*.",
            "https://a.*.com",
            "https://*example.com",
            "*.example.com",
        ] {
            assert!(Origins::new(&[bad.to_string()], false).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_preflight_from_a_listed_origin_is_answered_with_what_the_gateway_reads() {
        let o = origins(&["https://app.example"], false);
        let pre =
            String::from_utf8(o.preflight_response(Some("https://app.example"), false)).unwrap();
        assert!(pre.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(pre.contains("\r\nAccess-Control-Allow-Origin: https://app.example\r\n"));
        assert!(pre.contains("\r\nAccess-Control-Allow-Methods: GET\r\n"));
        assert!(pre.contains("Authorization, Last-Event-ID"));
        assert!(pre.contains("\r\nConnection: close\r\n"));
        assert!(!pre.contains("Credentials"));
        assert!(pre.ends_with("\r\n\r\n"));
        let refused =
            String::from_utf8(o.preflight_response(Some("https://evil.example"), true)).unwrap();
        assert!(refused.starts_with("HTTP/1.1 403 "));
        assert!(!refused.contains("Access-Control"));
    }
}
