//! The statements run on the shared connection, rendered once for the
//! configured schema.

use super::render;

/// Rendered SQL for the shared connection.
#[derive(Debug, Clone)]
pub struct Queries {
    pub put: String,
    pub put_ack: String,
    pub delete: String,
    pub delete_ack: String,
    pub clear: String,
    pub clear_ack: String,
    pub batch: String,
    pub batch_ack: String,
    pub ack_request: String,
    pub heartbeat: String,
    pub stopped: String,
    pub prune: String,
    pub hosts: String,
    pub live_positions: String,
    pub request_resync: String,
}

impl Queries {
    pub fn new(schema: &str) -> Self {
        let r = |t: &str| render(t, schema);
        let with_ack = |call: &str| {
            r(&format!(
                "SELECT {call}::text, {{schema}}.request_ack()::text"
            ))
        };
        let put = "{schema}.put($1::text, $2::text, $3::bytea, $4::text)";
        let delete = "{schema}.delete($1::text, $2::text)";
        let clear = "{schema}.clear($1::text)";
        let batch = "{schema}.batch($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[])";
        Self {
            put: r(&format!("SELECT {put}::text")),
            put_ack: with_ack(put),
            delete: r(&format!("SELECT {delete}::text")),
            delete_ack: with_ack(delete),
            clear: r(&format!("SELECT {clear}::text")),
            clear_ack: with_ack(clear),
            batch: r(&format!("SELECT {batch}::text")),
            batch_ack: with_ack(batch),
            ack_request: r("SELECT pg_notify('{channel}_ackreq', $1::text)"),
            heartbeat: r(
                "SELECT resync, pending_rows, oldest_xact_age, live_hosts, stale_hosts, stopped_hosts \
                          FROM {schema}.heartbeat($1::text, $2::text, $3::text, to_timestamp($4::float8), \
                          make_interval(secs => $5::float8), $6::text, $7::bool, $8::float8, $9::int)",
            ),
            stopped: r("SELECT {schema}.stopped($1::text, $2::text)"),
            prune: r("SELECT {schema}.prune(make_interval(secs => $1::float8), \
                      make_interval(secs => $2::float8), $3::int, $4::int)"),
            hosts: r("SELECT id, version, api, \
                        to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                        to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                        extract(epoch FROM now() - heartbeat_at)::float8, \
                        stopped_at IS NOT NULL, applied::text, ready, lag_seconds, pending_rows, \
                        (stopped_at IS NULL AND heartbeat_at > now() - heartbeat_interval * $1::int) \
                      FROM {schema}.hosts ORDER BY id"),
            live_positions: r("SELECT id, applied::text FROM {schema}.hosts \
                               WHERE stopped_at IS NULL AND heartbeat_at > now() - heartbeat_interval * $1::int"),
            request_resync: r(
                "UPDATE {schema}.hosts SET resync_requested = true WHERE id = $1::text RETURNING id",
            ),
        }
    }
}
