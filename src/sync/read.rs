//! Reading the log: one statement per page, streamed into the applier.
//!
//! The statement takes exactly the log rows that were invisible to the
//! position's snapshot and are visible now (rows whose transaction was in
//! progress then, or started after it), in `(tx, id)` order, at most `limit`
//! of them. When a previous page was full, it continues after the last row
//! of that page and only up to the snapshot the delta ends at, so paging
//! never skips or repeats a row.
//!
//! In the same statement (hence the same snapshot) it reads the current truth
//! of every key those rows name, every entry of every cache they clear, and
//! the snapshot itself, which becomes the next position.

use futures_util::{StreamExt, pin_mut};
use tokio_postgres::{Client, Statement};

use super::apply::{Applier, Change};
use super::position::Position;
use super::snapshot::Snapshot;
use crate::cache::keys::{NameError, check_key, check_stored_cache};
use crate::db::DbError;

/// The page statement. Parameters: `$1` the position's snapshot, `$2`/`$3`
/// the last `(tx, id)` read of a partly read delta (`'0'`, 0 when none), `$4`
/// the snapshot that delta ends at (NULL when none), `$5` the page size,
/// `$6`/`$7` where the range part starts: the greater of `(xmax($1), 0)` and
/// `($2, $3)` ([`range_start`]).
///
/// Both parts read `log` through its `(tx, id)` index, in index order and
/// with a `LIMIT`, so that their cost is that of the rows they return,
/// whatever the size of the retained log and whatever its statistics say:
/// the range part's only lower bound is one row comparison, where the index
/// scan starts (given both `tx >= xmax` and `(tx, id) > ($2, $3)`,
/// PostgreSQL started the scan at the second bound: the start of the log
/// when no delta was partly read), and the in-progress part looks each
/// listed transaction up on its own (`tx = ANY(list)` was planned as a
/// sequential scan when the statistics said one transaction wrote most of
/// the log, as a bulk load does).
///
/// Output rows: part 0, one row of metadata; part 1, a cache cleared; part 2,
/// an entry of a cleared cache; part 3, a key named by a put or delete with
/// its current value (NULL when the key no longer exists), in the order of
/// each key's last change in the page (commit order: the order in which the
/// applier refreshes them and the event stream reports them). The LATERAL
/// subqueries cannot be flattened into joins (`LIMIT 1`, `OFFSET 0`), so
/// each key is looked up on the primary key however many rows the planner
/// expects the page to have (a hash join would read all of `entries`).
pub const PAGE: &str = "
WITH page AS MATERIALIZED (
    SELECT id, tx, kind, cache, key FROM (
        (SELECT l.id, l.tx, l.kind, l.cache, l.key
           FROM pg_snapshot_xip($1::text::pg_snapshot) AS x(tx)
           CROSS JOIN LATERAL (
               SELECT id, tx, kind, cache, key FROM {schema}.log
                WHERE log.tx = x.tx
                  AND (log.tx, log.id) > ($2::text::xid8, $3::int8)
                  AND ($4::text IS NULL OR pg_visible_in_snapshot(log.tx, $4::text::pg_snapshot))
                ORDER BY log.tx, log.id
                LIMIT $5::int8) l)
        UNION ALL
        (SELECT id, tx, kind, cache, key FROM {schema}.log
          WHERE (tx, id) > ($6::text::xid8, $7::int8)
            AND ($4::text IS NULL OR pg_visible_in_snapshot(tx, $4::text::pg_snapshot))
          ORDER BY tx, id
          LIMIT $5::int8)
    ) u
    ORDER BY tx, id
    LIMIT $5::int8
), cleared AS (
    SELECT DISTINCT cache FROM page WHERE kind = 'clear'
), touched AS (
    SELECT DISTINCT ON (cache, key) cache, key, tx, id FROM page
     WHERE kind <> 'clear' AND cache NOT IN (SELECT cache FROM cleared)
     ORDER BY cache, key, tx DESC, id DESC
)
SELECT 0 AS part, NULL::text AS cache, NULL::text AS key, NULL::bytea AS value,
       NULL::text AS content_type,
       (SELECT count(*) FROM page) AS n,
       (SELECT tx::text || ':' || id FROM page ORDER BY tx DESC, id DESC LIMIT 1) AS last,
       pg_current_snapshot()::text AS snapshot,
       m.schema_id::text || ':' || '{schema}.meta'::regclass::oid::text AS schema_id,
       m.pruned_below::text AS pruned_below
  FROM {schema}.meta m
UNION ALL
SELECT 1, c.cache, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM cleared c
UNION ALL
SELECT 2, c.cache, e.key, e.value, e.content_type, NULL, NULL, NULL, NULL, NULL
  FROM cleared c
  CROSS JOIN LATERAL (SELECT key, value, content_type FROM {schema}.entries
                       WHERE cache = c.cache OFFSET 0) e
UNION ALL
(SELECT 3, t.cache, t.key, e.value, e.content_type, NULL, NULL, NULL, NULL, NULL
   FROM touched t
   LEFT JOIN LATERAL (SELECT value, content_type FROM {schema}.entries
                       WHERE cache = t.cache AND key = t.key LIMIT 1) e ON true
  ORDER BY t.tx, t.id)
";

/// What a page read said about itself.
#[derive(Debug, Clone)]
pub struct PageMeta {
    /// Log rows in the page.
    pub rows: i64,
    /// The last `(tx, id)` of the page.
    pub last: Option<(u64, i64)>,
    /// The statement's snapshot.
    pub snapshot: Snapshot,
    pub schema_id: String,
    pub pruned_below: u64,
    /// Rows naming an invalid cache or key, skipped ([`skipped_row`]).
    pub skipped: u64,
}

/// The cache and key of a row (of the log or of `entries`), when both are
/// valid; otherwise the row is logged and counted ([`skipped_row`]).
pub fn valid_entry(
    skipped: &mut u64,
    cache: String,
    key: Option<String>,
) -> Option<(String, String)> {
    let checked = check_stored_cache(&cache).and_then(|()| match &key {
        Some(k) => check_key(k),
        None => Err(NameError::EmptyKey),
    });
    match (checked, key) {
        (Ok(()), Some(key)) => Some((cache, key)),
        (checked, key) => {
            let why = checked.err().map(|e| e.to_string()).unwrap_or_default();
            skipped_row(skipped, "entry", &cache, key.as_deref(), &why);
            None
        }
    }
}

/// Logs a row (of the log or of `entries`) that names an invalid cache or
/// key, which is skipped: written other than through tandem's functions, it
/// can name no local file (a cache such as `../x` would escape the cache
/// directory), and failing the whole read for it would stall this host for
/// as long as the row stays. Skipping is what refreshing from the truth
/// would do: such a key cannot exist locally.
fn skipped_row(count: &mut u64, what: &str, cache: &str, key: Option<&str>, why: &str) {
    *count += 1;
    let key: String = key.unwrap_or("(null)").chars().take(200).collect();
    let cache: String = cache.chars().take(200).collect();
    tracing::error!(row = what, cache = %cache, key = %key, error = why,
        "a database row names an invalid cache or key; skipped (it was not written through tandem's functions)");
}

/// A page read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("unexpected page data: {0}")]
    Protocol(String),
}

impl From<tokio_postgres::Error> for ReadError {
    fn from(e: tokio_postgres::Error) -> Self {
        ReadError::Db(e.into())
    }
}

/// Changes on their way to the applier, handed over in chunks.
#[derive(Default)]
struct Chunk {
    changes: Vec<Change>,
    bytes: usize,
}

impl Chunk {
    const MAX_CHANGES: usize = 64;
    const MAX_BYTES: usize = 1 << 20;

    async fn push(&mut self, change: Change, applier: &Applier) {
        self.bytes += change.weight();
        self.changes.push(change);
        if self.changes.len() >= Self::MAX_CHANGES || self.bytes >= Self::MAX_BYTES {
            self.flush(applier).await;
        }
    }

    async fn flush(&mut self, applier: &Applier) {
        self.bytes = 0;
        applier.apply(std::mem::take(&mut self.changes)).await;
    }
}

fn parse_last(text: &str) -> Option<(u64, i64)> {
    let (tx, id) = text.split_once(':')?;
    Some((tx.parse().ok()?, id.parse().ok()?))
}

/// Reads one page after `position` and feeds it to the applier (without
/// committing). Returns the page's metadata.
pub async fn read_page(
    client: &Client,
    statement: &Statement,
    position: &Position,
    limit: u32,
    applier: &Applier,
) -> Result<PageMeta, ReadError> {
    let prev = position.done.to_string();
    let (after_tx, after_id, target) = match &position.pending {
        Some(p) => (
            p.after_tx.to_string(),
            p.after_id,
            Some(p.target.to_string()),
        ),
        None => ("0".to_string(), 0i64, None),
    };
    let limit = i64::from(limit);
    let (start_tx, start_id) = range_start(position);
    let start_tx = start_tx.to_string();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
        &prev, &after_tx, &after_id, &target, &limit, &start_tx, &start_id,
    ];
    let rows = client.query_raw(statement, params).await?;
    pin_mut!(rows);
    let mut meta = None;
    let mut meta_skipped = 0u64;
    let mut chunk = Chunk::default();
    while let Some(row) = rows.next().await {
        let row = row?;
        let part: i32 = row.try_get(0)?;
        let change = match part {
            0 => {
                let snapshot: String = row.try_get(7)?;
                let pruned: String = row.try_get(9)?;
                meta = Some(PageMeta {
                    rows: row.try_get(5)?,
                    last: row
                        .try_get::<_, Option<String>>(6)?
                        .as_deref()
                        .and_then(parse_last),
                    snapshot: snapshot
                        .parse()
                        .map_err(|e| ReadError::Protocol(format!("{e}")))?,
                    schema_id: row.try_get(8)?,
                    pruned_below: pruned
                        .parse()
                        .map_err(|_| ReadError::Protocol(format!("bad pruned_below {pruned:?}")))?,
                    skipped: 0,
                });
                continue;
            }
            1 => {
                let cache: String = row.try_get(1)?;
                if let Err(e) = check_stored_cache(&cache) {
                    skipped_row(&mut meta_skipped, "clear", &cache, None, &e.to_string());
                    continue;
                }
                Change::Clear { cache }
            }
            2 | 3 => {
                let Some((cache, key)) =
                    valid_entry(&mut meta_skipped, row.try_get(1)?, row.try_get(2)?)
                else {
                    continue;
                };
                match row.try_get::<_, Option<Vec<u8>>>(3)? {
                    Some(value) => Change::Put {
                        cache,
                        key,
                        value,
                        content_type: row.try_get(4)?,
                        cleared: part == 2,
                    },
                    None => Change::Delete { cache, key },
                }
            }
            other => return Err(ReadError::Protocol(format!("unknown part {other}"))),
        };
        chunk.push(change, applier).await;
    }
    chunk.flush(applier).await;
    let mut meta = meta
        .ok_or_else(|| ReadError::Protocol("no metadata row (is the meta table empty?)".into()))?;
    meta.skipped = meta_skipped;
    if meta.rows > 0 && meta.last.is_none() {
        return Err(ReadError::Protocol("page without a last row".into()));
    }
    Ok(meta)
}

/// Where the range part of the next page starts (exclusive): rows with
/// `tx >= xmax(done)` are `(tx, id) > (xmax(done), 0)` (ids start at 1), and
/// a partly read delta continues after its last row.
pub fn range_start(position: &Position) -> (u64, i64) {
    let from_snapshot = (position.done.xmax(), 0);
    match &position.pending {
        Some(p) => from_snapshot.max((p.after_tx, p.after_id)),
        None => from_snapshot,
    }
}

/// The position after applying a page read from `position`.
pub fn next_position(position: &Position, meta: &PageMeta, limit: u32) -> Position {
    let target = position
        .pending
        .as_ref()
        .map_or_else(|| meta.snapshot.clone(), |p| p.target.clone());
    match meta.last {
        Some((after_tx, after_id)) if meta.rows >= i64::from(limit) => Position {
            done: position.done.clone(),
            pending: Some(super::position::Pending {
                target,
                after_tx,
                after_id,
            }),
        },
        _ => Position {
            done: target,
            pending: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::position::Pending;

    fn snap(s: &str) -> Snapshot {
        s.parse().unwrap()
    }

    fn meta(rows: i64, last: Option<(u64, i64)>, snapshot: &str) -> PageMeta {
        PageMeta {
            rows,
            last,
            snapshot: snap(snapshot),
            schema_id: "s".into(),
            pruned_below: 0,
            skipped: 0,
        }
    }

    #[test]
    fn a_short_page_completes_the_delta() {
        let p = Position {
            done: snap("10:10:"),
            pending: None,
        };
        let next = next_position(&p, &meta(3, Some((12, 7)), "13:15:14"), 100);
        assert_eq!(
            next,
            Position {
                done: snap("13:15:14"),
                pending: None
            }
        );
    }

    #[test]
    fn a_full_page_keeps_done_and_records_the_cursor() {
        let p = Position {
            done: snap("10:10:"),
            pending: None,
        };
        let next = next_position(&p, &meta(2, Some((11, 4)), "13:15:14"), 2);
        assert_eq!(
            next,
            Position {
                done: snap("10:10:"),
                pending: Some(Pending {
                    target: snap("13:15:14"),
                    after_tx: 11,
                    after_id: 4
                }),
            }
        );
        // the next page ends the delta at the *target*, not at its own snapshot
        let last = next_position(&next, &meta(1, Some((12, 9)), "20:20:"), 2);
        assert_eq!(
            last,
            Position {
                done: snap("13:15:14"),
                pending: None
            }
        );
    }

    #[test]
    fn the_range_starts_at_the_later_bound() {
        let fresh = Position {
            done: snap("10:12:11"),
            pending: None,
        };
        assert_eq!(range_start(&fresh), (12, 0));
        let mut paging = fresh.clone();
        paging.pending = Some(Pending {
            target: snap("20:20:"),
            after_tx: 15,
            after_id: 40,
        });
        assert_eq!(range_start(&paging), (15, 40));
        // A cursor still in the in-progress list (below xmax) starts the
        // range at xmax.
        paging.pending.as_mut().unwrap().after_tx = 11;
        assert_eq!(range_start(&paging), (12, 0));
    }

    #[test]
    fn parse_last_rows() {
        assert_eq!(parse_last("12:7"), Some((12, 7)));
        assert_eq!(parse_last("12"), None);
        assert_eq!(parse_last("x:1"), None);
    }
}
