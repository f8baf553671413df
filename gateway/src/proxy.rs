//! The reverse proxy (SPEC §5 "Routing"): forwards a request to an upstream with its path and
//! query unchanged, streaming both bodies, and answers problem+json when the upstream cannot:
//! 503 when it refuses or does not accept the connection (within the connect timeout), 504
//! when it does not answer in time, 502 when it breaks the exchange.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) are dropped both ways; every other header passes,
//! among them `Authorization`, `Idempotency-Key` and `X-Ledger-Position` up and
//! `X-Ledger-Position`, `Location`, `X-Cache` and `Idempotent-Replayed` back. The gateway adds
//! `X-Forwarded-For`, `X-Forwarded-Proto` and the request's resolved `X-Correlation-ID`.
//!
//! No answer names an internal address: the HTTP client's errors (which quote the upstream URL)
//! go to the log, query secrets redacted, and the client gets a fixed sentence. A request body
//! that breaks off, is malformed or arrives too late is the client's fault (400, 408), not the
//! upstream's. At most `UPSTREAM_CONNECTIONS_MAX` requests are in flight to one upstream.

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

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clients::{TrustedProxies, X_FORWARDED_FOR};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::routes::Upstream;

/// How long `/health` waits for an upstream's `/health`.
pub const UPSTREAM_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Idle keep-alive connections kept per upstream: enough for a burst of concurrent clients to
/// reuse connections instead of opening new ones.
const IDLE_CONNECTIONS_PER_UPSTREAM: usize = 64;

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

/// How the client's request body ended, when it did not end well: the upstream exchange
/// fails then, and the client, not the upstream, is answered for.
#[derive(Debug, Default)]
struct BodyTrouble {
    over_limit: AtomicBool,
    timed_out: AtomicBool,
    broken: AtomicBool,
}

/// The HTTP client and the upstreams' addresses.
#[derive(Clone)]
pub struct Proxy {
    client: reqwest::Client,
    health_client: reqwest::Client,
    upstreams: Arc<BTreeMap<Upstream, Url>>,
    /// One slot per request in flight to an upstream.
    slots: Arc<BTreeMap<Upstream, Arc<Semaphore>>>,
    trusted_proxies: Arc<TrustedProxies>,
    timeout: Duration,
    connect_timeout: Duration,
}

impl Proxy {
    pub fn new(config: &Config) -> Result<Proxy> {
        let timeout = Duration::from_secs(config.upstream_timeout_seconds);
        let connect_timeout = Duration::from_millis(config.upstream_connect_timeout_ms);
        let idle_timeout = Duration::from_secs(config.upstream_idle_timeout_seconds);
        let build = |builder: reqwest::ClientBuilder| {
            builder
                .connect_timeout(connect_timeout)
                // A proxy passes redirects on to its client and never follows them itself.
                .redirect(reqwest::redirect::Policy::none())
                // HTTP_PROXY and friends are for outgoing traffic, not for our own services.
                .no_proxy()
                .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_UPSTREAM)
                .pool_idle_timeout(idle_timeout)
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
        let slots = Upstream::ALL
            .into_iter()
            .map(|upstream| {
                let slots = usize::try_from(config.upstream_connections_max).unwrap_or(1);
                (upstream, Arc::new(Semaphore::new(slots)))
            })
            .collect();
        Ok(Proxy {
            client,
            health_client,
            upstreams: Arc::new(upstreams),
            slots: Arc::new(slots),
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            timeout,
            connect_timeout,
        })
    }

    fn url(&self, upstream: Upstream, path_and_query: &str) -> Result<Url> {
        let base = self
            .upstreams
            .get(&upstream)
            .ok_or_else(|| Error::config(format!("no address for {}", upstream.name())))?;
        base.join(path_and_query)
            .map_err(|_| Error::bad_request("invalid_path", "the path is not usable"))
    }

    /// A slot to `upstream`, waiting up to the connect timeout for one to free up.
    async fn slot(&self, upstream: Upstream) -> Result<OwnedSemaphorePermit> {
        let unavailable = |detail: &str| Error::UpstreamUnavailable {
            upstream: upstream.name(),
            detail: detail.to_owned(),
        };
        let slots = self
            .slots
            .get(&upstream)
            .ok_or_else(|| unavailable("no slots are configured"))?
            .clone();
        match tokio::time::timeout(self.connect_timeout, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(unavailable("its slots are closed")),
            Err(_waited) => Err(unavailable("every connection to it stayed busy")),
        }
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
        peer: Option<IpAddr>,
        correlation_id: &str,
    ) -> Response {
        let started = Instant::now();
        let response = match self.exchange(upstream, request, peer, correlation_id).await {
            Ok(response) => response,
            Err(error) => {
                let detail = match &error {
                    Error::BadGateway { detail, .. }
                    | Error::UpstreamUnavailable { detail, .. } => detail.as_str(),
                    _ => "",
                };
                tracing::warn!(
                    upstream = upstream.name(),
                    error.message = %error,
                    error.detail = %infra::telemetry::redact_secrets(detail),
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
        peer: Option<IpAddr>,
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
        let trusted = peer.is_some_and(|peer| self.trusted_proxies.trusts(peer));
        let headers = upstream_headers(&parts.headers, peer, trusted, correlation_id);
        let slot = self.slot(upstream).await?;
        let trouble = Arc::new(BodyTrouble::default());
        let mut outgoing = self.client.request(parts.method, url).headers(headers);
        if has_body {
            outgoing = outgoing.body(limited_body(body, trouble.clone()));
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
            Ok(Err(_)) if trouble.over_limit.load(Ordering::Relaxed) => {
                return Err(Error::PayloadTooLarge);
            }
            Ok(Err(_)) if trouble.timed_out.load(Ordering::Relaxed) => {
                return Err(Error::RequestTimeout);
            }
            Ok(Err(_)) if trouble.broken.load(Ordering::Relaxed) => {
                return Err(Error::UnreadableBody);
            }
            Ok(Err(error)) => return Err(classify(name, error, self.timeout)),
            Ok(Ok(response)) => response,
        };
        let status = upstream_response.status();
        let mut headers = upstream_response.headers().clone();
        strip_hop_by_hop(&mut headers);
        // The slot is held until the response body has been streamed to the client: until then
        // the upstream connection is busy.
        let body = upstream_response.bytes_stream().map(move |chunk| {
            let _slot = &slot;
            chunk
        });
        let mut response = Response::new(Body::from_stream(body));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// A routed request for a router in this process (`ledger serve`), as the proxy would send it:
/// refused on a declared length over the limit, with the forwarding headers and the correlation
/// id set the same way (a client's forged hops dropped), and its `Host` kept.
pub(crate) fn in_process_request(
    request: Request,
    peer: Option<IpAddr>,
    trusted_proxies: &TrustedProxies,
    correlation_id: &str,
) -> Result<Request> {
    let (mut parts, body) = request.into_parts();
    if content_length(&parts.headers)?.is_some_and(|length| length > BODY_BYTES_MAX as u64) {
        return Err(Error::PayloadTooLarge);
    }
    let trusted = peer.is_some_and(|peer| trusted_proxies.trusts(peer));
    let host = parts.headers.get(header::HOST).cloned();
    let mut headers = upstream_headers(&parts.headers, peer, trusted, correlation_id);
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
    parts.headers = headers;
    Ok(Request::from_parts(parts, body))
}

fn classify(upstream: &'static str, error: reqwest::Error, timeout: Duration) -> Error {
    let error = error.without_url();
    let detail = infra::problem::cause_chain(&error);
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

/// The request body as a stream that fails past [`BODY_BYTES_MAX`] bytes (for bodies without a
/// declared length), and records in `trouble` why the client's body failed, if it did.
fn limited_body(body: Body, trouble: Arc<BodyTrouble>) -> reqwest::Body {
    let mut seen: usize = 0;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(|error| {
            let timed_out = infra::server::is_body_timeout(&error);
            let flag = if timed_out {
                &trouble.timed_out
            } else {
                &trouble.broken
            };
            flag.store(true, Ordering::Relaxed);
            std::io::Error::other(error)
        })?;
        seen = seen.saturating_add(chunk.len());
        if seen > BODY_BYTES_MAX {
            trouble.over_limit.store(true, Ordering::Relaxed);
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
/// the upstream's), plus the forwarding headers and the correlation id. A trusted proxy's
/// `X-Forwarded-For` and `X-Forwarded-Proto` are passed on (the peer appended); anyone else's
/// are replaced, so an upstream never reads a forged hop.
fn upstream_headers(
    incoming: &HeaderMap,
    peer: Option<IpAddr>,
    peer_trusted: bool,
    correlation_id: &str,
) -> HeaderMap {
    let mut headers = incoming.clone();
    strip_hop_by_hop(&mut headers);
    let host = headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    let mut forwarded_for: Vec<String> = if peer_trusted {
        incoming
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .map(str::to_owned)
            .collect()
    } else {
        Vec::new()
    };
    if let Some(address) = peer {
        forwarded_for.push(address.to_canonical().to_string());
    }
    headers.remove(&X_FORWARDED_FOR);
    if let Ok(value) = HeaderValue::from_str(&forwarded_for.join(", "))
        && !forwarded_for.is_empty()
    {
        headers.insert(X_FORWARDED_FOR, value);
    }
    // The gateway serves plain HTTP; behind a TLS terminator (a trusted proxy) that one says.
    let proto = incoming
        .get(&X_FORWARDED_PROTO)
        .filter(|value| peer_trusted && matches!(value.as_bytes(), b"http" | b"https"))
        .cloned()
        .unwrap_or(HeaderValue::from_static("http"));
    headers.insert(X_FORWARDED_PROTO, proto);
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
        let headers =
            upstream_headers(&incoming, Some(IpAddr::from([127, 0, 0, 1])), true, "abc-1");
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
        let untrusted = upstream_headers(
            &incoming,
            Some(IpAddr::from([198, 51, 100, 7])),
            false,
            "abc-1",
        );
        assert_eq!(
            untrusted["x-forwarded-for"], "198.51.100.7",
            "a client's own X-Forwarded-For is not passed on"
        );
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
