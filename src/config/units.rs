//! Parsing of the human-friendly units used in the config: durations
//! (`"500ms"`, `"2s"`, `"2d"`) and byte sizes (`"16MiB"`, `1048576`), and
//! reading a key's value of each kind with its default.

use std::time::Duration;

use super::ConfigError;
use super::raw::SizeValue;

/// Parses a duration such as `250ms`, `2s`, `5m`, `2d` or `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration (write e.g. \"2s\", \"500ms\", \"2d\")".into());
    }
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Formats a duration the way the config accepts it.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Parses a byte size: a plain integer (bytes) or a number with a unit
/// (`B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`; the `KB` forms are powers of
/// 1000, the `KiB` forms powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected e.g. 1048576 or \"16MiB\""))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?} in {text:?}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// The documented default of `key` (`section.name`), from the key table,
/// so that a default is written in one place only.
fn default_of(key: &str) -> &'static str {
    let found = super::keys::KEYS.iter().find(|k| k.path() == key);
    found
        .unwrap_or_else(|| panic!("{key} is not in the key table"))
        .default
}

/// A key's duration, or its documented default.
pub(super) fn duration(key: &str, value: Option<String>) -> Result<Duration, ConfigError> {
    let text = value.as_deref().unwrap_or_else(|| default_of(key));
    parse_duration(text).map_err(|e| ConfigError::key(key, e))
}

/// A key's byte size, or its documented default.
pub(super) fn size(key: &str, value: Option<SizeValue>) -> Result<u64, ConfigError> {
    match value {
        None => parse_size(default_of(key)).map_err(|e| ConfigError::key(key, e)),
        Some(SizeValue::Int(n)) => Ok(n),
        Some(SizeValue::Text(t)) => parse_size(&t).map_err(|e| ConfigError::key(key, e)),
    }
}

/// A key's `true`/`false`, or its documented default.
pub(super) fn flag(key: &str, value: Option<bool>) -> bool {
    value.unwrap_or_else(|| default_of(key) == "true")
}

/// A key's integer within `min..=max`, or its documented default.
pub(super) fn int_in(
    key: &str,
    value: Option<i64>,
    min: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    let v = match value {
        Some(v) => v,
        None => default_of(key)
            .parse()
            .map_err(|e| ConfigError::key(key, format!("default: {e}")))?,
    };
    if v < min || v > max {
        return Err(ConfigError::key(
            key,
            format!("{v} is out of range {min}..={max}"),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::super::keys::{KEYS, Kind};
    use super::*;

    #[test]
    fn every_typed_default_in_the_key_table_parses() {
        for k in KEYS {
            let ok = match k.kind {
                Kind::Size => parse_size(k.default).is_ok(),
                Kind::Int => k.default.parse::<i64>().is_ok(),
                Kind::Bool => matches!(k.default, "true" | "false"),
                Kind::Str => true,
            };
            assert!(ok, "{}: default {:?}", k.path(), k.default);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("2d").unwrap(),
            Duration::from_secs(2 * 86400)
        );
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("16 MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("2KB").unwrap(), 2000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert!(parse_size("18446744073709551615GiB").is_err());
    }
}
