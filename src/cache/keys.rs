//! Cache names and the key encoding: how a key becomes a path under
//! `<cache_dir>/<cache>/`.
//!
//! The encoding, which apps may compute themselves (see `docs/api.md`):
//!
//! 1. Percent-encode every byte of the key's UTF-8 except the RFC 3986
//!    unreserved characters `A-Z a-z 0-9 - _ ~`, as `%XX` with upper-case hex.
//!    `.` is encoded too (`%2E`), so no name is ever `.`, `..` or hidden.
//! 2. If the result is longer than 240 characters, insert `+/` after every
//!    240 characters (when more follow): long keys become nested directories
//!    whose names end in `+`, which no encoded name contains otherwise.
//!
//! Python: `re.sub(r'(.{240})(?=.)', r'\1+/', quote(key, safe='').replace('.', '%2E'))`
//!
//! The result never contains `/` except as the `+/` separator, never starts
//! with `.`, and each path segment is at most 241 bytes, so it cannot escape
//! the cache directory and fits every Linux filesystem's name limit.

use std::fmt;

/// Longest key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;

/// Encoded names are split into segments of this many characters.
pub const SEGMENT: usize = 240;

/// Why a cache name or key was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    BadCache(String),
    EmptyKey,
    KeyTooLong(usize),
    KeyHasNul,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::BadCache(name) => write!(
                f,
                "invalid cache name {:?}: cache names match [a-z0-9][a-z0-9_-]{{0,63}}",
                truncate(name, 80)
            ),
            NameError::EmptyKey => f.write_str("the key is empty"),
            NameError::KeyTooLong(n) => {
                write!(
                    f,
                    "the key is {n} bytes long; keys are at most {MAX_KEY_BYTES} bytes"
                )
            }
            NameError::KeyHasNul => f.write_str("the key contains a NUL character"),
        }
    }
}

impl std::error::Error for NameError {}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Checks a cache name: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn check_cache(name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::BadCache(name.to_string()))
    }
}

/// Checks a cache name read from the database: a user cache name, or a
/// reserved one (`_` and a user cache name: `_uploads`, `_versions`,
/// `_jobs`). Rows written other than through tandem's functions are not
/// trusted: a name such as `../x` or `/etc` must never become a path.
pub fn check_stored_cache(name: &str) -> Result<(), NameError> {
    check_cache(name.strip_prefix('_').unwrap_or(name))
        .map_err(|_| NameError::BadCache(name.to_string()))
}

/// Checks a key: 1 to 1024 bytes, no NUL (PostgreSQL text cannot hold one).
pub fn check_key(key: &str) -> Result<(), NameError> {
    if key.is_empty() {
        return Err(NameError::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(NameError::KeyTooLong(key.len()));
    }
    if key.contains('\0') {
        return Err(NameError::KeyHasNul);
    }
    Ok(())
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Encodes a key into its relative path under the cache's directory.
pub fn encode(key: &str) -> String {
    let mut flat = String::with_capacity(key.len() * 3);
    for &b in key.as_bytes() {
        if unreserved(b) {
            flat.push(b as char);
        } else {
            flat.push('%');
            flat.push(HEX[usize::from(b >> 4)] as char);
            flat.push(HEX[usize::from(b & 15)] as char);
        }
    }
    if flat.len() <= SEGMENT {
        return flat;
    }
    let mut out = String::with_capacity(flat.len() + 2 * (flat.len() / SEGMENT));
    let mut rest = flat.as_str();
    while rest.len() > SEGMENT {
        let (head, tail) = rest.split_at(SEGMENT);
        out.push_str(head);
        out.push_str("+/");
        rest = tail;
    }
    out.push_str(rest);
    out
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes a relative path produced by [`encode`]. Anything that [`encode`]
/// would not have produced (stray files, non-canonical escapes, temporary
/// files) gives `None`.
pub fn decode(path: &str) -> Option<String> {
    let mut flat = String::with_capacity(path.len());
    let mut segments = path.split('/').peekable();
    while let Some(seg) = segments.next() {
        if segments.peek().is_some() {
            let body = seg.strip_suffix('+')?;
            if body.len() != SEGMENT {
                return None;
            }
            flat.push_str(body);
        } else {
            if seg.is_empty() || seg.len() > SEGMENT {
                return None;
            }
            flat.push_str(seg);
        }
    }
    let bytes = flat.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = hex_value(*bytes.get(i + 1)?)?;
            let lo = hex_value(*bytes.get(i + 2)?)?;
            let v = (hi << 4) | lo;
            if unreserved(v) {
                return None; // not canonical: would have been written plain
            }
            out.push(v);
            i += 3;
        } else if unreserved(b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let key = String::from_utf8(out).ok()?;
    check_key(&key).ok()?;
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(encode("page-42"), "page-42");
        assert_eq!(encode("user:17"), "user%3A17");
        assert_eq!(encode("a/b"), "a%2Fb");
        assert_eq!(encode("."), "%2E");
        assert_eq!(encode(".."), "%2E%2E");
        assert_eq!(encode("../../etc/passwd"), "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd");
        assert_eq!(encode("%2e%2e"), "%252e%252e");
        assert_eq!(encode("index.html"), "index%2Ehtml");
        assert_eq!(encode("héllo wörld"), "h%C3%A9llo%20w%C3%B6rld");
        assert_eq!(encode("~tilde_x"), "~tilde_x");
    }

    #[test]
    fn long_keys_are_split_into_segments() {
        let key = "k".repeat(500);
        let enc = encode(&key);
        let segs: Vec<&str> = enc.split('/').collect();
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[0].len(), 241);
        assert!(segs[0].ends_with('+'));
        assert_eq!(segs[2].len(), 20);
        assert_eq!(decode(&enc).unwrap(), key);
        // exactly one segment long: no split
        assert_eq!(encode(&"k".repeat(240)), "k".repeat(240));
        // the longest possible key stays well within PATH_MAX
        let worst = "\u{10FFFF}".repeat(256);
        assert_eq!(worst.len(), 1024);
        let enc = encode(&worst);
        assert!(enc.len() < 3200);
        assert!(enc.split('/').all(|s| s.len() <= 241));
        assert_eq!(decode(&enc).unwrap(), worst);
    }

    #[test]
    fn decode_refuses_what_encode_never_writes() {
        for bad in [
            "", ".tmp-1", "a.b", "%2e", "%41", "%4", "%ZZ", "a b", "a+", "a+/b", "/a", "a/", "%00",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
        // a directory segment of the wrong length
        assert_eq!(decode(&format!("{}+/x", "a".repeat(10))), None);
    }

    #[test]
    fn names() {
        assert!(check_cache("pages").is_ok());
        assert!(check_cache("0-x_y").is_ok());
        for bad in ["", "Pages", "-x", "_x", "a/b", "..", "a.b", &"a".repeat(65)] {
            assert!(check_cache(bad).is_err(), "{bad:?}");
        }
        for ok in ["pages", "_uploads", "_versions"] {
            assert!(check_stored_cache(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "_", "__x", "../x", "/etc", "_X", ".tmp", "a/b", "_a/b"] {
            assert!(check_stored_cache(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_key(""), Err(NameError::EmptyKey));
        assert_eq!(check_key("a\0b"), Err(NameError::KeyHasNul));
        assert!(check_key(&"x".repeat(1024)).is_ok());
        assert_eq!(
            check_key(&"x".repeat(1025)),
            Err(NameError::KeyTooLong(1025))
        );
    }

    proptest! {
        #[test]
        fn round_trip(key in "\\PC{1,300}") {
            prop_assume!(check_key(&key).is_ok());
            let enc = encode(&key);
            prop_assert_eq!(decode(&enc), Some(key.clone()));
        }

        #[test]
        fn never_escapes(key in any::<String>()) {
            prop_assume!(check_key(&key).is_ok());
            let enc = encode(&key);
            for seg in enc.split('/') {
                prop_assert!(!seg.is_empty());
                prop_assert!(seg.len() <= SEGMENT + 1);
                prop_assert!(!seg.starts_with('.'));
                prop_assert!(seg != "." && seg != "..");
                prop_assert!(!seg.contains('\0'));
            }
        }

        /// Names found in a directory are untrusted: decoding any string
        /// returns a key or nothing, and a key it returns encodes back to
        /// the same name.
        #[test]
        fn decode_never_panics(name in any::<String>()) {
            if let Some(key) = decode(&name) {
                prop_assert_eq!(encode(&key), name);
            }
        }

        #[test]
        fn injective(a in "\\PC{1,40}", b in "\\PC{1,40}") {
            prop_assume!(a != b);
            prop_assert_ne!(encode(&a), encode(&b));
        }
    }
}
