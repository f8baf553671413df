//! A read-model row declared once: [`projection_row!`] takes the row's fields with their SQL
//! types and generates the struct, its column list and DDL (PostgreSQL and SQLite), its decoding
//! from a query row of either, the loads, and the batched upsert (PostgreSQL: one
//! `INSERT … SELECT FROM UNNEST … ON CONFLICT DO UPDATE` per batch; SQLite: the same upsert over
//! multi-row `VALUES`).
//! Adding a column is one line; the SELECTs, the decoding, the casts and the conflict clause
//! cannot drift apart.
//!
//! Rows a batch touches are loaded by probing the table's index once per key (`UNNEST` of the
//! keys, each joined `LATERAL` to a subquery that `OFFSET 0` keeps from being flattened), not
//! with `= ANY` or a plain join: for a long key list PostgreSQL may scan the whole table with a
//! hashed filter, and on a non-unique key without statistics (account history by transaction) it
//! estimates 0.5 % of the table per key and hash-joins a sequential scan. Either grows with the
//! table, in every batch; the probes grow with the batch.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Whether a field's Rust type is stored in a nullable column.
pub trait Nullable {
    const NULLABLE: bool;
}

impl<T> Nullable for Option<T> {
    const NULLABLE: bool = true;
}

macro_rules! not_null {
    ($($ty:ty),*) => { $(impl Nullable for $ty { const NULLABLE: bool = false; })* };
}
not_null!(Uuid, String, i64, DateTime<Utc>, serde_json::Value);

/// Parameters of one SQLite statement at most: well under its limit (32,766 since 3.32).
pub const SQLITE_PARAMETERS_PER_STATEMENT: usize = 16_000;

/// The SQLite type storing what a PostgreSQL type stores, as sqlx encodes it.
pub fn sqlite_type(postgres: &str) -> &'static str {
    match postgres {
        "uuid" => "BLOB",
        "bigint" | "integer" => "INTEGER",
        // timestamptz (RFC 3339 text), text, jsonb (JSON text).
        _ => "TEXT",
    }
}

/// Declares a read-model row. Each field names its PostgreSQL type; `Option` fields are
/// nullable; a field marked `fixed` never changes once its row is written (the upsert leaves it
/// out of its `DO UPDATE SET`, so SQLite does not rewrite the indexes that hold only such
/// columns). See the module documentation for what it generates.
macro_rules! projection_row {
    (@updated) => { true };
    (@updated fixed) => { false };
    (
        $(#[$meta:meta])*
        pub struct $name:ident in $table:literal {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty => $sql:literal $($fixed:ident)? ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )+
        }

        impl $name {
            /// The columns, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field)),+];
            /// Their PostgreSQL types.
            pub const SQL_TYPES: &'static [&'static str] = &[$($sql),+];
            const NULLABLE: &'static [bool] =
                &[$(<$ty as $crate::model::row::Nullable>::NULLABLE),+];
            /// Whether an upsert updates each column of an existing row (`false`: `fixed`).
            const UPDATED: &'static [bool] =
                &[$($crate::model::row::projection_row!(@updated $($fixed)?)),+];

            /// `a, b, c`: the column list of a SELECT.
            pub fn columns() -> &'static str {
                static COLUMNS: std::sync::LazyLock<String> =
                    std::sync::LazyLock::new(|| $name::NAMES.join(", "));
                &COLUMNS
            }

            /// `t.a AS a, t.b AS b, …`: the column list of a SELECT over `alias`.
            pub fn qualified_columns(alias: &str) -> String {
                Self::NAMES
                    .iter()
                    .map(|name| format!("{alias}.{name} AS {name}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }

            /// `a uuid NOT NULL, b text, …`: the column definitions of a CREATE TABLE.
            pub fn column_definitions() -> String {
                Self::NAMES
                    .iter()
                    .zip(Self::SQL_TYPES)
                    .zip(Self::NULLABLE)
                    .map(|((name, sql), nullable)| {
                        if *nullable {
                            format!("{name} {sql}")
                        } else {
                            format!("{name} {sql} NOT NULL")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }

            /// `a BLOB NOT NULL, b TEXT, …`: the same columns in SQLite's types (uuids as
            /// 16-byte blobs, timestamps as RFC 3339 text, JSON as text: sqlx's encodings).
            pub fn sqlite_column_definitions() -> String {
                Self::NAMES
                    .iter()
                    .zip(Self::SQL_TYPES)
                    .zip(Self::NULLABLE)
                    .map(|((name, sql), nullable)| {
                        let sql = $crate::model::row::sqlite_type(sql);
                        if *nullable {
                            format!("{name} {sql}")
                        } else {
                            format!("{name} {sql} NOT NULL")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }

            /// Reads a row selected with [`Self::columns`], from either database.
            pub fn decode<'r, R>(row: &'r R) -> $crate::error::Result<Self>
            where
                R: sqlx::Row,
                for<'e> &'e str: sqlx::ColumnIndex<R>,
                $( $ty: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>, )+
            {
                let corrupt = |error: sqlx::Error| $crate::error::Error::CorruptRow {
                    table: $table,
                    problem: error.to_string(),
                };
                Ok($name {
                    $( $field: row.try_get(stringify!($field)).map_err(corrupt)?, )+
                })
            }

            /// Reads a row and its `extra` JSON text column, if one was selected.
            fn decode_with_extra<'r, R>(
                row: &'r R,
                extra: Option<&str>,
            ) -> $crate::error::Result<(Self, Option<String>)>
            where
                R: sqlx::Row,
                for<'e> &'e str: sqlx::ColumnIndex<R>,
                Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
                $( $ty: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>, )+
            {
                let record = Self::decode(row)?;
                let extra = match extra {
                    Some(column) => row.try_get::<Option<String>, _>(column).map_err(|error| {
                        $crate::error::Error::CorruptRow {
                            table: $table,
                            problem: error.to_string(),
                        }
                    })?,
                    None => None,
                };
                Ok((record, extra))
            }

            /// The rows of `relation` (a generation's table, or the live view) whose
            /// `key_column` is one of `keys`, each with its `extra` JSON text column if named.
            /// On PostgreSQL one join with `UNNEST` of the keys (see the module documentation);
            /// on SQLite `IN` lists in chunks, each probing the index.
            pub async fn load_by_keys(
                db: &mut $crate::model::Db<'_>,
                relation: &str,
                key_column: &str,
                keys: &[uuid::Uuid],
                extra: Option<&str>,
            ) -> $crate::error::Result<Vec<(Self, Option<String>)>> {
                use infra::error::DatabaseContext;
                if keys.is_empty() {
                    return Ok(Vec::new());
                }
                let context = concat!("loading ", $table, " rows");
                match db {
                    $crate::model::Db::Pg(connection) => {
                        let extra_column = extra
                            .map(|name| format!(", t.{name}::text AS {name}"))
                            .unwrap_or_default();
                        let rows = sqlx::query(&format!(
                            "SELECT {}{extra_column} FROM UNNEST($1::uuid[]) AS k(id) \
                             JOIN LATERAL (SELECT * FROM {relation} r \
                                 WHERE r.{key_column} = k.id OFFSET 0) t ON true",
                            Self::qualified_columns("t")
                        ))
                        .bind(keys)
                        .fetch_all(&mut **connection)
                        .await
                        .context(context)?;
                        rows.iter().map(|row| Self::decode_with_extra(row, extra)).collect()
                    }
                    $crate::model::Db::Sqlite(connection) => {
                        let extra_column = extra
                            .map(|name| format!(", {name}"))
                            .unwrap_or_default();
                        let mut found = Vec::with_capacity(keys.len());
                        for chunk in keys.chunks(infra::sqlite::ROWS_PER_STATEMENT) {
                            let placeholders = vec!["?"; chunk.len()].join(", ");
                            let statement = format!(
                                "SELECT {}{extra_column} FROM {relation} \
                                 WHERE {key_column} IN ({placeholders})",
                                Self::columns()
                            );
                            let mut query = sqlx::query(&statement);
                            for key in chunk {
                                query = query.bind(*key);
                            }
                            let rows = query.fetch_all(&mut **connection).await.context(context)?;
                            for row in &rows {
                                found.push(Self::decode_with_extra(row, extra)?);
                            }
                        }
                        Ok(found)
                    }
                }
            }

            /// Every row of `relation`, each with its `extra` JSON text column if named.
            pub async fn load_all(
                db: &mut $crate::model::Db<'_>,
                relation: &str,
                extra: Option<&str>,
            ) -> $crate::error::Result<Vec<(Self, Option<String>)>> {
                use infra::error::DatabaseContext;
                let context = concat!("reading ", $table, " rows");
                match db {
                    $crate::model::Db::Pg(connection) => {
                        let extra_column = extra
                            .map(|name| format!(", {name}::text AS {name}"))
                            .unwrap_or_default();
                        let rows = sqlx::query(&format!(
                            "SELECT {}{extra_column} FROM {relation}",
                            Self::columns()
                        ))
                        .fetch_all(&mut **connection)
                        .await
                        .context(context)?;
                        rows.iter().map(|row| Self::decode_with_extra(row, extra)).collect()
                    }
                    $crate::model::Db::Sqlite(connection) => {
                        let extra_column = extra
                            .map(|name| format!(", {name}"))
                            .unwrap_or_default();
                        let rows = sqlx::query(&format!(
                            "SELECT {}{extra_column} FROM {relation}",
                            Self::columns()
                        ))
                        .fetch_all(&mut **connection)
                        .await
                        .context(context)?;
                        rows.iter().map(|row| Self::decode_with_extra(row, extra)).collect()
                    }
                }
            }

            /// Inserts or replaces `rows` in `table` (a generation's table), keyed by `key`
            /// (`"id"`, `"a, b"`). With `extra`, each row also stores a JSON text in that column
            /// (the folded state a model keeps for the next event). PostgreSQL: one statement
            /// per batch, `INSERT … SELECT FROM UNNEST … ON CONFLICT DO UPDATE`. SQLite: the same
            /// upsert over multi-row `VALUES`, in chunks under its parameter limit.
            pub async fn upsert(
                db: &mut $crate::model::Db<'_>,
                table: &str,
                key: &str,
                rows: &[(&$name, Option<String>)],
                extra: Option<&str>,
            ) -> $crate::error::Result<()> {
                if rows.is_empty() {
                    return Ok(());
                }
                match db {
                    $crate::model::Db::Pg(connection) => {
                        Self::upsert_pg(connection, table, key, rows, extra).await
                    }
                    $crate::model::Db::Sqlite(connection) => {
                        Self::upsert_sqlite(connection, table, key, rows, extra).await
                    }
                }
            }

            /// The columns an upsert writes, and `a = EXCLUDED.a, …` for every one but the key's
            /// and the `fixed` ones (`extra` is always updated).
            fn upsert_columns<'e>(key: &str, extra: Option<&'e str>) -> (Vec<&'e str>, String) {
                let keys: Vec<&str> = key.split(',').map(str::trim).collect();
                let mut columns: Vec<&str> = Self::NAMES.to_vec();
                columns.extend(extra);
                let updated = Self::UPDATED.iter().copied().chain(extra.map(|_| true));
                let updates: Vec<String> = columns
                    .iter()
                    .zip(updated)
                    .filter(|(name, updated)| *updated && !keys.contains(name))
                    .map(|(name, _)| format!("{name} = EXCLUDED.{name}"))
                    .collect();
                (columns, updates.join(", "))
            }

            async fn upsert_pg(
                connection: &mut sqlx::PgConnection,
                table: &str,
                key: &str,
                rows: &[(&$name, Option<String>)],
                extra: Option<&str>,
            ) -> $crate::error::Result<()> {
                use infra::error::DatabaseContext;
                let (columns, updates) = Self::upsert_columns(key, extra);
                let arrays: Vec<String> = Self::SQL_TYPES
                    .iter()
                    .map(|sql| format!("{sql}[]"))
                    .chain(extra.map(|_| "text[]".to_owned()))
                    .enumerate()
                    .map(|(index, array)| format!("${}::{array}", index + 1))
                    .collect();
                let select: Vec<String> = Self::NAMES
                    .iter()
                    .map(|name| format!("u.{name}"))
                    .chain(extra.map(|name| {
                        format!("u.{name}::{}", $crate::model::PG_FOLDED_STATE)
                    }))
                    .collect();
                let statement = format!(
                    "INSERT INTO {table} ({names}) SELECT {select} FROM UNNEST({arrays}) \
                     AS u({names}) ON CONFLICT ({key}) DO UPDATE SET {updates}",
                    names = columns.join(", "),
                    select = select.join(", "),
                    arrays = arrays.join(", "),
                );
                let query = sqlx::query(&statement);
                $(
                    let $field: Vec<$ty> = rows.iter().map(|(row, _)| row.$field.clone()).collect();
                    let query = query.bind($field);
                )+
                let query = match extra {
                    Some(_) => query.bind(
                        rows.iter().map(|(_, extra)| extra.clone()).collect::<Vec<Option<String>>>(),
                    ),
                    None => query,
                };
                query
                    .execute(connection)
                    .await
                    .context(concat!("storing ", $table, " rows"))?;
                Ok(())
            }

            async fn upsert_sqlite(
                connection: &mut sqlx::SqliteConnection,
                table: &str,
                key: &str,
                rows: &[(&$name, Option<String>)],
                extra: Option<&str>,
            ) -> $crate::error::Result<()> {
                use infra::error::DatabaseContext;
                let (columns, updates) = Self::upsert_columns(key, extra);
                let row_placeholders = format!("({})", vec!["?"; columns.len()].join(", "));
                let per_statement = ($crate::model::row::SQLITE_PARAMETERS_PER_STATEMENT
                    / columns.len())
                .max(1);
                for chunk in rows.chunks(per_statement) {
                    let statement = format!(
                        "INSERT INTO {table} ({names}) VALUES {values} \
                         ON CONFLICT ({key}) DO UPDATE SET {updates}",
                        names = columns.join(", "),
                        values = vec![row_placeholders.as_str(); chunk.len()].join(", "),
                    );
                    let mut query = sqlx::query(&statement);
                    for (row, extra_text) in chunk {
                        $( query = query.bind(row.$field.clone()); )+
                        if extra.is_some() {
                            query = query.bind(extra_text.clone());
                        }
                    }
                    query
                        .execute(&mut *connection)
                        .await
                        .context(concat!("storing ", $table, " rows"))?;
                }
                Ok(())
            }
        }
    };
}

pub(crate) use projection_row;
