//! A host's read position and its durable copy on local disk.
//!
//! The position is the snapshot of the last complete read (`done`). When a
//! read returned a full page, the rest of that delta is still to be read:
//! `pending` names the snapshot the delta ends at and the last `(tx, id)`
//! applied, so the next read continues from there. `done` only advances once
//! the whole delta is applied, so "host H has applied tx T" is always
//! `done.is_visible(T)`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::snapshot::Snapshot;

/// Where a host has read to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub done: Snapshot,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// A delta being read page by page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The snapshot the delta ends at.
    pub target: Snapshot,
    /// The last row applied, as `(tx, id)`.
    pub after_tx: u64,
    pub after_id: i64,
}

/// What the local state belongs to: a database (its system identifier and
/// the schema instance id) and a cache generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub system_id: String,
    pub schema_id: String,
}

/// The durable local state: written atomically after each applied batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    pub version: u32,
    pub identity: Identity,
    /// The cache generation directory this position describes.
    pub generation: String,
    pub position: Position,
}

impl LocalState {
    pub const VERSION: u32 = 1;
}

/// The state file in the data directory.
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join("position.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state; `Ok(None)` when there is none, `Err` with a reason
    /// when it exists but cannot be used (it is then ignored and the host
    /// cold-boots).
    pub fn load(&self) -> Result<Option<LocalState>, String> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        let state: LocalState = serde_json::from_slice(&bytes)
            .map_err(|e| format!("cannot parse {}: {e}", self.path.display()))?;
        if state.version != LocalState::VERSION {
            return Err(format!(
                "{} has version {}, expected {}",
                self.path.display(),
                state.version,
                LocalState::VERSION
            ));
        }
        Ok(Some(state))
    }

    /// Writes the state atomically (temp file, rename). With `durable`, also
    /// fsyncs the file before and the directory after the rename.
    ///
    /// A non-durable write is still safe: the cache changes it covers were
    /// made durable before it (see [`super::record`]), so after a power loss
    /// the file holds this state, an older one (some rows are read again),
    /// or, on filesystems that do not order a rename after the data, a
    /// damaged file (the host then cold-boots).
    pub fn store(&self, state: &LocalState, durable: bool) -> std::io::Result<()> {
        let dir = self.path.parent().expect("state file has a parent");
        let tmp = dir.join(".position.json.tmp");
        let bytes = serde_json::to_vec(state).expect("state serialises");
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            if durable {
                f.sync_all()?;
            }
        }
        fs::rename(&tmp, &self.path)?;
        if durable {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Removes the state (forces a cold boot at next start).
    pub fn remove(&self) -> std::io::Result<()> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        assert_eq!(file.load().unwrap(), None);
        let state = LocalState {
            version: LocalState::VERSION,
            identity: Identity {
                system_id: "1".into(),
                schema_id: "abc".into(),
            },
            generation: "g-000001".into(),
            position: Position {
                done: "5:9:6".parse().unwrap(),
                pending: Some(Pending {
                    target: "6:12:".parse().unwrap(),
                    after_tx: 9,
                    after_id: 41,
                }),
            },
        };
        file.store(&state, true).unwrap();
        assert_eq!(file.load().unwrap(), Some(state.clone()));
        file.store(&state, false).unwrap();
        assert_eq!(file.load().unwrap(), Some(state));
        fs::write(file.path(), b"{not json").unwrap();
        assert!(file.load().is_err());
        file.remove().unwrap();
        assert_eq!(file.load().unwrap(), None);
    }
}
