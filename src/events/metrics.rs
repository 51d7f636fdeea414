//! Metrics of the event stream and the webhook.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

use crate::metrics::{counter, counter_vec, int_gauge};

#[derive(Clone)]
pub struct EventMetrics {
    /// Events published, by type.
    pub published: IntCounterVec,
    /// Consumers told to resync, by reason (window, lagged, restart, refused).
    pub resyncs: IntCounterVec,
    /// Event-stream clients connected now.
    pub subscribers: IntGauge,
    /// Webhook POSTs, by outcome (ok, error).
    pub webhook_posts: IntCounterVec,
    /// Events delivered to the webhook.
    pub webhook_events: IntCounter,
    /// Events waiting for delivery to the webhook.
    pub webhook_pending: IntGauge,
}

impl EventMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = Self {
            published: counter_vec(
                registry,
                "tandem_events_published_total",
                "Events published to the event stream, by type.",
                &["type"],
            ),
            resyncs: counter_vec(
                registry,
                "tandem_events_resyncs_total",
                "Event consumers told to resync, by reason (window, lagged, restart, refused).",
                &["reason"],
            ),
            subscribers: int_gauge(
                registry,
                "tandem_events_subscribers",
                "Clients connected to GET /v1/events now.",
            ),
            webhook_posts: counter_vec(
                registry,
                "tandem_events_webhook_posts_total",
                "POSTs of event batches to events.webhook_url, by outcome (ok, error, refused: dropped).",
                &["outcome"],
            ),
            webhook_events: counter(
                registry,
                "tandem_events_webhook_delivered_total",
                "Events delivered to events.webhook_url.",
            ),
            webhook_pending: int_gauge(
                registry,
                "tandem_events_webhook_pending",
                "Events waiting for delivery to events.webhook_url.",
            ),
        };
        for t in super::TYPES {
            m.published.with_label_values(&[t]);
        }
        for r in ["window", "lagged", "restart"] {
            m.resyncs.with_label_values(&[r]);
        }
        for o in ["ok", "error"] {
            m.webhook_posts.with_label_values(&[o]);
        }
        m
    }
}
