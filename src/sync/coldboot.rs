//! Cold boot: read all of `entries` in one REPEATABLE READ transaction, write
//! it into a fresh cache generation, swap it in, and take that transaction's
//! snapshot as the position. Readers keep seeing the old generation until the
//! swap.

use futures_util::{StreamExt, pin_mut};
use tokio_postgres::{Client, GenericClient, IsolationLevel};

use super::apply::Applier;
use super::position::{Identity, LocalState, Position};
use super::read::{ReadError, valid_entry};
use super::snapshot::Snapshot;
use crate::db::render;

/// Why a host cold-boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdBootReason {
    /// No usable local position (first start, or its cache generation is gone).
    NoPosition,
    /// The local position file could not be read.
    CorruptState,
    /// Log rows this host had not read may have been pruned.
    Pruned,
    /// A different database, or the schema was re-created or restored.
    DatabaseChanged,
    /// An operator asked for it.
    Requested,
}

impl ColdBootReason {
    pub const ALL: [ColdBootReason; 5] = [
        ColdBootReason::NoPosition,
        ColdBootReason::CorruptState,
        ColdBootReason::Pruned,
        ColdBootReason::DatabaseChanged,
        ColdBootReason::Requested,
    ];

    /// The metric label and log value.
    pub fn as_str(self) -> &'static str {
        match self {
            ColdBootReason::NoPosition => "no_position",
            ColdBootReason::CorruptState => "corrupt_state",
            ColdBootReason::Pruned => "pruned",
            ColdBootReason::DatabaseChanged => "database_changed",
            ColdBootReason::Requested => "requested",
        }
    }
}

/// What the database says about itself right now.
#[derive(Debug, Clone)]
pub struct Remote {
    pub identity: Identity,
    pub snapshot: Snapshot,
    pub pruned_below: u64,
}

const REMOTE: &str = "SELECT pg_current_snapshot()::text, \
     (SELECT system_identifier::text FROM pg_control_system()), \
     m.schema_id::text || ':' || '{schema}.meta'::regclass::oid::text, \
     m.pruned_below::text FROM {schema}.meta m";

/// Without the privilege to read the system identifier, the schema id alone
/// identifies the database.
const REMOTE_FALLBACK: &str = "SELECT pg_current_snapshot()::text, ''::text, \
     m.schema_id::text || ':' || '{schema}.meta'::regclass::oid::text, \
     m.pruned_below::text FROM {schema}.meta m";

/// Whether this role may read the system identifier.
pub async fn can_read_system_id(client: &Client) -> Result<bool, ReadError> {
    let row = client
        .query_one(
            "SELECT has_function_privilege('pg_control_system()', 'execute')",
            &[],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Reads the database's identity and current snapshot.
pub async fn remote(
    client: &impl GenericClient,
    schema: &str,
    with_system_id: bool,
) -> Result<Remote, ReadError> {
    let sql = render(
        if with_system_id {
            REMOTE
        } else {
            REMOTE_FALLBACK
        },
        schema,
    );
    let row = client.query_one(sql.as_str(), &[]).await?;
    let snapshot: String = row.try_get(0)?;
    let system_id: Option<String> = row.try_get(1)?;
    let pruned: String = row.try_get(3)?;
    Ok(Remote {
        identity: Identity {
            system_id: system_id.unwrap_or_default(),
            schema_id: row.try_get(2)?,
        },
        snapshot: snapshot
            .parse()
            .map_err(|e| ReadError::Protocol(format!("{e}")))?,
        pruned_below: pruned
            .parse()
            .map_err(|_| ReadError::Protocol(format!("bad pruned_below {pruned:?}")))?,
    })
}

/// Whether a host with local `state` must cold-boot against `remote`.
pub fn needed(
    state: Option<&LocalState>,
    generation: &str,
    remote: &Remote,
) -> Option<ColdBootReason> {
    let Some(state) = state else {
        return Some(ColdBootReason::NoPosition);
    };
    if state.generation != generation {
        return Some(ColdBootReason::NoPosition);
    }
    if state.identity != remote.identity {
        return Some(ColdBootReason::DatabaseChanged);
    }
    if furthest_xmax(&state.position) > remote.snapshot.xmax() {
        // The position is from the database's future: it was restored to an
        // earlier point.
        return Some(ColdBootReason::DatabaseChanged);
    }
    let done = &state.position.done;
    if remote.pruned_below > done.xmin() {
        return Some(ColdBootReason::Pruned);
    }
    None
}

/// The furthest transaction horizon a position has seen: its own, or that
/// of the delta it is reading.
pub fn furthest_xmax(p: &Position) -> u64 {
    let pending = p.pending.as_ref().map_or(0, |d| d.target.xmax());
    p.done.xmax().max(pending)
}

/// A cold boot failed.
#[derive(Debug, thiserror::Error)]
pub enum ColdBootError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Apply(#[from] super::apply::ApplyError),
}

impl From<tokio_postgres::Error> for ColdBootError {
    fn from(e: tokio_postgres::Error) -> Self {
        ColdBootError::Read(e.into())
    }
}

/// Rebuilds the cache from `entries`. Returns the new local state and the
/// number of entries.
pub async fn run(
    client: &mut Client,
    schema: &str,
    with_system_id: bool,
    applier: &Applier,
    alive: &(dyn Fn() + Sync),
    skipped_rows: &prometheus::IntCounter,
) -> Result<(LocalState, u64), ColdBootError> {
    let result = build(client, schema, with_system_id, applier, alive, skipped_rows).await;
    if result.is_err() {
        applier.abandon_build().await;
    }
    result
}

async fn build(
    client: &mut Client,
    schema: &str,
    with_system_id: bool,
    applier: &Applier,
    alive: &(dyn Fn() + Sync),
    skipped_rows: &prometheus::IntCounter,
) -> Result<(LocalState, u64), ColdBootError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // The first statement fixes the transaction's snapshot.
    let remote = remote(&tx, schema, with_system_id).await?;
    let generation = applier.begin_build().await?;
    let sql = render(
        "SELECT cache, key, value, content_type FROM {schema}.entries",
        schema,
    );
    let statement = tx.prepare(&sql).await?;
    let rows = tx.query_raw(&statement, std::iter::empty::<&str>()).await?;
    pin_mut!(rows);
    let mut n = 0u64;
    let mut skipped = 0u64;
    while let Some(row) = rows.next().await {
        let row = row?;
        n += 1;
        if n.is_multiple_of(4096) {
            alive();
        }
        let Some((cache, key)) = valid_entry(&mut skipped, row.try_get(0)?, row.try_get(1)?) else {
            continue;
        };
        applier
            .build_put(cache, key, row.try_get(2)?, row.try_get(3)?)
            .await;
    }
    tx.commit().await?;
    skipped_rows.inc_by(skipped);
    let state = LocalState {
        version: LocalState::VERSION,
        identity: remote.identity,
        generation,
        position: Position {
            done: remote.snapshot,
            pending: None,
        },
    };
    let entries = applier.finish_build(state.clone()).await?;
    Ok((state, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(done: &str, generation: &str) -> LocalState {
        LocalState {
            version: LocalState::VERSION,
            identity: Identity {
                system_id: "sys".into(),
                schema_id: "schema".into(),
            },
            generation: generation.into(),
            position: Position {
                done: done.parse().unwrap(),
                pending: None,
            },
        }
    }

    fn remote_at(snapshot: &str, pruned_below: u64) -> Remote {
        Remote {
            identity: Identity {
                system_id: "sys".into(),
                schema_id: "schema".into(),
            },
            snapshot: snapshot.parse().unwrap(),
            pruned_below,
        }
    }

    #[test]
    fn triggers() {
        let r = remote_at("100:105:101", 0);
        assert_eq!(needed(None, "g-1", &r), Some(ColdBootReason::NoPosition));
        assert_eq!(
            needed(Some(&state("90:95:", "g-1")), "g-2", &r),
            Some(ColdBootReason::NoPosition)
        );
        assert_eq!(needed(Some(&state("90:95:", "g-1")), "g-1", &r), None);
        let mut other = state("90:95:", "g-1");
        other.identity.schema_id = "recreated".into();
        assert_eq!(
            needed(Some(&other), "g-1", &r),
            Some(ColdBootReason::DatabaseChanged)
        );
        assert_eq!(
            needed(Some(&state("200:210:", "g-1")), "g-1", &r),
            Some(ColdBootReason::DatabaseChanged)
        );
        // A delta under way toward a snapshot from the database's future.
        let mut reading = state("90:95:", "g-1");
        reading.position.pending = Some(super::super::position::Pending {
            target: "110:120:".parse().unwrap(),
            after_tx: 96,
            after_id: 7,
        });
        assert_eq!(furthest_xmax(&reading.position), 120);
        assert_eq!(
            needed(Some(&reading), "g-1", &r),
            Some(ColdBootReason::DatabaseChanged)
        );
        assert_eq!(
            needed(
                Some(&state("90:95:", "g-1")),
                "g-1",
                &remote_at("100:105:", 91)
            ),
            Some(ColdBootReason::Pruned)
        );
        assert_eq!(
            needed(
                Some(&state("90:95:", "g-1")),
                "g-1",
                &remote_at("100:105:", 90)
            ),
            None
        );
    }
}
