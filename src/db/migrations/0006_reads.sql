-- Reads whose cost does not grow with the log. The heartbeat counted a
-- host's pending rows with `tx IN (xip) OR tx >= xmax(snap)` on a plpgsql
-- variable: its generic plan was a sequential scan of the whole log, every
-- heartbeat of every host (38 ms at 200,000 retained rows, minutes at two
-- days of a busy site's log). The count now runs with literal bounds, walks
-- the (tx, id) index from the host's position, and stays capped at
-- 1,000,000. (The page statement that hosts read the log with lives in the
-- binary: src/sync/read.rs.)

CREATE OR REPLACE FUNCTION {schema}.heartbeat(p_id text, p_version text, p_api text,
                                   p_started_at timestamptz, p_interval interval,
                                   p_applied text, p_ready boolean, p_lag double precision,
                                   p_missed int)
RETURNS TABLE (resync boolean, pending_rows bigint, oldest_xact_age double precision,
               live_hosts bigint, stale_hosts bigint, stopped_hosts bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    snap pg_snapshot := p_applied::pg_snapshot;
BEGIN
    INSERT INTO {schema}.hosts AS h (id, version, api, started_at, heartbeat_at,
                                     heartbeat_interval, applied, applied_at, ready, lag_seconds)
    VALUES (p_id, p_version, p_api, p_started_at, now(), p_interval, snap,
            CASE WHEN snap IS NOT NULL THEN now() END, p_ready, p_lag)
    ON CONFLICT (id) DO UPDATE SET
        version = EXCLUDED.version, api = EXCLUDED.api, started_at = EXCLUDED.started_at,
        heartbeat_at = now(), heartbeat_interval = EXCLUDED.heartbeat_interval,
        stopped_at = NULL,
        applied = coalesce(EXCLUDED.applied, h.applied),
        applied_at = CASE WHEN EXCLUDED.applied::text IS DISTINCT FROM h.applied::text
                          AND EXCLUDED.applied IS NOT NULL THEN now() ELSE h.applied_at END,
        ready = EXCLUDED.ready, lag_seconds = EXCLUDED.lag_seconds;
    UPDATE {schema}.hosts SET resync_requested = false
     WHERE id = p_id AND resync_requested
    RETURNING true INTO resync;
    resync := coalesce(resync, false);
    IF snap IS NULL THEN
        pending_rows := NULL;
    ELSE
        -- Literal bounds (EXECUTE): planned for these values, so both
        -- counts walk the (tx, id) index from where the host is.
        EXECUTE format(
            'SELECT least(1000000,
                 (SELECT count(*) FROM (SELECT 1 FROM {schema}.log
                                         WHERE (tx, id) > (%L::xid8, 0)
                                         LIMIT 1000000) r)
               + (SELECT count(*) FROM pg_snapshot_xip(%L::pg_snapshot) AS x(tx)
                    CROSS JOIN LATERAL (SELECT 1 FROM {schema}.log l
                                         WHERE l.tx = x.tx LIMIT 1000000) l))',
            pg_snapshot_xmax(snap), snap)
          INTO pending_rows;
    END IF;
    UPDATE {schema}.hosts SET pending_rows = coalesce(heartbeat.pending_rows, 0) WHERE id = p_id;
    SELECT extract(epoch FROM now() - min(xact_start)) INTO oldest_xact_age
      FROM pg_stat_activity
     WHERE pid <> pg_backend_pid() AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL);
    oldest_xact_age := coalesce(oldest_xact_age, 0);
    SELECT count(*) FILTER (WHERE stopped_at IS NULL
                              AND heartbeat_at > now() - heartbeat_interval * p_missed),
           count(*) FILTER (WHERE stopped_at IS NULL
                              AND heartbeat_at <= now() - heartbeat_interval * p_missed),
           count(*) FILTER (WHERE stopped_at IS NOT NULL)
      INTO live_hosts, stale_hosts, stopped_hosts
      FROM {schema}.hosts;
    RETURN NEXT;
END $$;
