//! The test harness: a real PostgreSQL (from `TANDEM_TEST_DATABASE_URL`, or a
//! throwaway cluster started from the machine's server binaries), a fresh
//! database per test, and real `tandem` processes with their own data dirs,
//! ports and host ids.
#![allow(dead_code)]

pub mod proxy;
pub mod recorder;
pub mod s3;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// The PostgreSQL server the tests use.
pub struct Pg {
    /// Connection string with `{db}` where the database name goes.
    template: String,
}

static PG: OnceLock<Pg> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn passwd_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

/// The newest PostgreSQL server binary directory on this machine.
pub fn pg_bin_dir() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").is_file().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().map(|d| d.1).expect(
        "PostgreSQL server binaries: run scripts/install-test-deps.sh (apt-get install postgresql)",
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a throwaway cluster that stops itself when this process exits.
/// `durable` keeps fsync and synchronous commit on (for benchmarks).
pub fn start_cluster(durable: bool) -> Pg {
    let bin = pg_bin_dir();
    let dir = std::env::temp_dir().join(format!("tandem-test-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_as = rustix::process::geteuid().is_root().then(|| {
        passwd_ids("postgres")
            .or_else(|| passwd_ids("nobody"))
            .expect("an unprivileged user")
    });
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    }
    let cmd = |program: &str| {
        let mut c = Command::new(bin.join(program));
        c.current_dir(&dir);
        if let Some((uid, gid)) = run_as {
            c.uid(uid).gid(gid);
        }
        c
    };
    let data = dir.join("data");
    let out = cmd("initdb")
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut port = 0;
    for _ in 0..5 {
        port = free_port();
        let speed = if durable {
            ""
        } else {
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {}{speed} -c max_connections=400",
            dir.display()
        );
        let out = cmd("pg_ctl")
            .args(["start", "-w", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .arg("-o")
            .arg(opts)
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        port = 0;
    }
    assert!(
        port != 0,
        "could not start the test PostgreSQL (see {}/server.log)",
        dir.display()
    );
    // Stop it (and remove it) once this test process is gone.
    let watchdog = format!(
        "while [ -d /proc/{pid} ]; do sleep 0.5; done; {pg_ctl} stop -D {data} -m immediate >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    );
    let mut w = Command::new("sh");
    w.arg("-c")
        .arg(watchdog)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((uid, gid)) = run_as {
        w.uid(uid).gid(gid);
    }
    // Deliberately never waited for: it outlives this process.
    #[allow(clippy::zombie_processes)]
    let _watchdog = w
        .process_group(0)
        .spawn()
        .expect("can start the PostgreSQL watchdog");
    Pg {
        template: format!("postgres://postgres@127.0.0.1:{port}/{{db}}"),
    }
}

pub fn pg() -> &'static Pg {
    PG.get_or_init(|| match std::env::var("TANDEM_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Pg {
            template: url_template(&url),
        },
        _ => start_cluster(false),
    })
}

/// Turns `postgres://u@h:p/db?opts` into a template with `{db}` for the
/// database name.
fn url_template(url: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = main.find("://").map_or(0, |i| i + 3);
    let base = match main[scheme_end..].find('/') {
        Some(i) => &main[..scheme_end + i],
        None => main,
    };
    format!("{base}/{{db}}{query}")
}

impl Pg {
    /// An existing server (its URL names any database).
    pub fn from_url(url: &str) -> Pg {
        Pg {
            template: url_template(url),
        }
    }

    pub fn url(&self, db: &str) -> String {
        self.template.replace("{db}", db)
    }
}

/// A fresh database for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::on(pg()).await
    }

    /// A fresh database on a given server.
    pub async fn on(pg: &Pg) -> TestDb {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let admin = connect(&pg.url("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TestDb {
            url: pg.url(&name),
            name,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// The committed truth: every entry with its content type.
    pub async fn entries(&self) -> Entries {
        let c = self.client().await;
        let rows = c
            .query(
                "SELECT cache, key, value, content_type FROM tandem.entries",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
            .collect()
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

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
                let rest = l.split("api listening addr=").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
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

    fn signal(&self, sig: &str) {
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
