-- Coordination: the leader lease, job runs, app locks and version counters.
-- Every time here is the database's (clock_timestamp()), never a host's.

-- Leases. The row named 'leader' is the cluster's leader lease. `token` is
-- the fencing token: it grows by one with every new term and never goes back.
CREATE TABLE {schema}.leases (
    name        text PRIMARY KEY,
    holder      text,
    token       bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz,
    renewed_at  timestamptz,
    expires_at  timestamptz
);

-- Acquires (when free or expired) or renews (when held by p_host) a lease,
-- if p_acquire; then answers who holds it, its token, the seconds left, and
-- the database's clock. A holder whose own lease expired gets a new term.
CREATE FUNCTION {schema}.lease(p_name text, p_host text, p_ttl interval, p_acquire boolean)
RETURNS TABLE (holder text, token bigint, expires_in double precision, db_now double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz := clock_timestamp();
BEGIN
    IF p_acquire THEN
        INSERT INTO {schema}.leases (name) VALUES (p_name) ON CONFLICT DO NOTHING;
        UPDATE {schema}.leases l SET
            token = CASE WHEN l.holder = p_host AND l.expires_at > t THEN l.token ELSE l.token + 1 END,
            acquired_at = CASE WHEN l.holder = p_host AND l.expires_at > t THEN l.acquired_at ELSE t END,
            holder = p_host, renewed_at = t, expires_at = t + p_ttl
         WHERE l.name = p_name
           AND (l.holder IS NULL OR l.expires_at IS NULL OR l.expires_at <= t OR l.holder = p_host);
    END IF;
    RETURN QUERY
        SELECT CASE WHEN l.expires_at > t THEN l.holder END, l.token,
               greatest(extract(epoch FROM l.expires_at - t), 0)::float8,
               extract(epoch FROM t)::float8
          FROM {schema}.leases l WHERE l.name = p_name
        UNION ALL
        SELECT NULL, 0::bigint, 0::float8, extract(epoch FROM t)::float8
         WHERE NOT EXISTS (SELECT 1 FROM {schema}.leases l WHERE l.name = p_name);
END $$;

-- Gives a lease up at once (clean shutdown) and tells the other hosts.
CREATE FUNCTION {schema}.lease_release(p_name text, p_host text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {schema}.leases SET holder = NULL, expires_at = clock_timestamp()
     WHERE name = p_name AND holder = p_host AND token = p_token
       AND expires_at > clock_timestamp();
    IF FOUND THEN
        PERFORM pg_notify('{channel}_leader', p_host);
    END IF;
    RETURN FOUND;
END $$;

-- Job runs: one row per claimed run (or refused one). A run is claimed
-- before it starts; the unique key makes a scheduled time run once.
-- `slot` is '' for `leader` and `once` jobs and the host id for `every-host`
-- jobs; `attempt` counts retries of the same scheduled time.
CREATE TABLE {schema}.job_runs (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job           text NOT NULL,
    scheduled_for timestamptz NOT NULL,
    slot          text NOT NULL DEFAULT '',
    attempt       int NOT NULL DEFAULT 0,
    trigger       text NOT NULL,
    state         text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed',
                                                 'timed_out', 'abandoned', 'skipped')),
    host          text,
    fencing_token bigint,
    claimed_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at    timestamptz,
    finished_at   timestamptz,
    exit_status   int,
    http_status   int,
    output        text,
    error         text,
    UNIQUE (job, scheduled_for, slot, attempt)
);
CREATE INDEX job_runs_job ON {schema}.job_runs (job, id DESC);
CREATE INDEX job_runs_open ON {schema}.job_runs (job) WHERE state IN ('queued', 'running');
CREATE INDEX job_runs_finished ON {schema}.job_runs (finished_at);

-- Marks running runs whose host is stale (missed p_missed heartbeats) or
-- stopped as abandoned, and returns them.
CREATE FUNCTION {schema}.abandon_runs(p_missed int)
RETURNS TABLE (id bigint, job text, scheduled_for timestamptz, slot text, attempt int, host text)
LANGUAGE sql AS $$
    UPDATE {schema}.job_runs r
       SET state = 'abandoned', finished_at = clock_timestamp(),
           error = 'the host running it stopped heartbeating'
      FROM {schema}.hosts h
     WHERE r.state = 'running' AND h.id = r.host
       AND (h.stopped_at IS NOT NULL
            OR h.heartbeat_at <= clock_timestamp() - h.heartbeat_interval * p_missed)
    RETURNING r.id, r.job, r.scheduled_for, r.slot, r.attempt, r.host;
$$;

-- Claims a run of p_job for scheduled time p_at. Answers the run's id and
-- state: 'running' (claimed: run it), 'taken' (someone else claimed it),
-- 'skipped' (an earlier run still runs and the job refuses overlap; recorded),
-- 'not_leader' (p_token is not the current leader term).
CREATE FUNCTION {schema}.claim_run(p_job text, p_at timestamptz, p_slot text, p_attempt int,
                                   p_trigger text, p_host text, p_token bigint,
                                   p_leader_only boolean, p_overlap boolean, p_missed int)
RETURNS TABLE (run_id bigint, state text, note text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    busy record;
    new_id bigint;
BEGIN
    -- Claims of one job are serialised, so the overlap check holds.
    PERFORM pg_advisory_xact_lock(hashtext('{schema}.job'), hashtext(p_job));
    IF p_leader_only AND NOT EXISTS (
        SELECT 1 FROM {schema}.leases l
         WHERE l.name = 'leader' AND l.holder = p_host AND l.token = p_token
           AND l.expires_at > clock_timestamp()) THEN
        RETURN QUERY SELECT NULL::bigint, 'not_leader'::text, NULL::text;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM {schema}.job_runs r
                WHERE r.job = p_job AND r.scheduled_for = p_at AND r.slot = p_slot
                  AND r.attempt = p_attempt) THEN
        RETURN QUERY SELECT NULL::bigint, 'taken'::text, NULL::text;
        RETURN;
    END IF;
    IF NOT p_overlap THEN
        -- Runs of dead hosts do not block (tandem.mark-stale-hosts marks
        -- them abandoned and retries them).
        SELECT r.id, r.host INTO busy FROM {schema}.job_runs r
          JOIN {schema}.hosts h ON h.id = r.host
         WHERE r.job = p_job AND r.slot = p_slot AND r.state = 'running'
           AND h.stopped_at IS NULL
           AND h.heartbeat_at > clock_timestamp() - h.heartbeat_interval * p_missed
         LIMIT 1;
        IF FOUND THEN
            INSERT INTO {schema}.job_runs AS r (job, scheduled_for, slot, attempt, trigger, state,
                                                host, fencing_token, finished_at, error)
            VALUES (p_job, p_at, p_slot, p_attempt, p_trigger, 'skipped', p_host, p_token,
                    clock_timestamp(),
                    format('overlap: run %s is still running on %s', busy.id, busy.host))
            ON CONFLICT DO NOTHING RETURNING r.id INTO new_id;
            RETURN QUERY SELECT new_id, 'skipped'::text,
                                format('run %s is still running on %s', busy.id, busy.host);
            RETURN;
        END IF;
    END IF;
    INSERT INTO {schema}.job_runs AS r (job, scheduled_for, slot, attempt, trigger, state, host,
                                        fencing_token, started_at)
    VALUES (p_job, p_at, p_slot, p_attempt, p_trigger, 'running', p_host, p_token,
            clock_timestamp())
    ON CONFLICT DO NOTHING RETURNING r.id INTO new_id;
    IF new_id IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, 'taken'::text, NULL::text;
    ELSE
        -- Jobs not tied to the leader carry their run id as fencing token.
        IF NOT p_leader_only THEN
            UPDATE {schema}.job_runs r SET fencing_token = new_id WHERE r.id = new_id;
        END IF;
        RETURN QUERY SELECT new_id, 'running'::text, NULL::text;
    END IF;
END $$;

-- Takes the oldest queued (manually requested) run of one of p_jobs.
-- p_leader_jobs (a subset) are taken only with the current leader term,
-- whose token they carry; the others carry their run id.
CREATE FUNCTION {schema}.take_queued(p_jobs text[], p_leader_jobs text[], p_host text,
                                     p_token bigint)
RETURNS TABLE (run_id bigint, job text, scheduled_for timestamptz, fencing_token bigint)
LANGUAGE sql AS $$
    UPDATE {schema}.job_runs r
       SET state = 'running', host = p_host,
           fencing_token = CASE WHEN r.job = ANY (p_leader_jobs) THEN p_token ELSE r.id END,
           started_at = clock_timestamp()
     WHERE r.id = (SELECT q.id FROM {schema}.job_runs q
                    WHERE q.state = 'queued' AND q.job = ANY (p_jobs)
                      AND (NOT q.job = ANY (p_leader_jobs) OR EXISTS (
                           SELECT 1 FROM {schema}.leases l
                            WHERE l.name = 'leader' AND l.holder = p_host AND l.token = p_token
                              AND l.expires_at > clock_timestamp()))
                    ORDER BY q.id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING r.id, r.job, r.scheduled_for, r.fencing_token;
$$;

-- Queues a manual run ("run now, once cluster-wide") and wakes the hosts.
-- Refused (NULL) while a run of the job is running or queued and the job
-- refuses overlap.
CREATE FUNCTION {schema}.queue_run(p_job text, p_overlap boolean)
RETURNS TABLE (run_id bigint, scheduled_for timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    at timestamptz := date_trunc('milliseconds', clock_timestamp());
    new_id bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('{schema}.job'), hashtext(p_job));
    IF NOT p_overlap AND EXISTS (SELECT 1 FROM {schema}.job_runs r
                                  WHERE r.job = p_job AND r.state IN ('queued', 'running')) THEN
        RETURN;
    END IF;
    INSERT INTO {schema}.job_runs AS r (job, scheduled_for, slot, attempt, trigger, state)
    VALUES (p_job, at, '', 0, 'manual', 'queued')
    ON CONFLICT DO NOTHING RETURNING r.id INTO new_id;
    PERFORM pg_notify('{channel}_jobs', p_job);
    RETURN QUERY SELECT new_id, at;
END $$;

-- Records how a run ended (only if it is still marked running).
CREATE FUNCTION {schema}.finish_run(p_id bigint, p_state text, p_exit int, p_http int,
                                    p_output text, p_error text)
RETURNS boolean LANGUAGE sql AS $$
    UPDATE {schema}.job_runs
       SET state = p_state, finished_at = clock_timestamp(), exit_status = p_exit,
           http_status = p_http, output = p_output, error = p_error
     WHERE id = p_id AND state = 'running'
    RETURNING true;
$$;

-- App locks. A row stays after release, so the token (the fencing token) of
-- a name only ever grows.
CREATE TABLE {schema}.locks (
    name        text PRIMARY KEY,
    holder      text,
    owner       text,
    token       bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz,
    expires_at  timestamptz
);

-- Takes a lock if it is free or expired. Answers (acquired, token,
-- expires_in seconds, holder host, holder owner).
CREATE FUNCTION {schema}.lock_acquire(p_name text, p_host text, p_owner text, p_ttl interval)
RETURNS TABLE (acquired boolean, token bigint, expires_in double precision,
               holder text, owner text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t timestamptz := clock_timestamp();
BEGIN
    INSERT INTO {schema}.locks (name) VALUES (p_name) ON CONFLICT DO NOTHING;
    RETURN QUERY
    WITH got AS (
        UPDATE {schema}.locks l
           SET holder = p_host, owner = p_owner, token = l.token + 1, acquired_at = t,
               expires_at = t + p_ttl
         WHERE l.name = p_name AND (l.holder IS NULL OR l.expires_at <= t)
        RETURNING l.token, l.expires_at, l.holder, l.owner
    )
    SELECT true, g.token, extract(epoch FROM g.expires_at - t)::float8, g.holder, g.owner
      FROM got g
    UNION ALL
    SELECT false, l.token, greatest(extract(epoch FROM l.expires_at - t), 0)::float8,
           l.holder, l.owner
      FROM {schema}.locks l
     WHERE l.name = p_name AND NOT EXISTS (SELECT 1 FROM got);
END $$;

-- Extends a held lock. Answers the seconds left, or nothing if p_token no
-- longer holds it (released, expired or taken over).
CREATE FUNCTION {schema}.lock_renew(p_name text, p_token bigint, p_ttl interval)
RETURNS double precision LANGUAGE sql AS $$
    UPDATE {schema}.locks SET expires_at = clock_timestamp() + p_ttl
     WHERE name = p_name AND token = p_token AND holder IS NOT NULL
       AND expires_at > clock_timestamp()
    RETURNING extract(epoch FROM expires_at - clock_timestamp())::float8;
$$;

-- Releases a held lock (waking the hosts whose clients wait for it);
-- false if p_token no longer holds it.
CREATE FUNCTION {schema}.lock_release(p_name text, p_token bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {schema}.locks SET holder = NULL, owner = NULL, expires_at = clock_timestamp()
     WHERE name = p_name AND token = p_token AND holder IS NOT NULL
       AND expires_at > clock_timestamp();
    IF FOUND THEN
        PERFORM pg_notify('{channel}_locks', p_name);
        RETURN true;
    END IF;
    RETURN false;
END $$;

-- Version counters live in `entries` under the reserved cache `_versions`
-- (the value is the counter in decimal), so they travel through the log
-- like any entry and every host keeps them in memory.
CREATE FUNCTION {schema}.bump(p_name text) RETURNS TABLE (version bigint, tx xid8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v bigint;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$' THEN
        RAISE EXCEPTION 'tandem: invalid version name %', quote_nullable(p_name)
            USING ERRCODE = '22023',
                  HINT = 'version names match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}';
    END IF;
    INSERT INTO {schema}.entries AS e (cache, key, value, content_type)
    VALUES ('_versions', p_name, convert_to('1', 'UTF8'), 'text/plain')
    ON CONFLICT (cache, key) DO UPDATE
        SET value = convert_to((convert_from(e.value, 'UTF8')::bigint + 1)::text, 'UTF8'),
            updated_at = now()
    RETURNING convert_from(e.value, 'UTF8')::bigint INTO v;
    INSERT INTO {schema}.log (kind, cache, key) VALUES ('put', '_versions', p_name);
    PERFORM pg_notify('{channel}_log', '');
    RETURN QUERY SELECT v, pg_current_xact_id();
END $$;
