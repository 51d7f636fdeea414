//! Schema migrations, embedded in the binary and applied in order, in one
//! transaction, under an advisory lock (so that hosts starting together
//! migrate once).

use tokio_postgres::Client;

use super::{DbError, render};

/// `(version, name, SQL template)`, in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "core", include_str!("migrations/0001_core.sql")),
    (
        2,
        "coordination",
        include_str!("migrations/0002_coordination.sql"),
    ),
    (3, "uploads", include_str!("migrations/0003_uploads.sql")),
    (4, "events", include_str!("migrations/0004_events.sql")),
    (5, "batch", include_str!("migrations/0005_batch.sql")),
    (6, "reads", include_str!("migrations/0006_reads.sql")),
    (
        7,
        "heartbeat_xip",
        include_str!("migrations/0007_heartbeat_xip.sql"),
    ),
];

/// The newest schema version this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "schema {schema} is at version {found}, newer than this tandem knows ({known}); upgrade tandem on this host"
    )]
    Newer {
        schema: String,
        found: i32,
        known: i32,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Db(e.into())
    }
}

/// What [`run`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub from: i32,
    pub to: i32,
}

/// Applies every migration newer than the schema's version.
pub async fn run(client: &mut Client, schema: &str) -> Result<Outcome, MigrateError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('tandem.migrate.' || $1::text))",
        &[&schema],
    )
    .await?;
    tx.batch_execute(&render(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.migrations (
             version    int PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
        schema,
    ))
    .await?;
    let row = tx
        .query_one(
            &render(
                "SELECT coalesce(max(version), 0) FROM {schema}.migrations",
                schema,
            ),
            &[],
        )
        .await?;
    let from: i32 = row.get(0);
    if from > latest() {
        return Err(MigrateError::Newer {
            schema: schema.to_string(),
            found: from,
            known: latest(),
        });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > from) {
        tracing::info!(schema, version, name, "applying migration");
        tx.batch_execute(&render(sql, schema)).await?;
        tx.execute(
            &render(
                "INSERT INTO {schema}.migrations (version, name) VALUES ($1, $2)",
                schema,
            ),
            &[version, name],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Outcome { from, to: latest() })
}
