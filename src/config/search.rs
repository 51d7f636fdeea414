//! The `[search]` section and its `[[search.index]]` tables: which caches
//! are indexed, and how each JSON value becomes a search document. Errors
//! name the index and the field (`search.index[pages].fields[title].type`).

use std::time::Duration;

use super::ConfigError;
use super::raw::RawSearch;
use super::units::{duration, int_in, size};
use crate::cache::keys::check_cache;

/// A field's value type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// Tokenized full text.
    Text,
    /// One exact term (tags, ids, categories).
    String,
    I64,
    F64,
    /// RFC 3339 text or Unix seconds.
    Date,
    Bool,
}

impl FieldKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldKind::Text => "text",
            FieldKind::String => "string",
            FieldKind::I64 => "i64",
            FieldKind::F64 => "f64",
            FieldKind::Date => "date",
            FieldKind::Bool => "bool",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "text" => FieldKind::Text,
            "string" => FieldKind::String,
            "i64" => FieldKind::I64,
            "f64" => FieldKind::F64,
            "date" => FieldKind::Date,
            "bool" => FieldKind::Bool,
            _ => return None,
        })
    }
}

/// How a text field is split into terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    /// Words, lowercased (tantivy's `default`).
    Default,
    /// Words, lowercased, English stemming (tantivy's `en_stem`).
    EnStem,
    /// Words, lowercased, English stop words left out, English stemming
    /// (what PostgreSQL's `english` configuration does); registered by
    /// tandem as `english`.
    English,
}

impl Tokenizer {
    /// The tokenizer's name in tantivy's registry.
    pub fn tantivy_name(self) -> &'static str {
        match self {
            Tokenizer::Default => "default",
            Tokenizer::EnStem => "en_stem",
            Tokenizer::English => "english",
        }
    }
}

/// One field of an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    pub name: String,
    /// JSON pointer into the cached value (RFC 6901; `""` is the whole value).
    pub pointer: String,
    pub kind: FieldKind,
    pub stored: bool,
    /// Kept in a column: sortable, and usable in range filters quickly.
    pub fast: bool,
    /// Counted per value in search answers.
    pub facet: bool,
    pub tokenizer: Tokenizer,
}

/// One `[[search.index]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexSpec {
    pub name: String,
    /// The cache it follows.
    pub cache: String,
    pub fields: Vec<FieldSpec>,
}

impl IndexSpec {
    /// A text that changes whenever the index's schema would: an index
    /// written under another fingerprint is rebuilt.
    pub fn fingerprint(&self) -> String {
        let mut s = format!("v1;cache={};", self.cache);
        for f in &self.fields {
            s.push_str(&format!(
                "{}|{}|{}|{}|{}|{}|{};",
                f.name,
                f.pointer,
                f.kind.as_str(),
                f.stored,
                f.fast,
                f.facet,
                f.tokenizer.tantivy_name()
            ));
        }
        s
    }
}

/// The validated `[search]` section.
#[derive(Clone, Debug)]
pub struct SearchConfig {
    /// Longest time between an applied change and its commit to the index.
    pub commit_interval: Duration,
    /// Largest `limit` a search may ask for.
    pub max_limit: usize,
    /// Largest `offset` a search may ask for.
    pub max_offset: usize,
    /// Memory for each index writer's in-progress segment.
    pub writer_memory: u64,
    pub indexes: Vec<IndexSpec>,
}

pub(super) fn validate(raw: RawSearch) -> Result<SearchConfig, ConfigError> {
    let commit_interval = duration("search.commit_interval", raw.commit_interval)?;
    if !(Duration::from_millis(1)..=Duration::from_secs(60)).contains(&commit_interval) {
        return Err(ConfigError::key(
            "search.commit_interval",
            "must be between 1ms and 60s",
        ));
    }
    let max_limit = int_in("search.max_limit", raw.max_limit, 1, 10_000)? as usize;
    let max_offset = int_in("search.max_offset", raw.max_offset, 1, 1_000_000)? as usize;
    let writer_memory = size("search.writer_memory", raw.writer_memory)?;
    if !((16 << 20)..=(4u64 << 30)).contains(&writer_memory) {
        return Err(ConfigError::key(
            "search.writer_memory",
            "must be between 16MiB and 4GiB",
        ));
    }
    let mut indexes: Vec<IndexSpec> = Vec::new();
    for (i, t) in raw.index.iter().enumerate() {
        let spec = parse_index(i, t)?;
        if indexes.iter().any(|o| o.name == spec.name) {
            return Err(ConfigError::key(
                format!("search.index[{}].name", spec.name),
                "is used by another index",
            ));
        }
        indexes.push(spec);
    }
    Ok(SearchConfig {
        commit_interval,
        max_limit,
        max_offset,
        writer_memory,
        indexes,
    })
}

fn check_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn get_str(
    t: &toml::Table,
    key: &str,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<String>, ConfigError> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ConfigError::key(at(key), "must be a string")),
    }
}

fn get_bool(
    t: &toml::Table,
    key: &str,
    default: bool,
    at: &dyn Fn(&str) -> String,
) -> Result<bool, ConfigError> {
    match t.get(key) {
        None => Ok(default),
        Some(toml::Value::Boolean(b)) => Ok(*b),
        Some(_) => Err(ConfigError::key(at(key), "must be true or false")),
    }
}

fn only_known(
    t: &toml::Table,
    known: &[&str],
    at: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    for k in t.keys() {
        if !known.contains(&k.as_str()) {
            return Err(ConfigError::key(
                at(k),
                format!("unknown key (known: {})", known.join(", ")),
            ));
        }
    }
    Ok(())
}

fn parse_index(i: usize, t: &toml::Table) -> Result<IndexSpec, ConfigError> {
    let label = match t.get("name").and_then(|v| v.as_str()) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => i.to_string(),
    };
    let at = |k: &str| format!("search.index[{label}].{k}");
    only_known(t, &["name", "cache", "fields"], &at)?;
    let name =
        get_str(t, "name", &at)?.ok_or_else(|| ConfigError::key(at("name"), "is required"))?;
    if !check_name(&name.replace('-', "_")) {
        return Err(ConfigError::key(
            at("name"),
            "must be 1 to 64 letters, digits, '_' or '-', starting with a letter",
        ));
    }
    let cache = get_str(t, "cache", &at)?.unwrap_or_else(|| name.clone());
    if check_cache(&cache).is_err() {
        return Err(ConfigError::key(
            at("cache"),
            format!("{cache:?} is not a cache name ([a-z0-9][a-z0-9_-]{{0,63}})"),
        ));
    }
    let Some(list) = t.get("fields") else {
        return Err(ConfigError::key(
            at("fields"),
            "is required (at least one field)",
        ));
    };
    let Some(list) = list.as_array().filter(|a| !a.is_empty()) else {
        return Err(ConfigError::key(
            at("fields"),
            "must be a non-empty array of tables",
        ));
    };
    let mut fields: Vec<FieldSpec> = Vec::new();
    for (j, v) in list.iter().enumerate() {
        let Some(ft) = v.as_table() else {
            return Err(ConfigError::key(
                format!("search.index[{label}].fields[{j}]"),
                "must be a table",
            ));
        };
        let f = parse_field(&label, j, ft)?;
        if fields.iter().any(|o| o.name == f.name) {
            return Err(ConfigError::key(
                format!("search.index[{label}].fields[{}].name", f.name),
                "is used by another field of this index",
            ));
        }
        fields.push(f);
    }
    Ok(IndexSpec {
        name,
        cache,
        fields,
    })
}

fn parse_field(index: &str, j: usize, t: &toml::Table) -> Result<FieldSpec, ConfigError> {
    let label = match t.get("name").and_then(|v| v.as_str()) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => j.to_string(),
    };
    let at = |k: &str| format!("search.index[{index}].fields[{label}].{k}");
    only_known(
        t,
        &[
            "name",
            "pointer",
            "type",
            "stored",
            "fast",
            "facet",
            "tokenizer",
        ],
        &at,
    )?;
    let name =
        get_str(t, "name", &at)?.ok_or_else(|| ConfigError::key(at("name"), "is required"))?;
    if !check_name(&name) {
        return Err(ConfigError::key(
            at("name"),
            "must be 1 to 64 letters, digits or '_', starting with a letter",
        ));
    }
    let pointer = get_str(t, "pointer", &at)?.unwrap_or_else(|| format!("/{name}"));
    if !(pointer.is_empty() || pointer.starts_with('/')) {
        return Err(ConfigError::key(
            at("pointer"),
            format!("{pointer:?} is not a JSON pointer (it starts with '/', like \"/title\")"),
        ));
    }
    let kind_text =
        get_str(t, "type", &at)?.ok_or_else(|| ConfigError::key(at("type"), "is required"))?;
    let kind = FieldKind::parse(&kind_text).ok_or_else(|| {
        ConfigError::key(
            at("type"),
            format!("{kind_text:?} is not one of text, string, i64, f64, date, bool"),
        )
    })?;
    let stored = get_bool(t, "stored", true, &at)?;
    let fast = get_bool(t, "fast", false, &at)?;
    let facet = get_bool(t, "facet", false, &at)?;
    if fast && kind == FieldKind::Text {
        return Err(ConfigError::key(
            at("fast"),
            "text fields cannot be fast (sort on a `string` copy of the value instead)",
        ));
    }
    if facet && !matches!(kind, FieldKind::String | FieldKind::I64 | FieldKind::Bool) {
        return Err(ConfigError::key(
            at("facet"),
            format!("facets are counted for string, i64 and bool fields, not {kind_text}"),
        ));
    }
    let tokenizer = match get_str(t, "tokenizer", &at)?.as_deref() {
        None | Some("default") => Tokenizer::Default,
        Some("en_stem") if kind == FieldKind::Text => Tokenizer::EnStem,
        Some("english") if kind == FieldKind::Text => Tokenizer::English,
        Some(_) if kind != FieldKind::Text => {
            return Err(ConfigError::key(
                at("tokenizer"),
                "applies to text fields only",
            ));
        }
        Some(other) => {
            return Err(ConfigError::key(
                at("tokenizer"),
                format!("{other:?} is not \"default\", \"en_stem\" or \"english\""),
            ));
        }
    };
    Ok(FieldSpec {
        name,
        pointer,
        kind,
        stored,
        fast,
        facet,
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SearchConfig, ConfigError> {
        let t: toml::Table = toml::from_str(text).unwrap();
        let index = t["index"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_table().unwrap().clone())
            .collect();
        validate(RawSearch {
            index,
            ..RawSearch::default()
        })
    }

    #[test]
    fn a_valid_index() {
        let c = parse(
            r#"
            [[index]]
            name = "pages"
            fields = [
              { name = "title", type = "text", tokenizer = "en_stem" },
              { name = "tag", pointer = "/meta/tag", type = "string", fast = true, facet = true },
              { name = "year", type = "i64", fast = true, stored = false },
            ]
            "#,
        )
        .unwrap();
        let i = &c.indexes[0];
        assert_eq!(i.cache, "pages");
        assert_eq!(i.fields[0].pointer, "/title");
        assert_eq!(i.fields[0].tokenizer, Tokenizer::EnStem);
        assert!(i.fields[1].facet && i.fields[1].fast);
        assert!(!i.fields[2].stored);
        assert_eq!(c.commit_interval, Duration::from_millis(200));
    }

    #[test]
    fn errors_name_the_index_and_field() {
        let cases = [
            (
                r#"[[index]]
                name = "p"
                fields = [{ name = "t", type = "txt" }]"#,
                "search.index[p].fields[t].type",
            ),
            (
                r#"[[index]]
                name = "p"
                fields = [{ name = "t", type = "text", fast = true }]"#,
                "search.index[p].fields[t].fast",
            ),
            (
                r#"[[index]]
                name = "p"
                fields = [{ name = "t", type = "f64", facet = true }]"#,
                "search.index[p].fields[t].facet",
            ),
            (
                r#"[[index]]
                name = "p"
                fields = [{ name = "t", type = "string", tokenizer = "en_stem" }]"#,
                "search.index[p].fields[t].tokenizer",
            ),
            (
                r#"[[index]]
                name = "p"
                fields = [{ name = "t", type = "text", pointer = "title" }]"#,
                "search.index[p].fields[t].pointer",
            ),
            (
                r#"[[index]]
                name = "p"
                fields = [{ name = "t", type = "text" }, { name = "t", type = "bool" }]"#,
                "search.index[p].fields[t].name",
            ),
            (
                r#"[[index]]
                name = "p"
                cache = "Bad Cache"
                fields = [{ name = "t", type = "text" }]"#,
                "search.index[p].cache",
            ),
            (
                r#"[[index]]
                name = "p"
                fields = []"#,
                "search.index[p].fields",
            ),
            (
                r#"[[index]]
                name = "p"
                colour = "red"
                fields = [{ name = "t", type = "text" }]"#,
                "search.index[p].colour",
            ),
            (
                r#"[[index]]
                name = "_p"
                fields = [{ name = "t", type = "text" }]"#,
                "search.index[_p].name",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
    }

    #[test]
    fn fingerprint_follows_the_schema() {
        let a = parse(
            r#"[[index]]
            name = "p"
            fields = [{ name = "t", type = "text" }]"#,
        )
        .unwrap();
        let b = parse(
            r#"[[index]]
            name = "p"
            fields = [{ name = "t", type = "text", tokenizer = "en_stem" }]"#,
        )
        .unwrap();
        assert_ne!(a.indexes[0].fingerprint(), b.indexes[0].fingerprint());
        assert_eq!(a.indexes[0].fingerprint(), a.indexes[0].fingerprint());
    }
}
