//! The search benchmark: prints tandem's figures beside PostgreSQL full-text
//! search over the same documents and queries, measured in the same run.
//!
//!     scripts/install-test-deps.sh --bench && cargo bench --bench search
//!
//! Corpus: PostgreSQL's HTML documentation (`postgresql-doc-15`: one
//! document per page, tags stripped; title, section and body), then
//! BENCH_DOCS (default 100,000) documents generated from its vocabulary
//! (word frequencies as in the real pages; bodies of 60-240 words).
//!
//! For each corpus, two tandem hosts share one PostgreSQL: documents are
//! written through host A (`POST /v1/batch`, 1,000 per batch) and indexed
//! by both; figures:
//! - indexing: documents per second from the first write until host B's
//!   index holds them all (the whole path: log, apply, index, commit, with
//!   both hosts applying and indexing every document on the same cores); a
//!   rebuild of B's index from its cache directory (indexing alone); and B
//!   catching up alone: stopped while A takes the same documents into a
//!   second cache and index, then restarted (apply, index, commit on one
//!   host, as after a restart or a burst of writes);
//! - apply-to-searchable on another host: a document with a unique word is
//!   written through A (every 100 ms); the time until a search on B finds it;
//! - query latency, one client, keep-alive, through tandem's HTTP API, for
//!   one-word, two-word and phrase queries; the same queries in PostgreSQL
//!   FTS: a `tsvector` column with a GIN index, `ts_rank` top 20, one
//!   connection. First with the same answer (the top 20 keys with their
//!   scores; tandem also counts the total), then tandem's default answer
//!   (also the stored fields, snippets and facet counts).
//!
//! Environment: BENCH_DOCS, BENCH_QUERIES (per kind, default 500),
//! BENCH_TOKENIZER (the text fields' tokenizer, default `english`),
//! BENCH_CORPUS (`pages` or `generated`: only that one), BENCH_HOLD (keep
//! the hosts up this many seconds after each corpus, for profiling),
//! BENCH_COMMIT_INTERVAL (the hosts' `search.commit_interval`),
//! BENCH_QUIET_WAIT and BENCH_MIN_FILE_RATE (wait before starting for a
//! quiet disk and a quick filesystem: see `common::wait_for_quiet_machine`;
//! the machine's state is printed at the start and the end either way),
//! TANDEM_BENCH_DATABASE_URL (an existing server instead of a throwaway one).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Host, Pg, TestDb, env_u64, percentile, proc_stat, tempdir};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const DOC_DIRS: &[&str] = &["/usr/share/doc/postgresql-doc-15/html"];

/// The index: `english` text fields, which stem and leave out English stop
/// words, as the reference's `english` text search configuration does (the
/// same words are searchable on both sides). BENCH_TOKENIZER=en_stem keeps
/// the stop words.
fn config() -> String {
    let tokenizer = std::env::var("BENCH_TOKENIZER").unwrap_or_else(|_| "english".into());
    // `docs` for every figure but one host's catch-up, which fills `backlog`.
    ["docs", "backlog"]
        .iter()
        .map(|name| {
            format!(
                r#"
[[search.index]]
name = "{name}"
fields = [
  {{ name = "title", type = "text", tokenizer = "{tokenizer}" }},
  {{ name = "section", type = "string", facet = true }},
  {{ name = "body", type = "text", tokenizer = "{tokenizer}" }},
]
"#
            )
        })
        .collect()
}

fn fmt(v: &mut [f64]) -> String {
    format!(
        "p50 {:7.2} ms  p99 {:7.2} ms",
        percentile(v, 0.5),
        percentile(v, 0.99)
    )
}

struct Doc {
    key: String,
    title: String,
    section: String,
    body: String,
}

/// Text without tags, entities decoded, whitespace collapsed.
fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&nbsp;", " ")
        .replace("&#160;", " ")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)? + i;
    Some(&s[i..j])
}

fn load_pages() -> Vec<Doc> {
    let dir = DOC_DIRS
        .iter()
        .map(Path::new)
        .find(|d| d.join("index.html").exists())
        .expect("the PostgreSQL documentation: run scripts/install-test-deps.sh --bench");
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "html"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            let html = std::fs::read_to_string(p).unwrap();
            let title = strip_tags(between(&html, "<title>", "</title>").unwrap_or(""));
            let section = between(&html, "accesskey=\"u\"", "</a>")
                .and_then(|a| between(a, "title=\"", "\""))
                .unwrap_or("")
                .to_string();
            let body_html = html.split_once("<body").map_or(html.as_str(), |(_, b)| b);
            Doc {
                key: p.file_stem().unwrap().to_string_lossy().into_owned(),
                title,
                section,
                body: strip_tags(body_html),
            }
        })
        .collect()
}

fn words(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2 && w.chars().all(|c| c.is_ascii_alphabetic()))
        .map(|w| w.to_lowercase())
}

/// Documents generated from the pages' vocabulary, with its frequencies.
fn generate(pages: &[Doc], n: usize, rng: &mut StdRng) -> Vec<Doc> {
    let mut freq: HashMap<String, u64> = HashMap::new();
    for p in pages {
        for w in words(&p.body) {
            *freq.entry(w).or_default() += 1;
        }
    }
    let mut vocab: Vec<(String, u64)> = freq.into_iter().collect();
    vocab.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut cumulative = Vec::with_capacity(vocab.len());
    let mut sum = 0u64;
    for (_, f) in &vocab {
        sum += f;
        cumulative.push(sum);
    }
    let pick = |rng: &mut StdRng| {
        let x = rng.random_range(0..sum);
        let i = cumulative.partition_point(|c| *c <= x);
        vocab[i].0.as_str()
    };
    let sections: Vec<&str> = pages.iter().map(|p| p.section.as_str()).collect();
    (0..n)
        .map(|i| {
            let title: Vec<&str> = (0..rng.random_range(3..8)).map(|_| pick(rng)).collect();
            let body: Vec<&str> = (0..rng.random_range(60..240)).map(|_| pick(rng)).collect();
            Doc {
                key: format!("g{i}"),
                title: title.join(" "),
                section: sections[rng.random_range(0..sections.len())].to_string(),
                body: body.join(" "),
            }
        })
        .collect()
}

/// Query texts: one word, two words, a phrase taken from a document.
fn queries(docs: &[Doc], n: usize, rng: &mut StdRng) -> [Vec<String>; 3] {
    let mut freq: HashMap<String, u64> = HashMap::new();
    for d in docs.iter().take(20_000) {
        for w in words(&d.body) {
            *freq.entry(w).or_default() += 1;
        }
    }
    let mut vocab: Vec<(String, u64)> = freq.into_iter().collect();
    vocab.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    // Neither the most common words nor the rarest: ranks 20..2000.
    let band = &vocab[20.min(vocab.len() - 1)..2000.min(vocab.len())];
    let word = |rng: &mut StdRng| band[rng.random_range(0..band.len())].0.clone();
    let one = (0..n).map(|_| word(rng)).collect();
    let two = (0..n)
        .map(|_| format!("{} {}", word(rng), word(rng)))
        .collect();
    let phrase = (0..n)
        .map(|_| {
            loop {
                let d = &docs[rng.random_range(0..docs.len())];
                let ws: Vec<String> = words(&d.body).collect();
                if ws.len() > 3 {
                    let i = rng.random_range(0..ws.len() - 1);
                    break format!("{} {}", ws[i], ws[i + 1]);
                }
            }
        })
        .collect();
    [one, two, phrase]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = match std::env::var("TANDEM_BENCH_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Pg::from_url(&url),
        _ => common::start_cluster(true),
    };
    let mut rng = StdRng::seed_from_u64(42);
    let pages = load_pages();
    let n = env_u64("BENCH_DOCS", 100_000) as usize;
    let q = env_u64("BENCH_QUERIES", 500) as usize;
    println!(
        "tandem search benchmark ({} cores); reference: PostgreSQL FTS (tsvector + GIN, ts_rank), one connection",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let generated = generate(&pages, n, &mut rng);
    // Where the machine's file creation is probed (removed at the end).
    let probe = tempdir();
    common::wait_for_quiet_machine(probe.path()).await;
    println!("at the start: {}", common::machine_pressure(probe.path()));
    let only = std::env::var("BENCH_CORPUS").unwrap_or_default();
    if only != "generated" {
        run(&pg, "PostgreSQL docs (real pages)", &pages, q, &mut rng).await;
    }
    if only != "pages" {
        run(
            &pg,
            &format!("{n} generated documents"),
            &generated,
            q,
            &mut rng,
        )
        .await;
    }
}

async fn run(pg: &Pg, label: &str, docs: &[Doc], nq: usize, rng: &mut StdRng) {
    let bytes: usize = docs.iter().map(|d| d.title.len() + d.body.len()).sum();
    println!(
        "\n== {label}: {} documents, {:.1} MiB of text",
        docs.len(),
        bytes as f64 / (1 << 20) as f64
    );
    let db = TestDb::on(pg).await;
    let root = tempdir();
    // BENCH_COMMIT_INTERVAL: the hosts' search.commit_interval (default
    // the daemon's own).
    let interval = std::env::var("BENCH_COMMIT_INTERVAL").unwrap_or_default();
    let mut env = vec![("TANDEM_LOG_LEVEL", "info")];
    if !interval.is_empty() {
        env.push(("TANDEM_SEARCH_COMMIT_INTERVAL", interval.as_str()));
    }
    let a = Host::start_with_config(&db.url, "a", root.path(), &env, &config()).await;
    let mut b = Host::start_with_config(&db.url, "b", root.path(), &env, &config()).await;
    a.wait_ready().await;
    b.wait_ready().await;

    // Indexing, end to end.
    let cpu = |h: &Host| h.pid().map_or(0.0, |pid| proc_stat(pid).0);
    let cpu_before = (cpu(&a), cpu(&b));
    let started = Instant::now();
    write_docs(&a, "docs", docs).await;
    let written = started.elapsed();
    wait_docs(&b, "docs", docs.len()).await;
    let indexed = started.elapsed();
    println!(
        "indexing   tandem, written through A, searchable on B: {:8.0} docs/s ({:.1} s; writes took {:.1} s; CPU-s A {:.1}, B {:.1})",
        docs.len() as f64 / indexed.as_secs_f64(),
        indexed.as_secs_f64(),
        written.as_secs_f64(),
        cpu(&a) - cpu_before.0,
        cpu(&b) - cpu_before.1
    );
    let started = Instant::now();
    let r = b
        .http
        .post(b.url("/v1/search/docs/rebuild"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = b.get_json("/v1/search").await;
        if status_of(&s, "docs")["rebuilding"].is_null() {
            break;
        }
    }
    println!(
        "           tandem, rebuild from the cache directory:   {:8.0} docs/s",
        docs.len() as f64 / started.elapsed().as_secs_f64()
    );
    // Indexing on one host, not shared with another host's: B is stopped
    // while A takes the same documents into a second cache and index, then
    // B catches up from the log (apply, index, commit), as a host does after
    // a restart or a burst of writes.
    b.stop().await;
    write_docs(&a, "backlog", docs).await;
    let started = Instant::now();
    b.spawn().await;
    wait_docs(&b, "backlog", docs.len()).await;
    let took = started.elapsed();
    let cpu = cpu(&b);
    let cold = b
        .metric("tandem_sync_cold_boot_duration_seconds_count")
        .await
        .unwrap_or(0.0);
    assert_eq!(cold, 0.0, "host B cold-booted instead of catching up");
    println!(
        "           tandem, host B catching up alone (stopped while A took them; from process start): {:8.0} docs/s ({:.1} s, {:.1} CPU-s: {:.0} docs per CPU-second)",
        docs.len() as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        cpu,
        docs.len() as f64 / cpu.max(0.001)
    );
    let client = db.client().await;
    let started = Instant::now();
    client
        .batch_execute(
            "CREATE TABLE fts (key text PRIMARY KEY, title text, section text, body text,
               tsv tsvector GENERATED ALWAYS AS
                 (setweight(to_tsvector('english', title), 'A') || to_tsvector('english', body)) STORED)",
        )
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO fts (key, title, section, body) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])")
        .await
        .unwrap();
    for chunk in docs.chunks(1000) {
        let col = |f: fn(&Doc) -> &String| chunk.iter().map(|d| f(d).clone()).collect::<Vec<_>>();
        client
            .execute(
                &insert,
                &[
                    &col(|d| &d.key),
                    &col(|d| &d.title),
                    &col(|d| &d.section),
                    &col(|d| &d.body),
                ],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute("CREATE INDEX fts_tsv ON fts USING gin (tsv); ANALYZE fts")
        .await
        .unwrap();
    println!(
        "           PostgreSQL, insert + GIN index:            {:8.0} docs/s",
        docs.len() as f64 / started.elapsed().as_secs_f64()
    );

    apply_to_searchable(&a, &b).await;

    let [one, two, phrase] = queries(docs, nq, rng);
    let sql = |tsquery: &str| {
        format!(
            "SELECT key, ts_rank(tsv, q) AS rank FROM fts, {tsquery}('english', $1) q
              WHERE tsv @@ q ORDER BY rank DESC LIMIT 20"
        )
    };
    let plain = client.prepare(&sql("plainto_tsquery")).await.unwrap();
    let phrase_stmt = client.prepare(&sql("phraseto_tsquery")).await.unwrap();
    println!(
        "queries    (same answer: tandem over HTTP answers the top 20 keys with scores, and the \
         total; PostgreSQL the top 20 keys by ts_rank)"
    );
    // What PostgreSQL's statement answers: keys and scores (tandem adds the
    // total count, which PostgreSQL does not compute).
    let keys: &[(&str, &str)] = &[("fields", ""), ("highlight", "false"), ("facets", "")];
    let rows = [
        ("one word", &one, &plain, false, keys),
        ("two words", &two, &plain, false, keys),
        ("phrase", &phrase, &phrase_stmt, true, keys),
        ("one word, full answer", &one, &plain, false, &[][..]),
        ("two words, full answer", &two, &plain, false, &[]),
        ("phrase, full answer", &phrase, &phrase_stmt, true, &[]),
    ];
    for (i, (kind, qs, stmt, quote, extra)) in rows.into_iter().enumerate() {
        if i == 3 {
            println!(
                "           (tandem's default answer: also every stored field, highlighted \
                 snippets and facet counts; PostgreSQL as above)"
            );
        }
        let mut t_lat = Vec::new();
        let mut inside = Vec::new();
        let mut hits = 0u64;
        for text in qs.iter() {
            let q = if quote {
                format!("\"{text}\"")
            } else {
                text.clone()
            };
            let t = Instant::now();
            let r = b
                .http
                .get(b.url("/v1/search/docs"))
                .query(&[("q", q.as_str())])
                .query(extra)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            // What a client of the answer reads (the rest is skipped over).
            #[derive(serde::Deserialize)]
            struct Answer {
                total: u64,
                took_ms: f64,
            }
            let body: Answer = r.json().await.unwrap();
            t_lat.push(t.elapsed().as_secs_f64() * 1e3);
            inside.push(body.took_ms);
            hits += body.total;
        }
        let mut p_lat = Vec::new();
        let mut p_hits = 0u64;
        for text in qs.iter() {
            let t = Instant::now();
            let rows = client.query(stmt, &[text]).await.unwrap();
            p_lat.push(t.elapsed().as_secs_f64() * 1e3);
            p_hits += rows.len() as u64;
        }
        let ratio = percentile(&mut p_lat, 0.5) / percentile(&mut t_lat, 0.5);
        println!(
            "  {kind:<10} tandem {}   PostgreSQL {}   {ratio:.1}x faster at p50",
            fmt(&mut t_lat),
            fmt(&mut p_lat),
        );
        println!(
            "             (inside the daemon p50 {:.2} ms; mean hits: tandem {:.0} counted, PostgreSQL {:.1} returned)",
            percentile(&mut inside, 0.5),
            hits as f64 / qs.len() as f64,
            p_hits as f64 / qs.len() as f64
        );
    }
    // Before this corpus's hosts, files and database are removed (their
    // deletion is I/O of the benchmark's own).
    println!(
        "after the queries: {}",
        common::machine_pressure(root.path())
    );
    let hold = env_u64("BENCH_HOLD", 0);
    if hold > 0 {
        println!(
            "holding {hold} s: host B answers at {}",
            b.url("/v1/search/docs")
        );
        tokio::time::sleep(Duration::from_secs(hold)).await;
    }
}

/// Writes `docs` into `cache` through `a`, 1,000 per batch.
async fn write_docs(a: &Host, cache: &str, docs: &[Doc]) {
    for chunk in docs.chunks(1000) {
        let ops: Vec<Value> = chunk
            .iter()
            .map(|d| {
                json!({"op": "put", "cache": cache, "key": d.key,
                       "json": {"title": d.title, "section": d.section, "body": d.body}})
            })
            .collect();
        let r = a
            .http
            .post(a.url("/v1/batch"))
            .json(&json!({ "ops": ops }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// The status of `index` in an answer of `GET /v1/search` (null if absent).
fn status_of<'a>(search: &'a Value, index: &str) -> &'a Value {
    search["indexes"]
        .as_array()
        .and_then(|ixs| ixs.iter().find(|ix| ix["name"] == index))
        .map_or(&Value::Null, |ix| &ix["status"])
}

/// Waits until `index` on `h` holds `n` documents.
async fn wait_docs(h: &Host, index: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = h.get_json("/v1/search").await;
        if status_of(&s, index)["documents"].as_u64() == Some(n as u64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "index {index} never held {n} documents: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A document with a unique word written through `a`, found on `b`.
async fn apply_to_searchable(a: &Host, b: &Host) {
    let mut lat = Vec::new();
    for i in 0..150 {
        let word = format!("zq{i}x");
        let started = Instant::now();
        a.put(
            "docs",
            &format!("probe{i}"),
            json!({"title": word, "body": "probe"})
                .to_string()
                .as_bytes(),
            "",
        )
        .await;
        loop {
            let r = b
                .http
                .get(b.url("/v1/search/docs"))
                .query(&[("q", word.as_str()), ("limit", "0")])
                .send()
                .await
                .unwrap();
            let body: Value = r.json().await.unwrap();
            if body["total"] == 1 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "probe {i} never found"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(started.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "apply-to-searchable on another host (write on A -> found on B, every 100 ms): {}",
        fmt(&mut lat)
    );
}
