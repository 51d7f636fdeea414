//! The applier: a thread that owns the cache directory's writes, fed by a
//! bounded channel so that rows stream from the database to disk without
//! piling up in memory and file I/O never runs on the async workers.
//!
//! A batch is a sequence of [`Applier::apply`] calls followed by
//! [`Applier::commit`], which makes the batch's files durable and visible,
//! then hands the directory fsyncs and the position to the recorder
//! ([`super::record`]), which writes the position only once the directories
//! are durable. A failure inside a batch is remembered and reported by the
//! commit, which then records no position, so the batch is read again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::position::{LocalState, StateFile};
use super::record::Recorder;
use crate::cache::versions::VERSIONS_CACHE;
use crate::cache::{CacheDir, Generation};
use crate::events::{Hub, Pending};
use crate::search::{Feed, Mark};
use crate::uploads::UPLOADS_CACHE;
use crate::uploads::events::Event;

/// What a committed batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub puts: u64,
    pub deletes: u64,
    pub clears: u64,
    /// Entries in the cache directory after the batch.
    pub entries: u64,
}

/// A failure to apply, naming what failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ApplyError {
    pub what: String,
    #[source]
    pub source: io::Error,
    /// Changes already made visible may not be durable (a directory fsync
    /// failed): the local cache can no longer be trusted after a crash.
    pub lost_durability: bool,
}

type Job = Box<dyn FnOnce(&mut Local) + Send>;

/// One change to the current generation.
#[derive(Debug)]
pub enum Change {
    /// Write a value. `cleared` marks an entry of a cache cleared in this
    /// batch: one of the keys that stay.
    Put {
        cache: String,
        key: String,
        value: Vec<u8>,
        content_type: String,
        cleared: bool,
    },
    /// Remove a key.
    Delete { cache: String, key: String },
    /// Clear a cache: at commit, every key of it not put with `cleared` in
    /// this batch is removed.
    Clear { cache: String },
}

impl Change {
    /// Bytes it carries (to size chunks).
    pub fn weight(&self) -> usize {
        match self {
            Change::Put { value, key, .. } => value.len() + key.len(),
            Change::Delete { key, .. } => key.len(),
            Change::Clear { .. } => 0,
        }
    }
}

fn apply_one(l: &mut Local, change: Change) {
    match change {
        Change::Put {
            cache,
            key,
            value,
            content_type,
            cleared,
        } => {
            if cleared {
                l.keep.entry(cache.clone()).or_default().insert(key.clone());
            }
            match l.current.put(&cache, &key, &value, &content_type) {
                Ok(()) => {
                    l.applied.puts += 1;
                    l.events
                        .extend(Pending::for_key(&cache, &key, Some(&value)));
                    if cache == VERSIONS_CACHE {
                        l.dir.versions().set(&key, &value);
                    } else if cache == UPLOADS_CACHE {
                        l.dir.upload_events().push(Event::Registered(key.clone()));
                    }
                    if l.feed.wants(&cache) {
                        l.feed.put(&cache, &key, value);
                    }
                }
                Err(e) => l.fail(|| format!("cannot write {cache}/{key}"), e),
            }
        }
        Change::Delete { cache, key } => match l.current.delete(&cache, &key) {
            Ok(()) => {
                l.applied.deletes += 1;
                l.events.extend(Pending::for_key(&cache, &key, None));
                if cache == VERSIONS_CACHE {
                    l.dir.versions().remove(&key);
                } else if cache == UPLOADS_CACHE {
                    l.dir.upload_events().push(Event::Withdrawn(key.clone()));
                }
                l.feed.delete(&cache, &key);
            }
            Err(e) => l.fail(|| format!("cannot delete {cache}/{key}"), e),
        },
        Change::Clear { cache } => {
            l.events.extend(Pending::cleared(&cache));
            l.feed.clear(&cache);
            l.keep.entry(cache).or_default();
            l.applied.clears += 1;
        }
    }
}

/// The thread's state.
struct Local {
    dir: CacheDir,
    current: Generation,
    /// A generation being built by a cold boot.
    building: Option<Generation>,
    /// Caches being cleared in this batch, with the keys that stay.
    keep: HashMap<String, HashSet<String>>,
    recorder: Recorder,
    applied: Applied,
    failed: Option<ApplyError>,
    entries: u64,
    /// The search indexes' share of each batch.
    feed: Feed,
    /// The event stream, and this batch's events (published at commit).
    hub: Arc<Hub>,
    events: Vec<Pending>,
}

impl Local {
    fn fail(&mut self, what: impl FnOnce() -> String, e: io::Error) {
        if self.failed.is_none() {
            self.failed = Some(ApplyError {
                what: what(),
                source: e,
                lost_durability: false,
            });
        }
    }

    fn take_result(&mut self) -> Result<Applied, ApplyError> {
        self.keep.clear();
        match self.failed.take() {
            Some(e) => {
                self.applied = Applied::default();
                Err(e)
            }
            None => Ok(std::mem::take(&mut self.applied)),
        }
    }
}

/// Handle to the applier thread.
#[derive(Clone)]
pub struct Applier {
    jobs: mpsc::Sender<Job>,
}

impl Applier {
    /// Starts the thread, owning the cache directory's current generation.
    /// Committed batches are also handed to the search indexes (`feed`).
    pub fn start(
        dir: CacheDir,
        current: Generation,
        state_file: StateFile,
        feed: Feed,
        hub: Arc<Hub>,
    ) -> Self {
        let (jobs, mut rx) = mpsc::channel::<Job>(256);
        let mut local = Local {
            dir,
            current,
            building: None,
            keep: HashMap::new(),
            recorder: Recorder::start(state_file),
            applied: Applied::default(),
            failed: None,
            entries: 0,
            feed,
            hub,
            events: Vec::new(),
        };
        std::thread::Builder::new()
            .name("tandem-applier".into())
            .spawn(move || {
                local.entries = local.current.count().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot count the cache entries");
                    0
                });
                while let Some(job) = rx.blocking_recv() {
                    job(&mut local);
                }
            })
            .expect("can spawn the applier thread");
        Self { jobs }
    }

    async fn send(&self, job: Job) {
        // The thread only stops when every handle is gone.
        let _ = self.jobs.send(job).await;
    }

    async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Local) -> T + Send + 'static) -> T {
        let (tx, rx) = oneshot::channel();
        self.send(Box::new(move |local| {
            let _ = tx.send(f(local));
        }))
        .await;
        rx.await
            .expect("the applier thread runs while handles exist")
    }

    /// The current generation's name.
    pub async fn generation(&self) -> String {
        self.call(|l| l.current.name().to_string()).await
    }

    /// The number of entries in the current generation.
    pub async fn entries(&self) -> u64 {
        self.call(|l| l.entries).await
    }

    /// Applies changes (part of the current batch). Changes travel to the
    /// thread in chunks: one hand-over per row would cost more than the row.
    pub async fn apply(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        self.send(Box::new(move |l| {
            for change in changes {
                if l.failed.is_some() {
                    return;
                }
                apply_one(l, change);
            }
        }))
        .await;
    }

    /// Makes the batch durable, then writes `state` (if any; fsynced too
    /// when `durable`). On failure no state is written.
    pub async fn commit(
        &self,
        state: Option<LocalState>,
        durable: bool,
    ) -> Result<Applied, ApplyError> {
        self.commit_later(state, durable)
            .await
            .await
            .expect("the applier thread answers while handles exist")
    }

    /// Makes `state` the durable position now, after everything queued
    /// (at shutdown).
    pub async fn persist_now(&self, state: LocalState) -> Result<(), ApplyError> {
        self.call(move |l| {
            l.recorder
                .submit_and_wait(BTreeSet::new(), Some(state), true);
            l.recorder.take_error().map_or(Ok(()), Err)
        })
        .await
    }

    /// Queues [`Self::commit`] and returns where its result will arrive,
    /// so that the next batch can be read meanwhile.
    pub async fn commit_later(
        &self,
        state: Option<LocalState>,
        durable: bool,
    ) -> oneshot::Receiver<Result<Applied, ApplyError>> {
        let (tx, rx) = oneshot::channel();
        self.send(Box::new(move |l| {
            let _ = tx.send(commit_now(l, state, durable));
        }))
        .await;
        rx
    }

    /// Abandons the current batch after a failed read: staged writes are
    /// dropped and clears are *not* applied (their list of keys to keep may
    /// be incomplete). Changes already renamed into place were read from a
    /// committed state, so they stay; the batch is read again later.
    pub async fn abort(&self) {
        self.call(|l| {
            l.keep.clear();
            l.failed = None;
            l.applied = Applied::default();
            l.events.clear();
            l.feed.abort();
            l.current.discard_staged();
            let delta = l.current.take_entry_delta();
            l.entries = l.entries.saturating_add_signed(delta);
            let dirs = l.current.take_dirty_dirs();
            l.recorder.submit(dirs, None, false);
        })
        .await;
    }

    /// Starts building a fresh generation (cold boot). Returns its name.
    pub async fn begin_build(&self) -> Result<String, ApplyError> {
        self.call(|l| {
            if let Some(old) = l.building.take() {
                let _ = std::fs::remove_dir_all(old.root());
            }
            match l.dir.new_generation() {
                Ok(g) => {
                    let name = g.name().to_string();
                    l.building = Some(g);
                    l.failed = None;
                    Ok(name)
                }
                Err(e) => Err(ApplyError {
                    what: "cannot create a new cache generation".into(),
                    source: e,
                    lost_durability: false,
                }),
            }
        })
        .await
    }

    /// Writes a value into the generation being built.
    pub async fn build_put(
        &self,
        cache: String,
        key: String,
        value: Vec<u8>,
        content_type: String,
    ) {
        self.send(Box::new(move |l| {
            if l.failed.is_some() {
                return;
            }
            let Some(g) = l.building.as_mut() else { return };
            if let Err(e) = g.put_direct(&cache, &key, &value, &content_type) {
                l.fail(
                    || format!("cannot write {cache}/{key} into the new generation"),
                    e,
                );
            }
        }))
        .await;
    }

    /// Flushes the built generation, swaps it in, writes `state`, and
    /// removes the old one. Returns the number of entries.
    pub async fn finish_build(&self, state: LocalState) -> Result<u64, ApplyError> {
        self.call(move |l| {
            let Some(mut g) = l.building.take() else {
                return Err(ApplyError {
                    what: "no generation is being built".into(),
                    source: io::Error::other("finish_build without begin_build"),
                    lost_durability: false,
                });
            };
            if let Some(e) = l.failed.take() {
                let _ = std::fs::remove_dir_all(g.root());
                return Err(e);
            }
            let entries = g.take_entry_delta().max(0) as u64;
            let failed = |what: &str, source: io::Error, g: &Generation| {
                let _ = std::fs::remove_dir_all(g.root());
                ApplyError {
                    what: what.to_string(),
                    source,
                    lost_durability: false,
                }
            };
            if let Err(e) = g.sync_all() {
                return Err(failed("cannot sync the new generation", e, &g));
            }
            // Nothing queued for the old generation may land after the swap.
            l.recorder.submit_and_wait(BTreeSet::new(), None, false);
            if let Err(e) = l.dir.publish(&g) {
                return Err(failed("cannot swap the cache directory", e, &g));
            }
            // Readers see the new generation from here on: so must the
            // applier, whatever happens next.
            let old = std::mem::replace(&mut l.current, g);
            l.entries = entries;
            l.dir.sync_link_parent();
            l.dir.versions().reload(l.current.root());
            l.feed.rebuild_all("cold_boot", Mark::of(&state));
            l.events.clear();
            l.hub.resync_all("cold_boot");
            l.recorder
                .submit_and_wait(BTreeSet::new(), Some(state), true);
            l.dir.remove_others(l.current.name());
            drop(old);
            if let Some(e) = l.recorder.take_error() {
                return Err(e);
            }
            Ok(entries)
        })
        .await
    }

    /// Drops a half-built generation.
    pub async fn abandon_build(&self) {
        self.call(|l| {
            l.failed = None;
            if let Some(g) = l.building.take() {
                let _ = std::fs::remove_dir_all(g.root());
            }
        })
        .await;
    }
}

fn commit_now(
    l: &mut Local,
    state: Option<LocalState>,
    durable: bool,
) -> Result<Applied, ApplyError> {
    if let Some(e) = l.recorder.take_error() {
        // The recorder failed on an earlier batch: report it here.
        l.failed.get_or_insert(e);
    }
    if l.failed.is_none() {
        let keep = std::mem::take(&mut l.keep);
        for (cache, keys) in keep {
            if let Err(e) = l.current.retain(&cache, &keys) {
                l.fail(|| format!("cannot clear {cache}"), e);
                break;
            }
        }
    }
    if l.failed.is_none()
        && let Err(e) = l.current.publish()
    {
        l.fail(|| "cannot write the cache directory".to_string(), e);
    }
    let events = std::mem::take(&mut l.events);
    if l.failed.is_some() {
        l.current.discard_staged();
        l.feed.abort();
    } else {
        // The batch's files are visible: the indexes and the event stream
        // may have it.
        l.feed.commit(state.as_ref().map(Mark::of));
        let position = state.as_ref().map(|s| s.position.done.to_string());
        l.hub.publish(events, position.as_deref());
    }
    let dirs = l.current.take_dirty_dirs();
    let state = if l.failed.is_none() { state } else { None };
    // Durable or not, the recorder does it behind the applier.
    l.recorder.submit(dirs, state, durable);
    let delta = l.current.take_entry_delta();
    l.entries = l.entries.saturating_add_signed(delta);
    l.applied.entries = l.entries;
    l.take_result()
}
