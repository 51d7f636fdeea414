//! The PostgreSQL side of the harness: the server (from
//! `TANDEM_TEST_DATABASE_URL`, or a throwaway cluster started from the
//! machine's server binaries, as an unprivileged user when root) and a
//! fresh database per test.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio_postgres::NoTls;

use super::Entries;

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

    /// A fresh database on a given server, named
    /// `t_<machine>_<pid>_<n>`. The first one a process creates also drops
    /// this machine's test databases whose process has ended (a test cannot
    /// drop its own: it may fail anywhere), so a long-lived server named by
    /// `TANDEM_TEST_DATABASE_URL` does not fill up.
    pub async fn on(pg: &Pg) -> TestDb {
        let machine = machine_tag();
        let name = format!(
            "t_{machine}_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let admin = connect(&pg.url("postgres")).await;
        if !SWEPT.swap(true, Ordering::SeqCst) {
            drop_ended(&admin, &machine).await;
        }
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

static SWEPT: AtomicBool = AtomicBool::new(false);

/// Eight hex digits of /etc/machine-id: test databases of other machines
/// sharing the server are never touched.
fn machine_tag() -> String {
    let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let id = id.trim();
    if id.len() >= 8 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        id[..8].to_ascii_lowercase()
    } else {
        "00000000".into()
    }
}

/// Drops this machine's test databases left by processes that have ended.
async fn drop_ended(admin: &tokio_postgres::Client, machine: &str) {
    let prefix = format!("t_{machine}_");
    let Ok(rows) = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname::text, $1)",
            &[&prefix],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let Some(pid) = name[prefix.len()..]
            .split('_')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                name.replace('"', "\"\"")
            ))
            .await;
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
