//! What the edge's tests share: a harness that starts the gateway and the real upstreams a test
//! asks for (command-api, the projector, the fraud worker, in process) on one scratch database
//! and cleans everything up, and the gateway's identity calls.

use gateway::limiter::{Clock, ManualClock};
use gateway::testing::{TestApp, TestOptions, admin_url, spawn_app};
use infra::db::ScratchDatabase;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

/// A password that passes the rules.
pub const PASSWORD: &str = "correct horse battery staple";

/// Which real upstreams a test needs.
#[derive(Default)]
pub struct Setup {
    pub command_api: bool,
    /// The projector on the same database (needs `command_api`, whose log it reads).
    pub projector: bool,
    pub fraud_worker: bool,
    pub gateway: TestOptions,
}

pub struct Harness {
    pub gateway: TestApp,
    pub command_api: Option<command_api::testing::TestApp>,
    pub fraud_worker: Option<fraud_worker::testing::TestApp>,
    pub projector: Option<projector::testing::TestProjector>,
    pub client: reqwest::Client,
    amqp_prefix: Option<String>,
    database: Option<ScratchDatabase>,
}

impl Harness {
    /// A scratch database, the upstreams asked for, and the gateway in front of them with a
    /// manual clock for the login limiter.
    pub async fn start_with(setup: Setup) -> Harness {
        let database = ScratchDatabase::create(&admin_url())
            .await
            .expect("a scratch database");
        let mut options = setup.gateway;
        let mut amqp_prefix = None;
        let command_api = if setup.command_api {
            let command_options = command_api::testing::TestOptions::default();
            amqp_prefix = Some(command_options.amqp_prefix.clone());
            let app = command_api::testing::spawn_app(&database.url(), &command_options)
                .await
                .expect("command-api starts");
            options.command_api_url = Some(app.address.clone());
            Some(app)
        } else {
            None
        };
        let fraud_worker = if setup.fraud_worker {
            let app =
                fraud_worker::testing::spawn_app(&fraud_worker::testing::TestOptions::default())
                    .await
                    .expect("the fraud worker starts");
            options.fraud_worker_url = Some(app.address.clone());
            Some(app)
        } else {
            None
        };
        let projector = if setup.projector {
            let app = projector::testing::spawn_projector(
                &database.url(),
                &projector::testing::TestOptions::default(),
            )
            .await
            .expect("the projector starts");
            options.query_api_url = Some(app.address.clone());
            Some(app)
        } else {
            None
        };
        let clock = ManualClock::new();
        options.clock = Clock::Manual(clock);
        let gateway = spawn_app(&database.url(), &options)
            .await
            .expect("the gateway starts");
        Harness {
            gateway,
            command_api,
            fraud_worker,
            projector,
            client: reqwest::Client::new(),
            amqp_prefix,
            database: Some(database),
        }
    }

    /// Stops everything, drops the scratch database and deletes the brokers' topologies.
    pub async fn finish(mut self) {
        self.gateway.stop().await;
        if let Some(mut app) = self.command_api.take() {
            app.stop().await;
        }
        if let Some(app) = self.fraud_worker.take() {
            app.cleanup().await;
        }
        if let Some(mut app) = self.projector.take() {
            app.stop().await;
            app.flush_cache()
                .await
                .expect("the projector's cache keys are deleted");
        }
        if let Some(database) = self.database.take() {
            database
                .drop_database()
                .await
                .expect("the scratch database drops");
        }
        if let Some(prefix) = self.amqp_prefix.take() {
            command_api::testing::delete_topology(&prefix)
                .await
                .expect("command-api's test topology is deleted");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.address)
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the gateway answers")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("the gateway answers")
    }

    /// Registers `username` with [`PASSWORD`] and returns the customer id.
    pub async fn register(&self, username: &str) -> Uuid {
        let response = self
            .post_json(
                "/api/v1/auth/register",
                None,
                &json!({"username": username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("JSON");
        Uuid::parse_str(body["customer_id"].as_str().expect("an id")).expect("a UUID")
    }

    pub async fn login(&self, username: &str, password: &str) -> reqwest::Response {
        self.post_json(
            "/api/v1/auth/token",
            None,
            &json!({"username": username, "password": password}),
        )
        .await
    }

    /// A token from the gateway for `username` and `password`.
    pub async fn token(&self, username: &str, password: &str) -> String {
        let response = self.login(username, password).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "logging in as {username}"
        );
        let body: Value = response.json().await.expect("JSON");
        body["access_token"].as_str().expect("a token").to_owned()
    }

    /// A new customer, registered and logged in through the gateway.
    pub async fn customer(&self) -> (Uuid, String) {
        let username = unique_username("cust");
        let id = self.register(&username).await;
        (id, self.token(&username, PASSWORD).await)
    }
}

impl Drop for Harness {
    /// A test that failed before `finish` still drops its database and topology, on a thread
    /// with a runtime of its own (the test's runtime is unwinding).
    fn drop(&mut self) {
        let database = self.database.take();
        let prefix = self.amqp_prefix.take();
        if database.is_none() && prefix.is_none() {
            return;
        }
        infra::tasks::block_on_own_runtime(async move {
            if let Some(database) = database {
                let _ = database.drop_database().await;
            }
            if let Some(prefix) = prefix {
                let _ = command_api::testing::delete_topology(&prefix).await;
            }
        });
    }
}

pub fn unique_username(stem: &str) -> String {
    format!("{stem}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// Asserts a problem+json answer with `status` and `code`; returns its body.
pub async fn assert_problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "expected {status} {code}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("a JSON problem");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    body
}
