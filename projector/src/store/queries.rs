//! The queries behind every GET, on either database: the same keyset pages over the live views
//! (`accounts`, `transactions`, `account_history`) and their `created_position` indexes. The
//! SQL differs only where SQLite lacks what PostgreSQL's plan uses (casts of NULL parameters,
//! parenthesised `UNION` members with their own `LIMIT`).

use infra::error::DatabaseContext;
use uuid::Uuid;

use super::{PageQuery, TransactionScope};
use crate::error::Result;
use crate::model::Db;
use crate::model::accounts::AccountRecord;
use crate::model::history::HistoryRecord;
use crate::model::transactions::TransactionRecord;

pub async fn account(db: &mut Db<'_>, id: Uuid) -> Result<Option<AccountRecord>> {
    let statement = format!(
        "SELECT {} FROM accounts WHERE id = $1",
        AccountRecord::columns()
    );
    match db {
        Db::Pg(connection) => sqlx::query(&statement)
            .bind(id)
            .fetch_optional(&mut **connection)
            .await
            .context("reading an account")?
            .as_ref()
            .map(AccountRecord::decode)
            .transpose(),
        Db::Sqlite(connection) => sqlx::query(&statement)
            .bind(id)
            .fetch_optional(&mut **connection)
            .await
            .context("reading an account")?
            .as_ref()
            .map(AccountRecord::decode)
            .transpose(),
    }
}

pub async fn accounts(
    db: &mut Db<'_>,
    owner: Option<Uuid>,
    page: PageQuery,
) -> Result<Vec<AccountRecord>> {
    let columns = AccountRecord::columns();
    let statement = match owner {
        Some(_) => format!(
            "SELECT {columns} FROM accounts WHERE owner_id = $1 AND created_position < $2
             ORDER BY created_position DESC LIMIT $3"
        ),
        None => format!(
            "SELECT {columns} FROM accounts WHERE created_position < $1
             ORDER BY created_position DESC LIMIT $2"
        ),
    };
    macro_rules! run {
        ($connection:expr) => {{
            let query = sqlx::query(&statement);
            let query = match owner {
                Some(owner) => query.bind(owner),
                None => query,
            };
            query
                .bind(page.before)
                .bind(page.limit)
                .fetch_all(&mut **$connection)
                .await
                .context("listing accounts")?
                .iter()
                .map(AccountRecord::decode)
                .collect()
        }};
    }
    match db {
        Db::Pg(connection) => run!(connection),
        Db::Sqlite(connection) => run!(connection),
    }
}

pub async fn history(
    db: &mut Db<'_>,
    account: Uuid,
    page: PageQuery,
) -> Result<Vec<HistoryRecord>> {
    let statement = format!(
        "SELECT {} FROM account_history WHERE account_id = $1 AND created_position < $2
         ORDER BY created_position DESC LIMIT $3",
        HistoryRecord::columns()
    );
    macro_rules! run {
        ($connection:expr) => {{
            sqlx::query(&statement)
                .bind(account)
                .bind(page.before)
                .bind(page.limit)
                .fetch_all(&mut **$connection)
                .await
                .context("reading account history")?
                .iter()
                .map(HistoryRecord::decode)
                .collect()
        }};
    }
    match db {
        Db::Pg(connection) => run!(connection),
        Db::Sqlite(connection) => run!(connection),
    }
}

pub async fn transaction(db: &mut Db<'_>, id: Uuid) -> Result<Option<TransactionRecord>> {
    let statement = format!(
        "SELECT {} FROM transactions WHERE id = $1",
        TransactionRecord::columns()
    );
    match db {
        Db::Pg(connection) => sqlx::query(&statement)
            .bind(id)
            .fetch_optional(&mut **connection)
            .await
            .context("reading a transaction")?
            .as_ref()
            .map(TransactionRecord::decode)
            .transpose(),
        Db::Sqlite(connection) => sqlx::query(&statement)
            .bind(id)
            .fetch_optional(&mut **connection)
            .await
            .context("reading a transaction")?
            .as_ref()
            .map(TransactionRecord::decode)
            .transpose(),
    }
}

pub async fn transactions(
    db: &mut Db<'_>,
    scope: TransactionScope,
    status: Option<&str>,
    page: PageQuery,
) -> Result<Vec<TransactionRecord>> {
    // Both sides of a transaction, each through its own index, merged newest first.
    let (left, right, key) = match scope {
        TransactionScope::Account(account) => {
            ("source_account_id", "destination_account_id", Some(account))
        }
        TransactionScope::Owner(owner) => ("source_owner_id", "destination_owner_id", Some(owner)),
        TransactionScope::All => ("", "", None),
    };
    let columns = TransactionRecord::columns();
    match db {
        Db::Pg(connection) => {
            let status_filter = if status.is_some() {
                "AND status = $4"
            } else {
                "AND $4::text IS NULL"
            };
            let statement = match key {
                Some(_) => format!(
                    "SELECT {columns} FROM (
                         (SELECT {columns} FROM transactions WHERE {left} = $1
                          AND created_position < $2
                          {status_filter} ORDER BY created_position DESC LIMIT $3)
                         UNION
                         (SELECT {columns} FROM transactions WHERE {right} = $1
                          AND created_position < $2
                          {status_filter} ORDER BY created_position DESC LIMIT $3)
                     ) AS both_sides ORDER BY created_position DESC LIMIT $3"
                ),
                None => format!(
                    "SELECT {columns} FROM transactions WHERE ($1::uuid IS NULL)
                     AND created_position < $2
                     {status_filter} ORDER BY created_position DESC LIMIT $3"
                ),
            };
            sqlx::query(&statement)
                .bind(key)
                .bind(page.before)
                .bind(page.limit)
                .bind(status)
                .fetch_all(&mut **connection)
                .await
                .context("listing transactions")?
                .iter()
                .map(TransactionRecord::decode)
                .collect()
        }
        Db::Sqlite(connection) => {
            let status_filter = if status.is_some() {
                "AND status = $4"
            } else {
                ""
            };
            let scope_filter = if key.is_some() {
                format!("({left} = $1 OR {right} = $1)")
            } else {
                "$1 IS NULL".to_owned()
            };
            let statement = format!(
                "SELECT {columns} FROM transactions WHERE {scope_filter}
                 AND created_position < $2 {status_filter}
                 ORDER BY created_position DESC LIMIT $3"
            );
            let query = sqlx::query(&statement)
                .bind(key)
                .bind(page.before)
                .bind(page.limit);
            let query = match status {
                Some(status) => query.bind(status),
                None => query,
            };
            query
                .fetch_all(&mut **connection)
                .await
                .context("listing transactions")?
                .iter()
                .map(TransactionRecord::decode)
                .collect()
        }
    }
}

/// The row of every live main table of `name`, rendered for comparison.
pub async fn live_rows(db: &mut Db<'_>, name: crate::model::ProjectionName) -> Result<Vec<String>> {
    use crate::model::Model;
    use crate::model::ProjectionName;
    use crate::model::accounts::AccountsModel;
    use crate::model::history::HistoryModel;
    use crate::model::transactions::TransactionsModel;
    fn render<R: std::fmt::Debug>(records: std::collections::BTreeMap<String, R>) -> Vec<String> {
        records
            .into_iter()
            .map(|(key, record)| format!("{key} {record:?}"))
            .collect()
    }
    let view = name.tables()[0].name;
    Ok(match name {
        ProjectionName::Accounts => render(AccountsModel::load_records(db, view).await?),
        ProjectionName::Transactions => render(TransactionsModel::load_records(db, view).await?),
        ProjectionName::AccountHistory => render(HistoryModel::load_records(db, view).await?),
    })
}
