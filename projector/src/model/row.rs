//! A read-model row declared once: [`projection_row!`] takes the row's fields with their SQL
//! types and generates the struct, its column list and DDL, its decoding from a query row, and
//! the batched upsert (one `INSERT … SELECT FROM UNNEST … ON CONFLICT DO UPDATE` per batch).
//! Adding a column is one line; the SELECTs, the decoding, the casts and the conflict clause
//! cannot drift apart.
//!
//! Rows a batch touches are loaded by joining the table with `UNNEST` of their keys, not with
//! `= ANY`: for a long key list PostgreSQL may scan the whole table with a hashed filter, which
//! grows with the table, where the join probes the primary key for each key.

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

/// Declares a read-model row. Each field names its PostgreSQL type; `Option` fields are
/// nullable. See the module documentation for what it generates.
macro_rules! projection_row {
    (
        $(#[$meta:meta])*
        pub struct $name:ident in $table:literal {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty => $sql:literal ),+ $(,)?
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

            /// Reads a row selected with [`Self::columns`].
            pub fn decode(row: &sqlx::postgres::PgRow) -> $crate::error::Result<Self> {
                use sqlx::Row;
                let corrupt = |error: sqlx::Error| $crate::error::Error::CorruptRow {
                    table: $table,
                    problem: error.to_string(),
                };
                Ok($name {
                    $( $field: row.try_get(stringify!($field)).map_err(corrupt)?, )+
                })
            }

            /// Inserts or replaces `rows` in `table` (a generation's table) in one statement,
            /// keyed by `key` (`"id"`, `"a, b"`). With `extra`, each row also stores a JSON text
            /// in that `jsonb` column (the folded state a model keeps for the next event).
            pub async fn upsert(
                connection: &mut sqlx::PgConnection,
                table: &str,
                key: &str,
                rows: &[(&$name, Option<String>)],
                extra: Option<&str>,
            ) -> $crate::error::Result<()> {
                use infra::error::DatabaseContext;
                if rows.is_empty() {
                    return Ok(());
                }
                let keys: Vec<&str> = key.split(',').map(str::trim).collect();
                let mut columns: Vec<&str> = Self::NAMES.to_vec();
                columns.extend(extra);
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
                    .chain(extra.map(|name| format!("u.{name}::jsonb")))
                    .collect();
                let updates: Vec<String> = columns
                    .iter()
                    .filter(|name| !keys.contains(name))
                    .map(|name| format!("{name} = EXCLUDED.{name}"))
                    .collect();
                let statement = format!(
                    "INSERT INTO {table} ({names}) SELECT {select} FROM UNNEST({arrays}) \
                     AS u({names}) ON CONFLICT ({key}) DO UPDATE SET {updates}",
                    names = columns.join(", "),
                    select = select.join(", "),
                    arrays = arrays.join(", "),
                    updates = updates.join(", "),
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
        }
    };
}

pub(crate) use projection_row;
