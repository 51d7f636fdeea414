//! The consistency model against a real PostgreSQL and real tandem processes:
//! late commits, concurrent writers of one key, writes from app transactions
//! through the SQL functions, and waiting for this host or the cluster.

mod common;

use std::time::{Duration, Instant};

use common::{Host, TestDb, assert_converged, connect, tempdir};
use futures_util::StreamExt;

async fn hosts(db: &TestDb, root: &std::path::Path, n: usize) -> Vec<Host> {
    let mut hosts = Vec::new();
    for i in 0..n {
        hosts.push(Host::start(&db.url, &format!("h{i}"), root, &[]).await);
    }
    for h in &hosts {
        h.wait_ready().await;
    }
    hosts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_never_skipped_and_delays_nobody_else() {
    let db = TestDb::new().await;
    let root = tempdir();
    let hs = hosts(&db, root.path(), 3).await;

    // An unrelated write transaction that stays open for the whole test.
    let unrelated = db.client().await;
    unrelated
        .batch_execute("CREATE TABLE app_orders (id int)")
        .await
        .unwrap();
    unrelated
        .batch_execute("BEGIN; INSERT INTO app_orders VALUES (1)")
        .await
        .unwrap();

    // An app transaction takes a transaction id (and a log id) first...
    let late = db.client().await;
    late.batch_execute("BEGIN").await.unwrap();
    let late_tx: String = late
        .query_one(
            "SELECT tandem.put('c', 'late', 'from the slow transaction')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // ...while later writes commit and reach every host without waiting for it.
    let started = Instant::now();
    let r: serde_json::Value = hs[0]
        .http
        .put(hs[0].url("/v1/cache/c/after?wait=cluster&timeout=5s"))
        .body("written after")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["applied"], true, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let after_tx: u64 = r["token"].as_str().unwrap().parse().unwrap();
    assert!(late_tx.parse::<u64>().unwrap() < after_tx);
    let late_id: i64 = db
        .client()
        .await
        .query_opt("SELECT 1::int8 FROM tandem.log WHERE key = 'late'", &[])
        .await
        .unwrap()
        .map_or(0, |r| r.get(0));
    assert_eq!(late_id, 0, "the uncommitted row is invisible to others");
    for h in &hs {
        assert_eq!(
            h.get("c", "after").await.as_deref(),
            Some(&b"written after"[..])
        );
        assert_eq!(h.get("c", "late").await, None);
    }

    // Now the slow transaction commits: every host reads it.
    late.batch_execute("COMMIT").await.unwrap();
    let w: serde_json::Value = hs[1]
        .get_json(&format!("/v1/wait?token={late_tx}&for=cluster&timeout=10s"))
        .await;
    assert_eq!(w["applied"], true, "{w}");
    for h in &hs {
        assert_eq!(
            h.get("c", "late").await.as_deref(),
            Some(&b"from the slow transaction"[..])
        );
    }
    let refs: Vec<&Host> = hs.iter().collect();
    assert_converged(&db, &refs, Duration::from_secs(10)).await;
    unrelated.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_transaction_to_commit_wins_everywhere() {
    let db = TestDb::new().await;
    let root = tempdir();
    let hs = hosts(&db, root.path(), 3).await;

    // T1 writes first, T2 writes the same key and waits on T1's row lock.
    let t1 = db.client().await;
    let t2 = db.client().await;
    t1.batch_execute("BEGIN; SELECT tandem.put('c', 'k', 'from T1')")
        .await
        .unwrap();
    t2.batch_execute("BEGIN").await.unwrap();
    let t2_write = tokio::spawn(async move {
        t2.batch_execute("SELECT tandem.put('c', 'k', 'from T2')")
            .await
            .unwrap();
        t2
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    t1.batch_execute("COMMIT").await.unwrap();
    let t2 = t2_write.await.unwrap();
    // Hosts may apply T1's value in between; T2 commits last and must win.
    tokio::time::sleep(Duration::from_millis(300)).await;
    t2.batch_execute("COMMIT").await.unwrap();

    // And the reverse order of transaction ids: the later id commits first.
    let t3 = db.client().await;
    let t4 = db.client().await;
    t3.batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    t4.batch_execute("BEGIN; SELECT tandem.put('c', 'j', 'from T4')")
        .await
        .unwrap();
    t4.batch_execute("COMMIT").await.unwrap();
    t3.batch_execute("SELECT tandem.put('c', 'j', 'from T3 (lower id, committed last)')")
        .await
        .unwrap();
    t3.batch_execute("COMMIT").await.unwrap();

    let refs: Vec<&Host> = hs.iter().collect();
    assert_converged(&db, &refs, Duration::from_secs(10)).await;
    for h in &hs {
        assert_eq!(h.get("c", "k").await.as_deref(), Some(&b"from T2"[..]));
        assert_eq!(
            h.get("c", "j").await.as_deref(),
            Some(&b"from T3 (lower id, committed last)"[..])
        );
    }

    // Concurrent HTTP writers on every host hammering the same few keys.
    let mut writers = Vec::new();
    for (i, h) in hs.iter().enumerate() {
        let http = h.http.clone();
        let base = h.url("/v1/cache/hot/");
        writers.push(tokio::spawn(async move {
            for n in 0..40 {
                let key = ["a", "b", "c"][n % 3];
                let r = http
                    .put(format!("{base}{key}"))
                    .body(format!("host {i} write {n}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_converged(&db, &refs, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_transactions_write_through_sql_functions() {
    let db = TestDb::new().await;
    let root = tempdir();
    let hs = hosts(&db, root.path(), 2).await;
    let app = db.client().await;
    app.batch_execute("CREATE TABLE pages (slug text PRIMARY KEY, body text)")
        .await
        .unwrap();

    // Rolled back: neither the app's row nor the cache change exists.
    app.batch_execute(
        "BEGIN; INSERT INTO pages VALUES ('draft', 'x'); SELECT tandem.put('pages', 'draft', 'x'); ROLLBACK",
    )
    .await
    .unwrap();

    // Committed together: the page and its cache entry, in every overload.
    let tx: String = {
        app.batch_execute("BEGIN; INSERT INTO pages VALUES ('home', '<h1>Home</h1>')")
            .await
            .unwrap();
        app.batch_execute("SELECT tandem.put('pages', 'home', '<h1>Home</h1>', 'text/html')")
            .await
            .unwrap();
        app.batch_execute("SELECT tandem.put('pages', 'plain', 'just text')")
            .await
            .unwrap();
        app.batch_execute("SELECT tandem.put('pages', 'meta', '{\"title\": \"Home\"}'::jsonb)")
            .await
            .unwrap();
        app.batch_execute("SELECT tandem.put('pages', 'bin', '\\x00ff'::bytea)")
            .await
            .unwrap();
        let tx: String = app
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await
            .unwrap()
            .get(0);
        app.batch_execute("COMMIT").await.unwrap();
        tx
    };
    let w = hs[1]
        .get_json(&format!("/v1/wait?token={tx}&for=local"))
        .await;
    assert_eq!(w["applied"], true, "{w}");
    let local = hs[1].read_cache();
    let get = |k: &str| local.get(&("pages".to_string(), k.to_string())).cloned();
    assert_eq!(get("draft"), None);
    assert_eq!(
        get("home"),
        Some((b"<h1>Home</h1>".to_vec(), "text/html".into()))
    );
    assert_eq!(
        get("plain"),
        Some((b"just text".to_vec(), "text/plain; charset=utf-8".into()))
    );
    assert_eq!(
        get("meta"),
        Some((br#"{"title": "Home"}"#.to_vec(), "application/json".into()))
    );
    assert_eq!(
        get("bin"),
        Some((vec![0, 255], "application/octet-stream".into()))
    );
    let r = hs[1]
        .http
        .get(hs[1].url("/v1/cache/pages/home"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/html");

    // Batch, delete and clear from SQL.
    app.batch_execute(
        "SELECT tandem.batch(ARRAY['put','put','delete'], ARRAY['b','b','pages'], ARRAY['1','2','plain'], \
         ARRAY['one'::bytea, 'two'::bytea, ''::bytea], ARRAY['text/plain','text/plain',''])",
    )
    .await
    .unwrap();
    // A key named twice takes the per-operation path, in order: put then
    // delete leaves nothing, delete then put leaves the value.
    app.batch_execute(
        "SELECT tandem.batch(ARRAY['put','delete','delete','put'], ARRAY['d','d','d','d'], \
         ARRAY['gone','gone','kept','kept'], ARRAY['1','','','2']::bytea[], ARRAY[NULL,NULL,NULL,NULL])",
    )
    .await
    .unwrap();
    // One invalid operation among distinct keys: the precise error, nothing written.
    let e = app
        .batch_execute(
            "SELECT tandem.batch(ARRAY['put','put'], ARRAY['d','Bad Cache'], ARRAY['x','y'], \
             ARRAY['1','2']::bytea[], ARRAY[NULL,NULL])",
        )
        .await
        .unwrap_err();
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("invalid cache name 'Bad Cache'"), "{msg}");
    let e = app
        .batch_execute(
            "SELECT tandem.batch('{{put,put}}', '{{d,d}}', '{{x,y}}', '{{1,2}}'::bytea[], '{{a,b}}')",
        )
        .await
        .unwrap_err();
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("one-dimensional"), "{msg}");
    app.batch_execute("BEGIN; SELECT tandem.clear('pages'); SELECT tandem.put('pages', 'after-clear', 'new'); COMMIT")
        .await
        .unwrap();
    let refs: Vec<&Host> = hs.iter().collect();
    assert_converged(&db, &refs, Duration::from_secs(10)).await;
    let local = hs[0].read_cache();
    assert_eq!(local.keys().filter(|(c, _)| c == "pages").count(), 1);
    assert_eq!(local.keys().filter(|(c, _)| c == "b").count(), 2);
    let d: Vec<_> = local.iter().filter(|((c, _), _)| c == "d").collect();
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].0.1, "kept");
    assert_eq!(d[0].1.0, b"2");
    assert_eq!(d[0].1.1, "application/octet-stream");

    // Bad names are refused by the database itself, with a clear message.
    let e = app
        .batch_execute("SELECT tandem.put('Bad Cache', 'k', 'v')")
        .await
        .unwrap_err();
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("invalid cache name"), "{msg}");
    let e = app
        .batch_execute("SELECT tandem.put('c', '', 'v')")
        .await
        .unwrap_err();
    assert!(
        e.as_db_error()
            .unwrap()
            .message()
            .contains("keys are 1 to 1024 bytes")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_notification_per_transaction() {
    let db = TestDb::new().await;
    let root = tempdir();
    let hs = hosts(&db, root.path(), 1).await;
    let (listener, mut conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.channel().to_string());
            }
        }
    });
    listener.batch_execute("LISTEN tandem_log").await.unwrap();
    let app = db.client().await;
    app.batch_execute(
        "BEGIN; SELECT tandem.put('c', 'k' || i, 'v') FROM generate_series(1, 500) i; \
         SELECT tandem.delete('c', 'k1'); SELECT tandem.clear('other'); COMMIT",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut count = 0;
    while rx.try_recv().is_ok() {
        count += 1;
    }
    assert_eq!(count, 1, "one transaction, one NOTIFY");
    let refs: Vec<&Host> = hs.iter().collect();
    assert_converged(&db, &refs, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_this_host_or_the_cluster() {
    let db = TestDb::new().await;
    let root = tempdir();
    let hs = hosts(&db, root.path(), 3).await;

    // wait=cluster: as soon as it answers, every host has the value.
    for i in 0..5 {
        let r = hs[0]
            .http
            .put(hs[0].url(&format!("/v1/cache/c/k{i}?wait=cluster")))
            .body(format!("v{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let token = r.headers()["tandem-token"].to_str().unwrap().to_string();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["applied"], true);
        assert_eq!(body["token"], token.as_str());
        for h in &hs {
            assert_eq!(
                h.get("c", &format!("k{i}")).await,
                Some(format!("v{i}").into_bytes()),
                "{}",
                h.id
            );
        }
    }

    // wait=local: this host has it on return.
    let r: serde_json::Value = hs[1]
        .http
        .delete(hs[1].url("/v1/cache/c/k0?wait=local"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["applied"], true);
    assert_eq!(hs[1].get("c", "k0").await, None);

    // Read-your-writes on another host with ?after=<token>.
    let token = hs[0].put("c", "ryw", b"fresh", "").await;
    let r = hs[2]
        .http
        .get(hs[2].url(&format!("/v1/cache/c/ryw?after={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), "fresh");

    // A host that is frozen makes wait=cluster time out with 202 (the write
    // itself committed), then catch up when it thaws.
    hs[2].pause();
    let r = hs[0]
        .http
        .put(hs[0].url("/v1/cache/c/frozen?wait=cluster&timeout=700ms"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["applied"], false);
    hs[2].resume();
    let refs: Vec<&Host> = hs.iter().collect();
    assert_converged(&db, &refs, Duration::from_secs(10)).await;

    // A token that never commits: /v1/wait times out with 504 JSON.
    let r = hs[0]
        .http
        .get(hs[0].url("/v1/wait?token=999999999&timeout=200ms"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_applied");
    let _ = connect;
}

/// Buffers the `PAGE` statement touches for one read after `position`.
async fn page_buffers(client: &tokio_postgres::Client, position: &str) -> i64 {
    let page = tandem::db::render(tandem::sync::read::PAGE, "tandem");
    let pos: tandem::sync::position::Position = tandem::sync::position::Position {
        done: position.parse().unwrap(),
        pending: None,
    };
    let (start_tx, start_id) = tandem::sync::read::range_start(&pos);
    let start_tx = start_tx.to_string();
    explain_buffers(
        client,
        &page,
        &[
            &position,
            &"0",
            &0i64,
            &None::<String>,
            &1000i64,
            &start_tx,
            &start_id,
        ],
    )
    .await
}

/// Buffers the heartbeat statement touches for a host at `position`, after
/// as many calls in the same session as make PostgreSQL switch a plpgsql
/// statement to its generic plan.
async fn heartbeat_buffers(client: &tokio_postgres::Client, position: &str) -> i64 {
    let call = "SELECT * FROM tandem.heartbeat('probe', 'test', '', now(), '5s', $1, true, 0, 3)";
    for _ in 0..8 {
        client.execute(call, &[&position]).await.unwrap();
    }
    explain_buffers(client, call, &[&position]).await
}

/// The buffers a statement touched, from `EXPLAIN (ANALYZE, BUFFERS)` (a
/// count, not a timing).
async fn explain_buffers(
    client: &tokio_postgres::Client,
    statement: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    let rows = client
        .query(&format!("EXPLAIN (ANALYZE, BUFFERS) {statement}"), params)
        .await
        .unwrap();
    // The first "Buffers:" line is the whole statement's.
    let line: String = rows
        .iter()
        .map(|r| r.get::<_, String>(0))
        .find(|l| l.trim_start().starts_with("Buffers:"))
        .expect("EXPLAIN shows buffers");
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| ["hit", "read"].contains(k))
        .map(|(_, v)| v.parse::<i64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_costs_the_same_however_long_the_retained_log() {
    let db = TestDb::new().await;
    let root = tempdir();
    // A host creates the schema.
    let h = Host::start(&db.url, "h0", root.path(), &[]).await;
    h.wait_ready().await;
    let client = db.client().await;
    let put_many = |n: i32| {
        format!("SELECT count(tandem.put('big', 'k' || i, 'v')) FROM generate_series(1, {n}) i")
    };
    let snapshot = || async {
        let s: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .unwrap()
            .get(0);
        s
    };
    // A writing transaction stays open at both positions, as one often is
    // on a busy site: the host's position lists it as in progress, and the
    // read and the heartbeat look its rows up (it has none yet).
    let open = db.client().await;
    open.batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    // A few recent rows to read, after a short log...
    client.batch_execute(&put_many(100)).await.unwrap();
    let pos = snapshot().await;
    assert!(
        pos.split(':').nth(2).is_some_and(|xip| !xip.is_empty()),
        "the position {pos} lists the open transaction"
    );
    client.batch_execute(&put_many(3)).await.unwrap();
    let short = page_buffers(&client, &pos).await;
    let short_beat = heartbeat_buffers(&client, &pos).await;
    // ...and the same after 40,000 more rows that every host has read.
    client.batch_execute(&put_many(40_000)).await.unwrap();
    // The statistics say what a bulk import leaves: few, large transactions
    // (ANALYZE samples 30,000 rows and may well miss a three-row one).
    client
        .batch_execute(
            "ALTER TABLE tandem.log ALTER COLUMN tx SET (n_distinct = 2);
             ANALYZE tandem.log",
        )
        .await
        .unwrap();
    let pos = snapshot().await;
    client.batch_execute(&put_many(3)).await.unwrap();
    assert!(pos.split(':').nth(2).is_some_and(|xip| !xip.is_empty()));
    let long = page_buffers(&client, &pos).await;
    assert!(
        long <= short + 10,
        "a read after 40,000 retained rows touched {long} buffers, after 100 rows {short}"
    );
    let long_beat = heartbeat_buffers(&client, &pos).await;
    assert!(
        long_beat <= short_beat + 20,
        "a heartbeat after 40,000 retained rows touched {long_beat} buffers, after 100 rows {short_beat}"
    );
    open.batch_execute("COMMIT").await.unwrap();
}

/// Rows written around tandem's SQL functions that name an invalid cache or
/// key (a cache such as `../escape` or `/`, an empty or NULL key) are
/// skipped, logged and counted, by incremental reads and by cold boots: no
/// file is written outside the cache directory, and everything else keeps
/// flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_naming_invalid_caches_or_keys_are_skipped() {
    let db = TestDb::new().await;
    let root = tempdir();
    let hs = hosts(&db, root.path(), 1).await;
    let h = &hs[0];
    let c = db.client().await;
    c.batch_execute(
        "INSERT INTO tandem.entries (cache, key, value, content_type) VALUES \
           ('../escape', 'x', 'bad', 'text/plain'), ('pages', '', 'bad', 'text/plain'), \
           ('/', 'y', 'bad', 'text/plain'); \
         INSERT INTO tandem.log (kind, cache, key) VALUES \
           ('put', '../escape', 'x'), ('put', 'pages', ''), ('delete', 'pages', NULL), \
           ('put', '/', 'y'), ('clear', '../escape', NULL);",
    )
    .await
    .unwrap();
    h.put("pages", "after", b"fine", "?wait=local").await;
    assert_eq!(h.get("pages", "after").await.as_deref(), Some(&b"fine"[..]));
    let skipped = h.metric("tandem_sync_skipped_rows_total").await.unwrap();
    assert_eq!(skipped, 5.0, "{}", h.log_text());
    assert!(h.log_contains("../escape"), "the log names the row");
    // A cold boot reads `entries`: the three invalid rows are skipped too.
    let r = h.http.post(h.url("/v1/resync")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    common::eventually("the cold boot", Duration::from_secs(20), || async {
        h.metric("tandem_sync_skipped_rows_total").await == Some(8.0)
    })
    .await;
    h.wait_ready().await;
    assert_eq!(h.get("pages", "after").await.as_deref(), Some(&b"fine"[..]));
    let entries = h.read_cache();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(!h.dir.join("escape").exists() && !root.path().join("escape").exists());
}
