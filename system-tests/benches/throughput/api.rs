//! The ledger's public API as the load generator uses it: logins, accounts, transfers, reads.
//! Lean on purpose, since it shares the two cores with the system it measures: keep-alive
//! connections, tokens minted once, bodies formatted without a JSON tree, no per-request logs.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use rand::Rng;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::system::Login;

/// How long one request may take before it counts as a transport error. Longer than the
/// gateway's 30 s upstream timeout, so the gateway's own answer (504) is what we see.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

/// The largest transfer, in cents (0.99): transfers are 0.01 to 0.99, as the issue asks.
const TRANSFER_CENTS_MAX: u32 = 99;

/// The header that carries a log position for read-your-writes.
pub const POSITION_HEADER: &str = "x-ledger-position";

/// A place in the log as the API writes it (`<tx_id>.<position>`), ordered as the log is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position(i64, i64);

impl Position {
    fn parse(text: &str) -> Option<Position> {
        let (transaction, position) = text.split_once('.')?;
        Some(Position(transaction.parse().ok()?, position.parse().ok()?))
    }

    pub fn header(self) -> String {
        format!("{}.{}", self.0, self.1)
    }
}

/// An HTTP client of its own connections (keep-alive), at most `connections` kept idle.
pub fn client(connections: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building an HTTP client")
}

/// What one POST of a transfer got.
pub enum Posted {
    /// 202: the transaction's id, its position and the POST's latency.
    Accepted {
        id: Uuid,
        position: Option<Position>,
        latency: Duration,
    },
    /// Any other status.
    Refused(StatusCode),
    /// No answer: connection error or timeout.
    Failed,
}

#[derive(Deserialize)]
struct WithId {
    id: Uuid,
}

#[derive(Deserialize)]
struct WithStatus {
    status: String,
}

#[derive(Deserialize)]
struct Page {
    items: Vec<Value>,
}

/// A logged-in client of the API at one base URL.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    /// The bearer token, minted once.
    pub token: String,
}

impl Api {
    /// Logs `login` in and keeps its token.
    pub async fn login(base: &str, client: reqwest::Client, login: &Login) -> anyhow::Result<Api> {
        let response = client
            .post(format!("{base}/api/v1/auth/token"))
            .json(&json!({"username": login.username, "password": login.password}))
            .send()
            .await
            .context("logging in")?;
        ensure!(
            response.status() == StatusCode::OK,
            "logging in as {} answered {}",
            login.username,
            response.status()
        );
        let body: Value = response.json().await.context("reading the token")?;
        let token = body["access_token"]
            .as_str()
            .context("the login answer has no access_token")?
            .to_owned();
        Ok(Api {
            base: base.to_owned(),
            client,
            token,
        })
    }

    /// Registers a customer and logs it in.
    pub async fn register(
        base: &str,
        client: reqwest::Client,
        login: &Login,
    ) -> anyhow::Result<Api> {
        let response = client
            .post(format!("{base}/api/v1/auth/register"))
            .json(&json!({"username": login.username, "password": login.password}))
            .send()
            .await
            .context("registering")?;
        ensure!(
            response.status() == StatusCode::CREATED,
            "registering answered {}",
            response.status()
        );
        Api::login(base, client, login).await
    }

    /// The same identity with a token of `ttl_seconds` minted with `config` (the claims the
    /// gateway put in its short access token): a benchmark's runs outlast access tokens.
    pub fn lengthen(
        self,
        config: &infra::auth::TokenConfig,
        ttl_seconds: i64,
    ) -> anyhow::Result<Api> {
        let caller = infra::auth::JwtVerifier::new(config)
            .context("a verifier")?
            .verify(&self.token)
            .map_err(|error| anyhow::anyhow!("the gateway's token does not verify: {error}"))?;
        let token = infra::auth::JwtSigner::new(config)
            .context("a signer")?
            .mint(
                caller.subject,
                &caller.roles,
                chrono::Utc::now().timestamp(),
                ttl_seconds,
            )
            .context("minting a long token")?;
        Ok(Api { token, ..self })
    }

    /// The same identity on other connections.
    pub fn with_client(&self, client: reqwest::Client) -> Api {
        Api {
            client,
            ..self.clone()
        }
    }

    /// Opens a USD account and returns its id.
    pub async fn open_account(&self, name: &str) -> anyhow::Result<Uuid> {
        let response = self
            .client
            .post(format!("{}/api/v1/accounts", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"currency": "USD", "name": name}))
            .send()
            .await
            .context("opening an account")?;
        ensure!(
            response.status() == StatusCode::CREATED,
            "opening an account answered {}",
            response.status()
        );
        Ok(response
            .json::<WithId>()
            .await
            .context("reading the account")?
            .id)
    }

    /// POSTs a transaction body with a fresh `Idempotency-Key`.
    pub async fn post_transaction(&self, body: String) -> Posted {
        let sent = Instant::now();
        let answer = self
            .client
            .post(format!("{}/api/v1/transactions", self.base))
            .bearer_auth(&self.token)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        let Ok(response) = answer else {
            return Posted::Failed;
        };
        let status = response.status();
        let position = response
            .headers()
            .get(POSITION_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(Position::parse);
        let Ok(bytes) = response.bytes().await else {
            return Posted::Failed;
        };
        let latency = sent.elapsed();
        if status != StatusCode::ACCEPTED {
            return Posted::Refused(status);
        }
        match serde_json::from_slice::<WithId>(&bytes) {
            Ok(body) => Posted::Accepted {
                id: body.id,
                position,
                latency,
            },
            Err(_) => Posted::Failed,
        }
    }

    /// A transaction's status (`Ok(Err(status))` for a non-200 answer).
    pub async fn transaction_status(
        &self,
        id: Uuid,
        position: Option<Position>,
    ) -> anyhow::Result<Result<String, StatusCode>> {
        let mut request = self
            .client
            .get(format!("{}/api/v1/transactions/{id}", self.base))
            .bearer_auth(&self.token);
        if let Some(position) = position {
            request = request.header(POSITION_HEADER, position.header());
        }
        let response = request.send().await.context("reading a transaction")?;
        let status = response.status();
        if status != StatusCode::OK {
            let _ = response.bytes().await;
            return Ok(Err(status));
        }
        let body: WithStatus = response.json().await.context("decoding a transaction")?;
        Ok(Ok(body.status))
    }

    /// A GET of a transaction, body read and dropped: the status and the latency.
    pub async fn get_transaction(&self, id: Uuid) -> Option<(StatusCode, Duration)> {
        let sent = Instant::now();
        let response = self
            .client
            .get(format!("{}/api/v1/transactions/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        let status = response.status();
        response.bytes().await.ok()?;
        Some((status, sent.elapsed()))
    }

    /// Whether the first page of transactions with `status` is empty, as of `position` (the
    /// read side waits until it has applied the log up to there). `Err` carries a non-200
    /// status, e.g. 503 when the read side did not reach the position within its wait.
    pub async fn none_with_status(
        &self,
        status: &str,
        position: Option<Position>,
    ) -> anyhow::Result<Result<bool, StatusCode>> {
        let mut request = self
            .client
            .get(format!(
                "{}/api/v1/transactions?status={status}&page_size=1",
                self.base
            ))
            .bearer_auth(&self.token);
        if let Some(position) = position {
            request = request.header(POSITION_HEADER, position.header());
        }
        let response = request.send().await.context("listing transactions")?;
        if response.status() != StatusCode::OK {
            return Ok(Err(response.status()));
        }
        let page: Page = response.json().await.context("decoding a page")?;
        Ok(Ok(page.items.is_empty()))
    }
}

/// The body of a deposit of `amount` (a decimal string) into `account`.
pub fn deposit_body(account: Uuid, amount: &str) -> String {
    format!(
        r#"{{"type":"deposit","amount":"{amount}","currency":"USD","destination_account_id":"{account}"}}"#
    )
}

/// The body of a transfer of 0.01 to 0.99 between two distinct accounts drawn from `accounts`
/// (at least two).
pub fn random_transfer(rng: &mut impl Rng, accounts: &[Uuid]) -> String {
    let source = rng.random_range(0..accounts.len());
    let offset = rng.random_range(1..accounts.len());
    let destination = (source + offset) % accounts.len();
    let cents = rng.random_range(1..=TRANSFER_CENTS_MAX);
    format!(
        r#"{{"type":"transfer","amount":"0.{cents:02}","currency":"USD","source_account_id":"{}","destination_account_id":"{}"}}"#,
        accounts[source], accounts[destination]
    )
}
