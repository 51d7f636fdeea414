//! The test harness: a real PostgreSQL (from `TANDEM_TEST_DATABASE_URL`, or a
//! throwaway cluster started from the machine's server binaries) and a fresh
//! database per test ([`pg`]), and real `tandem` processes with their own
//! data dirs, ports and host ids (here).
#![allow(dead_code)]

mod pg;
pub mod proxy;
pub mod recorder;
pub mod s3;
pub mod uploads;

pub use pg::*;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `(cache, key) -> (value, content type)`
pub type Entries = BTreeMap<(String, String), (Vec<u8>, String)>;

/// A temporary directory that PostgreSQL's unprivileged user can traverse.
pub fn tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("tandem-test-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A tandem process.
pub struct Host {
    pub id: String,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    log: PathBuf,
    /// The config file (`/dev/null`: everything from the environment).
    pub config: PathBuf,
}

/// Settings that make tests fast.
pub const FAST: &[(&str, &str)] = &[
    ("TANDEM_SYNC_POLL_INTERVAL", "500ms"),
    ("TANDEM_CLUSTER_HEARTBEAT_INTERVAL", "500ms"),
    ("TANDEM_LOG_LEVEL", "info,tandem=debug"),
];

impl Host {
    /// Starts `tandem run` for host `id` with its data dir under `root`.
    pub async fn start(db_url: &str, id: &str, root: &Path, extra: &[(&str, &str)]) -> Host {
        Self::start_with_config(db_url, id, root, extra, "").await
    }

    /// Like [`Host::start`], with a config file (for `[[jobs]]`, which have
    /// no environment overrides).
    pub async fn start_with_config(
        db_url: &str,
        id: &str,
        root: &Path,
        extra: &[(&str, &str)],
        config: &str,
    ) -> Host {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        let mut env: Vec<(String, String)> = FAST
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("TANDEM_DATA_DIR".into(), dir.display().to_string()));
        env.push(("TANDEM_HOST_ID".into(), id.into()));
        env.push(("TANDEM_API_LISTEN".into(), "127.0.0.1:0".into()));
        if !db_url.is_empty() {
            env.push(("TANDEM_DATABASE_URL".into(), db_url.into()));
        }
        for (k, v) in extra {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        let config_path = if config.is_empty() {
            PathBuf::from("/dev/null")
        } else {
            let p = dir.join("tandem.toml");
            std::fs::write(&p, config).unwrap();
            p
        };
        let mut host = Host {
            config: config_path,
            id: id.into(),
            log: dir.join("tandem.log"),
            dir,
            env,
            child: None,
            addr: "127.0.0.1:1".parse().unwrap(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        host.spawn().await;
        host
    }

    /// Starts the process and waits until its API listens.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.id);
        let offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("can start tandem"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(addr) = self.find_addr(offset) {
                self.addr = addr;
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited with {status} while starting:\n{}",
                    self.id,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start:\n{}",
                self.id,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn find_addr(&self, offset: u64) -> Option<SocketAddr> {
        let mut f = std::fs::File::open(&self.log).ok()?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).ok()?;
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                if let Some(rest) = l.split("api listening addr=").nth(1) {
                    return rest.split_whitespace().next()?.parse().ok();
                }
                // log.format = "json"
                let v: serde_json::Value = serde_json::from_str(&l).ok()?;
                (v["fields"]["message"] == "api listening")
                    .then(|| v["fields"]["addr"].as_str()?.parse().ok())?
            })
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains(needle)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop:\n{}",
                self.id,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGSTOP / SIGCONT: a host that is alive but frozen.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        self.spawn().await;
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    /// Runs a `tandem` command that talks to this host's daemon (`status`,
    /// `jobs`, `search`, `resync`…), with only this host's settings.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            .args(["--config", "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TANDEM_DATA_DIR", self.dir.display().to_string())
            .env("TANDEM_API_LISTEN", self.addr.to_string())
            .env("TANDEM_HOST_ID", &self.id)
            .output()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became ready:\n{}",
                self.id,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// PUT a value; returns the token.
    pub async fn put(&self, cache: &str, key: &str, value: &[u8], query: &str) -> String {
        let r = self
            .http
            .put(self.url(&format!("/v1/cache/{cache}/{}{query}", url_encode(key))))
            .body(value.to_vec())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "PUT failed: {}", r.status());
        let body: serde_json::Value = r.json().await.unwrap();
        body["token"].as_str().unwrap().to_string()
    }

    pub async fn delete(&self, cache: &str, key: &str, query: &str) -> String {
        let r = self
            .http
            .delete(self.url(&format!("/v1/cache/{cache}/{}{query}", url_encode(key))))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "DELETE failed: {}", r.status());
        let body: serde_json::Value = r.json().await.unwrap();
        body["token"].as_str().unwrap().to_string()
    }

    /// Reads one value over HTTP: `None` on 404.
    pub async fn get(&self, cache: &str, key: &str) -> Option<Vec<u8>> {
        let r = self
            .http
            .get(self.url(&format!("/v1/cache/{cache}/{}", url_encode(key))))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => Some(r.bytes().await.unwrap().to_vec()),
            404 => None,
            s => panic!("GET {cache}/{key}: {s}"),
        }
    }

    /// Scrapes one metric sample (exact series text before the value).
    /// The text of `/metrics`.
    pub async fn metrics_text(&self) -> Option<String> {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics_text().await?;
        text.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    /// Everything in the cache directory, read as an app would.
    pub fn read_cache(&self) -> Entries {
        read_cache_dir(&self.cache_dir())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// Reads a cache directory into entries (through the key encoding).
pub fn read_cache_dir(dir: &Path) -> Entries {
    let mut out = Entries::new();
    let Ok(caches) = tandem::cache::read::list_caches(dir) else {
        return out;
    };
    for cache in caches {
        for key in tandem::cache::read::list_keys(&dir.join(&cache)).unwrap() {
            let path = dir.join(&cache).join(tandem::cache::keys::encode(&key));
            if let Some((value, ct)) = tandem::cache::read::read_value(&path).unwrap() {
                out.insert((cache.clone(), key), (value, ct));
            }
        }
    }
    out
}

/// Percent-encodes a key for a URL path (everything but unreserved bytes).
pub fn url_encode(key: &str) -> String {
    key.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Describes the first differences between two entry sets.
pub fn diff(expected: &Entries, actual: &Entries) -> String {
    let mut out = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => out.push(format!("missing {k:?}")),
            Some(a) if a != v => out.push(format!(
                "differs {k:?}: expected {:?} got {:?}",
                String::from_utf8_lossy(&v.0[..v.0.len().min(40)]),
                String::from_utf8_lossy(&a.0[..a.0.len().min(40)])
            )),
            _ => {}
        }
    }
    for k in actual.keys() {
        if !expected.contains_key(k) {
            out.push(format!("extra {k:?}"));
        }
    }
    out.truncate(10);
    out.join("\n")
}

/// Waits until every host's cache directory equals the `entries` table.
pub async fn assert_converged(db: &TestDb, hosts: &[&Host], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let truth = db.entries().await;
        let mut bad = None;
        for h in hosts {
            let local = h.read_cache();
            if local != truth {
                bad = Some((h.id.clone(), diff(&truth, &local)));
                break;
            }
        }
        match bad {
            None => return,
            Some((id, d)) if Instant::now() >= deadline => {
                let host = hosts.iter().find(|h| h.id == id).unwrap();
                panic!(
                    "{id} did not converge:\n{d}\n--- log ---\n{}",
                    host.log_text()
                );
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Polls `f` until it is true.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A numeric setting from the environment (benchmarks), or its default.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0..=1) of `v`, nearest rank; sorts `v`. NaN when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A process's CPU seconds (user + system) and resident MiB, from `/proc`.
pub fn proc_stat(pid: i32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let cpu = (fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0))
        / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (cpu, rss_kb / 1024.0)
}

/// The `some avg10` and `avg60` of Linux's pressure stall information for
/// `resource` (`io`, `cpu`): the percentage of the last 10 and 60 s in which
/// some task waited for it. `None` where the kernel has no PSI.
pub fn pressure(resource: &str) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?;
    let some = text.lines().find(|l| l.starts_with("some "))?;
    let avg = |name: &str| {
        some.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((avg("avg10=")?, avg("avg60=")?))
}

/// The share of the machine's CPU time spent busy (not idle, not waiting
/// for I/O) over the next second, from `/proc/stat`; `None` where there is
/// none.
pub async fn cpu_busy() -> Option<f64> {
    fn times() -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = text
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .take(8) // user … steal; guest time is counted in user already
            .filter_map(|f| f.parse().ok())
            .collect();
        let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
        Some((fields.iter().sum(), idle))
    }
    let (total0, idle0) = times()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (total1, idle1) = times()?;
    let total = total1.saturating_sub(total0).max(1);
    Some(1.0 - idle1.saturating_sub(idle0) as f64 / total as f64)
}

/// Files per second one thread creates in a fresh directory under `dir`
/// (2,000 files of 1 KiB, no fsync; left for `dir`'s owner to remove:
/// deleting them here would slow the next creations down). On ext4 without
/// a journal, such as this project's development VM, the rate falls several
/// times over for minutes after a mass deletion (each new inode skips the
/// recently freed ones), and with it every figure that writes files.
pub fn file_creation_rate(dir: &Path) -> f64 {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let n = 2000;
    let probe = dir.join(format!(
        "create-probe-{}",
        PROBES.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&probe).unwrap();
    let value = [b'p'; 1024];
    let started = Instant::now();
    for i in 0..n {
        let mut f = std::fs::File::create(probe.join(format!("f{i}"))).unwrap();
        f.write_all(&value).unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// One line saying how busy the machine is from outside (on a shared VM,
/// another machine's writeback changes every figure) and how fast files
/// can be created under `dir` (see [`file_creation_rate`]): benchmarks
/// print it at their start and end.
pub fn machine_pressure(dir: &Path) -> String {
    let show = |resource: &str| match pressure(resource) {
        Some((a10, a60)) => format!("{resource} {a10:.1} % (10 s) / {a60:.1} % (60 s)"),
        None => format!("{resource} unknown"),
    };
    format!(
        "machine pressure (tasks stalled, /proc/pressure): {}, {}; one thread creates {:.0} files/s",
        show("io"),
        show("cpu"),
        file_creation_rate(dir)
    )
}

/// Waits up to `BENCH_QUIET_WAIT` seconds (default 0: not at all) until the
/// machine's I/O pressure is under 5 % over the last 10 s and under 10 %
/// over the last minute (a previous run's writeback and deletions show in
/// the minute after it long after the last 10 s look calm), its cores are
/// busy under a fifth of the time over a second (no build or other benchmark
/// competing for them) and one thread creates at least
/// `BENCH_MIN_FILE_RATE` files/s (default 30,000) under `dir`, so that a run
/// starts neither in the previous run's writeback nor in the minutes after
/// its mass deletion of files. Says how long it waited.
pub async fn wait_for_quiet_machine(dir: &Path) {
    let limit = Duration::from_secs(env_u64("BENCH_QUIET_WAIT", 0));
    let min_rate = env_u64("BENCH_MIN_FILE_RATE", 30_000) as f64;
    let start = Instant::now();
    let mut quiet = limit.is_zero();
    while !quiet && start.elapsed() < limit {
        let busy = matches!(pressure("io"), Some((a10, a60)) if a10 >= 5.0 || a60 >= 10.0)
            || cpu_busy().await.is_some_and(|share| share >= 0.2);
        quiet = !busy && file_creation_rate(dir) >= min_rate;
        if !quiet {
            let pause = if busy { 2 } else { 10 };
            tokio::time::sleep(Duration::from_secs(pause)).await;
        }
    }
    if start.elapsed() >= Duration::from_secs(1) {
        println!(
            "waited {:.0} s for a quiet machine (BENCH_QUIET_WAIT={}, BENCH_MIN_FILE_RATE={min_rate}){}",
            start.elapsed().as_secs_f64(),
            limit.as_secs(),
            if quiet {
                ""
            } else {
                ": gave up, it is still busy"
            }
        );
    }
}
