//! tandem's core benchmark: prints figures, side by side with their
//! references measured in the same run.
//!
//!     scripts/install-test-deps.sh --bench && cargo bench --bench sync
//!
//! 1. Propagation: 4 hosts on one PostgreSQL (fsync on), app writers commit
//!    1 KiB puts at 500/s while the database also runs unrelated short write
//!    transactions and one unrelated write transaction stays open all along.
//!    Latency ends when the file appears in a host's cache directory
//!    (inotify); a write counts when it is on every host. It is measured
//!    from the commit's acknowledgement (when the app knows it committed;
//!    a host may apply slightly before, counted as 0) and, more
//!    conservatively, from the moment the write was sent (which includes the
//!    commit's own WAL flush). The floor beside it: a bare NOTIFY to 4
//!    listeners that each run one SELECT, on the same clocks, same load.
//! 2. Idle cost per host: queries/s, CPU, RSS.
//! 3. Reads: `wrk` at 32 connections on GET of a 1 KiB value, tandem vs nginx
//!    serving the same file from the cache directory.
//! 4. Catch-up: one host applying a 100,000 x 1 KiB backlog, beside the
//!    rate at which one thread creates as many files on the same filesystem.
//! 5. Cold boot of the host's 100,000+ entries of 1 KiB.
//!
//! Environment: BENCH_SECS (propagation run, default 20), BENCH_RATE
//! (default 500), BENCH_IDLE_SECS (default 60: a whole minute, so the leader's
//! minutely built-in jobs count once), BENCH_PHASES (e.g. `1,3`),
//! BENCH_DIR (where the hosts' data directories go; the filesystem matters:
//! ext4 without a journal slows file creation down after mass deletions),
//! BENCH_QUIET_WAIT and BENCH_MIN_FILE_RATE (wait before starting for a
//! quiet disk and a quick filesystem: see `common::wait_for_quiet_machine`;
//! the machine's state is printed at the start and the end either way),
//! BENCH_CATCH_UP_ENV (settings for the catch-up host, e.g.
//! `TANDEM_SYNC_BATCH_SIZE=5000`), TANDEM_BENCH_DATABASE_URL (an existing
//! server instead of a throwaway one).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Host, Pg, TestDb, env_u64, proc_stat, tempdir};
use futures_util::StreamExt;

const HOSTS: usize = 4;

/// p50 / p99 / max in milliseconds.
fn summary(mut v: Vec<f64>) -> (f64, f64, f64, usize) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (at(0.50), at(0.99), *v.last().unwrap(), v.len())
}

fn fmt_ms(d: (f64, f64, f64, usize)) -> String {
    format!(
        "p50 {:6.2} ms   p99 {:6.2} ms   max {:7.2} ms   (n={})",
        d.0, d.1, d.2, d.3
    )
}

/// Settings for realistic hosts: the defaults, quieter logs.
const REAL: &[(&str, &str)] = &[
    ("TANDEM_SYNC_POLL_INTERVAL", "2s"),
    ("TANDEM_CLUSTER_HEARTBEAT_INTERVAL", "5s"),
    ("TANDEM_LOG_LEVEL", "info"),
];

/// Watches a directory with inotify and records when each `k<seq>` file is
/// renamed into it.
fn watch(dir: PathBuf, host: usize, seen: Arc<Mutex<HashMap<u64, [Option<Instant>; HOSTS]>>>) {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(
        &fd,
        &dir,
        inotify::WatchFlags::MOVED_TO | inotify::WatchFlags::CREATE,
    )
    .unwrap();
    std::thread::spawn(move || {
        let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
        let mut reader = inotify::Reader::new(fd.as_fd(), &mut buf);
        loop {
            let Ok(event) = reader.next() else { return };
            let now = Instant::now();
            let Some(name) = event.file_name() else {
                continue;
            };
            let Some(seq) = name
                .to_str()
                .ok()
                .and_then(|n| n.strip_prefix('k'))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let mut seen = seen.lock().unwrap();
            let slot = &mut seen.entry(seq).or_insert([None; HOSTS])[host];
            slot.get_or_insert(now);
        }
    });
}

async fn queries(h: &Host) -> f64 {
    let text = h.metrics_text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("tandem_db_queries_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Where wrk runs: on any core with two threads, or on CPU 0 alone with one
/// (the server under test then has CPU 1 to itself).
#[derive(Clone, Copy, PartialEq)]
enum Cores {
    Shared,
    Split,
}

/// `program`, run on any core (`Cores::Shared`) or on `cpu` alone.
fn command(program: &str, cores: Cores, cpu: &str) -> Command {
    match cores {
        Cores::Shared => Command::new(program),
        Cores::Split => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu, program]);
            c
        }
    }
}

/// Runs wrk and returns (req/s, p50 ms, p99 ms).
fn wrk(url: &str, secs: u64, cores: Cores) -> (f64, f64, f64) {
    let d = format!("-d{secs}s");
    let threads = if cores == Cores::Shared { "-t2" } else { "-t1" };
    let out = command("wrk", cores, "0")
        .args([threads, "-c32", &d, "--latency", url])
        .output()
        .expect("wrk is installed (scripts/install-test-deps.sh --bench)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let pct = |p: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .map(|v| v.trim())
            .map(|v| {
                let (num, unit) =
                    v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
                let n: f64 = num.parse().unwrap_or(f64::NAN);
                match unit {
                    "us" => n / 1000.0,
                    "ms" => n,
                    "s" => n * 1000.0,
                    _ => f64::NAN,
                }
            })
            .unwrap_or(f64::NAN)
    };
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        println!("      wrk: {}", e.trim());
    }
    (rps, pct("50%"), pct("99%"))
}

/// Starts nginx on `root`: with a worker per core (`Cores::Shared`), or
/// with one worker, all of it on CPU 1 (`Cores::Split`).
fn start_nginx(root: &Path, dir: &Path, cores: Cores) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes {workers};\ndaemon off;\nmaster_process on;\nuser root;\npid {dir}/nginx.pid;\n\
             error_log {dir}/nginx-error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000;\n\
               client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
               default_type application/octet-stream;\n\
               server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }} }}\n",
            dir = dir.display(),
            root = root.display(),
            workers = if cores == Cores::Shared { "auto" } else { "1" },
        ),
    )
    .unwrap();
    let child = command("nginx", cores, "1")
        .args(["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is installed (scripts/install-test-deps.sh --bench)");
    (child, port)
}

/// Which phases to run: `BENCH_PHASES=1,3` (default: all).
fn phase(n: u32) -> bool {
    std::env::var("BENCH_PHASES").map_or(true, |v| v.split(',').any(|p| p.trim() == n.to_string()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pg = match std::env::var("TANDEM_BENCH_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Pg::from_url(&url),
        _ => common::start_cluster(true),
    };
    let db = TestDb::on(&pg).await;
    let root = match std::env::var("BENCH_DIR") {
        Ok(dir) if !dir.is_empty() => tempfile::Builder::new()
            .prefix("tandem-bench-")
            .tempdir_in(dir)
            .unwrap(),
        _ => tempdir(),
    };
    println!(
        "tandem sync benchmark: {HOSTS} hosts, PostgreSQL with fsync on, {} cores",
        num_cpus()
    );
    println!("hosts' data on {}", describe_fs(root.path()));
    common::wait_for_quiet_machine(root.path()).await;
    println!("at the start: {}", common::machine_pressure(root.path()));
    let mut hosts = Vec::new();
    for i in 0..HOSTS {
        hosts.push(Host::start(&db.url, &format!("h{i}"), root.path(), REAL).await);
    }
    for h in &hosts {
        h.wait_ready().await;
    }
    if phase(1) {
        propagation(&db, &hosts).await;
    }
    if phase(2) {
        idle(&hosts).await;
    }
    if phase(3) {
        reads(&hosts[0]).await;
    }
    if phase(4) || phase(5) {
        // One host alone: the others would apply the same backlog on the
        // same two cores meanwhile.
        for (i, h) in hosts.iter_mut().enumerate() {
            if i != 1 {
                h.stop().await;
            }
        }
        catch_up(&db, &mut hosts[1]).await;
    }
    if phase(5) {
        cold_boot(&db, &hosts[1]).await;
    }
    println!("\nat the end: {}", common::machine_pressure(root.path()));
}

/// Phase 1: commit -> applied on every host, beside the NOTIFY floor.
async fn propagation(db: &TestDb, hosts: &[Host]) {
    let secs = env_u64("BENCH_SECS", 20);
    let rate = env_u64("BENCH_RATE", 500);
    let admin = db.client().await;
    admin
        .batch_execute("CREATE TABLE app_events (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), body text)")
        .await
        .unwrap();

    // Background: one write transaction open all along, and a stream of
    // short unrelated write transactions.
    let open_tx = db.client().await;
    open_tx
        .batch_execute(
            "BEGIN; INSERT INTO app_events (body) VALUES ('held open for the whole run')",
        )
        .await
        .unwrap();
    let background_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let client = db.client().await;
        let stop = background_stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tick.tick().await;
                client
                    .batch_execute("INSERT INTO app_events (body) VALUES ('unrelated')")
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };

    // The floor: NOTIFY -> 4 listeners -> one SELECT each.
    let floor_n = (rate * 5).min(2500);
    let floor_seen: Arc<Mutex<Seen>> = Arc::default();
    for host in 0..HOSTS {
        let (client, mut conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut s = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(m)) = s.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = m {
                    let _ = tx.send(n.payload().to_string());
                }
            }
        });
        client.batch_execute("LISTEN bench_floor").await.unwrap();
        let seen = floor_seen.clone();
        tokio::spawn(async move {
            let stmt = client.prepare("SELECT 1").await.unwrap();
            while let Some(p) = rx.recv().await {
                client.query_one(&stmt, &[]).await.unwrap();
                let now = Instant::now();
                if let Ok(seq) = p.parse::<u64>() {
                    seen.lock().unwrap().entry(seq).or_insert([None; HOSTS])[host] = Some(now);
                }
            }
        });
    }
    let notifier = db.client().await;
    let notify = notifier
        .prepare("SELECT pg_notify('bench_floor', $1)")
        .await
        .unwrap();
    let mut floor_start = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for seq in 0..floor_n {
        tick.tick().await;
        let sent = Instant::now();
        notifier
            .query_one(&notify, &[&seq.to_string()])
            .await
            .unwrap();
        floor_start.insert(seq, (sent, Instant::now()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (floor_sent, floor_acked) = latencies(&floor_seen.lock().unwrap(), &floor_start).0;

    // tandem: app writers commit puts; watch every host's directory.
    hosts[0].put("bench", "warmup", b"x", "?wait=cluster").await;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    for (i, h) in hosts.iter().enumerate() {
        let generation = std::fs::read_link(h.cache_dir()).unwrap();
        watch(generation.join("bench"), i, seen.clone());
    }
    let value = vec![b'v'; 1024];
    let starts: Arc<Mutex<HashMap<u64, (Instant, Instant)>>> = Arc::default();
    let total = secs * rate;
    let writers = 4u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = db.client().await;
        let (starts, value) = (starts.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let stmt = client
                .prepare("SELECT tandem.put('bench', $1, $2::bytea, 'application/octet-stream')")
                .await
                .unwrap();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 * writers / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut seq = w;
            while seq < total {
                tick.tick().await;
                let key = format!("k{seq}");
                let sent = Instant::now();
                client.execute(&stmt, &[&key, &value]).await.unwrap();
                starts.lock().unwrap().insert(seq, (sent, Instant::now()));
                seq += writers;
            }
        }));
    }
    let run_started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let achieved = total as f64 / run_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ((sent, acked), per_host, missing) =
        latencies(&seen.lock().unwrap(), &starts.lock().unwrap());
    background_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let unrelated = background.await.unwrap();
    open_tx.batch_execute("COMMIT").await.unwrap();

    println!();
    println!(
        "1. Propagation, commit -> applied on all {HOSTS} hosts ({achieved:.0} puts/s of 1 KiB for {secs}s;"
    );
    println!("   meanwhile {unrelated} unrelated write transactions and one held open throughout)");
    println!("   from commit acknowledged:");
    println!("     tandem      {}", fmt_ms(summary(acked)));
    println!(
        "     floor       {}   (NOTIFY -> {HOSTS} listeners -> SELECT)",
        fmt_ms(summary(floor_acked))
    );
    println!("   from write sent (includes the commit's WAL flush; the floor's NOTIFY has none):");
    println!("     tandem      {}", fmt_ms(summary(sent)));
    println!("     floor       {}", fmt_ms(summary(floor_sent)));
    println!("   each host, from commit acknowledged:");
    for (i, v) in per_host.into_iter().enumerate() {
        println!("     h{i}          {}", fmt_ms(summary(v)));
    }
    if missing > 0 {
        println!("   WARNING: {missing} writes not seen on every host");
    }
}

/// Phase 2: what an idle host costs.
async fn idle(hosts: &[Host]) {
    let idle_secs = env_u64("BENCH_IDLE_SECS", 60);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut before = Vec::new();
    for h in hosts {
        before.push((queries(h).await, proc_stat(h.pid().unwrap()).0));
    }
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    println!();
    println!("2. Idle cost per host over {idle_secs}s (defaults: 2s backstop poll, 5s heartbeat)");
    for (i, h) in hosts.iter().enumerate() {
        let q = (queries(h).await - before[i].0) / idle_secs as f64;
        let (cpu, rss) = proc_stat(h.pid().unwrap());
        let cpu_pct = (cpu - before[i].1) / idle_secs as f64 * 100.0;
        println!("   h{i}: {q:.2} queries/s   CPU {cpu_pct:.2}%   RSS {rss:.1} MiB");
    }
}

/// Phase 3: GET of a 1 KiB value, tandem vs nginx on the same file: first
/// with wrk and the servers sharing both cores, then (on 2+ cores) with wrk
/// on CPU 0 and the server on CPU 1, so that what is measured is the
/// server's latency rather than its contention with the load generator.
async fn reads(host: &Host) {
    host.put("bench", "read-1k", &[b'v'; 1024], "?wait=local")
        .await;
    println!();
    println!("3. Reads: GET of a 1 KiB value, wrk -c32 -d10s (same machine, same file)");
    read_pair(host, Cores::Shared).await;
    if num_cpus() >= 2 {
        let pid = host.pid().expect("the host runs").to_string();
        taskset(&["-a", "-p", "-c", "1", &pid]);
        read_pair(host, Cores::Split).await;
        let all = format!("0-{}", num_cpus() - 1);
        taskset(&["-a", "-p", "-c", &all, &pid]);
    }
}

fn taskset(args: &[&str]) {
    let status = Command::new("taskset")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("taskset (util-linux) is installed");
    assert!(status.success(), "taskset {args:?} failed");
}

/// One side-by-side read measurement, tandem then nginx.
async fn read_pair(host: &Host, cores: Cores) {
    let nginx_dir = tempdir();
    let (mut nginx, port) = start_nginx(&host.cache_dir(), nginx_dir.path(), cores);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let nginx_url = format!("http://127.0.0.1:{port}/bench/read-1k");
    let check = host.http.get(&nginx_url).send().await.unwrap();
    assert_eq!(
        check.bytes().await.unwrap().len(),
        1024,
        "nginx serves the file"
    );
    let tandem_url = host.url("/v1/cache/bench/read-1k");
    let _ = wrk(&tandem_url, 2, cores);
    let _ = wrk(&nginx_url, 2, cores);
    let t = wrk(&tandem_url, 10, cores);
    let n = wrk(&nginx_url, 10, cores);
    // SIGQUIT: nginx's graceful stop, which also ends its workers.
    let _ = Command::new("kill")
        .arg("-QUIT")
        .arg(nginx.id().to_string())
        .status();
    let _ = nginx.wait();
    match cores {
        Cores::Shared => println!(
            "   a) wrk -t2 and the servers share every core (tandem: its usual threads; nginx: worker_processes auto)"
        ),
        Cores::Split => println!(
            "   b) wrk -t1 on CPU 0, the server on CPU 1 (tandem: all its threads; nginx: worker_processes 1)"
        ),
    }
    println!(
        "   tandem   {:9.0} req/s   p50 {:.3} ms   p99 {:.3} ms",
        t.0, t.1, t.2
    );
    println!(
        "   nginx    {:9.0} req/s   p50 {:.3} ms   p99 {:.3} ms",
        n.0, n.1, n.2
    );
    println!("   ratio    {:.2}x nginx", t.0 / n.0);
}

/// Phase 4: one host applies a 100,000-op backlog written while it was down.
async fn catch_up(db: &TestDb, host: &mut Host) {
    let backlog = 100_000u64;
    let admin = db.client().await;
    // The earlier phases' keys stay: deleting them here would leave
    // thousands of recently freed inodes, which ext4 without a journal
    // scans past on every file creation for minutes after.
    host.stop().await;
    let floor = file_floor(&host.dir, backlog);
    let mut last_token = String::new();
    for chunk in 0..(backlog / 1000) {
        let row = admin
            .query_one(
                "SELECT max(tandem.put('backlog', 'k' || i, repeat('b', 1024))::text::bigint)::text \
                 FROM generate_series($1::int, $1::int + 999) i",
                &[&((chunk * 1000) as i32)],
            )
            .await
            .unwrap();
        last_token = row.get(0);
    }
    // Any `TANDEM_*` setting for the catch-up host alone, such as
    // BENCH_CATCH_UP_ENV="TANDEM_SYNC_BATCH_SIZE=5000" (space-separated).
    for pair in std::env::var("BENCH_CATCH_UP_ENV")
        .unwrap_or_default()
        .split_whitespace()
    {
        if let Some((k, v)) = pair.split_once('=') {
            host.set_env(k, v);
        }
    }
    let started = Instant::now();
    host.spawn().await;
    let w = host
        .http
        .get(host.url(&format!("/v1/wait?token={last_token}&timeout=300s")))
        .send()
        .await
        .unwrap();
    assert_eq!(w.status(), 200);
    let took = started.elapsed().as_secs_f64();
    let cold = host
        .metric("tandem_sync_cold_boot_duration_seconds_count")
        .await
        .unwrap_or(0.0);
    assert_eq!(
        cold, 0.0,
        "the restarted host cold-booted instead of catching up"
    );
    println!();
    println!(
        "4. Catch-up: one host applying a {backlog}-op backlog of 1 KiB puts (100 transactions)"
    );
    println!(
        "   {:.2}s from process start   {:.0} ops/s",
        took,
        backlog as f64 / took
    );
    println!(
        "   floor: the same number of 1 KiB files made by one thread on the same filesystem \
         (unnamed file, write, link; one syncfs): {floor:.0} files/s"
    );
}

/// Files per second one thread can create on the filesystem under `dir`
/// the way the applier does (`O_TMPFILE`, write, `linkat`, one `syncfs`).
fn file_floor(dir: &Path, n: u64) -> f64 {
    use std::io::Write;
    let target = dir.join("floor-files");
    std::fs::create_dir_all(&target).unwrap();
    let value = [b'f'; 1024];
    let started = Instant::now();
    for i in 0..n {
        let fd = rustix::fs::open(
            &target,
            rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(&value).unwrap();
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
        rustix::fs::linkat(
            rustix::fs::CWD,
            proc.as_str(),
            rustix::fs::CWD,
            target.join(format!("f{i}")),
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        )
        .unwrap();
    }
    rustix::fs::syncfs(std::fs::File::open(&target).unwrap()).unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

/// Phase 5: a cold boot of the host's whole cache.
async fn cold_boot(db: &TestDb, host: &Host) {
    common::assert_converged(db, &[host], Duration::from_secs(60)).await;
    let before = host
        .metric("tandem_sync_cold_boot_duration_seconds_count")
        .await
        .unwrap_or(0.0);
    let r = host.http.post(host.url("/v1/resync")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let started = Instant::now();
    // Counted at the start, timed at the end: wait for the timing.
    common::eventually("cold boot", Duration::from_secs(300), || async {
        host.metric("tandem_sync_cold_boot_duration_seconds_count")
            .await
            == Some(before + 1.0)
    })
    .await;
    let wall = started.elapsed().as_secs_f64();
    let internal = host
        .metric("tandem_sync_cold_boot_duration_seconds_sum")
        .await
        .unwrap();
    let entries = host.metric("tandem_cache_entries").await.unwrap();
    println!();
    println!(
        "5. Cold boot: {entries} entries of 1 KiB (the backlog and the earlier phases' keys) \
         into a fresh generation, swapped in"
    );
    println!("   {internal:.2}s (tandem's own measure; {wall:.2}s as seen from outside)");
}

type Seen = HashMap<u64, [Option<Instant>; HOSTS]>;

/// Latencies (ms) to the last host: (from sent, from acknowledged), the
/// per-host latencies from acknowledged, and how many were not seen on
/// every host.
#[allow(clippy::type_complexity)]
fn latencies(
    seen: &Seen,
    starts: &HashMap<u64, (Instant, Instant)>,
) -> ((Vec<f64>, Vec<f64>), Vec<Vec<f64>>, usize) {
    let ms = |later: Instant, earlier: Instant| {
        later.saturating_duration_since(earlier).as_secs_f64() * 1000.0
    };
    let (mut sent, mut acked) = (Vec::new(), Vec::new());
    let mut per_host: Vec<Vec<f64>> = vec![Vec::new(); HOSTS];
    let mut missing = 0;
    for (seq, (t_sent, t_acked)) in starts {
        let Some(all) = seen
            .get(seq)
            .and_then(|all| all.iter().copied().collect::<Option<Vec<_>>>())
        else {
            missing += 1;
            continue;
        };
        for (i, t) in all.iter().enumerate() {
            per_host[i].push(ms(*t, *t_acked));
        }
        let last = *all.iter().max().expect("HOSTS > 0");
        sent.push(ms(last, *t_sent));
        acked.push(ms(last, *t_acked));
    }
    ((sent, acked), per_host, missing)
}

/// The filesystem under `path`: type, device, and for ext4 whether it has a
/// journal.
fn describe_fs(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let best = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && path.starts_with(f[1]))
                .then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .max_by_key(|(_, mount, _)| mount.len());
    let Some((dev, mount, fstype)) = best else {
        return "an unknown filesystem".into();
    };
    let mut text = format!("{fstype} ({dev} on {mount})");
    if fstype == "ext4" {
        let name = dev.rsplit('/').next().unwrap_or("").to_string();
        let journaled = std::fs::read_dir("/proc/fs/jbd2")
            .map(|d| {
                d.filter_map(Result::ok).any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{name}-"))
                })
            })
            .unwrap_or(false);
        text.push_str(if journaled {
            ", with a journal"
        } else {
            ", WITHOUT a journal"
        });
    }
    text
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
