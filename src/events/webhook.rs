//! The webhook: applied batches POSTed as JSON to `events.webhook_url` (an
//! app on this host), in order, retried with backoff until delivered. The
//! webhook reads the hub like any stream consumer, so a webhook that is
//! down never slows the applier: when it falls more than `events.buffer`
//! events behind, the missed events are replaced by one `resync` event.
//!
//! Body: `{"host": "<host id>", "events": [{"id": "<epoch>-<seq>", ...}]}`,
//! each event with the fields of its `data:` line in the stream.
//!
//! A batch the endpoint refuses outright (a 4xx other than 408 and 429)
//! [`REFUSED_ATTEMPTS`] times is dropped, logged, and replaced by a
//! `resync` (reason `refused`), so one bad batch cannot stop delivery for
//! good. Anything else (connection errors, timeouts, 5xx) is retried until
//! delivered.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Event, Hub};
use crate::app::App;

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Refusals of one batch after which it is dropped.
pub const REFUSED_ATTEMPTS: u32 = 5;

/// Why a POST did not deliver.
enum Failure {
    /// The endpoint refused the batch itself (a 4xx but 408 and 429).
    Refused(reqwest::StatusCode),
    /// Anything else: worth retrying.
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(s) => write!(f, "answered {s}"),
            Failure::Other(e) => f.write_str(e),
        }
    }
}

/// Delivers events until `cancel` (nothing to do without a webhook URL).
pub async fn run(app: Arc<App>, cancel: CancellationToken) {
    let cfg = &app.config.events;
    let Some(url) = cfg.webhook_url.clone() else {
        // Background tasks live until shutdown.
        cancel.cancelled().await;
        return;
    };
    // No redirects (a 303 would turn the POST into a GET that "delivers"
    // nothing) and no proxy from the environment (the endpoint is local).
    let client = match reqwest::Client::builder()
        .timeout(cfg.webhook_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook's HTTP client; no webhook");
            cancel.cancelled().await;
            return;
        }
    };
    let hub = app.events.clone();
    let m = hub.metrics.clone();
    // The app may hold state from this host's previous run: what was not
    // delivered then is lost, so it starts with a resync.
    let mut sub = hub.subscribe_resync("restart");
    let mut batch: Vec<Event> = std::mem::take(&mut sub.backlog);
    tracing::info!(url = %url, "delivering events to the webhook");
    loop {
        if batch.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = hub.next(&mut sub.live) => match r {
                    Some(events) => batch.extend(events),
                    None => return,
                },
            }
        }
        while batch.len() < cfg.webhook_batch
            && let Some(events) = hub.try_next(&mut sub.live)
        {
            batch.extend(events);
        }
        let mut backoff = BACKOFF_MIN;
        let mut refusals = 0;
        loop {
            let pending = batch.len() + sub.live.len();
            m.webhook_pending.set(pending as i64);
            match post(&client, &url, &app.config.host_id, &hub, &batch).await {
                Ok(()) => {
                    m.webhook_posts.with_label_values(&["ok"]).inc();
                    m.webhook_events.inc_by(batch.len() as u64);
                    batch.clear();
                    m.webhook_pending.set(sub.live.len() as i64);
                    break;
                }
                Err(Failure::Refused(status)) if refusals + 1 >= REFUSED_ATTEMPTS => {
                    m.webhook_posts.with_label_values(&["refused"]).inc();
                    let last = batch.last().map_or(0, |e| e.seq);
                    tracing::error!(url = %url, status = %status, events = batch.len(),
                        first = %hub.id_of(batch.first().map_or(0, |e| e.seq)), last = %hub.id_of(last),
                        "the webhook refused a batch {REFUSED_ATTEMPTS} times; dropping it and sending a resync instead");
                    batch = vec![hub.resync_at("refused", last)];
                    refusals = 0;
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    if matches!(e, Failure::Refused(_)) {
                        refusals += 1;
                    }
                    m.webhook_posts.with_label_values(&["error"]).inc();
                    tracing::warn!(url = %url, error = %e, retry_in = ?backoff, events = batch.len(), "cannot deliver events to the webhook");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    host: &str,
    hub: &Hub,
    batch: &[Event],
) -> Result<(), Failure> {
    let mut body =
        String::with_capacity(64 + batch.iter().map(|e| e.data.len() + 40).sum::<usize>());
    body.push_str("{\"host\":");
    body.push_str(&serde_json::Value::from(host).to_string());
    body.push_str(",\"events\":[");
    for (i, e) in batch.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        // `data` is a JSON object: the id goes in as its first field.
        body.push_str("{\"id\":\"");
        body.push_str(&hub.id_of(e.seq));
        body.push_str("\",");
        body.push_str(e.data.strip_prefix('{').unwrap_or("}"));
    }
    body.push_str("]}");
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| Failure::Other(e.to_string()))?;
    let status = r.status();
    if status.is_success() {
        Ok(())
    } else if status.is_client_error()
        && status != reqwest::StatusCode::REQUEST_TIMEOUT
        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        Err(Failure::Refused(status))
    } else {
        Err(Failure::Other(format!("answered {status}")))
    }
}
