//! What every crate's integration tests share about their environment: the servers they use
//! (`TEST_DATABASE_URL`, `TEST_AMQP_URL`, `TEST_REDIS_URL`, defaulting to the local ones), the
//! JWT secret every service's test app signs and verifies with, the bad tokens tests send,
//! logs on demand (`TEST_LOG=1`), and free ports. Each service's `testing` module re-exports
//! what its tests use. [`log_builder`] seeds a large domain-valid log for benchmarks.

pub mod log_builder;

/// The secret every test app signs and verifies tokens with, so that test apps of different
/// services accept each other's tokens.
pub const TEST_JWT_SECRET: &str = "integration-test-secret-of-at-least-32-bytes";

/// The token settings of every test app: [`TEST_JWT_SECRET`], the default issuer and audience.
pub fn test_token_config() -> crate::auth::TokenConfig {
    crate::auth::TokenConfig::with_secret(TEST_JWT_SECRET)
}

/// The server that holds the scratch databases: `TEST_DATABASE_URL`, or the local one.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| {
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".to_owned()
    })
}

/// The broker tests use: `TEST_AMQP_URL`, or the local one.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The Redis tests use: `TEST_REDIS_URL`, or the local one.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Prints the apps' logs when `TEST_LOG` is set.
pub fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        crate::telemetry::init_tracing(crate::telemetry::LogFormat::Pretty);
    }
}

/// A port nothing listens on right now, for a process a test starts itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("the OS hands out a free port")
}

/// Calls `attempt` until `again` says its answer is not worth retrying or `deadline` has passed,
/// pausing 50 ms between tries, and returns the last answer. For reads with `X-Ledger-Position`,
/// which answer 503 when the read side has not reached the position within its bounded wait (a
/// loaded test machine can stall it): a client retries that, and so do the tests.
pub async fn retry_while<T, F, Fut>(
    deadline: std::time::Duration,
    mut attempt: F,
    again: impl Fn(&T) -> bool,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let started = std::time::Instant::now();
    loop {
        let answer = attempt().await;
        if !again(&answer) || started.elapsed() > deadline {
            return answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A customer's claims for `subject`, issued now and expiring `expires_in` seconds from now
/// (negative: already expired).
pub fn customer_claims(subject: uuid::Uuid, expires_in: i64) -> crate::auth::Claims {
    let now = chrono::Utc::now().timestamp();
    crate::auth::Claims {
        sub: subject.to_string(),
        roles: vec!["customer".to_owned()],
        iss: "ledger".to_owned(),
        aud: "ledger-api".to_owned(),
        iat: now,
        nbf: now,
        exp: now + expires_in,
        jti: uuid::Uuid::new_v4().to_string(),
    }
}

/// Signs any claims with any HMAC `algorithm` and `secret`: the tokens a verifier must refuse,
/// which `JwtSigner` will not make.
pub fn sign_token(
    algorithm: jsonwebtoken::Algorithm,
    secret: &str,
    claims: &impl serde::Serialize,
) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(algorithm),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("test tokens sign")
}
