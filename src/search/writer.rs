//! One thread per index owns its `IndexWriter`s: the live index's, and,
//! during a rebuild, the new index's. Changes apply to both; between
//! messages the rebuild reads a chunk of the cache directory into the new
//! index, so a rebuild never holds up the applier. When the whole directory
//! is read, the new index is committed and swapped in.
//!
//! Why reading files is safe alongside the changes: a change reaches the
//! writer only after its file is visible, so whatever state of a file a
//! rebuild or replay reads is at least as new as every change the writer has
//! already handled, and every later state of that file has its own change
//! still to come.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tantivy::query::AllQuery;
use tantivy::store::Compressor;
use tantivy::{Index, IndexSettings, IndexWriter, TantivyDocument, Term};

use super::doc::{Fields, schema};
use super::{Live, Mark, Msg, Op, Payload, SearchIndex};
use crate::cache::CacheDir;
use crate::config::search::SearchConfig;
use crate::metrics::Metrics;

/// Keys read from the cache directory between two looks at the channel.
const BUILD_CHUNK: usize = 256;

/// Bytes per block of stored documents (tantivy's default: 16 KiB).
const DOCSTORE_BLOCK_BYTES: usize = 4096;

/// An index open for writing.
struct Target {
    index: Index,
    writer: IndexWriter,
    fields: Fields,
    dir: String,
}

struct Build {
    target: Target,
    keys: std::vec::IntoIter<String>,
    reason: &'static str,
    started: Instant,
}

pub struct Writer {
    ix: Arc<SearchIndex>,
    root: PathBuf,
    cache: CacheDir,
    metrics: Arc<Metrics>,
    commit_interval: Duration,
    memory: usize,
    live: Option<Target>,
    build: Option<Build>,
    /// The position of the last batch handled.
    mark: Option<Mark>,
    /// A rebuild other than a requested one is due or under way: the live
    /// index no longer matches the cache directory, and its commits say so
    /// ([`REBUILDING`]), so that a restart before the rebuild ends starts it
    /// again instead of trusting the live index.
    stale_live: bool,
    /// A rebuild that could not start, and when to try it again.
    retry_build: Option<(&'static str, Instant)>,
    /// Changes handled but not yet committed to the live index.
    dirty: bool,
    unsearchable_since: Option<Instant>,
    /// When each uncommitted batch was applied to the cache directory.
    applied: Vec<Instant>,
    last_commit: Instant,
}

impl Writer {
    pub fn new(
        ix: Arc<SearchIndex>,
        root: PathBuf,
        cache: CacheDir,
        metrics: Arc<Metrics>,
        config: &SearchConfig,
        mark: Option<Mark>,
    ) -> Self {
        Self {
            ix,
            root,
            cache,
            metrics,
            commit_interval: config.commit_interval,
            memory: config.writer_memory as usize,
            live: None,
            build: None,
            mark,
            stale_live: false,
            retry_build: None,
            dirty: false,
            unsearchable_since: None,
            applied: Vec::new(),
            // The first change after start commits at once.
            last_commit: Instant::now()
                .checked_sub(config.commit_interval)
                .unwrap_or_else(Instant::now),
        }
    }

    /// Starts the thread: writing to `writable` (the live index, when it is
    /// usable as it is), rebuilding first when `rebuild` says why.
    pub fn spawn(
        mut self,
        rx: Receiver<Msg>,
        writable: Option<Index>,
        rebuild: Option<&'static str>,
    ) -> std::thread::JoinHandle<()> {
        let name = format!("tandem-index-{}", self.ix.spec.name);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Some(index) = writable {
                    match self.open_target(index) {
                        Ok((target, live)) => {
                            self.ix
                                .update(|s| s.documents = live.reader.searcher().num_docs());
                            self.ix.set_live(Arc::new(live));
                            self.live = Some(target);
                            // A rebuild cut short by a crash left its directory.
                            self.remove_other_dirs();
                        }
                        Err(e) => {
                            tracing::warn!(index = %self.ix.spec.name, error = %e, "cannot open the search index for writing; rebuilding it");
                            self.start_build("corrupt");
                        }
                    }
                }
                if let Some(reason) = rebuild {
                    self.start_build(reason);
                }
                self.run(rx);
            })
            .expect("can spawn an index writer thread")
    }

    fn name(&self) -> &str {
        &self.ix.spec.name
    }

    fn open_target(&self, index: Index) -> tantivy::Result<(Target, Live)> {
        let writer = index.writer_with_num_threads(1, self.memory)?;
        let fields = Fields::new(&self.ix.spec, &index.schema());
        let live = Live::open(index.clone())?;
        let dir = std::fs::read_link(self.root.join("current"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        Ok((
            Target {
                index,
                writer,
                fields,
                dir,
            },
            live,
        ))
    }

    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let timeout = if self.build.is_some() {
                Duration::ZERO
            } else if self.dirty {
                self.commit_interval
                    .saturating_sub(self.last_commit.elapsed())
            } else {
                Duration::from_secs(1)
            };
            match rx.recv_timeout(timeout) {
                Ok(Msg::Stop) => break,
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.dirty && self.last_commit.elapsed() >= self.commit_interval {
                self.commit_live();
            }
            if self.build.is_some() {
                self.build_step();
            } else if let Some((reason, at)) = self.retry_build
                && Instant::now() >= at
            {
                self.start_build(reason);
            }
            let lag = self
                .unsearchable_since
                .map_or(0.0, |t| t.elapsed().as_secs_f64());
            self.metrics
                .search
                .lag
                .with_label_values(&[self.name()])
                .set(lag);
        }
        if self.dirty {
            self.commit_live();
        }
        if let Some(b) = self.build.take() {
            drop(b.target.writer);
            let _ = std::fs::remove_dir_all(self.root.join(&b.target.dir));
        }
        if let Some(t) = self.live.take() {
            let _ = t.writer.wait_merging_threads();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Batch { ops, mark } => {
                let has_ops = !ops.is_empty();
                for op in ops {
                    self.apply(op);
                }
                if let Some(m) = mark {
                    if has_ops {
                        self.applied.push(m.applied_at);
                        self.unsearchable_since.get_or_insert(m.applied_at);
                    }
                    self.mark = Some(m);
                }
            }
            Msg::Rebuild { reason, mark } => {
                if let Some(m) = mark {
                    self.mark = Some(m);
                }
                if reason == "requested" {
                    self.ix
                        .requested
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                }
                self.start_build(reason);
            }
            Msg::Stop => {}
        }
    }

    fn targets(&mut self) -> impl Iterator<Item = &mut Target> {
        self.live
            .iter_mut()
            .chain(self.build.iter_mut().map(|b| &mut b.target))
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Upsert { key, value } => self.upsert(&key, Some(&value)),
            Op::Delete { key } => self.upsert(&key, None),
            Op::Clear => {
                for t in self.targets() {
                    let _ = t.writer.delete_query(Box::new(AllQuery));
                }
                self.dirty = true;
            }
            Op::Refresh { key } => match self.cache.read(&self.ix.spec.cache, &key) {
                Ok(v) => self.upsert(&key, v.as_ref().map(|(v, _)| v.as_slice())),
                Err(e) => {
                    tracing::warn!(index = %self.name(), key = %key, error = %e, "cannot read a cached value to index it");
                }
            },
        }
    }

    /// Replaces (or, with `None`, removes) the document of `key`.
    fn upsert(&mut self, key: &str, value: Option<&[u8]>) {
        self.dirty = true;
        let doc = value.and_then(|v| self.convert(key, v));
        let name = self.ix.spec.name.clone();
        for t in self.targets() {
            t.writer
                .delete_term(Term::from_field_text(t.fields.key, key));
            if let Some(d) = &doc
                && let Err(e) = t.writer.add_document(d.clone())
            {
                tracing::error!(index = %name, key = %key, error = %e, "cannot index a document");
            }
        }
    }

    fn convert(&self, key: &str, value: &[u8]) -> Option<TantivyDocument> {
        let fields = match (&self.live, &self.build) {
            (_, Some(b)) => &b.target.fields,
            (Some(l), None) => &l.fields,
            (None, None) => return None,
        };
        let m = &self.metrics.search.skipped;
        match fields.convert(key, value) {
            Ok(c) => {
                if !c.bad_fields.is_empty() {
                    m.with_label_values(&[self.name(), "bad_field"]).inc();
                    tracing::warn!(index = %self.name(), key = %key, fields = ?c.bad_fields, "fields left out of the search index: their values have the wrong type");
                }
                Some(c.doc)
            }
            Err(e) => {
                m.with_label_values(&[self.name(), "not_json"]).inc();
                tracing::warn!(index = %self.name(), key = %key, error = %e.0, "value not indexed: it is not JSON");
                None
            }
        }
    }

    /// The commit payload naming what the index holds: the last batch's
    /// mark, or (`stale`) a generation that matches none.
    fn payload(&self, stale: bool) -> String {
        let p = Payload {
            fingerprint: self.ix.spec.fingerprint(),
            generation: match &self.mark {
                _ if stale => super::REBUILDING.to_string(),
                Some(m) => m.generation.clone(),
                None => String::new(),
            },
            position: self.mark.as_ref().map(|m| m.position.clone()),
        };
        serde_json::to_string(&p).expect("payload serialises")
    }

    fn commit_live(&mut self) {
        let payload = self.payload(self.stale_live);
        let Some(t) = self.live.as_mut() else {
            // Nothing to commit until the rebuild is swapped in.
            return;
        };
        let result = (|| -> tantivy::Result<()> {
            let mut prepared = t.writer.prepare_commit()?;
            prepared.set_payload(&payload);
            prepared.commit()?;
            Ok(())
        })();
        self.last_commit = Instant::now();
        if let Err(e) = result {
            tracing::error!(index = %self.name(), error = %e, "cannot commit the search index");
            self.ix.update(|s| s.last_error = Some(e.to_string()));
            return;
        }
        self.dirty = false;
        if let Some(live) = self.ix.live()
            && let Err(e) = live.reader.reload()
        {
            tracing::error!(index = %self.name(), error = %e, "cannot reload the search index");
        }
        self.committed();
    }

    /// Bookkeeping after a commit made changes searchable.
    fn committed(&mut self) {
        let now = Instant::now();
        let m = &self.metrics.search;
        let name = self.ix.spec.name.as_str();
        let hist = m.apply_to_searchable.with_label_values(&[name]);
        for at in self.applied.drain(..) {
            hist.observe(now.duration_since(at).as_secs_f64());
        }
        self.unsearchable_since = None;
        m.commits.with_label_values(&[name]).inc();
        let docs = self.ix.live().map_or(0, |l| l.reader.searcher().num_docs());
        m.documents.with_label_values(&[name]).set(docs as i64);
        let mark = self.mark.clone();
        self.ix.update(|s| {
            s.documents = docs;
            s.position = mark.as_ref().map(|m| m.position.clone());
            s.generation = mark.as_ref().map(|m| m.generation.clone());
            s.last_commit = Some(chrono::Utc::now().to_rfc3339());
            s.last_error = None;
        });
    }

    fn new_dir(&self) -> std::io::Result<(String, PathBuf)> {
        std::fs::create_dir_all(&self.root)?;
        let mut highest = 0u64;
        for e in std::fs::read_dir(&self.root)? {
            let name = e?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("i-"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                highest = highest.max(n);
            }
        }
        let name = format!("i-{:06}", highest + 1);
        let path = self.root.join(&name);
        std::fs::create_dir(&path)?;
        Ok((name, path))
    }

    fn start_build(&mut self, reason: &'static str) {
        self.retry_build = None;
        if reason != "requested" {
            self.stale_live = true;
        }
        if let Some(old) = self.build.take() {
            drop(old.target.writer);
            let _ = std::fs::remove_dir_all(self.root.join(&old.target.dir));
        }
        let name = self.ix.spec.name.clone();
        let started = Instant::now();
        let result = (|| -> Result<Build, String> {
            let (dir, path) = self.new_dir().map_err(|e| e.to_string())?;
            let schema = schema(&self.ix.spec);
            // Stored documents uncompressed, in small blocks: each hit of a
            // search reads its document's whole block, and decompressing (or
            // copying) a 16 KiB block per hit cost more than the disk it
            // saves.
            let settings = IndexSettings {
                docstore_compression: Compressor::None,
                docstore_blocksize: DOCSTORE_BLOCK_BYTES,
                ..IndexSettings::default()
            };
            let index = Index::builder()
                .schema(schema.clone())
                .settings(settings)
                .create_in_dir(&path)
                .map_err(|e| e.to_string())?;
            super::doc::register_tokenizers(&index);
            let writer = index
                .writer_with_num_threads(1, self.memory)
                .map_err(|e| e.to_string())?;
            let keys = match self.cache.list(&self.ix.spec.cache) {
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(format!("cannot list the cache: {e}")),
            };
            Ok(Build {
                target: Target {
                    fields: Fields::new(&self.ix.spec, &schema),
                    index,
                    writer,
                    dir,
                },
                keys: keys.into_iter(),
                reason,
                started,
            })
        })();
        match result {
            Ok(b) => {
                tracing::info!(index = %name, reason, keys = b.keys.len(), "search index rebuild started");
                self.metrics
                    .search
                    .rebuilds
                    .with_label_values(&[&name, reason])
                    .inc();
                self.metrics
                    .search
                    .rebuilding
                    .with_label_values(&[&name])
                    .set(1);
                self.ix.update(|s| s.rebuilding = Some(reason));
                self.build = Some(b);
            }
            Err(e) => {
                tracing::error!(index = %name, error = %e, "cannot start a search index rebuild; trying again in 5s");
                self.ix.update(|s| s.last_error = Some(e));
                self.retry_build = Some((reason, Instant::now() + Duration::from_secs(5)));
            }
        }
    }

    fn build_step(&mut self) {
        let Some(b) = self.build.as_mut() else { return };
        let chunk: Vec<String> = b.keys.by_ref().take(BUILD_CHUNK).collect();
        if chunk.is_empty() {
            self.finish_build();
            return;
        }
        for key in chunk {
            let value = match self.cache.read(&self.ix.spec.cache, &key) {
                Ok(Some((v, _))) => v,
                // Deleted since the listing: its change is on its way.
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(index = %self.name(), key = %key, error = %e, "cannot read a cached value to index it");
                    continue;
                }
            };
            let doc = self.convert(&key, &value);
            let b = self.build.as_mut().expect("building");
            b.target
                .writer
                .delete_term(Term::from_field_text(b.target.fields.key, &key));
            if let Some(d) = doc {
                let _ = b.target.writer.add_document(d);
            }
        }
    }

    fn finish_build(&mut self) {
        let payload = self.payload(false);
        let Some(mut b) = self.build.take() else {
            return;
        };
        let name = self.ix.spec.name.clone();
        let result = (|| -> Result<Live, String> {
            let mut prepared = b
                .target
                .writer
                .prepare_commit()
                .map_err(|e| e.to_string())?;
            prepared.set_payload(&payload);
            prepared.commit().map_err(|e| e.to_string())?;
            let live = Live::open(b.target.index.clone()).map_err(|e| e.to_string())?;
            // Point `current` at the new index atomically.
            let tmp = self.root.join(".current.tmp");
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&b.target.dir, &tmp).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, self.root.join("current")).map_err(|e| e.to_string())?;
            if let Ok(d) = std::fs::File::open(&self.root) {
                let _ = d.sync_all();
            }
            Ok(live)
        })();
        self.metrics
            .search
            .rebuilding
            .with_label_values(&[&name])
            .set(0);
        self.ix.update(|s| s.rebuilding = None);
        match result {
            Ok(live) => {
                self.ix.set_live(Arc::new(live));
                let old = self.live.replace(b.target);
                if let Some(old) = old {
                    drop(old.writer);
                }
                self.remove_other_dirs();
                self.stale_live = false;
                let took = b.started.elapsed();
                self.metrics
                    .search
                    .rebuild_duration
                    .with_label_values(&[&name])
                    .observe(took.as_secs_f64());
                tracing::info!(index = %name, reason = b.reason, seconds = took.as_secs_f64(), "search index rebuilt");
                self.dirty = false;
                self.last_commit = Instant::now();
                self.committed();
            }
            Err(e) => {
                tracing::error!(index = %name, error = %e, "search index rebuild failed; retrying");
                drop(b.target.writer);
                let _ = std::fs::remove_dir_all(self.root.join(&b.target.dir));
                self.ix.update(|s| s.last_error = Some(e));
                std::thread::sleep(Duration::from_secs(1));
                self.start_build(b.reason);
            }
        }
    }

    /// Removes index directories other than the live one.
    fn remove_other_dirs(&self) {
        let keep = self.live.as_ref().map(|t| t.dir.clone());
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("i-") && Some(&name) != keep.as_ref() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
