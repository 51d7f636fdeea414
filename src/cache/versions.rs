//! Version counters ("cache versions"): named counters an app bumps when it
//! changes something its processes cache in memory, and reads per request to
//! see whether its copy is still current.
//!
//! They are entries of the reserved cache [`VERSIONS_CACHE`] (the value is
//! the counter in decimal), so they travel through the log like any entry
//! and survive restarts in the cache directory. Every host also keeps them
//! in this map, updated by the applier, so a read never touches the disk or
//! the database.

use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

use super::read;

/// The reserved cache holding the counters (unreachable through the cache
/// API, whose names cannot start with `_`).
pub const VERSIONS_CACHE: &str = "_versions";

/// The in-memory copy of every counter.
#[derive(Debug, Default)]
pub struct Versions {
    map: RwLock<HashMap<String, i64>>,
}

impl Versions {
    /// A counter's value; `None` if it was never bumped.
    pub fn get(&self, name: &str) -> Option<i64> {
        self.map.read().expect("not poisoned").get(name).copied()
    }

    /// Every counter, sorted by name.
    pub fn all(&self) -> Vec<(String, i64)> {
        let mut all: Vec<_> = self
            .map
            .read()
            .expect("not poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        all.sort();
        all
    }

    /// Records an applied value (ignored, with a log line, if not a number).
    pub fn set(&self, name: &str, value: &[u8]) {
        match parse(value) {
            Some(v) => {
                self.map
                    .write()
                    .expect("not poisoned")
                    .insert(name.to_string(), v);
            }
            None => tracing::warn!(name, "ignoring a version counter that is not a number"),
        }
    }

    pub fn remove(&self, name: &str) {
        self.map.write().expect("not poisoned").remove(name);
    }

    /// Replaces every counter with those stored under a generation root.
    pub fn reload(&self, generation_root: &Path) {
        let dir = generation_root.join(VERSIONS_CACHE);
        let mut map = HashMap::new();
        match read::list_keys(&dir) {
            Ok(names) => {
                for name in names {
                    let path = dir.join(super::keys::encode(&name));
                    if let Ok(Some((value, _))) = read::read_value(&path)
                        && let Some(v) = parse(&value)
                    {
                        map.insert(name, v);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the stored version counters"),
        }
        *self.map.write().expect("not poisoned") = map;
    }
}

fn parse(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_reload() {
        let v = Versions::default();
        assert_eq!(v.get("a"), None);
        v.set("a", b"41");
        v.set("a", b"42");
        v.set("b", b"not a number");
        assert_eq!(v.get("a"), Some(42));
        assert_eq!(v.get("b"), None);
        v.remove("a");
        assert_eq!(v.get("a"), None);

        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join(VERSIONS_CACHE);
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join(super::super::keys::encode("page:1")), b"7").unwrap();
        v.reload(dir.path());
        assert_eq!(v.all(), vec![("page:1".to_string(), 7)]);
    }
}
