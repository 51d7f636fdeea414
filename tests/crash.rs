//! Crash safety: SIGKILL while a large batch is being applied. Every value
//! carries its own length and is one repeated byte, so a torn or partial
//! file is detectable. A reader checks every file it can see while the host
//! is killed and restarted; at the end the cache equals the database.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Host, TestDb, assert_converged, tempdir};

/// `NNNNNNNN:` then NNNNNNNN copies of one letter.
fn check_value(bytes: &[u8]) -> Result<(), String> {
    let header = bytes.get(..9).ok_or("shorter than its header")?;
    let len: usize = std::str::from_utf8(&header[..8])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad header")?;
    let body = &bytes[9..];
    if body.len() != len {
        return Err(format!("{} bytes, header says {len}", body.len()));
    }
    if let Some(first) = body.first()
        && body.iter().any(|b| b != first)
    {
        return Err("mixed content".into());
    }
    Ok(())
}

fn check_dir(dir: &Path) -> Result<usize, String> {
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for e in entries.flatten() {
        let path = e.path();
        // A file may be replaced or removed between listing and reading.
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        check_value(&bytes).map_err(|why| format!("{}: {why}", path.display()))?;
        n += 1;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_large_batches_never_tears_a_file() {
    let db = TestDb::new().await;
    let root = tempdir();
    let mut a = Host::start(
        &db.url,
        "a",
        root.path(),
        &[("TANDEM_SYNC_BATCH_SIZE", "500")],
    )
    .await;
    a.wait_ready().await;
    let writer = db.client().await;

    let stop = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, checked) = (stop.clone(), checked.clone());
        let dir = a.cache_dir().join("big");
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::SeqCst) {
                checked.fetch_add(check_dir(&dir)?, Ordering::SeqCst);
            }
            Ok(())
        })
    };

    for round in 0..6u32 {
        // One transaction rewriting 4000 keys with values of 1 to 16 KiB.
        let letter = (b'A' + round as u8) as char;
        writer
            .batch_execute(&format!(
                "SELECT tandem.put('big', 'key-' || i, \
                   lpad(n::text, 8, '0') || ':' || repeat('{letter}', n)) \
                 FROM (SELECT i, 1024 + (i * 37 + {round}) % 15360 AS n FROM generate_series(1, 4000) i) s"
            ))
            .await
            .unwrap();
        // Kill it somewhere in the middle of applying.
        tokio::time::sleep(Duration::from_millis(40 + 90 * u64::from(round))).await;
        a.kill();
        a.spawn().await;
    }
    a.wait_ready().await;
    assert_converged(&db, &[&a], Duration::from_secs(60)).await;
    stop.store(true, Ordering::SeqCst);
    reader
        .join()
        .unwrap()
        .expect("no torn or partial file was ever visible");
    assert!(checked.load(Ordering::SeqCst) > 1000);
    // Everything on disk is whole and the temp area is clean after restart.
    assert_eq!(check_dir(&a.cache_dir().join("big")).unwrap(), 4000);
    let tmp = std::fs::read_link(a.cache_dir()).unwrap().join(".tmp");
    a.restart().await;
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_converged(&db, &[&a], Duration::from_secs(20)).await;
}
