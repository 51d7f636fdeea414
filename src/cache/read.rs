//! Reading the cache directory: listing caches and keys (through the key
//! encoding) and opening values with their content types. Used by the HTTP
//! read path, by the applier (for clears) and by tests; it never writes.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::generation::{CONTENT_TYPE_XATTR, DEFAULT_CONTENT_TYPE};
use super::keys;

/// Lists the decoded keys under a cache directory (recursing into the
/// segment directories of long keys). A missing directory has no keys.
pub fn list_keys(cache_dir: &Path) -> io::Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut stack = vec![(cache_dir.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let rel = format!("{prefix}{name}");
            let ft = entry.file_type()?;
            if ft.is_dir() {
                if name.ends_with('+') {
                    stack.push((entry.path(), format!("{rel}/")));
                }
            } else if ft.is_file()
                && let Some(key) = keys::decode(&rel)
            {
                keys.push(key);
            }
        }
    }
    Ok(keys)
}

/// Lists cache directories under a generation root.
pub fn list_caches(root: &Path) -> io::Result<Vec<String>> {
    let mut caches = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Ok(name) = entry.file_name().into_string()
            && keys::check_cache(&name).is_ok()
        {
            caches.push(name);
        }
    }
    caches.sort();
    Ok(caches)
}

/// An open value file: the file, its size and its content type.
pub struct OpenValue {
    pub file: File,
    pub size: u64,
    pub content_type: String,
}

impl OpenValue {
    /// Reads the whole value. Files are replaced by rename, never written in
    /// place, so the open file keeps the size it had when opened.
    pub fn read_all(mut self) -> io::Result<Vec<u8>> {
        let mut value = vec![0; self.size as usize];
        io::Read::read_exact(&mut self.file, &mut value)?;
        Ok(value)
    }
}

/// Opens a value file: `None` when there is no such key.
pub fn open_value(path: &Path) -> io::Result<Option<OpenValue>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(None);
    }
    let content_type = content_type_of(&file);
    Ok(Some(OpenValue {
        file,
        size: meta.len(),
        content_type,
    }))
}

/// Reads a value and its content type from a file path.
pub fn read_value(path: &Path) -> io::Result<Option<(Vec<u8>, String)>> {
    match open_value(path)? {
        Some(v) => {
            let content_type = v.content_type.clone();
            Ok(Some((v.read_all()?, content_type)))
        }
        None => Ok(None),
    }
}

/// The content type kept with an open file.
pub fn content_type_of(f: &File) -> String {
    let mut buf = [0u8; 256];
    match rustix::fs::fgetxattr(f, CONTENT_TYPE_XATTR, &mut buf[..]) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => DEFAULT_CONTENT_TYPE.to_string(),
    }
}
