//! Pools against the real server: each session says who it is in `pg_stat_activity`, and
//! which pools test a connection before handing it out.

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

/// Decision 62: a pool that answers clients tests a connection before handing it out, so a
/// connection that died while idle (the database restarted) is replaced unseen; a background
/// pool does not, so its worker's next statement fails once, and the one after gets a new one.
#[tokio::test]
async fn only_a_background_pool_hands_out_a_connection_that_died_while_idle() {
    use sqlx::Connection;
    let url = infra::testing::admin_url();
    for background in [false, true] {
        let role = if background {
            "died-idle background"
        } else {
            "died-idle requests"
        };
        let pool = if background {
            infra::db::connect_background(&url, "public", 1, role).await
        } else {
            infra::db::connect(&url, "public", 1, role).await
        }
        .expect("connects");
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("the one connection answers");
        // Back in the pool (sqlx pings it on its way back) before it is killed.
        let started = std::time::Instant::now();
        while pool.num_idle() < 1 {
            assert!(started.elapsed().as_secs() < 10, "the connection came back");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut admin = sqlx::PgConnection::connect(&url).await.expect("admin");
        let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
            .bind(pid)
            .fetch_one(&mut admin)
            .await
            .expect("terminates the idle session");
        assert!(ended, "the session ended");
        let first = sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&pool)
            .await;
        assert_eq!(
            first.is_err(),
            background,
            "{role}: the first statement after the session died: {first:?}"
        );
        let second: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .expect("then a new connection");
        assert_eq!(second, 1);
        pool.close().await;
        admin.close().await.expect("closes");
    }
}
