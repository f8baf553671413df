//! The OpenAPI document is kept true (SPEC §5): it parses as OpenAPI 3.1, lists exactly the
//! routes of SPEC §5, every reference in it resolves, every route is routed by the default
//! table, and what the gateway answers on each route is a status the document lists.

use std::collections::BTreeSet;

use axum::http::Method;
use gateway::http::OPENAPI_DOCUMENT;
use gateway::routes::{Resolution, RoutingTable, Target, Upstream};
use infra::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Harness, PASSWORD, unique_username};

/// SPEC §5's table, as (method, path) pairs, and the refresh route of issue 11.
const SPEC_ROUTES: [(&str, &str); 16] = [
    ("GET", "/health"),
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/token"),
    ("POST", "/api/v1/auth/refresh"),
    ("PUT", "/api/v1/admin/users/{customer_id}/roles"),
    ("POST", "/api/v1/accounts"),
    ("GET", "/api/v1/accounts"),
    ("GET", "/api/v1/accounts/{id}"),
    ("GET", "/api/v1/accounts/{id}/balance"),
    ("GET", "/api/v1/accounts/{id}/history"),
    ("POST", "/api/v1/transactions"),
    ("GET", "/api/v1/transactions/{id}"),
    ("GET", "/api/v1/transactions"),
    ("GET", "/api/v1/transactions/{id}/events"),
    ("GET", "/api/v1/fraud/rules"),
    ("GET", "/api/v1/openapi.json"),
];

/// Routes the gateway serves itself rather than through the table's upstreams.
const GATEWAY_ROUTES: [&str; 6] = [
    "/health",
    "/api/v1/openapi.json",
    "/api/v1/auth/register",
    "/api/v1/auth/token",
    "/api/v1/auth/refresh",
    "/api/v1/admin/users/{customer_id}/roles",
];

fn document() -> Value {
    serde_json::from_str(OPENAPI_DOCUMENT).expect("the OpenAPI document is JSON")
}

fn concrete(path: &str) -> String {
    path.replace("{id}", &Uuid::new_v4().to_string())
        .replace("{customer_id}", &Uuid::new_v4().to_string())
}

/// Whether the document lists `status` among the responses of `method path`.
fn documented(document: &Value, method: &str, path: &str, status: StatusCode) -> bool {
    document["paths"][path][method.to_ascii_lowercase()]["responses"]
        .get(status.as_str())
        .is_some()
}

fn references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("$ref", Value::String(target)) => found.push(target.clone()),
                    _ => references(inner, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| references(item, found)),
        _ => {}
    }
}

#[test]
fn the_document_lists_exactly_the_routes_of_spec_5() {
    // Proves the document is OpenAPI 3.1 with exactly SPEC §5's operations, a bearer-JWT
    // security scheme, the headers of SPEC §5, and no dangling reference.
    let document = document();
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|version| version.starts_with("3.1")),
        "OpenAPI 3.1"
    );
    let methods = ["get", "put", "post", "delete", "patch", "head", "options"];
    let listed: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item")
                .keys()
                .filter(|key| methods.contains(&key.as_str()))
                .map(|method| (method.to_ascii_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: BTreeSet<(String, String)> = SPEC_ROUTES
        .iter()
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    assert_eq!(listed, expected);
    let scheme = &document["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(scheme["scheme"], "bearer");
    assert_eq!(scheme["bearerFormat"], "JWT");
    let parameters = &document["components"]["parameters"];
    for (key, name) in [
        ("IdempotencyKey", "Idempotency-Key"),
        ("LedgerPosition", "X-Ledger-Position"),
        ("CorrelationId", "X-Correlation-ID"),
    ] {
        assert_eq!(parameters[key]["name"], name);
    }
    let headers = document["components"]["headers"]
        .as_object()
        .expect("headers");
    for key in [
        "XCache",
        "XLedgerPosition",
        "CorrelationId",
        "Location",
        "IdempotentReplayed",
    ] {
        assert!(headers.contains_key(key), "{key}");
    }
    let mut found = Vec::new();
    references(&document, &mut found);
    for target in found {
        let pointer = target.strip_prefix('#').expect("local references only");
        assert!(document.pointer(pointer).is_some(), "{target} resolves");
    }
}

#[test]
fn every_spec_route_is_routed_by_the_default_table() {
    // Proves SPEC §5's routing: writes to command-api, reads to the projector, fraud to the
    // fraud worker; the gateway's own routes never go to an upstream.
    let table = RoutingTable::default();
    for (method, path) in SPEC_ROUTES {
        let method = Method::from_bytes(method.as_bytes()).expect("a method");
        let resolution = table.resolve(&method, &concrete(path));
        if GATEWAY_ROUTES.contains(&path) {
            let stays = match resolution {
                Resolution::Route(route) => route.target == Target::Gateway,
                Resolution::NotFound => true,
                Resolution::MethodNotAllowed => false,
            };
            assert!(stays, "{method} {path} stays in the gateway");
            continue;
        }
        let expected = if path.starts_with("/api/v1/fraud") {
            Upstream::FraudWorker
        } else if method == Method::POST {
            Upstream::CommandApi
        } else {
            Upstream::Projector
        };
        match resolution {
            Resolution::Route(route) => {
                assert_eq!(route.target, Target::Upstream(expected), "{method} {path}")
            }
            other => panic!("{method} {path} is not routed: {other:?}"),
        }
    }
}

#[tokio::test]
async fn every_spec_route_answers_through_the_gateway_with_a_documented_status() {
    // Proves each route of the document is served through the gateway (never its "no such
    // route" 404) and that whatever it answers is listed in the document: with every upstream
    // down, the proxied routes answer a documented 503; the gateway's own routes answer their
    // documented successes and refusals.
    let harness = Harness::start().await;
    let document = document();
    let admin = harness.gateway.token(Uuid::new_v4(), &[Role::Admin]);
    for (method, path) in SPEC_ROUTES {
        let url = harness.url(&concrete(path));
        let method_value = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut request = harness
            .client
            .request(method_value, url)
            .bearer_auth(&admin);
        if method != "GET" {
            request = request.json(&json!({}));
        }
        let response = request.send().await.expect("the gateway answers");
        let status = response.status();
        assert!(
            documented(&document, method, path, status),
            "{method} {path}: {status}"
        );
        if status == StatusCode::NOT_FOUND {
            let body: Value = response.json().await.expect("a problem");
            assert_ne!(body["code"], "not_found", "{method} {path} is not routed");
        }
    }

    let username = unique_username("doc");
    let register = json!({"username": username, "password": PASSWORD});
    let answers = [
        (
            "POST",
            "/api/v1/auth/register",
            harness
                .post_json("/api/v1/auth/register", None, &register)
                .await
                .status(),
        ),
        (
            "POST",
            "/api/v1/auth/register",
            harness
                .post_json("/api/v1/auth/register", None, &register)
                .await
                .status(),
        ),
        (
            "POST",
            "/api/v1/auth/token",
            harness.login(&username, "a wrong password").await.status(),
        ),
        (
            "POST",
            "/api/v1/auth/token",
            harness.login(&username, PASSWORD).await.status(),
        ),
    ];
    let statuses: Vec<StatusCode> = answers.iter().map(|(_, _, status)| *status).collect();
    assert_eq!(
        statuses,
        [
            StatusCode::CREATED,
            StatusCode::CONFLICT,
            StatusCode::UNAUTHORIZED,
            StatusCode::OK
        ]
    );
    for (method, path, status) in answers {
        assert!(
            documented(&document, method, path, status),
            "{method} {path}: {status}"
        );
    }
    let response = harness.get("/api/v1/openapi.json", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let served: Value = response.json().await.expect("JSON");
    assert_eq!(
        served, document,
        "the served document is the checked-in one"
    );
    harness.finish().await;
}
