//! SQLite for the embedded mode (`ledger serve`): files in the data directory, opened durable,
//! and versioned migrations per component.
//!
//! Every connection runs in WAL mode with `synchronous=FULL` (a commit survives power loss;
//! `NORMAL` can lose the last commits, NOTES) and a busy timeout, and is checked after it
//! connects: a file that would not make commits durable is refused. Several components keep
//! tables in one file (the event log, the followers' state, identity, the fraud counters), so
//! migrations are recorded per component in `ledger_migrations`, not in sqlx's single table.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Executor};

use crate::error::{DatabaseContext, Error, Result};

/// Rows (or listed keys) per statement when a batch writes or looks up many at once: up to 9
/// parameters each stays far under SQLite's 32,766, and a batch still needs few statements,
/// each a round trip to the connection's thread while the writer holds the file's lock.
pub const ROWS_PER_STATEMENT: usize = 512;

/// How long a writer waits for another's lock before failing. Writes are short (a batch, a
/// request), so seconds of waiting mean something is stuck.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request waits for a pooled connection before failing with a clear error.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// `PRAGMA synchronous` answers 2 for FULL (and 3 for EXTRA, which is at least as safe).
const SYNCHRONOUS_FULL: i64 = 2;

/// The page cache of a file's write connection, in KiB (SQLite's negative `cache_size`): the
/// index pages a batch touches (keys are random UUIDs) stay in memory instead of being read back
/// from the file while the connection holds the write lock. SQLite's default is 2 MiB; the cache
/// fills only as pages are used.
const WRITER_CACHE_KIB: &str = "-32768";

/// The options of every connection to `path` ([`configured`]).
pub fn options(path: &Path, create: bool) -> SqliteConnectOptions {
    configured(
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create),
    )
}

/// [`options`] for a file's write connection: with a larger page cache ([`WRITER_CACHE_KIB`]).
pub fn writer_options(path: &Path, create: bool) -> SqliteConnectOptions {
    options(path, create).pragma("cache_size", WRITER_CACHE_KIB)
}

/// Options from a `sqlite://` URL (tests, tools), [`configured`] as every connection is.
pub fn options_from_url(url: &str) -> Result<SqliteConnectOptions> {
    Ok(configured(SqliteConnectOptions::from_str(url).map_err(
        |error| Error::Config(format!("{url} is not a SQLite URL: {error}")),
    )?))
}

/// What every connection gets, however it names its file: WAL, `synchronous=FULL`, a busy
/// timeout, foreign keys, and temporary storage in memory. The last is for what SQLite keeps
/// only while a statement runs: the statement journal of a multi-row upsert (which may have to
/// undo its own rows on a conflict) and temporary sort trees. In a file they cost a write system
/// call per page; they are never part of what a commit makes durable.
fn configured(options: SqliteConnectOptions) -> SqliteConnectOptions {
    options
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        .pragma("temp_store", "MEMORY")
}

/// A pool on `options`, every connection checked durable.
pub async fn pool(options: SqliteConnectOptions, max_connections: u32) -> Result<SqlitePool> {
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|connection, _| {
            Box::pin(async move {
                assert_durable(connection)
                    .await
                    .map_err(|error| sqlx::Error::Configuration(Box::new(error)))
            })
        })
        .connect_with(options)
        .await
        .context("opening a SQLite database")
}

/// Refuses a connection that is not in WAL mode with `synchronous=FULL`.
pub async fn assert_durable(connection: &mut SqliteConnection) -> Result<()> {
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *connection)
        .await
        .context("reading PRAGMA synchronous")?;
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *connection)
        .await
        .context("reading PRAGMA journal_mode")?;
    if synchronous < SYNCHRONOUS_FULL || !journal.eq_ignore_ascii_case("wal") {
        return Err(Error::NotDurable(format!(
            "SQLite journal_mode={journal}, synchronous={synchronous} (need wal and FULL)"
        )));
    }
    Ok(())
}

/// One versioned migration of a component.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// Applies `component`'s migrations that are not applied yet, each in a transaction of its own,
/// in version order. A version recorded as applied is never run again; one missing from the
/// list while recorded as applied is refused (a newer binary's database).
pub async fn migrate(pool: &SqlitePool, component: &str, migrations: &[Migration]) -> Result<()> {
    let mut connection = pool
        .acquire()
        .await
        .context("acquiring a connection to migrate")?;
    connection
        .execute(
            "CREATE TABLE IF NOT EXISTS ledger_migrations (
                component   TEXT    NOT NULL,
                version     INTEGER NOT NULL,
                description TEXT    NOT NULL,
                applied_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                PRIMARY KEY (component, version)
            )",
        )
        .await
        .context("creating the migrations table")?;
    let applied: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM ledger_migrations WHERE component = ? ORDER BY version",
    )
    .bind(component)
    .fetch_all(&mut *connection)
    .await
    .context("reading applied migrations")?;
    if let Some(unknown) = applied
        .iter()
        .find(|version| !migrations.iter().any(|m| m.version == **version))
    {
        return Err(Error::Config(format!(
            "the database has {component} migration {unknown}, which this binary does not \
             know: it was written by a newer version"
        )));
    }
    let mut pending: Vec<&Migration> = migrations
        .iter()
        .filter(|migration| !applied.contains(&migration.version))
        .collect();
    pending.sort_by_key(|migration| migration.version);
    for migration in pending {
        // IMMEDIATE: two processes migrating at once serialise on the write lock, and the
        // second sees the first's row and skips.
        let mut transaction = connection
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context("starting a migration")?;
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM ledger_migrations WHERE component = ? AND version = ?",
        )
        .bind(component)
        .bind(migration.version)
        .fetch_optional(&mut *transaction)
        .await
        .context("reading applied migrations")?;
        if done.is_some() {
            continue;
        }
        (&mut *transaction)
            .execute(migration.sql)
            .await
            .map_err(|source| Error::Database {
                context: "applying a SQLite migration",
                source,
            })?;
        sqlx::query(
            "INSERT INTO ledger_migrations (component, version, description) VALUES (?, ?, ?)",
        )
        .bind(component)
        .bind(migration.version)
        .bind(migration.description)
        .execute(&mut *transaction)
        .await
        .context("recording a migration")?;
        transaction
            .commit()
            .await
            .context("committing a migration")?;
        tracing::info!(
            component,
            version = migration.version,
            description = migration.description,
            "SQLite migration applied"
        );
    }
    Ok(())
}

/// Runs `SELECT 1` with a deadline: a SQLite check of `/health`.
pub async fn ping(pool: &SqlitePool, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(pool)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrations_apply_once_per_component_and_refuse_unknown_versions() {
        // Proves the per-component migrations: applied once, recorded per component (two
        // components do not collide), and a database from a newer binary is refused.
        let directory = tempfile::tempdir().expect("a temporary directory");
        let pool = pool(options(&directory.path().join("test.sqlite"), true), 2)
            .await
            .expect("opens");
        let first = [Migration {
            version: 1,
            description: "a table",
            sql: "CREATE TABLE a (id INTEGER PRIMARY KEY)",
        }];
        migrate(&pool, "one", &first).await.expect("migrates");
        migrate(&pool, "one", &first)
            .await
            .expect("a second run is a no-op");
        let other = [Migration {
            version: 1,
            description: "b table",
            sql: "CREATE TABLE b (id INTEGER PRIMARY KEY)",
        }];
        migrate(&pool, "two", &other)
            .await
            .expect("another component");
        let error = migrate(&pool, "two", &[])
            .await
            .expect_err("an unknown applied version is refused");
        assert!(error.to_string().contains("newer version"), "{error}");
        let mut connection = pool.acquire().await.expect("a connection");
        assert_durable(&mut connection).await.expect("durable");
    }
}
