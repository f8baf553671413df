//! One kit, both modes: a [`Deployment`] is either the four services on PostgreSQL, RabbitMQ
//! and Redis ([`System`]) or `ledger serve` on a data directory with those servers' ports closed
//! ([`Embedded`]). A test written against a deployment's public API (its base URL, the
//! bootstrap admin, tokens of the kit's secret) runs unchanged against either, which is how the
//! system tests prove SPEC §10's promise: the same paths, status codes, problem codes, bodies and
//! headers in both modes.
//!
//! [`Session`] is a caller of that API with a token: what a client library of the ledger would
//! be, reduced to what the tests need.

use std::time::Duration;

use infra::auth::Role;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::embedded::Embedded;
use crate::{ADMIN_PASSWORD, ADMIN_USERNAME, Overrides, System, token};

/// Which deployment a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// gateway, command-api, projector and fraud-worker as processes on the real servers.
    Distributed,
    /// `ledger serve`, needing none of those servers.
    Embedded,
}

/// A running ledger in one of the two modes.
pub enum Deployment {
    Distributed(System),
    Embedded(Embedded),
}

impl Deployment {
    /// Starts a fresh deployment of `mode` and waits until it reports ok.
    pub async fn start(mode: Mode) -> Deployment {
        match mode {
            Mode::Distributed => Deployment::Distributed(System::start(Overrides::default()).await),
            Mode::Embedded => Deployment::Embedded(Embedded::start().await),
        }
    }

    /// `http://127.0.0.1:<port>` of the public API (the gateway, or `ledger serve`).
    pub fn base(&self) -> &str {
        match self {
            Deployment::Distributed(system) => &system.gateway,
            Deployment::Embedded(embedded) => &embedded.base,
        }
    }

    pub fn client(&self) -> &reqwest::Client {
        match self {
            Deployment::Distributed(system) => &system.client,
            Deployment::Embedded(embedded) => &embedded.client,
        }
    }

    /// Stops it and deletes everything it made.
    pub async fn finish(self) {
        match self {
            Deployment::Distributed(system) => system.finish().await,
            Deployment::Embedded(embedded) => embedded.finish(),
        }
    }

    /// The bootstrap admin, logged in with its password.
    pub async fn admin(&self) -> Session {
        let id = Uuid::nil();
        let mut session = self.session(id, String::new());
        session.token = self.log_in(ADMIN_USERNAME, ADMIN_PASSWORD).await;
        session
    }

    /// A new customer, registered and logged in.
    pub async fn customer(&self) -> Session {
        let username = format!("c{}", &Uuid::new_v4().simple().to_string()[..12]);
        let password = "correct horse battery staple";
        let response = self
            .client()
            .post(format!("{}/api/v1/auth/register", self.base()))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .expect("register answers");
        assert_eq!(response.status(), StatusCode::CREATED, "registering");
        let body: Value = response.json().await.expect("JSON");
        let id = body["customer_id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .expect("a customer id");
        let token = self.log_in(&username, password).await;
        self.session(id, token)
    }

    /// The payment rail: a service identity with the `operator` role, its token minted with the
    /// deployment's secret as `ledger token` mints it.
    pub fn operator(&self) -> Session {
        let id = Uuid::new_v4();
        self.session(id, token(id, &[Role::Operator]))
    }

    /// A caller with a token of `roles` for subject `id` (e.g. an auditor).
    pub fn with_roles(&self, id: Uuid, roles: &[Role]) -> Session {
        self.session(id, token(id, roles))
    }

    /// A caller without a token.
    pub fn anonymous(&self) -> Session {
        self.session(Uuid::nil(), String::new())
    }

    fn session(&self, id: Uuid, token: String) -> Session {
        Session {
            id,
            token,
            base: self.base().to_owned(),
            client: self.client().clone(),
        }
    }

    async fn log_in(&self, username: &str, password: &str) -> String {
        let response = self
            .client()
            .post(format!("{}/api/v1/auth/token", self.base()))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .expect("token answers");
        assert_eq!(response.status(), StatusCode::OK, "logging in {username}");
        let body: Value = response.json().await.expect("JSON");
        body["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned()
    }
}

/// A caller of the public API with a token (or none).
#[derive(Clone)]
pub struct Session {
    /// Its subject: the customer id of a customer.
    pub id: Uuid,
    pub token: String,
    base: String,
    client: reqwest::Client,
}

/// An answer, read whole: status, headers and JSON body (`Value::Null` when not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    async fn read(response: Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("a body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The problem's stable `code` (errors are problem+json).
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// Whether the answer is `application/problem+json`.
    pub fn is_problem(&self) -> bool {
        self.header("content-type")
            .is_some_and(|kind| kind.starts_with("application/problem+json"))
    }

    /// The `id` field, as a UUID.
    pub fn id(&self) -> Uuid {
        self.body["id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .unwrap_or_else(|| panic!("no id in {self:?}"))
    }
}

impl Session {
    fn authorised(&self, request: RequestBuilder) -> RequestBuilder {
        if self.token.is_empty() {
            request
        } else {
            request.bearer_auth(&self.token)
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        let request = self.client.get(format!("{}{path}", self.base));
        let response = self.authorised(request).send().await.expect("GET answers");
        Answer::read(response).await
    }

    /// POSTs JSON, with an `Idempotency-Key` when given.
    pub async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Answer {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = self.authorised(request).send().await.expect("POST answers");
        Answer::read(response).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Answer {
        let request = self.client.put(format!("{}{path}", self.base)).json(body);
        let response = self.authorised(request).send().await.expect("PUT answers");
        Answer::read(response).await
    }

    /// POSTs raw bytes as JSON (bad input the JSON encoder would not write).
    pub async fn post_raw(&self, path: &str, key: Option<&str>, body: &'static str) -> Answer {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = self.authorised(request).send().await.expect("POST answers");
        Answer::read(response).await
    }

    /// Opens an account of its own in `currency`.
    pub async fn open_account(&self, currency: &str) -> Uuid {
        let answer = self
            .post(
                "/api/v1/accounts",
                None,
                &json!({"currency": currency, "name": "test"}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        answer.id()
    }

    /// POSTs a transaction with a fresh idempotency key.
    pub async fn transact(&self, body: &Value) -> Answer {
        let key = Uuid::new_v4().to_string();
        self.post("/api/v1/transactions", Some(&key), body).await
    }

    /// Deposits `amount` into `account` and waits until it is final; returns its status.
    pub async fn deposit(&self, account: Uuid, amount: &str, currency: &str) -> String {
        let answer = self
            .transact(&json!({
                "type": "deposit", "amount": amount, "currency": currency,
                "destination_account_id": account,
            }))
            .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        self.final_status(answer.id()).await
    }

    /// Waits until transaction `id` is CONFIRMED or REJECTED and says which. (Its settlement
    /// on the accounts follows; [`Session::account_when`] waits for a balance.)
    pub async fn final_status(&self, id: Uuid) -> String {
        let body = self
            .get_until(&format!("/api/v1/transactions/{id}"), "final", |body| {
                ["CONFIRMED", "REJECTED"].contains(&body["status"].as_str().unwrap_or(""))
            })
            .await;
        body["status"].as_str().unwrap_or_default().to_owned()
    }

    /// `GET /accounts/{id}` once its read model shows `balance` (the projector follows the log
    /// on its own).
    pub async fn account_when(&self, account: Uuid, balance: &str) -> Value {
        self.get_until(
            &format!("/api/v1/accounts/{account}"),
            &format!("at {balance}"),
            |body| body["balance"] == balance,
        )
        .await
    }

    /// GETs `path` every 50 ms until its body satisfies `wanted` and returns that body; fails
    /// the test after 30 s, showing the last body seen.
    async fn get_until(&self, path: &str, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let mut seen = Value::Null;
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let answer = self.get(path).await;
                if wanted(&answer.body) {
                    return answer.body;
                }
                seen = answer.body;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| panic!("{path} never {what}: {seen}"))
    }
}
