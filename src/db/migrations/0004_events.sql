-- Events (issue 6): a finished run of an app job (not of the built-in
-- `tandem.*` ones) is announced through the log, as the entry `_jobs/<job>`
-- (the run, as JSON), so that every host's event stream and webhook can
-- report it. And, for uploads: another host's pending uploads are
-- abandoned only after two minutes of silence at least, and a host's restart
-- is told by its own clock (below).

CREATE OR REPLACE FUNCTION {schema}.finish_run(p_id bigint, p_state text, p_exit int, p_http int,
                                               p_output text, p_error text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    r {schema}.job_runs;
BEGIN
    UPDATE {schema}.job_runs
       SET state = p_state, finished_at = clock_timestamp(), exit_status = p_exit,
           http_status = p_http, output = p_output, error = p_error
     WHERE id = p_id AND state = 'running'
    RETURNING * INTO r;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF r.job LIKE 'tandem.%' THEN
        -- Built-in jobs are the daemon's housekeeping, not the app's.
        RETURN true;
    END IF;
    INSERT INTO {schema}.entries (cache, key, value, content_type)
    VALUES ('_jobs', r.job, convert_to(jsonb_build_object(
                'job', r.job, 'run', r.id, 'state', r.state, 'host', r.host,
                'trigger', r.trigger,
                -- In UTC, as the API writes times, whatever the session's TimeZone.
                'scheduled_for', to_char(r.scheduled_for AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                'started_at', to_char(r.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                'finished_at', to_char(r.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                'exit_status', r.exit_status, 'http_status', r.http_status,
                'error', r.error)::text, 'UTF8'), 'application/json')
    ON CONFLICT (cache, key) DO UPDATE
       SET value = EXCLUDED.value, content_type = EXCLUDED.content_type, updated_at = now();
    INSERT INTO {schema}.log (kind, cache, key) VALUES ('put', '_jobs', r.job);
    PERFORM pg_notify('{channel}_log', '');
    RETURN true;
END $$;

-- Uploads remember the run of their origin host's process that stores them
-- (`origin_started_at`: the process start the host also sends in its
-- heartbeats, by the host's own clock). "The origin host restarted" compares
-- that with the host's latest heartbeat, clock with the same clock; it used
-- to compare the host's clock with the database's, so a host whose clock ran
-- ahead had the uploads it began just after starting marked abandoned.

ALTER TABLE {schema}.uploads ADD COLUMN origin_started_at timestamptz;

-- The five-argument form stays for binaries of the previous version during
-- a rolling upgrade.
CREATE FUNCTION {schema}.upload_begin(p_id text, p_name text, p_content_type text,
                                      p_origin text, p_ttl interval,
                                      p_origin_started_at timestamptz)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO {schema}.uploads (id, state, name, content_type, origin, ttl, origin_started_at)
    VALUES (p_id, 'pending', p_name, p_content_type, p_origin, p_ttl, p_origin_started_at)
$$;

CREATE OR REPLACE FUNCTION {schema}.upload_expire(p_abandon_after interval, p_missed int, p_limit int,
                                       p_host text)
RETURNS TABLE (id text, state text, multipart_id text, expired boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    expired_ids text[];
BEGIN
    SELECT array_agg(u.id) INTO expired_ids FROM (
        SELECT id FROM {schema}.uploads
         WHERE state = 'stored' AND expires_at <= now()
         ORDER BY expires_at LIMIT p_limit) u;
    IF expired_ids IS NOT NULL THEN
        UPDATE {schema}.uploads SET state = 'deleting' WHERE id = ANY (expired_ids);
        DELETE FROM {schema}.entries WHERE cache = '_uploads' AND key = ANY (expired_ids);
        INSERT INTO {schema}.log (kind, cache, key)
        SELECT 'delete', '_uploads', x FROM unnest(expired_ids) x;
        PERFORM pg_notify('{channel}_log', '');
    END IF;
    UPDATE {schema}.uploads u SET state = 'abandoned'
      FROM (SELECT p.id FROM {schema}.uploads p
              LEFT JOIN {schema}.hosts h ON h.id = p.origin
             WHERE p.state = 'pending'
               AND (p.created_at < now() - p_abandon_after
                    OR h.id IS NULL OR h.stopped_at IS NOT NULL
                    -- The origin host restarted: its process start (by its
                    -- own clock) is later than the one that began the upload.
                    -- Rows of older binaries compare with created_at.
                    OR h.started_at > coalesce(p.origin_started_at, p.created_at)
                    -- The host running this is alive: its own uploads are
                    -- abandoned only by a restart or their age. Another
                    -- host's, once it has been silent for long enough that
                    -- a late heartbeat under load is not mistaken for death.
                    OR (p.origin <> p_host
                        AND h.heartbeat_at < now() - greatest(h.heartbeat_interval * p_missed,
                                                      interval '2 minutes')))
             LIMIT p_limit) a
     WHERE u.id = a.id;
    RETURN QUERY
    SELECT u.id, u.state, u.multipart_id, u.id = ANY (coalesce(expired_ids, '{}'))
      FROM {schema}.uploads u
     WHERE u.state IN ('deleting', 'abandoned')
     ORDER BY u.created_at LIMIT p_limit;
END $$;
