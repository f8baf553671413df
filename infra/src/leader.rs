//! The leadership seam: one active runner of each follower (saga, relay, projector) across every
//! instance that could run it.
//!
//! - [`PgLeadership`]: a PostgreSQL advisory lock held on a dedicated connection (never a pooled
//!   one, which would carry the lock to whichever task borrowed the connection next). If the
//!   holder dies its session ends and the lock passes to a waiting instance.
//! - [`LocalLeadership`]: leadership inside one process, for the embedded mode, where the
//!   process itself holds the lock on its data directory and is the only runner there is.
//!
//! [`conformance`] is the suite both pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use crate::db::advisory_key;
use crate::error::{DatabaseContext, Result};

#[cfg(feature = "testing")]
pub mod conformance;

/// How often a standby instance retries the lock.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// Who may run a named follower now.
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Waits until this instance leads `name`; `None` if `cancel` fired first.
    async fn acquire(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Box<dyn Lease>>>;
}

/// A held leadership; dropping it gives it up.
#[async_trait]
pub trait Lease: Send {
    /// Whether it is still held: a leader checks about once a second, so one that lost its lock
    /// stops acting.
    async fn still_held(&mut self) -> bool;
}

/// Leadership through PostgreSQL advisory locks.
#[derive(Clone)]
pub struct PgLeadership {
    options: PgConnectOptions,
}

impl PgLeadership {
    pub fn new(options: PgConnectOptions) -> Self {
        PgLeadership { options }
    }
}

struct PgLease {
    connection: PgConnection,
    name: String,
}

#[async_trait]
impl Leadership for PgLeadership {
    async fn acquire(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Box<dyn Lease>>> {
        let key = advisory_key(&format!("leader/{name}"));
        let mut announced_standby = false;
        loop {
            let attempt = async {
                let mut connection = PgConnection::connect_with(&self.options)
                    .await
                    .context("connecting for a leader lock")?;
                let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut connection)
                    .await
                    .context("trying a leader lock")?;
                Ok::<_, crate::Error>(acquired.then_some(connection))
            };
            match attempt.await {
                Ok(Some(connection)) => {
                    tracing::info!(lock = name, "leadership acquired");
                    return Ok(Some(Box::new(PgLease {
                        connection,
                        name: name.to_owned(),
                    })));
                }
                Ok(None) if !announced_standby => {
                    tracing::info!(lock = name, "another instance leads; standing by");
                    announced_standby = true;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(lock = name, error.message = %error, "leader lock attempt failed");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(None),
                () = tokio::time::sleep(STANDBY_RETRY) => {}
            }
        }
    }
}

#[async_trait]
impl Lease for PgLease {
    async fn still_held(&mut self) -> bool {
        let alive = self.connection.ping().await.is_ok();
        if !alive {
            tracing::warn!(lock = %self.name, "leadership lost: lock session is gone");
        }
        alive
    }
}

/// Leadership within one process: one holder per name at a time.
#[derive(Clone, Default)]
pub struct LocalLeadership {
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

struct LocalLease {
    _held: OwnedMutexGuard<()>,
}

#[async_trait]
impl Leadership for LocalLeadership {
    async fn acquire(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Box<dyn Lease>>> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone();
        tokio::select! {
            () = cancel.cancelled() => Ok(None),
            held = lock.lock_owned() => Ok(Some(Box::new(LocalLease { _held: held }))),
        }
    }
}

#[async_trait]
impl Lease for LocalLease {
    async fn still_held(&mut self) -> bool {
        true
    }
}
