//! The HTTP/1.1 server every listener of every service runs (SPEC §6): hyper's connection
//! driver under bounds a slow or hostile client cannot stretch.
//!
//! `axum::serve` bounds nothing: a client that sends half a header, trickles a body or keeps an
//! idle connection open holds a task and a socket for as long as it likes, and enough of them
//! starve everyone else (slowloris). Here every connection is watched:
//!
//! - **headers**: a new connection, or the next request on a kept-alive one once its first byte
//!   arrived, has [`HttpLimits::header_timeout`] to deliver its whole head;
//! - **body**: a request body must arrive within [`HttpLimits::body_timeout`] of its headers;
//!   a late one ends in an error the handlers answer with 408 `request_timeout`;
//! - **idle**: a kept-alive connection with no request in flight is closed after
//!   [`HttpLimits::idle_timeout`] without a byte (the gateway's upstream pool forgets idle
//!   connections sooner, so it never reuses one the service is closing);
//! - **connections**: at most [`HttpLimits::max_connections`] at once; the next one waits in the
//!   listen backlog until one ends.
//!
//! The semantics are those of Go's `ReadHeaderTimeout`/`IdleTimeout`: the idle clock stops at
//! the next request's first byte, the header clock starts there. hyper's own
//! `header_read_timeout` cannot express both (its single timer covers idle and header time),
//! so it is off and a small watchdog per connection keeps the clocks instead.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, header};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// A new connection, or a kept-alive one whose next request has begun, sends its headers
/// within 10 s: a real client sends a request head of a few hundred bytes in one packet, even
/// on a poor mobile link; more time only serves a slowloris.
pub const HEADER_TIMEOUT_SECONDS: u64 = 10;

/// A request body arrives within 30 s of its headers: the largest accepted body (1 MiB) at
/// 300 kbit/s. Our bodies are under a kilobyte; a body slower than that is an attack or a
/// broken client.
pub const BODY_TIMEOUT_SECONDS: u64 = 30;

/// An idle kept-alive connection is closed after 90 s without a request: longer than the
/// gateway's upstream pool keeps an idle connection (`UPSTREAM_IDLE_TIMEOUT_SECONDS`, 60), so
/// the gateway always drops a connection before the service does and never sends a request
/// into one that is being closed; and longer than the 60 s idle timeout load balancers commonly
/// use in front of the gateway, for the same reason one hop out.
pub const IDLE_TIMEOUT_SECONDS: u64 = 90;

/// At most 1,024 connections at once per listener: four gateway instances with their full
/// upstream pools (`UPSTREAM_CONNECTIONS_MAX`, 256 each) fit behind one service, and a public
/// gateway serves a thousand clients at once before new ones wait in the listen backlog. Each
/// connection costs a task and about 64 KiB of buffers, so the bound is also a memory bound.
pub const MAX_CONNECTIONS: u32 = 1024;

/// How long a stopping server waits for its connections to finish their requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A pause after an accept error that is not about one connection (file descriptors
/// exhausted): retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Upper bounds of the settings: beyond them a timeout protects nothing.
const TIMEOUT_SECONDS_MAX: u64 = 3_600;
const CONNECTIONS_MAX_LIMIT: i64 = 1_000_000;

/// The bounds of one listener, from the environment (flattened into each service's `Config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct HttpLimits {
    /// Seconds a client has to send a request's headers, from connecting or from the request's
    /// first byte.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_SECONDS", default_value_t = HEADER_TIMEOUT_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_SECONDS_MAX))]
    pub http_header_timeout_seconds: u64,

    /// Seconds a client has to send a request's body, from the end of its headers.
    #[arg(long, env = "HTTP_BODY_TIMEOUT_SECONDS", default_value_t = BODY_TIMEOUT_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_SECONDS_MAX))]
    pub http_body_timeout_seconds: u64,

    /// Seconds a kept-alive connection may stay idle between requests.
    #[arg(long, env = "HTTP_IDLE_TIMEOUT_SECONDS", default_value_t = IDLE_TIMEOUT_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_SECONDS_MAX))]
    pub http_idle_timeout_seconds: u64,

    /// Connections served at once; further ones wait in the listen backlog.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=CONNECTIONS_MAX_LIMIT))]
    pub http_max_connections: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            http_header_timeout_seconds: HEADER_TIMEOUT_SECONDS,
            http_body_timeout_seconds: BODY_TIMEOUT_SECONDS,
            http_idle_timeout_seconds: IDLE_TIMEOUT_SECONDS,
            http_max_connections: MAX_CONNECTIONS,
        }
    }
}

impl HttpLimits {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.http_header_timeout_seconds)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.http_body_timeout_seconds)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.http_idle_timeout_seconds)
    }

    pub fn max_connections(&self) -> usize {
        usize::try_from(self.http_max_connections).unwrap_or(usize::MAX)
    }

    /// The limits as they may be logged.
    pub fn describe(&self) -> String {
        format!(
            "http_header_timeout_seconds={} http_body_timeout_seconds={} \
             http_idle_timeout_seconds={} http_max_connections={}",
            self.http_header_timeout_seconds,
            self.http_body_timeout_seconds,
            self.http_idle_timeout_seconds,
            self.http_max_connections,
        )
    }
}

/// Serves `router` on `listener` under `limits` until `stop` resolves; then stops accepting,
/// lets the requests in flight finish (up to [`SHUTDOWN_GRACE`]) and closes idle connections.
/// Handlers may read the client's address (`axum::extract::ConnectInfo<SocketAddr>`).
pub async fn serve(
    listener: TcpListener,
    limits: HttpLimits,
    router: Router,
    stop: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections()));
    let connections = TaskTracker::new();
    let draining = CancellationToken::new();
    let mut stop = pin!(stop);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut stop => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; should it be, stop serving rather than spin.
                Err(_closed) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, address) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if !is_connection_error(&error) {
                    tracing::error!(error.message = %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                continue;
            }
        };
        // Responses are small and written whole: Nagle's algorithm would only delay them.
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let draining = draining.clone();
        connections.spawn(async move {
            serve_connection(stream, address, router, limits, draining).await;
            drop(permit);
        });
    }
    drop(listener);
    draining.cancel();
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "connections still open after the shutdown grace period; dropping them"
        );
    }
}

/// Errors of one connection attempt, not of the listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Drives one connection and its watchdog: the connection ends when the client or the server
/// closes it, when a clock of [`Phase`] runs out, or (gracefully) when the server stops.
async fn serve_connection(
    stream: TcpStream,
    address: SocketAddr,
    router: Router,
    limits: HttpLimits,
    draining: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        activity: activity.clone(),
    });
    let body_timeout = limits.body_timeout();
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let router = router.clone();
        let activity = service_activity.clone();
        async move {
            activity.request_started();
            let body_read = Arc::new(AtomicBool::new(request.body().is_end_stream()));
            let mut request = request
                .map(|body| Body::new(TimedBody::new(body, body_timeout, body_read.clone())));
            request.extensions_mut().insert(ConnectInfo(address));
            let mut response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(infallible) => match infallible {},
            };
            if !body_read.load(Ordering::Acquire) {
                // Answered before the request's body was read (a 413, a 401…): hyper closes the
                // connection after this response, so say so. A client that is not told puts the
                // connection back in its pool, and its next request on it fails
                // (`IncompleteMessage`) when the close arrives.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(TrackedBody {
                    inner: body,
                    finished: Some(RequestFinished(activity)),
                })
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog below keeps the header and idle clocks; hyper's single timer cannot tell them
    // apart, so it stays off.
    builder.header_read_timeout(None);
    let mut connection = pin!(builder.serve_connection(io, service));
    let mut graceful = false;
    loop {
        let deadline = activity.deadline(&limits);
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(error.message = %error, "connection ended with an error");
                }
                return;
            }
            () = draining.cancelled(), if !graceful => {
                connection.as_mut().graceful_shutdown();
                graceful = true;
            }
            () = sleep_until_or_forever(deadline) => {
                if let Some(clock) = activity.expired(&limits, Instant::now()) {
                    tracing::debug!(client = %address, clock, "closing a connection: its time ran out");
                    metrics::counter!("http_connections_timed_out_total", "clock" => clock)
                        .increment(1);
                    // Dropping the connection closes the socket.
                    return;
                }
            }
            () = activity.changed.notified() => {}
        }
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Where a connection is in its life, for the watchdog's clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head since `since` (connected, or the first byte arrived).
    Head { since: Instant },
    /// Requests are being served; their bodies have clocks of their own.
    Serving { in_flight: u32 },
    /// Kept alive with nothing in flight since `since`.
    Idle { since: Instant },
}

/// What the watchdog knows about its connection, updated by the IO (bytes read) and by the
/// service (a request started, a response finished).
#[derive(Debug)]
struct Activity {
    phase: Mutex<Phase>,
    /// Wakes the watchdog. `notify_one` keeps a permit when it is not waiting, so a change
    /// between two of its turns is never missed.
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            // A client that connects owes its first request head at once.
            phase: Mutex::new(Phase::Head {
                since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, change: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        let next = change(*phase);
        if next != *phase {
            *phase = next;
            self.changed.notify_one();
        }
    }

    /// Bytes arrived: on an idle connection, the next request has begun.
    fn bytes_read(&self) {
        self.update(|phase| match phase {
            Phase::Idle { .. } => Phase::Head {
                since: Instant::now(),
            },
            other => other,
        });
    }

    fn request_started(&self) {
        self.update(|phase| match phase {
            Phase::Serving { in_flight } => Phase::Serving {
                in_flight: in_flight.saturating_add(1),
            },
            Phase::Head { .. } | Phase::Idle { .. } => Phase::Serving { in_flight: 1 },
        });
    }

    fn request_finished(&self) {
        self.update(|phase| match phase {
            Phase::Serving { in_flight } if in_flight > 1 => Phase::Serving {
                in_flight: in_flight - 1,
            },
            _ => Phase::Idle {
                since: Instant::now(),
            },
        });
    }

    fn current(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the running clock runs out, if one runs.
    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        match self.current() {
            Phase::Head { since } => Some(since + limits.header_timeout()),
            Phase::Idle { since } => Some(since + limits.idle_timeout()),
            Phase::Serving { .. } => None,
        }
    }

    /// The clock that ran out at `now`, if one did.
    fn expired(&self, limits: &HttpLimits, now: Instant) -> Option<&'static str> {
        match self.current() {
            Phase::Head { since } if now >= since + limits.header_timeout() => Some("header"),
            Phase::Idle { since } if now >= since + limits.idle_timeout() => Some("idle"),
            _ => None,
        }
    }
}

/// The socket, reporting reads to the watchdog.
struct WatchedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Marks the end of a response for the watchdog when dropped: hyper drops a response body once
/// it has written it (or once the connection is gone).
struct RequestFinished(Arc<Activity>);

impl Drop for RequestFinished {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that tells the watchdog when it is done.
struct TrackedBody {
    inner: Body,
    finished: Option<RequestFinished>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.finished.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a request body yields once its time is up. Handlers look for it in the error's
/// source chain ([`is_body_timeout`]) to answer 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", .0.as_secs())]
pub struct BodyTimedOut(pub Duration);

/// Whether `error` (or any of its causes) is a [`BodyTimedOut`].
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<BodyTimedOut>() {
            return true;
        }
        current = error.source();
    }
    false
}

/// A request body that fails with [`BodyTimedOut`] once `timeout` has passed since the request's
/// headers, however the bytes trickle in.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// Set once the body has been read to its end.
    read: Arc<AtomicBool>,
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration, read: Arc<AtomicBool>) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            read,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if frame.is_none() || self.inner.is_end_stream() {
                self.read.store(true, Ordering::Release);
            }
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let timeout = self.timeout;
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits {
            http_header_timeout_seconds: 10,
            http_body_timeout_seconds: 30,
            http_idle_timeout_seconds: 90,
            http_max_connections: 4,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_header_clock_runs_from_connecting_and_the_idle_clock_between_requests() {
        // Proves the watchdog's clocks: a fresh connection owes its head within the header
        // timeout; serving stops every clock; an idle connection gets the idle timeout, and the
        // next request's first byte switches back to the (shorter) header clock.
        let limits = limits();
        let activity = Activity::new();
        let start = Instant::now();
        assert_eq!(
            activity.deadline(&limits),
            Some(start + limits.header_timeout())
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(activity.expired(&limits, Instant::now()), Some("header"));

        activity.request_started();
        assert_eq!(activity.deadline(&limits), None, "no clock while serving");
        activity.request_started();
        activity.request_finished();
        assert_eq!(
            activity.deadline(&limits),
            None,
            "one request still in flight"
        );
        activity.request_finished();
        let idle_since = Instant::now();
        assert_eq!(
            activity.deadline(&limits),
            Some(idle_since + limits.idle_timeout())
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            activity.expired(&limits, Instant::now()),
            None,
            "60 s idle is allowed"
        );

        activity.bytes_read();
        let head_since = Instant::now();
        assert_eq!(
            activity.deadline(&limits),
            Some(head_since + limits.header_timeout())
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(activity.expired(&limits, Instant::now()), Some("header"));
    }

    /// Sends `head` and `body` on a fresh connection and returns the response head, lowercased.
    async fn response_head(address: SocketAddr, head: &str, body: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(address).await.expect("connects");
        stream.write_all(head.as_bytes()).await.expect("writes");
        stream.write_all(body).await.expect("writes");
        let mut answer = Vec::new();
        let mut buffer = [0_u8; 1024];
        while !answer.windows(4).any(|window| window == b"\r\n\r\n") {
            let read = stream.read(&mut buffer).await.expect("reads");
            assert!(read > 0, "the connection closed before the response head");
            answer.extend_from_slice(&buffer[..read]);
        }
        String::from_utf8_lossy(&answer).to_lowercase()
    }

    #[tokio::test]
    async fn a_response_before_the_body_was_read_says_the_connection_closes() {
        // Proves that a client is told not to reuse a connection hyper will close: a 413 sent
        // before the body was read carries `Connection: close`; an answer to a body that was
        // read does not.
        let router = Router::new()
            .route("/", axum::routing::post(|body: String| async move { body }))
            .layer(axum::extract::DefaultBodyLimit::max(16));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let address = listener.local_addr().expect("an address");
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            limits(),
            router,
            stop.clone().cancelled_owned(),
        ));

        let too_large = response_head(
            address,
            "POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 100000\r\n\r\n",
            &[b'x'; 1_000],
        )
        .await;
        assert!(too_large.starts_with("http/1.1 413"), "{too_large}");
        assert!(too_large.contains("connection: close"), "{too_large}");

        let read = response_head(
            address,
            "POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\n",
            b"hello",
        )
        .await;
        assert!(read.starts_with("http/1.1 200"), "{read}");
        assert!(!read.contains("connection: close"), "{read}");

        stop.cancel();
        let _ = server.await;
    }

    #[tokio::test]
    async fn past_the_connection_bound_a_client_waits_until_a_connection_ends() {
        // Proves `max_connections`: with the bound's worth of connections held open (and every
        // timeout far away, so nothing else closes them), the next client is not served; when
        // one held connection ends, it is. Without the bound it would be answered at once.
        let limits = HttpLimits {
            http_header_timeout_seconds: 60,
            http_max_connections: 2,
            ..limits()
        };
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let address = listener.local_addr().expect("an address");
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            limits,
            router,
            stop.clone().cancelled_owned(),
        ));

        let mut held = vec![
            TcpStream::connect(address).await.expect("connects"),
            TcpStream::connect(address).await.expect("connects"),
        ];
        let third = tokio::spawn(response_head(
            address,
            "GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n",
            b"",
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !third.is_finished(),
            "a third connection was served while two were held"
        );
        drop(held.pop());
        let answer = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("served once a held connection ended")
            .expect("no panic");
        assert!(answer.starts_with("http/1.1 200"), "{answer}");

        stop.cancel();
        drop(held);
        let _ = server.await;
    }

    #[test]
    fn a_body_timeout_is_found_in_an_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] BodyTimedOut);
        let error = Outer(BodyTimedOut(Duration::from_secs(1)));
        assert!(is_body_timeout(&error));
        assert!(!is_body_timeout(&io::Error::other("unrelated")));
    }
}
