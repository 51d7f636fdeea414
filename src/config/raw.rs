//! The first stage of loading the config: the raw TOML, checked key by key
//! against [`super::keys::KEYS`] (unknown keys and wrong types name the key),
//! with the environment overlaid. Validation (`validate` in the parent) comes
//! next.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use super::keys::{self, KEYS, Kind};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Raw {
    pub(super) data_dir: Option<PathBuf>,
    pub(super) cache_dir: Option<PathBuf>,
    pub(super) host: RawHost,
    pub(super) database: RawDatabase,
    pub(super) api: RawApi,
    pub(super) sync: RawSync,
    pub(super) cluster: RawCluster,
    pub(super) log: RawLog,
    pub(super) leader: RawLeader,
    pub(super) scheduler: RawScheduler,
    pub(super) jobs: Vec<toml::Table>,
    pub(super) search: RawSearch,
    pub(super) uploads: RawUploads,
    pub(super) events: RawEvents,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUploads {
    pub(super) store: Option<String>,
    pub(super) dir: Option<PathBuf>,
    pub(super) ttl: Option<String>,
    pub(super) max_size: Option<SizeValue>,
    pub(super) mirror: Option<bool>,
    pub(super) local_cache_size: Option<SizeValue>,
    pub(super) expire_every: Option<String>,
    pub(super) abandon_after: Option<String>,
    pub(super) endpoint: Option<String>,
    pub(super) region: Option<String>,
    pub(super) access_key_id: Option<String>,
    pub(super) secret_access_key_file: Option<PathBuf>,
    pub(super) allow_http: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawEvents {
    pub(super) window: Option<i64>,
    pub(super) buffer: Option<i64>,
    pub(super) heartbeat: Option<String>,
    pub(super) webhook_url: Option<String>,
    pub(super) webhook_batch: Option<i64>,
    pub(super) webhook_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSearch {
    pub(super) commit_interval: Option<String>,
    pub(super) max_limit: Option<i64>,
    pub(super) max_offset: Option<i64>,
    pub(super) writer_memory: Option<SizeValue>,
    pub(super) index: Vec<toml::Table>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHost {
    pub(super) id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDatabase {
    pub(super) url: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) schema: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) embedded_bin_dir: Option<PathBuf>,
    pub(super) embedded_user: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawApi {
    pub(super) listen: Option<String>,
    pub(super) unix_socket: Option<PathBuf>,
    pub(super) unix_socket_mode: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) max_value_size: Option<SizeValue>,
    pub(super) max_batch_ops: Option<i64>,
    pub(super) max_batch_size: Option<SizeValue>,
    pub(super) max_wait: Option<String>,
    pub(super) read_cache_size: Option<SizeValue>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSync {
    pub(super) poll_interval: Option<String>,
    pub(super) batch_size: Option<i64>,
    pub(super) max_lag: Option<String>,
    pub(super) retain: Option<String>,
    pub(super) max_retain: Option<String>,
    pub(super) prune_interval: Option<String>,
    pub(super) prune_batch: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCluster {
    pub(super) heartbeat_interval: Option<String>,
    pub(super) stale_after: Option<i64>,
    pub(super) forget_after: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLeader {
    pub(super) lease: Option<String>,
    pub(super) eligible: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawScheduler {
    pub(super) history_retain: Option<String>,
    pub(super) output_tail: Option<SizeValue>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
    pub(super) format: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum SizeValue {
    Int(u64),
    Text(String),
}

/// Reports the first key that tandem does not know (with a suggestion) or
/// whose value has the wrong type.
pub(super) fn check_known(table: &toml::Table) -> Result<(), ConfigError> {
    for (name, value) in table {
        if name == "jobs" {
            // Checked key by key with the jobs (`config::jobs`).
            let tables = value
                .as_array()
                .is_some_and(|a| a.iter().all(toml::Value::is_table));
            if !tables {
                return Err(ConfigError::key(
                    "jobs",
                    "must be an array of tables ([[jobs]])",
                ));
            }
            continue;
        }
        if let Some(key) = keys::find("", name) {
            check_type(key, value)?;
            continue;
        }
        let is_section = keys::sections().any(|s| s == name);
        match value {
            toml::Value::Table(inner) if is_section => {
                for (inner_name, inner_value) in inner {
                    if name == "search" && inner_name == "index" {
                        // Checked key by key with the indexes (`config::search`).
                        let tables = inner_value
                            .as_array()
                            .is_some_and(|a| a.iter().all(toml::Value::is_table));
                        if !tables {
                            return Err(ConfigError::key(
                                "search.index",
                                "must be an array of tables ([[search.index]])",
                            ));
                        }
                        continue;
                    }
                    match keys::find(name, inner_name) {
                        Some(key) => check_type(key, inner_value)?,
                        None => return Err(unknown(&format!("{name}.{inner_name}"))),
                    }
                }
            }
            _ if is_section => {
                return Err(ConfigError::key(name, "must be a table ([section])"));
            }
            _ => return Err(unknown(name)),
        }
    }
    Ok(())
}

fn check_type(key: &keys::Key, value: &toml::Value) -> Result<(), ConfigError> {
    let ok = match key.kind {
        Kind::Str => value.is_str(),
        Kind::Int => value.is_integer(),
        Kind::Bool => value.is_bool(),
        Kind::Size => value.is_str() || value.as_integer().is_some_and(|n| n >= 0),
    };
    if ok {
        return Ok(());
    }
    let expected = match key.kind {
        Kind::Str => "a string",
        Kind::Int => "an integer",
        Kind::Bool => "true or false",
        Kind::Size => "a size (bytes, or a string like \"16MiB\")",
    };
    Err(ConfigError::key(
        key.path(),
        format!("expected {expected}, found {} {value}", value.type_str()),
    ))
}

fn unknown(path: &str) -> ConfigError {
    let hint = match keys::suggest(path) {
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    };
    ConfigError::key(path, format!("unknown key{hint}"))
}

/// Turns a serde type error into one naming the key.
pub(super) fn type_error(e: toml::de::Error) -> ConfigError {
    let msg = e.message().to_string();
    // serde's messages carry the field name but not the section; find the key
    // whose name appears in the message.
    let key = KEYS
        .iter()
        .find(|k| msg.contains(&format!("`{}`", k.name)))
        .map(|k| k.path());
    match key {
        Some(k) => ConfigError::key(k, msg),
        None => ConfigError::general(msg),
    }
}

pub(super) fn overlay_env(
    table: &mut toml::Table,
    env: &HashMap<String, String>,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let mut set = |section: &str, name: &str, value: toml::Value| {
        let target = if section.is_empty() {
            &mut *table
        } else {
            table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("sections are tables (checked before)")
        };
        target.insert(name.to_string(), value);
    };
    if let Some(url) = env.get("DATABASE_URL")
        && !env.contains_key("TANDEM_DATABASE_URL")
    {
        set("database", "url", toml::Value::String(url.clone()));
    }
    for key in KEYS {
        let var = key.env_var();
        let Some(text) = env.get(&var) else { continue };
        let value = match key.kind {
            Kind::Str => toml::Value::String(text.clone()),
            Kind::Size => match text.trim().parse::<i64>() {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => toml::Value::String(text.clone()),
            },
            Kind::Int => toml::Value::Integer(text.trim().parse().map_err(|_| {
                ConfigError::key(key.path(), format!("{var}={text:?} is not an integer"))
            })?),
            Kind::Bool => toml::Value::Boolean(match text.trim() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(ConfigError::key(
                        key.path(),
                        format!("{var}={text:?} is not true or false"),
                    ));
                }
            }),
        };
        set(key.section, key.name, value);
    }
    for var in env.keys() {
        if var.starts_with("TANDEM_")
            && !var.starts_with("TANDEM_TEST_")
            && var != "TANDEM_CONFIG"
            && !KEYS.iter().any(|k| &k.env_var() == var)
        {
            warnings.push(format!(
                "environment variable {var} is not a tandem setting and is ignored"
            ));
        }
    }
    Ok(())
}
