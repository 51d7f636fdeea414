//! `GET /v1/events`: the applied changes as Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;

use super::ApiError;
use crate::app::App;
use crate::events::{Event, Filter, Hub};

#[derive(Deserialize)]
pub struct EventParams {
    cache: Option<String>,
    #[serde(rename = "type")]
    types: Option<String>,
    /// For clients that cannot set the `Last-Event-ID` header.
    last_event_id: Option<String>,
}

/// Counts the stream in `tandem_events_subscribers` while it lives.
struct Connected(Arc<Hub>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.metrics.subscribers.dec();
    }
}

fn sse(hub: &Hub, e: &Event) -> SseEvent {
    SseEvent::default()
        .id(hub.id_of(e.seq))
        .event(e.kind)
        .data(&*e.data)
}

/// Streams every applied change that passes `?cache=` and `?type=`, after
/// the ones missed since `Last-Event-ID` (or a `resync` event when they
/// have left the window). A client that falls too far behind gets a
/// `resync` event and continues from the present.
pub async fn events(
    State(app): State<Arc<App>>,
    q: Result<Query<EventParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(params) = q.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let filter = Filter::parse(params.cache.as_deref(), params.types.as_deref())
        .map_err(|e| ApiError::bad_request("invalid_filter", e))?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(params.last_event_id);
    let hub = app.events.clone();
    let sub = hub.subscribe(last.as_deref());
    hub.metrics.subscribers.inc();
    let guard = Connected(hub.clone());
    let stream = stream(hub, sub.backlog, sub.live, filter, guard);
    Ok(Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(app.config.events.heartbeat)
                .text("heartbeat"),
        )
        .into_response())
}

fn stream(
    hub: Arc<Hub>,
    backlog: Vec<Event>,
    mut live: tokio::sync::broadcast::Receiver<Event>,
    filter: Filter,
    guard: Connected,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream(move |tx| async move {
        let _guard = guard;
        for e in backlog.iter().filter(|e| filter.wants(e)) {
            if tx.send(sse(&hub, e)).await.is_err() {
                return;
            }
        }
        loop {
            let next = tokio::select! {
                _ = hub.closed() => return,
                _ = tx.closed() => return,
                r = hub.next(&mut live) => r,
            };
            let Some(events) = next else { return };
            for e in events.iter().filter(|e| filter.wants(e)) {
                if tx.send(sse(&hub, e)).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// A stream fed by a task through a one-slot channel: the task stops when
/// the client goes away (the receiver is dropped).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(f(tx));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}
