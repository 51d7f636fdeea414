-- Shared uploads. The bytes live in the object store under `<prefix>/<id>`;
-- this table tracks each upload's life (pending while its bytes are being
-- stored, stored once they are all there, deleting while they are removed,
-- abandoned when the host storing them died). A stored upload is also an
-- entry of the reserved cache `_uploads` (the value is its metadata as JSON),
-- so its registration and removal travel through the log like any entry and
-- every host learns of it without listing the bucket.
CREATE TABLE {schema}.uploads (
    id           text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{32}$'),
    state        text NOT NULL CHECK (state IN ('pending', 'stored', 'deleting', 'abandoned')),
    name         text NOT NULL,
    content_type text NOT NULL,
    size         bigint,
    sha256       text,
    origin       text NOT NULL,
    -- The store's multipart upload id, while a multipart upload is open.
    multipart_id text,
    ttl          interval NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    stored_at    timestamptz,
    expires_at   timestamptz
);
CREATE INDEX uploads_expiry ON {schema}.uploads (expires_at) WHERE state = 'stored';
CREATE INDEX uploads_unfinished ON {schema}.uploads (created_at) WHERE state <> 'stored';

-- The metadata every host keeps (and the API answers).
CREATE FUNCTION {schema}.upload_meta(u {schema}.uploads) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', u.id, 'name', u.name, 'size', u.size, 'sha256', u.sha256,
        'content_type', u.content_type, 'origin', u.origin,
        'created_at', to_char(u.stored_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'expires_at', to_char(u.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
$$;

-- Starts an upload: nothing is visible until `upload_register`.
CREATE FUNCTION {schema}.upload_begin(p_id text, p_name text, p_content_type text,
                                      p_origin text, p_ttl interval)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO {schema}.uploads (id, state, name, content_type, origin, ttl)
    VALUES (p_id, 'pending', p_name, p_content_type, p_origin, p_ttl)
$$;

-- Makes a wholly stored upload visible everywhere (in the caller's
-- transaction); answers the transaction id (the write's token) and the
-- metadata. Fails if the upload was abandoned meanwhile.
CREATE FUNCTION {schema}.upload_register(p_id text, p_size bigint, p_sha256 text)
RETURNS TABLE (tx xid8, meta jsonb) LANGUAGE plpgsql AS $$
DECLARE
    u {schema}.uploads;
BEGIN
    UPDATE {schema}.uploads
       SET state = 'stored', size = p_size, sha256 = p_sha256, multipart_id = NULL,
           stored_at = now(), expires_at = now() + ttl
     WHERE id = p_id AND state = 'pending'
    RETURNING * INTO u;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tandem: upload % is no longer pending (abandoned?)', p_id
            USING ERRCODE = '55000';
    END IF;
    INSERT INTO {schema}.entries (cache, key, value, content_type)
    VALUES ('_uploads', p_id, convert_to({schema}.upload_meta(u)::text, 'UTF8'), 'application/json');
    INSERT INTO {schema}.log (kind, cache, key) VALUES ('put', '_uploads', p_id);
    PERFORM pg_notify('{channel}_log', '');
    RETURN QUERY SELECT pg_current_xact_id(), {schema}.upload_meta(u);
END $$;

-- Withdraws an upload everywhere; its bytes are then removed from the store
-- by the caller (or, if that fails, by the expiry job). Answers whether there
-- was such an upload.
CREATE FUNCTION {schema}.upload_delete(p_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {schema}.uploads SET state = 'deleting' WHERE id = p_id AND state = 'stored';
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM {schema}.entries WHERE cache = '_uploads' AND key = p_id;
    INSERT INTO {schema}.log (kind, cache, key) VALUES ('delete', '_uploads', p_id);
    PERFORM pg_notify('{channel}_log', '');
    RETURN true;
END $$;

-- The expiry job's first step: withdraws expired uploads, marks as
-- abandoned the pending uploads whose host died, restarted or took longer
-- than `p_abandon_after` (a host is dead when it missed `p_missed`
-- heartbeats), and answers every upload whose bytes are to be
-- removed from the store (with its open multipart upload, if any).
CREATE FUNCTION {schema}.upload_expire(p_abandon_after interval, p_missed int, p_limit int,
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
                    OR h.started_at > p.created_at
                    -- The host running this is alive: its own uploads are
                    -- abandoned only by a restart or their age.
                    OR (p.origin <> p_host
                        AND h.heartbeat_at < now() - h.heartbeat_interval * p_missed))
             LIMIT p_limit) a
     WHERE u.id = a.id;
    RETURN QUERY
    SELECT u.id, u.state, u.multipart_id, u.id = ANY (coalesce(expired_ids, '{}'))
      FROM {schema}.uploads u
     WHERE u.state IN ('deleting', 'abandoned')
     ORDER BY u.created_at LIMIT p_limit;
END $$;
