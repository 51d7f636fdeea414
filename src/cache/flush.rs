//! Choosing how to make a batch of staged files durable: an `fdatasync` per
//! file, or one `syncfs` of the whole filesystem.
//!
//! Neither is always cheaper. An `fdatasync` costs about one disk flush, so
//! a batch of `n` files costs `n` flushes. A `syncfs` costs one flush plus
//! writing out *every* dirty page of the filesystem, other processes' too:
//! a few milliseconds on a quiet disk, tens of milliseconds when the disk is
//! shared with a busy database. A fixed rule ("`syncfs` above 8 files")
//! therefore fails under load: once a host falls a few rows behind, each
//! batch pays a slow `syncfs`, which lets more rows pile up for the next
//! batch, and the host stays behind for seconds.
//!
//! So the applier measures both and picks the one expected to be cheaper
//! ([`FlushCosts::choose`]). The `syncfs` estimate, which stops being
//! measured while per-file flushes win, slowly decays so that it is tried
//! again now and then (load changes); the per-file estimate never needs
//! that: single-file batches keep measuring it.

use std::time::Duration;

/// How a batch's files are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    PerFile,
    Syncfs,
}

/// Running estimates of what each method costs, in microseconds.
#[derive(Debug, Clone)]
pub struct FlushCosts {
    per_file_us: f64,
    syncfs_us: f64,
}

/// Weight of a new measurement in an estimate.
const ALPHA: f64 = 0.25;

/// Factor applied to the `syncfs` estimate each time a batch of several
/// files is flushed file by file: about 2,300 such batches divide it by ten,
/// so an expensive `syncfs` is retried only every few thousand batches.
const SYNCFS_DECAY: f64 = 0.999;

impl Default for FlushCosts {
    /// Starting guesses: a flush costs 300 µs, a `syncfs` ten of them.
    fn default() -> Self {
        Self {
            per_file_us: 300.0,
            syncfs_us: 3_000.0,
        }
    }
}

impl FlushCosts {
    /// The method expected to be cheaper for `files` staged files.
    pub fn choose(&mut self, files: usize) -> Method {
        if files <= 1 {
            return Method::PerFile;
        }
        if files as f64 * self.per_file_us <= self.syncfs_us {
            self.syncfs_us *= SYNCFS_DECAY;
            Method::PerFile
        } else {
            Method::Syncfs
        }
    }

    /// Records what flushing `files` files with `method` took.
    pub fn record(&mut self, method: Method, files: usize, took: Duration) {
        let us = took.as_secs_f64() * 1e6;
        let (estimate, sample) = match method {
            Method::PerFile => (&mut self.per_file_us, us / files.max(1) as f64),
            Method::Syncfs => (&mut self.syncfs_us, us),
        };
        *estimate += ALPHA * (sample - *estimate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1e3)
    }

    #[test]
    fn a_single_file_is_always_flushed_alone() {
        let mut c = FlushCosts::default();
        c.record(Method::PerFile, 1, ms(50.0));
        assert_eq!(c.choose(1), Method::PerFile);
    }

    #[test]
    fn large_batches_take_syncfs_when_it_is_cheap() {
        let mut c = FlushCosts::default();
        assert_eq!(c.choose(5), Method::PerFile);
        assert_eq!(c.choose(1000), Method::Syncfs);
    }

    #[test]
    fn a_slow_syncfs_moves_mid_sized_batches_to_per_file_flushes() {
        let mut c = FlushCosts::default();
        assert_eq!(c.choose(30), Method::Syncfs);
        // Under load: syncfs takes 60 ms, a single flush 0.3 ms.
        for _ in 0..20 {
            c.record(Method::Syncfs, 30, ms(60.0));
            c.record(Method::PerFile, 1, ms(0.3));
        }
        assert_eq!(c.choose(30), Method::PerFile);
        // A catch-up page still takes syncfs.
        assert_eq!(c.choose(1000), Method::Syncfs);
    }

    #[test]
    fn syncfs_is_tried_again_after_a_while() {
        let mut c = FlushCosts::default();
        for _ in 0..20 {
            c.record(Method::Syncfs, 30, ms(60.0));
            c.record(Method::PerFile, 1, ms(0.3));
        }
        let tries = (0..100_000).position(|_| c.choose(30) == Method::Syncfs);
        let n = tries.expect("syncfs is retried");
        assert!(n > 1_000, "not retried too eagerly: after {n} batches");
    }
}
