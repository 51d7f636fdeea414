//! Local full-text indexes (tantivy) of the caches the config names, fed by
//! the same applied batches as the cache directory.
//!
//! - The applier hands each committed batch's changes to a [`Feed`], which
//!   forwards them, with a [`Mark`] naming the position they reach, to one
//!   writer thread per index ([`writer`]). Changes are sent only once their
//!   files are visible, so a writer that reads a file (a rebuild, a replay)
//!   never sees an older state than a change it already has.
//! - A writer commits at most every `search.commit_interval`; each commit
//!   carries the mark's position, the cache generation and the schema
//!   fingerprint as its payload.
//! - At start, an index whose payload does not match (schema changed,
//!   another cache generation, missing or corrupt) is rebuilt from the local
//!   cache directory into a new directory and swapped in; searches answer
//!   from the previous index meanwhile. An index behind the cache directory
//!   replays: the sync task asks the database which keys changed since the
//!   index's position ([`Search::replay`]) and the writer re-reads them from
//!   the cache directory.
//! - Searches ([`query`]) run on the HTTP workers against the live reader.

mod anyfield;
pub mod doc;
mod highlight;
pub mod metrics;
pub mod query;
mod stem;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tantivy::{Index, IndexReader, ReloadPolicy};
use tokio_postgres::Client;

use crate::cache::CacheDir;
use crate::config::search::{IndexSpec, SearchConfig};
use crate::db::{DbError, render};
use crate::metrics::Metrics;
use crate::sync::position::LocalState;

/// The generation a live index's commits name while a rebuild it needs is
/// due or under way: no cache generation is called so, so an index found
/// with it at start is rebuilt (reason `interrupted`).
pub(crate) const REBUILDING: &str = "rebuilding";

/// A position an index can be at: the cache generation and the snapshot of
/// the log read.
#[derive(Clone, Debug)]
pub struct Mark {
    pub position: String,
    pub generation: String,
    /// When the batch became visible in the cache directory.
    pub applied_at: Instant,
}

impl Mark {
    pub fn of(state: &LocalState) -> Self {
        Self {
            position: state.position.done.to_string(),
            generation: state.generation.clone(),
            applied_at: Instant::now(),
        }
    }
}

/// What a commit records (tantivy's commit payload, as JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payload {
    pub fingerprint: String,
    pub generation: String,
    pub position: Option<String>,
}

/// One change to an index.
#[derive(Debug)]
pub enum Op {
    Upsert {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    Clear,
    /// Re-read the key from the cache directory.
    Refresh {
        key: String,
    },
}

/// A message to a writer thread.
pub enum Msg {
    Batch {
        ops: Vec<Op>,
        mark: Option<Mark>,
    },
    Rebuild {
        reason: &'static str,
        mark: Option<Mark>,
    },
    Stop,
}

/// The index searches read, with what every search of it needs.
pub struct Live {
    pub index: Index,
    pub reader: IndexReader,
    /// Parses queries against this index's own schema (which, while a
    /// schema change is being rebuilt, is the old one).
    pub parser: tantivy::query::QueryParser,
    /// The tokenized text fields: what a query searches when it names none.
    pub text_fields: Vec<tantivy::schema::Field>,
}

impl Live {
    fn open(index: Index) -> tantivy::Result<Self> {
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let text_fields = query::default_fields(&index.schema());
        let mut parser = tantivy::query::QueryParser::for_index(&index, text_fields.clone());
        parser.set_conjunction_by_default();
        Ok(Self {
            index,
            reader,
            parser,
            text_fields,
        })
    }
}

/// What an index reports about itself.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IndexStatus {
    pub documents: u64,
    /// The log position the searchable index reflects.
    pub position: Option<String>,
    pub generation: Option<String>,
    /// Why a rebuild is running, if one is.
    pub rebuilding: Option<&'static str>,
    /// When the index last committed (RFC 3339).
    pub last_commit: Option<String>,
    pub last_error: Option<String>,
}

/// One index, shared by its writer thread and the HTTP handlers.
pub struct SearchIndex {
    pub spec: IndexSpec,
    live: RwLock<Option<Arc<Live>>>,
    status: Mutex<IndexStatus>,
    tx: SyncSender<Msg>,
    /// A requested rebuild is queued and not yet started: more requests
    /// meanwhile join it instead of queueing (and restarting) one each.
    requested: std::sync::atomic::AtomicBool,
}

impl SearchIndex {
    /// The index to search, if there is one yet.
    pub fn live(&self) -> Option<Arc<Live>> {
        self.live.read().expect("not poisoned").clone()
    }

    fn set_live(&self, live: Arc<Live>) {
        *self.live.write().expect("not poisoned") = Some(live);
    }

    pub fn status(&self) -> IndexStatus {
        self.status.lock().expect("not poisoned").clone()
    }

    fn update(&self, f: impl FnOnce(&mut IndexStatus)) {
        f(&mut self.status.lock().expect("not poisoned"));
    }

    fn send(&self, msg: Msg) {
        // A writer only stops at shutdown.
        let _ = self.tx.send(msg);
    }
}

/// Every index of this host.
pub struct Search {
    pub config: SearchConfig,
    indexes: Vec<Arc<SearchIndex>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Indexes whose position differs from the cache directory's at start,
    /// with the position to replay from.
    replay: Mutex<Vec<(usize, String)>>,
}

/// Why an index could not be used as it is on disk.
enum Opened {
    Ready {
        index: Index,
        payload: Payload,
    },
    /// Readable, but written for another schema or cache generation.
    Stale {
        index: Option<Index>,
        reason: &'static str,
    },
}

/// The directory holding an index's versions and the `current` link.
fn index_root(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("search").join(name)
}

fn open_current(root: &Path, spec: &IndexSpec, generation: &str) -> Opened {
    let current = root.join("current");
    let Ok(target) = std::fs::read_link(&current) else {
        return Opened::Stale {
            index: None,
            reason: "missing",
        };
    };
    let corrupt = |why: String| {
        tracing::warn!(index = %spec.name, error = %why, "search index unusable; rebuilding it from the cache directory");
        Opened::Stale {
            index: None,
            reason: "corrupt",
        }
    };
    let index = match Index::open_in_dir(root.join(&target)) {
        Ok(i) => i,
        Err(e) => return corrupt(e.to_string()),
    };
    doc::register_tokenizers(&index);
    let payload = match index.load_metas() {
        Ok(m) => m
            .payload
            .and_then(|p| serde_json::from_str::<Payload>(&p).ok()),
        Err(e) => return corrupt(e.to_string()),
    };
    let Some(payload) = payload else {
        return corrupt("no commit payload".into());
    };
    if payload.fingerprint != spec.fingerprint() {
        return Opened::Stale {
            index: Some(index),
            reason: "schema_changed",
        };
    }
    if payload.generation == REBUILDING {
        return Opened::Stale {
            index: Some(index),
            reason: "interrupted",
        };
    }
    if payload.generation != generation {
        return Opened::Stale {
            index: Some(index),
            reason: "cold_boot",
        };
    }
    Opened::Ready { index, payload }
}

impl Search {
    /// Opens every configured index and starts its writer thread. `state`
    /// is the cache directory's durable position (`None` before its first
    /// batch); `generation` its current generation. Returns the feed for
    /// the applier.
    pub fn start(
        config: SearchConfig,
        data_dir: &Path,
        cache: CacheDir,
        generation: &str,
        state: Option<&LocalState>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Search>, Feed) {
        let mut indexes = Vec::new();
        let mut threads = Vec::new();
        let mut replay = Vec::new();
        let mut routes: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, spec) in config.indexes.iter().enumerate() {
            metrics.search.register_index(&spec.name);
            let root = index_root(data_dir, &spec.name);
            let opened = open_current(&root, spec, generation);
            let (tx, rx) = sync_channel(64);
            let ix = Arc::new(SearchIndex {
                spec: spec.clone(),
                live: RwLock::new(None),
                status: Mutex::new(IndexStatus {
                    generation: Some(generation.to_string()),
                    ..IndexStatus::default()
                }),
                tx,
                requested: Default::default(),
            });
            let start_mark = state.map(Mark::of);
            let (writable, rebuild) = match opened {
                Opened::Ready { index, payload } => {
                    if payload.position.as_deref()
                        != state.map(|s| s.position.done.to_string()).as_deref()
                        && let Some(from) = payload.position.clone()
                    {
                        replay.push((i, from));
                    }
                    ix.update(|s| s.position = payload.position.clone());
                    (Some(index), None)
                }
                Opened::Stale { index, reason } => {
                    if reason != "missing" {
                        tracing::info!(index = %spec.name, reason, "rebuilding the search index from the cache directory");
                    }
                    if let Some(old) = index
                        && let Ok(live) = Live::open(old)
                    {
                        ix.update(|s| s.documents = live.reader.searcher().num_docs());
                        ix.set_live(Arc::new(live));
                    }
                    (None, Some(reason))
                }
            };
            let w = writer::Writer::new(
                ix.clone(),
                root,
                cache.clone(),
                metrics.clone(),
                &config,
                start_mark,
            );
            threads.push(w.spawn(rx, writable, rebuild));
            routes.entry(spec.cache.clone()).or_default().push(i);
            indexes.push(ix);
        }
        let feed = Feed {
            senders: indexes.iter().map(|ix| ix.tx.clone()).collect(),
            pending: indexes.iter().map(|_| Vec::new()).collect(),
            routes,
        };
        let search = Arc::new(Search {
            config,
            indexes,
            threads: Mutex::new(threads),
            replay: Mutex::new(replay),
        });
        (search, feed)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<SearchIndex>> {
        self.indexes.iter().find(|i| i.spec.name == name)
    }

    pub fn indexes(&self) -> &[Arc<SearchIndex>] {
        &self.indexes
    }

    /// Starts a rebuild of an index from the cache directory (joining one
    /// requested and not yet started). False when there is no such index, or
    /// its writer's queue is full.
    pub fn rebuild(&self, name: &str) -> bool {
        match self.get(name) {
            Some(ix) => {
                use std::sync::atomic::Ordering;
                if ix.requested.swap(true, Ordering::SeqCst) {
                    return true;
                }
                ix.update(|s| s.rebuilding = Some("requested"));
                // Never blocks the caller (an HTTP thread): with the writer's
                // queue full, the request is dropped and may be made again.
                let msg = Msg::Rebuild {
                    reason: "requested",
                    mark: None,
                };
                if ix.tx.try_send(msg).is_err() {
                    ix.requested.store(false, Ordering::SeqCst);
                    return false;
                }
                true
            }
            None => false,
        }
    }

    /// Whether some index still has to replay (see [`Self::replay`]).
    pub fn replay_pending(&self) -> bool {
        !self.replay.lock().expect("not poisoned").is_empty()
    }

    /// No replay is needed after all (the cache directory was rebuilt, and
    /// the indexes with it).
    pub fn forget_replay(&self) {
        self.replay.lock().expect("not poisoned").clear();
    }

    /// Brings indexes that are behind the cache directory up to it: asks
    /// the database which keys of their caches changed since each index's
    /// position, and has the writer re-read those keys from the cache
    /// directory. Runs on the sync connection before the first read, so
    /// that no new batch is applied meanwhile. An index whose missed rows
    /// include a clear, or were pruned, or are too many, is rebuilt.
    pub async fn replay(
        &self,
        client: &Client,
        schema: &str,
        state: &LocalState,
    ) -> Result<(), DbError> {
        const MAX_REPLAY_KEYS: i64 = 100_000;
        let todo = self.replay.lock().expect("not poisoned").clone();
        // Rows below the snapshot's xmin are visible to it by definition:
        // that bound lets the (tx, id) index skip the log's older part.
        let sql = render(
            "SELECT (SELECT pruned_below::text FROM {schema}.meta),
                    (SELECT count(*) FROM {schema}.log
                      WHERE tx >= pg_snapshot_xmin($1::text::pg_snapshot)
                        AND cache = $2 AND kind = 'clear'
                        AND NOT pg_visible_in_snapshot(tx, $1::text::pg_snapshot)),
                    ARRAY(SELECT DISTINCT key FROM {schema}.log
                           WHERE tx >= pg_snapshot_xmin($1::text::pg_snapshot)
                             AND cache = $2 AND kind <> 'clear'
                             AND NOT pg_visible_in_snapshot(tx, $1::text::pg_snapshot)
                           LIMIT $3)",
            schema,
        );
        for (i, from) in todo {
            let ix = &self.indexes[i];
            let Ok(snapshot) = from.parse::<crate::sync::snapshot::Snapshot>() else {
                ix.send(Msg::Rebuild {
                    reason: "corrupt",
                    mark: Some(Mark::of(state)),
                });
                continue;
            };
            let row = client
                .query_one(
                    sql.as_str(),
                    &[&from, &ix.spec.cache, &(MAX_REPLAY_KEYS + 1)],
                )
                .await?;
            let pruned_below: u64 = row.get::<_, String>(0).parse().unwrap_or(u64::MAX);
            let clears: i64 = row.get(1);
            let keys: Vec<String> = row.get(2);
            let reason = if pruned_below > snapshot.xmin() {
                Some("pruned")
            } else if clears > 0 || keys.len() as i64 > MAX_REPLAY_KEYS {
                Some("replay")
            } else {
                None
            };
            let mark = Some(Mark::of(state));
            match reason {
                Some(reason) => ix.send(Msg::Rebuild { reason, mark }),
                None => {
                    tracing::info!(index = %ix.spec.name, keys = keys.len(), from = %from, "search index replaying changes it missed");
                    let ops = keys.into_iter().map(|key| Op::Refresh { key }).collect();
                    ix.send(Msg::Batch { ops, mark });
                }
            }
        }
        self.replay.lock().expect("not poisoned").clear();
        Ok(())
    }

    /// Commits what is pending and stops the writer threads.
    pub fn stop(&self) {
        for ix in &self.indexes {
            ix.send(Msg::Stop);
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("not poisoned"));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The applier's side: collects a batch's changes per index and sends them
/// when the batch is committed.
pub struct Feed {
    senders: Vec<SyncSender<Msg>>,
    pending: Vec<Vec<Op>>,
    routes: HashMap<String, Vec<usize>>,
}

impl Feed {
    /// Whether some index follows `cache`.
    pub fn wants(&self, cache: &str) -> bool {
        self.routes.contains_key(cache)
    }

    fn each(&mut self, cache: &str, mut f: impl FnMut(&mut Vec<Op>, bool)) {
        if let Some(ixs) = self.routes.get(cache) {
            let last = ixs.len() - 1;
            for (n, i) in ixs.iter().enumerate() {
                f(&mut self.pending[*i], n == last);
            }
        }
    }

    pub fn put(&mut self, cache: &str, key: &str, value: Vec<u8>) {
        let mut value = Some(value);
        self.each(cache, |ops, last| {
            let v = if last {
                value.take().unwrap_or_default()
            } else {
                value.clone().unwrap_or_default()
            };
            ops.push(Op::Upsert {
                key: key.to_string(),
                value: v,
            });
        });
    }

    pub fn delete(&mut self, cache: &str, key: &str) {
        self.each(cache, |ops, _| {
            ops.push(Op::Delete {
                key: key.to_string(),
            })
        });
    }

    /// A clear: the batch also carries every entry of the cache that stays,
    /// so what came before it in the batch is moot.
    pub fn clear(&mut self, cache: &str) {
        self.each(cache, |ops, _| {
            ops.clear();
            ops.push(Op::Clear);
        });
    }

    /// The batch is visible in the cache directory: send it.
    pub fn commit(&mut self, mark: Option<Mark>) {
        for (i, tx) in self.senders.iter().enumerate() {
            let ops = std::mem::take(&mut self.pending[i]);
            if ops.is_empty() && mark.is_none() {
                continue;
            }
            let _ = tx.send(Msg::Batch {
                ops,
                mark: mark.clone(),
            });
        }
    }

    /// The batch failed: forget it (it is read again).
    pub fn abort(&mut self) {
        for p in &mut self.pending {
            p.clear();
        }
    }

    /// The cache directory was rebuilt (cold boot): rebuild every index.
    pub fn rebuild_all(&mut self, reason: &'static str, mark: Mark) {
        self.abort();
        for tx in &self.senders {
            let _ = tx.send(Msg::Rebuild {
                reason,
                mark: Some(mark.clone()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::search::{FieldKind, FieldSpec, Tokenizer};

    fn spec() -> IndexSpec {
        IndexSpec {
            name: "docs".into(),
            cache: "docs".into(),
            fields: vec![FieldSpec {
                name: "title".into(),
                pointer: "/title".into(),
                kind: FieldKind::Text,
                stored: true,
                fast: false,
                facet: false,
                tokenizer: Tokenizer::Default,
            }],
        }
    }

    /// An index committed with `generation` in its payload, as `current`.
    fn committed(root: &Path, spec: &IndexSpec, generation: &str) {
        let dir = root.join("i-000001");
        std::fs::create_dir_all(&dir).unwrap();
        let index = Index::create_in_dir(&dir, doc::schema(spec)).unwrap();
        let mut writer: tantivy::IndexWriter =
            index.writer_with_num_threads(1, 15_000_000).unwrap();
        let payload = Payload {
            fingerprint: spec.fingerprint(),
            generation: generation.into(),
            position: Some("10:10:".into()),
        };
        let mut prepared = writer.prepare_commit().unwrap();
        prepared.set_payload(&serde_json::to_string(&payload).unwrap());
        prepared.commit().unwrap();
        std::os::unix::fs::symlink("i-000001", root.join("current")).unwrap();
    }

    #[test]
    fn the_payload_says_whether_an_index_is_current() {
        let spec = spec();
        let reason = |generation: &str| {
            let dir = tempfile::tempdir().unwrap();
            committed(dir.path(), &spec, generation);
            match open_current(dir.path(), &spec, "g-000002") {
                Opened::Ready { .. } => "ready",
                Opened::Stale { reason, .. } => reason,
            }
        };
        assert_eq!(reason("g-000002"), "ready");
        assert_eq!(reason("g-000001"), "cold_boot");
        // Committed while a rebuild it needed was under way: never trusted.
        assert_eq!(reason(REBUILDING), "interrupted");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            open_current(empty.path(), &spec, "g-000002"),
            Opened::Stale {
                reason: "missing",
                ..
            }
        ));
    }
}
