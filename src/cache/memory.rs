//! An in-memory copy of small, recently read values, so that `GET
//! /v1/cache/...` answers without touching the filesystem.
//!
//! It is only an accelerator for the HTTP read path: the cache directory
//! stays the truth. The applier invalidates a key right after it renames or
//! removes the key's file (and everything when a cold boot swaps the
//! directory), before the batch's position becomes visible, so a read after
//! `?wait=local` never sees an older value.
//!
//! The race "a reader read the old file, the applier replaced and
//! invalidated it, then the reader inserted the old value" is closed by a
//! per-shard epoch: a reader notes the epoch before reading the file and
//! inserts only if no invalidation happened in that shard meanwhile.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Mutex;

use bytes::Bytes;

const SHARDS: usize = 16;

/// Values larger than this are never kept in memory.
pub const MAX_VALUE: usize = 64 << 10;

/// A value as served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cached {
    pub value: Bytes,
    pub content_type: String,
}

#[derive(Default)]
struct Shard {
    /// cache -> key -> value
    map: HashMap<String, HashMap<String, Cached>>,
    bytes: usize,
    epoch: u64,
}

impl Shard {
    fn remove(&mut self, cache: &str, key: &str) {
        if let Some(keys) = self.map.get_mut(cache)
            && let Some(old) = keys.remove(key)
        {
            self.bytes -= cost(key, &old);
            if keys.is_empty() {
                self.map.remove(cache);
            }
        }
    }
}

fn cost(key: &str, v: &Cached) -> usize {
    v.value.len() + key.len() + v.content_type.len() + 64
}

/// Noted before reading a file; needed to insert what was read.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    shard: usize,
    epoch: u64,
}

impl std::fmt::Debug for ValueCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueCache")
            .field("budget", &(self.budget_per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

/// The in-memory value cache (disabled with a budget of 0).
pub struct ValueCache {
    shards: Vec<Mutex<Shard>>,
    budget_per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl ValueCache {
    /// A cache holding at most about `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            budget_per_shard: (budget as usize) / SHARDS,
            hasher: Default::default(),
        }
    }

    fn shard_of(&self, cache: &str, key: &str) -> usize {
        let mut h = self.hasher.build_hasher();
        cache.hash(&mut h);
        key.hash(&mut h);
        (h.finish() as usize) % SHARDS
    }

    pub fn enabled(&self) -> bool {
        self.budget_per_shard > 0
    }

    /// A kept value, if any.
    pub fn get(&self, cache: &str, key: &str) -> Option<Cached> {
        if !self.enabled() {
            return None;
        }
        let shard = self.shards[self.shard_of(cache, key)]
            .lock()
            .expect("not poisoned");
        shard.map.get(cache)?.get(key).cloned()
    }

    /// Notes the shard's epoch before reading `cache`/`key` from disk.
    pub fn ticket(&self, cache: &str, key: &str) -> Ticket {
        let shard = self.shard_of(cache, key);
        let epoch = self.shards[shard].lock().expect("not poisoned").epoch;
        Ticket { shard, epoch }
    }

    /// Keeps a value read from disk, unless the shard changed since `ticket`.
    pub fn insert(&self, ticket: Ticket, cache: &str, key: &str, value: Cached) {
        if !self.enabled() || value.value.len() > MAX_VALUE {
            return;
        }
        let mut shard = self.shards[ticket.shard].lock().expect("not poisoned");
        if shard.epoch != ticket.epoch {
            return;
        }
        let size = cost(key, &value);
        if shard.bytes + size > self.budget_per_shard {
            // Evict about a quarter of the shard, in arbitrary order.
            let target = self.budget_per_shard / 4 * 3;
            let mut victims = Vec::new();
            let mut freed = 0;
            'outer: for (c, keys) in &shard.map {
                for (k, v) in keys {
                    if shard.bytes - freed + size <= target {
                        break 'outer;
                    }
                    freed += cost(k, v);
                    victims.push((c.clone(), k.clone()));
                }
            }
            for (c, k) in victims {
                shard.remove(&c, &k);
            }
            if shard.bytes + size > self.budget_per_shard {
                return;
            }
        }
        shard.remove(cache, key);
        shard.bytes += size;
        shard
            .map
            .entry(cache.to_string())
            .or_default()
            .insert(key.to_string(), value);
    }

    /// Forgets a key (its file was replaced or removed).
    pub fn invalidate(&self, cache: &str, key: &str) {
        let mut shard = self.shards[self.shard_of(cache, key)]
            .lock()
            .expect("not poisoned");
        shard.epoch += 1;
        shard.remove(cache, key);
    }

    /// Forgets everything (the directory was swapped).
    pub fn clear(&self) {
        for s in &self.shards {
            let mut shard = s.lock().expect("not poisoned");
            shard.epoch += 1;
            shard.map.clear();
            shard.bytes = 0;
        }
    }

    /// Bytes held (approximately).
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("not poisoned").bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Cached {
        Cached {
            value: Bytes::copy_from_slice(s.as_bytes()),
            content_type: "text/plain".into(),
        }
    }

    #[test]
    fn get_insert_invalidate() {
        let c = ValueCache::new(1 << 20);
        assert_eq!(c.get("a", "k"), None);
        let t = c.ticket("a", "k");
        c.insert(t, "a", "k", v("1"));
        assert_eq!(c.get("a", "k"), Some(v("1")));
        c.invalidate("a", "k");
        assert_eq!(c.get("a", "k"), None);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn an_insert_racing_an_invalidation_is_dropped() {
        let c = ValueCache::new(1 << 20);
        let t = c.ticket("a", "k"); // reader notes the epoch, reads the old file...
        c.invalidate("a", "k"); // ...the applier replaces the file meanwhile
        c.insert(t, "a", "k", v("old"));
        assert_eq!(c.get("a", "k"), None);
        let t = c.ticket("a", "k");
        c.insert(t, "a", "k", v("new"));
        assert_eq!(c.get("a", "k"), Some(v("new")));
        c.clear();
        assert_eq!(c.get("a", "k"), None);
        c.insert(t, "a", "k", v("stale ticket"));
        assert_eq!(c.get("a", "k"), None);
    }

    #[test]
    fn stays_within_budget() {
        let c = ValueCache::new(64 * 1024);
        let big = "x".repeat(1000);
        for i in 0..1000 {
            let k = format!("k{i}");
            let t = c.ticket("a", &k);
            c.insert(t, "a", &k, v(&big));
        }
        assert!(c.bytes() <= 64 * 1024, "{}", c.bytes());
        assert!(c.bytes() > 16 * 1024);
        let disabled = ValueCache::new(0);
        let t = disabled.ticket("a", "k");
        disabled.insert(t, "a", "k", v("1"));
        assert_eq!(disabled.get("a", "k"), None);
    }

    #[test]
    fn large_values_are_not_kept() {
        let c = ValueCache::new(16 << 20);
        let t = c.ticket("a", "k");
        c.insert(t, "a", "k", v(&"x".repeat(MAX_VALUE + 1)));
        assert_eq!(c.get("a", "k"), None);
    }
}
