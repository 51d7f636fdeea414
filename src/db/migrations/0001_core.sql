-- tandem core schema. `{schema}` is replaced by the configured schema name
-- (validated to [a-z_][a-z0-9_]{0,47}), `{channel}` by the prefix of its
-- notification channels (`<prefix>_log`, `_ack`, `_ackreq`).

-- One row: identifies this schema instance and records how far the log has
-- been pruned. Hosts identify the schema by schema_id together with this
-- table's OID, so a re-created or restored schema (where pg_dump copies the
-- id) still looks new and makes every host cold-boot.
CREATE TABLE {schema}.meta (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schema_id    uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Log rows with tx below this may have been deleted by pruning.
    pruned_below xid8 NOT NULL DEFAULT '0'
);
INSERT INTO {schema}.meta DEFAULT VALUES;

-- The committed truth: the current value of every key.
CREATE TABLE {schema}.entries (
    cache        text NOT NULL,
    key          text NOT NULL,
    value        bytea NOT NULL,
    content_type text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cache, key)
);

-- The instruction log: one row per change, naming what changed. Applying a
-- row means refreshing the named thing from `entries`.
CREATE TABLE {schema}.log (
    id         bigint GENERATED ALWAYS AS IDENTITY,
    tx         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    kind       text NOT NULL CHECK (kind IN ('put', 'delete', 'clear')),
    cache      text NOT NULL,
    key        text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX log_tx_id ON {schema}.log (tx, id);
CREATE INDEX log_created_at ON {schema}.log (created_at);

-- Host registry: heartbeats and applied positions.
CREATE TABLE {schema}.hosts (
    id                 text PRIMARY KEY,
    version            text NOT NULL,
    api                text,
    started_at         timestamptz NOT NULL,
    heartbeat_at       timestamptz NOT NULL,
    heartbeat_interval interval NOT NULL,
    stopped_at         timestamptz,
    applied            pg_snapshot,
    applied_at         timestamptz,
    ready              boolean NOT NULL DEFAULT false,
    lag_seconds        double precision NOT NULL DEFAULT 0,
    pending_rows       bigint NOT NULL DEFAULT 0,
    resync_requested   boolean NOT NULL DEFAULT false
);

-- Raises a clear error for names tandem would refuse over HTTP.
CREATE FUNCTION {schema}.check_key(p_cache text, p_key text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_cache IS NULL OR p_cache !~ '^[a-z0-9][a-z0-9_-]{0,63}$' THEN
        RAISE EXCEPTION 'tandem: invalid cache name %', quote_nullable(p_cache)
            USING ERRCODE = '22023',
                  HINT = 'cache names match [a-z0-9][a-z0-9_-]{0,63}';
    END IF;
    IF p_key IS NOT NULL AND (p_key = '' OR octet_length(p_key) > 1024) THEN
        RAISE EXCEPTION 'tandem: invalid key in cache %: keys are 1 to 1024 bytes', p_cache
            USING ERRCODE = '22023';
    END IF;
END $$;

-- put/delete/clear: call inside your own transaction; the change commits (or
-- not) with it. Each returns the transaction id, which is the write's token.
-- Repeated pg_notify calls with the same channel and payload are folded by
-- PostgreSQL into one notification per transaction.
CREATE FUNCTION {schema}.put(p_cache text, p_key text, p_value bytea,
                             p_content_type text DEFAULT 'application/octet-stream')
RETURNS xid8 LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {schema}.check_key(p_cache, p_key);
    IF p_key IS NULL OR p_value IS NULL THEN
        RAISE EXCEPTION 'tandem: put needs a key and a value' USING ERRCODE = '22004';
    END IF;
    IF p_content_type IS NOT NULL AND p_content_type !~ '^[\x20-\x7e]{1,255}$' THEN
        RAISE EXCEPTION 'tandem: invalid content type for %/%: 1 to 255 printable ASCII characters',
            p_cache, left(p_key, 100) USING ERRCODE = '22023';
    END IF;
    INSERT INTO {schema}.entries AS e (cache, key, value, content_type)
    VALUES (p_cache, p_key, p_value, coalesce(p_content_type, 'application/octet-stream'))
    ON CONFLICT (cache, key) DO UPDATE
        SET value = EXCLUDED.value, content_type = EXCLUDED.content_type, updated_at = now();
    INSERT INTO {schema}.log (kind, cache, key) VALUES ('put', p_cache, p_key);
    PERFORM pg_notify('{channel}_log', '');
    RETURN pg_current_xact_id();
END $$;

CREATE FUNCTION {schema}.put(p_cache text, p_key text, p_value text,
                             p_content_type text DEFAULT 'text/plain; charset=utf-8')
RETURNS xid8 LANGUAGE sql AS $$
    SELECT {schema}.put(p_cache, p_key, convert_to(p_value, 'UTF8'), p_content_type)
$$;

CREATE FUNCTION {schema}.put(p_cache text, p_key text, p_value jsonb,
                             p_content_type text DEFAULT 'application/json')
RETURNS xid8 LANGUAGE sql AS $$
    SELECT {schema}.put(p_cache, p_key, convert_to(p_value::text, 'UTF8'), p_content_type)
$$;

CREATE FUNCTION {schema}.delete(p_cache text, p_key text) RETURNS xid8
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {schema}.check_key(p_cache, p_key);
    IF p_key IS NULL THEN
        RAISE EXCEPTION 'tandem: delete needs a key' USING ERRCODE = '22004';
    END IF;
    DELETE FROM {schema}.entries WHERE cache = p_cache AND key = p_key;
    INSERT INTO {schema}.log (kind, cache, key) VALUES ('delete', p_cache, p_key);
    PERFORM pg_notify('{channel}_log', '');
    RETURN pg_current_xact_id();
END $$;

CREATE FUNCTION {schema}.clear(p_cache text) RETURNS xid8
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {schema}.check_key(p_cache, NULL);
    DELETE FROM {schema}.entries WHERE cache = p_cache;
    INSERT INTO {schema}.log (kind, cache) VALUES ('clear', p_cache);
    PERFORM pg_notify('{channel}_log', '');
    RETURN pg_current_xact_id();
END $$;

-- Several operations in one call (arrays of equal length; for 'delete' and
-- 'clear' the value and content type are ignored, for 'clear' the key too).
CREATE FUNCTION {schema}.batch(p_ops text[], p_caches text[], p_keys text[],
                               p_values bytea[], p_content_types text[])
RETURNS xid8 LANGUAGE plpgsql AS $$
DECLARE
    n int := coalesce(array_length(p_ops, 1), 0);
BEGIN
    IF coalesce(array_length(p_caches, 1), 0) <> n
       OR coalesce(array_length(p_keys, 1), 0) <> n
       OR coalesce(array_length(p_values, 1), 0) <> n
       OR coalesce(array_length(p_content_types, 1), 0) <> n THEN
        RAISE EXCEPTION 'tandem: batch arrays must all have % elements', n USING ERRCODE = '22023';
    END IF;
    FOR i IN 1 .. n LOOP
        CASE p_ops[i]
            WHEN 'put' THEN PERFORM {schema}.put(p_caches[i], p_keys[i], p_values[i], p_content_types[i]);
            WHEN 'delete' THEN PERFORM {schema}.delete(p_caches[i], p_keys[i]);
            WHEN 'clear' THEN PERFORM {schema}.clear(p_caches[i]);
            ELSE RAISE EXCEPTION 'tandem: unknown batch op % at %', quote_nullable(p_ops[i]), i
                 USING ERRCODE = '22023';
        END CASE;
    END LOOP;
    RETURN pg_current_xact_id();
END $$;

-- Asks every host to report its applied position as soon as it has applied
-- this transaction (used by `?wait=cluster`).
CREATE FUNCTION {schema}.request_ack() RETURNS xid8 LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel}_ackreq', pg_current_xact_id()::text);
    RETURN pg_current_xact_id();
END $$;

-- Heartbeat: registers or refreshes this host and answers what the host needs
-- to know (a remote resync request, rows committed but not yet applied, and the
-- age of the oldest open transaction, which holds back pruning).
CREATE FUNCTION {schema}.heartbeat(p_id text, p_version text, p_api text,
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
        SELECT count(*) INTO pending_rows FROM (
            SELECT 1 FROM {schema}.log
             WHERE tx IN (SELECT pg_snapshot_xip(snap)) OR tx >= pg_snapshot_xmax(snap)
             LIMIT 1000000) p;
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

-- Publishes this host's applied position at once (answering an ack request).
CREATE FUNCTION {schema}.report(p_id text, p_applied text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {schema}.hosts SET applied = p_applied::pg_snapshot, applied_at = now()
     WHERE id = p_id;
    PERFORM pg_notify('{channel}_ack', p_id);
END $$;

-- Called just before a cold boot takes its snapshot: registers the current
-- snapshot (which is no newer than the cold boot's) as this host's position,
-- so that pruning keeps every row the cold boot will still have to read.
CREATE FUNCTION {schema}.protect(p_id text, p_interval interval) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO {schema}.hosts (id, version, started_at, heartbeat_at, heartbeat_interval,
                                applied, applied_at)
    VALUES (p_id, '', now(), now(), p_interval, pg_current_snapshot(), now())
    ON CONFLICT (id) DO UPDATE SET
        applied = pg_current_snapshot(), applied_at = now(),
        heartbeat_at = now(), stopped_at = NULL;
$$;

-- Marks a host as cleanly stopped: it no longer counts as live.
CREATE FUNCTION {schema}.stopped(p_id text, p_applied text) RETURNS void
LANGUAGE sql AS $$
    UPDATE {schema}.hosts
       SET stopped_at = now(), ready = false,
           applied = coalesce(p_applied::pg_snapshot, applied)
     WHERE id = p_id;
$$;

-- Deletes up to p_limit log rows older than p_retain whose transaction every
-- live host has read (tx below the xmin of each live host's position), and
-- rows older than p_max_retain regardless. Only one caller prunes at a time;
-- the others get -1. Records the prune horizon in meta so that a host whose
-- position is older cold-boots instead of missing rows.
CREATE FUNCTION {schema}.prune(p_retain interval, p_max_retain interval,
                               p_missed int, p_limit int) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    bound xid8;
    n bigint;
    top xid8;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('{schema}.prune')) THEN
        RETURN -1;
    END IF;
    SELECT min(pg_snapshot_xmin(applied)) INTO bound
      FROM {schema}.hosts
     WHERE stopped_at IS NULL AND applied IS NOT NULL
       AND heartbeat_at > now() - heartbeat_interval * p_missed;
    WITH victims AS (
        SELECT ctid FROM {schema}.log
         WHERE created_at < now() - p_retain
           AND (bound IS NULL OR tx < bound OR created_at < now() - p_max_retain)
         ORDER BY created_at
         LIMIT p_limit
    ), gone AS (
        DELETE FROM {schema}.log l USING victims v WHERE l.ctid = v.ctid RETURNING l.tx
    )
    SELECT count(*), max(tx) INTO n, top FROM gone;
    IF top IS NOT NULL THEN
        UPDATE {schema}.meta
           SET pruned_below = greatest(pruned_below, ((top::text)::numeric + 1)::text::xid8);
    END IF;
    RETURN n;
END $$;
