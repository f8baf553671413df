//! A service's background workers (saga, relay, consumers), supervised. A worker only ever ends
//! when the service stops; one that ends on its own (a panic, a bug) cancels the whole service,
//! which then exits with an error so that its supervisor restarts it, instead of serving
//! requests and a green `/health` while doing nothing. Workers are aborted if the service's
//! future is dropped, and a shutdown waits for them only for a bounded grace period.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// How long a stopping service waits for its workers to finish their current batch or message.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The workers of one service, sharing its cancellation token.
pub struct Workers {
    cancel: CancellationToken,
    handles: Vec<(&'static str, JoinHandle<()>)>,
    ended_early: Arc<Mutex<Vec<&'static str>>>,
}

impl Workers {
    pub fn new(cancel: CancellationToken) -> Self {
        Workers {
            cancel,
            handles: Vec::new(),
            ended_early: Arc::default(),
        }
    }

    /// Spawns `work`. If it ends (or panics) before the service is cancelled, the service is
    /// cancelled too.
    pub fn spawn(&mut self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        let ended_early = self.ended_early.clone();
        let handle = tokio::spawn(async move {
            // Dropped on return and during a panic's unwinding alike.
            let _stop_everything = cancel.clone().drop_guard();
            work.await;
            if !cancel.is_cancelled() {
                tracing::error!(
                    worker = name,
                    "worker stopped on its own; stopping the service"
                );
                ended_early
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(name);
            }
        });
        self.handles.push((name, handle));
    }

    /// Cancels every worker and waits for them, up to [`SHUTDOWN_GRACE`]; aborts the rest. An
    /// error names any worker that panicked, ended on its own, or overran the grace period.
    pub async fn stop(mut self) -> Result<()> {
        self.cancel.cancel();
        let mut failed: Vec<String> = Vec::new();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for (name, handle) in std::mem::take(&mut self.handles) {
            let abort = handle.abort_handle();
            match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(())) => {}
                Ok(Err(_panicked)) => failed.push(format!("{name} panicked")),
                Err(_overran) => {
                    abort.abort();
                    failed.push(format!("{name} did not stop within {SHUTDOWN_GRACE:?}"));
                }
            }
        }
        let early = self
            .ended_early
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        failed.extend(
            early
                .iter()
                .map(|name| format!("{name} stopped on its own")),
        );
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "background workers failed: {}",
                failed.join(", ")
            )))
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (_, handle) in &self.handles {
            handle.abort();
        }
    }
}

/// Serves `router` on `listener` under `limits` (`crate::server`) until `shutdown` resolves or a
/// worker stops on its own; then stops taking connections, lets in-flight requests finish, and
/// stops the workers. Handlers may read the client's socket address
/// (`axum::extract::ConnectInfo<std::net::SocketAddr>`), as the gateway's login limits do.
pub async fn serve_until_stopped(
    listener: tokio::net::TcpListener,
    limits: crate::server::HttpLimits,
    router: axum::Router,
    workers: Workers,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let stop = workers.cancel.clone();
    crate::server::serve(listener, limits, router, stopping(shutdown, stop)).await;
    workers.stop().await
}

/// Resolves when `shutdown` does or a worker cancelled the service.
async fn stopping(shutdown: impl Future<Output = ()>, stop: CancellationToken) {
    tokio::select! {
        () = shutdown => {}
        () = stop.cancelled() => {}
    }
}

/// Runs `future` to completion on a thread with a runtime of its own and waits for it: for
/// best-effort cleanup from `Drop`, where the caller's runtime may be unwinding.
pub fn block_on_own_runtime<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let worker = std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(future);
        }
    });
    let _ = worker.join();
}

/// Runs `future` on a thread of its own, with a single-threaded runtime of its own, until it
/// ends; the thread then ends too. For the task that drives a SQLite file's one writer
/// connection: each statement is a round trip to the connection's thread, and the answer wakes
/// the task from outside the runtime. On the service's runtime that wake-up waits behind
/// whatever the workers are doing (about half a millisecond per statement under load, measured
/// on `BEGIN IMMEDIATE`), and the writer holds the file's write lock meanwhile; alone on its
/// thread, the task is polled at once. Not for tasks that use sockets: those belong to the
/// runtime whose driver registered them.
pub fn spawn_on_own_thread<F>(name: &str, future: F) -> Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Error::Config(format!("cannot start a runtime for {name}: {error}")))?;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || runtime.block_on(future))
        .map_err(|error| Error::Config(format!("cannot start a thread for {name}: {error}")))?;
    Ok(())
}

/// Sleeps for `duration`, or less if `cancel` fires first.
pub async fn pause(cancel: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = cancel.cancelled() => {}
        () = tokio::time::sleep(duration) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_worker_that_panics_stops_the_service_with_an_error() {
        // Proves supervision: a panicking worker cancels its siblings and `stop` reports it.
        let cancel = CancellationToken::new();
        let mut workers = Workers::new(cancel.clone());
        let sibling = cancel.clone();
        workers.spawn("patient", async move { sibling.cancelled().await });
        workers.spawn("broken", async { panic!("a bug") });
        tokio::time::timeout(Duration::from_secs(5), cancel.cancelled())
            .await
            .expect("the panic cancelled the service");
        let error = workers.stop().await.expect_err("the panic is reported");
        assert!(error.to_string().contains("broken panicked"), "{error}");
    }

    #[tokio::test]
    async fn workers_that_stop_when_asked_stop_cleanly() {
        // Proves a normal shutdown reports no failure.
        let cancel = CancellationToken::new();
        let mut workers = Workers::new(cancel.clone());
        for name in ["saga", "relay"] {
            let token = cancel.clone();
            workers.spawn(name, async move { token.cancelled().await });
        }
        workers.stop().await.expect("a clean stop");
    }
}
