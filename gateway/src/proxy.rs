//! The reverse proxy (SPEC §5 "Routing"): forwards a request to an upstream with its path and
//! query unchanged, streaming both bodies, and answers problem+json when the upstream cannot:
//! 503 when it refuses or does not accept the connection (within the connect timeout), 504
//! when it does not answer in time, 502 when it breaks the exchange.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) are dropped both ways; every other header passes,
//! among them `Authorization`, `Idempotency-Key` and `X-Ledger-Position` up and
//! `X-Ledger-Position`, `Location`, `X-Cache` and `Idempotent-Replayed` back. The gateway adds
//! `X-Forwarded-For`, `X-Forwarded-Proto` and the request's resolved `X-Correlation-ID`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use infra::http::{BODY_BYTES_MAX, CORRELATION_HEADER};
use reqwest::Url;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::routes::Upstream;

/// How long `/health` waits for an upstream's `/health`.
pub const UPSTREAM_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Idle keep-alive connections kept per upstream: enough for a burst of concurrent clients to
/// reuse connections instead of opening new ones.
const IDLE_CONNECTIONS_PER_UPSTREAM: usize = 64;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The hop-by-hop headers of RFC 9110 §7.6.1, besides those `Connection` names.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The HTTP client and the upstreams' addresses.
#[derive(Clone)]
pub struct Proxy {
    client: reqwest::Client,
    health_client: reqwest::Client,
    upstreams: Arc<BTreeMap<Upstream, Url>>,
    timeout: Duration,
}

impl Proxy {
    pub fn new(config: &Config) -> Result<Proxy> {
        let timeout = Duration::from_secs(config.upstream_timeout_seconds);
        let connect_timeout = Duration::from_millis(config.upstream_connect_timeout_ms);
        let build = |builder: reqwest::ClientBuilder| {
            builder
                .connect_timeout(connect_timeout)
                // A proxy passes redirects on to its client and never follows them itself.
                .redirect(reqwest::redirect::Policy::none())
                // HTTP_PROXY and friends are for outgoing traffic, not for our own services.
                .no_proxy()
                .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_UPSTREAM)
                .tcp_nodelay(true)
                .build()
                .map_err(|error| Error::config(format!("cannot build the HTTP client: {error}")))
        };
        let client = build(reqwest::Client::builder().read_timeout(timeout))?;
        let health_client = build(reqwest::Client::builder().timeout(UPSTREAM_HEALTH_TIMEOUT))?;
        let upstreams = Upstream::ALL
            .into_iter()
            .map(|upstream| (upstream, config.upstream_url(upstream).clone()))
            .collect();
        Ok(Proxy {
            client,
            health_client,
            upstreams: Arc::new(upstreams),
            timeout,
        })
    }

    fn url(&self, upstream: Upstream, path_and_query: &str) -> Result<Url> {
        let base = self
            .upstreams
            .get(&upstream)
            .ok_or_else(|| Error::config(format!("no address for {}", upstream.name())))?;
        base.join(path_and_query)
            .map_err(|error| Error::bad_request("invalid_path", format!("unusable path: {error}")))
    }

    /// Whether `upstream` answers 200 on `/health` within [`UPSTREAM_HEALTH_TIMEOUT`].
    pub async fn healthy(&self, upstream: Upstream) -> bool {
        let Ok(url) = self.url(upstream, "/health") else {
            return false;
        };
        matches!(
            self.health_client.get(url).send().await,
            Ok(response) if response.status().is_success()
        )
    }

    /// Forwards `request` to `upstream` and returns its answer, or the problem+json that
    /// explains why there is none. Records the outcome in the proxy metrics.
    pub async fn forward(
        &self,
        upstream: Upstream,
        request: Request,
        client_address: Option<IpAddr>,
        correlation_id: &str,
    ) -> Response {
        let started = Instant::now();
        let response = match self
            .exchange(upstream, request, client_address, correlation_id)
            .await
        {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(
                    upstream = upstream.name(),
                    error.message = %error,
                    "the upstream gave no answer"
                );
                error.into_response()
            }
        };
        let labels = [
            ("upstream", upstream.name().to_owned()),
            ("status", response.status().as_u16().to_string()),
        ];
        metrics::counter!("gateway_proxied_requests_total", &labels).increment(1);
        metrics::histogram!("gateway_proxied_request_duration_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        response
    }

    async fn exchange(
        &self,
        upstream: Upstream,
        request: Request,
        client_address: Option<IpAddr>,
        correlation_id: &str,
    ) -> Result<Response> {
        let (parts, body) = request.into_parts();
        let declared_length = content_length(&parts.headers)?;
        if declared_length.is_some_and(|length| length > BODY_BYTES_MAX as u64) {
            return Err(Error::PayloadTooLarge);
        }
        let has_body = declared_length.is_some_and(|length| length > 0)
            || parts.headers.contains_key(header::TRANSFER_ENCODING);
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |path| path.as_str());
        let url = self.url(upstream, path_and_query)?;
        let headers = upstream_headers(&parts.headers, client_address, correlation_id);
        let over_limit = Arc::new(AtomicBool::new(false));
        let mut outgoing = self.client.request(parts.method, url).headers(headers);
        if has_body {
            outgoing = outgoing.body(limited_body(body, over_limit.clone()));
        }
        let name = upstream.name();
        let answered = tokio::time::timeout(self.timeout, outgoing.send()).await;
        let upstream_response = match answered {
            Err(_elapsed) => {
                return Err(Error::UpstreamTimeout {
                    upstream: name,
                    timeout_seconds: self.timeout.as_secs(),
                });
            }
            Ok(Err(_)) if over_limit.load(Ordering::Relaxed) => return Err(Error::PayloadTooLarge),
            Ok(Err(error)) => return Err(classify(name, &error, self.timeout)),
            Ok(Ok(response)) => response,
        };
        let status = upstream_response.status();
        let mut headers = upstream_response.headers().clone();
        strip_hop_by_hop(&mut headers);
        let mut response = Response::new(Body::from_stream(upstream_response.bytes_stream()));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

fn classify(upstream: &'static str, error: &reqwest::Error, timeout: Duration) -> Error {
    let detail = infra::problem::cause_chain(error);
    if error.is_connect() {
        Error::UpstreamUnavailable { upstream, detail }
    } else if error.is_timeout() {
        Error::UpstreamTimeout {
            upstream,
            timeout_seconds: timeout.as_secs(),
        }
    } else {
        Error::BadGateway { upstream, detail }
    }
}

/// The request's declared length, if any; 400 if it is not a number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    Error::bad_request("invalid_content_length", "Content-Length is not a number")
                })
        })
        .transpose()
}

/// The request body as a stream that fails (and raises `over_limit`) past [`BODY_BYTES_MAX`]
/// bytes, for bodies without a declared length.
fn limited_body(body: Body, over_limit: Arc<AtomicBool>) -> reqwest::Body {
    let mut seen: usize = 0;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen = seen.saturating_add(chunk.len());
        if seen > BODY_BYTES_MAX {
            over_limit.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other("the request body is over 1 MiB"));
        }
        Ok(chunk)
    });
    reqwest::Body::wrap_stream(stream)
}

/// Removes the hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|text| text.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(name);
    }
}

/// The headers sent upstream: the client's end-to-end headers, without `Host` (the client sets
/// the upstream's), plus the forwarding headers and the correlation id.
fn upstream_headers(
    incoming: &HeaderMap,
    client_address: Option<IpAddr>,
    correlation_id: &str,
) -> HeaderMap {
    let mut headers = incoming.clone();
    strip_hop_by_hop(&mut headers);
    let host = headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    let mut forwarded_for: Vec<String> = incoming
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::to_owned)
        .collect();
    if let Some(address) = client_address {
        forwarded_for.push(address.to_string());
    }
    headers.remove(&X_FORWARDED_FOR);
    if let Ok(value) = HeaderValue::from_str(&forwarded_for.join(", "))
        && !forwarded_for.is_empty()
    {
        headers.insert(X_FORWARDED_FOR, value);
    }
    // The gateway serves plain HTTP; behind a TLS terminator that one sets the header.
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    if let Ok(value) = HeaderValue::from_str(correlation_id) {
        headers.insert(HeaderName::from_static(CORRELATION_HEADER), value);
    }
    if let Some(length) = incoming.get(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, length.clone());
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut incoming = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic abc"),
            ("authorization", "Bearer t"),
            ("idempotency-key", "k1"),
            ("x-ledger-position", "1.2"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-correlation-id", "client value"),
            ("host", "gateway.example"),
        ] {
            incoming.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let headers = upstream_headers(&incoming, Some(IpAddr::from([127, 0, 0, 1])), "abc-1");
        for gone in [
            "connection",
            "keep-alive",
            "x-secret-hop",
            "te",
            "proxy-authorization",
            "host",
        ] {
            assert!(!headers.contains_key(gone), "{gone} is dropped");
        }
        assert_eq!(headers["authorization"], "Bearer t");
        assert_eq!(headers["idempotency-key"], "k1");
        assert_eq!(headers["x-ledger-position"], "1.2");
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "gateway.example");
        assert_eq!(headers["x-correlation-id"], "abc-1");
    }

    #[test]
    fn content_length_must_be_a_number() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_length(&headers).expect("absent is fine"), None);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(content_length(&headers).expect("a number"), Some(12));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("twelve"));
        assert!(content_length(&headers).is_err());
    }
}
