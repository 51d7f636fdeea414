//! The `[events]` section: the event stream's resume window, how far a
//! consumer may fall behind, heartbeats, and the optional webhook.

use std::time::Duration;

use super::ConfigError;
use super::raw::RawEvents;
use super::units::{duration, int_in};

#[derive(Clone, Debug)]
pub struct EventsConfig {
    /// Events kept in memory for resuming with `Last-Event-ID`.
    pub window: usize,
    /// Events a consumer may fall behind before it is told to resync.
    pub buffer: usize,
    /// Interval of the stream's heartbeat comments.
    pub heartbeat: Duration,
    /// A local URL that receives applied batches as JSON POSTs.
    pub webhook_url: Option<String>,
    /// Events per POST at most.
    pub webhook_batch: usize,
    pub webhook_timeout: Duration,
}

pub(super) fn validate(raw: RawEvents) -> Result<EventsConfig, ConfigError> {
    let window = int_in("events.window", raw.window, 1, 1_000_000)? as usize;
    let buffer = int_in("events.buffer", raw.buffer, 16, 1_000_000)? as usize;
    let heartbeat = duration("events.heartbeat", raw.heartbeat)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&heartbeat) {
        return Err(ConfigError::key(
            "events.heartbeat",
            "must be between 1s and 5m",
        ));
    }
    let webhook_url = raw.webhook_url.filter(|s| !s.trim().is_empty());
    if let Some(u) = &webhook_url {
        let ok = u
            .strip_prefix("http://")
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
        if !ok {
            return Err(ConfigError::key(
                "events.webhook_url",
                format!(
                    "{u:?} must be an http:// URL (the app on this host, e.g. http://127.0.0.1:8080/tandem-events)"
                ),
            ));
        }
    }
    let webhook_batch = int_in("events.webhook_batch", raw.webhook_batch, 1, 100_000)? as usize;
    let webhook_timeout = duration("events.webhook_timeout", raw.webhook_timeout)?;
    if webhook_timeout.is_zero() {
        return Err(ConfigError::key(
            "events.webhook_timeout",
            "must be more than 0",
        ));
    }
    Ok(EventsConfig {
        window,
        buffer,
        heartbeat,
        webhook_url,
        webhook_batch,
        webhook_timeout,
    })
}
