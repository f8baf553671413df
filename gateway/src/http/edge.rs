//! The edge: every request that is not one of the gateway's own routes. The routing table
//! names the target (404 or 405 problem+json when it names none); the bearer token is verified
//! with `infra::auth::Caller` (401 with `WWW-Authenticate`); the entry's roles are required
//! (403); then the request is forwarded, over HTTP or to a router in this process. The
//! services verify the token again themselves.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use infra::auth::Caller;
use infra::http::CorrelationId;

use tower::ServiceExt;

use super::{AppState, Upstreams};
use crate::error::Error;
use crate::routes::{Resolution, Target};

/// Forwards a request the path guard (`super::paths`) let through.
pub async fn forward(State(state): State<AppState>, request: Request) -> Response {
    let route = match state.routes.resolve(request.method(), request.uri().path()) {
        Resolution::Route(route) => route,
        Resolution::MethodNotAllowed => {
            return method_not_allowed(&state.routes.allowed_methods(request.uri().path()));
        }
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
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip());
    let correlation_id = parts
        .extensions
        .get::<CorrelationId>()
        .map(|CorrelationId(id)| id.clone())
        .unwrap_or_default();
    let request = Request::from_parts(parts, body);
    match &state.upstreams {
        Upstreams::Proxy(proxy) => {
            proxy
                .forward(upstream, request, peer, &correlation_id)
                .await
        }
        Upstreams::InProcess(router) => {
            let request = match crate::proxy::in_process_request(
                request,
                peer,
                &state.trusted_proxies,
                &correlation_id,
            ) {
                Ok(request) => request,
                Err(problem) => return problem.into_response(),
            };
            match router.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    }
}

/// 405 with the `Allow` header RFC 9110 asks for: the methods the path's prefix takes.
fn method_not_allowed(allowed: &[axum::http::Method]) -> Response {
    let mut response = Error::MethodNotAllowed.into_response();
    let names: Vec<&str> = allowed.iter().map(axum::http::Method::as_str).collect();
    if let Ok(value) = axum::http::HeaderValue::from_str(&names.join(", ")) {
        response
            .headers_mut()
            .insert(axum::http::header::ALLOW, value);
    }
    response
}

fn no_route() -> Response {
    Error::not_found("not_found", "no such route").into_response()
}
