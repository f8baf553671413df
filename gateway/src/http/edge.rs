//! The edge: every request that is not one of the gateway's own routes. The routing table
//! names the target (404 or 405 problem+json when it names none); the bearer token is verified
//! with `infra::auth::Caller` (401 with `WWW-Authenticate`); the entry's roles are required
//! (403); then the request is forwarded. The services verify the token again themselves.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use infra::auth::Caller;
use infra::http::CorrelationId;

use super::AppState;
use crate::error::Error;
use crate::routes::{Resolution, Target};

pub async fn forward(State(state): State<AppState>, request: Request) -> Response {
    if has_dot_segment(request.uri().path()) {
        // The URL the proxy sends would resolve the segment, moving the request to another
        // path than the one the table and the role check saw.
        return Error::bad_request(
            "invalid_path",
            "paths with `.` or `..` segments are refused",
        )
        .into_response();
    }
    let route = match state.routes.resolve(request.method(), request.uri().path()) {
        Resolution::Route(route) => route,
        Resolution::MethodNotAllowed => return Error::MethodNotAllowed.into_response(),
        Resolution::NotFound => return no_route(),
    };
    let Target::Upstream(upstream) = route.target else {
        // A prefix the gateway answers itself, but none of its own routes matched.
        return no_route();
    };
    let (mut parts, body) = request.into_parts();
    let caller = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => caller,
        Err(problem) => return problem.into_response(),
    };
    if !route.roles.is_empty()
        && let Err(problem) = caller.require_any(&route.roles)
    {
        return problem.into_response();
    }
    let client_address = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip());
    let correlation_id = parts
        .extensions
        .get::<CorrelationId>()
        .map(|CorrelationId(id)| id.clone())
        .unwrap_or_default();
    let request = Request::from_parts(parts, body);
    state
        .proxy
        .forward(upstream, request, client_address, &correlation_id)
        .await
}

/// Whether a path has a `.` or `..` segment, also percent-encoded.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

fn no_route() -> Response {
    Error::not_found("not_found", "no such route").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_also_when_encoded() {
        for path in [
            "/api/v1/fraud/../admin",
            "/api/./v1",
            "/a/%2E%2e/b",
            "/a/%2e",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in ["/api/v1/openapi.json", "/a/..b/c", "/a/.hidden", "/"] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }
}
