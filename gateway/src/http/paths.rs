//! The path guard (SPEC §5 "Paths"): the path that is authorised is exactly the path
//! forwarded. A path that a later reader could understand differently from the routing table is
//! refused with 400 `invalid_path` before routing:
//!
//! - a backslash, raw or encoded (`\`, `%5C`): URL parsers (the proxy's among them) read it as
//!   `/`, so `/api/v1/accounts/x\..\..\metrics` reached the projector's `/metrics`;
//! - an encoded slash, dot or percent sign (`%2F`, `%2E`, `%25`): decoded once by an upstream
//!   they become separators, dot segments or a second round of encoding;
//! - a dot segment (`.` or `..`) or an empty one (`//`): resolved or collapsed by the proxy's
//!   URL join or an upstream, they move the request to another path;
//! - a NUL, raw or encoded;
//! - percent-encoding that does not decode to UTF-8.
//!
//! Legitimate paths of this API are letters, digits, `-`, `_`, `.` inside names, and UUIDs: none
//! of them needs any of the above.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::Error;

/// Percent-encodings refused anywhere in a path, with what they hide.
const REFUSED_ENCODINGS: [(&str, &str); 5] = [
    ("%5c", "an encoded backslash"),
    ("%2f", "an encoded slash"),
    ("%2e", "an encoded dot"),
    ("%00", "an encoded NUL"),
    ("%25", "an encoded percent sign"),
];

/// Middleware for every route of the public listener.
pub async fn refuse_ambiguous_paths(request: Request, next: Next) -> Response {
    match ambiguity(request.uri().path()) {
        Some(reason) => Error::bad_request(
            "invalid_path",
            format!("the path is refused: it contains {reason}"),
        )
        .into_response(),
        None => next.run(request).await,
    }
}

/// What makes `path` ambiguous, if anything.
pub fn ambiguity(path: &str) -> Option<&'static str> {
    if path.contains('\\') {
        return Some("a backslash");
    }
    if path.contains('\0') {
        return Some("a NUL");
    }
    let lower = path.to_ascii_lowercase();
    if let Some((_, reason)) = REFUSED_ENCODINGS
        .iter()
        .find(|(encoding, _)| lower.contains(encoding))
    {
        return Some(reason);
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    if segments
        .iter()
        .any(|segment| matches!(*segment, "." | ".."))
    {
        return Some("a dot segment");
    }
    // An empty segment anywhere but last (a trailing slash is only a different path).
    if segments
        .iter()
        .take(segments.len().saturating_sub(1))
        .any(|segment| segment.is_empty())
    {
        return Some("an empty segment (//)");
    }
    if !decodes_to_utf8(path) {
        return Some("percent-encoding that is not UTF-8");
    }
    None
}

/// Whether the percent-decoded path is valid UTF-8 (and every `%` starts a valid escape).
fn decodes_to_utf8(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes
                .get(index + 1..index + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok());
            let Some(byte) = hex else {
                return false;
            };
            decoded.push(byte);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ambiguous_path_is_refused() {
        // Proves finding 4: each way of writing one path as another is refused.
        for path in [
            r"/api/v1/accounts/x\..\..\..\..\metrics",
            "/api/v1/accounts/x%5c..%5Cmetrics",
            "/api/v1/accounts/x%2F..%2fmetrics",
            "/api/v1/fraud/%2e%2E/admin",
            "/api/v1/fraud/../admin",
            "/api/./v1/accounts",
            "/api/v1/accounts/.",
            "/api//v1/accounts",
            "//evil.example/api/v1/accounts",
            "/api/v1/accounts/%00",
            "/api/v1/accounts/%252e%252e",
            "/api/v1/accounts/%FF",
            "/api/v1/accounts/%zz",
        ] {
            assert!(ambiguity(path).is_some(), "{path} must be refused");
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/api/v1/openapi.json",
            "/api/v1/accounts/0195f7c2-4b1e-7c3a-9d8e-1f2a3b4c5d6e/history",
            "/api/v1/accounts/",
            "/a/..b/c",
            "/a/.hidden",
            "/api/v1/accounts/%C3%A9",
            "/",
        ] {
            assert_eq!(ambiguity(path), None, "{path}");
        }
    }
}
