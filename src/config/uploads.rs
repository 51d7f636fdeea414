//! The `[uploads]` section: where uploads are stored (an object-store URL),
//! the local directory tandem watches and keeps copies in, and their limits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::RawUploads;
use super::units::{duration, flag, size};
use super::{ConfigError, Secret, nonempty, nonempty_path, read_secret_file};

/// Which kind of object store `uploads.store` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// A local (or NFS-mounted) directory.
    File(PathBuf),
    /// `s3://bucket/prefix` (AWS S3 or an S3-compatible server).
    S3,
    /// `gs://bucket/prefix`.
    Gcs,
    /// `az://container/prefix` (also `azure://`, `abfs://`).
    Azure,
}

#[derive(Clone, Debug)]
pub struct UploadsConfig {
    /// The store URL as written (secrets never appear in it).
    pub store: String,
    pub kind: StoreKind,
    /// Where tandem watches for files (`incoming/`) and keeps local copies.
    pub dir: PathBuf,
    pub ttl: Duration,
    pub max_size: u64,
    pub mirror: bool,
    pub local_cache_size: u64,
    pub expire_every: Duration,
    pub abandon_after: Duration,
    /// S3: endpoint override for S3-compatible stores, region, credentials.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub allow_http: bool,
}

pub(super) fn validate(raw: RawUploads, data_dir: &Path) -> Result<UploadsConfig, ConfigError> {
    let store = nonempty(raw.store)
        .unwrap_or_else(|| format!("file://{}", data_dir.join("store").display()));
    let kind = store_kind(&store)?;
    let dir = nonempty_path(raw.dir).unwrap_or_else(|| data_dir.join("uploads"));
    if !dir.is_absolute() {
        return Err(ConfigError::key("uploads.dir", "must be an absolute path"));
    }
    let ttl = duration("uploads.ttl", raw.ttl)?;
    if ttl < Duration::from_secs(1) {
        return Err(ConfigError::key("uploads.ttl", "must be at least 1s"));
    }
    let max_size = size("uploads.max_size", raw.max_size)?;
    if max_size == 0 {
        return Err(ConfigError::key(
            "uploads.max_size",
            "must be at least 1 byte",
        ));
    }
    let expire_every = duration("uploads.expire_every", raw.expire_every)?;
    if expire_every < Duration::from_millis(500) {
        return Err(ConfigError::key(
            "uploads.expire_every",
            "must be at least 500ms",
        ));
    }
    let abandon_after = duration("uploads.abandon_after", raw.abandon_after)?;
    if abandon_after < Duration::from_secs(60) {
        // Shorter would abandon uploads still streaming in.
        return Err(ConfigError::key(
            "uploads.abandon_after",
            "must be at least 1m (the longest an upload may take)",
        ));
    }
    let secret_access_key = match nonempty_path(raw.secret_access_key_file) {
        Some(p) => Some(read_secret_file("uploads.secret_access_key_file", &p)?),
        None => None,
    };
    Ok(UploadsConfig {
        store,
        kind,
        dir,
        ttl,
        max_size,
        mirror: flag("uploads.mirror", raw.mirror),
        local_cache_size: size("uploads.local_cache_size", raw.local_cache_size)?,
        expire_every,
        abandon_after,
        endpoint: nonempty(raw.endpoint),
        region: nonempty(raw.region),
        access_key_id: nonempty(raw.access_key_id),
        secret_access_key,
        allow_http: flag("uploads.allow_http", raw.allow_http),
    })
}

fn store_kind(url: &str) -> Result<StoreKind, ConfigError> {
    let bad = |why: &str| ConfigError::key("uploads.store", format!("{url:?}: {why}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        bad("expected a URL such as file:///var/lib/tandem/store or s3://bucket/prefix")
    })?;
    match scheme {
        "file" => {
            let path = PathBuf::from(rest);
            if !path.is_absolute() {
                return Err(bad(
                    "a file:// URL needs an absolute path (file:///srv/store)",
                ));
            }
            Ok(StoreKind::File(path))
        }
        "s3" | "s3a" => bucket(rest).map(|_| StoreKind::S3).map_err(&bad),
        "gs" => bucket(rest).map(|_| StoreKind::Gcs).map_err(&bad),
        "az" | "azure" | "abfs" | "abfss" => bucket(rest).map(|_| StoreKind::Azure).map_err(&bad),
        _ => Err(bad("the scheme must be file, s3, gs or az")),
    }
}

fn bucket(rest: &str) -> Result<(), &'static str> {
    if rest.split('/').next().unwrap_or("").is_empty() {
        return Err("no bucket or container named");
    }
    if rest.contains('?') || rest.contains('#') {
        return Err("put options in config keys or environment variables, not in the URL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(
            store_kind("file:///srv/store").unwrap(),
            StoreKind::File("/srv/store".into())
        );
        assert_eq!(store_kind("s3://bucket/prefix").unwrap(), StoreKind::S3);
        assert_eq!(store_kind("gs://b").unwrap(), StoreKind::Gcs);
        assert_eq!(store_kind("az://c/p").unwrap(), StoreKind::Azure);
        for bad in [
            "",
            "/srv/store",
            "file://relative",
            "s3://",
            "ftp://x",
            "s3://b?x=1",
        ] {
            let e = store_kind(bad).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("uploads.store"), "{bad}");
        }
    }
}
