//! PostgreSQL pools and migrations, one schema per service (SPEC §2).
//!
//! Every pool of a service sets `search_path` to the service's schema, so its unqualified tables
//! (including sqlx's `_sqlx_migrations`) live there and several services share one database
//! without colliding. Every session also gets an `idle_in_transaction_session_timeout`: one
//! forgotten open transaction anywhere would hold back every log follower (NOTES).

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres};

use crate::error::{DatabaseContext, Error, Result};

/// How long a connection may sit idle inside a transaction before the server ends it. Our own
/// transactions are short (one command, one batch); anything idle this long is a bug or a hang.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "30s";

/// How long a request waits for a pooled connection before failing with a clear error instead
/// of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks that a schema name is a plain lower-case identifier, since it is spliced into SQL.
pub fn validate_schema(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if first_ok
        && schema.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "schema name {schema:?} must match [a-z_][a-z0-9_]{{0,62}}"
        )))
    }
}

/// Connection options for `url` whose sessions work in `schema`; [`named`] names them.
pub fn connect_options(url: &str, schema: &str) -> Result<PgConnectOptions> {
    validate_schema(schema)?;
    let options = PgConnectOptions::from_str(url).map_err(|error| {
        Error::Config(format!(
            "DATABASE_URL is not a valid PostgreSQL URL: {error}"
        ))
    })?;
    Ok(options.options([
        ("search_path", schema),
        (
            "idle_in_transaction_session_timeout",
            IDLE_IN_TRANSACTION_TIMEOUT,
        ),
        // Every statement here is a short OLTP one. JIT compiles a query whose estimated cost
        // passes `jit_above_cost`, and estimates on tables without statistics grow with the
        // table: a 3 ms batch load took 200 ms once it crossed the threshold.
        ("jit", "off"),
    ]))
}

/// Names a session `<program> <role>` (`command-api committer`, `projector background`) in
/// `pg_stat_activity`, so an operator can tell which pool holds a connection or a lock; keeps an
/// `application_name` the URL set.
pub fn named(options: PgConnectOptions, role: &str) -> PgConnectOptions {
    if options.get_application_name().is_some() {
        return options;
    }
    // PostgreSQL keeps the first 63 bytes.
    let name: String = format!("{} {role}", program_name())
        .chars()
        .take(63)
        .collect();
    options.application_name(&name)
}

/// This program's name (`command-api`, `ledger`), or `ledger` when it cannot be told.
fn program_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|path| {
            path.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "ledger".to_owned())
}

/// A pool whose sessions work in `schema`, named `<program> <role>` in `pg_stat_activity`.
/// Connects at once, so a service whose database is unreachable at start fails with a clear
/// error (its migrations could not run anyway); once running, a lost database shows as 503 on
/// `/health` and the pool reconnects.
pub async fn connect(url: &str, schema: &str, max_connections: u32, role: &str) -> Result<PgPool> {
    pool(
        named(connect_options(url, schema)?, role),
        max_connections,
        Ping::BeforeAcquire,
    )
    .await
}

/// A pool like [`connect`]'s for background workers that retry a failed batch (the saga, the
/// relay, the projector): its connections are not pinged before each acquire, a round trip
/// the projector paid four times a batch (decision 62). sqlx still pings every connection when
/// it is released and drops one that fails, so only a connection that broke while idle in the
/// pool (the server restarted) reaches a worker: its batch fails once and is retried on a new
/// one. Pools that answer clients keep the ping, so a client never sees that error.
pub async fn connect_background(
    url: &str,
    schema: &str,
    max_connections: u32,
    role: &str,
) -> Result<PgPool> {
    pool(
        named(connect_options(url, schema)?, role),
        max_connections,
        Ping::OnRelease,
    )
    .await
}

/// When a pool checks that a connection is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ping {
    /// Before handing it out, and when it comes back (sqlx's default).
    BeforeAcquire,
    /// Only when it comes back.
    OnRelease,
}

/// A pool like [`connect`]'s whose every transaction is read-only, for jobs that must not write
/// (`ledger verify` and `replay`): they then need nothing beyond SELECT privileges, and a bug
/// that tried to write would fail rather than change a ledger under audit.
pub async fn connect_read_only(
    url: &str,
    schema: &str,
    max_connections: u32,
    role: &str,
) -> Result<PgPool> {
    let options = named(connect_options(url, schema)?, role)
        .options([("default_transaction_read_only", "on")]);
    pool(options, max_connections, Ping::BeforeAcquire).await
}

async fn pool(options: PgConnectOptions, max_connections: u32, ping: Ping) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(ping == Ping::BeforeAcquire)
        .after_connect(|connection, _| {
            Box::pin(async move {
                assert_durable(connection)
                    .await
                    .map_err(|error| sqlx::Error::Configuration(Box::new(error)))
            })
        })
        .connect_with(options)
        .await
        .context("connecting to PostgreSQL")
}

/// Refuses a session whose commits would not be durable: with `synchronous_commit = off` a
/// commit returns before its WAL is flushed, so a crash could lose what a 202 promised. Every
/// pooled session and the event log's committer are checked when they connect.
pub async fn assert_durable(connection: &mut sqlx::PgConnection) -> Result<()> {
    let setting: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *connection)
        .await
        .context("reading synchronous_commit")?;
    if setting == "off" {
        return Err(Error::NotDurable(setting));
    }
    Ok(())
}

/// Creates the schema if needed and applies the service's migrations, safely when several
/// instances start together: an advisory lock keyed by the schema serialises them.
pub async fn migrate(pool: &PgPool, schema: &str, migrator: &Migrator) -> Result<()> {
    validate_schema(schema)?;
    let mut connection = pool
        .acquire()
        .await
        .context("acquiring a connection to migrate")?;
    let key = advisory_key(&format!("migrate/{schema}"));
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *connection)
        .await
        .context("taking the migration lock")?;
    let result = async {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .execute(&mut *connection)
            .await
            .context("creating the schema")?;
        migrator
            .run(&mut *connection)
            .await
            .map_err(|source| Error::Migration {
                schema: schema.to_owned(),
                source,
            })
    }
    .await;
    // Unlock whatever happened; if the unlock fails the connection is closed below anyway.
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *connection)
        .await;
    if unlocked.is_err() {
        connection.detach();
    }
    result
}

/// A stable 64-bit key for an advisory lock name (FNV-1a). Stable across builds and processes,
/// which `std`'s hasher is not.
pub fn advisory_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// PostgreSQL's `feature_not_supported`, raised among other things by [`STALE_PLAN_ROUTINE`].
const FEATURE_NOT_SUPPORTED: &str = "0A000";

/// The server routine that refuses a statement a connection prepared before a table or view it
/// reads changed the type of a column it returns. Its message ("cached plan must not change
/// result type") follows the server's `lc_messages`; the routine's name does not.
const STALE_PLAN_ROUTINE: &str = "RevalidateCachedQuery";

/// Whether PostgreSQL refused a statement because the connection prepared it before a column it
/// returns changed type (a migration, a read model's new generation): it refuses it on that
/// connection for as long as the connection keeps it prepared ([`replanning`]).
fn is_stale_plan(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|error| error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .is_some_and(|error| {
            error.code() == FEATURE_NOT_SUPPORTED && error.routine() == Some(STALE_PLAN_ROUTINE)
        })
}

/// Runs `read` on a connection of `pool` and, if PostgreSQL refused a statement of it as
/// [`is_stale_plan`] (anywhere in the error's chain of causes), runs it once more on the same
/// connection with its statements prepared again. `reading` names what is read, for the log.
///
/// A change of the type of a column a read returns (migration 0003 gave the stream keys the
/// collation `"C"`, part of the result's type; a rebuild may switch a view to a generation of
/// another shape) leaves every statement prepared before it failing on that connection for as
/// long as the connection lives, and pools keep connections: a follower would fail every batch,
/// a query every request that drew that connection. The connection is handed to `read` and
/// back, so the retry runs on the one that failed (decision 74).
pub async fn replanning<T, E, F, Fut>(
    pool: &PgPool,
    reading: &'static str,
    mut read: F,
) -> std::result::Result<T, E>
where
    E: std::error::Error + From<Error> + 'static,
    F: FnMut(PoolConnection<Postgres>) -> Fut,
    Fut: Future<Output = (PoolConnection<Postgres>, std::result::Result<T, E>)>,
{
    let connection = pool.acquire().await.context("acquiring a connection")?;
    let (mut connection, result) = read(connection).await;
    match result {
        Err(error) if holds_stale_plan(&error) => {
            tracing::warn!(
                reading,
                error.message = %error,
                "a read was prepared before what it reads changed type; preparing it again"
            );
            connection
                .clear_cached_statements()
                .await
                .context("preparing the statements of a connection again")?;
            read(connection).await.1
        }
        other => other,
    }
}

/// Whether `error`, or any error that caused it, is [`is_stale_plan`].
fn holds_stale_plan(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error
            .downcast_ref::<sqlx::Error>()
            .is_some_and(is_stale_plan)
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// Runs `SELECT 1` with a deadline: the database check of `/health`.
pub async fn ping(pool: &PgPool, timeout: Duration) -> bool {
    answers(pool, "SELECT 1", timeout).await
}

/// Whether `statement` runs within `timeout`: a `/health` check of something more particular
/// than the database (a table, a grant).
pub async fn answers(pool: &PgPool, statement: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, sqlx::query(statement).execute(pool)).await,
        Ok(Ok(_))
    )
}

/// A throwaway database for tests and benchmarks: created with a unique name on the server of
/// `admin_url`, dropped (with any session still connected) by [`ScratchDatabase::drop_database`].
pub struct ScratchDatabase {
    admin_url: String,
    name: String,
}

impl ScratchDatabase {
    /// Creates `ledger_test_<uuid>` through `admin_url` (a URL of any existing database).
    pub async fn create(admin_url: &str) -> Result<ScratchDatabase> {
        let name = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(admin_url)
            .await
            .context("connecting to create a scratch database")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .context("creating a scratch database")?;
        admin
            .close()
            .await
            .context("closing the admin connection")?;
        Ok(ScratchDatabase {
            admin_url: admin_url.to_owned(),
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of the scratch database on the same server, with the admin URL's parameters
    /// (`?sslmode=disable`, say).
    pub fn url(&self) -> String {
        let (address, parameters) = match self.admin_url.split_once('?') {
            Some((address, parameters)) => (address, Some(parameters)),
            None => (self.admin_url.as_str(), None),
        };
        let base = match address.rfind('/') {
            Some(slash) if slash > "postgres://".len() => &address[..slash],
            _ => address,
        };
        match parameters {
            Some(parameters) => format!("{base}/{}?{parameters}", self.name),
            None => format!("{base}/{}", self.name),
        }
    }

    /// Drops the database, ending any session still connected to it.
    pub async fn drop_database(self) -> Result<()> {
        let mut admin = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .context("connecting to drop a scratch database")?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await
        .context("dropping a scratch database")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_database_keeps_the_admin_urls_server_and_parameters() {
        for (admin_url, expected) in [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/ledger_test_x",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable",
                "postgres://postgres@127.0.0.1:5432/ledger_test_x?sslmode=disable",
            ),
            (
                "postgres://postgres@localhost",
                "postgres://postgres@localhost/ledger_test_x",
            ),
            (
                "postgres://u:p@db/x?sslmode=require&application_name=t",
                "postgres://u:p@db/ledger_test_x?sslmode=require&application_name=t",
            ),
        ] {
            let scratch = ScratchDatabase {
                admin_url: admin_url.to_owned(),
                name: "ledger_test_x".to_owned(),
            };
            assert_eq!(scratch.url(), expected, "{admin_url}");
        }
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(validate_schema("command_api").is_ok());
        assert!(validate_schema("_x1").is_ok());
        assert!(validate_schema("").is_err());
        assert!(validate_schema("Command").is_err());
        assert!(validate_schema("a; DROP TABLE x").is_err());
        assert!(validate_schema("1abc").is_err());
    }

    #[test]
    fn sessions_are_named_after_the_program_and_pool_unless_the_url_names_them() {
        let options = connect_options("postgres://u@localhost/db", "command_api").expect("valid");
        let committer = named(options, "committer");
        let name = committer.get_application_name().expect("named");
        assert!(name.ends_with(" committer"), "{name}");
        assert!(name.starts_with(&program_name()), "{name}");

        let given = connect_options(
            "postgres://u@localhost/db?application_name=payments-ledger",
            "command_api",
        )
        .expect("valid");
        assert_eq!(
            named(given, "pool").get_application_name(),
            Some("payments-ledger"),
            "the operator's name wins"
        );

        let long = named(
            connect_options("postgres://u@localhost/db", "x").expect("valid"),
            &"r".repeat(100),
        );
        assert_eq!(
            long.get_application_name().map(|name| name.chars().count()),
            Some(63),
            "PostgreSQL would cut it anyway"
        );
    }

    #[test]
    fn advisory_keys_are_stable_and_distinct() {
        assert_eq!(advisory_key("saga"), advisory_key("saga"));
        assert_ne!(advisory_key("saga"), advisory_key("relay"));
        // FNV-1a of the empty string is its offset basis: proves the function is the documented one.
        assert_eq!(advisory_key(""), 0xcbf2_9ce4_8422_2325_u64 as i64);
    }
}
