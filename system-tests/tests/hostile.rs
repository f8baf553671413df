//! A hostile client against the four services as an operator runs them (issue 11): every
//! finding of the attack, replayed through the gateway and directly at the service behind it,
//! and what each case proves. The in-process suites of each crate prove the finer points (the
//! limiter's counters, the hashing queue, the path guard's table, the audit allow-list); this
//! suite proves the running binaries, with their configuration from the environment, hold.

use std::process::Command;
use std::time::Duration;

use infra::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use system_tests::{
    ADMIN_PASSWORD, ADMIN_USERNAME, Overrides, SECRET, Service, System, binary, connect,
    eventually, raw, read_until_closed,
};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

/// Bounds every listener of the slow-client system gets: short, so the test waits seconds.
const HEADER_TIMEOUT_SECONDS: &str = "1";
const BODY_TIMEOUT_SECONDS: &str = "2";
const IDLE_TIMEOUT_SECONDS: &str = "3";

/// How long any bound under test may take to act, generously: the bounds above are seconds.
const BOUND_DEADLINE: Duration = Duration::from_secs(15);

fn problem_json(head: &str) -> bool {
    head.to_ascii_lowercase()
        .contains("content-type: application/problem+json")
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.unwrap_or_default()
}

/// Registers `username` through the gateway from `address` (X-Forwarded-For, believed because
/// the gateway trusts 127.0.0.1 in these systems) and returns the answer.
async fn register(
    system: &System,
    username: &str,
    password: &str,
    address: &str,
) -> reqwest::Response {
    system
        .client
        .post(format!("{}/api/v1/auth/register", system.gateway))
        .header("X-Forwarded-For", address)
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .expect("register answers")
}

async fn login(
    system: &System,
    username: &str,
    password: &str,
    address: &str,
) -> reqwest::Response {
    system
        .client
        .post(format!("{}/api/v1/auth/token", system.gateway))
        .header("X-Forwarded-For", address)
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .expect("token answers")
}

/// A customer registered and logged in: (customer id, access token, refresh token).
async fn customer(system: &System, address: &str) -> (Uuid, String, String) {
    let username = format!("c{}", &Uuid::new_v4().simple().to_string()[..12]);
    let password = "correct horse battery staple";
    let response = register(system, &username, password, address).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = json_of(response).await["customer_id"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .expect("a customer id");
    let body = json_of(login(system, &username, password, address).await).await;
    (
        id,
        body["access_token"].as_str().expect("a token").to_owned(),
        body["refresh_token"]
            .as_str()
            .expect("a refresh token")
            .to_owned(),
    )
}

/// `ledger token`, as an operator mints a token for the payment rail.
fn ledger_token(subject: Uuid, role: &str) -> String {
    let output = Command::new(binary("ledger"))
        .env_clear()
        .env("JWT_SECRET", SECRET)
        .args([
            "token",
            "--sub",
            &subject.to_string(),
            "--role",
            role,
            "--ttl",
            "600",
        ])
        .output()
        .expect("ledger runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

async fn post(
    system: &System,
    base: &str,
    path: &str,
    token: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = system
        .client
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    request.send().await.expect("answers")
}

async fn get(system: &System, base: &str, path: &str, token: &str) -> reqwest::Response {
    system
        .client
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("answers")
}

#[tokio::test]
async fn slow_and_greedy_clients_are_cut_off_on_every_listener() {
    // Finding 3: no listener holds a half-sent header, a trickled body or an idle keep-alive
    // connection beyond its bound, and a listener serves at most HTTP_MAX_CONNECTIONS at once.
    // The bounds come from the environment (HTTP_*), as an operator would tune them.
    let timeouts = vec![
        (
            "HTTP_HEADER_TIMEOUT_SECONDS",
            HEADER_TIMEOUT_SECONDS.to_owned(),
        ),
        ("HTTP_BODY_TIMEOUT_SECONDS", BODY_TIMEOUT_SECONDS.to_owned()),
        ("HTTP_IDLE_TIMEOUT_SECONDS", IDLE_TIMEOUT_SECONDS.to_owned()),
    ];
    let system = System::start(Overrides {
        all: timeouts,
        // The gateway forgets idle upstream connections before the services close them.
        gateway: vec![("UPSTREAM_IDLE_TIMEOUT_SECONDS", "1".to_owned())],
        fraud_worker: vec![("HTTP_MAX_CONNECTIONS", "2".to_owned())],
        ..Overrides::default()
    })
    .await;
    let listeners = [
        ("gateway", system.gateway.clone()),
        ("gateway metrics", system.gateway_metrics.clone()),
        ("command-api", system.command_api.clone()),
        ("projector", system.projector.clone()),
        ("fraud-worker", system.fraud_worker.clone()),
    ];

    // A head that never ends: the connection is closed (slowloris holds nothing).
    for (name, address) in &listeners {
        let mut stream = connect(address).await;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("writes");
        let answer = read_until_closed(&mut stream, BOUND_DEADLINE).await;
        assert!(
            !String::from_utf8_lossy(&answer).contains("200 OK"),
            "{name} served a request whose head never ended"
        );
    }

    // A connection that sends nothing at all is closed too.
    for (_, address) in &listeners {
        let mut stream = connect(address).await;
        read_until_closed(&mut stream, BOUND_DEADLINE).await;
    }

    // A trickled body: 408 problem+json, from the gateway and from command-api directly.
    let token = system.token(Uuid::new_v4(), &[Role::Customer]);
    for address in [&system.gateway, &system.command_api] {
        let mut stream = connect(address).await;
        let head = format!(
            "POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"curr"
        );
        stream.write_all(head.as_bytes()).await.expect("writes");
        let answer = read_until_closed(&mut stream, BOUND_DEADLINE).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "{address}: {text}");
        assert!(problem_json(&text), "{address}: {text}");
    }

    // An idle kept-alive connection is closed after its request was answered.
    for (name, address) in &listeners {
        let path = if name.contains("metrics") {
            "/metrics"
        } else {
            "/health"
        };
        let mut stream = connect(address).await;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("writes");
        let answer = read_until_closed(&mut stream, BOUND_DEADLINE).await;
        assert!(
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
            "{name} answered, then closed the idle connection"
        );
    }

    // HTTP_MAX_CONNECTIONS=2 on the fraud worker: with two connections held, a third is served
    // only once the header bound has closed both (they are closed by then, not still open).
    let mut held = vec![
        connect(&system.fraud_worker).await,
        connect(&system.fraud_worker).await,
    ];
    let answer = raw(
        &system.fraud_worker,
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200);
    for stream in &mut held {
        let rest = read_until_closed(stream, Duration::from_millis(500)).await;
        assert!(rest.is_empty(), "a held connection was served");
    }
    system.finish().await;
}

#[tokio::test]
async fn hostile_requests_are_refused_through_the_gateway_and_at_each_service() {
    let mut system = System::start(Overrides {
        gateway: vec![
            // A TLS proxy in front on this machine: its X-Forwarded-For names the client.
            ("TRUSTED_PROXIES", "127.0.0.1".to_owned()),
            ("REGISTRATIONS_PER_ADDRESS", "3".to_owned()),
            ("ACCESS_TOKEN_TTL_SECONDS", "5".to_owned()),
        ],
        ..Overrides::default()
    })
    .await;
    let gateway = system.gateway.clone();
    let services = [
        ("gateway", system.gateway.clone()),
        ("command-api", system.command_api.clone()),
        ("projector", system.projector.clone()),
        ("fraud-worker", system.fraud_worker.clone()),
    ];

    // Finding 4: backslashes, encoded separators and dot segments are refused before routing;
    // the projector's /metrics is not reached through an account path.
    for path in [
        r"/api/v1/accounts/x\..\..\..\..\metrics",
        "/api/v1/accounts/x%5c..%5c..%5c..%5cmetrics",
        "/api/v1/accounts/x%2f..%2f..%2fmetrics",
        "/api/v1/accounts/%2e%2e/%2e%2e/%2e%2e/metrics",
        "/api/v1/fraud/../accounts",
        "/api/v1/accounts/%00",
    ] {
        let answer = raw(
            &gateway,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(answer.status, 400, "{path}: {}", answer.head);
        assert!(problem_json(&answer.head), "{path}");
        assert!(
            answer.body.contains("invalid_path"),
            "{path}: {}",
            answer.body
        );
        assert!(
            !answer.body.contains("http_requests_total"),
            "{path} reached /metrics"
        );
    }

    // Finding 9: a path that is not UTF-8 once decoded is a problem+json 400 everywhere.
    let customer_token = system.token(Uuid::new_v4(), &[Role::Customer]);
    for (name, address) in [("gateway", &gateway), ("projector", &system.projector)] {
        let answer = raw(
            address,
            format!(
                "GET /api/v1/accounts/%FF%FE HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \
                 {customer_token}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(answer.status, 400, "{name}: {}", answer.head);
        assert!(problem_json(&answer.head), "{name}: {}", answer.head);
    }

    // Finding 9: a malformed chunked body is the client's 400, and no answer names an internal
    // address (the gateway's upstreams listen on 127.0.0.1:<port>).
    let internal_ports: Vec<String> =
        [&system.command_api, &system.projector, &system.fraud_worker]
            .iter()
            .map(|address| address.rsplit(':').next().unwrap_or_default().to_owned())
            .collect();
    for (name, address) in [("gateway", &gateway), ("command-api", &system.command_api)] {
        let answer = raw(
            address,
            format!(
                "POST /api/v1/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \
                 {customer_token}\r\nContent-Type: application/json\r\nTransfer-Encoding: \
                 chunked\r\nConnection: close\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(
            answer.status, 400,
            "{name}: {} {}",
            answer.head, answer.body
        );
        assert!(problem_json(&answer.head), "{name}");
        for port in &internal_ports {
            assert!(
                !answer.body.contains(port.as_str()),
                "{name} named an internal address: {}",
                answer.body
            );
        }
    }

    // Finding 9: tokens of another issuer or audience, or not valid yet, are 401 at every
    // service, and the 401 does not say which check failed.
    let now = chrono::Utc::now().timestamp();
    let claims = |field: &str, value: Value| {
        let mut claims = json!({"sub": Uuid::new_v4().to_string(), "roles": ["admin"],
            "iss": "ledger", "aud": "ledger-api", "iat": now, "nbf": now, "exp": now + 300,
            "jti": "hostile"});
        claims[field] = value;
        infra::testing::sign_token(jsonwebtoken::Algorithm::HS256, SECRET, &claims)
    };
    let forged = [
        ("another issuer", claims("iss", json!("someone-else"))),
        ("another audience", claims("aud", json!("another-api"))),
        ("not valid yet", claims("nbf", json!(now + 3_600))),
    ];
    for (name, address) in &services {
        for (case, token) in &forged {
            let response = if *name == "command-api" {
                post(
                    &system,
                    address,
                    "/api/v1/accounts",
                    token,
                    None,
                    &json!({"currency": "USD"}),
                )
                .await
            } else {
                let path = if *name == "projector" {
                    "/api/v1/accounts"
                } else {
                    "/api/v1/fraud/rules"
                };
                get(&system, address, path, token).await
            };
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{name}: {case}"
            );
            assert!(response.headers().contains_key("www-authenticate"));
            let body = json_of(response).await;
            let detail = body["detail"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            for word in ["issuer", "audience", "immature", "nbf", "signature"] {
                assert!(!detail.contains(word), "{name}: {case}: {detail}");
            }
        }
    }

    // Finding 9: /metrics is on the gateway's metrics listener, never its public one.
    let response = system
        .client
        .get(format!("{gateway}/metrics"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let metrics = system
        .client
        .get(format!("{}/metrics", system.gateway_metrics))
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("http_requests_total"), "{metrics}");

    // Finding 1: a customer cannot create money, through the gateway or directly at
    // command-api; the payment rail (an operator token from `ledger token`) can.
    let (alice, alice_token, _) = customer(&system, "198.51.100.10").await;
    let wallet = json_of(
        post(
            &system,
            &gateway,
            "/api/v1/accounts",
            &alice_token,
            None,
            &json!({"currency": "USD"}),
        )
        .await,
    )
    .await["id"]
        .as_str()
        .expect("an account")
        .to_owned();
    let top_up = json!({"type": "deposit", "amount": "500.00", "currency": "USD",
                        "destination_account_id": wallet});
    for address in [&gateway, &system.command_api] {
        let response = post(
            &system,
            address,
            "/api/v1/transactions",
            &alice_token,
            Some("t"),
            &top_up,
        )
        .await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(json_of(response).await["code"], "top_ups_disabled");
    }
    let rail = ledger_token(Uuid::new_v4(), "operator");
    let response = post(
        &system,
        &gateway,
        "/api/v1/transactions",
        &rail,
        Some("rail-1"),
        &top_up,
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let response = post(
        &system,
        &gateway,
        "/api/v1/accounts",
        &rail,
        None,
        &json!({"currency": "USD"}),
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::FORBIDDEN,
        "the rail opens no accounts"
    );

    // Finding 9: a NUL in a name is a 400, and a currency mismatch does not name the other
    // account's currency.
    let response = post(
        &system,
        &gateway,
        "/api/v1/accounts",
        &alice_token,
        None,
        &json!({"currency": "USD", "name": "a\u{0}b"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (bob, bob_token, _) = customer(&system, "198.51.100.11").await;
    let bobs_yen = json_of(
        post(
            &system,
            &gateway,
            "/api/v1/accounts",
            &bob_token,
            None,
            &json!({"currency": "JPY"}),
        )
        .await,
    )
    .await["id"]
        .as_str()
        .expect("an account")
        .to_owned();
    let response = post(
        &system,
        &gateway,
        "/api/v1/transactions",
        &alice_token,
        Some("m"),
        &json!({"type": "transfer", "amount": "1.00", "currency": "USD",
                "source_account_id": wallet, "destination_account_id": bobs_yen}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let detail = json_of(response).await["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!detail.contains("JPY"), "{detail}");

    // Finding 5: Bob, paid by Alice, reads the audit trail without Alice's identity, her
    // correlation id or the fraud rules' inputs; an admin sees all of it.
    eventually("the deposit settles", Duration::from_secs(30), || async {
        let body = json_of(
            get(
                &system,
                &gateway,
                &format!("/api/v1/accounts/{wallet}/balance"),
                &alice_token,
            )
            .await,
        )
        .await;
        body["balance"] == "500.00"
    })
    .await;
    let bobs_dollars = json_of(
        post(
            &system,
            &gateway,
            "/api/v1/accounts",
            &bob_token,
            None,
            &json!({"currency": "USD"}),
        )
        .await,
    )
    .await["id"]
        .as_str()
        .expect("an account")
        .to_owned();
    let response = system
        .client
        .post(format!("{gateway}/api/v1/transactions"))
        .bearer_auth(&alice_token)
        .header("Idempotency-Key", "pay-bob")
        .header("X-Correlation-ID", "alice-phone-4711")
        .json(
            &json!({"type": "transfer", "amount": "20.00", "currency": "USD",
                      "source_account_id": wallet, "destination_account_id": bobs_dollars}),
        )
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let transfer = json_of(response).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let trail_path = format!("/api/v1/transactions/{transfer}/events");
    let admin = system.token(Uuid::new_v4(), &[Role::Admin]);
    eventually(
        "the transfer's fraud check is in the trail",
        Duration::from_secs(30),
        || async {
            let trail = json_of(get(&system, &gateway, &trail_path, &admin).await).await;
            trail.to_string().contains("FraudChecked")
                && trail.to_string().contains("TransactionConfirmed")
        },
    )
    .await;
    let full = json_of(get(&system, &gateway, &trail_path, &admin).await)
        .await
        .to_string();
    assert!(
        full.contains(&alice.to_string()),
        "admins see the initiator"
    );
    assert!(
        full.contains("details"),
        "admins see the fraud rules' inputs"
    );
    for address in [&gateway, &system.projector] {
        let seen = json_of(get(&system, address, &trail_path, &bob_token).await).await;
        assert!(
            seen["items"]
                .as_array()
                .is_some_and(|items| items.len() >= 3),
            "{seen}"
        );
        let text = seen.to_string();
        assert!(
            !text.contains(&alice.to_string()),
            "the payee saw the payer: {text}"
        );
        assert!(
            !text.contains("alice-phone-4711"),
            "the payee saw the payer's correlation id"
        );
        assert!(
            !text.contains("details"),
            "the payee saw the fraud rules' inputs: {text}"
        );
        // The payer's account id is in the request (as GET /transactions/{id} shows both
        // accounts to both parties), but the payer's leg is not the payee's to see.
        let legs: Vec<String> = seen["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|event| event["payload"]["TransactionConfirmed"]["legs"].as_array())
            .flatten()
            .map(|leg| leg["account_id"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            legs,
            vec![bobs_dollars.clone()],
            "the payee sees its own leg only"
        );
    }
    let _ = bob;

    // Finding 7: a position beyond the log's head is refused at once, at the gateway and at the
    // projector.
    for address in [&gateway, &system.projector] {
        let response = system
            .client
            .get(format!("{address}/api/v1/accounts/{wallet}"))
            .bearer_auth(&alice_token)
            .header("X-Ledger-Position", "999999999999.1")
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json_of(response).await["code"], "position_unreachable");
    }

    // Finding 2: registrations are limited per client address (REGISTRATIONS_PER_ADDRESS=3),
    // and with TRUSTED_PROXIES the address is the one the proxy names.
    let crowd = "203.0.113.20";
    for index in 0..3 {
        let response = register(
            &system,
            &format!("crowd{index}x{}", &Uuid::new_v4().simple().to_string()[..6]),
            "correct horse battery staple",
            crowd,
        )
        .await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let response = register(&system, "crowd-late", "correct horse battery staple", crowd).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json_of(response).await["code"], "too_many_registrations");
    let response = register(
        &system,
        "someone-else",
        "correct horse battery staple",
        "203.0.113.21",
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "another address is not limited"
    );

    // Finding 8: ten wrong passwords from one address lock that address out of the account,
    // not its owner elsewhere.
    let victim = format!("v{}", &Uuid::new_v4().simple().to_string()[..12]);
    assert_eq!(
        register(&system, &victim, "the owner's passphrase", "198.51.100.30")
            .await
            .status(),
        StatusCode::CREATED
    );
    for _ in 0..10 {
        let response = login(&system, &victim, "a wrong passphrase!", "192.0.2.66").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = login(&system, &victim, "the owner's passphrase", "192.0.2.66").await;
    assert_eq!(
        response.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the attacker's address is locked"
    );
    let response = login(&system, &victim, "the owner's passphrase", "198.51.100.30").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the owner is not locked out"
    );

    // Finding 6: a role change reaches every route whatever tokens are out. Eve, an auditor,
    // is disabled (an empty role list): her refresh is refused at once, and her last access
    // token (5 s here) stops working at the gateway and at the fraud worker within its life
    // plus the 15 s leeway.
    let (eve, _, eve_refresh) = customer(&system, "198.51.100.40").await;
    let admin_login =
        json_of(login(&system, ADMIN_USERNAME, ADMIN_PASSWORD, "198.51.100.41").await).await;
    let admin_token = admin_login["access_token"]
        .as_str()
        .expect("the admin logs in")
        .to_owned();
    let set_roles = |roles: Value| {
        let request = system
            .client
            .put(format!("{gateway}/api/v1/admin/users/{eve}/roles"))
            .bearer_auth(&admin_token)
            .json(&json!({ "roles": roles }));
        async move { request.send().await.expect("answers").status() }
    };
    assert_eq!(
        set_roles(json!(["customer", "auditor"])).await,
        StatusCode::OK
    );
    let refreshed = system
        .client
        .post(format!("{gateway}/api/v1/auth/refresh"))
        .json(&json!({"refresh_token": eve_refresh}))
        .send()
        .await
        .expect("answers");
    assert_eq!(refreshed.status(), StatusCode::OK);
    let eve_auditor = json_of(refreshed).await["access_token"]
        .as_str()
        .expect("a token")
        .to_owned();
    for (_, address) in [&services[0], &services[3]] {
        let response = get(&system, address, "/api/v1/fraud/rules", &eve_auditor).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "the promotion took effect on refresh"
        );
    }
    assert_eq!(set_roles(json!([])).await, StatusCode::OK);
    let response = system
        .client
        .post(format!("{gateway}/api/v1/auth/refresh"))
        .json(&json!({"refresh_token": eve_refresh}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(json_of(response).await["code"], "user_disabled");
    eventually(
        "Eve's last token dies everywhere",
        Duration::from_secs(45),
        || async {
            let mut refused = true;
            for (_, address) in [&services[0], &services[3]] {
                refused &= get(&system, address, "/api/v1/fraud/rules", &eve_auditor)
                    .await
                    .status()
                    == StatusCode::UNAUTHORIZED;
            }
            refused
        },
    )
    .await;

    // Finding 6: a gateway whose ADMIN_USERNAME belongs to a customer refuses to start, naming
    // the conflict, instead of making that customer an admin.
    let (squatter, _, _) = customer(&system, "198.51.100.50").await;
    let squatter_name: String =
        sqlx::query_scalar("SELECT username FROM gateway.users WHERE customer_id = $1")
            .bind(squatter)
            .fetch_one(
                &infra::db::connect(&system.database_url(), "gateway", 1, "test")
                    .await
                    .expect("connects"),
            )
            .await
            .expect("the squatter exists");
    let mut second = Service::start_as(
        "gateway",
        "gateway-squatted",
        &system.logs,
        &[
            ("DATABASE_URL", system.database_url()),
            ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("ADMIN_USERNAME", squatter_name),
            (
                "ADMIN_PASSWORD",
                "a password for the squatted name".to_owned(),
            ),
        ],
    );
    assert_ne!(second.exit_code(Duration::from_secs(60)).await, Some(0));
    let log = second.log();
    assert!(
        log.contains(&squatter.to_string()) && log.contains("bootstrap admin"),
        "{log}"
    );

    // Finding 9: a JWT_SECRET of too few distinct bytes stops a service at start.
    let mut weak = Service::start_as(
        "command-api",
        "command-api-weak-secret",
        &system.logs,
        &[
            ("JWT_SECRET", "ab".repeat(20)),
            ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
        ],
    );
    assert_eq!(
        weak.exit_code(Duration::from_secs(30)).await,
        Some(2),
        "bad usage"
    );
    assert!(weak.log().contains("distinct"), "{}", weak.log());

    // Finding 9: a password in a query string never reaches a log, even in the warning about an
    // upstream that did not answer.
    system.service("fraud-worker").stop();
    let response = get(
        &system,
        &gateway,
        "/api/v1/fraud/rules?password=hunter2-hostile",
        &admin,
    )
    .await;
    assert!(response.status().is_server_error());
    let body = json_of(response).await.to_string();
    for port in &internal_ports {
        assert!(
            !body.contains(port.as_str()),
            "an internal address in {body}"
        );
    }
    system.service("gateway").stop();
    let log = system.service("gateway").log();
    assert!(
        log.contains("the upstream gave no answer"),
        "the failure was logged"
    );
    assert!(
        !log.contains("hunter2-hostile"),
        "a query-string password was logged"
    );
    system.finish().await;
}
