-- The heartbeat's count of a host's pending rows in transactions that were
-- still open at its position (the snapshot's in-progress list) looked each
-- one up in a LATERAL subquery over pg_snapshot_xip(). The planner cannot
-- see those ids, so it estimated each from the column's average rows per
-- transaction: with few, large transactions in the log (40,000 rows in one)
-- it chose a sequential scan of the whole log for every open transaction at
-- the position - every heartbeat of every host while any write was open.
-- The ids are now written into the statement as a literal array, so the
-- planner estimates them from the statistics and walks the (tx, id) index.

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
        -- Literal bounds and transaction ids (EXECUTE): planned for these
        -- values, so both counts walk the (tx, id) index.
        EXECUTE format(
            'SELECT least(1000000,
                 (SELECT count(*) FROM (SELECT 1 FROM {schema}.log
                                         WHERE (tx, id) > (%L::xid8, 0)
                                         LIMIT 1000000) r)
               + (SELECT count(*) FROM (SELECT 1 FROM {schema}.log
                                         WHERE tx = ANY (%L::xid8[])
                                         LIMIT 1000000) x))',
            pg_snapshot_xmax(snap),
            (SELECT coalesce(array_agg(x), '{}') FROM pg_snapshot_xip(snap) AS x))
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
