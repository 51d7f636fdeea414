//! PostgreSQL's `pg_snapshot` (`xmin:xmax:xip,…`) and the visibility rule
//! that the whole consistency model rests on: a transaction `tx` is visible in
//! a snapshot when `tx < xmin`, or `tx < xmax` and `tx` is not in the
//! in-progress list. (`pg_visible_in_snapshot` states the same in SQL.)

use std::fmt;
use std::str::FromStr;

/// A transaction snapshot, as returned by `pg_current_snapshot()`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// In progress at the time: sorted, unique, each in `xmin..xmax`.
    xip: Vec<u64>,
}

/// A snapshot's text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pg_snapshot {text:?}: {why}")]
pub struct SnapshotError {
    text: String,
    why: &'static str,
}

impl Snapshot {
    /// Builds a snapshot, checking PostgreSQL's invariants.
    pub fn new(xmin: u64, xmax: u64, mut xip: Vec<u64>) -> Option<Self> {
        if xmin > xmax {
            return None;
        }
        xip.sort_unstable();
        xip.dedup();
        if xip.iter().any(|&x| x < xmin || x >= xmax) {
            return None;
        }
        Some(Self { xmin, xmax, xip })
    }

    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    pub fn xip(&self) -> &[u64] {
        &self.xip
    }

    /// Whether transaction `tx` had committed (or aborted) when this snapshot
    /// was taken: its effects, if committed, are visible.
    pub fn is_visible(&self, tx: u64) -> bool {
        tx < self.xmin || (tx < self.xmax && self.xip.binary_search(&tx).is_err())
    }

    /// Whether every transaction visible in `other` is visible in `self`.
    pub fn covers(&self, other: &Snapshot) -> bool {
        if self.xmax < other.xmax {
            // Some tx in self.xmax..other.xmax may be visible in other.
            let hidden = (self.xmax..other.xmax).any(|tx| other.is_visible(tx));
            if hidden {
                return false;
            }
        }
        // Transactions in progress for self but finished for other.
        self.xip.iter().all(|&tx| !other.is_visible(tx))
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

impl FromStr for Snapshot {
    type Err = SnapshotError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| SnapshotError {
            text: text.chars().take(200).collect(),
            why,
        };
        let mut parts = text.splitn(3, ':');
        let xmin = parts
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| err("bad xmin"))?;
        let xmax = parts
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| err("bad xmax"))?;
        let list = parts
            .next()
            .ok_or_else(|| err("missing in-progress list"))?;
        let xip = if list.is_empty() {
            Vec::new()
        } else {
            list.split(',')
                .map(|p| p.parse::<u64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| err("bad in-progress list"))?
        };
        Snapshot::new(xmin, xmax, xip).ok_or_else(|| err("values out of order"))
    }
}

impl serde::Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Snapshot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_and_format() {
        let s: Snapshot = "10:20:12,15".parse().unwrap();
        assert_eq!(s.xmin(), 10);
        assert_eq!(s.xmax(), 20);
        assert_eq!(s.xip(), &[12, 15]);
        assert_eq!(s.to_string(), "10:20:12,15");
        assert_eq!("7:7:".parse::<Snapshot>().unwrap().to_string(), "7:7:");
        for bad in ["", "1", "1:2", "2:1:", "1:5:7", "1:5:x", "a:b:", "1:5:0"] {
            assert!(bad.parse::<Snapshot>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn visibility() {
        let s: Snapshot = "10:20:12,15".parse().unwrap();
        assert!(s.is_visible(9));
        assert!(s.is_visible(10));
        assert!(s.is_visible(11));
        assert!(!s.is_visible(12));
        assert!(!s.is_visible(15));
        assert!(s.is_visible(19));
        assert!(!s.is_visible(20));
        assert!(!s.is_visible(1000));
    }

    fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
        (
            0u64..50,
            0u64..20,
            proptest::collection::vec(0u64..20, 0..6),
        )
            .prop_map(|(xmin, width, offsets)| {
                let xmax = xmin + width;
                let xip = offsets
                    .into_iter()
                    .filter(|o| *o < width)
                    .map(|o| xmin + o)
                    .collect();
                Snapshot::new(xmin, xmax, xip).unwrap()
            })
    }

    proptest! {
        #[test]
        fn text_round_trip(s in arb_snapshot()) {
            prop_assert_eq!(s.to_string().parse::<Snapshot>().unwrap(), s);
        }

        /// Snapshot text comes from disk and the database: any string parses
        /// or is refused, never panics.
        #[test]
        fn parsing_never_panics(text in any::<String>(), digits in "[0-9:,]{0,40}") {
            let _ = text.parse::<Snapshot>();
            if let Ok(s) = digits.parse::<Snapshot>() {
                prop_assert_eq!(s.to_string().parse::<Snapshot>().unwrap(), s);
            }
        }

        /// `covers` agrees with checking visibility transaction by transaction.
        #[test]
        fn covers_matches_brute_force(a in arb_snapshot(), b in arb_snapshot()) {
            let brute = (0..100).all(|tx| !b.is_visible(tx) || a.is_visible(tx));
            prop_assert_eq!(a.covers(&b), brute);
        }
    }
}
