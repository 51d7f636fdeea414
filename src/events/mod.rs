//! The event stream for app processes: every change this host has applied,
//! as the applier commits it, for `GET /v1/events` (Server-Sent Events) and
//! the optional webhook ([`webhook`]).
//!
//! The [`Hub`] numbers events (`<epoch>-<seq>`: the epoch changes with each
//! start of the process), keeps the last `events.window` of them for
//! resuming with `Last-Event-ID`, and hands them to consumers through a
//! bounded broadcast channel: publishing never waits, and a consumer that
//! falls behind by more than `events.buffer` events is told to resync
//! instead of slowing anything down.
//!
//! Types: `change` (a key of an app cache put or deleted, or a cache
//! cleared), `upload` (registered or withdrawn), `version` (a version
//! counter set), `job` (a job run finished, anywhere in the cluster) and
//! `resync` (the consumer must drop what it holds in memory).

pub mod metrics;
pub mod webhook;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::cache::versions::VERSIONS_CACHE;
use crate::uploads::UPLOADS_CACHE;
use metrics::EventMetrics;

/// The reserved cache where finished job runs are announced.
pub const JOBS_CACHE: &str = "_jobs";

/// The event types, for `?type=`.
pub const TYPES: &[&str] = &["change", "upload", "version", "job", "resync"];

/// One event, its data serialised once for every consumer.
#[derive(Clone, Debug)]
pub struct Event {
    pub seq: u64,
    pub kind: &'static str,
    /// The app cache a `change` is about.
    pub cache: Option<Arc<str>>,
    /// The `data:` line (JSON, one line).
    pub data: Arc<str>,
}

/// An event the applier met, published when its batch commits.
#[derive(Debug)]
pub struct Pending {
    kind: &'static str,
    cache: Option<String>,
    fields: Map<String, Value>,
}

impl Pending {
    /// The event for a key put (`value` given) or deleted in `cache`;
    /// `None` for reserved caches that announce nothing.
    pub fn for_key(cache: &str, key: &str, value: Option<&[u8]>) -> Option<Self> {
        let mut fields = Map::new();
        let kind = match cache {
            VERSIONS_CACHE => {
                fields.insert("name".into(), json!(key));
                let v = value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.trim().parse::<i64>().ok());
                fields.insert("value".into(), json!(v));
                "version"
            }
            UPLOADS_CACHE => {
                fields.insert("upload".into(), json!(key));
                let op = if value.is_some() {
                    "registered"
                } else {
                    "withdrawn"
                };
                fields.insert("op".into(), json!(op));
                "upload"
            }
            JOBS_CACHE => {
                let run: Value = value
                    .and_then(|v| serde_json::from_slice(v).ok())
                    .unwrap_or(Value::Null);
                if run.is_null() {
                    return None;
                }
                fields.insert("job".into(), json!(key));
                fields.insert("run".into(), run);
                "job"
            }
            c if c.starts_with('_') => return None,
            _ => {
                fields.insert("cache".into(), json!(cache));
                fields.insert("key".into(), json!(key));
                let op = if value.is_some() { "put" } else { "delete" };
                fields.insert("op".into(), json!(op));
                "change"
            }
        };
        Some(Self {
            kind,
            cache: (kind == "change").then(|| cache.to_string()),
            fields,
        })
    }

    /// A cache cleared.
    pub fn cleared(cache: &str) -> Option<Self> {
        if cache.starts_with('_') {
            return None;
        }
        let mut fields = Map::new();
        fields.insert("cache".into(), json!(cache));
        fields.insert("op".into(), json!("clear"));
        Some(Self {
            kind: "change",
            cache: Some(cache.to_string()),
            fields,
        })
    }

    fn resync(reason: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("reason".into(), json!(reason));
        Self {
            kind: "resync",
            cache: None,
            fields,
        }
    }
}

/// What a new consumer starts with.
pub struct Subscription {
    /// Events to send first: the missed ones from the window, or a single
    /// `resync` when they are no longer there.
    pub backlog: Vec<Event>,
    pub live: broadcast::Receiver<Event>,
}

struct Window {
    events: VecDeque<Event>,
    next_seq: u64,
}

/// The hub every consumer subscribes to.
pub struct Hub {
    epoch: String,
    capacity: usize,
    window: Mutex<Window>,
    tx: broadcast::Sender<Event>,
    closed: CancellationToken,
    pub metrics: EventMetrics,
}

impl Hub {
    /// `window`: events kept for resuming; `buffer`: how far a consumer may
    /// fall behind before it is told to resync.
    pub fn new(window: usize, buffer: usize, metrics: EventMetrics) -> Self {
        let epoch = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0)
        );
        let (tx, _) = broadcast::channel(buffer.max(1));
        Self {
            epoch,
            capacity: window.max(1),
            window: Mutex::new(Window {
                events: VecDeque::new(),
                next_seq: 1,
            }),
            tx,
            closed: CancellationToken::new(),
            metrics,
        }
    }

    /// Ends every stream (at shutdown, after the last batch).
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Completes when the hub is closed.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }

    /// The id of an event, as sent in `id:`.
    pub fn id_of(&self, seq: u64) -> String {
        format!("{}-{seq}", self.epoch)
    }

    /// Publishes a committed batch (`position`: the applied position after
    /// it). Never waits for consumers.
    pub fn publish(&self, batch: Vec<Pending>, position: Option<&str>) {
        if batch.is_empty() {
            return;
        }
        let mut w = self.window.lock().expect("not poisoned");
        for p in batch {
            let seq = w.next_seq;
            w.next_seq += 1;
            let mut fields = p.fields;
            fields.insert("seq".into(), json!(seq));
            fields.insert("type".into(), json!(p.kind));
            if let Some(pos) = position {
                fields.insert("position".into(), json!(pos));
            }
            let event = Event {
                seq,
                kind: p.kind,
                cache: p.cache.map(Arc::from),
                data: Arc::from(Value::Object(fields).to_string()),
            };
            if w.events.len() == self.capacity {
                w.events.pop_front();
            }
            w.events.push_back(event.clone());
            // No receiver is not an error: nobody is listening.
            let _ = self.tx.send(event);
            self.metrics.published.with_label_values(&[p.kind]).inc();
        }
    }

    /// Tells every consumer to drop its memory (the cache was rebuilt).
    pub fn resync_all(&self, reason: &str) {
        self.publish(vec![Pending::resync(reason)], None);
    }

    /// A `resync` event for one consumer (not published), numbered as the
    /// newest event.
    pub fn resync_event(&self, reason: &str) -> Event {
        let seq = self.window.lock().expect("not poisoned").next_seq - 1;
        self.resync_at(reason, seq)
    }

    /// A `resync` event for one consumer, numbered `seq`.
    pub fn resync_at(&self, reason: &str, seq: u64) -> Event {
        self.metrics.resyncs.with_label_values(&[reason]).inc();
        Event {
            seq,
            kind: "resync",
            cache: None,
            data: Arc::from(json!({"type": "resync", "reason": reason, "seq": seq}).to_string()),
        }
    }

    /// The next event for a consumer (`None`: the hub is gone). After the
    /// consumer fell behind, a `resync` comes first, numbered just before
    /// the event it gets next, so that ids only grow and resuming after the
    /// resync misses nothing.
    pub async fn next(&self, live: &mut broadcast::Receiver<Event>) -> Option<Vec<Event>> {
        let mut lagged = false;
        loop {
            match live.recv().await {
                Ok(e) if lagged => return Some(vec![self.resync_at("lagged", e.seq - 1), e]),
                Ok(e) => return Some(vec![e]),
                Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Like [`Hub::next`] without waiting (`None`: nothing has arrived).
    pub fn try_next(&self, live: &mut broadcast::Receiver<Event>) -> Option<Vec<Event>> {
        use broadcast::error::TryRecvError;
        let mut lagged = false;
        loop {
            match live.try_recv() {
                Ok(e) if lagged => return Some(vec![self.resync_at("lagged", e.seq - 1), e]),
                Ok(e) => return Some(vec![e]),
                Err(TryRecvError::Lagged(_)) => lagged = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) if lagged => {
                    return Some(vec![self.resync_event("lagged")]);
                }
                Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
            }
        }
    }

    /// Subscribes, resuming after `last_event_id` when given.
    pub fn subscribe(&self, last_event_id: Option<&str>) -> Subscription {
        let w = self.window.lock().expect("not poisoned");
        // Subscribing under the lock: nothing published is missed or doubled.
        let live = self.tx.subscribe();
        let Some(last) = last_event_id.map(str::trim).filter(|s| !s.is_empty()) else {
            return Subscription {
                backlog: Vec::new(),
                live,
            };
        };
        let newest = w.next_seq - 1;
        let oldest = w.events.front().map_or(w.next_seq, |e| e.seq);
        let resume = last
            .rsplit_once('-')
            .filter(|(epoch, _)| *epoch == self.epoch)
            .and_then(|(_, seq)| seq.parse::<u64>().ok());
        let backlog = match resume {
            // Ids of another process (a restart) or of the future.
            None => None,
            Some(seq) if seq > newest => None,
            Some(seq) if seq + 1 < oldest => Some(Err("window")),
            // Seqs in the window are contiguous: start right after `seq`.
            Some(seq) => Some(Ok(w
                .events
                .range((seq + 1 - oldest) as usize..)
                .cloned()
                .collect::<Vec<_>>())),
        };
        drop(w);
        // Numbered with the newest id read under the lock: events published
        // since then come after it in `live`.
        let backlog = match backlog {
            Some(Ok(events)) => events,
            Some(Err(reason)) => vec![self.resync_at(reason, newest)],
            None => vec![self.resync_at("restart", newest)],
        };
        Subscription { backlog, live }
    }

    /// Subscribes to what comes next, starting with a `resync` (`reason`)
    /// for a consumer that may hold state from before (the webhook).
    pub fn subscribe_resync(&self, reason: &str) -> Subscription {
        let w = self.window.lock().expect("not poisoned");
        let live = self.tx.subscribe();
        let newest = w.next_seq - 1;
        drop(w);
        Subscription {
            backlog: vec![self.resync_at(reason, newest)],
            live,
        }
    }
}

/// Which events a consumer wants (`?cache=` and `?type=`).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub caches: Option<Vec<String>>,
    pub types: Option<Vec<String>>,
}

impl Filter {
    /// Parses comma-separated lists; an unknown type is an error.
    pub fn parse(cache: Option<&str>, types: Option<&str>) -> Result<Self, String> {
        let list = |s: Option<&str>| {
            s.map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|v| !v.is_empty())
        };
        let types = list(types);
        if let Some(t) = types
            .iter()
            .flatten()
            .find(|t| !TYPES.contains(&t.as_str()))
        {
            return Err(format!(
                "unknown event type {t:?}; types are {}",
                TYPES.join(", ")
            ));
        }
        Ok(Self {
            caches: list(cache),
            types,
        })
    }

    /// Whether the event is sent. `resync` always is; `?cache=` keeps only
    /// the `change` events of those caches (other types pass unless `?type=`
    /// leaves them out).
    pub fn wants(&self, e: &Event) -> bool {
        if e.kind == "resync" {
            return true;
        }
        if let Some(types) = &self.types
            && !types.iter().any(|t| t == e.kind)
        {
            return false;
        }
        match (&self.caches, &e.cache) {
            (Some(caches), Some(c)) => caches.iter().any(|x| **x == **c),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(window: usize, buffer: usize) -> Hub {
        Hub::new(
            window,
            buffer,
            EventMetrics::new(&prometheus::Registry::new()),
        )
    }

    fn put(key: &str) -> Pending {
        Pending::for_key("pages", key, Some(b"x")).unwrap()
    }

    #[test]
    fn events_carry_their_fields() {
        let h = hub(10, 10);
        let mut s = h.subscribe(None);
        h.publish(
            vec![
                put("a"),
                Pending::for_key("pages", "b", None).unwrap(),
                Pending::cleared("pages").unwrap(),
                Pending::for_key("_versions", "menu", Some(b"7")).unwrap(),
                Pending::for_key("_uploads", "0123", None).unwrap(),
            ],
            Some("10:12:"),
        );
        assert!(Pending::for_key("_other", "x", Some(b"1")).is_none());
        assert!(Pending::for_key("_jobs", "x", Some(b"not json")).is_none());
        let mut got = Vec::new();
        while let Ok(e) = s.live.try_recv() {
            got.push(serde_json::from_str::<Value>(&e.data).unwrap());
        }
        assert_eq!(got.len(), 5);
        assert_eq!(got[0]["type"], "change");
        assert_eq!(got[0]["op"], "put");
        assert_eq!(got[0]["position"], "10:12:");
        assert_eq!(got[1]["op"], "delete");
        assert_eq!(got[2]["op"], "clear");
        assert!(got[2].get("key").is_none());
        assert_eq!(got[3]["type"], "version");
        assert_eq!(got[3]["value"], 7);
        assert_eq!(got[4]["type"], "upload");
        assert_eq!(got[4]["op"], "withdrawn");
        assert_eq!(got[4]["seq"], 5);
    }

    #[test]
    fn resumes_within_the_window_and_resyncs_beyond() {
        let h = hub(3, 100);
        h.publish((0..5).map(|i| put(&i.to_string())).collect(), None);
        // The window holds 3, 4 and 5.
        let s = h.subscribe(Some(&h.id_of(3)));
        assert_eq!(
            s.backlog.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        let s = h.subscribe(Some(&h.id_of(2)));
        assert_eq!(s.backlog.len(), 3, "2 is just before the window: no gap");
        let s = h.subscribe(Some(&h.id_of(1)));
        assert_eq!(s.backlog.len(), 1);
        assert_eq!(s.backlog[0].kind, "resync");
        assert!(s.backlog[0].data.contains("window"));
        let s = h.subscribe(Some(&h.id_of(5)));
        assert!(s.backlog.is_empty());
        for other in ["abc-3", "garbage", &h.id_of(99)] {
            let s = h.subscribe(Some(other));
            assert_eq!(s.backlog.len(), 1, "{other}");
            assert!(s.backlog[0].data.contains("restart"));
            assert_eq!(s.backlog[0].seq, 5, "numbered as the newest event");
        }
        let s = h.subscribe_resync("restart");
        assert_eq!(s.backlog[0].seq, 5);
    }

    #[test]
    fn a_slow_consumer_lags_without_blocking_the_publisher() {
        let h = hub(10, 4);
        let mut s = h.subscribe(None);
        h.publish((0..20).map(|i| put(&i.to_string())).collect(), None);
        let next = h.try_next(&mut s.live).unwrap();
        assert_eq!(next[0].kind, "resync");
        assert_eq!((next[0].seq, next[1].seq), (16, 17), "ids only grow");
        assert_eq!(h.try_next(&mut s.live).unwrap()[0].seq, 18);
    }

    #[test]
    fn filters() {
        let f = Filter::parse(Some("pages, menus"), Some("change,resync")).unwrap();
        let h = hub(10, 10);
        let mut s = h.subscribe(None);
        h.publish(
            vec![
                put("a"),
                Pending::for_key("news", "b", Some(b"1")).unwrap(),
                Pending::for_key("_versions", "v", Some(b"1")).unwrap(),
            ],
            None,
        );
        let mut wanted = Vec::new();
        while let Ok(e) = s.live.try_recv() {
            if f.wants(&e) {
                wanted.push(e.seq);
            }
        }
        assert_eq!(wanted, vec![1]);
        assert!(f.wants(&h.resync_event("lagged")));
        assert!(Filter::parse(None, Some("change,bogus")).is_err());
        let all = Filter::parse(Some(""), None).unwrap();
        assert!(all.caches.is_none());
    }
}
