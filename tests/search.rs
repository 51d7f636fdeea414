//! The local search indexes: the same answers on every host, deletes and
//! clears propagate, a kill -9 mid-indexing leaves an index equal to the
//! cache directory, a schema change rebuilds while searches keep answering,
//! corrupt and missing indexes are rebuilt, bad input gets clear errors.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Host, TestDb, assert_converged, eventually, tempdir};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[[search.index]]
name = "docs"
cache = "docs"
fields = [
  { name = "title", type = "text", tokenizer = "en_stem" },
  { name = "body", type = "text" },
  { name = "tag", type = "string", fast = true, facet = true },
  { name = "year", type = "i64", fast = true },
  { name = "published", pointer = "/meta/published", type = "date", fast = true },
]
"#;

const WORDS: &[&str] = &[
    "apple", "brown", "fox", "lazy", "river", "stone", "cloud", "green", "table", "window",
];
const TAGS: &[&str] = &["alpha", "beta", "gamma"];

/// Document `i` of the generated corpus.
fn doc(i: usize) -> Value {
    json!({
        "title": format!("{} running {}", WORDS[i % 10], WORDS[(i / 10) % 10]),
        "body": format!("common words {} {} {}", WORDS[(i * 7) % 10], WORDS[(i * 3) % 10], i),
        "tag": TAGS[i % 3],
        "year": 2000 + (i % 20) as i64,
        "meta": {"published": format!("2024-01-{:02}T00:00:00Z", 1 + i % 28)},
    })
}

async fn put_docs(h: &Host, range: std::ops::Range<usize>, wait: &str) {
    let ops: Vec<Value> = range
        .map(|i| json!({"op": "put", "cache": "docs", "key": format!("d{i}"), "json": doc(i)}))
        .collect();
    for chunk in ops.chunks(1000) {
        let r = h
            .http
            .post(h.url(&format!("/v1/batch{wait}")))
            .json(&json!({ "ops": chunk }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
}

/// A search: (status, body).
async fn search(h: &Host, query: &[(&str, &str)]) -> (u16, Value) {
    let r = h
        .http
        .get(h.url("/v1/search/docs"))
        .query(query)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn total(h: &Host, q: &str) -> Option<u64> {
    let (s, body) = search(h, &[("q", q), ("limit", "0")]).await;
    (s == 200).then(|| body["total"].as_u64().unwrap())
}

/// Waits until a search on `h` counts `n` hits.
async fn wait_total(h: &Host, q: &str, n: u64) {
    eventually(
        &format!("{}: {q:?} counts {n}", h.id),
        Duration::from_secs(30),
        || async { total(h, q).await == Some(n) },
    )
    .await;
}

/// The parts of an answer that must be equal on every host.
fn comparable(body: &Value) -> Value {
    json!({
        "total": body["total"],
        "hits": body["hits"],
        "facets": body["facets"],
    })
}

/// Every document in the index: key -> stored fields (paged through).
async fn index_contents(h: &Host) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut offset = 0;
    loop {
        let (s, body) = search(
            h,
            &[
                ("q", "*"),
                ("limit", "100"),
                ("offset", &offset.to_string()),
                ("sort", "year:asc"),
            ],
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let hits = body["hits"].as_array().unwrap();
        for hit in hits {
            let key = hit["key"].as_str().unwrap().to_string();
            let prev = out.insert(key.clone(), hit["fields"].clone());
            assert!(prev.is_none(), "{key} is in the index twice");
        }
        offset += hits.len();
        if hits.is_empty() {
            assert_eq!(out.len() as u64, body["total"].as_u64().unwrap());
            return out;
        }
    }
}

/// What the index should hold for the cache directory's JSON values.
fn expected_contents(h: &Host) -> BTreeMap<String, Value> {
    h.read_cache()
        .into_iter()
        .filter(|((cache, _), _)| cache == "docs")
        .filter_map(|((_, key), (value, _))| {
            let v: Value = serde_json::from_slice(&value).ok()?;
            let published = v["meta"]["published"]
                .as_str()
                .unwrap()
                .replace('Z', "+00:00");
            Some((
                key,
                json!({
                    "title": v["title"],
                    "body": v["body"],
                    "tag": v["tag"],
                    "year": v["year"],
                    "published": published,
                }),
            ))
        })
        .collect()
}

async fn start(db: &TestDb, id: &str, root: &std::path::Path, config: &str) -> Host {
    let h = Host::start_with_config(&db.url, id, root, &[], config).await;
    h.wait_ready().await;
    // The first start cold-boots, which rebuilds the indexes from the cache
    // directory: a document written meanwhile would be indexed (and counted)
    // twice, by its batch and by the rebuild.
    eventually(
        "the start's index rebuilds",
        Duration::from_secs(30),
        || async {
            let r: Value = h
                .http
                .get(h.url("/v1/search"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["indexes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|ix| ix["status"]["rebuilding"].is_null())
        },
    )
    .await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_answers_on_every_host() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = start(&db, "a", root.path(), CONFIG).await;
    let b = start(&db, "b", root.path(), CONFIG).await;
    let c = start(&db, "c", root.path(), CONFIG).await;
    put_docs(&a, 0..300, "?wait=cluster").await;
    for h in [&a, &b, &c] {
        wait_total(h, "*", 300).await;
    }

    let queries: Vec<Vec<(&str, &str)>> = vec![
        vec![("q", "fox")],
        // Stemming: "runs" finds "running" in the en_stem title.
        vec![("q", "title:runs")],
        vec![("q", "\"brown fox\"")],
        vec![("q", "fox OR river"), ("limit", "50")],
        vec![("q", "year:[2005 TO 2009]"), ("sort", "year:desc")],
        vec![
            ("q", "common"),
            ("filter", "tag:beta"),
            ("filter", "year:2001"),
        ],
        vec![("q", "apple"), ("filter", "published:2024-01-05T00:00:00Z")],
        vec![
            ("q", "*"),
            ("sort", "tag:asc"),
            ("limit", "5"),
            ("offset", "10"),
        ],
    ];
    for q in &queries {
        let (s, on_a) = search(&a, q).await;
        assert_eq!(s, 200, "{q:?}: {on_a}");
        for h in [&b, &c] {
            let (s, other) = search(h, q).await;
            assert_eq!(s, 200);
            assert_eq!(comparable(&on_a), comparable(&other), "{q:?} on {}", h.id);
        }
    }

    // What the answers say, checked against the corpus.
    let expect = |f: &dyn Fn(usize) -> bool| (0..300).filter(|i| f(*i)).count() as u64;
    let (_, r) = search(&a, &[("q", "title:runs")]).await;
    assert_eq!(r["total"], 300);
    let (_, r) = search(&a, &[("q", "year:[2005 TO 2009]"), ("sort", "year:desc")]).await;
    assert_eq!(r["total"], expect(&|i| (5..=9).contains(&(i % 20))));
    assert_eq!(r["hits"][0]["fields"]["year"], 2009);
    assert!(r["hits"][0]["score"].is_null());
    let (_, r) = search(&a, &[("q", "common"), ("filter", "tag:beta")]).await;
    assert_eq!(r["total"], 100);
    assert_eq!(r["facets"]["tag"], json!({"beta": 100}));
    let (_, r) = search(&a, &[("q", "*")]).await;
    assert_eq!(
        r["facets"]["tag"],
        json!({"alpha": 100, "beta": 100, "gamma": 100})
    );
    assert_eq!(r["hits"].as_array().unwrap().len(), 20);
    // Facet counts on request: `facets=` asks for none, `facets=tag` for one.
    let (_, r) = search(&a, &[("q", "*"), ("facets", "")]).await;
    assert_eq!(r["facets"], json!({}));
    let (_, r) = search(&a, &[("q", "*"), ("facets", "tag")]).await;
    assert_eq!(r["facets"]["tag"]["gamma"], 100);
    // Only keys: no fields, no snippets, the same hits in the same order.
    let (_, full) = search(&a, &[("q", "lazy fox")]).await;
    let (_, keys) = search(
        &a,
        &[("q", "lazy fox"), ("fields", ""), ("highlight", "false")],
    )
    .await;
    assert!(full["total"].as_u64().unwrap() > 0);
    assert_eq!(keys["total"], full["total"]);
    let key_and_score = |v: &Value| -> Vec<(Value, Value)> {
        v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["key"].clone(), h["score"].clone()))
            .collect()
    };
    assert_eq!(key_and_score(&keys), key_and_score(&full));
    assert_eq!(keys["hits"][0]["fields"], json!({}));
    assert!(keys["hits"][0].get("snippets").is_none());
    let (_, r) = search(&a, &[("q", "lazy")]).await;
    let hit = &r["hits"][0];
    assert!(hit["score"].as_f64().unwrap() > 0.0);
    let snippets = hit["snippets"].as_object().unwrap();
    assert!(
        snippets
            .values()
            .any(|s| s.as_str().unwrap().contains("<b>lazy</b>")),
        "{hit}"
    );
    assert_eq!(
        r["total"],
        expect(&|i| [i % 10, (i / 10) % 10, (i * 7) % 10, (i * 3) % 10].contains(&3))
    );

    // Updates, deletes and clears propagate.
    a.put(
        "docs",
        "d1",
        br#"{"title": "zebra crossing", "tag": "delta"}"#,
        "",
    )
    .await;
    a.delete("docs", "d2", "?wait=cluster").await;
    for h in [&a, &b, &c] {
        wait_total(h, "zebra", 1).await;
        wait_total(h, "*", 299).await;
        let (_, r) = search(h, &[("q", "zebra")]).await;
        assert_eq!(r["hits"][0]["key"], "d1");
        // A keys-only answer (no fields, no snippets) names the replaced
        // document too.
        let (_, keys) = search(h, &[("q", "zebra"), ("fields", ""), ("highlight", "false")]).await;
        assert_eq!(keys["hits"][0]["key"], "d1");
        assert_eq!(
            r["hits"][0]["fields"],
            json!({"title": "zebra crossing", "tag": "delta"})
        );
    }
    let r = a
        .http
        .delete(a.url("/v1/cache/docs?wait=cluster"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    put_docs(&a, 1000..1003, "?wait=cluster").await;
    for h in [&a, &b, &c] {
        wait_total(h, "*", 3).await;
        assert_eq!(total(h, "zebra").await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_and_bad_queries() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = start(&db, "a", root.path(), CONFIG).await;
    let b = start(&db, "b", root.path(), CONFIG).await;
    put_docs(&a, 0..10, "").await;
    a.put("docs", "broken", b"this is { not json", "").await;
    a.put(
        "docs",
        "odd",
        br#"{"title": "odd year", "year": "soon", "tag": {"x": 1}}"#,
        "",
    )
    .await;
    a.put("docs", "last", br#"{"title": "last one"}"#, "?wait=cluster")
        .await;
    wait_total(&b, "*", 12).await;
    // The cache has every value, whatever the index made of it.
    assert_eq!(
        b.get("docs", "broken").await.unwrap(),
        b"this is { not json"
    );
    let (_, r) = search(&b, &[("q", "odd")]).await;
    assert_eq!(r["hits"][0]["fields"], json!({"title": "odd year"}));
    let skipped = |reason: &str| {
        format!("tandem_search_skipped_documents_total{{index=\"docs\",reason=\"{reason}\"}}")
    };
    assert_eq!(b.metric(&skipped("not_json")).await, Some(1.0));
    assert_eq!(b.metric(&skipped("bad_field")).await, Some(1.0));
    assert!(b.log_contains("key=broken"), "the log names the key");

    // Nested deep enough to overflow the parser's stack (it would abort the
    // process): refused, and the host keeps serving.
    let deep = format!("{}fox", "(".repeat(3_000));
    let not_not = format!("{}fox", "NOT ".repeat(1_000));
    let long = "fox ".repeat(2_000);
    let bad: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("q", &deep)], "groups and NOTs"),
        (vec![("q", &not_not)], "groups and NOTs"),
        (vec![("q", &long)], "longer than"),
        (vec![("q", "title:(")], "bad query"),
        (vec![("q", "nosuchfield:x")], "bad query"),
        (vec![("q", "x"), ("filter", "year:abc")], "not an integer"),
        (
            vec![("q", "x"), ("filter", "title:fox")],
            "filters match whole values",
        ),
        (vec![("q", "x"), ("filter", "nope")], "field:value"),
        (vec![("q", "x"), ("filter", "_key:d1")], "no field"),
        (vec![("q", "x"), ("sort", "title:asc")], "not fast"),
        (vec![("q", "x"), ("sort", "year:sideways")], "asc or desc"),
        (vec![("q", "x"), ("limit", "-1")], "whole number"),
        (vec![("q", "x"), ("offset", "99999999")], "max_offset"),
        (vec![("q", "x"), ("colour", "red")], "unknown parameter"),
        (vec![("q", "x"), ("facets", "year")], "not a facet field"),
    ];
    for (q, needle) in bad {
        let (s, body) = search(&b, &q).await;
        assert_eq!(s, 400, "{q:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{q:?}: {msg:?} should contain {needle:?}"
        );
    }
    // Limits are capped, not refused.
    let (s, body) = search(&b, &[("q", "*"), ("limit", "100000")]).await;
    assert_eq!(s, 200);
    assert_eq!(body["limit"], 100);
    let r = b
        .http
        .get(b.url("/v1/search/nope?q=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(
        b.metric("tandem_search_queries_total{index=\"docs\",outcome=\"bad_request\"}")
            .await,
        Some(15.0)
    );
    // Nothing else was disturbed.
    assert_eq!(total(&b, "*").await, Some(12));
    assert_converged(&db, &[&a, &b], Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_indexing_then_replay() {
    let db = TestDb::new().await;
    let root = tempdir();
    let a = start(&db, "a", root.path(), CONFIG).await;
    let mut b = start(&db, "b", root.path(), CONFIG).await;
    put_docs(&a, 0..500, "?wait=cluster").await;
    wait_total(&b, "*", 500).await;

    let writer = {
        let a_url = a.url("/v1/batch");
        let http = a.http.clone();
        tokio::spawn(async move {
            for round in 0..30usize {
                let mut ops: Vec<Value> = (0..100)
                    .map(|j| {
                        let i = 500 + round * 100 + j;
                        json!({"op": "put", "cache": "docs", "key": format!("d{i}"), "json": doc(i)})
                    })
                    .collect();
                // Rewrite and delete some older documents too.
                ops.push(json!({"op": "put", "cache": "docs", "key": format!("d{round}"), "json": doc(round + 7)}));
                ops.push(
                    json!({"op": "delete", "cache": "docs", "key": format!("d{}", 100 + round)}),
                );
                let r = http
                    .post(&a_url)
                    .json(&json!({ "ops": ops }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    // Kill b while it indexes.
    eventually("b indexes more", Duration::from_secs(30), || async {
        total(&b, "*").await.unwrap_or(0) > 1000
    })
    .await;
    b.kill();
    writer.await.unwrap();
    b.spawn().await;
    b.wait_ready().await;
    assert_converged(&db, &[&a, &b], Duration::from_secs(30)).await;
    let expected = expected_contents(&b);
    assert_eq!(expected.len(), 500 + 3000 - 30);
    eventually(
        "b's index equals its cache directory",
        Duration::from_secs(30),
        || async { total(&b, "*").await == Some(expected.len() as u64) },
    )
    .await;
    let actual = index_contents(&b).await;
    assert!(actual == expected, "index and cache directory differ");
    // It caught up from its own position (or was already there), without
    // a rebuild.
    let no_rebuilds = async |h: &Host| {
        for reason in [
            "missing",
            "corrupt",
            "schema_changed",
            "cold_boot",
            "replay",
        ] {
            let m = format!("tandem_search_rebuilds_total{{index=\"docs\",reason=\"{reason}\"}}");
            assert_eq!(h.metric(&m).await, Some(0.0), "{reason}");
        }
    };
    no_rebuilds(&b).await;

    // Deterministically behind: b commits its index at most once a minute,
    // so the second batch is in its cache directory but not in its index
    // when it is killed. After the restart it replays exactly that.
    b.stop().await;
    b.set_env("TANDEM_SEARCH_COMMIT_INTERVAL", "60s");
    b.spawn().await;
    b.wait_ready().await;
    put_docs(&a, 10_000..10_010, "?wait=cluster").await;
    wait_total(&b, "*", expected.len() as u64 + 10).await;
    put_docs(&a, 10_010..10_020, "?wait=cluster").await;
    a.delete("docs", "d10000", "?wait=cluster").await;
    assert!(
        b.read_cache()
            .contains_key(&("docs".into(), "d10019".into()))
    );
    assert_eq!(total(&b, "*").await, Some(expected.len() as u64 + 10));
    b.kill();
    b.set_env("TANDEM_SEARCH_COMMIT_INTERVAL", "200ms");
    b.spawn().await;
    b.wait_ready().await;
    wait_total(&b, "*", expected.len() as u64 + 19).await;
    assert!(b.log_contains("search index replaying"));
    assert_eq!(index_contents(&b).await, expected_contents(&b));
    no_rebuilds(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_rebuilds_while_answering() {
    let db = TestDb::new().await;
    let root = tempdir();
    let v1 = r#"
[[search.index]]
name = "docs"
fields = [{ name = "body", type = "text" }, { name = "year", type = "i64" }]
"#;
    let mut a = start(&db, "a", root.path(), v1).await;
    const N: usize = 20_000;
    put_docs(&a, 0..N, "?wait=local").await;
    wait_total(&a, "common", N as u64).await;
    a.stop().await;

    // The new field's config: the index is rebuilt from the cache directory.
    let v2 = v1.replace(
        "{ name = \"year\", type = \"i64\" }",
        "{ name = \"year\", type = \"i64\" }, { name = \"tag\", type = \"string\", facet = true }",
    );
    std::fs::write(&a.config, v2).unwrap();
    a.spawn().await;
    let mut answered_while_rebuilding = 0;
    let mut old_answers = 0;
    loop {
        let (s, body) = search(&a, &[("q", "common"), ("limit", "1")]).await;
        assert_eq!(s, 200, "searches keep answering: {body}");
        assert_eq!(body["total"], N as u64, "the old index answers in full");
        let status = a.get_json("/v1/search").await;
        if status["indexes"][0]["status"]["rebuilding"] == "schema_changed" {
            answered_while_rebuilding += 1;
        }
        let (s, body) = search(
            &a,
            &[("q", "common"), ("filter", "tag:beta"), ("limit", "0")],
        )
        .await;
        let betas = (0..N).filter(|i| i % 3 == 1).count() as u64;
        if s == 200 && body["total"] == betas {
            assert_eq!(body["facets"]["tag"]["beta"], betas);
            break;
        }
        old_answers += 1;
        assert!(old_answers < 3000, "the new field never became searchable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        answered_while_rebuilding > 0,
        "no search was answered during the rebuild"
    );
    assert_eq!(
        a.metric("tandem_search_rebuilds_total{index=\"docs\",reason=\"schema_changed\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_missing_requested_and_cold_boot_rebuilds() {
    let db = TestDb::new().await;
    let root = tempdir();
    let mut a = start(&db, "a", root.path(), CONFIG).await;
    put_docs(&a, 0..200, "?wait=local").await;
    wait_total(&a, "*", 200).await;
    let index_root = a.dir.join("search/docs");
    let rebuilds = |reason: &'static str| {
        format!("tandem_search_rebuilds_total{{index=\"docs\",reason=\"{reason}\"}}")
    };

    // Corrupt: garbage where tantivy keeps its metadata.
    a.stop().await;
    let current = index_root.join(std::fs::read_link(index_root.join("current")).unwrap());
    std::fs::write(current.join("meta.json"), b"{garbage").unwrap();
    a.spawn().await;
    a.wait_ready().await;
    wait_total(&a, "*", 200).await;
    assert_eq!(a.metric(&rebuilds("corrupt")).await, Some(1.0));
    assert_eq!(index_contents(&a).await, expected_contents(&a));

    // A rebuild cut short by a crash leaves a directory; the next start
    // removes it.
    a.stop().await;
    std::fs::create_dir(index_root.join("i-999999")).unwrap();
    a.spawn().await;
    a.wait_ready().await;
    eventually(
        "the leftover is removed",
        Duration::from_secs(10),
        || async { !index_root.join("i-999999").exists() },
    )
    .await;

    // Missing: the whole index directory gone.
    a.stop().await;
    std::fs::remove_dir_all(&index_root).unwrap();
    a.spawn().await;
    a.wait_ready().await;
    wait_total(&a, "*", 200).await;
    assert_eq!(a.metric(&rebuilds("missing")).await, Some(1.0));

    // Asked for, through the CLI.
    let out = a.cli(&["search", "rebuild", "docs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the requested rebuild", Duration::from_secs(20), || async {
        a.metric(&rebuilds("requested")).await == Some(1.0)
            && a.metric("tandem_search_rebuilding{index=\"docs\"}").await == Some(0.0)
    })
    .await;
    assert_eq!(total(&a, "*").await, Some(200));
    let out = a.cli(&["search"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("docs") && table.contains("200"), "{table}");
    let r = a
        .http
        .post(a.url("/v1/search/nope/rebuild"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // A cold boot rebuilds the index along with the cache.
    let r = a.http.post(a.url("/v1/resync")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    eventually(
        "the cold boot's rebuild",
        Duration::from_secs(20),
        || async {
            a.metric(&rebuilds("cold_boot")).await == Some(1.0)
                && a.metric("tandem_search_rebuilding{index=\"docs\"}").await == Some(0.0)
        },
    )
    .await;
    put_docs(&a, 200..210, "?wait=local").await;
    wait_total(&a, "*", 210).await;
    assert_eq!(index_contents(&a).await, expected_contents(&a));
}

#[test]
fn check_config_names_the_bad_field() {
    let dir = tempdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[[search.index]]
name = "docs"
fields = [{ name = "title", type = "text", facet = true }]
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env_clear()
        .env("TANDEM_DATA_DIR", dir.path().display().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("search.index[docs].fields[title].facet"),
        "{err}"
    );
}
