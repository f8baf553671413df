//! The `ledger` binary against a real system: command-api and the projector on a scratch
//! database, then `ledger verify`, `replay`, `rebuild` and `token` as an operator runs them.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use command_api::testing::{TestOptions, delete_topology, spawn_app_on_scratch};
use domain::{FraudDecision, FraudOutcome, TransactionId};
use infra::auth::{JwtVerifier, Role};
use infra::eventlog::EventLog;
use infra::eventlog::postgres::{PgEventLog, PgEventLogOptions};
use infra::log::LogPosition;
use projector::testing::{TestOptions as ProjectorOptions, spawn_projector};
use serde_json::{Value, json};
use uuid::Uuid;

const SECRET: &str = "integration-test-secret-of-at-least-32-bytes";

fn ledger(database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("READ_DATABASE_URL")
        .env("JWT_SECRET", SECRET)
        // A rebuild of `transactions` flushes the cache under this prefix: never a real one.
        .env("REDIS_KEY_PREFIX", "test-ledger-cli")
        .output()
        .expect("the ledger binary runs")
}

/// A login role with USAGE on the two schemas and SELECT on their tables, present and future
/// (default privileges of the role that creates them). Roles belong to the cluster, not the
/// scratch database, so dropping this removes it, even when the test panics.
struct Auditor {
    role: String,
    database_url: String,
    url: String,
}

impl Auditor {
    async fn create(database_url: &str) -> Auditor {
        let role = format!("ledger_auditor_{}", Uuid::new_v4().simple());
        let mut url = reqwest::Url::parse(database_url).expect("the scratch URL parses");
        url.set_username(&role).expect("a URL with a user");
        let auditor = Auditor {
            role,
            database_url: database_url.to_owned(),
            url: url.to_string(),
        };
        let pool = sqlx::PgPool::connect(database_url)
            .await
            .expect("connects as the owner");
        let role = &auditor.role;
        for statement in [
            format!("CREATE ROLE {role} LOGIN"),
            format!("GRANT USAGE ON SCHEMA command_api, projector TO {role}"),
            format!("GRANT SELECT ON ALL TABLES IN SCHEMA command_api, projector TO {role}"),
            format!(
                "ALTER DEFAULT PRIVILEGES IN SCHEMA projector GRANT SELECT ON TABLES TO {role}"
            ),
        ] {
            sqlx::query(&statement)
                .execute(&pool)
                .await
                .expect("setting up the auditor's role");
        }
        pool.close().await;
        auditor
    }
}

impl Drop for Auditor {
    fn drop(&mut self) {
        let (role, database_url) = (self.role.clone(), self.database_url.clone());
        infra::tasks::block_on_own_runtime(async move {
            let Ok(pool) = sqlx::PgPool::connect(&database_url).await else {
                return;
            };
            // DROP OWNED also removes its privileges and default privileges in this database.
            for statement in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
                let _ = sqlx::query(&statement).execute(&pool).await;
            }
            pool.close().await;
        });
    }
}

/// How many transactions have settled.
async fn settlements(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM command_api.events WHERE event_type = 'SettlementCompleted'",
    )
    .fetch_one(pool)
    .await
    .expect("counting settlements")
}

/// Fails the test, showing what the command printed, unless it exited 0.
fn assert_succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "{}{}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn an_operator_verifies_replays_repairs_and_mints_tokens() {
    let options = TestOptions::default();
    let (database, mut app) = spawn_app_on_scratch(&options)
        .await
        .expect("command-api starts on a scratch database");
    let url = database.url();
    let mut projector = spawn_projector(&url, &ProjectorOptions::default())
        .await
        .expect("the projector starts");
    let client = reqwest::Client::new();
    let customer = Uuid::new_v4();
    let token = app.token(customer, &[Role::Customer]);
    // Money enters through the payment rail (SPEC §5).
    let operator = app.token(Uuid::new_v4(), &[Role::Operator]);
    let post = |token: &str, path: &str, body: Value| {
        let request = client
            .post(format!("{}{path}", app.address))
            .bearer_auth(token)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .json(&body);
        async move {
            let response = request.send().await.expect("command-api answers");
            assert!(response.status().is_success(), "{}", response.status());
            let position: LogPosition = response
                .headers()
                .get("x-ledger-position")
                .and_then(|value| value.to_str().ok())
                .and_then(|text| text.parse().ok())
                .expect("a position header");
            let body: Value = response.json().await.expect("JSON");
            let id = Uuid::parse_str(body["id"].as_str().expect("an id")).expect("a UUID");
            (id, position)
        }
    };
    let (first, _) = post(&token, "/api/v1/accounts", json!({"currency": "USD"})).await;
    let (second, _) = post(&token, "/api/v1/accounts", json!({"currency": "USD"})).await;
    let (deposit, deposit_position) = post(
        &operator,
        "/api/v1/transactions",
        json!({"type": "deposit", "amount": "100.00", "currency": "USD", "destination_account_id": first}),
    )
    .await;
    let approve = |id: Uuid| {
        let decisions = app.decisions.clone();
        async move {
            let metadata =
                command_api::metadata::for_saga(&id.to_string(), "test", format!("decision/{id}"));
            decisions
                .record(
                    TransactionId(id),
                    FraudDecision {
                        outcome: FraudOutcome::Approved,
                        rule: Some("test".to_owned()),
                        details: json!({}).into(),
                    },
                    &metadata,
                )
                .await
                .expect("the decision is recorded");
        }
    };
    approve(deposit).await;
    // The transfer spends the deposit, so it waits for the deposit's settlement: posted any
    // earlier, its hold could find the account still empty.
    let started = Instant::now();
    while settlements(&app.pool).await < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the deposit never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (transfer, _) = post(
        &token,
        "/api/v1/transactions",
        json!({"type": "transfer", "amount": "40.00", "currency": "USD", "source_account_id": first, "destination_account_id": second}),
    )
    .await;
    approve(transfer).await;

    // Wait until both are settled and the read side has the whole log.
    let reader = PgEventLog::open(
        app.pool.clone(),
        PgEventLogOptions {
            listen: false,
            ..PgEventLogOptions::reader("command_api.events")
        },
    )
    .await
    .expect("the log opens");
    let started = Instant::now();
    loop {
        let settled = settlements(&app.pool).await;
        let head = reader.head().await.expect("the log head");
        let read = projector::generations::read_position(&projector.pool)
            .await
            .expect("the read position");
        if settled == 2 && read >= head {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "never settled and projected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    projector.stop().await;
    projector
        .flush_cache()
        .await
        .expect("the projector's cache keys are deleted");

    // verify: clean.
    let output = ledger(&url, &["verify"]);
    assert_succeeded(&output);
    assert!(
        stdout(&output).contains("OK: invariants hold"),
        "{}",
        stdout(&output)
    );
    assert!(
        stdout(&output).contains("2 confirmed, 0 rejected, 0 in flight"),
        "{}",
        stdout(&output)
    );

    // An auditor's role, with nothing but SELECT on the log and the read models (and on the
    // tables later rebuilds create), can verify, since no step of it writes, and cannot rebuild.
    let auditor = Auditor::create(&url).await;
    let output = ledger(&auditor.url, &["verify"]);
    assert_succeeded(&output);
    assert!(
        stdout(&output).contains("OK: invariants hold"),
        "{}",
        stdout(&output)
    );
    let output = ledger(&auditor.url, &["rebuild", "accounts"]);
    assert_eq!(output.status.code(), Some(3), "a read-only role rebuilt");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A corrupted read-model row fails verify, naming the account.
    sqlx::query("UPDATE projector.accounts_g1 SET balance_minor = balance_minor + 1 WHERE id = $1")
        .bind(second)
        .execute(&app.pool)
        .await
        .expect("corrupting a row");
    let output = ledger(&url, &["verify"]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let report = stdout(&output);
    assert!(
        report.contains(&format!("DIFFERENCE accounts {second}")),
        "{report}"
    );
    assert!(
        report.contains("FAILED: 0 violations, 1 read-model differences"),
        "{report}"
    );

    // rebuild repairs it, and verify is clean again.
    let output = ledger(&url, &["rebuild", "accounts", "--batch-size", "3"]);
    assert_succeeded(&output);
    assert!(
        stdout(&output).contains("accounts: generation 2 is live (replaced 1)"),
        "{}",
        stdout(&output)
    );
    let output = ledger(&url, &["verify"]);
    assert_succeeded(&output);
    // The auditor reads the new generation too.
    let output = ledger(&auditor.url, &["verify"]);
    assert_succeeded(&output);
    let role = auditor.role.clone();
    drop(auditor);
    let left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(&role)
            .fetch_one(&app.pool)
            .await
            .expect("looking for the role");
    assert!(!left, "the auditor's role outlived the test");
    let balance: i64 =
        sqlx::query_scalar("SELECT balance_minor FROM projector.accounts WHERE id = $1")
            .bind(second)
            .fetch_one(&app.pool)
            .await
            .expect("the rebuilt row");
    assert_eq!(balance, 4_000);

    // An unknown projection is bad usage (exit 2), refused before anything runs.
    let output = ledger(&url, &["rebuild", "balances"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown projection"));

    // replay one transaction: its own events and the account events it caused, in order.
    let output = ledger(&url, &["replay", "--transaction", &transfer.to_string()]);
    assert_succeeded(&output);
    let trail = stdout(&output);
    let order = [
        "TransactionCreated",
        "FundsHeld",
        "CreditReserved",
        "FundsReserved",
        "TransactionConfirmed",
        "HoldSettled",
        "CreditPosted",
        "SettlementCompleted",
    ];
    let mut from = 0;
    for event_type in order {
        let at = trail[from..]
            .find(event_type)
            .unwrap_or_else(|| panic!("{event_type} missing or out of order in:\n{trail}"));
        from += at + event_type.len();
    }
    // The decision may be recorded before or after the reservation; it is there.
    assert!(trail.contains("FraudChecked"), "{trail}");
    assert!(trail.contains("balance=60.00"), "{trail}");
    assert!(trail.contains("0 violations"), "{trail}");

    // JSON lines, and --as-of the deposit's creation: the deposit is still pending then.
    let output = ledger(
        &url,
        &["replay", "--json", "--as-of", &deposit_position.to_string()],
    );
    assert_succeeded(&output);
    let lines: Vec<Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is JSON"))
        .collect();
    let summary = &lines.last().expect("a summary line")["summary"];
    assert_eq!(summary["transactions_confirmed"], 0);
    assert_eq!(summary["in_flight"].as_array().map(Vec::len), Some(1));
    assert!(lines.iter().all(|line| line.get("violation").is_none()));

    // token: a token the services accept, with the roles asked for.
    let output = ledger(
        &url,
        &[
            "token",
            "--sub",
            &customer.to_string(),
            "--role",
            "auditor",
            "--role",
            "customer",
            "--role",
            "operator",
        ],
    );
    assert_succeeded(&output);
    let verifier =
        JwtVerifier::new(&infra::auth::TokenConfig::with_secret(SECRET)).expect("a long secret");
    let caller = verifier
        .verify(stdout(&output).trim())
        .expect("the minted token verifies");
    assert_eq!(caller.subject, customer);
    assert_eq!(
        caller.roles,
        vec![Role::Customer, Role::Operator, Role::Auditor]
    );
    let output = ledger(
        &url,
        &["token", "--sub", &customer.to_string(), "--role", "root"],
    );
    assert_eq!(
        output.status.code(),
        Some(2),
        "an unknown role is bad usage"
    );

    // A database the projector never ran on: verify explains instead of setting it up.
    let empty = infra::db::ScratchDatabase::create(&infra::testing::admin_url())
        .await
        .expect("a scratch database");
    let output = ledger(&empty.url(), &["verify"]);
    empty
        .drop_database()
        .await
        .expect("the scratch database drops");
    assert_eq!(output.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("are not set up"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // An unreachable database: exit 3 with a message, not a panic.
    let output = ledger("postgres://postgres@127.0.0.1:1/nothing", &["verify"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("error:"));

    app.stop().await;
    database
        .drop_database()
        .await
        .expect("the scratch database drops");
    delete_topology(&options.amqp_prefix)
        .await
        .expect("the topology is deleted");
}
