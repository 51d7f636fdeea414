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
//!
//! A large batch's `syncfs` runs on a helper thread while the next batch's
//! puts are staged (invisibly); everything else waits for that commit to
//! complete first ([`Local::settle`]), so batches land in order.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::position::{LocalState, StateFile};
use super::record::Recorder;
use crate::cache::generation::Flushing;
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

/// What the thread is sent: a chunk of changes, or anything else (which
/// first waits for a commit still in flight: see [`Local::settle`]).
enum Job {
    /// The changes, and their share of the queue's byte budget (given back
    /// when the job is done with).
    Apply(Vec<Change>, Option<OwnedSemaphorePermit>),
    Call(Box<dyn FnOnce(&mut Local) + Send>),
    /// Wakes the thread when the flush in flight is done.
    Flushed,
}

/// The bytes of keys and values queued for the thread at most (in KiB): the
/// queue holds at most 256 jobs, but one job may carry a value of
/// `api.max_value_size`, so without this 256 of them could wait in memory
/// while the thread is held up by a slow disk.
const QUEUED_KIB: u32 = 64 << 10;

/// A job's weight against [`QUEUED_KIB`]: at least 1, at most all of it (a
/// single larger job still passes, alone).
fn weight(bytes: usize) -> u32 {
    (bytes.div_ceil(1024) as u64).clamp(1, QUEUED_KIB as u64) as u32
}

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

/// Whether applying `change` only stages a file, changing nothing readers
/// see, so it may go ahead while the previous batch's commit is in flight.
fn stages_only(l: &Local, change: &Change) -> bool {
    match change {
        Change::Put { cache, value, .. } => {
            cache != VERSIONS_CACHE
                && cache != UPLOADS_CACHE
                && !l.feed.wants(cache)
                && !l.current.flush_due(value.len())
        }
        Change::Delete { .. } | Change::Clear { .. } => false,
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
    /// A committed batch whose files are being flushed while the next batch
    /// is staged.
    in_flight: Option<InFlight>,
    /// The thread's own queue, for [`Job::Flushed`] (weak: the thread still
    /// ends when every [`Applier`] handle is gone).
    jobs: mpsc::WeakSender<Job>,
}

/// What a batch did, taken out of [`Local`] at its commit.
struct Batch {
    applied: Applied,
    failed: Option<ApplyError>,
    events: Vec<Pending>,
}

/// A commit waiting for its flush (see [`Generation::begin_flush`]).
struct InFlight {
    flushing: Flushing,
    batch: Batch,
    state: Option<LocalState>,
    durable: bool,
    reply: oneshot::Sender<Result<Applied, ApplyError>>,
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

    fn take_batch(&mut self) -> Batch {
        self.keep.clear();
        Batch {
            applied: std::mem::take(&mut self.applied),
            failed: self.failed.take(),
            events: std::mem::take(&mut self.events),
        }
    }

    /// Completes the commit in flight, if any: waits for its flush, puts
    /// its files in place, and answers it. When it fails, so does the batch
    /// being staged (its position would cover the failed one's rows).
    fn settle(&mut self) {
        let Some(f) = self.in_flight.take() else {
            return;
        };
        let mut batch = f.batch;
        if let Err(e) = self.current.finish_flush(f.flushing) {
            batch.failed = Some(ApplyError {
                what: "cannot write the cache directory".into(),
                source: e,
                lost_durability: false,
            });
        }
        let result = finish_commit(self, batch, f.state, f.durable);
        if result.is_err() {
            self.fail(
                || "the previous batch failed".into(),
                io::Error::other("its commit failed; this batch is read again"),
            );
        }
        let _ = f.reply.send(result);
    }

    fn run(&mut self, job: Job) {
        match job {
            Job::Apply(changes, _budget) => {
                for change in changes {
                    if self.failed.is_some() {
                        return;
                    }
                    if self.in_flight.is_some() && !stages_only(self, &change) {
                        self.settle();
                        if self.failed.is_some() {
                            // The batch in flight failed, so does this one:
                            // nothing more of it may land.
                            return;
                        }
                    }
                    apply_one(self, change);
                }
            }
            Job::Call(f) => {
                self.settle();
                f(self);
            }
            // Only a wake-up: see the thread's loop.
            Job::Flushed => {}
        }
    }
}

/// Handle to the applier thread.
#[derive(Clone)]
pub struct Applier {
    jobs: mpsc::Sender<Job>,
    /// The bytes queued for the thread ([`QUEUED_KIB`]).
    budget: Arc<Semaphore>,
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
        let own_jobs = jobs.downgrade();
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
            in_flight: None,
            jobs: own_jobs,
        };
        std::thread::Builder::new()
            .name("tandem-applier".into())
            .spawn(move || {
                local.entries = local.current.count().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot count the cache entries");
                    0
                });
                while let Some(job) = rx.blocking_recv() {
                    local.run(job);
                    // A flush in flight is completed as soon as its files
                    // are durable, between the next batch's chunks. Its
                    // wake-up may have been dropped for a full queue: then
                    // jobs were queued after it was done, so this sees it.
                    if local
                        .in_flight
                        .as_ref()
                        .is_some_and(|f| f.flushing.synced())
                    {
                        local.settle();
                    }
                }
                local.settle();
            })
            .expect("can spawn the applier thread");
        Self {
            jobs,
            budget: Arc::new(Semaphore::new(QUEUED_KIB as usize)),
        }
    }

    /// Waits until `bytes` more fit in the queue's byte budget.
    async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        self.budget
            .clone()
            .acquire_many_owned(weight(bytes))
            .await
            .ok()
    }

    async fn send(&self, job: Job) {
        // The thread only stops when every handle is gone.
        let _ = self.jobs.send(job).await;
    }

    async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Local) -> T + Send + 'static) -> T {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Call(Box::new(move |local| {
            let _ = tx.send(f(local));
        })))
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
        let bytes = changes.iter().map(Change::weight).sum();
        let budget = self.reserve(bytes).await;
        self.send(Job::Apply(changes, budget)).await;
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
        self.send(Job::Call(Box::new(move |l| {
            commit_now(l, state, durable, tx);
        })))
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
        let budget = self.reserve(key.len() + value.len()).await;
        self.send(Job::Call(Box::new(move |l| {
            let _budget = budget;
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
        })))
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

/// Commits the batch: clears, then the stage made durable and visible,
/// then the position handed to the recorder; answers on `reply`. A large
/// stage's flush is left in flight (see [`Local::settle`]).
fn commit_now(
    l: &mut Local,
    state: Option<LocalState>,
    durable: bool,
    reply: oneshot::Sender<Result<Applied, ApplyError>>,
) {
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
    if l.failed.is_none() {
        let jobs = l.jobs.clone();
        // Sent from the flushing thread. Never waits: the thread may be
        // waiting for that thread (`settle`) while the queue is full.
        let wake = move || {
            if let Some(jobs) = jobs.upgrade() {
                let _ = jobs.try_send(Job::Flushed);
            }
        };
        match l.current.begin_flush(wake) {
            Ok(Some(flushing)) => {
                l.in_flight = Some(InFlight {
                    flushing,
                    batch: l.take_batch(),
                    state,
                    durable,
                    reply,
                });
                return;
            }
            Ok(None) => {}
            Err(e) => l.fail(|| "cannot write the cache directory".to_string(), e),
        }
    }
    let batch = l.take_batch();
    let _ = reply.send(finish_commit(l, batch, state, durable));
}

/// The rest of a commit once its files are visible (or it failed): the
/// indexes and the event stream, then the recorder.
fn finish_commit(
    l: &mut Local,
    batch: Batch,
    state: Option<LocalState>,
    durable: bool,
) -> Result<Applied, ApplyError> {
    if batch.failed.is_some() {
        l.current.discard_staged();
        l.feed.abort();
    } else {
        // The batch's files are visible: the indexes and the event stream
        // may have it.
        l.feed.commit(state.as_ref().map(Mark::of));
        let position = state.as_ref().map(|s| s.position.done.to_string());
        l.hub.publish(batch.events, position.as_deref());
    }
    let dirs = l.current.take_dirty_dirs();
    let state = if batch.failed.is_none() { state } else { None };
    // Durable or not, the recorder does it behind the applier.
    l.recorder.submit(dirs, state, durable);
    let delta = l.current.take_entry_delta();
    l.entries = l.entries.saturating_add_signed(delta);
    match batch.failed {
        Some(e) => Err(e),
        None => Ok(Applied {
            entries: l.entries,
            ..batch.applied
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::search::Search;

    fn start(dir: &std::path::Path) -> (Applier, CacheDir) {
        let env = [("TANDEM_DATA_DIR".to_string(), dir.display().to_string())].into();
        let config = crate::config::from_str("", &env).unwrap().config;
        let metrics = Arc::new(Metrics::new("test"));
        let (cache, generation) = CacheDir::open(&config.cache_dir, dir, 0).unwrap();
        let (_search, feed) = Search::start(
            config.search.clone(),
            dir,
            cache.clone(),
            generation.name(),
            None,
            metrics.clone(),
        );
        let hub = Arc::new(Hub::new(16, 16, metrics.events.clone()));
        let applier = Applier::start(cache.clone(), generation, StateFile::new(dir), feed, hub);
        (applier, cache)
    }

    fn puts(range: std::ops::Range<u32>, value: &str) -> Vec<Change> {
        puts_in("c", range, value)
    }

    fn puts_in(cache: &str, range: std::ops::Range<u32>, value: &str) -> Vec<Change> {
        range
            .map(|i| Change::Put {
                cache: cache.into(),
                key: format!("k{i}"),
                value: value.as_bytes().to_vec(),
                content_type: "text/plain".into(),
                cleared: false,
            })
            .collect()
    }

    fn value(cache: &CacheDir, key: &str) -> Option<String> {
        cache
            .read("c", key)
            .unwrap()
            .map(|(v, _)| String::from_utf8(v).unwrap())
    }

    /// More bytes than the queue's budget go through (the sender waits for
    /// the thread), and one value larger than all of it passes alone.
    #[tokio::test]
    async fn the_queue_is_bounded_by_bytes_not_only_jobs() {
        assert_eq!(weight(0), 1);
        assert_eq!(weight(1025), 2);
        assert_eq!(weight(usize::MAX), QUEUED_KIB);
        let dir = tempfile::tempdir().unwrap();
        let (applier, cache) = start(dir.path());
        let mib = "x".repeat(1 << 20);
        for i in 0..80u32 {
            applier.apply(puts(i..i + 1, &mib)).await;
        }
        let big = "y".repeat((QUEUED_KIB as usize + 1) << 10);
        applier.apply(puts(80..81, &big)).await;
        let done = applier.commit(None, false).await.unwrap();
        assert_eq!(done.puts, 81);
        assert_eq!(value(&cache, "k3").map(|v| v.len()), Some(1 << 20));
        assert_eq!(value(&cache, "k80").map(|v| v.len()), Some(big.len()));
        assert_eq!(applier.budget.available_permits(), QUEUED_KIB as usize);
    }

    /// A large batch's flush stays in flight while the next batch arrives;
    /// the second batch's changes still land after the first's, and each
    /// commit is answered, whether or not anything follows it.
    #[tokio::test]
    async fn batches_keep_their_order_across_a_flush_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (applier, cache) = start(dir.path());
        applier.apply(puts(0..300, "a")).await;
        let first = applier.commit_later(None, false).await;
        applier.apply(puts(0..300, "b")).await;
        applier
            .apply(vec![Change::Delete {
                cache: "c".into(),
                key: "k5".into(),
            }])
            .await;
        applier.apply(puts(6..7, "c")).await;
        let second = applier.commit_later(None, false).await;
        let first = first.await.unwrap().unwrap();
        assert_eq!((first.puts, first.entries), (300, 300));
        let second = second.await.unwrap().unwrap();
        assert_eq!((second.puts, second.deletes), (301, 1));
        assert_eq!(second.entries, 299);
        assert_eq!(value(&cache, "k0").as_deref(), Some("b"));
        assert_eq!(value(&cache, "k5"), None);
        assert_eq!(value(&cache, "k6").as_deref(), Some("c"));
        assert_eq!(value(&cache, "k299").as_deref(), Some("b"));

        // A commit with nothing after it is answered too.
        applier.apply(puts(300..600, "d")).await;
        let third = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            applier.commit(None, false),
        )
        .await
        .expect("a lone commit is answered")
        .unwrap();
        assert_eq!(third.entries, 599);
        assert_eq!(applier.entries().await, 599);
        assert_eq!(value(&cache, "k599").as_deref(), Some("d"));
    }

    /// An abort after a commit in flight keeps the committed batch and
    /// drops the one staged behind it.
    #[tokio::test]
    async fn an_abort_after_a_flush_in_flight_keeps_the_committed_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (applier, cache) = start(dir.path());
        applier.apply(puts(0..300, "a")).await;
        let first = applier.commit_later(None, false).await;
        applier.apply(puts(0..300, "b")).await;
        applier.abort().await;
        assert_eq!(first.await.unwrap().unwrap().puts, 300);
        assert_eq!(value(&cache, "k0").as_deref(), Some("a"));
        assert_eq!(value(&cache, "k299").as_deref(), Some("a"));
        assert_eq!(applier.entries().await, 300);
    }

    /// A batch whose files cannot be put in place fails, and so does the
    /// batch staged behind it (its position would cover the failed rows),
    /// even though its own files could be.
    #[tokio::test]
    async fn a_failed_commit_fails_the_batch_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let (applier, cache) = start(dir.path());
        applier.apply(puts(0..1, "seed")).await;
        applier.commit(None, false).await.unwrap();
        applier.apply(puts(0..300, "a")).await;
        // Staged (the thread takes jobs in order) before the directory goes.
        applier.entries().await;
        // The cache's directory becomes a file: no link into it can work.
        let c = cache.path_of("c", "k0").parent().unwrap().to_path_buf();
        let c = std::fs::canonicalize(c).unwrap();
        std::fs::rename(&c, c.with_file_name("moved")).unwrap();
        std::fs::write(&c, b"not a directory").unwrap();
        let first = applier.commit_later(None, false).await;
        applier.apply(puts_in("d", 0..300, "b")).await;
        let second = applier.commit_later(None, false).await;
        assert!(first.await.unwrap().is_err(), "the broken batch fails");
        assert!(second.await.unwrap().is_err(), "so does the one behind it");
        assert_eq!(cache.read("d", "k0").unwrap(), None, "nothing of it landed");
        // The page is read again after an abort: the next batch works.
        applier.abort().await;
        std::fs::remove_file(&c).unwrap();
        applier.apply(puts(0..300, "c")).await;
        assert_eq!(applier.commit(None, false).await.unwrap().puts, 300);
        assert_eq!(value(&cache, "k1").as_deref(), Some("c"));
    }
}
