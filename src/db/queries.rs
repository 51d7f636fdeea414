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
    pub lease_release: String,
    pub lock_acquire: String,
    pub lock_renew: String,
    pub lock_release: String,
    pub bump: String,
    pub bump_ack: String,
    pub upload_begin: String,
    pub upload_multipart: String,
    pub upload_register: String,
    pub upload_register_ack: String,
    pub upload_abandon: String,
    pub upload_delete: String,
    pub upload_delete_ack: String,
    pub upload_forget: String,
    pub upload_expire: String,
    pub upload_get: String,
    pub upload_backlog: String,
    pub upload_list: String,
    pub claim_run: String,
    pub finish_run: String,
    pub queue_run: String,
    pub take_queued: String,
    pub abandon_runs: String,
    pub abandon_own_runs: String,
    pub last_scheduled: String,
    pub job_summary: String,
    pub job_runs: String,
    pub prune_runs: String,
    pub forget_hosts: String,
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
                "SELECT h.resync, h.pending_rows, h.oldest_xact_age, h.live_hosts, h.stale_hosts, \
                        h.stopped_hosts, l.holder, l.token, l.expires_in, l.db_now \
                   FROM {schema}.heartbeat($1::text, $2::text, $3::text, to_timestamp($4::float8), \
                          make_interval(secs => $5::float8), $6::text, $7::bool, $8::float8, $9::int) h, \
                        {schema}.lease('leader', $1::text, make_interval(secs => $10::float8), $11::bool) l",
            ),
            stopped: r("SELECT {schema}.stopped($1::text, $2::text)"),
            prune: r("SELECT {schema}.prune(make_interval(secs => $1::float8), \
                      make_interval(secs => $2::float8), $3::int, $4::int)"),
            hosts: r("SELECT id, version, api, \
                        to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                        to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
                        extract(epoch FROM now() - heartbeat_at)::float8, \
                        stopped_at IS NOT NULL, applied::text, ready, lag_seconds, pending_rows, \
                        (stopped_at IS NULL AND heartbeat_at > now() - heartbeat_interval * $1::int), \
                        id IS NOT DISTINCT FROM (SELECT holder FROM {schema}.leases \
                                                  WHERE name = 'leader' AND expires_at > clock_timestamp()) \
                      FROM {schema}.hosts ORDER BY id"),
            live_positions: r("SELECT id, applied::text FROM {schema}.hosts \
                               WHERE stopped_at IS NULL AND heartbeat_at > now() - heartbeat_interval * $1::int"),
            request_resync: r(
                "UPDATE {schema}.hosts SET resync_requested = true WHERE id = $1::text RETURNING id",
            ),
            lease_release: r("SELECT {schema}.lease_release('leader', $1::text, $2::int8)"),
            lock_acquire: r("SELECT acquired, token, expires_in, holder, owner \
                             FROM {schema}.lock_acquire($1::text, $2::text, $3::text, \
                                  make_interval(secs => $4::float8))"),
            lock_renew: r(
                "SELECT {schema}.lock_renew($1::text, $2::int8, make_interval(secs => $3::float8))",
            ),
            lock_release: r("SELECT {schema}.lock_release($1::text, $2::int8)"),
            upload_begin: r(
                "SELECT {schema}.upload_begin($1::text, $2::text, $3::text, $4::text, \
                 make_interval(secs => $5::float8), to_timestamp($6::float8))",
            ),
            upload_multipart: r("UPDATE {schema}.uploads SET multipart_id = $2::text \
                 WHERE id = $1::text AND state = 'pending' RETURNING id"),
            upload_register: r(
                "SELECT tx::text, meta::text FROM {schema}.upload_register($1::text, $2::int8, $3::text)",
            ),
            upload_register_ack: r(
                "SELECT u.tx::text, u.meta::text, {schema}.request_ack()::text \
                 FROM {schema}.upload_register($1::text, $2::int8, $3::text) u",
            ),
            upload_abandon: r("UPDATE {schema}.uploads SET state = 'abandoned' \
                 WHERE id = $1::text AND state = 'pending' RETURNING multipart_id"),
            upload_delete: r("SELECT pg_current_xact_id()::text, {schema}.upload_delete($1::text)"),
            upload_delete_ack: r(
                "SELECT pg_current_xact_id()::text, {schema}.upload_delete($1::text), \
                 {schema}.request_ack()::text",
            ),
            upload_forget: r(
                "DELETE FROM {schema}.uploads WHERE id = $1::text AND state IN ('deleting', 'abandoned')",
            ),
            upload_expire: r(
                "SELECT id, state, multipart_id, expired FROM {schema}.upload_expire(\
                 make_interval(secs => $1::float8), $2::int, $3::int, $4::text)",
            ),
            upload_backlog: r("SELECT count(*) FILTER (WHERE state = 'pending'), \
                        count(*) FILTER (WHERE state IN ('deleting', 'abandoned')), \
                        count(*) FILTER (WHERE state = 'stored') \
                   FROM {schema}.uploads"),
            upload_get: r(
                "SELECT {schema}.upload_meta(u)::text FROM {schema}.uploads u \
                 WHERE id = $1::text AND state = 'stored' AND expires_at > now()",
            ),
            upload_list: r(
                "SELECT {schema}.upload_meta(u)::text, id FROM {schema}.uploads u \
                 WHERE state = 'stored' AND expires_at > now() \
                 AND ($1::text IS NULL OR id > $1::text) AND ($2::text IS NULL OR name = $2::text) \
                 ORDER BY id LIMIT $3::int",
            ),
            bump: r("SELECT tx::text, version FROM {schema}.bump($1::text)"),
            bump_ack: r(
                "SELECT b.tx::text, b.version, {schema}.request_ack()::text \
                         FROM {schema}.bump($1::text) b",
            ),
            claim_run: r(
                "SELECT run_id, state, note FROM {schema}.claim_run($1::text, \
                          to_timestamp($2::float8), $3::text, $4::int, $5::text, $6::text, $7::int8, \
                          $8::bool, $9::bool, $10::int)",
            ),
            finish_run: r(
                "SELECT {schema}.finish_run($1::int8, $2::text, $3::int, $4::int, $5::text, $6::text)",
            ),
            queue_run: r("SELECT run_id, extract(epoch FROM scheduled_for)::float8 \
                          FROM {schema}.queue_run($1::text, $2::bool)"),
            take_queued: r(
                "SELECT run_id, job, extract(epoch FROM scheduled_for)::float8, fencing_token \
                 FROM {schema}.take_queued($1::text[], $2::text[], $3::text, $4::int8)",
            ),
            abandon_runs: r(
                "SELECT id, job, extract(epoch FROM scheduled_for)::float8, slot, attempt, host \
                             FROM {schema}.abandon_runs($1::int)",
            ),
            abandon_own_runs: r(
                "UPDATE {schema}.job_runs SET state = 'abandoned', finished_at = clock_timestamp(), \
                        error = 'the host running it restarted' \
                  WHERE state = 'running' AND host = $1::text \
              RETURNING id, job, extract(epoch FROM scheduled_for)::float8, slot, attempt, host",
            ),
            last_scheduled: r(
                "SELECT job, extract(epoch FROM max(scheduled_for))::float8 \
                               FROM {schema}.job_runs WHERE trigger <> 'manual' AND job = ANY ($1::text[]) AND slot IN ('', $2::text) \
                               GROUP BY job",
            ),
            job_summary: r(&format!(
                "SELECT DISTINCT ON (job) {RUN_COLUMNS} FROM {{schema}}.job_runs \
                            WHERE job = ANY ($1::text[]) AND state <> 'queued' ORDER BY job, id DESC"
            )),
            job_runs: r(&format!(
                "SELECT {RUN_COLUMNS} FROM {{schema}}.job_runs \
                         WHERE job = $1::text AND ($2::int8 IS NULL OR id < $2::int8) \
                         ORDER BY id DESC LIMIT $3::int"
            )),
            prune_runs: r("WITH gone AS (DELETE FROM {schema}.job_runs WHERE id IN ( \
                             SELECT id FROM {schema}.job_runs \
                              WHERE coalesce(finished_at, CASE WHEN state = 'queued' THEN claimed_at END) \
                                    < clock_timestamp() - make_interval(secs => $1::float8) \
                              LIMIT 10000) RETURNING 1) SELECT count(*) FROM gone"),
            forget_hosts: r("DELETE FROM {schema}.hosts \
                             WHERE heartbeat_at < clock_timestamp() - make_interval(secs => $1::float8) \
                             RETURNING id"),
        }
    }
}

/// The columns of a job run, in the order `sched::api::RunView::from_row` reads them.
pub const RUN_COLUMNS: &str = "id, job, \
    to_char(scheduled_for AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), slot, attempt, \
    trigger, state, host, fencing_token, \
    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
    to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
    extract(epoch FROM finished_at - started_at)::float8, exit_status, http_status, output, error";
