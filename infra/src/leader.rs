//! One active runner across instances: a PostgreSQL advisory lock held on a dedicated
//! connection (never a pooled one, which would carry the lock to whichever task borrowed the
//! connection next). If the holder dies its session ends and the lock passes to a waiting
//! instance.

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::db::advisory_key;
use crate::error::{DatabaseContext, Result};

/// How often a standby instance retries the lock.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// A held leadership. Dropping it closes the session, which releases the lock.
pub struct Leadership {
    connection: PgConnection,
    name: String,
}

impl Leadership {
    /// Waits until this instance holds the lock `name`, or `None` if cancelled first.
    pub async fn acquire(
        options: &PgConnectOptions,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Leadership>> {
        let key = advisory_key(&format!("leader/{name}"));
        let mut announced_standby = false;
        loop {
            let attempt = async {
                let mut connection = PgConnection::connect_with(options)
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
                    return Ok(Some(Leadership {
                        connection,
                        name: name.to_owned(),
                    }));
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

    /// Whether the lock's session is still alive: a leader checks before each batch, so one
    /// that lost its connection stops acting.
    pub async fn still_held(&mut self) -> bool {
        let alive = self.connection.ping().await.is_ok();
        if !alive {
            tracing::warn!(lock = %self.name, "leadership lost: lock session is gone");
        }
        alive
    }
}
