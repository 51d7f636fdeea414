//! The recorder: a thread that makes applied batches durable *behind* the
//! applier. For each batch it fsyncs the directories the batch touched, then
//! writes the position, in the order the batches were applied. The applier
//! meanwhile goes on with the next batch, so a directory fsync never delays
//! the next change from becoming visible.
//!
//! The order that matters is kept: a position is written only after the
//! directory entries it covers are on disk, so whatever position file
//! survives a crash, the cache holds at least what it claims. Queued work is
//! coalesced: several batches waiting cost one fsync per directory and one
//! position write (the latest). Flushes are at least [`MIN_INTERVAL`] apart
//! unless someone waits for one, so a host applying hundreds of small
//! batches a second fsyncs its directories and rewrites its position a few
//! dozen times a second, not once per batch (a crash then re-reads at most
//! that interval's batches, which is harmless).

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::apply::ApplyError;
use super::position::{LocalState, StateFile};

/// The least time between two flushes nobody waits for.
const MIN_INTERVAL: Duration = Duration::from_millis(250);

enum Record {
    Flush {
        dirs: BTreeSet<PathBuf>,
        state: Option<Box<LocalState>>,
        durable: bool,
        done: Option<Sender<()>>,
    },
}

/// Handle to the recorder thread.
pub struct Recorder {
    tx: Sender<Record>,
    error: Arc<Mutex<Option<ApplyError>>>,
}

impl Recorder {
    pub fn start(state_file: StateFile) -> Self {
        let (tx, rx) = channel();
        let error = Arc::new(Mutex::new(None));
        let e = error.clone();
        std::thread::Builder::new()
            .name("tandem-recorder".into())
            .spawn(move || run(rx, state_file, e))
            .expect("can spawn the recorder thread");
        Self { tx, error }
    }

    /// Queues a batch's directories and position.
    pub fn submit(&self, dirs: BTreeSet<PathBuf>, state: Option<LocalState>, durable: bool) {
        let _ = self.tx.send(Record::Flush {
            dirs,
            state: state.map(Box::new),
            durable,
            done: None,
        });
    }

    /// Like [`Self::submit`], and waits until it (and everything queued
    /// before it) is done.
    pub fn submit_and_wait(
        &self,
        dirs: BTreeSet<PathBuf>,
        state: Option<LocalState>,
        durable: bool,
    ) {
        let (done, wait) = channel();
        let _ = self.tx.send(Record::Flush {
            dirs,
            state: state.map(Box::new),
            durable,
            done: Some(done),
        });
        let _ = wait.recv();
    }

    /// The first failure since the last call, if any.
    pub fn take_error(&self) -> Option<ApplyError> {
        self.error.lock().expect("not poisoned").take()
    }
}

fn run(rx: Receiver<Record>, state_file: StateFile, error: Arc<Mutex<Option<ApplyError>>>) {
    let fail = |what: String, source: io::Error| {
        tracing::error!(%what, error = %source, "cannot make the cache durable");
        let mut slot = error.lock().expect("not poisoned");
        if slot.is_none() {
            *slot = Some(ApplyError {
                what,
                source,
                lost_durability: true,
            });
        }
    };
    let mut last_flush: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        let mut dirs = BTreeSet::new();
        let mut state = None;
        let mut durable = false;
        let mut done = Vec::new();
        let mut take = |record: Record, done: &mut Vec<Sender<()>>| {
            let Record::Flush {
                dirs: d,
                state: s,
                durable: du,
                done: dn,
            } = record;
            dirs.extend(d);
            if s.is_some() {
                state = s;
            }
            durable |= du;
            done.extend(dn);
        };
        take(first, &mut done);
        // Gather what arrives until the interval is up (or someone waits).
        let not_before = last_flush.map(|at| at + MIN_INTERVAL);
        while done.is_empty() {
            let wait = not_before.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(record) => take(record, &mut done),
                Err(RecvTimeoutError::Timeout) => break,
                // The applier is gone: flush what there is, then stop.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(record) = rx.try_recv() {
            take(record, &mut done);
        }
        last_flush = Some(Instant::now());
        let mut ok = true;
        for dir in &dirs {
            match File::open(dir).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    fail(format!("cannot sync {}", dir.display()), e);
                    ok = false;
                    break;
                }
            }
        }
        if ok
            && let Some(state) = state
            && let Err(e) = state_file.store(&state, durable)
        {
            fail(format!("cannot write {}", state_file.path().display()), e);
        }
        for d in done {
            let _ = d.send(());
        }
    }
}
