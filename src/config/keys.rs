//! The table of every config key: its section, name, value kind and default
//! as documented. It drives the environment overlay (`TANDEM_<SECTION>_<KEY>`)
//! and unknown-key detection; tests check that `docs/config.md` and the
//! shipped `packaging/tandem.toml` name every key.

/// How an environment variable's text becomes a TOML value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Any string (paths, URLs, durations, addresses).
    Str,
    /// An integer.
    Int,
    /// `true`/`false` (also `1`/`0`, `yes`/`no`).
    Bool,
    /// A byte size: an integer or a string with a unit.
    Size,
}

/// One config key.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    /// Section name; empty for top-level keys.
    pub section: &'static str,
    pub name: &'static str,
    pub kind: Kind,
    /// The default, as written in the docs.
    pub default: &'static str,
}

impl Key {
    /// `section.name`, or `name` at top level.
    pub fn path(&self) -> String {
        if self.section.is_empty() {
            self.name.to_string()
        } else {
            format!("{}.{}", self.section, self.name)
        }
    }

    /// The environment variable that overrides this key.
    pub fn env_var(&self) -> String {
        let mut var = String::from("TANDEM_");
        if !self.section.is_empty() {
            var.push_str(&self.section.to_ascii_uppercase());
            var.push('_');
        }
        var.push_str(&self.name.to_ascii_uppercase());
        var
    }
}

const fn key(section: &'static str, name: &'static str, kind: Kind, default: &'static str) -> Key {
    Key {
        section,
        name,
        kind,
        default,
    }
}

/// Every key tandem knows.
pub const KEYS: &[Key] = &[
    key(
        "",
        "data_dir",
        Kind::Str,
        "$STATE_DIRECTORY, /var/lib/tandem as root, else ~/.local/state/tandem",
    ),
    key("", "cache_dir", Kind::Str, "<data_dir>/cache"),
    key("host", "id", Kind::Str, "the hostname"),
    key(
        "database",
        "url",
        Kind::Str,
        "empty: run an embedded PostgreSQL",
    ),
    key("database", "password_file", Kind::Str, "none"),
    key("database", "schema", Kind::Str, "tandem"),
    key("database", "connect_timeout", Kind::Str, "5s"),
    key(
        "database",
        "embedded_bin_dir",
        Kind::Str,
        "newest /usr/lib/postgresql/*/bin, else PATH",
    ),
    key(
        "database",
        "embedded_user",
        Kind::Str,
        "postgres (or nobody) when tandem runs as root",
    ),
    key("api", "listen", Kind::Str, "127.0.0.1:7411"),
    key("api", "unix_socket", Kind::Str, "none"),
    key("api", "unix_socket_mode", Kind::Str, "0660"),
    key("api", "token_file", Kind::Str, "none: writes need no token"),
    key("api", "max_value_size", Kind::Size, "16MiB"),
    key("api", "max_batch_ops", Kind::Int, "10000"),
    key("api", "max_batch_size", Kind::Size, "64MiB"),
    key("api", "max_wait", Kind::Str, "30s"),
    key("api", "read_cache_size", Kind::Size, "64MiB"),
    key("sync", "poll_interval", Kind::Str, "2s"),
    key("sync", "batch_size", Kind::Int, "1000"),
    key("sync", "max_lag", Kind::Str, "10s"),
    key("sync", "retain", Kind::Str, "2d"),
    key("sync", "max_retain", Kind::Str, "7d"),
    key("sync", "prune_interval", Kind::Str, "5m"),
    key("sync", "prune_batch", Kind::Int, "10000"),
    key("cluster", "heartbeat_interval", Kind::Str, "5s"),
    key("cluster", "stale_after", Kind::Int, "3"),
    key("cluster", "forget_after", Kind::Str, "7d"),
    key("leader", "lease", Kind::Str, "10s"),
    key("leader", "eligible", Kind::Bool, "true"),
    key("scheduler", "history_retain", Kind::Str, "7d"),
    key("scheduler", "output_tail", Kind::Size, "4KiB"),
    key("search", "commit_interval", Kind::Str, "200ms"),
    key("search", "max_limit", Kind::Int, "100"),
    key("search", "max_offset", Kind::Int, "10000"),
    key("search", "writer_memory", Kind::Size, "64MiB"),
    key("uploads", "store", Kind::Str, "file://{data_dir}/store"),
    key("uploads", "dir", Kind::Str, "{data_dir}/uploads"),
    key("uploads", "ttl", Kind::Str, "24h"),
    key("uploads", "max_size", Kind::Size, "5GiB"),
    key("uploads", "mirror", Kind::Bool, "false"),
    key("uploads", "local_cache_size", Kind::Size, "10GiB"),
    key("uploads", "expire_every", Kind::Str, "1m"),
    key("uploads", "abandon_after", Kind::Str, "1h"),
    key(
        "uploads",
        "endpoint",
        Kind::Str,
        "none: AWS_ENDPOINT or the provider's",
    ),
    key(
        "uploads",
        "region",
        Kind::Str,
        "none: AWS_REGION or us-east-1",
    ),
    key(
        "uploads",
        "access_key_id",
        Kind::Str,
        "none: AWS_ACCESS_KEY_ID",
    ),
    key(
        "uploads",
        "secret_access_key_file",
        Kind::Str,
        "none: AWS_SECRET_ACCESS_KEY",
    ),
    key("uploads", "allow_http", Kind::Bool, "false"),
    key("events", "window", Kind::Int, "10000"),
    key("events", "buffer", Kind::Int, "4096"),
    key("events", "heartbeat", Kind::Str, "15s"),
    key("events", "webhook_url", Kind::Str, "none"),
    key("events", "webhook_batch", Kind::Int, "500"),
    key("events", "webhook_timeout", Kind::Str, "5s"),
    key("log", "level", Kind::Str, "info"),
    key("log", "format", Kind::Str, "text"),
];

/// The sections that exist (top-level keys aside).
pub fn sections() -> impl Iterator<Item = &'static str> {
    let mut seen: Vec<&'static str> = Vec::new();
    for k in KEYS {
        if !k.section.is_empty() && !seen.contains(&k.section) {
            seen.push(k.section);
        }
    }
    seen.into_iter()
}

/// Looks a key up by section and name.
pub fn find(section: &str, name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.section == section && k.name == name)
}

/// The known key closest to `path` (for "did you mean" hints).
pub fn suggest(path: &str) -> Option<String> {
    KEYS.iter()
        .map(|k| k.path())
        .map(|p| (edit_distance(&p, path), p))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, p)| p)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        assert_eq!(
            find("database", "url").unwrap().env_var(),
            "TANDEM_DATABASE_URL"
        );
        assert_eq!(find("", "data_dir").unwrap().env_var(), "TANDEM_DATA_DIR");
        assert_eq!(
            find("sync", "poll_interval").unwrap().env_var(),
            "TANDEM_SYNC_POLL_INTERVAL"
        );
    }

    #[test]
    fn env_names_are_unambiguous() {
        let mut names: Vec<String> = KEYS.iter().map(Key::env_var).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("sync.pol_interval").as_deref(),
            Some("sync.poll_interval")
        );
        assert_eq!(suggest("nothing.like.it"), None);
    }
}
