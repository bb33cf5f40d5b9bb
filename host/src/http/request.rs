//! One HTTP request head as the status child reads it, pure: parsing (with `httparse`, within
//! [`MAX_HEAD`] bytes), which route it names, whether it carries the token, which metrics
//! format it asks for.
//!
//! It never does I/O and never trusts the client: every header is optional, every value may be
//! garbage (not UTF-8, not base64, repeated), and none of that is more than a refusal. The token
//! and the session cookie are compared in constant time ([`crate::admin::token_matches`]).

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::admin::token_matches;

/// The longest request head accepted, in bytes (request line and headers, blank line included).
pub const MAX_HEAD: usize = 8 * 1024;

/// The most header lines read; more is a head too large, like one over [`MAX_HEAD`].
const MAX_HEADERS: usize = 64;

/// The cookie the page's script authenticates with once the page itself was loaded with the
/// token (see [`session_cookie`]).
pub const SESSION_COOKIE: &str = "jobhost_session";

/// What the child needs from a request head; the rest is dropped once parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    /// The request target's path, without its query.
    pub path: String,
    /// The first `Authorization` header's value.
    pub authorization: Option<Vec<u8>>,
    /// Every `Cookie` header's value.
    pub cookies: Vec<Vec<u8>>,
    /// Every `Accept` header, joined by commas.
    pub accept: String,
    /// The request announces a body (`Content-Length` other than 0, or `Transfer-Encoding`).
    pub has_body: bool,
}

/// The request's method: the two the child serves, or another one (refused with 405).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other,
}

/// Why a head cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Over [`MAX_HEAD`] bytes, or more than [`MAX_HEADERS`] header lines (431).
    #[error("request head too large")]
    TooLarge,
    /// Not HTTP/1.x (400).
    #[error("malformed request: {0}")]
    Malformed(httparse::Error),
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete (read more, unless
/// `buf` holds [`MAX_HEAD`] bytes already: then it is [`HeadError::TooLarge`]).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let status = match request.parse(buf) {
        Ok(status) => status,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(e)),
    };
    match status {
        httparse::Status::Partial if buf.len() >= MAX_HEAD => Err(HeadError::TooLarge),
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(len) if len > MAX_HEAD => Err(HeadError::TooLarge),
        httparse::Status::Complete(_) => {
            let method = match request.method {
                Some("GET") => Method::Get,
                Some("HEAD") => Method::Head,
                _ => Method::Other,
            };
            let target = request.path.unwrap_or("");
            let path = target.split(['?', '#']).next().unwrap_or("").to_owned();
            let mut head = Head {
                method,
                path,
                authorization: None,
                cookies: Vec::new(),
                accept: String::new(),
                has_body: false,
            };
            for header in request.headers.iter() {
                let name = header.name;
                if name.eq_ignore_ascii_case("authorization") {
                    if head.authorization.is_none() {
                        head.authorization = Some(header.value.to_vec());
                    }
                } else if name.eq_ignore_ascii_case("cookie") {
                    head.cookies.push(header.value.to_vec());
                } else if name.eq_ignore_ascii_case("accept") {
                    if !head.accept.is_empty() {
                        head.accept.push(',');
                    }
                    head.accept.push_str(&String::from_utf8_lossy(header.value));
                } else if name.eq_ignore_ascii_case("content-length") {
                    head.has_body |= header.value.trim_ascii() != b"0";
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    head.has_body = true;
                }
            }
            Ok(Some(head))
        }
    }
}

/// What the child serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/`: the status page.
    Page,
    /// `/page.js`: the page's script.
    Script,
    /// `/page.css`: the page's style sheet.
    Style,
    /// `/status.json`: what the page's script refreshes from.
    StatusJson,
    /// `/metrics`.
    Metrics,
}

/// The route a path names, if any. Paths are compared whole: there are no files behind them.
pub fn route(path: &str) -> Option<Route> {
    match path {
        "/" => Some(Route::Page),
        "/page.js" => Some(Route::Script),
        "/page.css" => Some(Route::Style),
        "/status.json" => Some(Route::StatusJson),
        "/metrics" => Some(Route::Metrics),
        _ => None,
    }
}

/// How a request proved it knows the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer TOKEN` or `Basic base64(USER:TOKEN)`.
    Header,
    /// The session cookie (see [`session_cookie`]).
    Cookie,
    /// Neither (missing or wrong).
    Denied,
}

/// Checks the request's credentials against `token` and the `cookie` derived from it.
/// A wrong `Authorization` header is denied even if a good cookie comes with it.
pub fn authenticate(head: &Head, token: &[u8], cookie: &str) -> Auth {
    if let Some(value) = &head.authorization {
        return if authorization_matches(value, token) {
            Auth::Header
        } else {
            Auth::Denied
        };
    }
    let offered = head
        .cookies
        .iter()
        .flat_map(|header| header.split(|&b| b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == SESSION_COOKIE.as_bytes())
                .then(|| pair[eq + 1..].trim_ascii())
        });
    // Every cookie of that name is compared (no early exit on the first wrong one).
    let mut good = false;
    for value in offered {
        good |= token_matches(value, cookie.as_bytes());
    }
    if good {
        Auth::Cookie
    } else {
        Auth::Denied
    }
}

/// `Bearer TOKEN` or `Basic base64(ANYUSER:TOKEN)` (schemes in any case), the token compared in
/// constant time.
fn authorization_matches(value: &[u8], token: &[u8]) -> bool {
    let value = value.trim_ascii();
    let (scheme, rest) = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(space) => (&value[..space], value[space..].trim_ascii()),
        None => (value, &b""[..]),
    };
    if scheme.eq_ignore_ascii_case(b"bearer") {
        token_matches(rest, token)
    } else if scheme.eq_ignore_ascii_case(b"basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
            return false;
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return false;
        };
        token_matches(&decoded[colon + 1..], token)
    } else {
        false
    }
}

/// The session cookie's value for `token`: SHA-256 of a fixed label and the token, in hex.
/// The same in every child the master starts (a restarted child keeps an open page working),
/// it changes with the token, and it does not give the token away (nor work on the admin
/// socket).
pub fn session_cookie(token: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"jobhost http session cookie v1\n");
    hash.update(token);
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// True when the client takes OpenMetrics (as the Prometheus server asks): client_golang's
/// rule, by the media type's presence in `Accept`.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept
        .to_ascii_lowercase()
        .contains("application/openmetrics-text")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes())
            .expect("parses")
            .expect("complete")
    }

    #[test]
    fn a_head_is_parsed_into_what_the_child_needs() {
        let h = head(
            "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: text/plain\r\naccept: application/openmetrics-text\r\n\
             Authorization: Bearer t\r\nAuthorization: Bearer u\r\nCookie: a=b\r\nCookie: c=d\r\n\r\n",
        );
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.path, "/metrics");
        assert_eq!(h.authorization.as_deref(), Some(&b"Bearer t"[..]));
        assert_eq!(h.cookies, vec![b"a=b".to_vec(), b"c=d".to_vec()]);
        assert_eq!(h.accept, "text/plain,application/openmetrics-text");
        assert!(!h.has_body);
        assert_eq!(head("HEAD / HTTP/1.0\r\n\r\n").method, Method::Head);
        assert_eq!(head("POST / HTTP/1.1\r\n\r\n").method, Method::Other);
        assert_eq!(head("get / HTTP/1.1\r\n\r\n").method, Method::Other);
        assert!(head("GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").has_body);
        assert!(!head("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").has_body);
        assert!(head("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").has_body);
    }

    #[test]
    fn an_incomplete_head_waits_until_it_is_too_large() {
        assert_eq!(parse_head(b""), Ok(None));
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD - 1, b'a');
        assert_eq!(parse_head(&long), Ok(None));
        long.push(b'a');
        assert_eq!(parse_head(&long), Err(HeadError::TooLarge));
        // Complete, but over the limit.
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&long), Err(HeadError::TooLarge));
        let many: String = std::iter::once("GET / HTTP/1.1\r\n".to_owned())
            .chain((0..=MAX_HEADERS).map(|i| format!("X{i}: y\r\n")))
            .collect();
        assert_eq!(parse_head(many.as_bytes()), Err(HeadError::TooLarge));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for garbage in [
            &b"\x00\x01\x02\xff\r\n\r\n"[..],
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET  HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert!(
                matches!(parse_head(garbage), Err(HeadError::Malformed(_))),
                "{garbage:?}: {:?}",
                parse_head(garbage)
            );
        }
    }

    #[test]
    fn routes_are_whole_paths() {
        assert_eq!(route("/"), Some(Route::Page));
        assert_eq!(route("/metrics"), Some(Route::Metrics));
        assert_eq!(route("/status.json"), Some(Route::StatusJson));
        assert_eq!(route("/page.js"), Some(Route::Script));
        assert_eq!(route("/page.css"), Some(Route::Style));
        for other in [
            "",
            "//",
            "/metrics/",
            "/../etc/passwd",
            "/%2e%2e/",
            "http://x/metrics",
            "*",
        ] {
            assert_eq!(route(other), None, "{other}");
        }
        assert_eq!(head("GET /metrics#frag HTTP/1.1\r\n\r\n").path, "/metrics");
    }

    #[test]
    fn the_token_is_taken_as_bearer_basic_or_the_session_cookie() {
        let token = b"s3cret token";
        let cookie = session_cookie(token);
        let with = |headers: &str| head(&format!("GET / HTTP/1.1\r\n{headers}\r\n"));
        let auth = |headers: &str| authenticate(&with(headers), token, &cookie);
        let basic = |user_pass: &str| {
            format!(
                "Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(user_pass)
            )
        };
        assert_eq!(auth("Authorization: Bearer s3cret token\r\n"), Auth::Header);
        assert_eq!(
            auth("Authorization: bearer   s3cret token \r\n"),
            Auth::Header
        );
        assert_eq!(auth(&basic("anyone:s3cret token")), Auth::Header);
        assert_eq!(auth(&basic(":s3cret token")), Auth::Header);
        assert_eq!(
            auth(&format!("Cookie: x=1; {SESSION_COOKIE}={cookie}\r\n")),
            Auth::Cookie
        );
        for denied in [
            String::new(),
            "Authorization: Bearer s3cret\r\n".to_owned(),
            "Authorization: Bearer s3cret tokenX\r\n".to_owned(),
            "Authorization: Bearer\r\n".to_owned(),
            "Authorization: s3cret token\r\n".to_owned(),
            "Authorization: Digest s3cret token\r\n".to_owned(),
            basic("s3cret token"),
            basic("anyone:wrong"),
            "Authorization: Basic !!!not base64\r\n".to_owned(),
            "Authorization: Basic \u{ff}\u{fe}\r\n".to_owned(),
            format!("Cookie: {SESSION_COOKIE}=nope\r\n"),
            format!("Cookie: {SESSION_COOKIE}\r\n"),
            format!("Cookie: other={cookie}\r\n"),
            // A wrong header is not rescued by a good cookie.
            format!("Authorization: Bearer no\r\nCookie: {SESSION_COOKIE}={cookie}\r\n"),
        ] {
            assert_eq!(auth(&denied), Auth::Denied, "{denied:?}");
        }
        // An empty token matches nothing.
        assert_eq!(
            authenticate(&with("Authorization: Bearer \r\n"), b"", ""),
            Auth::Denied
        );
        assert_eq!(
            authenticate(&with(&format!("Cookie: {SESSION_COOKIE}=\r\n")), b"", ""),
            Auth::Denied
        );
    }

    #[test]
    fn the_session_cookie_depends_on_the_token_and_is_not_it() {
        let a = session_cookie(b"a");
        assert_eq!(a, session_cookie(b"a"));
        assert_ne!(a, session_cookie(b"b"));
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn openmetrics_is_served_to_who_asks_for_it() {
        // What Prometheus 2.42 sends.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("Application/OpenMetrics-Text"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
    }
}
