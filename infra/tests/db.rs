//! Pools against the real server: each session says who it is in `pg_stat_activity`.

#[tokio::test]
async fn a_pool_names_its_sessions_after_the_program_and_its_role() {
    let pool = infra::db::connect(&infra::testing::admin_url(), "public", 1, "requests")
        .await
        .expect("connects");
    let name: String = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .expect("reads its own session");
    pool.close().await;
    assert!(name.ends_with(" requests"), "{name}");
    assert!(
        name.starts_with("db-"),
        "the test binary is named db-<hash>: {name}"
    );
}
